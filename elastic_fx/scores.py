"""The score vocabulary every stage shares: local scores, the factor layout, elastic scores.

* :class:`LocalScores` -- one number per attention head and FFN neuron of one model (raw sums
  of the method's per-entry score; ``head_means`` / ``neuron_means`` divide by the
  parameters one structure owns). Written by the scoring stage, read by the search.
* :class:`Layout` and :func:`rescale` -- where each block's factor sits in a search
  candidate ``c`` (one factor per prunable FFN, one per head) and how ``c`` rescales the
  local per-parameter means (the paper's ``P = diag(H_local) * M c``).
* :class:`ElasticScores` -- a :class:`LocalScores` plus the searched ``c``, the ranking
  rule and the record of the search: ONE ranking for every budget. Written by the search,
  read by :class:`~elastic_fx.elastic.ElasticModel`.

One file format for both: a single safetensors file (tensors only; loading never unpickles
code) whose metadata entry ``"elastic_fx"`` holds one JSON document. Tensors are named
``head_scores.{block}`` / ``neuron_scores.{block}``; an elastic file adds ``c`` and its
JSON a ``"search"`` section. One identity check: :meth:`LocalScores.check` (an
ElasticScores checks through its local scores).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ._scorefile import SCORES_FORMAT, SCORES_VERSION, check_block, is_int, is_number, is_real, read, short, write
from .budget import RANKINGS, Floors, ScoreSums, budget_masks
from .errors import ElasticFxError, ScoresError
from .structures import StructureMap
from .version import __version__

log = logging.getLogger(__name__)

__all__ = ["SCORES_FORMAT", "ElasticScores", "Layout", "LocalScores", "new_scores", "rescale"]

#: Versions this elastic_fx reads (1: local scores only, before elastic files shared the format).
_READABLE_VERSIONS = (1, 2)




@dataclass
class LocalScores:
    """Per-block importance of every attention head and FFN neuron of one model.

    Attributes:
        head_scores: block index -> fp32 ``[num_heads]``: the SUM over the head's
            parameter entries of the method's per-entry score (Σ g² for ``"dino"``).
            Blocks without attention have no entry.
        neuron_scores: block index -> fp32 ``[hidden_features]`` (prunable FFNs only).
        method: ``"dino"``, ``"ce"``, ``"custom"`` (a ``loss_fn``), or a baseline name.
        loss: what was differentiated (``"dino"``, ``"cross-entropy"``, the ``loss_fn``'s
            name, or ``"none"``).
        mode: ``"per-batch"`` / ``"per-sample"`` (``"none"`` for data-free baselines).
        num_images: images the scores were computed on (0 for data-free baselines).
        fingerprint: :meth:`StructureMap.fingerprint` of the model.
        blocks: per-block layout (``StructureMap.describe()`` plus parameter counts and
            the names of the parameters each group owns), used by :meth:`check`.
        config: everything else worth keeping (batch size, seed, DINO settings, timing ...).
    """

    head_scores: Dict[int, torch.Tensor]
    neuron_scores: Dict[int, torch.Tensor]
    method: str
    loss: str
    mode: str
    num_images: int
    fingerprint: str
    blocks: List[dict]
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.normalized_scores:  # tag the sums, so budget_masks refuses to rank them by mistake
            self.head_scores = ScoreSums(self.head_scores)
            self.neuron_scores = ScoreSums(self.neuron_scores)

    def __repr__(self) -> str:
        return (f"LocalScores(method={self.method!r}, mode={self.mode!r}, images={self.num_images}, "
                f"blocks={len(self.blocks)}, model={self.fingerprint})")

    # ------------------------------------------------------------------ derived
    @property
    def normalized_scores(self) -> bool:
        """True when the scores are already per-parameter means (see :meth:`normalized`)."""
        return bool(self.config.get("normalized", False))

    def _means(self, sums: Dict[int, torch.Tensor], key: str) -> Dict[int, torch.Tensor]:
        """``sums`` divided by the parameters one structure owns (``key`` in the block description)."""
        if self.normalized_scores:
            return dict(sums)
        per = {int(b["index"]): int(b[key]) for b in self.blocks if b.get(key)}
        return {b: s / per[b] for b, s in sums.items()}

    @property
    def head_means(self) -> Dict[int, torch.Tensor]:
        """Per-head score divided by the number of parameters one head owns (the paper's average)."""
        return self._means(self.head_scores, "params_per_head")

    @property
    def neuron_means(self) -> Dict[int, torch.Tensor]:
        """Per-neuron score divided by the number of parameters one neuron owns."""
        return self._means(self.neuron_scores, "params_per_neuron")

    def normalized(self) -> "LocalScores":
        """A copy whose ``head_scores`` / ``neuron_scores`` are per-parameter means."""
        if self.normalized_scores:
            return self
        return LocalScores(
            head_scores=self.head_means, neuron_scores=self.neuron_means, method=self.method, loss=self.loss,
            mode=self.mode, num_images=self.num_images, fingerprint=self.fingerprint,
            blocks=[dict(b) for b in self.blocks], config={**self.config, "normalized": True},
        )

    def summary(self) -> str:
        """One line per block: heads and neurons with their min / median / max score."""
        rows = [f"LocalScores(method={self.method}, mode={self.mode}, images={self.num_images}, "
                f"model {self.fingerprint})"]
        for b in self.blocks:
            i = int(b["index"])
            parts = [f"block {i:>3}"]
            for name, d in (("heads", self.head_scores), ("neurons", self.neuron_scores)):
                if i in d:
                    s = d[i]
                    parts.append(f"{name} {s.numel():>5}: min {s.min():.3g} med {s.median():.3g} max {s.max():.3g}")
            rows.append("  ".join(parts))
        return "\n".join(rows)

    # ------------------------------------------------------------------ identity
    def check(self, smap: StructureMap, hint: str = "Recompute the scores for this model with "
              "efx.local_scores(model, images).") -> None:
        """Raise :class:`ScoresError` unless these scores belong to a model with ``smap``'s structure.

        The message names the first block and field that differ, then ``hint``.
        """
        if smap.fingerprint() == self.fingerprint:
            return
        mine = _blocks_description(smap)
        path = self.config.get("path")
        where = f"the scores in {path!r}" if path else "these scores"
        if len(mine) != len(self.blocks):
            raise ScoresError(
                f"{where} were computed for a model with {len(self.blocks)} blocks, but this model has "
                f"{len(mine)} blocks. {hint}"
            )
        for theirs, ours in zip(self.blocks, mine):
            for key in _CHECKED_FIELDS:
                if theirs.get(key) != ours.get(key):
                    raise ScoresError(
                        f"{where} were computed for a different model: block {ours['index']} has "
                        f"{key}={short(theirs.get(key))} in the scores but {key}={short(ours.get(key))} in this "
                        f"model. {hint}"
                    )
        raise ScoresError(
            f"{where} were computed for a model with structure fingerprint {self.fingerprint}, this model has "
            f"{smap.fingerprint()}. {hint}"
        )

    # ------------------------------------------------------------------ files
    def _parts(self) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        """(JSON metadata, tensors) of this object in the score-file format."""
        tensors = {f"head_scores.{b}": t.detach().to("cpu", torch.float32).contiguous()
                   for b, t in self.head_scores.items()}
        tensors.update({f"neuron_scores.{b}": t.detach().to("cpu", torch.float32).contiguous()
                        for b, t in self.neuron_scores.items()})
        config = {k: v for k, v in self.config.items() if k != "path"}
        meta = {
            "version": SCORES_VERSION, "method": self.method, "loss": self.loss, "mode": self.mode,
            "num_images": int(self.num_images), "fingerprint": self.fingerprint, "blocks": self.blocks,
            "config": config,
        }
        return meta, tensors

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one safetensors file: the score tensors plus a JSON description (atomically).

        Tensors are named ``head_scores.{b}`` / ``neuron_scores.{b}``; the metadata entry
        ``"elastic_fx"`` holds version, method, loss, mode, image count, fingerprint,
        per-block layout and config. Nothing in the file is executable.
        """
        meta, tensors = self._parts()
        path = write(path, meta, tensors)
        log.info("saved %s scores of %d blocks to %s", self.method, len(self.blocks), path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], smap: Optional[StructureMap] = None) -> "LocalScores":
        """Read a file written by :meth:`save` (or the local part of an elastic score file);
        with ``smap``, refuse scores of another model.

        Raises:
            ScoresError: the file is missing, not a safetensors file, has no elastic_fx
                metadata, is inconsistent, or (with ``smap``) belongs to a different model.
        """
        meta, tensors = read(path, "LocalScores.save()")
        scores = cls._from_parts(meta, tensors, str(path))
        if smap is not None:
            scores.check(smap)
        return scores

    @classmethod
    def _from_parts(cls, meta: Any, tensors: Mapping[str, torch.Tensor], where: str) -> "LocalScores":
        """Scores from a file's metadata and tensors; every inconsistency is a :class:`ScoresError`."""
        try:
            return cls._checked_parts(meta, tensors, where)
        except ScoresError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError) as e:
            raise ScoresError(f"{where!r}: the score description is malformed ({type(e).__name__}: {e}); "
                              "the file is corrupt, recompute it.") from None

    @classmethod
    def _checked_parts(cls, meta: Any, tensors: Mapping[str, torch.Tensor], where: str) -> "LocalScores":
        required = ("version", "method", "loss", "mode", "num_images", "fingerprint", "blocks")
        if not isinstance(meta, dict) or any(k not in meta for k in required):
            missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
            raise ScoresError(f"{where!r}: the elastic_fx metadata lacks {missing}; the file is corrupt.")
        version = meta["version"]
        if not is_int(version):
            raise ScoresError(f"{where!r}: the score format version {version!r} is not a whole number; "
                              "the file is corrupt.")
        if version > SCORES_VERSION:
            raise ScoresError(
                f"{where!r} was written by a newer elastic_fx (score format {meta['version']}, this version "
                f"reads up to {SCORES_VERSION}); upgrade elastic_fx."
            )
        if version not in _READABLE_VERSIONS:
            raise ScoresError(f"{where!r}: score format {version} is not one this elastic_fx reads "
                              f"({list(_READABLE_VERSIONS)}); the file is corrupt.")
        for key in ("method", "loss", "mode", "fingerprint"):
            if not isinstance(meta[key], str):
                raise ScoresError(f"{where!r}: field {key!r} is {short(meta[key])}, not a string; the file is corrupt.")
        if not is_int(meta["num_images"]) or meta["num_images"] < 0:
            raise ScoresError(f"{where!r}: num_images is {short(meta['num_images'])}, not a count; "
                              "the file is corrupt.")
        if not isinstance(meta.get("config", {}), (dict, type(None))):
            raise ScoresError(f"{where!r}: config is a {type(meta['config']).__name__}, not an object; "
                              "the file is corrupt.")
        blocks = meta["blocks"]
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
            raise ScoresError(f"{where!r}: the per-block description is not a list of blocks; the file is corrupt.")
        seen = set()
        for b in blocks:
            check_block(b, where)
            if b["index"] in seen:
                raise ScoresError(f"{where!r}: block {b['index']} is described twice; the file is corrupt.")
            seen.add(b["index"])
        heads, neurons, expected = {}, {}, set()
        for b in blocks:
            i = b["index"]
            for kind, size_key, store in (("head_scores", "num_heads", heads),
                                          ("neuron_scores", "hidden_features", neurons)):
                wanted = b.get(size_key) if (kind == "head_scores" or b.get("mlp_prunable")) else None
                name = f"{kind}.{i}"
                if wanted is None:
                    continue
                expected.add(name)
                t = tensors.get(name)
                if t is None or tuple(t.shape) != (wanted,) or not t.is_floating_point():
                    got = ("missing" if t is None else f"of shape {tuple(t.shape)}" if tuple(t.shape) != (wanted,)
                           else f"of type {t.dtype}")
                    raise ScoresError(f"{where!r}: tensor {name} is {got}, expected float [{wanted}]; "
                                      "the file is corrupt.")
                if not bool(torch.isfinite(t).all()):
                    raise ScoresError(f"{where!r}: tensor {name} holds NaN or inf; the file is corrupt, recompute it.")
                store[i] = t.to(torch.float32)
        stray = sorted(set(tensors) - expected - {"c"})
        if stray:
            raise ScoresError(f"{where!r}: tensors {stray[:3]} belong to no described block; the file is corrupt.")
        config = dict(meta.get("config") or {})
        config["path"] = where
        return cls(heads, neurons, meta["method"], meta["loss"], meta["mode"], meta["num_images"],
                   meta["fingerprint"], list(blocks), config)


_CHECKED_FIELDS = ("num_heads", "head_dim", "hidden_features", "mlp_prunable", "head_params", "neuron_params")




def _blocks_description(smap: StructureMap) -> List[dict]:
    """``smap.describe()`` plus parameter counts and the names of each group's parameters."""
    out = []
    for d, b in zip(smap.describe(), smap.blocks):
        a, m = b.attention, b.mlp
        d = dict(d)
        d["params_per_head"] = a.params_per_head if a is not None else None
        d["params_per_neuron"] = m.params_per_neuron if m is not None else None
        d["head_params"] = sorted(s.name for s in a.slices) if a is not None else None
        d["neuron_params"] = sorted(s.name for s in m.slices) if m is not None else None
        out.append(d)
    return out


def new_scores(smap: StructureMap, heads: Mapping[int, torch.Tensor], neurons: Mapping[int, torch.Tensor], *,
               method: str, loss: str, mode: str, num_images: int, config: Optional[dict] = None) -> LocalScores:
    """Assemble a :class:`LocalScores` for ``smap`` (used by the gradient pass and the baselines)."""
    return LocalScores(
        head_scores={b: t.detach().to("cpu", torch.float32) for b, t in heads.items()},
        neuron_scores={b: t.detach().to("cpu", torch.float32) for b, t in neurons.items()},
        method=method, loss=loss, mode=mode, num_images=int(num_images), fingerprint=smap.fingerprint(),
        blocks=_blocks_description(smap), config=dict(config or {}),
    )



# ============================================================================ the factor layout
@dataclass(frozen=True)
class Layout:
    """Where each block's factor sits in a search candidate ``c``.

    ``c`` has length ``dim = FFN blocks + total heads``, laid out as
    ``[ffn factor of each block with a prunable FFN ..., head factors block by block ...]``.
    """

    ffn_blocks: Tuple[int, ...]  # block indices with a prunable FFN, in order
    head_blocks: Tuple[Tuple[int, int], ...]  # (block index, number of heads), in order

    @classmethod
    def of(cls, smap: StructureMap) -> "Layout":
        return cls(
            ffn_blocks=tuple(b.index for b in smap.blocks if b.mlp is not None and b.mlp.prunable),
            head_blocks=tuple((b.index, b.attention.num_heads) for b in smap.blocks if b.attention is not None),
        )

    @property
    def dim(self) -> int:
        return len(self.ffn_blocks) + sum(h for _, h in self.head_blocks)

    @property
    def is_head(self) -> np.ndarray:
        """bool ``[dim]``: which factors belong to heads (the rest to FFNs)."""
        return np.arange(self.dim) >= len(self.ffn_blocks)

    def split(self, c: np.ndarray) -> Tuple[Dict[int, float], Dict[int, np.ndarray]]:
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (self.dim,):
            raise ScoresError(f"candidate has shape {c.shape}, the layout needs ({self.dim},)")
        ffn = {b: float(c[i]) for i, b in enumerate(self.ffn_blocks)}
        heads, pos = {}, len(self.ffn_blocks)
        for b, h in self.head_blocks:
            heads[b] = c[pos : pos + h]
            pos += h
        return ffn, heads

    def ones(self) -> np.ndarray:
        return np.ones(self.dim)

    def to_json(self) -> Dict[str, Any]:
        return {"ffn_blocks": list(self.ffn_blocks), "head_blocks": [list(x) for x in self.head_blocks]}


def rescale(
    layout: Layout,
    c: np.ndarray,
    head_means: Mapping[int, torch.Tensor],
    neuron_means: Mapping[int, torch.Tensor],
) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """Per-structure scores for candidate ``c`` (the paper's ``P = diag(H_local) * M |c|``).

    Every neuron of block ``b`` is scored ``neuron_mean * |c_ffn[b]|`` and head ``h`` of
    block ``b`` ``head_mean * |c_head[b, h]|``. The searched factors are positive
    (``c = exp(z)``); ``abs`` keeps candidates of the linear search space (which may step
    through zero, as in the reference implementation) defined.
    """
    ffn, heads = layout.split(c)
    hs = {b: head_means[b].double() * torch.from_numpy(np.abs(heads[b])) for b in heads}
    ns = {b: neuron_means[b].double() * abs(ffn[b]) if b in ffn else neuron_means[b].double() for b in neuron_means}
    return hs, ns


# ============================================================================ ElasticScores
@dataclass
class ElasticScores:
    """Local scores + the searched reweighting + the ranking rule: one ranking for every budget.

    Attributes:
        local: the :class:`LocalScores` the search started from.
        c: the factor vector (``Layout`` order); ones = the local scores alone.
        layout: where each factor sits.
        sparsities: the search sparsities.
        floors: the per-block floors every budget respects.
        ranking / head_offset: how heads and neurons are ranked against each other
            (:func:`elastic_fx.budget_masks`).
        history: one record per xNES generation (best / mean / median fitness, seconds ...).
        best_fitness: search fitness of the returned ``c``; mean_fitness: of the final mean.
        selection: how ``c`` was chosen: search and selection fitness of ``c = 1`` and of the
            winner, which one was returned and why (empty for scores without search).
        preprocess: the preprocessing used at prune time (input size, mean, std,
            interpolation, crop), so the scores can be applied to the bare model later.
        config: everything else worth keeping (search settings, timings).
    """

    local: LocalScores
    c: np.ndarray
    layout: Layout
    sparsities: Tuple[float, ...] = ()
    floors: Floors = field(default_factory=Floors)
    ranking: str = "global"
    head_offset: float = 0.15
    history: List[dict] = field(default_factory=list)
    best_fitness: Optional[float] = None
    mean_fitness: Optional[float] = None
    selection: Dict[str, Any] = field(default_factory=dict)
    preprocess: Optional[Dict[str, Any]] = None
    config: Dict[str, Any] = field(default_factory=dict)
    version: str = __version__

    # ------------------------------------------------------------------ views
    @property
    def fingerprint(self) -> str:
        return self.local.fingerprint

    @property
    def blocks(self) -> List[dict]:
        return self.local.blocks

    @property
    def head_sums(self) -> Dict[int, torch.Tensor]:
        """Raw local sums per head (the local scores' ``head_scores``)."""
        return self.local.head_scores

    @property
    def neuron_sums(self) -> Dict[int, torch.Tensor]:
        return self.local.neuron_scores

    @property
    def head_means(self) -> Dict[int, torch.Tensor]:
        """Per-parameter local means per head, float64: what ``c`` rescales."""
        return {b: t.double() for b, t in self.local.head_means.items()}

    @property
    def neuron_means(self) -> Dict[int, torch.Tensor]:
        return {b: t.double() for b, t in self.local.neuron_means.items()}

    # ------------------------------------------------------------------ ranking
    def scores(self) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        """The combined per-structure scores (local means rescaled by ``|c|``)."""
        return rescale(self.layout, self.c, self.head_means, self.neuron_means)

    def keep(self, smap: StructureMap, sparsity: Optional[float] = None, *, flops: Optional[float] = None) -> dict:
        """Keep-mask for one budget (see :func:`elastic_fx.budget_masks`)."""
        self.check(smap)
        hs, ns = self.scores()
        return budget_masks(smap, hs, ns, sparsity, flops=flops, floors=self.floors, ranking=self.ranking,
                            head_offset=self.head_offset)

    def check(self, smap: StructureMap) -> None:
        """Raise ScoresError (naming the first differing block) if these scores belong to another model."""
        self.local.check(smap, hint="Score this model with elastic-fx prune (efx.prune).")

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write atomically (one safetensors file, see the module docstring); returns the path."""
        meta, tensors = self.local._parts()
        tensors["c"] = torch.from_numpy(np.asarray(self.c, dtype=np.float64).copy())
        meta["search"] = {
            "elastic_fx_version": self.version,
            "layout": self.layout.to_json(),
            "sparsities": [float(s) for s in self.sparsities],
            "floors": dict(self.floors.__dict__),
            "ranking": self.ranking,
            "head_offset": float(self.head_offset),
            "history": self.history,
            "best_fitness": self.best_fitness,
            "mean_fitness": self.mean_fitness,
            "selection": self.selection,
            "preprocess": self.preprocess,
            "config": self.config,
        }
        return write(path, meta, tensors)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], smap: Optional[StructureMap] = None) -> "ElasticScores":
        """Read an elastic score file; with ``smap``, also check it belongs to that model.

        Every inconsistency (missing or mis-sized tensors, a layout that does not match the
        blocks or ``c``, malformed fields) raises :class:`ScoresError`.
        """
        where = str(path)
        meta, tensors = read(path, "elastic-fx prune / ElasticScores.save()")
        search = meta.get("search")
        if not isinstance(search, dict):
            raise ScoresError(
                f"{where!r} holds local scores without a search result; run elastic-fx prune on it, or use "
                "ElasticScores.from_local(LocalScores.load(path), smap) for the ranking without search."
            )
        local = LocalScores._from_parts(meta, tensors, where)
        try:
            out = cls._from_search(local, search, tensors, where)
        except ScoresError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            raise ScoresError(f"{where!r}: the search section is malformed ({type(e).__name__}: {e}); "
                              "the file is corrupt. Re-run elastic-fx prune.") from None
        out._validate(where)
        if smap is not None:
            out.check(smap)
        return out

    @classmethod
    def _from_search(cls, local: LocalScores, search: dict, tensors: Mapping[str, torch.Tensor],
                     where: str) -> "ElasticScores":
        """The search section, every field type-checked (a report must never trip over one)."""
        def bad(key: str, want: str) -> ScoresError:
            return ScoresError(f"{where!r}: search.{key} is {short(search.get(key))}, expected {want}; "
                               "the file is corrupt. Re-run elastic-fx prune.")

        lay = search.get("layout")
        if not (isinstance(lay, dict) and isinstance(lay.get("ffn_blocks"), list)
                and isinstance(lay.get("head_blocks"), list)
                and all(is_int(b) for b in lay["ffn_blocks"])
                and all(isinstance(x, list) and len(x) == 2 and all(is_int(v) for v in x)
                        for x in lay["head_blocks"])):
            raise bad("layout", "{ffn_blocks: [block, ...], head_blocks: [[block, heads], ...]}")
        layout = Layout(tuple(lay["ffn_blocks"]), tuple((b, h) for b, h in lay["head_blocks"]))
        sparsities = search.get("sparsities") or []
        if not isinstance(sparsities, list) or not all(is_number(v) and 0 <= v < 1 for v in sparsities):
            raise bad("sparsities", "a list of sparsities in [0, 1)")
        floors = search.get("floors") or {}
        if not isinstance(floors, dict) or not all(is_number(v) for v in floors.values()):
            raise bad("floors", "an object of numbers")
        try:
            floors = Floors(**floors)
        except TypeError:
            raise bad("floors", f"the keys of {sorted(Floors().__dict__)}") from None
        except ElasticFxError as e:
            raise ScoresError(f"{where!r}: search.floors is invalid ({e}); the file is corrupt.") from None
        ranking, head_offset = search.get("ranking", "global"), search.get("head_offset", 0.15)
        if not isinstance(ranking, str):
            raise bad("ranking", f"one of {RANKINGS}")
        if not is_number(head_offset):
            raise bad("head_offset", "a finite number")
        history = search.get("history") or []
        needed = ("generation", "best", "mean", "best_so_far")
        if not isinstance(history, list) or not all(
                isinstance(h, dict) and all(is_real(h.get(k)) for k in needed) for h in history):
            raise bad("history", f"a list of generation records with numbers {list(needed)}")
        for key in ("best_fitness", "mean_fitness"):
            if search.get(key) is not None and not is_real(search[key]):
                raise bad(key, "a finite number or null")
        selection = search.get("selection") or {}
        if not isinstance(selection, dict) or any(
                not isinstance(selection.get(k, {}), dict) for k in ("c1", "winner")) or any(
                not isinstance(selection.get(k, ""), str) for k in ("summary", "chosen")):
            raise bad("selection", "an object with c1 / winner objects and summary / chosen text")
        for key in ("c1", "winner"):
            part = selection.get(key, {})
            if any(part.get(k) is not None and not is_real(part[k]) for k in ("search", "selection")):
                raise bad("selection", f"numbers for {key}.search / {key}.selection")
            if not isinstance(part.get("name", ""), str):
                raise bad("selection", f"text for {key}.name")
        preprocess = search.get("preprocess")
        if preprocess is not None:
            if not isinstance(preprocess, dict):
                raise bad("preprocess", "an object (input_size, mean, std, interpolation, crop_pct) or null")
            from .data import PreprocessConfig

            try:
                preprocess = PreprocessConfig.from_dict(preprocess).to_dict()
            except (ElasticFxError, TypeError, ValueError) as e:
                raise ScoresError(f"{where!r}: search.preprocess is invalid ({e}); the file is corrupt.") from None
        config = search.get("config") or {}
        if not isinstance(config, dict):
            raise bad("config", "an object")
        version = search.get("elastic_fx_version", "")
        if not isinstance(version, str):
            raise bad("elastic_fx_version", "text")
        c = tensors.get("c")
        if c is not None and not c.is_floating_point():
            raise ScoresError(f"{where!r}: the factor vector c is of type {c.dtype}, not float; the file is corrupt.")
        return cls(
            local=local, c=c.to(torch.float64).numpy() if c is not None else None, layout=layout,
            sparsities=tuple(float(s) for s in sparsities), floors=floors, ranking=ranking,
            head_offset=float(head_offset), history=list(history), best_fitness=search.get("best_fitness"),
            mean_fitness=search.get("mean_fitness"), selection=dict(selection), preprocess=preprocess,
            config=dict(config), version=version,
        )

    def _validate(self, where: str) -> None:
        """Layout, ``c`` and the local scores agree with each other."""
        if self.c is None or np.asarray(self.c).shape != (self.layout.dim,):
            got = "missing" if self.c is None else f"of shape {tuple(np.asarray(self.c).shape)}"
            raise ScoresError(f"{where!r}: the factor vector c is {got}, the layout needs ({self.layout.dim},); "
                              "the file is corrupt.")
        if not np.isfinite(np.asarray(self.c)).all():
            raise ScoresError(f"{where!r}: the factor vector c holds NaN or inf; the file is corrupt.")
        heads = {b: int(t.numel()) for b, t in self.local.head_scores.items()}
        if dict(self.layout.head_blocks) != heads or set(self.layout.ffn_blocks) != set(self.local.neuron_scores):
            raise ScoresError(f"{where!r}: the layout does not match the scored heads and neurons; the file is corrupt.")
        if self.ranking not in RANKINGS:
            raise ScoresError(f"{where!r}: unknown ranking {self.ranking!r} (expected one of {RANKINGS}).")
        for d in (self.local.head_scores, self.local.neuron_scores):
            for b, t in d.items():
                if not torch.isfinite(t).all():
                    raise ScoresError(f"{where!r}: the scores of block {b} hold NaN or inf; the file is corrupt.")

    @classmethod
    def from_local(cls, local: LocalScores, smap: StructureMap, floors: Floors = Floors(), *,
                   ranking: str = "global", head_offset: float = 0.15) -> "ElasticScores":
        """Scores without search (c = 1): the 'fisher-only' ranking of a LocalScores."""
        layout = Layout.of(smap)
        return cls(local=local, c=layout.ones(), layout=layout, floors=floors, ranking=ranking,
                   head_offset=head_offset, config={"method": local.method, "search": "none"})
