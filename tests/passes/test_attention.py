"""Attention cores found one way (passes._attention), and nn.MultiheadAttention written out once (passes._mha)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elastic_fx as efx
from elastic_fx.passes._attention import SlicedMultiheadAttention, find_cores, find_mha_nodes, plain_attention
from elastic_fx.passes._labels import op_name


# ----------------------------------------------------------------------------- nn.MultiheadAttention
def _mha(batch_first, bias=True):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(24, 4, batch_first=batch_first, bias=bias).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _inputs(batch_first, B=2, N=5, M=7, E=24):
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(B, N, E, generator=g), torch.randn(B, M, E, generator=g)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    return q, kv


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding", "both"])
def test_sliced_mha_keeping_every_head_equals_pytorchs(batch_first, masks):
    m = _mha(batch_first)
    q, kv = _inputs(batch_first)
    N, M = 5, 7
    g = torch.Generator().manual_seed(2)
    kw = {}
    if masks in ("bool", "both"):
        kw["attn_mask"] = torch.rand(N, M, generator=g) > 0.7  # True = do not attend
        kw["attn_mask"][:, 0] = False
    if masks == "float":
        kw["attn_mask"] = torch.randn(N, M, generator=g)
    if masks in ("padding", "both"):
        kw["key_padding_mask"] = torch.tensor([[False] * M, [False] * (M - 2) + [True] * 2])
    want, _ = m(q, kv, kv, need_weights=False, **kw)
    got, weights = SlicedMultiheadAttention(m, range(4))(q, kv, kv, **kw)
    assert weights is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sliced_mha_equals_pytorchs_with_removed_heads_zeroed():
    m = _mha(True)
    q, kv = _inputs(True)
    keep = [0, 3]
    sliced = SlicedMultiheadAttention(m, keep)
    assert sliced.num_heads == 2 and sliced.in_proj_weight.shape == (3 * 2 * 6, 24)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for h in (1, 2):
            ref.out_proj.weight[:, h * 6:(h + 1) * 6] = 0
    torch.testing.assert_close(sliced(q, kv, kv)[0], ref(q, kv, kv, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(efx.SliceError, match="need_weights"):
        sliced(q, kv, kv, need_weights=True)


def test_multihead_attention_is_recognised_by_type():
    class Lookalike(nn.Module):  # same name, not the type: no longer taken for attention
        def forward(self, x):
            return x

    Lookalike.__name__ = "SlicedMultiheadAttention"

    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.torch_mha = _mha(True)
            self.sliced = _mha(True)
            self.lookalike = nn.Identity()

        def forward(self, x):
            a = self.torch_mha(x, x, x)[0]
            b = self.sliced(a, a, a)[0]
            return self.lookalike(b)

    gm = efx.trace(Owner().eval(), (torch.randn(2, 5, 24),))
    gm.sliced = SlicedMultiheadAttention(gm.sliced, [1, 2])  # what slicing does to a leaf
    gm.lookalike = Lookalike()
    kinds = {n.target: op_name(gm, n) for n in gm.graph.nodes if n.op == "call_module"}
    assert kinds == {"torch_mha": "multihead_attention", "sliced": "multihead_attention",
                     "lookalike": "module:SlicedMultiheadAttention"}
    assert [n.target for n in find_mha_nodes(gm)] == ["torch_mha", "sliced"]


# ----------------------------------------------------------------------------- cores
class _Explicit(nn.Module):
    """softmax(q @ kᵀ * s [+ bias]) @ v over [B, H, N, d]."""

    def __init__(self, bias: bool):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.bias = nn.Parameter(torch.randn(2, 4, 4)) if bias else None

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q @ k.transpose(-2, -1)) * 0.25
        if self.bias is not None:
            logits = logits + self.bias
        o = logits.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, 16))


def test_explicit_chain_is_found_and_described():
    gm = efx.trace(_Explicit(bias=False).eval(), (torch.randn(2, 4, 16),))
    (core,) = find_cores(gm)
    assert core.kind == "explicit" and core.k_transposed and not core.extras
    assert op_name(gm, core.softmax) == "softmax" and op_name(gm, core.logits) == "matmul"
    call, why = plain_attention(gm, core, rank=4)
    assert why == "" and call.scale == pytest.approx(0.25) and call.attn_mask is None
    assert call.chain[-1] is core.logits and core.softmax in call.chain  # erased after replacement, users first
    x = torch.randn(2, 4, 16)
    q, k, v = gm.qkv(x).reshape(2, 4, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v, scale=call.scale)
    torch.testing.assert_close((q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v, want)


def test_a_bias_on_the_logits_is_an_extra_not_a_plain_call():
    gm = efx.trace(_Explicit(bias=True).eval(), (torch.randn(2, 4, 16),))
    (core,) = find_cores(gm)
    assert [e.target for e in core.extras] == ["bias"]
    call, why = plain_attention(gm, core, rank=4)
    assert call is None and "a bias or mask is added" in why
    smap = efx.discover(gm)  # discovery slices the per-head bias with the heads
    assert smap.blocks[0].attention.extras == ("bias",)


@pytest.mark.parametrize("name, kind, masked", [("timm_vit", "sdpa", False), ("timm_beit", "sdpa", True),
                                                ("hand_separate_qkv", "explicit", False)])
def test_discovered_cores_are_the_found_cores(name, kind, masked, traced):
    _, _, gm, smap = traced(name)
    cores = {c.node.name: c for c in find_cores(gm)}
    for b in smap.blocks:
        core = cores[b.attention.core]
        assert core.kind == kind
        call, why = plain_attention(gm, core, rank=4)
        assert call is not None, why
        assert (call.attn_mask is not None) == masked
