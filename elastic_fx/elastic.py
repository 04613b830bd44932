"""One score file -> a sub-network at any budget.

:class:`ElasticModel` holds a traced model and its :class:`~elastic_fx.scores.ElasticScores`
(what :func:`elastic_fx.prune` produces: ONE ranking, so any sparsity or FLOPs budget is a
cut of it and sub-networks are nested) and hands out physically sliced GraphModules on
demand (cached), or writes one validated ONNX file per budget plus a manifest.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from ._io import check_output, replace_dir
from .budget import achieved
from .data import PREPROCESS_META, PreprocessConfig, load_tensor, resolve_preprocess
from .errors import DataError, ExportError
from .exporters.onnx import export_onnx
from .passes.correct import CorrectionConfig, correct_structures
from .passes.discover import prepare
from .passes.slice import slice_graph
from .scores import ElasticScores
from .structures import StructureMap
from .tracing import example_inputs_of
from .version import __version__

log = logging.getLogger(__name__)

__all__ = ["ElasticModel", "ElasticScores"]


class ElasticModel:
    """A model plus its ElasticScores: physically sliced sub-networks at any budget."""

    def __init__(self, model_or_gm: nn.Module, scores: ElasticScores | str | os.PathLike, example_inputs=None,
                 *, structures: Optional[StructureMap] = None) -> None:
        self.scores = scores if isinstance(scores, ElasticScores) else ElasticScores.load(scores)
        pre = self.scores.preprocess
        if example_inputs is None and pre and not isinstance(model_or_gm, fx.GraphModule):
            # the size the model was pruned at travels with the scores
            example_inputs = (torch.randn(2, 3, *pre["input_size"], generator=torch.Generator().manual_seed(0)),)
        self.gm, self.smap = prepare(model_or_gm, example_inputs, structures)
        if pre and self.gm.meta.get(PREPROCESS_META) is None:
            self.gm.meta[PREPROCESS_META] = PreprocessConfig.from_dict(pre)
        if pre:
            size = tuple(int(v) for v in example_inputs_of(self.gm)[0].shape[-2:])
            if size != tuple(pre["input_size"]):
                log.warning("the scores were computed at %sx%s inputs, this model is traced at %sx%s; the ranking "
                            "may not transfer: prune at the size you deploy", *pre["input_size"], *size)
        self.scores.check(self.smap)
        self._cache: Dict[Tuple, fx.GraphModule] = {}

    def keep(self, sparsity: Optional[float] = None, *, flops: Optional[float] = None) -> dict:
        return self.scores.keep(self.smap, sparsity, flops=flops)

    def at(self, sparsity: Optional[float] = None, *, flops: Optional[float] = None, correct: bool = False,
           calibration: Any = None, correction: Any = None) -> fx.GraphModule:
        """A physically sliced GraphModule for one budget (cached; nested across budgets).

        ``correct=True`` first applies the SparseGPT-style weight correction of the
        attention and FFN out-projections (paper App. B.4), with inputs collected on
        ``calibration`` images (a folder, source, or preprocessed tensor; default 1000
        images); ``correction`` is a :class:`~elastic_fx.passes.correct.CorrectionConfig`
        (damping strategy ``"mean"`` or ``"max"``, block size ...).
        """
        keep = self.keep(sparsity, flops=flops)
        key = (_freeze(keep), bool(correct))
        if key not in self._cache:
            src = self.gm
            if correct:
                src = self._corrected(keep, calibration, correction)
            self._cache[key] = slice_graph(src, self.smap, keep)
        return self._cache[key]

    def _corrected(self, keep: dict, calibration: Any, correction: Any) -> fx.GraphModule:
        config = correction or CorrectionConfig()
        if calibration is None:
            raise DataError("weight correction needs calibration images: pass calibration=<folder or tensor>")
        if not (isinstance(calibration, torch.Tensor) and calibration.is_floating_point()):
            calibration = load_tensor(calibration, resolve_preprocess(self.gm), config.max_images)
        return correct_structures(self.gm, self.smap, keep, calibration, config=config)

    def export_onnx(self, out_dir: str | os.PathLike, sparsities: Sequence[float], *, source: str = "",
                    correct: bool = False, calibration: Any = None, correction: Any = None, **kw) -> dict:
        """One validated ONNX file per sparsity plus ``manifest.json``; returns the manifest.

        ``correct``/``calibration``/``correction`` as in :meth:`at`; other keywords go to
        :func:`elastic_fx.export_onnx` (``fp16``, ``opset`` ...). ``out_dir`` is written
        all-or-nothing: every budget is checked first (file names, reachability), the files
        are written into a fresh temporary folder that then replaces ``out_dir``, under a
        lock that refuses a second export into the same folder. An existing ``out_dir``
        must be empty or hold an earlier export (a ``manifest.json`` and its files).
        """
        names = budget_file_names(sparsities)
        check_output(out_dir, "the output folder", ExportError, directory=True)
        keeps = [self.keep(s) for s in sparsities]  # an unreachable budget fails here, before any file
        x = example_inputs_of(self.gm)[0]
        manifest: Dict[str, Any] = {}

        def fill(tmp: Path) -> None:
            entries = []
            for s, keep, name in zip(sparsities, keeps, names):
                small = self.at(s, correct=correct, calibration=calibration, correction=correction)
                stats = achieved(self.smap, keep)
                meta = {
                    "sparsity": round(stats["sparsity"], 6), "target_sparsity": s, "parameters": stats["params"],
                    "gflops": round(stats["gflops"], 4), "source_model": source,
                    "kept_heads": {b: len(k.get("heads", [])) for b, k in keep.items()},
                    "kept_neurons": {b: len(k.get("neurons", [])) for b, k in keep.items()},
                    "weight_correction": bool(correct),
                }
                report = export_onnx(small, tmp / name, x, metadata=meta, **kw)
                entries.append({
                    "file": name, "sparsity": meta["sparsity"], "target_sparsity": s,
                    "params": stats["params"], "gflops": meta["gflops"], "ort_max_abs_diff": report.max_abs_diff,
                })
            manifest.update({"elastic_fx_version": __version__, "source_model": source, "budgets": entries})
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

        replace_dir(out_dir, fill, ExportError, "the output folder", owned=_earlier_export)
        return manifest


def budget_file_names(sparsities: Sequence[float]) -> list:
    """``sparsity_NN.onnx`` per budget; :class:`ExportError` when two budgets share a name."""
    names: Dict[str, float] = {}
    out = []
    for s in sparsities:
        name = f"sparsity_{int(round(float(s) * 100)):02d}.onnx"
        if name in names:
            raise ExportError(f"the budgets {names[name]} and {s} both round to the file name {name}, so one would "
                              "overwrite the other; give budgets at least 0.01 apart")
        names[name] = s
        out.append(name)
    return out


def _earlier_export(out: Path) -> bool:
    """True when folder ``out`` holds only an earlier export: manifest.json and the files it lists."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        listed = {str(e["file"]) for e in manifest["budgets"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    allowed = {"manifest.json"} | listed | {f + ".data" for f in listed}
    return all(p.name in allowed and (p.is_file() and not p.is_symlink()) for p in out.iterdir())


def _freeze(keep: dict) -> Tuple:
    return tuple(sorted((b, tuple(sorted((k, tuple(v)) for k, v in e.items()))) for b, e in keep.items()))
