"""Local scores: the gradient pass, per-batch / per-sample modes, LocalScores files.

Every score is compared with a naive reference written in plain PyTorch: per-parameter
gradients from ``torch.autograd.grad``, squared, and summed per structure by
``index_select`` along the structure's dimension, one structure at a time.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import elastic_fx as efx
from elastic_fx.data import PreprocessConfig
from elastic_fx.errors import ConfigError, NumericalError, ScoresError
from elastic_fx.scoring import dino as dino_mod
from elastic_fx.scoring.dino import DinoConfig, MultiCropSampler, dino_loss
from elastic_fx.scoring.local import LocalScores, local_scores
from zoo import ZOO
from oracles import per_structure_sum

PRE = PreprocessConfig((32, 32), (0.5, 0.4, 0.3), (0.25, 0.25, 0.25))
SMALL_DINO = DinoConfig(n_global=2, n_local=2)


@pytest.fixture(scope="module")
def traced():
    """name -> (eager model, traced GraphModule, StructureMap), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = ZOO[name].build()
            gm = efx.trace(model, inputs)
            cache[name] = (model, gm, efx.discover(gm))
        return cache[name]

    return get


def _images(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _uint8(n, size=40, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _output_loss(model, x):
    out = model(x)
    return out.square().mean() + out[:, 0].mean()


def _naive(smap, params, grad_steps):
    """Σ over steps of Σ over each structure's entries of grad², one structure at a time."""
    squares = {n: sum(g[n].double().square() for g in grad_steps) for n in grad_steps[0]}
    return per_structure_sum(smap, squares)


def _grads_of(loss, params):
    names = list(params)
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))


def _scored(gm, smap):
    return {s.name: gm.get_parameter(s.name) for b in smap.blocks for _, g in b.groups() for s in g.slices
            if not s.buffer}


def _assert_scores(ls, ref, rtol=2e-5, atol=1e-12):
    heads, neurons = ref
    assert sorted(ls.head_scores) == sorted(heads) and sorted(ls.neuron_scores) == sorted(neurons)
    for b in heads:
        torch.testing.assert_close(ls.head_scores[b], heads[b], rtol=rtol, atol=atol)
    for b in neurons:
        torch.testing.assert_close(ls.neuron_scores[b], neurons[b], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- per-batch


@pytest.mark.parametrize(
    "name", ["timm_vit", "hand_separate_qkv", "torchvision_vit", "hand_fused_chunk_swiglu", "timm_beit"],
    ids=["fused_qkv", "separate_qkv", "mha", "gated_ffn", "buffer_bias_and_table"],
)
def test_per_batch_scores_equal_the_naive_reference(traced, name):
    _, gm, smap = traced(name)
    x = _images(5)
    ls = local_scores(gm, x, loss_fn=_output_loss, batch_size=2, progress=False)
    params = _scored(gm, smap)
    steps = [_grads_of(_output_loss(gm, x[i:i + 2]), params) for i in range(0, 5, 2)]  # 2 + 2 + 1 images
    _assert_scores(ls, _naive(smap, params, steps))
    assert ls.method == "custom" and ls.mode == "per-batch" and ls.num_images == 5
    assert ls.fingerprint == smap.fingerprint()


def test_an_eager_module_scores_follow_the_timm_layout_written_by_hand(traced):
    # Independent of discovery's slices: head h of a timm block owns rows h*hd:(h+1)*hd of each
    # of q, k, v in qkv (weight and bias) and the same columns of proj.
    # The eager nn.Module goes in (traced inside, example inputs taken from the images).
    model, _, _ = traced("timm_vit")
    x = _images(3)
    ls = local_scores(model, x, loss_fn=_output_loss, batch_size=3, progress=False)
    loss = _output_loss(model, x)
    E, H = 48, 3
    hd = E // H
    for b, blk in enumerate(model.blocks):
        gq, gqb, gp = torch.autograd.grad(loss, [blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj.weight],
                                          retain_graph=True)
        for h in range(H):
            rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) + j * E for j in range(3)])
            want = gq[rows].square().sum() + gqb[rows].square().sum() + gp[:, h * hd:(h + 1) * hd].square().sum()
            torch.testing.assert_close(ls.head_scores[b][h], want, rtol=2e-5, atol=0)
        g1, g1b, g2 = torch.autograd.grad(loss, [blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight],
                                          retain_graph=True)
        want = g1.square().sum(1) + g1b.square() + g2.square().sum(0)
        torch.testing.assert_close(ls.neuron_scores[b], want, rtol=2e-5, atol=0)


def test_default_dino_scores_equal_an_eager_loop_with_the_same_crops(traced):
    model, gm, smap = traced("timm_vit")
    imgs = _uint8(5)
    ls = local_scores(gm, imgs, batch_size=2, seed=3, dino=SMALL_DINO, preprocess=PRE, progress=False)
    sampler = MultiCropSampler(PRE, SMALL_DINO, seed=3)  # same seed, same batches -> same crops

    def embed(x):
        return model.forward_head(model.forward_features(x), pre_logits=True)

    params = _scored(gm, smap)
    steps = []
    for i in range(0, 5, 2):
        g, loc = sampler(imgs[i:i + 2])
        steps.append(_grads_of(dino_loss(embed, g, loc, SMALL_DINO), params))
    _assert_scores(ls, _naive(smap, params, steps), rtol=1e-4)
    assert ls.method == "dino" and ls.loss == "dino" and ls.config["dino"]["n_local"] == 2


def test_the_triton_kernel_gives_the_scores_of_the_pytorch_path(traced):
    # One batched launch over every structure's slices, into views of one flat buffer.
    if torch.cuda.is_available():
        device = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by conftest without CUDA)")
    _, gm, _ = traced("hand_separate_qkv")
    x = _images(4)
    kw = dict(loss_fn=_output_loss, batch_size=2, progress=False, device=device)
    ref = local_scores(gm, x, backend="torch", **kw)
    fused = local_scores(gm, x, backend="triton", **kw)
    _assert_scores(fused, (ref.head_scores, ref.neuron_scores), rtol=1e-5)


def test_only_structure_parameters_get_gradients_and_state_is_restored(traced):
    model, gm, smap = traced("hand_separate_qkv")
    seen = []

    def spy(m, x):
        seen.append({n for n, p in m.named_parameters() if p.requires_grad})
        assert not m.training
        return _output_loss(m, x)

    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    local_scores(gm, _images(2), loss_fn=spy, batch_size=2, progress=False)
    assert seen == [set(_scored(gm, smap))]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())  # .grad is never touched
    assert all(m.training for m in model.modules())  # modes restored
    model.eval()


# --------------------------------------------------------------------------- per-sample


def test_per_sample_ghost_norms_equal_a_loop_over_per_sample_gradients(traced):
    model, gm, smap = traced("timm_vit")
    x, y = _images(5), torch.tensor([1, 7, 3, 3, 0])
    ls = local_scores(gm, x, method="ce", labels=y, batch_size=3, mode="per-sample", progress=False)
    assert ls.config["per_sample"] == "ghost"
    params = _scored(gm, smap)
    steps = [_grads_of(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params) for i in range(5)]
    ref = _naive(smap, params, steps)
    _assert_scores(ls, ref, rtol=1e-4)
    loop = local_scores(gm, x, method="ce", labels=y, batch_size=3, mode="per-sample", per_sample="loop",
                        progress=False)
    assert loop.config["per_sample"] == "loop"
    _assert_scores(loop, ref, rtol=2e-5)
    # per-batch differs: squares of batch means, not means of squares
    batch = local_scores(gm, x, method="ce", labels=y, batch_size=3, progress=False)
    assert not torch.allclose(batch.head_scores[0], ls.head_scores[0], rtol=1e-2)


def test_per_sample_with_a_loss_fn_loops_over_images(traced):
    _, gm, smap = traced("torchvision_vit")  # nn.MultiheadAttention: no ghost norms
    x = _images(3)
    ls = local_scores(gm, x, loss_fn=_output_loss, batch_size=2, mode="per-sample", progress=False)
    assert ls.config["per_sample"] == "loop"
    params = _scored(gm, smap)
    steps = [_grads_of(_output_loss(gm, x[i:i + 1]), params) for i in range(3)]
    _assert_scores(ls, _naive(smap, params, steps))
    with pytest.raises(ScoresError, match="ghost"):
        local_scores(gm, x, batch_size=2, mode="per-sample", per_sample="ghost", dino=SMALL_DINO, progress=False)


def test_per_sample_dino_ghost_maps_crops_to_their_image(traced, monkeypatch):
    # Crops that depend on the image only: batched ghost norms must equal one image at a time.
    def fixed_views(self, images):
        g = torch.stack([images, images.flip(-1)])
        loc = torch.stack([images.roll(5, dims=-1), images.flip(-2)])
        return g, loc

    monkeypatch.setattr(dino_mod.MultiCropSampler, "__call__", fixed_views)
    _, gm, _ = traced("hand_fused_chunk_swiglu")  # packed gated FFN: rows owned in pairs
    x = _images(5)
    ghost = local_scores(gm, x, batch_size=3, mode="per-sample", dino=SMALL_DINO, progress=False)
    loop = local_scores(gm, x, batch_size=3, mode="per-sample", per_sample="loop", dino=SMALL_DINO, progress=False)
    assert ghost.config["per_sample"] == "ghost" and loop.config["per_sample"] == "loop"
    for b in loop.head_scores:
        torch.testing.assert_close(ghost.head_scores[b], loop.head_scores[b], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(ghost.neuron_scores[b], loop.neuron_scores[b], rtol=1e-4, atol=1e-12)


# --------------------------------------------------------------------------- determinism, errors


def test_scores_are_deterministic_for_a_seed(traced):
    _, gm, _ = traced("hand_separate_qkv")
    imgs = _uint8(4)
    kw = dict(batch_size=2, dino=SMALL_DINO, preprocess=PRE, progress=False)
    a = local_scores(gm, imgs, seed=0, **kw)
    b = local_scores(gm, imgs, seed=0, **kw)
    c = local_scores(gm, imgs, seed=1, **kw)
    for blk in a.head_scores:
        assert torch.equal(a.head_scores[blk], b.head_scores[blk])
        assert torch.equal(a.neuron_scores[blk], b.neuron_scores[blk])
    assert not torch.equal(a.head_scores[0], c.head_scores[0])


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p):
        return p.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_a_nan_gradient_stops_with_the_batch_and_parameter_named(traced):
    model, gm, _ = traced("hand_separate_qkv")
    bias = gm.get_parameter("blocks.1.mlp.fc1.bias")
    calls = []

    def poisoned(m, x):
        calls.append(len(x))
        loss = _output_loss(m, x)
        if len(calls) == 2:  # the second batch
            loss = loss + 0.0 * _NanGrad.apply(bias).sum()
        return loss

    with pytest.raises(NumericalError, match=r"batch 1 \(images 2-3\).*'blocks\.1\.mlp\.fc1\.bias'"):
        local_scores(gm, _images(6), loss_fn=poisoned, batch_size=2, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the error


def test_a_nan_loss_stops_with_the_batch_named(traced):
    _, gm, _ = traced("hand_separate_qkv")
    x = _images(4)
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"loss of batch 1 \(images 2-3\) is nan"):
        local_scores(gm, x, loss_fn=_output_loss, batch_size=2, progress=False)


def test_a_nan_under_bf16_autocast_points_to_float32(traced):
    _, gm, _ = traced("hand_separate_qkv")
    x = _images(4)
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"bfloat16 autocast.*amp_dtype=torch\.float32"):
        local_scores(gm, x, loss_fn=_output_loss, batch_size=2, amp_dtype=torch.bfloat16, progress=False)


# --------------------------------------------------------------------------- bf16 autocast
def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_bf16_autocast_scores_are_fp32_sums_ranked_like_fp32(traced, monkeypatch):
    """What the pass does on a GPU by default, forced on the CPU: the forward and backward
    under bf16 autocast, gradients and their sums in fp32, the ranking that of fp32."""
    from elastic_fx.scoring import gradients

    _, gm, smap = traced("timm_vit")
    x = _images(8)
    seen = []
    real = gradients.sqgrad_accumulate_many

    def recording(jobs, **kw):
        seen.extend((j.grad.dtype, j.out.dtype) for j in jobs)
        return real(jobs, **kw)

    autocast = []
    linear = next(m for m in gm.modules() if isinstance(m, torch.nn.Linear))  # the loss runs a copy of gm's graph
    hook = linear.register_forward_pre_hook(  # the pass's forwards, not a no-grad probe of the graph
        lambda m, a: autocast.append(torch.is_autocast_enabled("cpu")) if torch.is_grad_enabled() else None)
    monkeypatch.setattr(gradients, "sqgrad_accumulate_many", recording)
    try:
        kw = dict(batch_size=4, dino=SMALL_DINO, seed=1, progress=False)
        half = local_scores(gm, x, amp_dtype=torch.bfloat16, **kw)
        assert autocast and all(autocast)
        autocast.clear()
        full = local_scores(gm, x, amp_dtype=torch.float32, **kw)
        assert autocast and not any(autocast)
    finally:
        hook.remove()
    assert half.config["amp_dtype"] == "bfloat16" and full.config["amp_dtype"] == "float32"
    assert seen and set(seen) == {(torch.float32, torch.float32)}  # fp32 gradients into fp32 sums
    flat = {name: torch.cat([ls.head_means[b] for b in sorted(ls.head_means)]
                            + [ls.neuron_means[b] for b in sorted(ls.neuron_means)]) for name, ls in
            (("half", half), ("full", full))}
    assert flat["half"].dtype == torch.float32 and torch.isfinite(flat["half"]).all()
    assert not torch.equal(flat["half"], flat["full"])  # bf16 really ran
    # 0.9999 measured on three zoo models x three seeds; 0.98 leaves room for other BLAS
    assert _spearman(flat["half"], flat["full"]) > 0.98


def test_the_pass_defaults_to_bf16_on_cuda_and_fp32_elsewhere(traced):
    from elastic_fx.scoring.gradients import PassConfig, pass_dtype

    assert pass_dtype(PassConfig(), torch.device("cuda", 0)) == torch.bfloat16
    assert pass_dtype(PassConfig(), torch.device("cpu")) == torch.float32
    assert pass_dtype(PassConfig(amp_dtype=torch.float32), torch.device("cuda")) == torch.float32
    with pytest.raises(ConfigError, match="amp_dtype must be None"):
        PassConfig(amp_dtype=torch.float64)
    _, gm, _ = traced("hand_separate_qkv")
    ls = local_scores(gm, _images(2), loss_fn=_output_loss, batch_size=2, progress=False)
    assert ls.config["amp_dtype"] == "float32"  # the CPU default: no autocast


def test_bad_arguments_are_refused(traced):
    _, gm, _ = traced("hand_separate_qkv")
    with pytest.raises(ConfigError, match="method"):
        local_scores(gm, _images(2), method="hessian", progress=False)
    with pytest.raises(ConfigError, match="mode"):
        local_scores(gm, _images(2), mode="per-token", progress=False)
    with pytest.raises(ScoresError, match="labels"):
        local_scores(gm, _images(2), method="ce", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        local_scores(gm, _images(2), batch_size=0, progress=False)


# --------------------------------------------------------------------------- LocalScores


def test_means_divide_by_the_parameters_of_one_structure(traced):
    _, gm, smap = traced("hand_separate_qkv")
    ls = local_scores(gm, _images(2), loss_fn=_output_loss, batch_size=2, progress=False)
    for b in smap.blocks:
        torch.testing.assert_close(ls.head_means[b.index], ls.head_scores[b.index] / b.attention.params_per_head)
        torch.testing.assert_close(ls.neuron_means[b.index], ls.neuron_scores[b.index] / b.mlp.params_per_neuron)
    # block 0: heads of dim 16 in width 48 own q/k/v rows (3 x 16 x 48), their biases (3 x 16), out columns (48 x 16)
    assert smap.blocks[0].attention.params_per_head == 4 * 16 * 48 + 3 * 16
    norm = ls.normalized()
    assert torch.equal(norm.head_scores[1], ls.head_means[1]) and torch.equal(norm.head_means[1], ls.head_means[1])


def test_score_files_round_trip_and_reject_another_model(traced, tmp_path):
    _, gm, smap = traced("timm_vit")
    ls = local_scores(gm, _images(3), loss_fn=_output_loss, batch_size=2, progress=False)
    path = ls.save(tmp_path / "scores.safetensors")
    assert os.listdir(tmp_path) == ["scores.safetensors"]  # no temporary file left behind
    back = LocalScores.load(path, smap)
    for b in ls.head_scores:
        assert torch.equal(back.head_scores[b], ls.head_scores[b])
        assert torch.equal(back.neuron_scores[b], ls.neuron_scores[b])
    assert (back.method, back.loss, back.mode, back.num_images, back.fingerprint) == \
        (ls.method, ls.loss, ls.mode, ls.num_images, ls.fingerprint)
    assert back.config["batch_size"] == 2 and back.blocks == ls.blocks

    _, _, other = traced("hand_separate_qkv")  # same sizes in block 0, other parameter names
    with pytest.raises(ScoresError, match=r"block 0 has head_params="):
        LocalScores.load(path, other)
    fewer_heads = copy.deepcopy(smap)
    fewer_heads.blocks[1].attention.num_heads = 2
    with pytest.raises(ScoresError, match=r"block 1 has num_heads=3 in the scores but num_heads=2"):
        back.check(fewer_heads)
    shallower = copy.deepcopy(smap)
    shallower.blocks.pop()
    with pytest.raises(ScoresError, match="2 blocks, but this model has 1"):
        back.check(shallower)


def test_loading_refuses_files_that_are_not_score_files(tmp_path):
    from safetensors.torch import save_file

    pickle_file = tmp_path / "scores.pt"
    torch.save({"head_scores": torch.ones(3)}, pickle_file)
    with pytest.raises(ScoresError, match="not a safetensors score file"):
        LocalScores.load(pickle_file)
    bare = tmp_path / "bare.safetensors"
    save_file({"head_scores.0": torch.ones(3)}, bare)
    with pytest.raises(ScoresError, match="without elastic_fx metadata"):
        LocalScores.load(bare)
    with pytest.raises(ScoresError, match="no score file"):
        LocalScores.load(tmp_path / "missing.safetensors")
