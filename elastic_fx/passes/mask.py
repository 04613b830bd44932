"""build_masked(gm, smap) -> MaskedModel: one forward scores many keep-masks at once.

The search scores every (candidate, sparsity) *pair* by the pooled embeddings of the
sub-network it keeps. Deep-copying and slicing the model per pair is what makes the
reference implementation slow. This pass instead rewrites a copy of the traced graph
so that it takes per-pair keep-masks:

* the image batch ``[B, 3, H, W]`` is repeated once per pair, pair-major, so every
  tensor in the graph carries ``P * B`` samples (index ``p * B + b``);
* **out-projection masking** (always, and alone already exact): the input of every
  attention out-projection is multiplied by the pair's head mask expanded over the
  head's columns, and the input of every prunable FFN out-projection (the hidden
  activations) by the pair's neuron mask. A removed structure then contributes exactly
  nothing, which is what the physically sliced model computes (see
  :func:`elastic_fx.passes.slice.zero_structures`);
* **masked attention cores** (``use_kernel=True``, the FLOP saving): every
  ``scaled_dot_product_attention`` call and every simple explicit
  ``softmax(q @ kᵀ * s) @ v`` chain becomes a call to
  :func:`elastic_fx.kernels.masked_attention.masked_attention` on
  ``[P, B, H, N, d]`` views, so masked (pair, head) combinations cost no attention
  FLOPs. Cores with an additive/boolean mask (relative position bias, padding) or a
  causal flag use :func:`masked_sdpa`, which gathers only the kept pairs for
  ``F.scaled_dot_product_attention``. ``nn.MultiheadAttention`` leaves are replaced by
  an equivalent decomposed computation (in-projection, masked attention, masked
  out-projection) that shares the module's parameters;
* the output is the pooled embedding (:func:`elastic_fx.embedding.embedding_module`),
  returned as ``[P, B, D]``; everything after it is removed.

Masks reach the graph through small stateful modules (:class:`_MaskSlot`,
:class:`_MaskedAttention`, :class:`_MaskedMHA`) called from ``call_module`` nodes, so
``masked.graph_module.code`` stays readable; :meth:`MaskedModel.forward` sets them
before it runs the graph and clears them afterwards.

The MaskedModel owns a deep copy of ``gm``'s parameters, taken once when it is built:
moving it to a GPU leaves ``gm`` where it is, and later edits of ``gm`` are not seen.

What was measured (CPU, 2 busy shared cores, so +-50 % run to run;
``benchmarks/bench_search.py --quick``): batched masked scoring is 20-35x faster
per pair than deepcopy + slice + forward, mostly from not slicing (copy + slice is
~80 % of the reference's time) and 4-6x on the forward alone (ViT-S/16 at 224 px:
8x overall). On the CPU, skipping masked heads (``use_kernel=True``: the gathering
PyTorch reference) was never faster than dense attention plus out-projection masking
(``use_kernel=False``) at 35-90 % kept heads, and up to 2x slower at 197 tokens: the
gathers cost what the skipped heads save. The Triton kernel is meant for the GPU,
where it was not measured here.

FFN gathering (computing only the kept neurons with per-pair gathered weights and a
batched matmul, padded to the largest kept count in the pair chunk) is not done. At the
FFN shape of ViT-S (8 pairs x 1576 tokens, 384 -> 1536) it was 1.7x faster than dense +
mask when every pair kept 50 % of the neurons, but no faster (0.99x) with per-pair kept
fractions drawn from [0.35, 0.9] as in the search, whose pairs span 10-60 % sparsity;
at ViT-Ti/16 shapes it was slower (0.8x). The hidden activations are masked instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..embedding import embedding_module
from ..errors import SliceError
from ..kernels.masked_attention import masked_attention
from ..structures import AttentionGroup, MlpGroup, StructureMap
from ..tracing import example_inputs_of
from ._labels import SDPA_OPS, SOFTMAX_OPS, find_linears, op_name
from .slice import normalize_keep

log = logging.getLogger(__name__)

__all__ = ["MaskedModel", "build_masked", "keeps_to_masks", "masked_embeddings", "masked_sdpa"]

#: ``GraphModule.meta`` key of the masked graph: what the pass rewrote (list of strings).
MASK_META = "elastic_fx.mask"

#: Images per forward (pairs x images) when ``masked_embeddings`` chooses the pair chunk.
DEFAULT_ROWS_PER_FORWARD = 256

# ops allowed between softmax and the ``@ v`` of an explicit core: no-ops at inference
_PROB_PASSTHROUGH = {"identity", "dropout", "to", "type_as", "_to_copy", "float", "contiguous", "clone"}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ASSERT_METADATA = {"_assert_tensor_metadata"}
_SCALE_OPS = {"mul", "rmul", "div", "truediv"}


# ============================================================================ attention math
def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_keep: torch.Tensor,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` over ``[P, B, H, N, d]`` for the kept (pair, head)s only.

    Args:
        q: ``[P, B, H, N, d]``; k: ``[P, B, H, M, d]``; v: ``[P, B, H, M, dv]``.
        head_keep: bool ``[P, H]``.
        attn_mask: ``None`` or a tensor broadcastable to ``[P, B, H, N, M]`` whose pair
            and batch dims are either full or 1 (see :func:`_pair_view`); boolean
            (True = attend) or additive, as for ``F.scaled_dot_product_attention``.
        scale, is_causal: as for ``F.scaled_dot_product_attention``.

    Returns:
        ``[P, B, H, N, dv]`` in q's dtype, exactly zero where ``head_keep`` is False.
    """
    P, B, H, N, _ = q.shape
    out = q.new_zeros((P, B, H, N, v.shape[-1]))
    keep_p, keep_h = head_keep.nonzero(as_tuple=True)
    if keep_p.numel() == 0:
        return out
    # t[keep_p, :, keep_h]: the index tensors are split by a slice, so the gathered pair
    # axis comes first -> [K, B, N, d]; SDPA treats K and B as batch axes.
    sel = [t[keep_p, :, keep_h] for t in (q, k, v)]
    mask = None if attn_mask is None else attn_mask[keep_p, :, keep_h]
    got = F.scaled_dot_product_attention(*sel, attn_mask=mask, scale=scale, is_causal=is_causal)
    out[keep_p, :, keep_h] = got.to(out.dtype)
    return out


def _pair_view(t: torch.Tensor, P: int, lead: Tuple[int, ...], axis: int, heads: int) -> torch.Tensor:
    """View a mask broadcastable to ``[*lead, H, N, M]`` as ``[P, B' or 1, H, N, M]``.

    ``lead`` are the batch-like dims of q (their product is ``P * B'``) and ``axis`` the
    one that holds the pairs. A mask shared by all samples keeps a batch dim of 1, so
    gathering the kept (pair, head)s copies only ``K * N * M`` entries.
    """
    t = t.reshape((1,) * (len(lead) + 3 - t.dim()) + tuple(t.shape))
    tail = tuple(t.shape[len(lead):])
    if all(s == 1 for s in t.shape[: len(lead)]):
        t5 = t.reshape((1, 1) + tail).expand((P, 1) + tail)
    else:
        t5 = t.expand(tuple(lead) + tail).movedim(axis, 0).reshape((P, -1) + tail)
    if t5.shape[2] == 1 and heads != 1:
        t5 = t5.expand(-1, -1, heads, -1, -1)
    return t5


def _attend(
    q5: torch.Tensor,
    k5: torch.Tensor,
    v5: torch.Tensor,
    keep: torch.Tensor,
    *,
    mask5: Optional[torch.Tensor],
    scale: Optional[float],
    is_causal: bool,
) -> torch.Tensor:
    """Masked attention on ``[P, B, H, N, d]``: the kernel where it applies, else :func:`masked_sdpa`."""
    if k5.dtype != q5.dtype or v5.dtype != q5.dtype:  # e.g. rope in fp32 under autocast
        k5, v5 = k5.to(q5.dtype), v5.to(q5.dtype)
    kernel_ok = (
        mask5 is None
        and not is_causal
        and v5.shape[-1] == q5.shape[-1]
        and q5.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q5.shape[-1] <= 256
    )
    if kernel_ok:
        return masked_attention(q5, k5, v5, keep, scale=scale)
    return masked_sdpa(q5, k5, v5, keep, attn_mask=mask5, scale=scale, is_causal=is_causal)


# ============================================================================ mask modules
class _MaskSlot(nn.Module):
    """Multiplies the input of one out-projection by a per-pair structure mask.

    ``owner[w]`` is the structure that owns input column ``w`` (``-1``: none, always
    kept). :meth:`set_mask` turns a bool ``[P, S]`` mask into a ``[P, W]`` column mask
    once per forward; ``forward(x)`` splits ``x``'s batch axis into ``(P, B)`` and
    multiplies its last (feature) axis by the pair's columns.
    """

    def __init__(self, kind: str, block: int, size: int, owner: torch.Tensor, batch_axis: int) -> None:
        super().__init__()
        self.kind = kind
        self.block = block
        self.size = size
        self.batch_axis = batch_axis
        # -1 (unowned column) -> index `size` of the mask padded with one True column
        self.register_buffer("owner", torch.where(owner < 0, self.size, owner).long(), persistent=False)
        self.columns: Optional[torch.Tensor] = None

    def set_mask(self, mask: torch.Tensor) -> None:
        padded = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        self.columns = padded[:, self.owner.to(mask.device)].float()

    def clear(self) -> None:
        self.columns = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = self.columns
        if cols is None:
            raise RuntimeError("MaskedModel: a mask slot ran without a mask; call MaskedModel.forward")
        P, width = cols.shape
        ax = self.batch_axis % x.dim()
        shape = [1] * (x.dim() + 1)
        shape[ax] = P
        shape[-1] = width
        y = x.unflatten(ax, (P, -1)) * cols.to(x.dtype).view(shape)
        return y.flatten(ax, ax + 1)

    def extra_repr(self) -> str:
        return f"{self.kind}, block={self.block}, size={self.size}, columns={self.owner.numel()}"


class _MaskedAttention(nn.Module):
    """Replaces one attention core (SDPA call or explicit softmax chain) by masked attention.

    Takes the core's q, k (or kᵀ for explicit chains) and v with their leading batch
    dims holding ``P * B`` samples, views them as ``[P, B, H, N, d]`` and calls
    :func:`_attend` with the pair's head mask.
    """

    def __init__(self, block: int, batch_axis: int, scale: Optional[float], is_causal: bool,
                 k_transposed: bool) -> None:
        super().__init__()
        self.block = block
        self.batch_axis = batch_axis
        self.scale = scale
        self.is_causal = is_causal
        self.k_transposed = k_transposed
        self.mask: Optional[torch.Tensor] = None

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def clear(self) -> None:
        self.mask = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        keep = self.mask
        if keep is None:
            raise RuntimeError("MaskedModel: an attention core ran without a mask; call MaskedModel.forward")
        if self.k_transposed:
            k = k.transpose(-2, -1)
        P, H = keep.shape
        lead = tuple(q.shape[:-3])
        ax = self.batch_axis

        def five(t: torch.Tensor) -> torch.Tensor:
            return t.movedim(ax, 0).reshape((P, -1) + tuple(t.shape[-3:]))

        mask5 = None if attn_mask is None else _pair_view(attn_mask, P, lead, ax, H)
        o5 = _attend(five(q), five(k), five(v), keep, mask5=mask5, scale=self.scale, is_causal=self.is_causal)
        moved = (lead[ax],) + lead[:ax] + lead[ax + 1:]
        return o5.reshape(moved + tuple(o5.shape[-3:])).movedim(0, ax)

    def extra_repr(self) -> str:
        return f"block={self.block}, scale={self.scale}, is_causal={self.is_causal}"


class _MaskedMHA(nn.Module):
    """``nn.MultiheadAttention`` (or a sliced one) computed step by step with a per-pair head mask.

    Shares the wrapped module's parameters. In-projection with ``F.linear``, attention
    through :func:`_attend` (or dense SDPA when ``use_kernel`` is False), head outputs
    multiplied by the mask, out-projection. Returns ``(output, None)``.
    """

    def __init__(self, mha: nn.Module, block: int, use_kernel: bool) -> None:
        super().__init__()
        if getattr(mha, "bias_k", None) is not None or getattr(mha, "add_zero_attn", False):
            raise SliceError(
                f"block {block}: nn.MultiheadAttention with bias_k/bias_v or add_zero_attn cannot be masked "
                "per candidate; build the MaskedModel of a model without them, or score candidates by slicing"
            )
        self.mha = mha
        self.block = block
        self.use_kernel = use_kernel
        self.mask: Optional[torch.Tensor] = None

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def clear(self) -> None:
        self.mask = None

    def _in_proj(self, query, key, value, inner):
        m = self.mha
        if getattr(m, "_qkv_same_embed_dim", True):
            w_q, w_k, w_v = m.in_proj_weight.split(inner)
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b_q, b_k, b_v = m.in_proj_bias.split(inner) if m.in_proj_bias is not None else (None,) * 3
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    @staticmethod
    def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        if mask.dtype == torch.bool:  # PyTorch MHA: True = do NOT attend
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        keep = self.mask
        if keep is None:
            raise RuntimeError("MaskedModel: an attention module ran without a mask; call MaskedModel.forward")
        m = self.mha
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        PB, N, _ = query.shape
        M = key.shape[1]
        H = m.num_heads
        hd = getattr(m, "head_dim", m.embed_dim // H)
        inner = H * hd
        q, k, v = self._in_proj(query, key, value, inner)
        q, k, v = (t.view(PB, -1, H, hd).transpose(1, 2) for t in (q, k, v))  # [PB, H, n, hd]
        bias = None
        if attn_mask is not None:
            am = self._additive(attn_mask, q.dtype)
            bias = am.view(1, 1, N, M) if am.dim() == 2 else am.view(PB, H, N, M)
        if key_padding_mask is not None:
            kp = self._additive(key_padding_mask, q.dtype).view(PB, 1, 1, M)
            bias = kp if bias is None else bias + kp
        P = keep.shape[0]
        if self.use_kernel:
            q5, k5, v5 = (t.reshape(P, -1, H, t.shape[-2], hd) for t in (q, k, v))
            mask5 = None if bias is None else _pair_view(bias, P, (PB,), 0, H)
            o = _attend(q5, k5, v5, keep, mask5=mask5, scale=None, is_causal=is_causal).reshape(PB, H, N, hd)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal)
        heads = keep.to(o.dtype).view(P, 1, H, 1, 1)
        o = (o.view(P, -1, H, N, hd) * heads).view(PB, H, N, hd)
        out = F.linear(o.transpose(1, 2).reshape(PB, N, inner), m.out_proj.weight, m.out_proj.bias)
        if not m.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return f"block={self.block}, use_kernel={self.use_kernel}"


# ============================================================================ graph analysis
@dataclass
class _CorePlan:
    """How to replace one attention core: its inputs and constants."""

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: Optional[fx.Node] = None
    scale: Optional[float] = None
    is_causal: bool = False
    k_transposed: bool = False
    chain: List[fx.Node] = field(default_factory=list)  # explicit cores: the softmax chain, erased after


@dataclass
class _Rewrite:
    """Everything the pass decided, before it touches the graph."""

    slots: List[Tuple[str, int, object, List[fx.Node]]] = field(default_factory=list)  # kind, block, group, linears
    cores: Dict[int, _CorePlan] = field(default_factory=dict)
    mhas: Dict[int, fx.Node] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def _number(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else None


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _sdpa_plan(gm: fx.GraphModule, node: fx.Node) -> Tuple[Optional[_CorePlan], str]:
    bound = dict(zip(_SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    if any(not isinstance(bound.get(r), fx.Node) for r in ("query", "key", "value")):
        return None, "q, k or v is not a graph value"
    if _number(bound.get("dropout_p") or 0.0) != 0.0 or bound.get("enable_gqa") not in (None, False):
        return None, "dropout or grouped-query attention"
    scale = bound.get("scale")
    if scale is not None and _number(scale) is None:
        return None, "a computed softmax scale"
    mask = bound.get("attn_mask")
    if mask is not None and not isinstance(mask, fx.Node):
        return None, "a constant attention mask"
    causal = bound.get("is_causal", False)
    if not isinstance(causal, bool):
        return None, "a computed is_causal flag"
    return _CorePlan(node, bound["query"], bound["key"], bound["value"], mask, _number(scale), causal), ""


def _dropout_active(n: fx.Node) -> bool:
    """``F.dropout(x, p, training)`` / ``aten.dropout(x, p, train)`` traced in training mode."""
    flag = n.kwargs.get("training", n.kwargs.get("train", (list(n.args) + [None] * 3)[2]))
    return flag not in (False, None)


def _softmax_dim(gm: fx.GraphModule, n: fx.Node) -> Any:
    if n.op == "call_module":
        return getattr(gm.get_submodule(n.target), "dim", None)
    if "dim" in n.kwargs:
        return n.kwargs["dim"]
    return n.args[1] if len(n.args) > 1 else None


def _explicit_plan(gm: fx.GraphModule, node: fx.Node, rank: int) -> Tuple[Optional[_CorePlan], str]:
    """``softmax(q @ kᵀ * s) [-> dropout/casts] @ v`` with scalar scalings only."""
    if op_name(gm, node) != "matmul" or len(node.args) < 2:
        return None, "the core is not a matmul"
    probs, v = node.args[0], node.args[1]
    x, chain = probs, []
    while isinstance(x, fx.Node) and op_name(gm, x) in _PROB_PASSTHROUGH:
        chain.append(x)
        if op_name(gm, x) == "dropout" and _dropout_active(x):
            return None, "dropout in training mode"
        if _single_user(x) is None or not x.args or not isinstance(x.args[0], fx.Node):
            return None, "attention probabilities used elsewhere"
        x = x.args[0]
    if not isinstance(x, fx.Node) or op_name(gm, x) not in SOFTMAX_OPS or _single_user(x) is None:
        return None, "no softmax feeding the core"
    dim = _softmax_dim(gm, x)
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return None, f"softmax over dim {dim}"
    chain.append(x)
    logits, scale = x.args[0], 1.0
    while isinstance(logits, fx.Node) and op_name(gm, logits) in _SCALE_OPS and _single_user(logits) is not None:
        a, b = (list(logits.args) + [None, None])[:2]
        name = op_name(gm, logits)
        chain.append(logits)
        if isinstance(a, fx.Node) and _number(b) is not None:
            scale = scale * _number(b) if name in ("mul", "rmul") else scale / _number(b)
            logits = a
        elif isinstance(b, fx.Node) and _number(a) is not None and name in ("mul", "rmul"):
            scale, logits = scale * _number(a), b
        else:
            return None, "the logits are scaled by a tensor"
    if not isinstance(logits, fx.Node) or op_name(gm, logits) != "matmul" or _single_user(logits) is None:
        return None, "the logits are not a plain q @ kᵀ (a bias or mask is added)"
    chain.append(logits)
    q, kt = logits.args[0], logits.args[1]
    if not (isinstance(q, fx.Node) and isinstance(kt, fx.Node) and isinstance(v, fx.Node)):
        return None, "q, k or v is not a graph value"
    return _CorePlan(node, q, kt, v, None, scale, False, k_transposed=True, chain=chain), ""


def _owner_columns(group) -> torch.Tensor:
    """Per input column of the out-projection, the head / neuron owning it (-1: none)."""
    name = f"{group.out_proj}.weight"
    for s in group.slices:
        if s.name == name and s.dim == 1:
            return s.owner_map()
    raise SliceError(f"the structure map has no column slice of {name!r}; run efx.discover(gm) on this graph")


class _ShapeProbe(fx.Interpreter):
    """Runs a graph and records the shape of every tensor value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.shapes: Dict[fx.Node, Tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


class _BatchAxes:
    """Which axis of each node's value holds the batch: the graph is run on 2 and 3 images."""

    def __init__(self, gm: fx.GraphModule) -> None:
        example = example_inputs_of(gm)
        if not example or not isinstance(example[0], torch.Tensor) or example[0].dim() != 4:
            raise SliceError("the masked forward needs a model traced on an image batch [B, 3, H, W]")
        one = example[0][:1]
        self.runs = []
        for b in (2, 3):
            probe = _ShapeProbe(gm)
            try:
                with torch.no_grad():
                    probe.run(one.repeat(b, 1, 1, 1), *example[1:])
            except Exception as e:
                raise SliceError(
                    f"the traced graph does not run on a batch of {b} images ({type(e).__name__}: {e}); the "
                    "masked forward stacks pairs along the batch, so trace the model with a dynamic batch size "
                    "(efx.trace(model) does so unless the model specialises on it)"
                ) from e
            self.runs.append(probe.shapes)

    def rank(self, n: fx.Node) -> int:
        return len(self.runs[0][n])

    def __call__(self, n: fx.Node) -> int:
        a, b = self.runs[0].get(n), self.runs[1].get(n)
        diff = [] if a is None or b is None or len(a) != len(b) else [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) != 1 or a[diff[0]] * 3 != b[diff[0]] * 2:
            raise SliceError(
                f"cannot tell which axis of node '{n.name}' holds the batch (shapes {a} and {b} for 2 and 3 "
                "images); the masked forward needs every masked tensor to carry the batch on one axis"
            )
        return diff[0]


# ============================================================================ the model
class MaskedModel(nn.Module):
    """A copy of the traced graph that takes keep-masks; output: pooled embeddings per pair.

    ``forward(images [B, 3, H, W], head_masks {block: bool [P, H_b]},
    neuron_masks {block: bool [P, F_b]}) -> [P, B, D]``: row ``p`` equals the
    embedding of the physically sliced model that keeps what pair ``p``'s masks keep.
    Blocks missing from a dict are kept whole. See the module docstring for how.

    Attributes:
        smap: the StructureMap the masks refer to.
        graph_module: the rewritten GraphModule (readable with ``.code``).
        rewrites: one line per change the pass made (also in ``graph_module.meta[MASK_META]``).
    """

    def __init__(self, gm: fx.GraphModule, smap: StructureMap, *, use_kernel: bool = True) -> None:
        super().__init__()
        if not isinstance(gm, fx.GraphModule):
            raise SliceError(f"MaskedModel takes the GraphModule returned by efx.trace(), got {type(gm).__name__}")
        if not isinstance(smap, StructureMap):
            raise SliceError(f"MaskedModel takes the StructureMap from efx.discover(gm), got {type(smap).__name__}")
        self.smap = smap
        self.use_kernel = bool(use_kernel)
        self.head_sizes: Dict[int, int] = {b.index: b.attention.num_heads for b in smap.blocks if b.attention}
        self.neuron_sizes: Dict[int, int] = {
            b.index: b.mlp.hidden_features for b in smap.blocks if b.mlp is not None and b.mlp.prunable
        }
        own = copy.deepcopy(gm)  # once per MaskedModel, never per candidate
        self.graph_module = embedding_module(own, smap).eval()
        self._head_sinks: Dict[int, List[nn.Module]] = {}
        self._neuron_sinks: Dict[int, List[nn.Module]] = {}
        self.rewrites: List[str] = []
        self._graph_device: Optional[torch.device] = None
        _rewrite(self)
        self.graph_module.meta[MASK_META] = list(self.rewrites)

    # -------------------------------------------------------------- masks in
    def _pairs(self, head_masks: Mapping, neuron_masks: Mapping) -> int:
        sizes = {int(m.shape[0]) for m in list(head_masks.values()) + list(neuron_masks.values())
                 if isinstance(m, torch.Tensor) and m.dim() >= 1}
        if len(sizes) > 1:
            raise SliceError(f"the masks disagree on the number of pairs: first dims {sorted(sizes)}")
        return sizes.pop() if sizes else 1

    def _check(self, kind: str, masks: Mapping, sizes: Dict[int, int], P: int, device) -> Dict[int, torch.Tensor]:
        unknown = sorted(set(masks) - set(sizes))
        if unknown:
            raise SliceError(
                f"{kind} masks name blocks {unknown}, which have no "
                f"{'attention' if kind == 'head' else 'prunable FFN'}; blocks with {kind}s: {sorted(sizes)}"
            )
        out = {}
        for bi, size in sizes.items():
            m = masks.get(bi)
            if m is None:
                out[bi] = torch.ones((P, size), dtype=torch.bool, device=device)
                continue
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (P, size):
                got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise SliceError(
                    f"block {bi}: the {kind} mask must be a bool tensor [pairs={P}, {kind}s={size}], got {got}; "
                    "build them with elastic_fx.passes.mask.keeps_to_masks(smap, keeps)"
                )
            out[bi] = m.to(device)
        return out

    def _set(self, head_masks: Mapping, neuron_masks: Mapping, device) -> int:
        head_masks, neuron_masks = head_masks or {}, neuron_masks or {}
        P = self._pairs(head_masks, neuron_masks)
        for sinks, masks in (
            (self._head_sinks, self._check("head", head_masks, self.head_sizes, P, device)),
            (self._neuron_sinks, self._check("neuron", neuron_masks, self.neuron_sizes, P, device)),
        ):
            for bi, mods in sinks.items():
                for mod in mods:
                    mod.set_mask(masks[bi])
        return P

    def _clear(self) -> None:
        for sinks in (self._head_sinks, self._neuron_sinks):
            for mods in sinks.values():
                for mod in mods:
                    mod.clear()

    # -------------------------------------------------------------- forward
    def forward(
        self,
        images: torch.Tensor,
        head_masks: Optional[Mapping[int, torch.Tensor]] = None,
        neuron_masks: Optional[Mapping[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Embeddings ``[P, B, D]`` of every pair's sub-network on the same ``images [B, 3, H, W]``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise SliceError(f"images must be a tensor [B, 3, H, W], got {got}")
        self._follow_device(images.device)
        P = self._set(head_masks, neuron_masks, images.device)
        try:
            x = images if P == 1 else images.repeat(P, 1, 1, 1)  # pair-major: row p * B + b
            emb = self.graph_module(x)
        finally:
            self._clear()
        return emb.reshape(P, images.shape[0], -1)

    def _follow_device(self, device: torch.device) -> None:
        """Point device constants baked into the graph (``arange(device=cpu)``, plain tensor
        attributes from torch.export) at the device the parameters now live on."""
        if self._graph_device == device:
            return
        gm = self.graph_module
        changed = False
        for n in gm.graph.nodes:
            dev = n.kwargs.get("device") if n.op == "call_function" else None
            if isinstance(dev, (torch.device, str)) and torch.device(dev) != device:
                n.kwargs = {**n.kwargs, "device": device}
                changed = True
            if n.op == "get_attr":
                owner_name, _, attr = n.target.rpartition(".")
                owner = gm.get_submodule(owner_name) if owner_name else gm
                val = getattr(owner, attr, None)
                is_state = attr in owner._parameters or attr in owner._buffers
                if isinstance(val, torch.Tensor) and not is_state and val.device != device:
                    setattr(owner, attr, val.to(device))
        if changed:
            gm.recompile()
        self._graph_device = device


# ============================================================================ the pass
def _rewrite(model: MaskedModel) -> None:
    gm, smap = model.graph_module, model.smap
    graph = gm.graph
    for n in list(graph.nodes):  # torch.export's dtype/device asserts: pure checks, pinned to the trace device
        if op_name(gm, n) in _ASSERT_METADATA and not n.users:
            graph.erase_node(n)
    axes = _BatchAxes(gm)
    out_value = next(n for n in graph.nodes if n.op == "output").args[0]
    if axes(out_value) != 0:
        raise SliceError(f"the embedding carries the batch on axis {axes(out_value)}; expected axis 0")
    plan = _plan(gm, smap, axes, model.use_kernel)
    for kind, bi, group, linears in plan.slots:
        _insert_slot(model, kind, bi, group, linears, axes)
    for bi, core in plan.cores.items():
        _replace_core(model, bi, core, axes(core.q))
    for bi, node in plan.mhas.items():
        owner_name, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        mod = _MaskedMHA(getattr(owner, attr), bi, model.use_kernel)
        setattr(owner, attr, mod)
        model._head_sinks.setdefault(bi, []).append(mod)
        model.rewrites.append(f"block {bi}: nn.MultiheadAttention '{node.target}' -> decomposed masked attention")
    graph.eliminate_dead_code()
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    for note in plan.notes:
        log.info("masking: %s", note)
        model.rewrites.append(note)


def _insert_slot(model: MaskedModel, kind: str, bi: int, group, linears: List[fx.Node], axes: _BatchAxes) -> None:
    """Multiply the input of every call of ``group``'s out-projection by the pair's mask."""
    gm, graph = model.graph_module, model.graph_module.graph
    x = linears[0].args[0]
    ax = axes(x)
    if ax == axes.rank(x) - 1:
        raise SliceError(f"block {bi}: the batch axis of '{x.name}' is its feature axis; cannot mask {kind}")
    slot = _MaskSlot(kind, bi, group.size, _owner_columns(group), ax)
    name = f"efx_mask_{kind}_{bi}"
    gm.add_submodule(name, slot)
    for lin in linears:
        inp = lin.args[0]
        with graph.inserting_before(lin):
            masked = graph.call_module(name, (inp,))
        lin.replace_input_with(inp, masked)
    sinks = model._head_sinks if kind == "heads" else model._neuron_sinks
    sinks.setdefault(bi, []).append(slot)
    model.rewrites.append(f"block {bi}: {kind} mask on the input of {group.out_proj}")


def _replace_core(model: MaskedModel, bi: int, core: _CorePlan, batch_axis: int) -> None:
    gm, graph = model.graph_module, model.graph_module.graph
    mod = _MaskedAttention(bi, batch_axis, core.scale, core.is_causal, core.k_transposed)
    name = f"efx_attention_{bi}"
    gm.add_submodule(name, mod)
    args = (core.q, core.k, core.v) + ((core.attn_mask,) if core.attn_mask is not None else ())
    with graph.inserting_before(core.node):
        new = graph.call_module(name, args)
    core.node.replace_all_uses_with(new)
    graph.erase_node(core.node)
    for n in core.chain:  # probabilities -> softmax -> scalings -> q @ kᵀ; dropout is never dead code to fx
        if not n.users:
            graph.erase_node(n)
    model._head_sinks.setdefault(bi, []).append(mod)
    model.rewrites.append(f"block {bi}: attention core '{core.node.name}' -> masked attention")


def _plan(gm: fx.GraphModule, smap: StructureMap, axes: _BatchAxes, use_kernel: bool) -> _Rewrite:
    """Decide every change before touching the graph (so a refusal leaves nothing half done)."""
    plan = _Rewrite()
    nodes = {n.name: n for n in gm.graph.nodes}
    by_module: Dict[str, List[fx.Node]] = {}
    for n, li in find_linears(gm).items():
        by_module.setdefault(li.module, []).append(n)
    for b in smap.blocks:
        a: Optional[AttentionGroup] = b.attention
        if a is not None and a.kind == "mha":
            node = _mha_node(gm, b.index, a)
            if node is None:
                plan.notes.append(_off_path(b.index, "attention", a.core))
            else:
                plan.mhas[b.index] = node
        elif a is not None:
            lins = by_module.get(a.out_proj, [])
            if not lins:
                plan.notes.append(_off_path(b.index, "attention", a.out_proj))
            else:
                plan.slots.append(("heads", b.index, a, lins))
                if use_kernel:
                    _plan_core(gm, plan, b.index, nodes.get(a.core), axes)
        m: Optional[MlpGroup] = b.mlp
        if m is not None and m.prunable:
            lins = by_module.get(m.out_proj, [])
            if not lins:
                plan.notes.append(_off_path(b.index, "FFN", m.out_proj))
            else:
                plan.slots.append(("neurons", b.index, m, lins))
    return plan


def _off_path(bi: int, what: str, name: str) -> str:
    return (f"block {bi}: the {what} '{name}' does not feed the embedding (the pooled output ends before it); "
            "its masks have no effect, as slicing it has none")


def _plan_core(gm: fx.GraphModule, plan: _Rewrite, bi: int, core: Optional[fx.Node], axes: _BatchAxes) -> None:
    if core is None:
        plan.notes.append(f"block {bi}: the attention core is not in the embedding graph; left dense")
        return
    if op_name(gm, core) in SDPA_OPS:
        got, why = _sdpa_plan(gm, core)
    else:
        got, why = _explicit_plan(gm, core, axes.rank(core))
    if got is not None and axes(got.q) >= axes.rank(got.q) - 3:
        got, why = None, "its batch is not a leading dim"
    if got is None:
        plan.notes.append(
            f"block {bi}: attention core '{core.name}' left dense ({why}); its heads are still masked exactly "
            "at the out-projection"
        )
        return
    plan.cores[bi] = got


def _mha_node(gm: fx.GraphModule, bi: int, a: AttentionGroup) -> Optional[fx.Node]:
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == a.core), None)
    if node is None:
        return None
    for u in node.users:
        if op_name(gm, u) == "getitem" and u.args[1] == 1 and u.users:
            raise SliceError(
                f"block {bi}: the model uses the attention weights of '{a.core}'; the masked forward does not "
                "compute them"
            )
    return node


# ============================================================================ public helpers
def build_masked(gm: fx.GraphModule, smap: StructureMap, **kw: Any) -> MaskedModel:
    """``MaskedModel(gm, smap, **kw)``: the graph of ``gm`` rewritten to take keep-masks."""
    return MaskedModel(gm, smap, **kw)


def keeps_to_masks(
    smap: StructureMap, keeps: Sequence[Optional[Mapping]]
) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """Stack ``P`` keep dicts into ``(head_masks {block: bool [P, H]}, neuron_masks {block: bool [P, F]})``.

    Each keep is validated like :func:`elastic_fx.slice` validates it (known blocks,
    indices in range, no duplicates, at least one structure per group); blocks and keys
    a keep does not name are kept whole.
    """
    if isinstance(keeps, Mapping) or not isinstance(keeps, Sequence) or not keeps:
        raise SliceError(
            "keeps must be a non-empty sequence of keep dicts ({block: {'heads': [...], 'neurons': [...]}}), "
            f"one per pair; got {type(keeps).__name__}"
        )
    P = len(keeps)
    heads = {b.index: torch.zeros((P, b.attention.num_heads), dtype=torch.bool) for b in smap.blocks if b.attention}
    neurons = {
        b.index: torch.zeros((P, b.mlp.hidden_features), dtype=torch.bool)
        for b in smap.blocks if b.mlp is not None and b.mlp.prunable
    }
    for p, keep in enumerate(keeps):
        try:
            full = normalize_keep(smap, keep)
        except SliceError as e:
            raise SliceError(f"keep {p}: {e}") from e
        for bi, entry in full.items():
            if bi in heads:
                heads[bi][p, entry["heads"]] = True
            if bi in neurons:
                neurons[bi][p, entry["neurons"]] = True
    return heads, neurons


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        amp_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if amp_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def masked_embeddings(
    model: MaskedModel,
    images: torch.Tensor,
    keeps: Sequence[Optional[Mapping]],
    *,
    batch_size: int = 64,
    pair_chunk: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Pooled embeddings ``[P, N, D]`` (float32) of ``P`` sub-networks on ``N`` images.

    Args:
        model: from :func:`build_masked`.
        images: ``[N, 3, H, W]`` preprocessed images (any device; moved batch by batch).
        keeps: ``P`` keep dicts, e.g. one per (candidate, sparsity) from the budget module.
        batch_size: images per forward.
        pair_chunk: pairs per forward (each forward runs ``pair_chunk * batch_size``
            rows); default ``max(1, 256 // batch_size)``.
        device: where to compute; default where ``model``'s parameters are. The model
            is moved there (it owns its parameters; the source GraphModule stays put).
        amp_dtype: autocast dtype; default bfloat16 on CUDA and none (float32) on the
            CPU; ``torch.float32`` disables autocast.

    Returns:
        float32 tensor ``[P, N, D]`` on ``device``; row ``p`` equals the embeddings of
        ``efx.slice(gm, smap, keeps[p])``.
    """
    if not isinstance(model, MaskedModel):
        raise SliceError(f"masked_embeddings takes a MaskedModel from build_masked(gm, smap), got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SliceError(f"images must be a non-empty tensor [N, 3, H, W], got {got}")
    if batch_size < 1 or (pair_chunk is not None and pair_chunk < 1):
        raise SliceError(f"batch_size and pair_chunk must be >= 1, got {batch_size} and {pair_chunk}")
    head_masks, neuron_masks = keeps_to_masks(model.smap, keeps)
    P, N = len(keeps), images.shape[0]
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    chunk = pair_chunk or max(1, DEFAULT_ROWS_PER_FORWARD // batch_size)
    head_masks = {k: v.to(dev) for k, v in head_masks.items()}
    neuron_masks = {k: v.to(dev) for k, v in neuron_masks.items()}
    out: Optional[torch.Tensor] = None
    with torch.inference_mode(), _autocast(dev, amp_dtype):
        for i in range(0, N, batch_size):
            x = images[i : i + batch_size].to(dev, non_blocking=True)
            for p0 in range(0, P, chunk):
                sl = slice(p0, p0 + chunk)
                emb = model(x, {k: v[sl] for k, v in head_masks.items()}, {k: v[sl] for k, v in neuron_masks.items()})
                if out is None:
                    out = torch.empty((P, N, emb.shape[-1]), dtype=torch.float32, device=dev)
                out[sl, i : i + x.shape[0]] = emb.float()
    return out
