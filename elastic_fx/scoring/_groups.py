"""What gets scored: the prunable groups of a StructureMap and the parameters they own.

Takes a :class:`~elastic_fx.structures.StructureMap` (and the module it describes);
returns :class:`ScoredGroup` records, the named parameters they own, and per-structure
sums of per-entry values. Touches nothing. Shared by the gradient pass
(:mod:`.gradients`) and the baselines (:mod:`.baselines`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from ..errors import ScoresError
from ..structures import ParamSlice, StructureMap

__all__ = ["ScoredGroup", "Scores", "scored_groups", "scored_parameters", "sum_per_structure"]

#: ``(head scores, neuron scores)``, each block index -> fp32 ``[size]``.
Scores = Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]


@dataclass
class ScoredGroup:
    """One scored group: the heads of one attention or the neurons of one FFN."""

    block: int
    kind: str  # "heads" | "neurons"
    size: int
    slices: Tuple[ParamSlice, ...]  # parameter slices only (buffers get no gradient)


def scored_groups(smap: StructureMap) -> List[ScoredGroup]:
    """Every prunable group of ``smap`` with the parameter (not buffer) slices it owns."""
    out = []
    for b in smap.blocks:
        for kind, g in b.groups():
            out.append(ScoredGroup(b.index, kind, g.size, tuple(s for s in g.slices if not s.buffer)))
    return out


def scored_parameters(gm: nn.Module, groups: Sequence[ScoredGroup]) -> Dict[str, nn.Parameter]:
    """The parameters named by the groups' slices, in first-use order."""
    params: Dict[str, nn.Parameter] = {}
    for g in groups:
        for s in g.slices:
            if s.name not in params:
                try:
                    params[s.name] = gm.get_parameter(s.name)
                except AttributeError:
                    raise ScoresError(
                        f"the structure map names parameter {s.name!r}, which this model does not have; "
                        "run efx.discover(gm) on this very GraphModule"
                    ) from None
    return params


def sum_per_structure(values: Mapping[str, torch.Tensor], groups: Sequence[ScoredGroup]) -> Scores:
    """For every group: ``out[s] = Σ values[name][e]`` over the entries ``e`` structure ``s`` owns.

    ``values`` maps parameter names to tensors of the parameter's shape (per-entry scores);
    sums run in float64 and are returned as fp32 ``(heads, neurons)`` dicts by block.
    """
    heads: Dict[int, torch.Tensor] = {}
    neurons: Dict[int, torch.Tensor] = {}
    for g in groups:
        out = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            v = values[s.name].detach().to("cpu", torch.float64)
            others = [d for d in range(v.dim()) if d != s.dim]
            per_position = v.sum(dim=others) if others else v
            out += per_position[s.index].sum(dim=1)
        (heads if g.kind == "heads" else neurons)[g.block] = out.float()
    return heads, neurons
