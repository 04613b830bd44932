"""Export one (sliced) model to ONNX, check it against onnxruntime, write it atomically.

``export_onnx`` is the last stage of the pipeline::

    ElasticScores + budget ──passes.slice──▶ smaller GraphModule ──export_onnx──▶ .onnx

It takes any ``torch.nn.Module`` (in practice a ``torch.fx.GraphModule`` from
``symbolic_trace`` or ``torch.export(...).module()``), and:

1. computes PyTorch reference outputs (eval mode, ``torch.no_grad``) on FRESH random
   inputs at every batch size in ``check_batch_sizes``;
2. exports with ``torch.onnx.export`` into a private temporary folder next to the
   target: first the ``torch.export``-based exporter (``dynamo=True``), and if that fails
   its export or its checks, the TorchScript exporter (``dynamo=False``);
3. writes ``metadata_props`` (everything the caller passes, plus ``elastic_fx_version``,
   ``exporter``, ``opset``, ``dtype`` and ``parameters``);
4. runs ``onnx.checker.check_model`` on the file path (safe beyond 2 GB) and an
   onnxruntime session (CUDA provider first when available, else CPU) on the same fresh
   inputs, comparing every output with PyTorch;
5. only then moves the file (and its ``.data`` side file for models over ~1.8 GB) into
   place with ``os.replace``. Any failure removes the temporary folder, so no file is
   left behind, and raises :class:`~elastic_fx.errors.ExportError`.

Tolerance rule (per output, per checked batch size)::

    max|onnx - torch|  <=  atol + rtol * max|torch|

Defaults: fp32 ``atol = rtol = 1e-4``; fp16 ``atol = rtol = 1e-2``. The fp16 file is
compared with the ORIGINAL fp32 module (fed the same fp16-rounded inputs), so the
reported difference is what a user of the fp16 file loses against the source model.

Outputs: a tensor, a tuple/list, or a dict / Hugging Face ``ModelOutput`` are all
flattened into a list of tensors in order (non-tensor leaves such as ``None`` are
dropped); every one is exported and compared. ``output_index`` keeps only one of them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .._io import check_output
from ..errors import ExportError
from ..tracing import EXAMPLE_INPUTS_META
from ..version import __version__

logger = logging.getLogger(__name__)

#: Exporter names, in the order ``exporter="auto"`` tries them.
EXPORTERS: Tuple[str, ...] = ("dynamo", "torchscript")
#: (atol, rtol) defaults of the tolerance rule, per export dtype.
DEFAULT_TOLERANCE: Dict[str, Tuple[float, float]] = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2)}
#: Above this many bytes of weights the file is written with one external ``<name>.data`` file
#: (a single protobuf cannot exceed 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_INPUT_NAME = "input"
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote and how well it matches PyTorch.

    ``max_abs_diff`` is the largest difference over all outputs and checked batch sizes;
    ``tolerance`` is the bound (``atol + rtol * max|ref|``) of the output where that
    difference occurred. ``file_bytes`` counts the .onnx file plus any external-data file.
    """

    path: str
    max_abs_diff: float
    tolerance: float
    opset: int
    dtype: str
    batch_sizes_checked: Tuple[int, ...]
    metadata: Dict[str, str]
    file_bytes: int
    exporter: str = "dynamo"
    provider: str = "CPUExecutionProvider"
    output_names: Tuple[str, ...] = ()
    atol: float = 1e-4
    rtol: float = 1e-4
    attempts: Tuple[str, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------- outputs


def _flatten_tensors(out: Any, prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a tensor / sequence / mapping output, in order."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping):  # dicts and transformers' ModelOutput (an OrderedDict)
        pairs: List[Tuple[str, torch.Tensor]] = []
        for key, value in out.items():
            pairs += _flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key))
        return pairs
    if isinstance(out, (tuple, list)):
        pairs = []
        for i, value in enumerate(out):
            pairs += _flatten_tensors(value, f"{prefix}.{i}" if prefix else f"output_{i}")
        return pairs
    return []  # None, ints, strings: not exportable graph outputs


class _FlatOutputs(torch.nn.Module):
    """Runs ``inner`` and returns its tensors flattened (one tensor, or a tuple)."""

    def __init__(self, inner: torch.nn.Module, index: Optional[int]) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        # the inner module's mode, not a fresh module's training=True: torch.onnx restores the
        # wrapper's mode recursively after exporting, which would leave ``inner`` in training mode
        self.training = inner.training

    def forward(self, x: torch.Tensor):  # noqa: D102 - see class docstring
        flat = [t for _, t in _flatten_tensors(self.inner(x))]
        if self.index is not None:
            return flat[self.index]
        return flat[0] if len(flat) == 1 else tuple(flat)


def _select(pairs: List[Tuple[str, torch.Tensor]], index: Optional[int]) -> List[Tuple[str, torch.Tensor]]:
    if index is None:
        return pairs
    if not -len(pairs) <= index < len(pairs):
        raise ExportError(
            f"output_index={index} but the module returns {len(pairs)} tensor output(s) "
            f"({[n for n, _ in pairs]}); pass an index in [0, {len(pairs) - 1}] or None to export all.")
    name, tensor = pairs[index]
    return [(name, tensor)]


# ----------------------------------------------------------------------------- helpers


def _set_eval(module: torch.nn.Module) -> Optional[bool]:
    """Put ``module`` in eval mode; returns its previous mode (None if it cannot switch).

    ``torch.export(...).module()`` refuses ``.train()``/``.eval()``; it is already an
    inference graph, so it is used as is.
    """
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:
        return None
    return was_training


def _restore_mode(module: torch.nn.Module, was_training: Optional[bool]) -> None:
    if was_training:
        module.train(True)


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _fresh_input(example: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    """A new random input shaped like ``example`` with batch size ``batch`` (never the example)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    low, high = int(example.min()), int(example.max()) + 1
    return torch.randint(low, high, shape, generator=gen, dtype=example.dtype)


def _metadata_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if isinstance(value, (Mapping, list, tuple, bool)) or value is None:
        return json.dumps(value, default=_json_default)
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return str(value)


def _build_metadata(user: Optional[Mapping[str, object]], module: torch.nn.Module, exporter: str,
                    opset: int, dtype: str, input_shape: Sequence[Any]) -> Dict[str, str]:
    meta = {str(k): _metadata_value(v) for k, v in (user or {}).items()}
    meta.setdefault("parameters", str(sum(p.numel() for p in module.parameters())))
    meta.setdefault("input_shape", json.dumps(list(input_shape)))
    meta["opset"] = str(opset)
    meta["dtype"] = dtype
    meta["exporter"] = exporter
    meta["elastic_fx_version"] = __version__
    return meta


def _prepare_target(path: os.PathLike | str) -> Path:
    """Refuse unsafe outputs (a link, a directory, a device node ...), create missing parent
    folders, refuse unwritable ones; return the absolute path (links in parent folders resolved)."""
    target = check_output(path, "Export path", ExportError)
    target = target.parent.resolve() / target.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(
            f"Cannot create the output directory {target.parent} ({e}); choose a writable location.") from e
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ExportError(
            f"Output directory {target.parent} is not writable; choose another path or fix its permissions.")
    return target


def _providers() -> List[Any]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers: List[Any] = []
    if "CUDAExecutionProvider" in available:
        # TF32 would break fp32 tolerances; the check wants IEEE fp32.
        providers.append(("CUDAExecutionProvider", {"use_tf32": "0"}))
    providers.append("CPUExecutionProvider")
    return providers


def _session(path: Path, threads: Optional[int] = None, providers: Optional[List[Any]] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def _file_bytes(path: Path) -> int:
    """Size of an .onnx file plus its ``.data`` side file, if any."""
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


# ----------------------------------------------------------------------------- export steps


def _torch_export(module: torch.nn.Module, x: torch.Tensor, raw: Path, exporter: str, opset: int,
                  names: Sequence[str], dynamic_batch: bool, big: bool) -> None:
    """One ``torch.onnx.export`` call with ``exporter`` ('dynamo' or 'torchscript')."""
    with warnings.catch_warnings(), _quiet(_CHATTY_LOGGERS):
        warnings.simplefilter("ignore")  # deprecation / tracer chatter; failures raise
        if exporter == "dynamo":
            dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            torch.onnx.export(module, (x,), str(raw), dynamo=True, opset_version=opset, input_names=[_INPUT_NAME],
                              output_names=list(names), dynamic_shapes=dynamic, external_data=big, verbose=False)
        else:
            axes = {n: {0: "batch"} for n in [_INPUT_NAME, *names]} if dynamic_batch else None
            torch.onnx.export(module, (x,), str(raw), dynamo=False, opset_version=opset, input_names=[_INPUT_NAME],
                              output_names=list(names), dynamic_axes=axes, do_constant_folding=True)


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    """Raise the given loggers to WARNING for the duration (the exporter logs every graph pass at INFO)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _write_final(raw: Path, final: Path, metadata: Dict[str, str]) -> int:
    """Load the raw export, attach metadata, save it as ``final``; returns the real opset.

    ``metadata["opset"]`` is set to the opset the file actually has (an exporter may
    raise a requested opset that it cannot target).
    """
    import onnx

    model = onnx.load(str(raw))  # pulls in external data, if the exporter wrote any
    real_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)
    metadata["opset"] = str(real_opset)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    big = weight_bytes > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(final), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=final.name + ".data", size_threshold=1024)
    return real_opset


def _validate(final: Path, refs: Sequence[Tuple[int, np.ndarray, List[Tuple[str, torch.Tensor]]]],
              fp16: bool, atol: float, rtol: float) -> Tuple[float, float, str]:
    """Checker + onnxruntime comparison; returns (max_abs_diff, its tolerance, provider)."""
    import onnx

    try:
        onnx.checker.check_model(str(final))
    except Exception as e:  # onnx raises ValidationError and friends
        raise ExportError(f"onnx.checker rejected the exported file: {e}") from e
    try:
        session = _session(final, providers=_providers())
    except Exception as e:
        hint = (" onnxruntime may have no float16 kernel for an op on this provider; export with fp16=False, "
                "or validate on a machine with onnxruntime-gpu.") if fp16 else ""
        raise ExportError(f"onnxruntime could not load the exported file: {e}.{hint}") from e
    provider = session.get_providers()[0]
    input_name = session.get_inputs()[0].name
    worst, worst_tol = 0.0, atol
    for batch, feed, expected in refs:
        try:
            got = session.run(None, {input_name: feed})
        except Exception as e:
            hint = (" The onnxruntime CPU provider may lack a float16 kernel for one op; use fp16=False on CPU."
                    if fp16 else "")
            raise ExportError(f"onnxruntime failed to run the exported file at batch size {batch}: {e}.{hint}") from e
        if len(got) != len(expected):
            raise ExportError(f"The ONNX file has {len(got)} outputs but the module returns {len(expected)}; "
                              "this is an exporter bug, report it with the model.")
        for (name, ref), out in zip(expected, got):
            ref_np = ref.detach().double().cpu().numpy()
            out_np = np.asarray(out, dtype=np.float64)
            if out_np.shape != ref_np.shape:
                raise ExportError(f"ONNX output '{name}' has shape {out_np.shape} at batch size {batch}, PyTorch gives "
                                  f"{ref_np.shape}; the graph may be specialised to the example's batch size "
                                  "(try dynamic_batch=False, or re-trace the model with a dynamic batch).")
            diff = float(np.max(np.abs(out_np - ref_np))) if ref_np.size else 0.0
            scale = float(np.max(np.abs(ref_np))) if ref_np.size else 0.0
            tol = atol + rtol * scale
            if not diff <= tol:  # also catches NaN
                raise ExportError(
                    f"ONNX output '{name}' differs from PyTorch by {diff:.3g} at batch size {batch}, above the "
                    f"tolerance {tol:.3g} (= atol {atol:g} + rtol {rtol:g} * max|ref| {scale:.3g}). Check for ops "
                    "that export differently, or pass larger atol/rtol if the difference is expected (e.g. fp16).")
            if diff >= worst:
                worst, worst_tol = diff, tol
    return worst, worst_tol, provider


def _references(module: torch.nn.Module, example: torch.Tensor, batches: Sequence[int], fp16: bool,
                index: Optional[int], device: torch.device):
    """For each batch size: (batch, onnxruntime feed, the module's flattened outputs) on a fresh input."""
    refs = []
    for batch in batches:
        x = _fresh_input(example, batch, seed=1234 + batch)
        if x.is_floating_point():
            # fp16: both sides see the same fp16-representable values; the reference stays fp32
            x = x.half().float() if fp16 else x.to(example.dtype)
        feed = x.half().numpy() if fp16 and x.is_floating_point() else x.numpy()
        try:
            with torch.no_grad():
                out = module(x.to(device))
        except Exception as e:
            raise ExportError(
                f"The PyTorch module itself fails on a fresh input of shape {tuple(x.shape)}: {e}. A graph captured by "
                "torch.export with a static batch is specialised to that batch; re-export it with "
                "dynamic_shapes={0: Dim('batch')} or pass dynamic_batch=False.") from e
        pairs = _select(_flatten_tensors(out), index)
        if not pairs:
            raise ExportError(f"The module returned {type(out).__name__} with no tensors in it; nothing to export.")
        refs.append((batch, feed, [(n, t.detach().float().cpu()) for n, t in pairs]))
    return refs


def _carried_example(module: Any) -> torch.Tensor:
    """The example input a GraphModule from ``efx.trace`` (or sliced from one) carries."""
    carried = getattr(module, "meta", {}).get(EXAMPLE_INPUTS_META) if hasattr(module, "meta") else None
    if not carried or not isinstance(carried[0], torch.Tensor):
        raise ExportError("pass example_input (one input batch, e.g. torch.randn(1, 3, 224, 224)): this module "
                          "carries none (GraphModules from efx.trace and efx.slice do)")
    return carried[0]


def _check_args(module: Any, example_input: Any, opset: int, check_batch_sizes: Sequence[int],
                atol: Optional[float], rtol: Optional[float], exporter: str) -> None:
    import onnx

    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"export_onnx expects a torch.nn.Module (e.g. a GraphModule), got {type(module).__name__}.")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ExportError("example_input must be a tensor with a leading batch dimension, e.g. "
                          f"torch.randn(1, 3, 224, 224); got {type(example_input).__name__}.")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not 13 <= opset <= newest:
        raise ExportError(f"opset={opset!r} is not supported; use an int in [13, {newest}] (default 18).")
    if not check_batch_sizes or any(not isinstance(b, int) or b < 1 for b in check_batch_sizes):
        raise ExportError(f"check_batch_sizes={check_batch_sizes!r} must be a non-empty sequence of positive ints.")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not value >= 0:
            raise ExportError(f"{name}={value!r} must be >= 0.")
    if exporter not in ("auto", *EXPORTERS):
        raise ExportError(f"exporter={exporter!r}; use 'auto', 'dynamo' or 'torchscript'.")


# ----------------------------------------------------------------------------- public API


def export_onnx(
    module: torch.nn.Module,
    path: os.PathLike | str,
    example_input: Optional[torch.Tensor] = None,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    fp16: bool = False,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    check_batch_sizes: Sequence[int] = (1, 5),
    metadata: Optional[Mapping[str, object]] = None,
    output_index: Optional[int] = None,
    exporter: str = "auto",
) -> ExportReport:
    """Export ``module`` to ``path`` as ONNX, validated against onnxruntime; atomic.

    Args:
        module: the model (a GraphModule, an ``ExportedProgram.module()``, any nn.Module).
            Its train/eval mode is restored afterwards.
        path: the ``.onnx`` file to write; missing parent folders are created.
        example_input: one input batch, ``[B, ...]``; used for tracing only (the checks
            use fresh random inputs). Default: the example a GraphModule from
            :func:`elastic_fx.trace` / :func:`elastic_fx.slice` carries.
        opset: ONNX opset of the default domain (13..newest known to ``onnx``).
        dynamic_batch: export the first axis as the symbolic ``batch``. When False the
            file accepts only the example's batch size, and only that one is checked.
        fp16: export the weights and graph in float16 (the input is float16 too).
        atol, rtol: tolerance rule ``max|onnx - torch| <= atol + rtol * max|torch|`` per
            output; default 1e-4/1e-4 (fp32) and 1e-2/1e-2 (fp16, against the fp32 module).
        check_batch_sizes: batch sizes of the fresh random inputs compared.
        metadata: extra ONNX ``metadata_props`` (sparsity, GFLOPs, kept heads/neurons per
            block, source model, ...); values are str-converted, JSON for dicts/lists.
        output_index: export only this one of the flattened tensor outputs.
        exporter: 'auto' (dynamo, then TorchScript if that fails), 'dynamo' or 'torchscript'.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: bad arguments, an unwritable directory, an export that fails or does
            not match PyTorch. No file (and no temporary file) is left behind.
    """
    if example_input is None:
        example_input = _carried_example(module)
    _check_args(module, example_input, opset, check_batch_sizes, atol, rtol, exporter)
    default_atol, default_rtol = DEFAULT_TOLERANCE["float16" if fp16 else "float32"]
    atol = default_atol if atol is None else float(atol)
    rtol = default_rtol if rtol is None else float(rtol)
    target = _prepare_target(path)
    order = EXPORTERS if exporter == "auto" else (exporter,)
    batches = tuple(check_batch_sizes) if dynamic_batch else (int(example_input.shape[0]),)

    was_training = _set_eval(module)
    try:
        job = _prepare_job(module, example_input, target, opset, dynamic_batch, fp16, atol, rtol, batches,
                           metadata, output_index)
        attempts: List[str] = []
        for name in order:
            tmp = Path(tempfile.mkdtemp(prefix=".efx-", suffix=".tmp", dir=target.parent))
            try:
                report = _export_once(job, name, tmp, tuple(attempts))
                logger.info("exported %s with the %s exporter (max |diff| %.3g <= %.3g, %s)", target, name,
                            report.max_abs_diff, report.tolerance, report.provider)
                return report
            except Exception as e:  # try the next exporter; report every failure at the end
                logger.warning("%s exporter failed: %s", name, _short(e))
                attempts.append(f"{name}: {type(e).__name__}: {_short(e)}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"Could not export {type(module).__name__} to {target}; no file was written. Attempts:\n  "
            + "\n  ".join(attempts)
            + "\nIf the graph is specialised to one batch size, pass dynamic_batch=False; if the outputs differ "
            "only slightly, pass larger atol/rtol.")
    finally:
        _restore_mode(module, was_training)


@dataclass
class _ExportJob:
    """Everything one export attempt needs, computed once for all attempts."""

    module: torch.nn.Module  # the caller's module (parameter count, metadata)
    export_module: torch.nn.Module  # flattened outputs, fp16 copy when asked
    trace_input: torch.Tensor
    target: Path
    opset: int
    dynamic_batch: bool
    fp16: bool
    atol: float
    rtol: float
    refs: List[Tuple[int, np.ndarray, List[Tuple[str, torch.Tensor]]]]
    names: List[str]
    user_meta: Optional[Mapping[str, object]]
    big: bool

    @property
    def dtype(self) -> str:
        return "float16" if self.fp16 else "float32"


def _prepare_job(module: torch.nn.Module, example_input: torch.Tensor, target: Path, opset: int,
                 dynamic_batch: bool, fp16: bool, atol: float, rtol: float, batches: Sequence[int],
                 metadata: Optional[Mapping[str, object]], output_index: Optional[int]) -> _ExportJob:
    """References on fresh inputs, the module to export and its tracing input."""
    device = _module_device(module)
    refs = _references(module, example_input, batches, fp16, output_index, device)
    x = example_input.to(device)
    if dynamic_batch and x.shape[0] == 1:
        x = x.repeat(2, *([1] * (x.dim() - 1)))  # torch.export specialises a batch of 1
    if fp16 and x.is_floating_point():
        x = x.half()
    export_module = _FlatOutputs(copy.deepcopy(module).half() if fp16 else module, output_index)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_THRESHOLD
    return _ExportJob(module, export_module, x, target, opset, dynamic_batch, fp16, atol, rtol, refs,
                      _output_names([n for n, _ in refs[0][2]]), metadata, big)


def _export_once(job: _ExportJob, exporter: str, tmp: Path, attempts: Tuple[str, ...]) -> ExportReport:
    """Export with one exporter into ``tmp``, validate, and move the result onto ``job.target``."""
    raw_dir, final_dir = tmp / "raw", tmp / "final"
    raw_dir.mkdir()
    final_dir.mkdir()
    target, x = job.target, job.trace_input
    _torch_export(job.export_module, x, raw_dir / target.name, exporter, job.opset, job.names, job.dynamic_batch,
                  job.big)
    shape = ["batch" if job.dynamic_batch else int(x.shape[0]), *map(int, x.shape[1:])]
    meta = _build_metadata(job.user_meta, job.module, exporter, job.opset, job.dtype, shape)
    final = final_dir / target.name
    real_opset = _write_final(raw_dir / target.name, final, meta)
    if real_opset != job.opset:  # the dynamo exporter keeps 18 when it cannot convert down
        raise ExportError(f"the {exporter} exporter produced opset {real_opset}, not the requested {job.opset}.")
    max_diff, tol, provider = _validate(final, job.refs, job.fp16, job.atol, job.rtol)
    size = _file_bytes(final)  # measured here: a stale side file at the target must not count
    data = final.with_name(final.name + ".data")
    if data.exists():  # side file first, so a visible .onnx always has its weights
        os.replace(data, target.with_name(target.name + ".data"))
    os.replace(final, target)
    return ExportReport(path=str(target), max_abs_diff=max_diff, tolerance=tol, opset=real_opset, dtype=job.dtype,
                        batch_sizes_checked=tuple(b for b, _, _ in job.refs), metadata=meta,
                        file_bytes=size, exporter=exporter, provider=provider,
                        output_names=tuple(job.names), atol=job.atol, rtol=job.rtol, attempts=attempts)


def _output_names(raw: Sequence[str]) -> List[str]:
    """ONNX output names: the flattened names, made unique."""
    names: List[str] = []
    for name in raw:
        candidate, i = name, 1
        while candidate in names or candidate == _INPUT_NAME:
            candidate, i = f"{name}_{i}", i + 1
        names.append(candidate)
    return names


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def read_metadata(path: os.PathLike | str) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict of strings (JSON for dicts/lists)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"Cannot read {path} as an ONNX file ({e}); pass a file written by export_onnx.") from e
    return {p.key: p.value for p in model.metadata_props}


def onnx_latency(path: os.PathLike | str, batch_size: int, *, warmup: int = 3, iters: int = 10,
                 threads: Optional[int] = None) -> float:
    """Median wall time (seconds) of one onnxruntime CPU run at ``batch_size``.

    The input is random, shaped from the file's input (its symbolic batch axis set to
    ``batch_size``). ``threads`` sets ``intra_op_num_threads`` (None: onnxruntime's default).
    """
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ExportError(f"onnx_latency needs batch_size >= 1, iters >= 1, warmup >= 0; "
                          f"got {batch_size}, {iters}, {warmup}.")
    if not Path(path).is_file():
        raise ExportError(f"No ONNX file at {path}; export one with export_onnx first.")
    try:
        session = _session(Path(path), threads=threads)
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path} ({_short(e)}); re-export it with export_onnx.") from e
    spec = session.get_inputs()[0]
    dims = list(spec.shape)
    if dims and not isinstance(dims[0], int):
        dims[0] = batch_size
    elif dims and dims[0] != batch_size:
        raise ExportError(f"{path} has a fixed batch size {dims[0]}, not {batch_size}; export with dynamic_batch=True.")
    if any(not isinstance(d, int) for d in dims):
        raise ExportError(f"{path} has symbolic non-batch input dims {spec.shape}; only the batch axis may be dynamic.")
    dtype = _NP_DTYPES.get(spec.type, np.float32)
    feed = {spec.name: np.random.default_rng(0).standard_normal(dims).astype(dtype)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))
