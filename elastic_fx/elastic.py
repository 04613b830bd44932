"""One score file -> a sub-network at any budget.

:class:`ElasticModel` holds a traced model and its :class:`~elastic_fx.scores.ElasticScores`
(what :func:`elastic_fx.prune` produces: ONE ranking, so any sparsity or FLOPs budget is a
cut of it and sub-networks are nested) and hands out physically sliced GraphModules on
demand (cached), or writes one validated ONNX file per budget plus a manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from ._io import check_output, replace_dir
from .budget import achieved
from .data import PREPROCESS_META, PreprocessConfig, load_tensor, resolve_preprocess
from .errors import ConfigError, DataError, ExportError, QuantizationError
from .exporters.onnx import export_onnx, onnx_latency
from .exporters.pt2 import export_pt2, load_pt2
from .exporters.quantize import QuantConfig, quantize_onnx
from .passes.correct import CorrectionConfig, correct_structures
from .passes.discover import prepare
from .passes.slice import slice_graph
from .scores import ElasticScores
from .structures import StructureMap
from .tracing import example_inputs_of
from .version import __version__

log = logging.getLogger(__name__)

__all__ = ["ElasticModel", "ElasticScores"]

#: What :meth:`ElasticModel.export` can write: (format, precision) pairs.
OFFERED: Tuple[Tuple[str, str], ...] = (("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"), ("pt2", "fp32"))
FORMATS: Tuple[str, ...] = ("onnx", "pt2")
PRECISIONS: Tuple[str, ...] = ("fp32", "fp16", "int8")


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

    def _budget_meta(self, s: float, keep: dict, source: str, correct: bool) -> Tuple[dict, Dict[str, Any]]:
        """What one budget achieves, and the metadata its exported files carry."""
        stats = achieved(self.smap, keep)
        return stats, {
            "sparsity": round(stats["sparsity"], 6), "target_sparsity": s, "parameters": stats["params"],
            "gflops": round(stats["gflops"], 4), "source_model": source,
            "kept_heads": {b: len(k.get("heads", [])) for b, k in keep.items()},
            "kept_neurons": {b: len(k.get("neurons", [])) for b, k in keep.items()},
            "weight_correction": bool(correct),
        }

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
                stats, meta = self._budget_meta(s, keep, source, correct)
                report = export_onnx(small, tmp / name, x, metadata=meta, **kw)
                entries.append({
                    "file": name, "sparsity": meta["sparsity"], "target_sparsity": s,
                    "params": stats["params"], "gflops": meta["gflops"], "ort_max_abs_diff": report.max_abs_diff,
                })
            manifest.update({"elastic_fx_version": __version__, "source_model": source, "budgets": entries})
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

        replace_dir(out_dir, fill, ExportError, "the output folder", owned=_earlier_export)
        return manifest


    def export(self, out_dir: str | os.PathLike, sparsities: Sequence[float], *,
               formats: Sequence[str] = ("onnx",), precisions: Sequence[str] = ("fp32",), calibration: Any = None,
               quant: Optional[QuantConfig] = None, num_calibration: int = 128, num_holdout: int = 32,
               latency_batches: Sequence[int] = (1, 16), latency_iters: int = 10, source: str = "",
               correct: bool = False, correction: Any = None, seed: int = 0, **kw) -> dict:
        """Deployment files per budget: every offered (format, precision) pair, plus ``manifest.json``.

        Pairs offered: ONNX in fp32, fp16 and int8 (static QDQ, :func:`~elastic_fx.quantize_onnx`),
        and ``.pt2`` (``torch.export``) in fp32; other pairs of ``formats`` x ``precisions``
        are skipped and listed under ``"skipped"``. ``calibration`` (a folder, an image
        source or a preprocessed tensor; default: the images the scores were computed on,
        when their folder is recorded and still there) gives int8 its activation ranges and
        its held-out check: ``num_holdout`` of the images (seeded) are held out, up to
        ``num_calibration`` others calibrate. A model with no operator ORT can quantize
        gets its fp32 ONNX file instead, and the manifest says why.

        Every manifest entry: ``file``, ``sha256``, ``sparsity``, ``params``, ``gflops``,
        ``format``, ``precision``, ``fidelity`` (max |diff| against the sliced fp32 module;
        for int8 the cosine similarity of the outputs on the held-out images too),
        ``latency_ms`` per batch size in ``latency_batches`` (ONNX files: onnxruntime on the
        CPU; ``.pt2``: the loaded program in PyTorch) and ``runtime``. ``latency_batches=()``
        skips timing. ``out_dir`` is written all-or-nothing, as in :meth:`export_onnx`.
        """
        pairs, skipped = check_formats(formats, precisions)
        names = budget_file_names(sparsities)
        check_output(out_dir, "the output folder", ExportError, directory=True)
        if any(b < 1 for b in latency_batches) or latency_iters < 1:
            raise ConfigError(f"latency_batches={tuple(latency_batches)} must be positive and latency_iters="
                              f"{latency_iters} >= 1")
        if quant is not None and not isinstance(quant, QuantConfig):
            raise ConfigError(f"quant must be an elastic_fx.QuantConfig, got {type(quant).__name__}")
        keeps = [self.keep(s) for s in sparsities]  # an unreachable budget fails here, before any file
        cal = hold = None
        if any(p == "int8" for _, p in pairs):
            cal, hold = self._calibration_split(calibration, num_calibration, num_holdout, seed)
        x = example_inputs_of(self.gm)[0]
        pre = self.gm.meta.get(PREPROCESS_META)
        manifest: Dict[str, Any] = {}

        def fill(tmp: Path) -> None:
            entries = []
            scratch = tmp / ".fp32"
            for s, keep, name in zip(sparsities, keeps, names):
                small = self.at(s, correct=correct, calibration=calibration, correction=correction)
                stats, meta = self._budget_meta(s, keep, source, correct)
                if pre is not None:
                    meta["preprocess"] = pre.to_dict()
                base = {"sparsity": meta["sparsity"], "target_sparsity": s, "params": stats["params"],
                        "gflops": meta["gflops"]}
                stem = name[:-len(".onnx")]
                fp32_file = None
                for fmt, prec in pairs:
                    entry = {**base, "format": fmt, "precision": prec}
                    if fmt == "pt2":
                        file = f"{stem}.pt2"
                        rep = export_pt2(small, tmp / file, x, metadata=meta)
                        entry["fidelity"] = {"max_abs_diff": rep.max_abs_diff, "against": "sliced fp32 module"}
                    elif prec in ("fp32", "fp16"):
                        file = name if prec == "fp32" else f"{stem}.fp16.onnx"
                        rep = export_onnx(small, tmp / file, x, metadata={**meta, "precision": prec},
                                          fp16=prec == "fp16", **kw)
                        entry["fidelity"] = {"max_abs_diff": rep.max_abs_diff, "against": "sliced fp32 module"}
                        entry["ort_max_abs_diff"] = rep.max_abs_diff  # the key export_onnx's manifest has
                        fp32_file = tmp / file if prec == "fp32" else fp32_file
                    else:
                        fp32_entry = next((e2 for e2 in entries if e2["file"] == name), None)
                        if fp32_file is None:  # int8 starts from a validated fp32 file
                            fp32_file = scratch / name
                            fp32_diff = export_onnx(small, fp32_file, x, metadata={**meta, "precision": "fp32"},
                                                    **kw).max_abs_diff
                        file = f"{stem}.int8.onnx"
                        try:
                            rep = quantize_onnx(fp32_file, tmp / file, cal, hold, config=quant, metadata=meta)
                        except QuantizationError as e:  # keep the float file, say why
                            log.warning("%s; keeping the fp32 file", e)
                            if fp32_entry is not None:  # written already for the fp32 pair
                                fp32_entry["int8_skipped"] = str(e)
                                continue
                            os.replace(fp32_file, tmp / name)
                            file, entry["precision"], entry["int8_skipped"] = name, "fp32", str(e)
                            entry["fidelity"] = {"max_abs_diff": fp32_diff, "against": "sliced fp32 module"}
                        else:
                            entry["fidelity"] = {"cosine_mean": rep.cosine_mean, "cosine_min": rep.cosine_min,
                                                 "max_abs_diff": rep.max_abs_diff, "holdout_images": rep.holdout_images,
                                                 "calibration_images": rep.calibration_images,
                                                 "against": "fp32 ONNX of the sliced model (= the module to 1e-4)"}
                            entry["quantized_ops"], entry["float_ops"] = rep.quantized_ops, rep.float_ops
                    entry["file"] = file
                    entry["sha256"] = _sha256(tmp / file)
                    entry["runtime"], entry["latency_ms"] = _latency(tmp / file, fmt, latency_batches, latency_iters,
                                                                tuple(x.shape[1:]))
                    entries.append(entry)
            shutil.rmtree(scratch, ignore_errors=True)
            manifest.update({"elastic_fx_version": __version__, "source_model": source, "budgets": entries,
                             "skipped": [f"{f} {p}" for f, p in skipped],
                             "latency": {"batches": list(latency_batches), "iters": latency_iters,
                                         "machine": _machine()}})
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

        replace_dir(out_dir, fill, ExportError, "the output folder", owned=_earlier_export)
        return manifest

    def _calibration_split(self, calibration: Any, num_calibration: int, num_holdout: int,
                           seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Calibration and held-out images for int8, through the model's own preprocessing."""
        if num_calibration < 1 or num_holdout < 1:
            raise ConfigError(f"num_calibration={num_calibration} and num_holdout={num_holdout} must be >= 1")
        if calibration is None:
            recorded = self.scores.config.get("images")
            if isinstance(recorded, str) and Path(recorded).is_dir():
                calibration = recorded
                log.info("int8 calibration: a seeded subset of the images the scores were computed on (%s)", recorded)
            else:
                raise ConfigError("int8 needs calibration images: pass calibration=<image folder> (the CLI's "
                                  "--calibration DIR), real images like those the model will see")
        images = load_tensor(calibration, resolve_preprocess(self.gm), num_calibration + num_holdout, seed=seed)
        if len(images) < 2:
            raise DataError(f"int8 calibration found {len(images)} usable image(s); it needs at least 2 (some to "
                            "calibrate on, others to check the result on): give a folder with more images")
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        n_hold = max(1, min(num_holdout, len(images) // 4))
        return images[perm[n_hold:]], images[perm[:n_hold]]


def check_formats(formats: Sequence[str], precisions: Sequence[str]):
    """The offered (format, precision) pairs of ``formats`` x ``precisions``, and the rest."""
    formats, precisions = [formats] if isinstance(formats, str) else list(formats), (
        [precisions] if isinstance(precisions, str) else list(precisions))
    for what, got, known in (("format", formats, FORMATS), ("precision", precisions, PRECISIONS)):
        bad = [v for v in got if v not in known]
        if bad or not got:
            raise ConfigError(f"{what} {bad or got} is not offered; choose from {', '.join(known)}")
    want = [(f, p) for f in dict.fromkeys(formats) for p in dict.fromkeys(precisions)]
    pairs = [fp for fp in OFFERED if fp in want]  # fp32 ONNX before int8, which starts from it
    skipped = [fp for fp in want if fp not in OFFERED]
    if not pairs:
        raise ConfigError(f"none of {[' '.join(p) for p in want]} is offered; offered: "
                          f"{', '.join(' '.join(p) for p in OFFERED)}")
    if skipped:
        log.warning("not offered, skipped: %s", ", ".join(" ".join(p) for p in skipped))
    return pairs, skipped


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _latency(path: Path, fmt: str, batches: Sequence[int], iters: int,
             sample_shape: Tuple[int, ...]) -> Tuple[str, Dict[str, Optional[float]]]:
    """(runtime, median milliseconds per batch size) of one file on this machine."""
    out: Dict[str, Optional[float]] = {}
    if fmt == "onnx":
        for b in batches:
            try:
                out[str(b)] = round(1e3 * onnx_latency(path, b, warmup=1, iters=iters), 3)
            except Exception as e:  # e.g. no float16 kernel on this CPU: the file is valid, only untimed
                log.warning("no latency for %s at batch %d: %s", path.name, b, e)
                out[str(b)] = None
        return "onnxruntime CPUExecutionProvider", out
    module = load_pt2(path) if batches else None
    for b in batches:
        x = torch.randn(b, *sample_shape, generator=torch.Generator().manual_seed(0))
        times = []
        with torch.no_grad():
            module(x)
            for _ in range(iters):
                t0 = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - t0)
        out[str(b)] = round(1e3 * statistics.median(times), 3)
    return "torch (torch.export.load(...).module())", out


def _machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


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
