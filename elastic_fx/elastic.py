"""One score file -> a sub-network at any budget.

:class:`ElasticScores` is what :func:`elastic_fx.prune` produces: the local (diagonal
Hessian) scores of every head and neuron, the xNES reweighting ``c`` it found, and the
record of the search. Together they define ONE global ranking; any sparsity or FLOPs
budget is a cut of it, so sub-networks are nested.

:class:`ElasticModel` holds a traced model and its scores and hands out physically sliced
GraphModules on demand (cached), or writes one validated ONNX file per budget.

File format (``.efx``): a single safetensors file — tensors only, so loading never
unpickles code — whose metadata holds one JSON document under the key ``elastic_fx``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .budget import Floors, budget_masks
from .errors import ScoresError
from .search.candidate import Layout, rescale
from .structures import StructureMap
from .version import __version__

log = logging.getLogger(__name__)

FORMAT = "elastic_fx.scores/1"


@dataclass
class ElasticScores:
    """Local scores + the xNES reweighting: one ranking for every budget."""

    head_sums: Dict[int, torch.Tensor]  # Σ g² per head (local, raw)
    neuron_sums: Dict[int, torch.Tensor]
    head_means: Dict[int, torch.Tensor]  # per-parameter means: what is ranked
    neuron_means: Dict[int, torch.Tensor]
    c: np.ndarray  # best candidate found by the search (ones = local scores only)
    layout: Layout
    fingerprint: str
    blocks: List[dict]  # StructureMap.describe() of the model the scores belong to
    sparsities: Tuple[float, ...] = ()
    floors: Floors = field(default_factory=Floors)
    history: List[dict] = field(default_factory=list)  # per generation: best, mean, median fitness
    best_fitness: Optional[float] = None
    mean_fitness: Optional[float] = None  # fitness of the final search mean
    config: Dict[str, Any] = field(default_factory=dict)
    version: str = __version__

    # ------------------------------------------------------------------ ranking
    def scores(self) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        """The combined per-structure scores (local means rescaled by ``|c|``)."""
        return rescale(self.layout, self.c, self.head_means, self.neuron_means)

    def keep(self, smap: StructureMap, sparsity: Optional[float] = None, *, flops: Optional[float] = None) -> dict:
        """Keep-mask for one budget (see :func:`elastic_fx.budget_masks`)."""
        self.check(smap)
        hs, ns = self.scores()
        return budget_masks(smap, hs, ns, sparsity, flops=flops, floors=self.floors)

    def check(self, smap: StructureMap) -> None:
        """Raise ScoresError (naming the first differing block) if these scores belong to another model."""
        if smap.fingerprint() == self.fingerprint:
            return
        mine, theirs = self.blocks, smap.describe()
        if len(mine) != len(theirs):
            raise ScoresError(
                f"these scores are for a model with {len(mine)} blocks; this model has {len(theirs)}. "
                "Score this model with elastic-fx prune / efx.prune."
            )
        for a, b in zip(mine, theirs):
            for key in ("num_heads", "head_dim", "hidden_features", "mlp_prunable"):
                if a.get(key) != b.get(key):
                    raise ScoresError(
                        f"these scores do not fit this model: block {a['index']} has {key}={a.get(key)} in the "
                        f"score file but {b.get(key)} in the model. Score this model with elastic-fx prune."
                    )
        raise ScoresError("these scores were computed for a model whose parameters are named differently")

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename); returns the path."""
        from safetensors.torch import save_file

        tensors = {"c": torch.from_numpy(np.asarray(self.c, dtype=np.float64))}
        for name, d in (("head_sums", self.head_sums), ("neuron_sums", self.neuron_sums),
                        ("head_means", self.head_means), ("neuron_means", self.neuron_means)):
            for b, t in d.items():
                tensors[f"{name}.{b}"] = t.detach().to(torch.float64).cpu().clone()  # never share storage
        meta = {
            "format": FORMAT,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "blocks": self.blocks,
            "layout": {"ffn_blocks": list(self.layout.ffn_blocks), "head_blocks": [list(x) for x in self.layout.head_blocks]},
            "sparsities": list(self.sparsities),
            "floors": self.floors.__dict__,
            "history": self.history,
            "best_fitness": self.best_fitness,
            "mean_fitness": self.mean_fitness,
            "config": self.config,
        }
        return _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"elastic_fx": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike, smap: Optional[StructureMap] = None) -> "ElasticScores":
        """Read a ``.efx`` file; with ``smap``, also check it belongs to that model."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise ScoresError(f"score file {p} does not exist")
        try:
            with safe_open(str(p), framework="pt") as f:
                raw = (f.metadata() or {}).get("elastic_fx")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ScoresError(
                f"{p} is not an elastic_fx score file ({type(e).__name__}: {e}); produce one with "
                "elastic-fx prune, or convert the reference code's files with elastic-fx import-scores"
            ) from e
        if raw is None:
            raise ScoresError(f"{p} is a safetensors file without elastic_fx metadata; it is not a score file")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise ScoresError(f"{p} has format {meta.get('format')!r}; this elastic_fx reads {FORMAT!r}")

        def group(name):
            return {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith(name + ".")}

        lay = meta["layout"]
        out = cls(
            head_sums=group("head_sums"), neuron_sums=group("neuron_sums"),
            head_means=group("head_means"), neuron_means=group("neuron_means"),
            c=tensors["c"].numpy(),
            layout=Layout(tuple(lay["ffn_blocks"]), tuple(tuple(x) for x in lay["head_blocks"])),
            fingerprint=meta["fingerprint"], blocks=meta["blocks"], sparsities=tuple(meta["sparsities"]),
            floors=Floors(**meta["floors"]), history=meta["history"], best_fitness=meta["best_fitness"],
            mean_fitness=meta["mean_fitness"], config=meta["config"], version=meta["version"],
        )
        if smap is not None:
            out.check(smap)
        return out

    @classmethod
    def from_local(cls, local: Any, smap: StructureMap, floors: Floors = Floors()) -> "ElasticScores":
        """Scores without search (c = 1): the 'fisher-only' ranking of a LocalScores."""
        layout = Layout.of(smap)
        return cls(
            head_sums=dict(local.head_scores), neuron_sums=dict(local.neuron_scores),
            head_means=dict(local.head_means), neuron_means=dict(local.neuron_means),
            c=layout.ones(), layout=layout, fingerprint=smap.fingerprint(), blocks=smap.describe(),
            floors=floors, config={"method": getattr(local, "method", "unknown"), "search": "none"},
        )


def from_reference(ref: Any, smap: StructureMap) -> "ElasticScores":
    """ElasticScores from the reference implementation's published score file.

    Its ``head_scores [L, H]`` and ``mlp_scores [L, hidden]`` are already the final
    per-structure scores (local score x |c|), so they become the per-structure scores
    here with ``c = 1``. The reference ranks heads and neurons separately with two ratios;
    ``budget_masks(..., mlp_ratio=, head_ratio=)`` reproduces that, and ``sparsity=`` ranks
    both kinds together (see :func:`elastic_fx.interop.ratios_to_sparsity`).
    """
    from .interop import check_against

    check_against(ref, smap.describe())
    layout = Layout.of(smap)
    heads = {b.index: ref.head_scores[i].double() for i, b in enumerate(smap.blocks) if b.attention is not None}
    neurons = {b.index: ref.mlp_scores[i].double() for i, b in enumerate(smap.blocks) if b.mlp is not None and b.mlp.prunable}
    floors = Floors()
    if ref.floors:
        floors = Floors(head_fraction=float(ref.floors.get("heads", floors.head_fraction)),
                        neuron_fraction=float(ref.floors.get("neurons", floors.neuron_fraction)))
    return ElasticScores(
        head_sums=heads, neuron_sums=neurons, head_means=heads, neuron_means=neurons, c=layout.ones(),
        layout=layout, fingerprint=smap.fingerprint(), blocks=smap.describe(), floors=floors,
        config={"method": "reference-import", "source": ref.source, "model_type": ref.model_type},
    )


def _atomic_write(path: Path, write) -> Path:
    """Write via a temp file in the target directory, then rename; never leaves a partial file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScoresError(f"cannot create directory {parent}: {e}") from e
    if not os.access(parent, os.W_OK):
        raise ScoresError(f"cannot write to {parent}: permission denied; choose another output path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class ElasticModel:
    """A model plus its ElasticScores: physically sliced sub-networks at any budget."""

    def __init__(self, model_or_gm: nn.Module, scores: ElasticScores | str | os.PathLike, example_inputs=None) -> None:
        from .passes.discover import STRUCTURE_META, discover
        from .tracing import trace

        self.gm: fx.GraphModule = trace(model_or_gm, example_inputs)
        self.smap: StructureMap = self.gm.meta.get(STRUCTURE_META) or discover(self.gm)
        self.scores = scores if isinstance(scores, ElasticScores) else ElasticScores.load(scores)
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
        from .passes.slice import slice_graph

        keep = self.keep(sparsity, flops=flops)
        key = (_freeze(keep), bool(correct))
        if key not in self._cache:
            src = self.gm
            if correct:
                src = self._corrected(keep, calibration, correction)
            self._cache[key] = slice_graph(src, self.smap, keep)
        return self._cache[key]

    def _corrected(self, keep: dict, calibration: Any, correction: Any) -> fx.GraphModule:
        from .data import load_tensor
        from .errors import DataError
        from .passes.correct import CorrectionConfig, correct_structures
        from .tracing import PREPROCESS_META

        config = correction or CorrectionConfig()
        if calibration is None:
            raise DataError("weight correction needs calibration images: pass calibration=<folder or tensor>")
        pre = self.gm.meta.get(PREPROCESS_META)
        if not (isinstance(calibration, torch.Tensor) and calibration.is_floating_point()):
            if pre is None:
                raise DataError("the model carries no preprocessing config; pass calibration as a preprocessed tensor")
            calibration = load_tensor(calibration, pre, config.max_images)
        return correct_structures(self.gm, self.smap, keep, calibration, config=config)

    def export_onnx(self, out_dir: str | os.PathLike, sparsities: Sequence[float], *, source: str = "",
                    correct: bool = False, calibration: Any = None, correction: Any = None, **kw) -> dict:
        """One validated ONNX file per sparsity plus ``manifest.json``; returns the manifest.

        ``correct``/``calibration``/``correction`` as in :meth:`at`; other keywords go to
        :func:`elastic_fx.export_onnx` (``fp16``, ``opset`` ...).
        """
        from .budget import achieved
        from .exporters.onnx import export_onnx
        from .tracing import example_inputs_of

        out = Path(out_dir)
        x = example_inputs_of(self.gm)[0]
        entries = []
        for s in sparsities:
            keep = self.keep(s)
            small = self.at(s, correct=correct, calibration=calibration, correction=correction)
            stats = achieved(self.smap, keep)
            meta = {
                "sparsity": round(stats["sparsity"], 6), "target_sparsity": s, "parameters": stats["params"],
                "gflops": round(stats["gflops"], 4), "source_model": source,
                "kept_heads": {b: len(k.get("heads", [])) for b, k in keep.items()},
                "kept_neurons": {b: len(k.get("neurons", [])) for b, k in keep.items()},
                "weight_correction": bool(correct),
            }
            path = out / f"sparsity_{int(round(s * 100)):02d}.onnx"
            report = export_onnx(small, path, x, metadata=meta, **kw)
            entries.append({
                "file": path.name, "sparsity": meta["sparsity"], "target_sparsity": s,
                "params": stats["params"], "gflops": meta["gflops"], "ort_max_abs_diff": report.max_abs_diff,
            })
        manifest = {"elastic_fx_version": __version__, "source_model": source, "budgets": entries}
        _atomic_write(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
        return manifest


def _freeze(keep: dict) -> Tuple:
    return tuple(sorted((b, tuple(sorted((k, tuple(v)) for k, v in e.items()))) for b, e in keep.items()))
