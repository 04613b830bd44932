"""The slicing invariant on every model of the zoo.

The sliced model computes exactly what the dense model computes with the removed
structures zeroed at their output projection; its parameter count drops by exactly the
removed structures' parameters; a keep-everything mask changes nothing.
"""

import copy

import pytest
import torch

import elastic_fx as efx
from elastic_fx.passes.slice import SliceResult, slice_pass
from oracles import zero_structures
from zoo import output_tensors, params


def random_keep(smap, seed, fraction=0.5):
    """Heterogeneous per-block widths: a random subset of heads and neurons in every block."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for b in smap.blocks:
        entry = {}
        if b.attention is not None:
            n = b.attention.num_heads
            k = max(1, int(n * fraction) - b.index % 2)  # blocks end with different head counts
            entry["heads"] = sorted(torch.randperm(n, generator=g)[:k].tolist())
        if b.mlp is not None and b.mlp.prunable:
            n = b.mlp.hidden_features
            k = max(1, int(n * fraction * (0.5 + 0.4 * b.index)) % n or 1)
            entry["neurons"] = sorted(torch.randperm(n, generator=g)[:k].tolist())
        keep[b.index] = entry
    return keep


def outputs(module, x):
    with torch.no_grad():
        return output_tensors(module(x))


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = w.abs().max().clamp_min(1e-6)
        assert ((g - w).abs().max() / scale) <= 1e-4


@pytest.mark.parametrize("name", params())
def test_sliced_equals_masked_dense(name, traced):
    model, inputs, gm, smap = traced(name)
    keep = random_keep(smap, seed=0)
    small = efx.slice(gm, smap, keep)
    small.graph.lint()
    reference = zero_structures(copy.deepcopy(gm), smap, keep)
    x = torch.randn(3, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(5))  # another batch size
    assert_same(outputs(small, x), outputs(reference, x))
    removed = sum(p.numel() for p in gm.parameters()) - sum(p.numel() for p in small.parameters())
    assert removed == smap.total_params - smap.params(keep)
    assert removed > 0


@pytest.mark.parametrize("name", params())
def test_keep_everything_is_a_no_op(name, traced):
    _, inputs, gm, smap = traced(name)
    small = efx.slice(gm, smap, {})
    assert sum(p.numel() for p in small.parameters()) == smap.total_params
    assert_same(outputs(small, inputs[0]), outputs(gm, inputs[0]))


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "torchvision_vit", "timm_beit", "hand_fused_chunk_swiglu"])
def test_slicing_leaves_input_untouched_and_rediscovers(name, traced):
    _, inputs, gm, smap = traced(name)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    keep = random_keep(smap, seed=1)
    small = efx.slice(gm, smap, keep)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = efx.discover(small)  # discover on an already-sliced graph still works
    for b, b2 in zip(smap.blocks, again.blocks):
        if b.attention is not None:
            assert b2.attention.num_heads == len(keep[b.index]["heads"])
            assert b2.attention.head_dim == b.attention.head_dim
        if b.mlp is not None and b.mlp.prunable:
            assert b2.mlp.hidden_features == len(keep[b.index]["neurons"])


def test_sliced_tensors_are_contiguous_and_smaller(traced):
    _, _, gm, smap = traced("timm_vit")
    small = efx.slice(gm, smap, {0: {"heads": [0, 2], "neurons": [0, 5, 7]}})
    qkv = small.get_submodule("blocks.0.attn.qkv")
    assert qkv.weight.shape[0] == 3 * 2 * 16 and qkv.out_features == qkv.weight.shape[0]
    assert qkv.weight.is_contiguous()
    fc1, fc2 = small.get_submodule("blocks.0.mlp.fc1"), small.get_submodule("blocks.0.mlp.fc2")
    assert fc1.weight.shape[0] == 3 and fc2.weight.shape[1] == 3 and fc2.in_features == 3
    # nothing in block 1 changed
    assert small.get_submodule("blocks.1.attn.qkv").weight.shape == gm.get_submodule("blocks.1.attn.qkv").weight.shape
    # the saved model is really smaller
    assert sum(t.numel() for t in small.state_dict().values()) < sum(t.numel() for t in gm.state_dict().values())


def test_nested_budgets_slice_consistently(traced):
    _, inputs, gm, smap = traced("timm_deit3")
    heads = {b.index: torch.rand(b.attention.num_heads, generator=torch.Generator().manual_seed(b.index)) for b in smap.blocks}
    neurons = {b.index: torch.rand(b.mlp.hidden_features, generator=torch.Generator().manual_seed(9 + b.index)) for b in smap.blocks}
    params_left = []
    for s in (0.2, 0.4, 0.6):
        keep = efx.budget_masks(smap, heads, neurons, sparsity=s)
        small = efx.slice(gm, smap, keep)
        params_left.append(sum(p.numel() for p in small.parameters()))
        assert params_left[-1] == smap.params(keep)
        assert_same(outputs(small, inputs[0]), outputs(zero_structures(copy.deepcopy(gm), smap, keep), inputs[0]))
    assert params_left == sorted(params_left, reverse=True)


@pytest.mark.parametrize(
    "keep, match",
    [
        ({7: {"heads": [0]}}, "block 7"),
        ({0: {"heads": [0, 3]}}, r"block 0: heads indices \[3\] out of range"),
        ({0: {"heads": [1, 1]}}, r"block 0: duplicate heads indices \[1\]"),
        ({0: {"neurons": [-1]}}, "out of range"),
        ({0: {"heads": []}}, "removes every head"),
        ({1: {"neurons": []}}, "removes every neuron"),
        ({0: {"rows": [0]}}, "unknown keys"),
    ],
)
def test_bad_keep_masks_name_the_block(keep, match, traced):
    _, _, gm, smap = traced("timm_vit")
    with pytest.raises(efx.SliceError, match=match):
        efx.slice(gm, smap, keep)
    assert issubclass(efx.SliceError, efx.ElasticFxError)


def test_not_prunable_ffn_must_be_kept_whole(traced):
    _, _, gm, smap = traced("hand_normed_ffn")
    assert smap.blocks[0].mlp.prunable is False
    with pytest.raises(efx.SliceError, match="not prunable"):
        efx.slice(gm, smap, {0: {"neurons": [0, 1]}})


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "torchvision_vit", "hand_fused_chunk_swiglu"])
def test_slice_result_records_what_changed(name, traced):
    """The record slice_pass returns matches the module it returns."""
    _, inputs, gm, smap = traced(name)
    keep = random_keep(smap, seed=2)
    result = slice_pass(gm, smap, keep)
    assert isinstance(result, SliceResult)
    small = result.module
    new_state = dict(small.named_parameters()) | dict(small.named_buffers())
    old_state = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert result.sliced_params
    for pname, (old, new) in result.sliced_params.items():
        assert tuple(old_state[pname].shape) == old and tuple(new_state[pname].shape) == new
        assert old != new
    # every tensor not in the record kept its shape
    for pname, t in new_state.items():
        if pname not in result.sliced_params and pname in old_state:
            assert t.shape == old_state[pname].shape, pname
    params = dict(gm.named_parameters())
    removed = sum(params[n].numel() - torch.Size(new).numel()
                  for n, (_, new) in result.sliced_params.items() if n in params)
    assert removed == smap.total_params - smap.params(keep)
    nodes = {n.name: n for n in small.graph.nodes}
    for node_name, (old_args, new_args) in result.rewritten_nodes.items():
        assert nodes[node_name].args == new_args and old_args != new_args
    mha = [b.attention.core for b in smap.blocks if b.attention is not None and b.attention.kind == "mha"]
    assert sorted(result.replaced_modules) == sorted(mha)
    for target in result.replaced_modules:
        assert type(small.get_submodule(target)).__name__ == "SlicedMultiheadAttention"
    if name == "timm_vit":
        assert result.rewritten_nodes  # timm reshapes with constant head counts and widths
    assert_same(outputs(efx.slice(gm, smap, keep), inputs[0]), outputs(small, inputs[0]))


def test_a_sliced_multihead_attention_slices_again():
    """nn.MultiheadAttention -> SlicedMultiheadAttention -> fewer heads still."""
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    from zoo import liven

    torch.manual_seed(0)
    model = liven(VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                    mlp_dim=40, num_classes=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    gm = efx.trace(model, (x,))
    smap = efx.discover(gm)
    small = efx.slice(gm, smap, {0: {"heads": [0, 2, 3]}, 1: {"heads": [1, 2]}})
    again = efx.discover(small)
    assert [b.attention.num_heads for b in again.blocks] == [3, 2]
    smaller = efx.slice(small, again, {0: {"heads": [1]}, 1: {"heads": [0]}})  # original heads 2 and 1
    reference = zero_structures(copy.deepcopy(gm), smap, {0: {"heads": [2]}, 1: {"heads": [1]}})
    assert_same(outputs(smaller, x), outputs(reference, x))
    assert [smaller.get_submodule(b.attention.core).num_heads for b in again.blocks] == [1, 1]
