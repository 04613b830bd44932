"""What discovery finds: prunable structures (attention heads, FFN neurons) per block.

Every structure is described by *which entries of which parameters it owns*, in one
uniform form, :class:`ParamSlice`: "structure ``s`` owns positions ``index[s]`` along
dimension ``dim`` of parameter ``name``". A fused qkv projection, separate q/k/v
projections, an ``nn.MultiheadAttention`` in-projection, a gated FFN and a per-head
relative-position-bias table are all just lists of ParamSlices. Slicing, scoring,
parameter counting and masking are all written once against that form.

Names are qualified names in the ORIGINAL model (``blocks.3.attn.qkv.weight``), which
are also the names inside the traced GraphModule.

:func:`elastic_fx.discover` stores its StructureMap in ``gm.meta[STRUCTURE_META]``;
readers get it with :func:`structures_of`. Keep-masks (what survives) are the
vocabulary of :mod:`elastic_fx.keep`.

FLOPs follow the paper's Table 7 (ViT-B/16: about 35.1 GFLOPs): a linear layer costs
``2 * tokens * weight_entries``; attention adds ``4 * N^2 * head_dim`` (logits and
reduction) and ``3 * N^2`` (softmax) per head. Biases and norms are not counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import DiscoveryError, SliceError

if TYPE_CHECKING:  # keep.py imports this module; annotations only
    from .keep import KeepMask

#: ``GraphModule.meta`` key under which :func:`elastic_fx.discover` stores the StructureMap.
STRUCTURE_META = "elastic_fx.structure"


@dataclass(frozen=True)
class ParamSlice:
    """Structure ``s`` owns positions ``index[s]`` along ``dim`` of parameter ``name``.

    ``index`` is an int64 tensor ``[num_structures, k]``; every structure owns the same
    number ``k`` of positions (e.g. ``3 * head_dim`` rows of a fused qkv weight).
    """

    name: str
    shape: Tuple[int, ...]
    dim: int
    index: torch.Tensor
    buffer: bool = False  # a buffer (e.g. a constant zero k-bias): sliced, but not a parameter

    @property
    def numel_per_structure(self) -> int:
        """Parameter entries one structure owns in this tensor."""
        rest = 1
        for i, s in enumerate(self.shape):
            if i != self.dim:
                rest *= s
        return int(self.index.shape[1]) * rest

    def kept_positions(self, keep: Sequence[int]) -> torch.Tensor:
        """Sorted positions along ``dim`` that survive when only ``keep`` structures stay.

        Sorting keeps the original relative order of the surviving rows, which is what a
        reshape with a smaller head count expects (e.g. ``[q0, q2, k0, k2, v0, v2]``).
        """
        removed = torch.zeros(self.shape[self.dim], dtype=torch.bool)
        removed[self.index.reshape(-1)] = True  # positions owned by no structure always stay
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        if keep_t.numel():
            removed[self.index[keep_t].reshape(-1)] = False
        return torch.arange(self.shape[self.dim])[~removed]

    def owner_map(self) -> torch.Tensor:
        """int64 ``[shape[dim]]``: the structure owning each position, or -1."""
        owner = torch.full((self.shape[self.dim],), -1, dtype=torch.long)
        s_ids = torch.arange(self.index.shape[0]).unsqueeze(1).expand_as(self.index)
        owner[self.index.reshape(-1)] = s_ids.reshape(-1)
        return owner


def _group_params(slices: Iterable[ParamSlice]) -> int:
    return sum(s.numel_per_structure for s in slices if not s.buffer)


class _OutColumns:
    """The input columns of a group's out-projection: the one place that looks them up.

    Mixed into :class:`AttentionGroup` and :class:`MlpGroup` (which provide ``out_proj``
    and ``slices``). Removing a structure is the same, for the model's function, as zeroing
    these columns; masking, correction, zeroing and feature extraction all start here.
    """

    def out_slice(self) -> ParamSlice:
        """The ParamSlice of ``<out_proj>.weight`` along its input dim (``dim=1``)."""
        name = f"{self.out_proj}.weight"
        for s in self.slices:
            if s.name == name and s.dim == 1:
                return s
        raise SliceError(f"the structure map has no column slice of {name!r}; run efx.discover(gm) on this graph")

    def out_columns(self) -> torch.Tensor:
        """int64 ``[size, k]``: row ``s`` lists the out-projection input columns structure ``s`` owns."""
        return self.out_slice().index


@dataclass
class AttentionGroup(_OutColumns):
    """The heads of one attention operation."""

    num_heads: int
    head_dim: int
    out_proj: str  # module whose input columns are the concatenated head outputs
    in_projs: Tuple[str, ...]  # modules producing q, k, v (one fused, three separate, or an MHA)
    slices: Tuple[ParamSlice, ...]  # every parameter entry owned by a head
    num_tokens: int  # query tokens
    num_kv_tokens: int
    kind: str  # "sdpa" | "explicit" | "mha"
    core: str = ""  # graph node (or MHA module) where softmax(qk^T)v happens
    extras: Tuple[str, ...] = ()  # per-head parameters besides the projections (bias tables ...)
    params_per_head: int = 0
    flops_per_head: int = 0

    def __post_init__(self) -> None:
        self.params_per_head = _group_params(self.slices)
        linear_entries = sum(
            s.numel_per_structure for s in self.slices if len(s.shape) == 2 and s.name not in self.extras
        )
        # Per head: projections cost 2 flops per weight entry per token (q rows see the
        # query tokens, k/v rows the key tokens; we count all at the query-token count as
        # the paper does for self-attention), plus logits + reduction + softmax.
        n, m = self.num_tokens, self.num_kv_tokens
        self.flops_per_head = 2 * n * linear_entries + 4 * n * m * self.head_dim + 3 * n * m

    @property
    def size(self) -> int:
        return self.num_heads


@dataclass
class MlpGroup(_OutColumns):
    """The hidden neurons of one feed-forward network."""

    hidden_features: int
    out_proj: str  # module whose input columns are the hidden neurons
    in_projs: Tuple[str, ...]  # one (plain or packed-gated) or two (gated) in-projections
    slices: Tuple[ParamSlice, ...]
    num_tokens: int
    gated: bool = False
    prunable: bool = True
    reason: Optional[str] = None  # why it is not prunable
    params_per_neuron: int = 0
    flops_per_neuron: int = 0

    def __post_init__(self) -> None:
        self.params_per_neuron = _group_params(self.slices)
        linear_entries = sum(s.numel_per_structure for s in self.slices if len(s.shape) == 2)
        self.flops_per_neuron = 2 * self.num_tokens * linear_entries

    @property
    def size(self) -> int:
        return self.hidden_features


@dataclass
class Block:
    """One transformer block: an attention group and/or an FFN group."""

    index: int
    attention: Optional[AttentionGroup] = None
    mlp: Optional[MlpGroup] = None
    attention_reason: Optional[str] = None  # an attention found here whose heads are not pruned, and why

    def groups(self) -> List[Tuple[str, object]]:
        out = []
        if self.attention is not None:
            out.append(("heads", self.attention))
        if self.mlp is not None and self.mlp.prunable:
            out.append(("neurons", self.mlp))
        return out


@dataclass
class StructureMap:
    """Every prunable structure of a model, per block, in execution order."""

    blocks: List[Block]
    total_params: int  # all parameters of the model
    fixed_flops: int  # FLOPs of everything that is not a head or neuron (embedding, head ...)
    embedding: Optional[str] = None  # node whose value is the pooled embedding
    source: str = ""  # free-form description of the model (for metadata)
    notes: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ lookup
    def block(self, index: int) -> Block:
        for b in self.blocks:
            if b.index == index:
                return b
        raise SliceError(
            f"block {index} does not exist; this model has blocks "
            f"{[b.index for b in self.blocks]} (see StructureMap.summary())"
        )

    # ------------------------------------------------------------------ totals
    @property
    def prunable_params(self) -> int:
        """Parameters of all prunable heads and neurons: the base of ``sparsity``."""
        total = 0
        for b in self.blocks:
            for _, g in b.groups():
                total += g.size * (g.params_per_head if isinstance(g, AttentionGroup) else g.params_per_neuron)
        return total

    def _kept_counts(self, keep: Optional["KeepMask"]) -> Dict[Tuple[int, str], int]:
        keep = keep or {}
        counts = {}
        for b in self.blocks:
            for kind, g in b.groups():
                k = keep.get(b.index, {})
                counts[(b.index, kind)] = len(k[kind]) if kind in k else g.size
        return counts

    def params(self, keep: Optional["KeepMask"] = None) -> int:
        """Parameter count of the model after applying ``keep`` (all params by default)."""
        removed = 0
        counts = self._kept_counts(keep)
        for b in self.blocks:
            for kind, g in b.groups():
                per = g.params_per_head if isinstance(g, AttentionGroup) else g.params_per_neuron
                removed += (g.size - counts[(b.index, kind)]) * per
        return self.total_params - removed

    def flops(self, keep: Optional["KeepMask"] = None) -> int:
        """Theoretical forward FLOPs per image (paper Table 7) after applying ``keep``."""
        total = self.fixed_flops
        counts = self._kept_counts(keep)
        for b in self.blocks:
            if b.attention is not None:
                total += counts[(b.index, "heads")] * b.attention.flops_per_head
            if b.mlp is not None:
                n = counts[(b.index, "neurons")] if b.mlp.prunable else b.mlp.hidden_features
                total += n * b.mlp.flops_per_neuron
        return total

    def sparsity(self, keep: Optional["KeepMask"]) -> float:
        """Fraction of prunable parameters that ``keep`` removes."""
        base = self.prunable_params
        return 0.0 if base == 0 else (self.total_params - self.params(keep)) / base

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A short hash of the structure layout: equal iff scores are interchangeable."""
        desc = []
        for b in self.blocks:
            a, m = b.attention, b.mlp
            desc.append(
                [
                    b.index,
                    None if a is None else [a.num_heads, a.head_dim, sorted(s.name for s in a.slices)],
                    None if m is None else [m.hidden_features, m.prunable, sorted(s.name for s in m.slices)],
                ]
            )
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def describe(self) -> List[dict]:
        """Plain-data per-block layout (for score files and error messages)."""
        return [
            {
                "index": b.index,
                "num_heads": None if b.attention is None else b.attention.num_heads,
                "head_dim": None if b.attention is None else b.attention.head_dim,
                "hidden_features": None if b.mlp is None else b.mlp.hidden_features,
                "mlp_prunable": None if b.mlp is None else b.mlp.prunable,
                **({"attention_reason": b.attention_reason} if b.attention_reason else {}),
            }
            for b in self.blocks
        ]

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A readable table: one row per block, then model totals."""
        rows = [
            f"{'block':>5}  {'heads':>5} {'hd':>4}  {'params/head':>11}  {'neurons':>7}  "
            f"{'params/neuron':>13}  {'MFLOPs':>9}  attention.out_proj / mlp.out_proj"
        ]
        for b in self.blocks:
            a, m = b.attention, b.mlp
            fl = (a.num_heads * a.flops_per_head if a else 0) + (m.hidden_features * m.flops_per_neuron if m else 0)
            names = f"{a.out_proj if a else '-'} / {m.out_proj if m else '-'}"
            if b.attention_reason:
                names += f"  [attention not pruned: {b.attention_reason}]"
            if m is not None and not m.prunable:
                names += f"  [FFN not prunable: {m.reason}]"
            rows.append(
                f"{b.index:>5}  {a.num_heads if a else '-':>5} {a.head_dim if a else '-':>4}  "
                f"{a.params_per_head if a else '-':>11}  {m.hidden_features if m else '-':>7}  "
                f"{m.params_per_neuron if m else '-':>13}  {fl / 1e6:>9.1f}  {names}"
            )
        heads = sum(b.attention.num_heads for b in self.blocks if b.attention)
        neurons = sum(b.mlp.hidden_features for b in self.blocks if b.mlp)
        rows.append("")
        rows.append(
            f"{len(self.blocks)} blocks, {heads} heads, {neurons} FFN neurons; "
            f"params {self.total_params / 1e6:.2f} M (prunable {self.prunable_params / 1e6:.2f} M); "
            f"{self.flops() / 1e9:.2f} GFLOPs per image"
        )
        for n in self.notes:
            rows.append(f"note: {n}")
        return "\n".join(rows)

    def __repr__(self) -> str:  # pragma: no cover - convenience
        return f"StructureMap({len(self.blocks)} blocks, {self.flops() / 1e9:.2f} GFLOPs)"


def structures_of(gm: Any) -> StructureMap:
    """The StructureMap :func:`elastic_fx.discover` stored on ``gm`` (raises if it has not run)."""
    smap = getattr(gm, "meta", {}).get(STRUCTURE_META)
    if smap is None:
        raise DiscoveryError(
            f"this {type(gm).__name__} carries no structure map; run efx.discover(gm) first "
            "(slicing returns a new module without one: discover it again)"
        )
    return smap
