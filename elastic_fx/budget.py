"""Budgets -> keep-masks: which heads and FFN neurons stay for a sparsity or FLOPs target.

Takes a :class:`~elastic_fx.structures.StructureMap` and one score per prunable structure
(``head_scores`` / ``neuron_scores``: ``{block index: 1-D tensor}``, larger = more important)
and returns a keep dict for :func:`elastic_fx.slice`::

    keep = efx.budget_masks(smap, scores, sparsity=0.4)       # a LocalScores or ElasticScores
    keep = efx.budget_masks(smap, head_means, neuron_means, sparsity=0.4)   # or two score dicts
    small = efx.slice(gm, smap, keep)

Given a :class:`~elastic_fx.scores.LocalScores` the walk uses its per-parameter means; given an
:class:`~elastic_fx.scores.ElasticScores`, its searched ranking (means rescaled by ``c``) with
its own floors and ranking rule. A LocalScores' raw ``head_scores`` / ``neuron_scores`` are
per-structure SUMS (tagged :class:`ScoreSums`) and are refused unless ``sums=True`` says so.

What the scores must be
-----------------------
One global ranking compares heads with neurons, so the scores must already be on one scale.
The paper (App. B.3) gives each head and each neuron the *average* of its parameters'
prunability scores; a head owns about 100x more parameters than a neuron, so per-structure
*sums* would make every head look more important than every neuron. The caller normalises
(the local scorer provides per-parameter means); this module only compares numbers.
Scores may be ``+inf`` (never removed before a finite score) or ``-inf``; NaN is refused.

How a budget becomes a mask (the sparsity walk)
-----------------------------------------------
``sparsity`` is the fraction of ``smap.prunable_params`` (all parameters owned by prunable
heads and neurons, the paper's "sparsity S") that is removed. The paper ranks parameters
globally (Eq. 9); elastic_fx ranks *structures*, and weighs each by the parameters it owns:

1. :func:`structure_order` sorts every prunable structure, least important first, by
   ``(score, block, kind, index)``: equal scores go to the earlier block first, a block's
   heads before its neurons (``"heads" < "neurons"``), then the lower index first.
2. Walk that order and remove structures one by one, adding each one's parameter count
   (``params_per_head`` / ``params_per_neuron``). A structure whose removal would take its
   block below the floor (see :class:`Floors`) is skipped: it stays, and the walk continues.
3. Stop at the first point where the removed parameters reach ``sparsity * prunable_params``.
   The achieved sparsity is thus the smallest one the structure granularity allows at or
   above the target; it overshoots by less than one structure's parameters.

Which structures the walk removes never depends on the target (a block that reaches its floor
stays there), so each budget removes a *prefix* of one fixed sequence and the masks are
nested: what is kept at sparsity 0.5 is a subset of what is kept at 0.3.
:func:`nested_masks` cuts one walk at several budgets.

Rankings
--------
``ranking="global"`` (the default, paper Eq. 9) is the walk above: heads and neurons compete
in one order. ``ranking="separate"`` ranks each kind on its own, as the reference code does:
the walk is re-interleaved so that every budget removes about a fraction ``r`` of the neuron
parameters and ``max(0, r - head_offset)`` of the head parameters (``head_offset`` 0.15
reproduces the reference's evaluation pairs); within a kind the order of the scores is kept.
Both are fixed orders, so budgets stay nested.

The other budgets
-----------------
* ``flops=f``, ``f`` in (0, 1]: keep at most ``f`` of the dense model's theoretical FLOPs
  (``smap.flops()``, paper Table 7). Same order and walk; it stops at the first point where
  the kept FLOPs are ``<= f * dense``. FLOPs outside the blocks (patch embedding, classifier)
  cannot be removed, so small ``f`` may be unreachable.
* ``mlp_ratio=r_n, head_ratio=r_h`` (the reference code's pair): neurons and heads are ranked
  *separately* across all blocks (same order, restricted to one kind), and the lowest
  ``ceil(r * total)`` of each kind are removed, skipping those below a block's floor. A
  missing half of the pair means 0. The reference prunes every structure tied at its
  threshold and, for a ratio at or above ``1 - floor``, empties every block; here ties are
  resolved by the order above and floors always hold. Converting a pair to one sparsity
  number (without building masks) is :func:`elastic_fx.interop.ratios_to_sparsity`.

A budget the floors cannot reach raises :class:`~elastic_fx.errors.BudgetError` naming the
most that can be reached; :func:`max_sparsity` gives it up front.

Output
------
``{block: {"heads": [...], "neurons": [...]}}`` with every block of the map present, sorted
kept indices, a ``"heads"`` key for every block with attention and a ``"neurons"`` key for
every prunable FFN. A non-prunable FFN is not named (``slice()`` keeps it whole) and never
counts toward the budget. Blocks are keyed by ``Block.index``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import BudgetError, NumericalError, ScoresError
from .keep import KeepMask
from .structures import AttentionGroup, StructureMap

logger = logging.getLogger(__name__)

HEADS = "heads"
NEURONS = "neurons"
_KINDS: Tuple[str, str] = (HEADS, NEURONS)  # code 0, 1; also the tie-break order

#: Relative slack when comparing a float budget with integer counts, so that a target that
#: lands exactly on a structure boundary (0.3 * P computed as 0.30000000000000004 * P) does
#: not remove one structure too many.
_REL_TOL = 1e-9

KeepDict = KeepMask  # the keep vocabulary of elastic_fx.keep, under this module's old name
Scores = Mapping[int, Any]


class ScoreSums(dict):
    """``{block: tensor}`` of per-structure SUMS of per-entry scores (what
    :attr:`LocalScores.head_scores <elastic_fx.scores.LocalScores>` holds). A head owns about
    100x the parameters of a neuron, so ranking sums makes every head outrank every neuron:
    :func:`budget_masks` refuses these unless called with ``sums=True``."""


def _resolve_scores(head_scores: Any, neuron_scores: Any, sparsity: Optional[float], sums: bool,
                    explicit: dict) -> Tuple[Scores, Scores, Optional[float], dict]:
    """(head scores, neuron scores, sparsity, settings) from either calling form of budget_masks."""
    obj = head_scores
    if hasattr(obj, "head_means") and hasattr(obj, "neuron_means"):  # LocalScores / ElasticScores
        if isinstance(neuron_scores, (int, float)) and not isinstance(neuron_scores, bool) and sparsity is None:
            sparsity, neuron_scores = float(neuron_scores), None  # budget_masks(smap, scores, 0.4)
        if neuron_scores is not None:
            raise BudgetError("pass either a LocalScores / ElasticScores, or two dicts of scores, not both: "
                              "efx.budget_masks(smap, scores, sparsity=0.4)")
        if callable(getattr(obj, "scores", None)) and hasattr(obj, "layout"):  # ElasticScores: its ranking
            hs, ns = obj.scores()
            own = {"floors": obj.floors, "ranking": obj.ranking, "head_offset": obj.head_offset}
            return hs, ns, sparsity, {**own, **{k: v for k, v in explicit.items() if v is not None}}
        return obj.head_means, obj.neuron_means, sparsity, explicit
    if neuron_scores is None:
        raise BudgetError("budget_masks needs scores: a LocalScores or ElasticScores (efx.budget_masks(smap, "
                          "scores, sparsity=0.4)), or two dicts {block: tensor} of per-parameter mean scores")
    if not sums and (isinstance(head_scores, ScoreSums) or isinstance(neuron_scores, ScoreSums)):
        raise BudgetError(
            "these are per-structure SUMS (LocalScores.head_scores / neuron_scores); a head owns ~100x the "
            "parameters of a neuron, so ranking sums makes every head outrank every neuron. Pass the scores "
            "themselves, efx.budget_masks(smap, scores, sparsity=...), which ranks per-parameter means (or pass "
            "scores.head_means, scores.neuron_means); pass sums=True only to rank by sums on purpose")
    return head_scores, neuron_scores, sparsity, explicit

#: How heads and neurons are ranked against each other (see "Rankings" in the module docstring).
RANKINGS = ("global", "separate")
#: ``ranking="separate"``: the fraction of head parameters removed trails the fraction of
#: neuron parameters removed by this much (the reference code's evaluation pairs
#: (mlp_ratio, head_ratio) = (0.15, 0), (0.25, 0.1) ... (0.65, 0.5)).
DEFAULT_HEAD_OFFSET = 0.15


# ----------------------------------------------------------------------------- floors
@dataclass(frozen=True)
class Floors:
    """How much of every block survives any budget.

    A block keeps at least ``max(min_heads, ceil(head_fraction * num_heads))`` heads and
    ``max(min_neurons, ceil(neuron_fraction * hidden_features))`` neurons (never more than it
    has). The defaults are the paper's: 20 % of heads and 5 % of neurons, at least one each.
    """

    head_fraction: float = 0.2
    neuron_fraction: float = 0.05
    min_heads: int = 1
    min_neurons: int = 1

    def __post_init__(self) -> None:
        for name in ("head_fraction", "neuron_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise BudgetError(f"Floors.{name} must be a fraction in [0, 1], got {v!r}")
        for name in ("min_heads", "min_neurons"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BudgetError(
                    f"Floors.{name} must be an integer >= 1, got {v!r}; "
                    "a block without heads or neurons cannot be sliced"
                )

    def min_kept(self, size: int, kind: str) -> int:
        """Fewest structures of ``kind`` (``"heads"`` | ``"neurons"``) a group of ``size`` keeps."""
        if kind == HEADS:
            fraction, minimum = self.head_fraction, self.min_heads
        elif kind == NEURONS:
            fraction, minimum = self.neuron_fraction, self.min_neurons
        else:
            raise BudgetError(f"unknown structure kind {kind!r}; use 'heads' or 'neurons'")
        # 0.2 * 15 is 3.0000000000000004 in floats: shave the rounding error before ceil.
        by_fraction = math.ceil(fraction * size - _REL_TOL)
        return min(size, max(minimum, by_fraction))

    def describe(self) -> str:
        return (
            f"keep >= {self.head_fraction:.0%} of heads (at least {self.min_heads}) and "
            f">= {self.neuron_fraction:.0%} of neurons (at least {self.min_neurons}) per block"
        )


# ----------------------------------------------------------------------------- the table
@dataclass
class _Table:
    """Every prunable structure as flat arrays; group ``g`` occupies ``starts[g]:starts[g+1]``."""

    groups: List[Tuple[int, str, int]]  # (block, kind, size)
    starts: np.ndarray  # int64 [G + 1]
    block: np.ndarray  # int64 [S]
    kind: np.ndarray  # int64 [S], index into _KINDS
    index: np.ndarray  # int64 [S], index within the group
    group: np.ndarray  # int64 [S]
    score: np.ndarray  # float64 [S]
    params: np.ndarray  # int64 [S]
    flops: np.ndarray  # int64 [S]


def _prunable_groups(smap: StructureMap) -> List[Tuple[int, str, Any]]:
    return [(b.index, kind, g) for b in smap.blocks for kind, g in b.groups()]


def _as_vector(value: Any, block: int, kind: str, size: int, arg: str) -> np.ndarray:
    what = "attention head" if kind == HEADS else "FFN hidden neuron"
    try:
        t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ScoresError(f"{arg}[{block}] is not a tensor of numbers ({type(value).__name__}): {e}") from e
    if t.is_complex() or t.dtype == torch.bool:
        raise ScoresError(f"{arg}[{block}] has dtype {t.dtype}; expected real-valued scores")
    if t.numel() != size or t.dim() > 1:
        raise ScoresError(
            f"{arg}[{block}] has shape {tuple(t.shape)}; block {block} has {size} {what}s, "
            f"so expected a 1-D tensor of {size} scores (one per {what})"
        )
    v = t.reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    if np.isnan(v).any():
        bad = np.flatnonzero(np.isnan(v))[:8].tolist()
        raise NumericalError(
            f"{arg}[{block}] contains NaN at {what} indices {bad}; recompute the scores "
            "(NaN usually means the gradients overflowed: try float32 or a smaller learning signal)"
        )
    return v


def _check_score_keys(smap: StructureMap, scores: Scores, kind: str, arg: str) -> None:
    if not isinstance(scores, Mapping):
        raise ScoresError(
            f"{arg} must be a dict {{block index: 1-D tensor}}, got {type(scores).__name__}"
        )
    blocks = {b.index: b for b in smap.blocks}
    for key in scores:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or int(key) not in blocks:
            raise ScoresError(
                f"{arg} names block {key!r}, which this model does not have; its blocks are {sorted(blocks)}"
            )
        if kind == HEADS and blocks[int(key)].attention is None:
            raise ScoresError(f"{arg} names block {key}, which has no attention (no heads to score)")
        if kind == NEURONS and blocks[int(key)].mlp is None:
            raise ScoresError(f"{arg} names block {key}, which has no FFN (no neurons to score)")


def _table(smap: StructureMap, head_scores: Scores, neuron_scores: Scores) -> _Table:
    """Validate the scores against the map and flatten everything into arrays."""
    _check_score_keys(smap, head_scores, HEADS, "head_scores")
    _check_score_keys(smap, neuron_scores, NEURONS, "neuron_scores")
    groups, cols = [], {k: [] for k in ("block", "kind", "index", "group", "score", "params", "flops")}
    starts = [0]
    for gid, (bi, kind, g) in enumerate(_prunable_groups(smap)):
        arg, scores = ("head_scores", head_scores) if kind == HEADS else ("neuron_scores", neuron_scores)
        value = scores.get(bi)  # numpy-integer keys hash and compare like ints
        if value is None:
            what = "attention heads" if kind == HEADS else "FFN hidden neurons"
            raise ScoresError(
                f"{arg} has no entry for block {bi}; expected a 1-D tensor of {g.size} scores "
                f"(block {bi} has {g.size} {what})"
            )
        n = g.size
        per_params = g.params_per_head if isinstance(g, AttentionGroup) else g.params_per_neuron
        per_flops = g.flops_per_head if isinstance(g, AttentionGroup) else g.flops_per_neuron
        groups.append((bi, kind, n))
        starts.append(starts[-1] + n)
        cols["block"].append(np.full(n, bi, dtype=np.int64))
        cols["kind"].append(np.full(n, _KINDS.index(kind), dtype=np.int64))
        cols["index"].append(np.arange(n, dtype=np.int64))
        cols["group"].append(np.full(n, gid, dtype=np.int64))
        cols["score"].append(_as_vector(value, bi, kind, n, arg))
        cols["params"].append(np.full(n, per_params, dtype=np.int64))
        cols["flops"].append(np.full(n, per_flops, dtype=np.int64))
    arrays = {
        k: (np.concatenate(v) if v else np.zeros(0, dtype=np.float64 if k == "score" else np.int64))
        for k, v in cols.items()
    }
    return _Table(groups=groups, starts=np.asarray(starts, dtype=np.int64), **arrays)


def _order(t: _Table) -> np.ndarray:
    """Positions in the table, least important first: by score, block, kind, index."""
    return np.lexsort((t.index, t.kind, t.block, t.score))  # last key is the primary one


def _walk(smap: StructureMap, head_scores: Scores, neuron_scores: Scores, floors: Floors,
          ranking: str = "global", head_offset: float = DEFAULT_HEAD_OFFSET) -> Tuple[_Table, np.ndarray]:
    """The validated table and its removal sequence (structure positions, in walk order)."""
    if not isinstance(floors, Floors):
        raise BudgetError(f"floors must be an elastic_fx.budget.Floors, got {type(floors).__name__}")
    if ranking not in RANKINGS:
        raise BudgetError(f"ranking={ranking!r} is not one of {RANKINGS}: 'global' ranks heads and neurons "
                          "together (paper Eq. 9), 'separate' ranks each kind on its own")
    t = _table(smap, head_scores, neuron_scores)
    seq = _removal_sequence(t, _order(t), floors)
    if ranking == "separate":
        seq = _separate_sequence(t, seq, head_offset)
    return t, seq


def _separate_sequence(t: _Table, seq: np.ndarray, head_offset: float) -> np.ndarray:
    """Re-interleave a removal sequence so each kind is ranked on its own.

    Within a kind the order of ``seq`` is kept. A structure's *progress* is the fraction of
    its kind's prunable parameters removed before it; a head's progress is shifted by
    ``head_offset``. Merging both kinds by progress means that every prefix (so every
    budget) removes about ``r`` of the neuron parameters and ``max(0, r - head_offset)`` of
    the head parameters -- the reference code's (mlp_ratio, head_ratio) pairs -- whatever
    the scores of one kind are relative to the other.
    """
    off = float(head_offset)
    if not (math.isfinite(off) and 0.0 <= off < 1.0):
        raise BudgetError(f"head_offset must be a number in [0, 1), got {head_offset!r}")
    progress = np.zeros(seq.size, dtype=np.float64)
    kinds = t.kind[seq]
    for code, shift in ((_KINDS.index(NEURONS), 0.0), (_KINDS.index(HEADS), off)):
        mine = kinds == code
        total = float(t.params[t.kind == code].sum())
        if total > 0:
            before = np.cumsum(t.params[seq[mine]]) - t.params[seq[mine]]
            progress[mine] = before / total + shift
    order = np.lexsort((np.arange(seq.size), -kinds, progress))  # ties: neurons first, then walk order
    return seq[order]


def _removal_sequence(t: _Table, order: np.ndarray, floors: Floors) -> np.ndarray:
    """The order with every structure the floors protect dropped.

    Walking the order, group ``g`` loses structures until it is down to its floor; from then
    on every later structure of ``g`` is skipped. So exactly the first ``size - min_kept``
    structures of each group (in walk order) are removable, whatever the budget.
    """
    if order.size == 0:
        return order
    g = t.group[order]
    by_group = np.argsort(g, kind="stable")  # walk order preserved within each group
    rank = np.empty_like(order)
    rank[by_group] = np.arange(order.size) - t.starts[g[by_group]]
    removable = np.array([size - floors.min_kept(size, kind) for _, kind, size in t.groups], dtype=np.int64)
    return order[rank < removable[g]]


def _keep_dict(smap: StructureMap, t: _Table, removed: np.ndarray) -> KeepDict:
    """Full keep dict from the table positions in ``removed``."""
    gone = np.zeros(t.score.size, dtype=bool)
    gone[removed] = True
    keep: KeepDict = {b.index: {} for b in smap.blocks}
    for gid, (bi, kind, _) in enumerate(t.groups):
        lo, hi = int(t.starts[gid]), int(t.starts[gid + 1])
        keep[bi][kind] = np.flatnonzero(~gone[lo:hi]).tolist()
    return keep


# ----------------------------------------------------------------------------- budgets
def _fraction(name: str, value: Any, *, low_open: bool, high_open: bool, hint: str) -> float:
    """``value`` as a float in [0, 1] with the requested open ends, or BudgetError."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lo}0, 1{hi}"
    try:
        ok_type = not isinstance(value, bool) and not isinstance(value, str)
        v = float(value) if ok_type else math.nan
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)):
        raise BudgetError(f"{name} must be a number in {interval}, got {value!r}; {hint}")
    return v


def _cut(cumulative: np.ndarray, needed: float) -> Optional[int]:
    """Fewest leading entries whose cumulative sum reaches ``needed``; None if none do."""
    if needed <= 0:
        return 0
    k = int(np.searchsorted(cumulative, needed * (1 - _REL_TOL), side="left"))
    return None if k >= cumulative.size else k + 1


def _sparsity_cut(smap: StructureMap, t: _Table, seq: np.ndarray, sparsity: Any, floors: Floors) -> int:
    s = _fraction(
        "sparsity", sparsity, low_open=False, high_open=True,
        hint="it is the fraction of prunable block parameters removed (0 keeps everything)",
    )
    total = smap.prunable_params
    cumulative = np.cumsum(t.params[seq])
    k = _cut(cumulative, s * total)
    if k is None:
        reach = float(cumulative[-1]) / total if cumulative.size and total else 0.0
        raise BudgetError(
            f"sparsity {s:g} cannot be reached: with the per-block floors ({floors.describe()}) "
            f"the maximum reachable sparsity is {reach:.4f}; ask for at most that, or pass "
            "floors=Floors(...) with smaller fractions"
        )
    return k


def _flops_cut(smap: StructureMap, t: _Table, seq: np.ndarray, flops: Any, floors: Floors) -> int:
    f = _fraction(
        "flops", flops, low_open=True, high_open=False,
        hint="it is the fraction of the dense model's FLOPs to keep (flops=0.6 keeps at most 60 %)",
    )
    dense = smap.flops()
    saved = np.cumsum(t.flops[seq])
    k = _cut(saved, dense - f * dense)
    if k is None:
        least = (dense - float(saved[-1] if saved.size else 0)) / dense
        raise BudgetError(
            f"flops={f:g} cannot be reached: with the per-block floors ({floors.describe()}) and "
            f"{smap.fixed_flops / 1e9:.3g} GFLOPs outside the prunable structures, the model keeps at "
            f"least {least:.4f} of its {dense / 1e9:.3g} dense GFLOPs; ask for flops >= {least:.4f}"
        )
    return k


def _ratio_removed(t: _Table, seq: np.ndarray, mlp_ratio: Any, head_ratio: Any, floors: Floors) -> np.ndarray:
    removed = []
    for kind, name, ratio in ((NEURONS, "mlp_ratio", mlp_ratio), (HEADS, "head_ratio", head_ratio)):
        r = _fraction(
            name, 0.0 if ratio is None else ratio, low_open=False, high_open=True,
            hint=f"it is the fraction of all {kind} removed (the reference code's {name})",
        )
        code = _KINDS.index(kind)
        of_kind = seq[t.kind[seq] == code]
        total = int(np.count_nonzero(t.kind == code))
        count = math.ceil(r * total - _REL_TOL) if r > 0 else 0
        if count > of_kind.size:
            raise BudgetError(
                f"{name}={r:g} cannot be reached: the per-block floors ({floors.describe()}) let at most "
                f"{of_kind.size} of {total} {kind} go, so the maximum {name} is "
                f"{of_kind.size / total if total else 0.0:.4f}; lower it or pass floors=Floors(...)"
            )
        removed.append(of_kind[:count])
    return np.concatenate(removed)


def _mode(sparsity: Any, flops: Any, mlp_ratio: Any, head_ratio: Any) -> str:
    given = [
        name
        for name, on in (
            ("sparsity", sparsity is not None),
            ("flops", flops is not None),
            ("ratios", mlp_ratio is not None or head_ratio is not None),
        )
        if on
    ]
    if len(given) != 1:
        raise BudgetError(
            f"give exactly one budget: sparsity=..., flops=..., or mlp_ratio=/head_ratio=; got "
            f"{', '.join(given) if given else 'none'}"
        )
    return given[0]


# ----------------------------------------------------------------------------- public API
def structure_order(smap: StructureMap, head_scores: Scores, neuron_scores: Scores) -> List[Tuple[int, str, int]]:
    """Every prunable structure as ``(block, "heads" | "neurons", index)``, least important first.

    Sorted by ``(score, block, kind, index)`` (see the module docstring); floors are not
    applied here. Non-prunable FFNs are left out. Missing or mis-sized score tensors raise
    :class:`ScoresError`; NaN scores raise :class:`NumericalError`.
    """
    t = _table(smap, head_scores, neuron_scores)
    return [(int(t.block[i]), _KINDS[int(t.kind[i])], int(t.index[i])) for i in _order(t)]


def budget_masks(
    smap: StructureMap,
    head_scores: Any,
    neuron_scores: Any = None,
    sparsity: Optional[float] = None,
    *,
    flops: Optional[float] = None,
    floors: Optional[Floors] = None,
    mlp_ratio: Optional[float] = None,
    head_ratio: Optional[float] = None,
    ranking: Optional[str] = None,
    head_offset: Optional[float] = None,
    sums: bool = False,
) -> KeepDict:
    """Keep dict for one budget: exactly one of ``sparsity``, ``flops``, or the ratio pair.

    ``head_scores`` is a :class:`~elastic_fx.scores.LocalScores` (its per-parameter means
    are ranked) or :class:`~elastic_fx.scores.ElasticScores` (its searched ranking, floors
    and ranking rule, unless given here), with ``neuron_scores`` left out; or the head half
    of two ``{block: 1-D tensor}`` dicts, one score per structure, comparable across heads
    and neurons (per-parameter averages; larger = more important). A LocalScores' raw sums
    (:class:`ScoreSums`) are refused unless ``sums=True``.

    ``sparsity`` in [0, 1): fraction of prunable block parameters removed (smallest achievable
    at or above the target). ``flops`` in (0, 1]: fraction of the dense FLOPs kept at most.
    ``mlp_ratio`` / ``head_ratio`` in [0, 1): fractions of all neurons / heads removed, each
    kind ranked on its own (the reference's pair). See the module docstring for the walk, the
    floors, the tie-break and the output format. ``ranking`` (``"global"`` or ``"separate"``)
    and ``head_offset``: see "Rankings" in the module docstring. Raises :class:`BudgetError`
    for an out-of-range or unreachable budget, or scores given the wrong way.
    """
    head_scores, neuron_scores, sparsity, opts = _resolve_scores(
        head_scores, neuron_scores, sparsity, sums,
        {"floors": floors, "ranking": ranking, "head_offset": head_offset})
    floors = opts.get("floors") or Floors()
    ranking = opts.get("ranking") or "global"
    head_offset = DEFAULT_HEAD_OFFSET if opts.get("head_offset") is None else opts["head_offset"]
    mode = _mode(sparsity, flops, mlp_ratio, head_ratio)
    t, seq = _walk(smap, head_scores, neuron_scores, floors, ranking, head_offset)
    if mode == "ratios":
        removed = _ratio_removed(t, seq, mlp_ratio, head_ratio, floors)
    elif mode == "flops":
        removed = seq[: _flops_cut(smap, t, seq, flops, floors)]
    else:
        removed = seq[: _sparsity_cut(smap, t, seq, sparsity, floors)]
    keep = _keep_dict(smap, t, removed)
    logger.debug("budget %s: removed %d structures, achieved %s", mode, removed.size, achieved(smap, keep))
    return keep


def nested_masks(
    smap: StructureMap,
    head_scores: Scores,
    neuron_scores: Scores,
    sparsities: Optional[Sequence[float]] = None,
    *,
    flops: Optional[Sequence[float]] = None,
    floors: Floors = Floors(),
    ranking: str = "global",
    head_offset: float = DEFAULT_HEAD_OFFSET,
    sums: bool = False,
) -> List[KeepDict]:
    """Keep dicts for several budgets from ONE walk, in the order given (so always nested).

    Pass ``sparsities`` or ``flops`` (a sequence of budgets as in :func:`budget_masks`). The
    scores are validated and sorted once, which is what a search evaluating many sparsities
    per candidate wants. Raw sums (:class:`ScoreSums`) are refused unless ``sums=True``.
    """
    _resolve_scores(head_scores, neuron_scores, None, sums, {})
    if (sparsities is None) == (flops is None):
        raise BudgetError("nested_masks takes exactly one of sparsities=[...] or flops=[...]")
    budgets = list(sparsities if sparsities is not None else flops)
    t, seq = _walk(smap, head_scores, neuron_scores, floors, ranking, head_offset)
    cut = _sparsity_cut if sparsities is not None else _flops_cut
    return [_keep_dict(smap, t, seq[: cut(smap, t, seq, b, floors)]) for b in budgets]


def achieved(smap: StructureMap, keep: Optional[Mapping[int, Mapping[str, Sequence[int]]]]) -> Dict[str, float]:
    """What a keep dict amounts to.

    ``sparsity`` (fraction of prunable params removed), ``params`` (model parameters left),
    ``flops`` (theoretical FLOPs per image left), ``gflops`` (the same / 1e9) and
    ``flops_fraction`` (kept FLOPs / dense FLOPs).
    """
    params, fl, dense = smap.params(keep), smap.flops(keep), smap.flops()
    return {
        "sparsity": smap.sparsity(keep),
        "params": params,
        "flops": fl,
        "gflops": fl / 1e9,
        "flops_fraction": fl / dense if dense else 1.0,
    }


def max_sparsity(smap: StructureMap, floors: Floors = Floors()) -> float:
    """The largest sparsity the floors allow: every prunable group down to its floor."""
    total = smap.prunable_params
    if total == 0:
        return 0.0
    removable = 0
    for _, kind, g in _prunable_groups(smap):
        per = g.params_per_head if isinstance(g, AttentionGroup) else g.params_per_neuron
        removable += (g.size - floors.min_kept(g.size, kind)) * per
    return removable / total
