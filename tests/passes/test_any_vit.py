"""Issue 14, "any ViT, round 2": the patterns that used to fail, end to end.

The zoo entries of each pattern (a hand-written model and a third-party one) go through
the generic zoo tests (exact structure, sliced == zero-masked, exact parameter drop). Here:
the sliced model of every one of them exports to ONNX and matches in onnxruntime; every
failure inside tracing, discovery and slicing is an ElasticFxError naming the model; and
attention left out on purpose says why, per block, in summary() and in the log.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import elastic_fx as efx
from elastic_fx.errors import DiscoveryError, ElasticFxError, SliceError, TracingError
from elastic_fx.passes import discover as discover_module
from elastic_fx.passes import slice as slice_module
from zoo import ZOO, HandViT, _HAND_CFG, output_tensors, params

#: pattern -> (hand-written, third-party ...) zoo entries
PATTERNS = {
    "1 per-head tables from a module or a table + index": ("hand_relpos_tables", "timm_vit_relpos", "hf_beit_relpos"),
    "2 per-head parameters": ("hand_per_head_params", "vitp_qk_norm"),
    "3 inner width != model width": ("hand_wide_inner", "vitp_vit_wide"),
    "4 RoPE from shapes, empty tensors": ("hand_rope_from_shapes", "hf_dinov3"),
    "5 fused attention + FFN projection": ("hand_parallel_block", "timm_vit_xp"),
    "6 windowed attention": ("hand_shifted_windows", "timm_swin", "torchvision_swin", "timm_hiera", "timm_sam"),
    "7 lifted constants (torch.export)": ("hand_cached_bias_export", "timm_tiny_vit"),
    "8 head-mixing attention": ("hand_talking_heads", "timm_cait", "vitp_deepvit"),
}
_ALL = sorted({n for names in PATTERNS.values() for n in names})
# ONNX: every fx-traced entry (TorchScript exporter, about a second each) and, for the
# torch.export-traced graphs, the hand-written one (dynamo exporter, several seconds). The other
# torch.export-traced entries export the same way (checked by hand; minutes in all on 2 cores),
# except hf_beit_relpos: see README, "Supported models".
_ONNX = sorted(n for n in _ALL if ZOO[n].tracer == "fx") + ["hand_cached_bias_export"]
_SLOW = {"hand_cached_bias_export"}


def _param(name: str):
    (p,) = [p for p in params() if p.values[0] == name]
    marks = list(p.marks) + ([pytest.mark.slow] if name in _SLOW else [])
    return pytest.param(name, id=name, marks=marks)


def half_keep(smap, seed):
    """A random half of every block's heads and neurons (at least one)."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for b in smap.blocks:
        entry = {}
        for kind, group in b.groups():
            entry[kind] = sorted(torch.randperm(group.size, generator=g)[: max(1, group.size // 2)].tolist())
        keep[b.index] = entry
    return keep


def test_every_pattern_has_a_hand_written_and_a_third_party_model():
    for pattern, names in PATTERNS.items():
        families = {ZOO[n].family for n in names}
        assert "hand" in families and families - {"hand"}, pattern


@pytest.mark.parametrize("name", [_param(n) for n in _ONNX])
def test_sliced_model_exports_to_onnx_and_matches(name, traced, tmp_path):
    _, inputs, gm, smap = traced(name)
    keep = half_keep(smap, seed=1)
    small = efx.slice(gm, smap, keep)
    removed = sum(p.numel() for p in gm.parameters()) - sum(p.numel() for p in small.parameters())
    assert removed == smap.total_params - smap.params(keep) > 0
    path = tmp_path / f"{name}.onnx"
    exporter = "torchscript" if ZOO[name].tracer == "fx" else "auto"
    report = efx.export_onnx(small, path, inputs[0], check_batch_sizes=(3,), exporter=exporter)
    assert report.max_abs_diff < 1e-3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(7))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = output_tensors(small(x))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


# ---------------------------------------------------------------------------- pattern 7: errors


class _Broken(nn.Module):
    def forward(self, x):
        return x @ torch.ones(5, 5)  # wrong width for the example images


def test_a_model_that_fails_on_its_inputs_is_a_tracing_error():
    with pytest.raises(TracingError, match=r"_Broken fails on the example inputs \[\(2, 3, 8, 8\)\].*example_inputs"):
        efx.trace(_Broken(), (torch.randn(2, 3, 8, 8),))


def _hand(name="hand_fused_chunk_swiglu"):
    torch.manual_seed(0)
    model = HandViT(**_HAND_CFG[name]).eval()
    return efx.trace(model, (torch.randn(2, 3, 32, 32),))


def test_an_analysis_crash_is_a_discovery_error_naming_the_model(monkeypatch):
    gm = _hand()

    def crash(self, n):
        raise KeyError("lifted_tensor_0")

    monkeypatch.setattr(discover_module.LabelInterpreter, "run_node", crash)
    with pytest.raises(DiscoveryError, match=r"discovery failed on HandViT: \w+Error: lifted_tensor_0.*register_leaf_module"):
        efx.discover(gm)


def test_a_slicing_crash_is_a_slice_error_naming_the_model(monkeypatch):
    gm = _hand()
    smap = efx.discover(gm)

    def crash(*args, **kwargs):
        raise RuntimeError("cannot reshape tensor of 0 elements")

    monkeypatch.setattr(slice_module, "_rewrite_nodes", crash)
    with pytest.raises(SliceError, match=r"slicing HandViT failed: RuntimeError: cannot reshape"):
        efx.slice(gm, smap, {0: {"heads": [0]}})
    assert issubclass(SliceError, ElasticFxError)


# ---------------------------------------------------------------------------- pattern 8: reasons


@pytest.mark.parametrize("name", [_param(n) for n in PATTERNS["8 head-mixing attention"]])
def test_head_mixing_attention_is_left_out_per_block_with_its_reason(name, traced):
    entry = ZOO[name]
    _, _, _, smap = traced(name)
    summary = smap.summary().splitlines()
    for i in entry.left_out:
        b = smap.blocks[i]
        assert b.attention is None and b.mlp is not None and b.mlp.prunable  # its FFN is still pruned
        assert "mixed across heads" in b.attention_reason and "not pruned" in b.attention_reason
        row = next(r for r in summary if r.split()[:1] == [str(i)])
        assert "[attention not pruned: the attention weights" in row
        assert smap.describe()[i]["attention_reason"] == b.attention_reason
    kept = [b for b in smap.blocks if b.index not in entry.left_out]
    assert all(b.attention is not None and b.attention_reason is None for b in kept)


def test_the_log_states_the_reason_per_block(caplog):
    torch.manual_seed(0)
    model = HandViT(**_HAND_CFG["hand_talking_heads"]).eval()
    gm = efx.trace(model, (torch.randn(2, 3, 32, 32),))
    with caplog.at_level(logging.INFO, logger="elastic_fx.passes.discover"):
        efx.discover(gm)
    lines = [r.getMessage() for r in caplog.records if "attention not pruned" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("block 0: attention not pruned: the attention weights")
    assert "linear at 'blocks_0_attn_mix_l'" in lines[0]


# ---------------------------------------------------------------------------- relpos variants


def _timm_relpos(**kw):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    from zoo import liven

    torch.manual_seed(0)
    model = liven(VisionTransformerRelPos(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                          mlp_ratio=2.0, num_classes=10, **kw)).eval()
    assert timm is not None
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _sliced_matches_zeroed(model, x):
    import copy

    from oracles import zero_structures

    gm = efx.trace(model, (x,))
    smap = efx.discover(gm)
    keep = half_keep(smap, seed=3)
    small = efx.slice(gm, smap, keep)
    ref = zero_structures(copy.deepcopy(gm), smap, keep)
    with torch.no_grad():
        got, want = output_tensors(small(x))[0], output_tensors(ref(x))[0]
    assert ((got - want).abs().max() / want.abs().max()) <= 1e-4
    removed = sum(p.numel() for p in gm.parameters()) - sum(p.numel() for p in small.parameters())
    assert removed == smap.total_params - smap.params(keep) > 0
    return smap


def test_a_per_head_table_padded_for_the_class_token_is_sliced():
    """timm's relpos ViT with a class token pads the MLP's [H, N, N] table to [H, N+1, N+1]."""
    smap = _sliced_matches_zeroed(*_timm_relpos(class_token=True, global_pool="token", rel_pos_type="mlp"))
    assert [b.attention.num_heads for b in smap.blocks] == [3, 3]
    assert all(any(".rel_pos.mlp.fc2." in s.name for s in b.attention.slices) for b in smap.blocks)


def test_a_per_head_table_shared_by_every_block_leaves_their_heads_out():
    """One relative-position MLP for all blocks (vit_srelpos): no block can drop its own heads."""
    smap = _sliced_matches_zeroed(*_timm_relpos(shared_rel_pos=True))
    assert [b.attention for b in smap.blocks] == [None, None]
    assert all("shares the per-head parameter 'shared_rel_pos.mlp.fc2" in b.attention_reason for b in smap.blocks)
    assert [b.mlp.hidden_features for b in smap.blocks] == [96, 96]
