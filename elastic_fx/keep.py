"""Keep-masks: which heads and neurons survive, the one vocabulary every stage speaks.

A keep-mask maps a block index to the indices it keeps::

    {3: {"heads": [0, 2], "neurons": [5, 9, 17]}}

Blocks not named, and keys not given, are kept whole. The budget produces keep-masks,
slicing and weight correction consume one, the masked forward of the search consumes
many at once as bool tensors.

Takes a :class:`~elastic_fx.structures.StructureMap` and keep-masks; returns validated,
complete keep-masks (:func:`normalize_keep`) or stacked bool tensors
(:func:`keep_tensors`). Touches nothing; raises :class:`~elastic_fx.errors.SliceError`
naming the block and the bad indices.
"""

from __future__ import annotations

import numbers

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import SliceError
from .structures import StructureMap

__all__ = ["KeepMask", "keep_tensors", "keeps_to_masks", "normalize_keep"]

#: block index -> {"heads": kept head indices, "neurons": kept neuron indices}.
KeepMask = Dict[int, Dict[str, List[int]]]


def _index(i, block: int, kind: str) -> int:
    """One keep index as an int; a fractional or non-numeric one is refused, never truncated."""
    value = i.item() if hasattr(i, "item") and getattr(i, "ndim", 0) == 0 else i
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SliceError(f"block {block}: {kind} index {i!r} is not an integer; keep lists structure indices")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not float(value).is_integer():
        raise SliceError(f"block {block}: {kind} index {value!r} is not a whole number; keep lists structure "
                         "indices (0, 1, 2 ...), it would not round them")
    return int(value)


def _indices(values, block: int, kind: str) -> List[int]:
    """A keep list as ints. Lists of plain ints and integer tensors/arrays (what the budget
    and the search produce: thousands of neurons per block, dozens of keeps per generation)
    take a vectorised path; anything else is checked index by index by :func:`_index`."""
    if isinstance(values, (list, tuple)) and set(map(type, values)) <= {int}:
        return list(values)
    if isinstance(values, torch.Tensor) and values.dim() == 1 and not values.is_floating_point() \
            and not values.is_complex() and values.dtype != torch.bool:
        return values.detach().cpu().tolist()
    return [_index(i, block, kind) for i in values]


def normalize_keep(smap: StructureMap, keep: Optional[KeepMask]) -> KeepMask:
    """Validate a keep-mask and return it complete: every block, sorted kept indices.

    Refused (with a :class:`SliceError`): unknown blocks or keys, indices out of range,
    duplicates, removing every head or every neuron of a group, and removing neurons of
    an FFN that discovery marked not prunable.
    """
    return {bi: {k: v.tolist() for k, v in entry.items()} for bi, entry in _normalize(smap, keep).items()}


def _normalize(smap: StructureMap, keep: Optional[KeepMask]) -> Dict[int, Dict[str, np.ndarray]]:
    """:func:`normalize_keep` with the kept indices as sorted int64 arrays."""
    keep = dict(keep or {})
    out: Dict[int, Dict[str, np.ndarray]] = {}
    known = {b.index for b in smap.blocks}
    for bi in keep:
        if bi not in known:
            raise SliceError(f"keep names block {bi!r}, which does not exist; blocks are {sorted(known)}")
    for b in smap.blocks:
        want = keep.get(b.index, {}) or {}
        unknown = set(want) - {"heads", "neurons"}
        if unknown:
            raise SliceError(f"block {b.index}: unknown keys {sorted(unknown)} in keep; use 'heads' and 'neurons'")
        entry: Dict[str, np.ndarray] = {}
        for kind, group, size in (
            ("heads", b.attention, b.attention.num_heads if b.attention else 0),
            ("neurons", b.mlp, b.mlp.hidden_features if b.mlp else 0),
        ):
            if kind not in want:
                if group is not None:
                    entry[kind] = np.arange(size, dtype=np.int64)
                continue
            if group is None:
                raise SliceError(f"block {b.index} has no {'attention' if kind == 'heads' else 'FFN'}, but keep names {kind}")
            idx = _indices(want[kind], b.index, kind)
            if kind == "neurons" and not group.prunable and len(idx) != size:
                raise SliceError(f"block {b.index}: the FFN is not prunable ({group.reason}); keep all its neurons")
            arr = np.asarray(idx, dtype=np.int64)
            bad = arr[(arr < 0) | (arr >= size)].tolist()
            if bad:
                raise SliceError(f"block {b.index}: {kind} indices {bad} out of range [0, {size})")
            uniq, counts = np.unique(arr, return_counts=True)  # sorted
            if len(uniq) != len(arr):
                raise SliceError(f"block {b.index}: duplicate {kind} indices {uniq[counts > 1].tolist()}")
            if not idx:
                raise SliceError(
                    f"block {b.index}: keep removes every {kind[:-1]}; elastic_fx keeps at least one per block "
                    "(efx.budget_masks enforces this with its per-block floors)"
                )
            entry[kind] = uniq
        out[b.index] = entry
    return out


def keep_tensors(
    smap: StructureMap, keeps: Sequence[Optional[KeepMask]]
) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """Stack ``P`` keep-masks into ``(head_masks {block: bool [P, H]}, neuron_masks {block: bool [P, F]})``.

    Each keep is validated by :func:`normalize_keep` (the error names the keep's
    position); blocks and keys a keep does not name are kept whole. Neuron masks exist
    only for prunable FFNs.

    Built on the host, and left there: the masked forward reads each pair's kept positions
    from the host masks (they size its per-pair GEMMs; read from a device they would cost a
    sync) and moves one forward's masks to the device in one copy
    (:func:`elastic_fx.passes.mask.masks_to`), where everything derived from them is built.
    """
    if isinstance(keeps, Mapping) or not isinstance(keeps, Sequence) or not keeps:
        raise SliceError(
            "keeps must be a non-empty sequence of keep dicts ({block: {'heads': [...], 'neurons': [...]}}), "
            f"one per pair; got {type(keeps).__name__}"
        )
    P = len(keeps)
    heads = {b.index: np.zeros((P, b.attention.num_heads), dtype=bool) for b in smap.blocks if b.attention}
    neurons = {
        b.index: np.zeros((P, b.mlp.hidden_features), dtype=bool)
        for b in smap.blocks if b.mlp is not None and b.mlp.prunable
    }
    for p, keep in enumerate(keeps):
        try:
            full = _normalize(smap, keep)
        except SliceError as e:
            raise SliceError(f"keep {p}: {e}") from e
        for bi, entry in full.items():
            if bi in heads:
                heads[bi][p, entry["heads"]] = True
            if bi in neurons:
                neurons[bi][p, entry["neurons"]] = True
    return ({bi: torch.from_numpy(m) for bi, m in heads.items()},
            {bi: torch.from_numpy(m) for bi, m in neurons.items()})


#: The name the search and the benchmarks use (``passes.mask.keeps_to_masks`` before).
keeps_to_masks = keep_tensors
