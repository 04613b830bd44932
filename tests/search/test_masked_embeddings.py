"""masked_embeddings in bf16: the masked model's own bf16 weights, no autocast, float32 out.

On a GPU the search scores candidates with the masked model cast to bf16 (the default
there); here the same path is forced on the CPU with ``dtype=torch.bfloat16``.
"""

import pytest
import torch

from elastic_fx._precision import compute_dtype
from elastic_fx.errors import ConfigError
from elastic_fx.passes.mask import build_masked
from elastic_fx.search.evaluate import masked_embeddings

#: bf16 keeps 8 bits of mantissa: a two-block ViT's embeddings move by ~1 % of their scale.
BF16_REL = 5e-2


def _keeps(smap, pairs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    keeps = []
    for _ in range(pairs):
        keep = {}
        for b in smap.blocks:
            h, f = b.attention.num_heads, b.mlp.hidden_features
            keep[b.index] = {"heads": torch.randperm(h, generator=g)[: 1 + h // 2].tolist(),
                             "neurons": torch.randperm(f, generator=g)[: 1 + f // 2].tolist()}
        keeps.append(keep)
    return keeps


def _rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", ["timm_vit", "hf_clip_vision"])  # fx graph; export graph with a baked fp32 cast
def test_bf16_runs_in_bf16_weights_without_autocast(traced, name):
    _, inputs, gm, smap = traced(name)
    images = torch.randn(4, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(3))
    keeps = _keeps(smap)
    source = {k: v.clone() for k, v in gm.state_dict().items()}
    model = build_masked(gm, smap)
    seen = []

    def hook(module, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype,
                     {p.dtype for p in module.parameters() if p.is_floating_point()}, out.dtype))

    model.graph_module.register_forward_hook(hook)
    full = masked_embeddings(model, images, keeps, dtype=torch.float32)
    half = masked_embeddings(model, images, keeps, dtype=torch.bfloat16)
    assert seen[0] == (False, torch.float32, {torch.float32}, torch.float32)
    assert seen[-1] == (False, torch.bfloat16, {torch.bfloat16}, torch.bfloat16)
    assert half.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert 0 < _rel_err(half, full) < BF16_REL  # rounded (so really bf16), and close
    # the source graph keeps its fp32 weights, untouched
    assert all(v.dtype == source[k].dtype and torch.equal(v, source[k]) for k, v in gm.state_dict().items())


def test_casting_back_gives_the_exact_fp32_weights(traced):
    _, inputs, gm, smap = traced("timm_vit")
    images = torch.randn(2, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(4))
    keeps = _keeps(smap, 2, seed=1)
    model = build_masked(gm, smap)
    first = masked_embeddings(model, images, keeps)  # the CPU default: fp32
    assert model.dtype == torch.float32
    masked_embeddings(model, images, keeps, dtype=torch.bfloat16)
    again = masked_embeddings(model, images, keeps, dtype=torch.float32)
    assert torch.equal(first, again)
    assert model._built is None  # back on the build-time tensors: no second copy kept


def test_amp_dtype_is_the_former_name_of_dtype(traced):
    _, inputs, gm, smap = traced("timm_vit")
    images = torch.randn(2, *inputs[0].shape[1:])
    model = build_masked(gm, smap)
    a = masked_embeddings(model, images, [{}], amp_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert torch.equal(a, masked_embeddings(model, images, [{}], dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="former name"):
        masked_embeddings(model, images, [{}], dtype=torch.float32, amp_dtype=torch.bfloat16)


def test_the_default_dtype_is_bf16_on_cuda_and_fp32_elsewhere():
    assert compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("cuda") == torch.bfloat16
    assert compute_dtype("cpu") == torch.float32
    assert compute_dtype("meta") == torch.float32
    assert compute_dtype("cuda", torch.float32) == torch.float32  # asked for: full precision
    with pytest.raises(ConfigError, match="torch.bfloat16"):
        compute_dtype("cpu", torch.int8)
