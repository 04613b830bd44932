"""The masking pass: one batched forward scores many keep-masks, exactly as slicing would.

Central invariant: ``masked_embeddings(build_masked(gm, smap), images, keeps)[p]`` equals
the pooled embedding of ``efx.slice(gm, smap, keeps[p])`` on the same images.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import elastic_fx as efx
from elastic_fx.errors import DataError, SliceError
from elastic_fx.keep import keep_tensors, keeps_to_masks
from elastic_fx.passes import _masked_modules as modules_mod
from elastic_fx.passes.embedding import embedding_module
from elastic_fx.passes.mask import MaskedModel, build_masked
from elastic_fx.search.evaluate import masked_embeddings
from zoo import build, liven

IMAGES = 3
PAIRS = 4


# ----------------------------------------------------------------------------- models
def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2, num_classes=10)
    return liven(m).eval(), 32


def _hf_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                    image_size=32, patch_size=8)
    return liven(ViTModel(cfg)).eval(), 32


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=72)
    return liven(m).eval(), 32


def _zoo(name):
    def fn():
        model, inputs = build(name)
        return model, inputs[0].shape[-1]

    return fn


MODELS = {
    "timm_vit": _timm_vit,  # SDPA core
    "hf_vit": _hf_vit,  # torch.export graph, separate q/k/v, SDPA with a boolean mask
    "torchvision_vit": _torchvision_vit,  # nn.MultiheadAttention
    "timm_beit": _zoo("timm_beit"),  # SDPA with a per-head relative position bias
    "timm_eva02": _zoo("timm_eva02"),  # SwiGLU FFN, rotary embeddings
    "hand_separate_qkv": _zoo("hand_separate_qkv"),  # explicit softmax(q @ kᵀ * s) @ v chain
    "hf_clip_vision": _zoo("hf_clip_vision"),  # explicit chain in an export graph (softmax -> to -> dropout)
    "timm_siglip_map": _zoo("timm_siglip_map"),  # attention pooling: one latent query, all tokens as keys
    # issue 14
    "timm_swin": _zoo("timm_swin"),  # windows folded into the batch, shifted-window masks on the logits
    "timm_hiera": _zoo("timm_hiera"),  # heads beside a windows axis (5-d q): left dense, masked at out-proj
    "hand_per_head_params": _zoo("hand_per_head_params"),  # per-head q/k scales, temperatures, scalars
    "hand_parallel_block": _zoo("hand_parallel_block"),  # one in-projection for attention and FFN
    "timm_cait": _zoo("timm_cait"),  # talking-heads blocks left out, class attention masked
    "timm_sam": _zoo("timm_sam"),  # heads folded into the batch: cores left dense, masked at out-proj
}

_CACHE: dict = {}


def _traced(name):
    """(gm, smap, images) per model, built once per test session."""
    if name not in _CACHE:
        model, size = MODELS[name]()
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        gm = efx.trace(model, (example,))
        smap = efx.discover(gm)
        images = torch.randn(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(2))
        _CACHE[name] = (gm, smap, images)
    return _CACHE[name]


def _random_keeps(smap, pairs, seed=0):
    """Per block, a random non-empty subset of heads and of neurons."""
    g = torch.Generator().manual_seed(seed)
    keeps = []
    for _ in range(pairs):
        keep = {}
        for b in smap.blocks:
            entry = {}
            for kind, size in (("heads", b.attention.num_heads if b.attention else 0),
                               ("neurons", b.mlp.hidden_features if b.mlp is not None and b.mlp.prunable else 0)):
                if size:
                    n = int(torch.randint(1, size + 1, (), generator=g))
                    entry[kind] = torch.randperm(size, generator=g)[:n].tolist()
            keep[b.index] = entry
        keeps.append(keep)
    return keeps


def _sliced_embedding(gm, smap, keep, images):
    """The reference: the physically sliced graph, cut at its embedding node."""
    with torch.no_grad():
        return embedding_module(efx.slice(gm, smap, keep), smap)(images)


def _assert_rel_close(got, want, rel=1e-5):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel} x {scale:.3g}"


# ----------------------------------------------------------------------------- the invariant
@pytest.mark.parametrize("name", list(MODELS))
def test_masked_pairs_equal_sliced_models(name):
    gm, smap, images = _traced(name)
    keeps = _random_keeps(smap, PAIRS, seed=list(MODELS).index(name))
    model = build_masked(gm, smap)
    got = masked_embeddings(model, images, keeps, batch_size=2, pair_chunk=3)
    assert got.shape[:2] == (PAIRS, IMAGES) and got.dtype == torch.float32
    for p, keep in enumerate(keeps):
        _assert_rel_close(got[p], _sliced_embedding(gm, smap, keep, images))
    # the pairs really differ: the masks matter
    assert (got[0] - got[1]).abs().max() > 1e-3 * got.abs().max()


@pytest.mark.parametrize("name", list(MODELS))
def test_keep_all_equals_dense_model(name):
    gm, smap, images = _traced(name)
    want = embedding_module(gm, smap)(images).detach()
    for use_kernel in (True, False):
        got = masked_embeddings(build_masked(gm, smap, use_kernel=use_kernel), images, [{}, {}])
        _assert_rel_close(got[0], want)
        _assert_rel_close(got[1], want)


def test_keep_all_equals_timm_pre_logits():
    """An extraction independent of ours: timm's own pooled pre-logits features."""
    model, size = _timm_vit()
    gm = efx.trace(model, (torch.randn(2, 3, size, size),))
    smap = efx.discover(gm)
    images = torch.randn(IMAGES, 3, size, size)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(images), pre_logits=True)
    _assert_rel_close(masked_embeddings(build_masked(gm, smap), images, [{}])[0], want)


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "timm_beit", "hand_separate_qkv", "torchvision_vit"])
def test_dense_attention_variant_is_exact_too(name):
    """use_kernel=False, gather=False: every head and neuron computed, masked at the out-projection only."""
    gm, smap, images = _traced(name)
    keeps = _random_keeps(smap, 2, seed=7)
    got = masked_embeddings(build_masked(gm, smap, use_kernel=False, gather=False), images, keeps)
    for p, keep in enumerate(keeps):
        _assert_rel_close(got[p], _sliced_embedding(gm, smap, keep, images))


def _flops(fn) -> int:
    """FLOPs by torch.utils.flop_counter (matmuls, convolutions, and the CPU SDPA it has no formula for)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit"])
def test_masked_forward_executes_only_the_kept_flops(name):
    """Executed FLOPs of one batched forward of P pairs <= 1.15x those of the P sliced models
    (the projections per pair on the kept heads and neurons, attention on the kept heads)."""
    gm, smap, images = _traced(name)
    keeps = _random_keeps(smap, PAIRS, seed=5)
    sliced = 0
    for keep in keeps:
        small = embedding_module(efx.slice(gm, smap, keep), smap)
        sliced += _flops(lambda: small(images))
    ratio = {}
    for gather in (True, False):
        model = build_masked(gm, smap, gather=gather)
        ratio[gather] = _flops(lambda: masked_embeddings(model, images, keeps, batch_size=IMAGES,
                                                         pair_chunk=PAIRS)) / sliced
    assert 0.999 <= ratio[True] <= 1.15, ratio
    assert ratio[False] > 1.2, ratio  # full-width projections: what the gathering saves


# ----------------------------------------------------------------------------- what the pass rewrote
@pytest.mark.parametrize(
    "name", ["timm_vit", "hf_vit", "timm_beit", "timm_eva02", "hand_separate_qkv", "hf_clip_vision", "timm_siglip_map"]
)
def test_every_attention_core_is_replaced(name):
    gm, smap, _ = _traced(name)
    model = build_masked(gm, smap)
    code = model.graph_module.code
    for b in smap.blocks:
        assert f"efx_attention_{b.index}" in code
        # projections computed per pair on the kept heads / neurons; no mask slot needed then
        assert f"efx_gather_heads_{b.index}_" in code and f"efx_mask_heads_{b.index}" not in code
        if b.mlp is not None and b.mlp.prunable:  # a plain FFN whole, a packed SwiGLU projection by projection
            assert f"efx_ffn_{b.index}" in code or f"efx_gather_neurons_{b.index}_" in code
    names = [n.name for n in model.graph_module.graph.nodes]
    assert not any("softmax" in n for n in names), "the replaced softmax chains must be gone"
    model.graph_module.graph.lint()
    dense = build_masked(gm, smap, use_kernel=False, gather=False).graph_module.code
    assert "efx_attention_" not in dense and "efx_mask_heads_0" in dense and "efx_gather_" not in dense


def test_multihead_attention_is_decomposed():
    gm, smap, _ = _traced("torchvision_vit")
    model = build_masked(gm, smap)
    mods = [m for m in model.modules() if isinstance(m, modules_mod._MaskedMHA)]
    assert len(mods) == len(smap.blocks)


def test_attention_kernel_receives_the_pair_head_masks(monkeypatch):
    gm, smap, images = _traced("timm_vit")
    keeps = _random_keeps(smap, 3, seed=3)
    heads, _ = keeps_to_masks(smap, keeps)
    seen = []
    real = modules_mod.masked_attention

    def spy(q, k, v, head_keep, **kw):
        seen.append((tuple(q.shape), head_keep.clone()))
        out = real(q, k, v, head_keep, **kw)
        assert out.transpose(1, 2)[~head_keep].abs().max() == 0  # masked (pair, head): exact zeros
        return out

    monkeypatch.setattr(modules_mod, "masked_attention", spy)
    masked_embeddings(build_masked(gm, smap), images, keeps, batch_size=IMAGES)
    assert len(seen) == len(smap.blocks)
    for (shape, keep), b in zip(seen, smap.blocks):
        assert shape[:3] == (3, IMAGES, b.attention.num_heads)
        assert torch.equal(keep, heads[b.index])


def _kernel_device(interpreted: bool, has_cuda: bool):
    """Where the Triton kernel can run in this process: CUDA natively, the CPU under the
    interpreter (which then refuses CUDA tensors), else nowhere (None)."""
    if interpreted:
        return torch.device("cpu")
    return torch.device("cuda") if has_cuda else None


def test_kernel_device_never_sends_cpu_tensors_to_a_compiled_kernel(monkeypatch):
    """On a GPU machine (no interpreter) the kernel test runs on CUDA tensors: forcing Triton
    on CPU tensors there raises ValueError, which is how this test used to fail."""
    from elastic_fx.kernels import _dispatch

    assert _kernel_device(interpreted=False, has_cuda=True) == torch.device("cuda")
    assert _kernel_device(interpreted=True, has_cuda=False) == torch.device("cpu")
    assert _kernel_device(interpreted=False, has_cuda=False) is None
    monkeypatch.setattr(_dispatch, "_INTERPRETED", False)
    monkeypatch.setenv("ELASTIC_FX_FORCE_TRITON", "1")
    with pytest.raises(ValueError, match="interpreter"):
        _dispatch.use_triton(torch.device("cpu"), "auto", op="masked_attention")


def test_triton_kernel_path_matches_slicing(monkeypatch):
    """The Triton kernel (interpreted on the CPU, native on a GPU) inside the masked forward of a very tiny ViT."""
    from timm.models.vision_transformer import VisionTransformer

    kernel_mod = importlib.import_module("elastic_fx.kernels.masked_attention")  # the package re-exports the function
    dev = _kernel_device(kernel_mod._INTERPRETED, torch.cuda.is_available())
    if dev is None:
        pytest.skip("Triton needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")
    torch.manual_seed(0)
    model = liven(VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                    mlp_ratio=2, num_classes=4)).eval()
    gm = efx.trace(model, (torch.randn(2, 3, 16, 16),))
    smap = efx.discover(gm)
    images = torch.randn(1, 3, 16, 16)
    keeps = [{0: {"heads": [1], "neurons": list(range(0, 32, 2))}}, {0: {"heads": [0, 1], "neurons": [3]}}]

    def no_reference(*a, **k):
        raise AssertionError("the PyTorch reference ran instead of the Triton kernel")

    decisions = []
    real_use_triton = kernel_mod._use_triton

    def use_triton(device, backend):
        decisions.append(real_use_triton(device, backend))
        return decisions[-1]

    if dev.type == "cpu":
        monkeypatch.setenv("ELASTIC_FX_FORCE_TRITON", "1")
    monkeypatch.setattr(kernel_mod, "masked_attention_ref", no_reference)
    monkeypatch.setattr(kernel_mod, "_use_triton", use_triton)
    # fp32 everywhere (not the bf16 default of CUDA): the comparison is with an fp32 sliced model
    got = masked_embeddings(build_masked(gm, smap, use_kernel=True), images.to(dev), keeps, device=dev,
                            dtype=torch.float32).cpu()
    assert decisions == [True]  # one block, one forward: the kernel ran
    for p, keep in enumerate(keeps):
        _assert_rel_close(got[p], _sliced_embedding(gm, smap, keep, images))


# ----------------------------------------------------------------------------- batching and chunking
def test_chunking_and_direct_forward_agree():
    gm, smap, images = _traced("timm_beit")
    keeps = _random_keeps(smap, 5, seed=11)
    model = build_masked(gm, smap)
    a = masked_embeddings(model, images, keeps, batch_size=1, pair_chunk=1)
    b = masked_embeddings(model, images, keeps, batch_size=IMAGES, pair_chunk=5)
    heads, neurons = keeps_to_masks(smap, keeps)
    with torch.no_grad():
        c = model(images, heads, neurons)
    assert c.shape == a.shape
    _assert_rel_close(a, b)
    _assert_rel_close(c, b)


def test_missing_blocks_in_mask_dicts_are_kept_whole():
    gm, smap, images = _traced("timm_vit")
    model = build_masked(gm, smap)
    keep = {0: {"heads": [2]}}
    heads, neurons = keeps_to_masks(smap, [keep])
    with torch.no_grad():
        got = model(images, {0: heads[0]}, {})  # block 1 and all neurons: not given
    _assert_rel_close(got[0], _sliced_embedding(gm, smap, keep, images))


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_weights_run_on_every_family_and_cast_back_exactly(name):
    """The search's GPU default, on the CPU: the masked model's own bf16 copy (export graphs
    bake casts to fp32 into the graph: they follow the cast), then fp32 again, bit for bit."""
    gm, smap, images = _traced(name)
    keeps = _random_keeps(smap, 2, seed=9)
    model = build_masked(gm, smap)
    full = masked_embeddings(model, images, keeps)
    half = masked_embeddings(model, images, keeps, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and half.dtype == torch.float32
    _assert_rel_close(half, full, rel=5e-2)
    assert torch.equal(masked_embeddings(model, images, keeps, dtype=torch.float32), full)
    assert all(p.dtype == torch.float32 for p in gm.parameters())


def test_source_graph_is_untouched():
    gm, smap, images = _traced("hf_vit")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    with torch.no_grad():
        out_before = gm(images)[0].clone()
    masked_embeddings(build_masked(gm, smap), images, _random_keeps(smap, 2))
    assert gm.code == code
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(gm(images)[0], out_before)


# ----------------------------------------------------------------------------- masked attention with a bias
def test_masked_attention_with_bias_matches_per_pair_attention():
    """Cores with a logit bias (not taken by the kernel): per pair, SDPA with the bias, masked heads zero."""
    g = torch.Generator().manual_seed(0)
    P, B, H, N, M, d = 3, 2, 4, 5, 6, 8
    q, k, v = (torch.randn(P, B, H, n, d, generator=g) for n in (N, M, M))
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    bias = torch.randn(1, 1, H, N, M, generator=g).expand(P, 1, H, N, M)  # shared by samples
    got = modules_mod._attend(q, k, v, keep, mask5=bias, scale=0.3, is_causal=False)
    for p in range(P):
        want = F.scaled_dot_product_attention(q[p], k[p], v[p], attn_mask=bias[p], scale=0.3)
        want = want * keep[p].view(1, H, 1, 1)
        torch.testing.assert_close(got[p], want, rtol=1e-5, atol=1e-6)
    assert got.transpose(1, 2)[~keep].abs().max() == 0


# ----------------------------------------------------------------------------- masks and errors
def test_keeps_to_masks_stacks_and_validates():
    _, smap, _ = _traced("timm_vit")
    assert keeps_to_masks is keep_tensors  # the old name of the keep vocabulary's conversion
    heads, neurons = keep_tensors(smap, [{0: {"heads": [0, 2]}}, {1: {"neurons": [5]}}])
    assert heads[0].tolist() == [[True, False, True], [True, True, True]]
    assert neurons[1][1].sum() == 1 and neurons[1][1, 5] and neurons[1][0].all()
    assert set(heads) == {0, 1} and heads[1].dtype == torch.bool
    with pytest.raises(SliceError, match="keep 1"):
        keeps_to_masks(smap, [{}, {0: {"heads": [7]}}])
    with pytest.raises(SliceError, match="sequence of keep dicts"):
        keeps_to_masks(smap, {0: {"heads": [0]}})


def test_forward_rejects_bad_masks():
    gm, smap, images = _traced("timm_vit")
    model = build_masked(gm, smap)
    with pytest.raises(SliceError, match="bool tensor"):
        model(images, {0: torch.ones(2, 3)}, {})
    with pytest.raises(SliceError, match=r"\[pairs=2, heads=3\]"):
        model(images, {0: torch.ones(2, 4, dtype=torch.bool)}, {})
    with pytest.raises(SliceError, match="blocks \\[5\\]"):
        model(images, {5: torch.ones(2, 3, dtype=torch.bool)}, {})
    with pytest.raises(SliceError, match="disagree"):
        model(images, {0: torch.ones(2, 3, dtype=torch.bool)}, {0: torch.ones(3, 96, dtype=torch.bool)})
    with pytest.raises(DataError, match=r"\[B, 3, H, W\]"):
        model(images[0], {}, {})
    with pytest.raises(SliceError, match="GraphModule"):
        MaskedModel(torch.nn.Linear(2, 2), smap)
