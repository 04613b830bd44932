"""Attention cores of a traced graph: found one way, for every pass.

An *attention core* is where ``softmax(q kᵀ) v`` happens, with the heads on axis -3 of
its output ``[..., H, N, d]``. Three forms are recognised:

* a ``scaled_dot_product_attention`` call (fx or ``aten``), arguments bound by name;
* an explicit chain ``softmax(f(q @ kᵀ)) -> g(...) @ v`` where ``f`` and ``g`` are
  pointwise ops (scaling, a bias or mask added to the logits, dropout, casts); anything
  added to the logits is recorded as an *extra* (a relative position bias is per head);
* an ``nn.MultiheadAttention`` leaf (or its sliced form), laid out by :mod:`._mha`.

:func:`find_cores` and :func:`find_mha_nodes` are what discovery, slicing and the
masking pass use to find them. :func:`plain_attention` answers the masking pass's
question about a core it found: is it a plain scaled-dot-product attention (scalar
scale, no dropout in training mode, probabilities used once) that a masked-attention
call can replace, and with which q, k, v, mask, scale and causal flag?

Takes a GraphModule; returns descriptions of its nodes. Touches nothing.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch.fx as fx

from ._labels import ADD_LIKE, INDEX_OPS, MUL_LIKE, SDPA_OPS, SOFTMAX_OPS, UNARY_POINTWISE, data_nodes, op_name
from ._mha import MHA_TYPES, SlicedMultiheadAttention, mha_forward, mha_head_rows

__all__ = [
    "AttentionCore", "CoreCall", "MHA_TYPES", "SlicedMultiheadAttention", "find_cores", "find_mha_nodes", "find_unresolved",
    "mha_forward", "mha_head_rows", "plain_attention",
]

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MATMUL_OPS = {"matmul", "bmm"}
# pointwise ops an explicit chain may have between q @ kᵀ, softmax and @ v
_CHAIN_OPS = UNARY_POINTWISE | MUL_LIKE | ADD_LIKE | {"identity"}
# ops allowed between softmax and the ``@ v`` of a replaceable core: no-ops at inference
_PROB_PASSTHROUGH = {"identity", "dropout", "to", "type_as", "_to_copy", "float", "contiguous", "clone"}
_SCALE_OPS = {"mul", "rmul", "div", "truediv"}
# reshapes of the logits between q @ kᵀ and softmax: shifted-window attention views them
# as [B, windows, H, N, N] to add the shift mask, and back
_LOGIT_VIEWS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "contiguous"}


@dataclass
class AttentionCore:
    """One attention core: where its q, k, v come from and what surrounds it."""

    node: fx.Node  # output [..., H, N, d]: the SDPA call, or the ``probs @ v`` matmul
    q: Any  # fx.Node, or whatever the call got
    k: Any  # kᵀ when k_transposed (explicit chains multiply q @ kᵀ)
    v: Any
    k_transposed: bool
    kind: str  # "sdpa" | "explicit"
    extras: List[fx.Node] = field(default_factory=list)  # tensors added to the logits (SDPA: its attn_mask)
    # explicit chains only
    softmax: Optional[fx.Node] = None
    logits: Optional[fx.Node] = None  # the q @ kᵀ matmul
    pre: List[fx.Node] = field(default_factory=list)  # logits -> softmax ops, nearest the softmax first
    post: List[fx.Node] = field(default_factory=list)  # softmax -> core ops, nearest the softmax first


@dataclass
class CoreCall:
    """A core as one plain attention call ``softmax(q kᵀ * scale + mask) v``."""

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: Optional[fx.Node] = None
    scale: Optional[float] = None
    is_causal: bool = False
    k_transposed: bool = False
    # explicit cores: the nodes dead once the core is replaced, users before producers
    chain: List[fx.Node] = field(default_factory=list)


# ----------------------------------------------------------------------------- finding
def _bind_sdpa(node: fx.Node) -> dict:
    bound = dict(zip(SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


def find_cores(gm: fx.GraphModule) -> List[AttentionCore]:
    """Every SDPA call and explicit softmax chain of ``gm``, in graph order."""
    cores = []
    data = None
    for n in gm.graph.nodes:
        name = op_name(gm, n)
        if name in SDPA_OPS:
            bound = _bind_sdpa(n)
            mask = bound.get("attn_mask")
            extras = [mask] if isinstance(mask, fx.Node) else []
            q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
            cores.append(AttentionCore(n, q, k, v, False, "sdpa", extras))
        elif name in SOFTMAX_OPS:
            if data is None:
                data = data_nodes(gm)
            core = _explicit_core(gm, n, data)
            if core is not None:
                cores.append(core)
    return cores


def _explicit_core(gm: fx.GraphModule, softmax: fx.Node, data: set) -> Optional[AttentionCore]:
    """softmax(f(q @ kᵀ)) -> g(...) @ v, with f, g chains of pointwise ops.

    ``f`` follows the operand computed from the inputs (``data``); tensors added to the
    logits, or multiplying them (a per-head temperature), are the core's extras.
    """
    extras: List[fx.Node] = []
    pre: List[fx.Node] = []
    x = softmax.args[0] if softmax.args else None
    while isinstance(x, fx.Node) and (op_name(gm, x) in _CHAIN_OPS or op_name(gm, x) in _LOGIT_VIEWS):
        ins = list(x.all_input_nodes)
        if op_name(gm, x) in _LOGIT_VIEWS:  # the other inputs are sizes read from shapes
            ins = [x.args[0]] if x.args and isinstance(x.args[0], fx.Node) else []
        if not ins:
            return None
        if op_name(gm, x) in ADD_LIKE | MUL_LIKE and len(ins) > 1:
            on_data = [a for a in ins if a in data]
            if on_data and on_data[0] is not ins[0]:  # the logits are the second operand
                ins = [on_data[0]] + [a for a in ins if a is not on_data[0]]
            extras.extend(ins[1:])
        pre.append(x)
        x = ins[0]
    if not (isinstance(x, fx.Node) and op_name(gm, x) in _MATMUL_OPS and len(x.args) >= 2):
        return None
    logits = x
    y, post = softmax, []
    while True:
        users = [u for u in y.users if not op_name(gm, u).startswith("_assert")]  # export's metadata checks
        if len(users) != 1:
            return None
        u = users[0]
        if op_name(gm, u) in _MATMUL_OPS and u.args[0] is y:
            return AttentionCore(u, logits.args[0], logits.args[1], u.args[1], True, "explicit", extras,
                                 softmax=softmax, logits=logits, pre=pre, post=post)
        if op_name(gm, u) not in _CHAIN_OPS:
            return None
        post.append(u)
        y = u


def find_mha_nodes(gm: fx.GraphModule) -> List[fx.Node]:
    """``call_module`` nodes of ``nn.MultiheadAttention`` (or sliced) leaves, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MHA_TYPES)]


# ----------------------------------------------------------------------------- attention we leave out
_CONTRACTIONS = _MATMUL_OPS | {"einsum"}
_PASS_THROUGH = _CHAIN_OPS | INDEX_OPS
_WALK = 12  # nodes searched on either side of a softmax
# ops that combine values across an axis: between q kᵀ and @ v they mix the heads
_MIXING_OPS = {"linear", "einsum", "matmul", "bmm", "layer_norm", "conv1d", "conv2d", "convolution"}


def find_unresolved(gm: fx.GraphModule, cores: List[AttentionCore]) -> List[Tuple[fx.Node, str]]:
    """Softmaxes between two data contractions (``q kᵀ`` ... ``@ v``) that are no core, and why.

    These are attention operations whose heads cannot be pruned one by one: most often the
    attention weights are mixed across heads between the two contractions (talking-heads
    attention projects the logits and the probabilities over heads, re-attention multiplies
    them by a heads x heads matrix), or the contractions are written in a form the core
    finder does not read (``einsum``). Returns ``(softmax node, reason)`` in graph order.
    """
    used = {c.softmax for c in cores if c.softmax is not None}
    data = data_nodes(gm)
    out = []
    for n in gm.graph.nodes:
        if op_name(gm, n) not in SOFTMAX_OPS or n in used or not n.all_input_nodes:
            continue
        mixing: List[fx.Node] = []
        x, logits = n.all_input_nodes[0], None
        for _ in range(_WALK):  # back to q kᵀ along the data path
            if _is_contraction(gm, x, data):
                logits = x
                break
            if op_name(gm, x) not in _PASS_THROUGH:
                mixing.append(x)
            ins = [a for a in x.all_input_nodes if a in data]
            if not ins:
                break
            x = ins[0]
        y, reduce = n, None
        for _ in range(_WALK):  # forward to probabilities @ v
            users = [u for u in y.users if not op_name(gm, u).startswith("_assert")]
            hits = [u for u in users if _is_contraction(gm, u, data)]
            if hits:  # the weights may be returned as well (need_weights=True)
                reduce = hits[0]
                break
            if len(users) != 1:
                break
            y = users[0]
            if op_name(gm, y) not in _PASS_THROUGH:
                mixing.append(y)
        if logits is None or reduce is None:
            continue
        mixers = [m for m in mixing if op_name(gm, m) in _MIXING_OPS]
        if mixers:
            where = ", ".join(f"{op_name(gm, m)} at '{m.name}'" for m in mixers[:3])
            reason = (f"the attention weights at softmax '{n.name}' are mixed across heads ({where}), as in "
                      "talking-heads attention or re-attention: its heads are not independent and are not pruned")
        elif mixing:
            where = ", ".join(f"{op_name(gm, m)} at '{m.name}'" for m in mixing[:3])
            reason = (f"the attention at softmax '{n.name}' passes through {where}, which discovery cannot follow; "
                      "its heads are not pruned")
        elif _rank(n) == 3:
            reason = (f"the attention at softmax '{n.name}' folds its heads into the batch axis ([batch * heads, "
                      "N, M], as a decomposed nn.MultiheadAttention or SAM's windowed attention does); its heads "
                      "are not pruned")
        else:
            reason = (f"the attention at softmax '{n.name}' is computed with {op_name(gm, logits)} and "
                      f"{op_name(gm, reduce)} in a form whose heads cannot be read; its heads are not pruned")
        out.append((n, reason))
    return out


def _rank(n: fx.Node) -> Optional[int]:
    """The rank of ``n``'s value when the tracer recorded it (torch.export does), else None."""
    val = n.meta.get("val", n.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return len(shape) if shape is not None else None


def _is_contraction(gm: fx.GraphModule, n: fx.Node, data: set) -> bool:
    if op_name(gm, n) not in _CONTRACTIONS:
        return False
    return sum(1 for a in n.all_input_nodes if a in data) >= 2


# ----------------------------------------------------------------------------- plain attention
def _number(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else None


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


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


def plain_attention(gm: fx.GraphModule, core: AttentionCore, rank: int) -> Tuple[Optional[CoreCall], str]:
    """``core`` as one plain attention call, or ``(None, why not)``.

    ``rank`` is the rank of the core's output (the softmax must run over its last dim).
    Users are counted on the graph as it is: erase export's metadata asserts first.
    """
    if core.kind == "sdpa":
        return _plain_sdpa(core.node)
    return _plain_explicit(gm, core, rank)


def _plain_sdpa(node: fx.Node) -> Tuple[Optional[CoreCall], str]:
    bound = _bind_sdpa(node)
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
    return CoreCall(node, bound["query"], bound["key"], bound["value"], mask, _number(scale), causal), ""


def _plain_explicit(gm: fx.GraphModule, core: AttentionCore, rank: int) -> Tuple[Optional[CoreCall], str]:
    """``softmax(q @ kᵀ * s) [-> dropout/casts] @ v`` with scalar scalings only."""
    node = core.node
    if op_name(gm, node) != "matmul" or len(node.args) < 2:
        return None, "the core is not a matmul"
    chain: List[fx.Node] = []
    inputs = [core.softmax] + core.post  # inputs[i] feeds post[i]
    for i in reversed(range(len(core.post))):  # from the core back to the softmax
        x = core.post[i]
        if op_name(gm, x) not in _PROB_PASSTHROUGH:
            return None, "no softmax feeding the core"
        chain.append(x)
        if op_name(gm, x) == "dropout" and _dropout_active(x):
            return None, "dropout in training mode"
        if _single_user(x) is None or not x.args or not isinstance(x.args[0], fx.Node):
            return None, "attention probabilities used elsewhere"
        if x.args[0] is not inputs[i]:
            return None, "no softmax feeding the core"
    softmax = core.softmax
    if _single_user(softmax) is None:
        return None, "no softmax feeding the core"
    dim = _softmax_dim(gm, softmax)
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return None, f"softmax over dim {dim}"
    chain.append(softmax)
    scale = 1.0
    for x in core.pre:  # from the softmax back to q @ kᵀ
        if op_name(gm, x) not in _SCALE_OPS or _single_user(x) is None:
            return None, "the logits are not a plain q @ kᵀ (a bias or mask is added)"
        a, b = (list(x.args) + [None, None])[:2]
        name = op_name(gm, x)
        chain.append(x)
        if isinstance(a, fx.Node) and _number(b) is not None:
            scale = scale * _number(b) if name in ("mul", "rmul") else scale / _number(b)
        elif isinstance(b, fx.Node) and _number(a) is not None and name in ("mul", "rmul"):
            scale = scale * _number(a)
        else:
            return None, "the logits are scaled by a tensor"
    logits = core.logits
    if op_name(gm, logits) != "matmul" or _single_user(logits) is None:
        return None, "the logits are not a plain q @ kᵀ (a bias or mask is added)"
    chain.append(logits)
    q, kt, v = logits.args[0], logits.args[1], node.args[1]
    if not (isinstance(q, fx.Node) and isinstance(kt, fx.Node) and isinstance(v, fx.Node)):
        return None, "q, k or v is not a graph value"
    return CoreCall(node, q, kt, v, None, scale, False, k_transposed=True, chain=chain), ""
