"""The modules the masked graph calls: where per-pair keep-masks meet the tensors.

:mod:`.mask` rewrites a traced graph so that every tensor carries ``P * B`` samples (pair
``p``, image ``b`` at row ``p * B + b``) and inserts ``call_module`` nodes of these
modules. Each holds the masks of the current forward (``set_mask`` / ``clear``, called
by :class:`~elastic_fx.passes.mask.MaskedModel`) and refuses to run without them.

* :class:`_MaskSlot`: multiplies an out-projection's input by the pair's head or neuron
  mask, expanded over the columns each structure owns. Alone already exact.
* :class:`_GatheredLinear`: a group's in- or out-projection computed per pair on the
  kept rows or columns only (the FLOP saving of the projections).
* :class:`_MaskedAttention`: replaces one attention core by masked attention on
  ``[P, B, H, N, d]`` views (:func:`_attend`).
* :class:`_MaskedMHA`: ``nn.MultiheadAttention`` (or a sliced one) computed step by step
  (:func:`~._mha.mha_forward`) with the same masked attention, head outputs masked.

The attention math itself lives in :mod:`elastic_fx.kernels.masked_attention` (the
launcher; the Triton kernel on CUDA, its PyTorch reference elsewhere). Cores it does not
take (an additive or boolean mask, a causal flag, a value width unlike the key width)
run dense ``scaled_dot_product_attention`` and zero the masked heads' outputs.

Touches only the tensors passed in; the modules own no parameters (``_MaskedMHA``
shares the wrapped module's).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SliceError
from ..kernels.masked_attention import masked_attention
from ._mha import mha_forward


# ============================================================================ attention
def _pair_view(t: torch.Tensor, P: int, lead: Tuple[int, ...], axis: int, heads: int) -> torch.Tensor:
    """View a mask broadcastable to ``[*lead, H, N, M]`` as ``[P, B' or 1, H, N, M]``.

    ``lead`` are the batch-like dims of q (their product is ``P * B'``) and ``axis`` the
    one that holds the pairs. A mask shared by all samples keeps a batch dim of 1.
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
    """Masked attention on ``[P, B, H, N, d]`` with bool ``keep [P, H]``.

    Returns ``[P, B, H, N, dv]`` in q's dtype, exactly zero where ``keep`` is False. The
    masked-attention launcher where it applies; otherwise dense SDPA (``mask5``:
    ``[P, B or 1, H, N, M]``, boolean or additive), masked heads zeroed.
    """
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
    P, _, H = q5.shape[:3]
    out = F.scaled_dot_product_attention(q5, k5, v5, attn_mask=mask5, scale=scale, is_causal=is_causal)
    return out.to(q5.dtype).masked_fill(~keep.view(P, 1, H, 1, 1), 0)


# ============================================================================ modules
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


class _GatheredLinear(nn.Module):
    """One linear layer of a group, computed per pair on the kept structures only.

    ``mode="rows"`` (an in-projection: q/k/v, fc1, gate): pair ``p`` computes only the
    output features owned by its kept structures (and those no structure owns) with the
    gathered rows of the weight and bias. ``mode="cols"`` (an out-projection): pair ``p``
    multiplies only the input columns of its kept structures by the gathered weight
    columns. A removed structure thus costs no FLOPs in the projections; what it leaves
    behind reaches nothing but its own out-projection columns (discovery's grouping
    guarantees it), which ``cols`` drops: the same numbers as the physically sliced model.

    Layout of the features between the two (``packed``):

    * ``False``: in place. ``rows`` writes the kept features at their own positions and
      zeros elsewhere, ``cols`` gathers them back. Needed where positions matter in between
      (q/k/v reshaped into heads). Features owned in runs (a head's ``head_dim``
      consecutive rows) are moved run by run.
    * ``True``: front-packed, for a plain FFN (only elementwise ops between fc1 and fc2):
      ``rows`` writes pair ``p``'s ``k_p`` kept features to the first ``k_p`` positions
      (the tail is zero), ``cols`` reads that prefix as a view. No scatter, no gather.

    Per pair, one GEMM of ``B * tokens`` rows: large enough on a GPU, without padding pairs
    to a common width. The kept positions are computed on the host from the host copy of the
    masks (no device sync) and moved to the device in one copy per forward.

    ``forward(x[, bias])``: ``x`` carries ``P * B`` samples on ``batch_axis`` (pair-major);
    ``bias`` is given when the graph computes it (e.g. BEiT's ``cat(q_bias, 0, v_bias)``).
    """

    def __init__(self, kind: str, block: int, mode: str, owner: torch.Tensor, size: int, batch_axis: int,
                 weight: nn.Parameter, bias: Optional[torch.Tensor], bias_is_input: bool, packed: bool = False) -> None:
        super().__init__()
        self.kind, self.block, self.mode, self.size, self.batch_axis = kind, block, mode, size, batch_axis
        self.packed = packed
        self.weight = weight  # shared with the model (the same Parameter object)
        if bias is None or isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.register_buffer("bias", bias, persistent=False)
        self.bias_is_input = bias_is_input
        # -1 (owned by no structure) -> index `size` of the mask padded with one True column; kept
        # on the host, where the kept positions are computed (not a buffer: .to(device) leaves it)
        self.owner_host = torch.where(owner < 0, size, owner).long().cpu()
        self.run = _run_length(self.owner_host) if not packed else 1
        # per pair: (kept positions, kept runs) on the device, or None when the pair keeps everything
        self.index: Optional[list] = None

    def positions(self, host: torch.Tensor) -> Tuple[List[bool], List[torch.Tensor]]:
        """From the host masks ``[P, S]``: which pairs keep everything, and for the others their
        kept positions then their kept runs (host int64 tensors; :meth:`bind` takes them moved)."""
        full, pos = _kept_positions(host, self.owner_host)
        return full, pos + [p[:: self.run] // self.run for p in pos]

    def bind(self, full: List[bool], tensors: List[torch.Tensor]) -> None:
        n = len(tensors) // 2
        it = iter(zip(tensors[:n], tensors[n:]))
        self.index = [None if f else next(it) for f in full]

    def clear(self) -> None:
        self.index = None

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError("MaskedModel: a gathered linear ran without a mask; call MaskedModel.forward")
        w = self.weight
        b = bias if self.bias_is_input else self.bias
        ax = self.batch_axis % x.dim()
        xs = x.unflatten(ax, (len(self.index), -1))
        r = self.run
        if self.mode == "rows":
            out = None
            for p, idx in enumerate(self.index):
                xp = xs.select(ax, p)
                if idx is None:
                    y = F.linear(xp, w, b)
                else:
                    pos, runs = idx
                    y = F.linear(xp, w.index_select(0, pos), None if b is None else b.index_select(0, pos))
                if out is None:
                    out = y.new_empty(xs.shape[:-1] + (w.shape[0],))
                op = out.select(ax, p)
                if idx is None:
                    op.copy_(y)
                elif self.packed:  # kept features first, zeros after
                    op[..., : y.shape[-1]].copy_(y)
                    op[..., y.shape[-1]:].zero_()
                else:  # in place, run by run
                    op.zero_()
                    op.unflatten(-1, (-1, r)).index_copy_(-2, runs, y.unflatten(-1, (-1, r)))
        else:
            ys = []
            for p, idx in enumerate(self.index):
                xp = xs.select(ax, p)
                if idx is None:
                    ys.append(F.linear(xp, w, b))
                    continue
                pos, runs = idx
                if self.packed:
                    xk = xp[..., : pos.numel()]
                else:
                    xk = xp.unflatten(-1, (-1, r)).index_select(-2, runs).flatten(-2)
                ys.append(F.linear(xk, w.index_select(1, pos), b))
            out = torch.stack(ys, ax)
        return out.flatten(ax, ax + 1)

    def extra_repr(self) -> str:
        return (f"{self.kind}, block={self.block}, mode={self.mode}, packed={self.packed}, run={self.run}, "
                f"weight={tuple(self.weight.shape)}, batch_axis={self.batch_axis}")


class _GatheredFFN(nn.Module):
    """A whole FFN (in-projections -> elementwise ops -> out-projection), per pair on its kept neurons.

    Pair ``p`` computes ``k_p`` hidden features: its in-projections with the kept weight rows,
    the FFN's own elementwise ops (``segment``: the graph nodes between the projections,
    activations and gating, replayed unchanged), and its out-projection with the same kept
    weight columns. No hidden feature of a removed neuron is computed, stored or read; each
    pair's GEMMs have ``B * tokens`` rows. Exact: a plain FFN's neuron ``j`` owns row ``j``
    of every in-projection and column ``j`` of the out-projection, so the kept rows and
    columns line up (the pass checks the owner maps agree) as they do in the sliced model.

    ``forward(*inputs)``: the in-projections' inputs (one per distinct node), each with the
    ``P * B`` samples on ``batch_axis``; returns the out-projection's output.
    """

    def __init__(self, block: int, owner: torch.Tensor, size: int, batch_axis: int, in_weights: list,
                 in_biases: list, in_inputs: list, out_weight: nn.Parameter, out_bias: Optional[torch.Tensor],
                 segment: nn.Module) -> None:
        super().__init__()
        self.block, self.size, self.batch_axis = block, size, batch_axis
        self.in_weights = nn.ParameterList(in_weights)  # shared with the model
        for i, b in enumerate(in_biases):  # Parameters (shared) or None
            if b is not None:
                self.register_parameter(f"in_bias_{i}", b)
        self.in_inputs = list(in_inputs)  # which forward input each in-projection reads
        self.out_weight = out_weight
        self.out_bias = out_bias
        self.segment = segment
        self.owner_host = torch.where(owner < 0, size, owner).long().cpu()
        self.index: Optional[list] = None  # per pair: kept hidden positions on the device, or None (all)

    def positions(self, host: torch.Tensor) -> Tuple[List[bool], List[torch.Tensor]]:
        """From the host masks ``[P, S]``: which pairs keep everything, the others' kept neurons."""
        return _kept_positions(host, self.owner_host)

    def bind(self, full: List[bool], tensors: List[torch.Tensor]) -> None:
        it = iter(tensors)
        self.index = [None if f else next(it) for f in full]

    def clear(self) -> None:
        self.index = None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError("MaskedModel: a gathered FFN ran without a mask; call MaskedModel.forward")
        ax = self.batch_axis
        xs = [x.unflatten(ax % x.dim(), (len(self.index), -1)) for x in inputs]
        ys = []
        for p, pos in enumerate(self.index):
            hidden = []
            for j, (w, i) in enumerate(zip(self.in_weights, self.in_inputs)):
                b = getattr(self, f"in_bias_{j}", None)
                xp = xs[i].select(ax % xs[i].dim(), p)
                if pos is None:
                    hidden.append(F.linear(xp, w, b))
                else:
                    hidden.append(F.linear(xp, w.index_select(0, pos), None if b is None else b.index_select(0, pos)))
            h = self.segment(*hidden)
            w2 = self.out_weight if pos is None else self.out_weight.index_select(1, pos)
            ys.append(F.linear(h, w2, self.out_bias))
        out = torch.stack(ys, ax % (ys[0].dim() + 1))
        return out.flatten(ax % out.dim(), ax % out.dim() + 1)

    def extra_repr(self) -> str:
        return f"block={self.block}, neurons={self.size}, in_projections={len(self.in_weights)}"


def _kept_positions(host: torch.Tensor, owner: torch.Tensor) -> Tuple[List[bool], List[torch.Tensor]]:
    """Per pair of the host masks ``[P, S]``: keeps everything? and, for the others, the sorted
    positions whose owner (``S``: owned by none) is kept."""
    padded = torch.cat([host, host.new_ones((host.shape[0], 1))], dim=1)
    kept = padded[:, owner]  # [P, width]
    full = kept.all(1).tolist()
    return full, [k.nonzero().squeeze(1) for k, f in zip(kept, full) if not f]


def bind_positions(mods: List[nn.Module], hosts: List[torch.Tensor], device: torch.device) -> None:
    """Give every gathered module its pairs' kept positions on ``device``, moved in ONE copy.

    ``hosts[i]``: the host masks of ``mods[i]``'s block. Masks that are on a device are read
    back together in one copy: one sync per forward, avoided when the masks come from the
    host, as they do in the search.
    """
    away = {id(h): h for h in hosts if h.device.type != "cpu"}
    if away:
        back = torch.cat([h.reshape(-1) for h in away.values()]).cpu().split([h.numel() for h in away.values()])
        on_host = {key: flat.view(h.shape) for (key, h), flat in zip(away.items(), back)}
        hosts = [on_host.get(id(h), h) for h in hosts]
    plans = [m.positions(h) for m, h in zip(mods, hosts)]
    tensors = [t for _, ts in plans for t in ts]
    if tensors and device.type != "cpu":
        flat = torch.cat(tensors)
        flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
        tensors = list(flat.split([t.numel() for t in tensors]))
    it = iter(tensors)
    for m, (full, ts) in zip(mods, plans):
        m.bind(full, [next(it) for _ in ts])


def _run_length(owner: torch.Tensor) -> int:
    """The longest ``r`` dividing the width such that every aligned run of ``r`` positions has one owner."""
    n = owner.numel()
    for r in sorted({d for d in range(1, n + 1) if n % d == 0}, reverse=True):
        blocks = owner.view(-1, r)
        if bool((blocks == blocks[:, :1]).all()):
            return r
    return 1


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

    Shares the wrapped module's parameters. The decomposition is :func:`~._mha.mha_forward`;
    the attention step is :func:`_attend` (or dense SDPA when ``use_kernel`` is False),
    then the head outputs are multiplied by the mask. Returns ``(output, None)``.
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

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.mask is None:
            raise RuntimeError("MaskedModel: an attention module ran without a mask; call MaskedModel.forward")
        out = mha_forward(self.mha, query, key, value, self._heads, key_padding_mask=key_padding_mask,
                          attn_mask=attn_mask, is_causal=is_causal)
        return out, None

    def _heads(self, q, k, v, bias, is_causal):
        """Attention of ``[P*B, H, n, hd]`` heads, masked per pair."""
        keep = self.mask
        P = keep.shape[0]
        PB, H, N, hd = q.shape
        if self.use_kernel:
            q5, k5, v5 = (t.reshape(P, -1, H, t.shape[-2], hd) for t in (q, k, v))
            mask5 = None if bias is None else _pair_view(bias, P, (PB,), 0, H)
            o = _attend(q5, k5, v5, keep, mask5=mask5, scale=None, is_causal=is_causal).reshape(PB, H, N, hd)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal)
        heads = keep.to(o.dtype).view(P, 1, H, 1, 1)
        return (o.view(P, -1, H, N, hd) * heads).view(PB, H, N, hd)

    def extra_repr(self) -> str:
        return f"block={self.block}, use_kernel={self.use_kernel}"
