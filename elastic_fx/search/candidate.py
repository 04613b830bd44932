"""The xNES search space: one factor per prunable FFN and one per attention head.

A candidate ``c`` (length ``d = FFN blocks + total heads``, laid out as
``[ffn factor of each block with a prunable FFN ..., head factors block by block ...]``)
rescales the local per-structure scores: every neuron of block b is scored
``local_neuron_mean * |c_ffn[b]|`` and head h of block b ``local_head_mean * |c_head[b, h]|``.
Negative factors are folded with ``abs`` as in the reference implementation: xNES may
step through zero, and ``|c|`` keeps the ranking defined without clipping the search
distribution (a factor of 0 simply marks the structure as the first to go).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..structures import StructureMap


@dataclass(frozen=True)
class Layout:
    """Where each block's factors sit in the candidate vector."""

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

    def split(self, c: np.ndarray) -> Tuple[Dict[int, float], Dict[int, np.ndarray]]:
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (self.dim,):
            raise ValueError(f"candidate has shape {c.shape}, the layout needs ({self.dim},)")
        ffn = {b: float(c[i]) for i, b in enumerate(self.ffn_blocks)}
        heads, pos = {}, len(self.ffn_blocks)
        for b, h in self.head_blocks:
            heads[b] = c[pos : pos + h]
            pos += h
        return ffn, heads

    def ones(self) -> np.ndarray:
        return np.ones(self.dim)


def rescale(
    layout: Layout,
    c: np.ndarray,
    head_means: Dict[int, torch.Tensor],
    neuron_means: Dict[int, torch.Tensor],
) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """Per-structure scores for candidate ``c`` (the paper's P = diag(H_local) ⊙ Mc)."""
    ffn, heads = layout.split(c)
    hs = {b: head_means[b].double() * torch.from_numpy(np.abs(heads[b])) for b in heads}
    ns = {b: neuron_means[b].double() * abs(ffn[b]) if b in ffn else neuron_means[b].double() for b in neuron_means}
    return hs, ns


def layout_blocks(layout: Layout) -> Tuple[int, List[int]]:
    """(number of FFN factors, heads per attention block) — the arguments of ``initial_mean``."""
    return len(layout.ffn_blocks), [h for _, h in layout.head_blocks]
