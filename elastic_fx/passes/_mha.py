"""``nn.MultiheadAttention``, written out once: its head layout, its forward, its sliced form.

PyTorch's module is a leaf of the traced graph, so the passes cannot see inside it.
Three of them need to: discovery (which rows and columns a head owns), slicing (a module
with fewer heads) and the masked forward (attention with per-pair head masks). They all
use what is here:

* :func:`mha_head_rows`: the in-projection rows and out-projection columns of each head;
* :func:`mha_forward`: the module's computation step by step (in-projection, additive
  logit bias from ``attn_mask`` / ``key_padding_mask``, attention, out-projection), with
  the attention step passed in;
* :class:`SlicedMultiheadAttention`: the module with an inner width of its own
  (PyTorch's ties it to ``embed_dim``), which :data:`MHA_TYPES` lets the op classifier
  of :mod:`._labels` recognise by type.

This is the bottom of :mod:`elastic_fx.passes`: it imports only torch and
:mod:`elastic_fx.errors`. It touches no graph.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SliceError

#: ``attend(q, k, v, bias, is_causal) -> o``: q ``[B, H, N, hd]``, k/v ``[B, H, M, hd]``,
#: bias additive (``[1, 1, N, M]``, ``[B, H, N, M]`` or ``[B, 1, 1, M]``) or None; o ``[B, H, N, hd]``.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], bool], torch.Tensor]


def mha_head_rows(num_heads: int, head_dim: int, inner: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(per_head [H, hd], qkv_rows [H, 3 hd])``: head ``h``'s positions in the inner width,
    and its q, k and v rows of a packed ``[3 * inner, E]`` in-projection."""
    per_head = torch.arange(num_heads).view(num_heads, 1) * head_dim + torch.arange(head_dim)
    qkv_rows = torch.cat([per_head + i * inner for i in range(3)], dim=1)
    return per_head, qkv_rows


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # PyTorch MHA: True = do NOT attend
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_forward(
    m: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attend: Attend,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """The output of ``m`` (an ``nn.MultiheadAttention`` or a :class:`SlicedMultiheadAttention`),
    computed step by step with ``attend`` as the attention core (see :data:`Attend`)."""
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    B, N, _ = query.shape
    M = key.shape[1]
    H = m.num_heads
    hd = getattr(m, "head_dim", m.embed_dim // H)
    inner = H * hd
    if getattr(m, "_qkv_same_embed_dim", True):
        w_q, w_k, w_v = m.in_proj_weight.split(inner)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b_q, b_k, b_v = m.in_proj_bias.split(inner) if m.in_proj_bias is not None else (None,) * 3
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    q, k, v = (t.view(B, -1, H, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, n, hd]
    bias = None
    if attn_mask is not None:
        am = _additive(attn_mask, q.dtype)
        bias = am.view(1, 1, N, M) if am.dim() == 2 else am.view(B, H, N, M)
    if key_padding_mask is not None:
        kp = _additive(key_padding_mask, q.dtype).view(B, 1, 1, M)
        bias = kp if bias is None else bias + kp
    o = attend(q, k, v, bias, is_causal)
    out = m.out_proj(o.transpose(1, 2).reshape(B, N, inner))
    return out if m.batch_first else out.transpose(0, 1)


def _dense_attend(q, k, v, bias, is_causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal)


class SlicedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with an inner width ``num_heads * head_dim`` of its own.

    Same call signature and return value (``(output, None)``: attention weights are not
    computed); attribute names mirror PyTorch's so discovery reads it the same way.
    """

    def __init__(self, mha: nn.Module, keep: Sequence[int]) -> None:
        """Keep heads ``keep`` of ``mha`` (an ``nn.MultiheadAttention`` or one sliced before)."""
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise SliceError(
                "slicing nn.MultiheadAttention supports a packed in-projection without bias_k/bias_v "
                "or add_zero_attn; this module uses one of those"
            )
        E, H = mha.embed_dim, mha.num_heads
        hd = getattr(mha, "head_dim", E // H)
        width = H * hd  # == E for PyTorch's module, smaller for one sliced before
        keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
        per_head = mha_head_rows(H, hd, width)[0][keep_t].reshape(-1)  # kept columns of the inner width
        rows = torch.cat([per_head + i * width for i in range(3)])
        self.embed_dim = E
        self.num_heads = len(keep_t)
        self.head_dim = hd
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self._qkv_same_embed_dim = True
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.in_proj_weight = nn.Parameter(mha.in_proj_weight.detach()[rows].clone())
        self.in_proj_bias = (
            nn.Parameter(mha.in_proj_bias.detach()[rows].clone()) if mha.in_proj_bias is not None else None
        )
        inner = self.num_heads * hd
        self.out_proj = nn.Linear(inner, E, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.out_proj.weight.copy_(mha.out_proj.weight[:, per_head])
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            raise SliceError("a sliced MultiheadAttention does not return attention weights (need_weights=True)")
        out = mha_forward(self, query, key, value, _dense_attend, key_padding_mask=key_padding_mask,
                          attn_mask=attn_mask, is_causal=is_causal)
        return out, None


#: Module types the graph passes treat as one multi-head attention operation.
MHA_TYPES = (nn.MultiheadAttention, SlicedMultiheadAttention)
