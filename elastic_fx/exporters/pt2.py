"""Export one (sliced) model as a PyTorch ``ExportedProgram`` (``.pt2``), validated, atomic.

``export_pt2`` is the PyTorch sibling of :func:`elastic_fx.exporters.onnx.export_onnx`: the
``.pt2`` file is what ``torch.export``-based toolchains take (ExecuTorch, torch-tensorrt,
AOTInductor). It takes any ``torch.nn.Module`` (in practice the sliced GraphModule), and:

1. computes the module's outputs (eval mode, ``torch.no_grad``) on FRESH random inputs at
   every batch size in ``check_batch_sizes`` (never the tracing example);
2. captures it with ``torch.export.export`` with a dynamic batch axis, traced at a batch
   of 2 (``torch.export`` specialises a batch of 1);
3. saves it with ``torch.export.save`` to a temporary file next to the target, LOADS it
   back with ``torch.export.load`` and runs the loaded program on the same fresh inputs:
   every output must satisfy ``max|pt2 - module| <= atol + rtol * max|module|``;
4. only then renames the file onto the target. Any failure removes the temporary file
   and raises :class:`~elastic_fx.errors.ExportError`: nothing is written.

Run the file with :func:`load_pt2` (a callable module) or ``torch.export.load(path)``
(the ``ExportedProgram``; ``.module()`` runs it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .._io import atomic_write, check_output
from ..errors import ExportError
from .onnx import (_carried_example, _flatten_tensors, _fresh_input, _module_device, _restore_mode, _set_eval,
                   _short)

logger = logging.getLogger(__name__)

#: (atol, rtol) of the check: the exported program runs the same ATen kernels as the module.
PT2_TOLERANCE: Tuple[float, float] = (1e-5, 1e-5)


@dataclass(frozen=True)
class Pt2Report:
    """What ``export_pt2`` wrote and how well the saved-and-reloaded program matches the module."""

    path: str
    max_abs_diff: float
    tolerance: float
    batch_sizes_checked: Tuple[int, ...]
    file_bytes: int
    metadata: Dict[str, str]


def _outputs(module: Any, x: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    with torch.no_grad():
        return [(n, t.detach().float().cpu()) for n, t in _flatten_tensors(module(x))]


def _compare(got: List[Tuple[str, torch.Tensor]], want: List[Tuple[str, torch.Tensor]], batch: int,
             atol: float, rtol: float) -> Tuple[float, float]:
    """(max |diff|, its tolerance) over all outputs; ExportError on a mismatch."""
    if len(got) != len(want):
        raise ExportError(f"the exported program returns {len(got)} tensors, the module {len(want)}")
    worst, worst_tol = 0.0, atol
    for (name, ref), (_, out) in zip(want, got):
        if out.shape != ref.shape:
            raise ExportError(f"output '{name}' has shape {tuple(out.shape)} at batch size {batch}, the module gives "
                              f"{tuple(ref.shape)}")
        diff = float((out - ref).abs().max()) if ref.numel() else 0.0
        tol = atol + rtol * (float(ref.abs().max()) if ref.numel() else 0.0)
        if not diff <= tol:  # also catches NaN
            raise ExportError(f"output '{name}' of the saved program differs from the module by {diff:.3g} at batch "
                              f"size {batch}, above the tolerance {tol:.3g}")
        if diff >= worst:
            worst, worst_tol = diff, tol
    return worst, worst_tol


def export_pt2(module: torch.nn.Module, path: "os.PathLike[str] | str", example_input: Optional[torch.Tensor] = None,
               *, check_batch_sizes: Sequence[int] = (1, 5), atol: Optional[float] = None,
               rtol: Optional[float] = None, metadata: Optional[Mapping[str, object]] = None) -> Pt2Report:
    """Write ``module`` as a validated ``.pt2`` ExportedProgram with a dynamic batch axis; atomic.

    Args:
        module: the model (a sliced GraphModule, any nn.Module). Its mode is restored.
        path: the ``.pt2`` file to write; missing parent folders are created.
        example_input: one input batch ``[B, ...]`` (tracing only). Default: the example a
            GraphModule from :func:`elastic_fx.trace` / :func:`elastic_fx.slice` carries.
        check_batch_sizes: batch sizes of the fresh random inputs the saved file is checked on.
        atol, rtol: tolerance rule per output (default 1e-5 / 1e-5).
        metadata: strings stored in the file's ``extra_files`` as ``metadata.json``.

    Raises:
        ExportError: bad arguments, a module ``torch.export`` cannot capture, or a saved
            program that does not match the module. No file is left behind.
    """
    import json

    check_output(path, "the .pt2 path", ExportError)
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"export_pt2 expects a torch.nn.Module (e.g. a GraphModule), got {type(module).__name__}")
    if example_input is None:
        example_input = _carried_example(module)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ExportError("example_input must be a tensor with a leading batch dimension, e.g. torch.randn(1, 3, 224, "
                          f"224); got {type(example_input).__name__}")
    if not check_batch_sizes or any(not isinstance(b, int) or b < 1 for b in check_batch_sizes):
        raise ExportError(f"check_batch_sizes={check_batch_sizes!r} must be a non-empty sequence of positive ints")
    atol = PT2_TOLERANCE[0] if atol is None else float(atol)
    rtol = PT2_TOLERANCE[1] if rtol is None else float(rtol)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}

    was_training = _set_eval(module)
    try:
        device = _module_device(module)
        checks = []
        for batch in check_batch_sizes:
            x = _fresh_input(example_input, batch, seed=4321 + batch).to(example_input.dtype).to(device)
            checks.append((batch, x, _outputs(module, x)))
        if not checks[0][2]:
            raise ExportError(f"{type(module).__name__} returns no tensors; nothing to export")
        x = example_input.to(device)
        if x.shape[0] == 1:
            x = x.repeat(2, *([1] * (x.dim() - 1)))  # torch.export specialises a batch of 1
        try:
            program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        except Exception as e:
            raise ExportError(f"torch.export could not capture {type(module).__name__} with a dynamic batch axis: "
                              f"{_short(e)}; nothing was written. A graph specialised to one batch size cannot be "
                              "exported with a dynamic batch: re-trace it with efx.trace") from e
        result: Dict[str, Any] = {}

        def write(tmp: Path) -> None:
            # through file objects: torch.export wants a name ending in .pt2, the temporary one does not
            with open(tmp, "wb") as fh:
                torch.export.save(program, fh, extra_files={"metadata.json": json.dumps(meta)})
            try:
                with open(tmp, "rb") as fh:
                    loaded = torch.export.load(fh).module()
            except Exception as e:
                raise ExportError(f"the saved .pt2 does not load back ({_short(e)}); nothing was written") from e
            worst, worst_tol = 0.0, atol
            for batch, xb, want in checks:
                try:
                    got = _outputs(loaded, xb)
                except Exception as e:
                    raise ExportError(f"the saved .pt2 fails on a fresh input of batch size {batch}: {_short(e)}; "
                                      "nothing was written") from e
                try:
                    diff, tol = _compare(got, want, batch, atol, rtol)
                except ExportError as e:
                    raise ExportError(f"{e}; nothing was written (pass larger atol/rtol if the difference is "
                                      "expected)") from None
                if diff >= worst:
                    worst, worst_tol = diff, tol
            result.update(max_abs_diff=worst, tolerance=worst_tol, file_bytes=tmp.stat().st_size)

        target = atomic_write(path, write, ExportError, "the .pt2 path")
        logger.info("wrote %s (max |diff| %.3g <= %.3g)", target, result["max_abs_diff"], result["tolerance"])
        return Pt2Report(path=str(target), max_abs_diff=result["max_abs_diff"], tolerance=result["tolerance"],
                         batch_sizes_checked=tuple(b for b, _, _ in checks), file_bytes=result["file_bytes"],
                         metadata=meta)
    finally:
        _restore_mode(module, was_training)


def load_pt2(path: "os.PathLike[str] | str") -> torch.nn.Module:
    """Load a ``.pt2`` written by :func:`export_pt2` as a callable module (``torch.export.load(path).module()``)."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"no .pt2 file at {p}; write one with elastic-fx export --format pt2 (or efx.export_pt2)")
    try:
        return torch.export.load(str(p)).module()
    except Exception as e:
        raise ExportError(f"{p} is not a loadable torch.export program ({_short(e)}); re-export it with this "
                          f"torch version ({torch.__version__})") from e


def read_pt2_metadata(path: "os.PathLike[str] | str") -> Dict[str, str]:
    """The ``metadata.json`` that :func:`export_pt2` stored in the file (values are strings / JSON)."""
    import json

    extra = {"metadata.json": ""}
    try:
        torch.export.load(str(path), extra_files=extra)
        return json.loads(extra["metadata.json"] or "{}")
    except Exception as e:
        raise ExportError(f"cannot read the metadata of {path} ({_short(e)}); pass a file written by export_pt2") from e
