"""embedding_module: the traced graph cut at the pooled embedding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import elastic_fx as efx
from elastic_fx.passes.embedding import embedding_module
from elastic_fx.errors import DiscoveryError
from zoo import ZOO


@pytest.fixture(scope="module")
def timm_vit():
    model, inputs = ZOO["timm_vit"].build()
    gm = efx.trace(model, inputs)
    return model, gm, efx.discover(gm), inputs[0]


def test_timm_embedding_is_the_pre_logits_feature(timm_vit):
    model, gm, smap, x = timm_vit
    emb = embedding_module(gm, smap)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        got = emb(x)
    assert got.shape == (2, 48)
    torch.testing.assert_close(got, want)
    assert not any("head" == n.target for n in emb.graph.nodes if n.op == "call_module")  # classifier cut off
    emb.graph.lint()
    assert emb.meta["elastic_fx.example_inputs"] is gm.meta["elastic_fx.example_inputs"]


def test_embedding_shares_the_models_parameters(timm_vit):
    model, gm, smap, x = timm_vit
    emb = embedding_module(gm, smap)
    assert emb.get_parameter("blocks.0.attn.qkv.weight") is model.blocks[0].attn.qkv.weight
    emb(x).sum().backward()
    assert model.blocks[1].mlp.fc2.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_a_token_node_is_reduced_to_the_class_token(timm_vit):
    model, gm, smap, x = timm_vit
    final_norm = [n.name for n in gm.graph.nodes if n.name.startswith("layer_norm")][-1]  # [B, N, D]
    emb = embedding_module(gm, dataclasses.replace(smap, embedding=final_norm))
    with torch.no_grad():
        torch.testing.assert_close(emb(x), model.forward_features(x)[:, 0])


def test_missing_or_unknown_embedding_is_an_instructive_error(timm_vit):
    _, gm, smap, _ = timm_vit
    with pytest.raises(DiscoveryError, match="no pooled embedding"):
        embedding_module(gm, dataclasses.replace(smap, embedding=None))
    with pytest.raises(DiscoveryError, match="no such node"):
        embedding_module(gm, dataclasses.replace(smap, embedding="not_a_node"))


def test_hf_vit_embedding_is_the_normed_cls_token():
    pytest.importorskip("transformers")
    model, inputs = ZOO["hf_vit"].build()
    gm = efx.trace(model, inputs)  # torch.export graph
    emb = embedding_module(gm, efx.discover(gm))
    x = torch.randn(3, 3, 32, 32)  # another batch size than traced
    with torch.no_grad():
        want = model(x).last_hidden_state[:, 0]  # after ViTModel's final layernorm
        got = emb(x)
    torch.testing.assert_close(got, want)
    emb.eval()  # a plain GraphModule: eval() works although export modules refuse it
