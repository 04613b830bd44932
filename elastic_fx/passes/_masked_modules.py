"""The modules the masked graph calls: where per-pair keep-masks meet the tensors.

:mod:`.mask` rewrites a traced graph so that every tensor carries ``P * B`` samples (pair
``p``, image ``b`` at row ``p * B + b``) and inserts ``call_module`` nodes of these
modules. Each holds the masks of the current forward (``set_mask`` / ``clear``, called
by :class:`~elastic_fx.passes.mask.MaskedModel`) and refuses to run without them.

* :class:`_MaskSlot`: multiplies an out-projection's input by the pair's head or neuron
  mask, expanded over the columns each structure owns. Alone already exact.
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

from typing import Optional, Tuple

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
