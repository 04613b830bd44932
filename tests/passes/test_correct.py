"""Weight correction: the layer solver against closed forms, and the model driver on a tiny ViT."""

import copy
import logging

import pytest
import torch
from torch import nn

from elastic_fx.errors import DataError, ElasticFxError, SliceError
from elastic_fx.passes.correct import (
    CorrectionConfig,
    HessianAccumulator,
    correct_linear,
    correct_linear_lstsq,
    correct_model,
    reconstruction_error,
)

F64 = torch.float64


def _problem(n_in=40, n_out=12, tokens=600, seed=0):
    """Correlated inputs X [tokens, in], a weight, H = X^T X and a random keep mask."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in, generator=g, dtype=F64) @ torch.randn(n_in, n_in, generator=g, dtype=F64)
    W = torch.randn(n_out, n_in, generator=g, dtype=F64)
    keep = torch.zeros(n_in, dtype=torch.bool)
    keep[torch.randperm(n_in, generator=g)[: n_in // 2]] = True
    return X, W, X.T @ X, keep


# ----------------------------------------------------------------------------- accumulator
def test_accumulator_sums_every_batch_exactly():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(1, 4, 7, generator=g)]
    acc = HessianAccumulator(7, chunk_rows=3)  # chunking must not drop or repeat rows
    for b in batches:
        acc.add(b)
    X = torch.cat([b.reshape(-1, 7) for b in batches]).to(F64)
    torch.testing.assert_close(acc.H, X.T @ X)
    assert acc.count == 10 + 3 + 4
    assert acc.H.dtype == F64
    with pytest.raises(ValueError, match="in_features=7"):
        acc.add(torch.randn(2, 6))


# ----------------------------------------------------------------------------- layer solver
@pytest.mark.parametrize("block_size", [1, 3, 128])
def test_pruned_first_sweep_equals_closed_form(block_size):
    X, W, H, keep = _problem()
    cfg = CorrectionConfig(block_size=block_size)
    corrected = correct_linear(W, H, keep, cfg)
    torch.testing.assert_close(corrected, correct_linear_lstsq(W, H, keep, cfg), rtol=1e-9, atol=1e-9)
    assert torch.all(corrected[:, ~keep] == 0)
    zeroed = W * keep
    assert reconstruction_error(W, corrected, H) < 0.7 * reconstruction_error(W, zeroed, H)


def test_undamped_correction_is_ordinary_least_squares():
    X, W, H, keep = _problem(seed=2)
    cfg = CorrectionConfig(percent=0.0)
    # independent oracle: regress the dense outputs W X on the kept inputs only
    ols = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    torch.testing.assert_close(correct_linear(W, H, keep, cfg)[:, keep], ols, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(correct_linear_lstsq(W, H, keep, cfg)[:, keep], ols, rtol=1e-9, atol=1e-9)


def test_natural_order_coincides_with_closed_form_only_for_a_pruned_prefix():
    X, W, H, _ = _problem(seed=3)
    n = W.shape[1]
    prefix = torch.arange(n) >= 15  # pruned columns all left of the kept ones
    cfg = CorrectionConfig(order="natural", block_size=8)
    torch.testing.assert_close(correct_linear(W, H, prefix, cfg), correct_linear_lstsq(W, H, prefix, cfg))
    # pruned suffix: nothing lies right of the pruned columns, so the paper's sweep only zeroes them
    suffix = torch.arange(n) < 25
    torch.testing.assert_close(correct_linear(W, H, suffix, cfg), W * suffix)
    assert reconstruction_error(W, correct_linear(W, H, suffix), H) < reconstruction_error(W, W * suffix, H)


def test_dead_inputs_give_finite_weights_and_still_help():
    X, W, _, keep = _problem(seed=4)
    dead = torch.zeros(W.shape[1], dtype=torch.bool)
    dead[[0, 5, 6, 30]] = True
    keep[[0, 5]] = True
    keep[[6, 30]] = False
    X[:, dead] = 0
    X[:, 1] = X[:, 2]  # duplicate input: H is singular besides the dead ones
    H = X.T @ X
    for cfg in (CorrectionConfig(), CorrectionConfig(damping="max"), CorrectionConfig(order="natural")):
        corrected = correct_linear(W, H, keep, cfg)
        assert torch.isfinite(corrected).all()
        assert torch.all(corrected[:, dead] == 0)
        assert reconstruction_error(W, corrected, H) < reconstruction_error(W, W * keep, H)


def test_index_keep_list_all_kept_and_bad_masks():
    X, W, H, keep = _problem(seed=5)
    idx = torch.nonzero(keep).flatten().tolist()
    torch.testing.assert_close(correct_linear(W, H, idx), correct_linear(W, H, keep))
    W32 = W.float()
    out = correct_linear(W32, H, torch.ones(W.shape[1], dtype=torch.bool))
    assert out.dtype == torch.float32 and torch.equal(out, W32)
    with pytest.raises(SliceError, match="expected \\(40,\\)"):
        correct_linear(W, H, torch.ones(39, dtype=torch.bool))
    with pytest.raises(SliceError, match="\\[0, 40\\)"):
        correct_linear(W, H, [0, 40])
    with pytest.raises(ElasticFxError, match="damping"):
        CorrectionConfig(damping="median")


def test_max_damping_is_stronger_than_mean():
    X, W, H, keep = _problem(seed=6)
    mean = CorrectionConfig()
    strong = CorrectionConfig(damping="max")
    assert strong.damping_percent == 0.1 and mean.damping_percent == 0.01
    e_mean = reconstruction_error(W, correct_linear(W, H, keep, mean), H)
    e_max = reconstruction_error(W, correct_linear(W, H, keep, strong), H)
    e_zero = reconstruction_error(W, W * keep, H)
    assert e_mean < e_max < e_zero  # heavier damping: closer to the original, less fit


# ----------------------------------------------------------------------------- model driver
class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_driver_collects_each_layer_after_the_previous_correction():
    torch.manual_seed(0)
    model = _TwoLayer().double()
    calib = torch.randn(64, 5, 16, dtype=F64)
    keep_a = torch.arange(16) % 3 != 0
    keep_b = torch.arange(24) % 2 == 0
    expected = copy.deepcopy(model)
    H_a = (calib.reshape(-1, 16).T @ calib.reshape(-1, 16))
    expected.a.weight.data = correct_linear(expected.a.weight, H_a, keep_a)
    with torch.no_grad():
        xb = torch.tanh(expected.a(calib)).reshape(-1, 24)  # inputs of b AFTER a was corrected
    expected.b.weight.data = correct_linear(expected.b.weight, xb.T @ xb, keep_b)

    report = correct_model(model, [("a", keep_a), ("b", keep_b)], calib, batch_size=10)
    torch.testing.assert_close(model.a.weight, expected.a.weight)
    torch.testing.assert_close(model.b.weight, expected.b.weight)
    assert report["b"].tokens == 64 * 5 and report["b"].pruned_columns == 12
    assert report["a"].error_after < report["a"].error_before


def test_driver_inputs_and_errors():
    model = _TwoLayer()
    keep = torch.ones(24, dtype=torch.bool)
    keep[:4] = False
    pairs = [(torch.randn(4, 16), torch.zeros(4)) for _ in range(5)]  # DataLoader-like (x, y) batches
    report = correct_model(model, [("b", keep)], pairs, config=CorrectionConfig(max_images=10))
    assert report["b"].tokens == 10
    with pytest.raises(DataError, match="one-shot iterator"):
        correct_model(model, [("b", keep)], iter(pairs))
    with pytest.raises(SliceError, match="not found"):
        correct_model(model, [("c", keep)], pairs)

    def skip_b(m, x):
        return m.a(x)

    with pytest.raises(SliceError, match="never ran"):
        correct_model(model, [("b", keep)], pairs, forward=skip_b)


# ----------------------------------------------------------------------------- tiny ViT
HEADS, HEAD_DIM, HIDDEN = 4, 12, 192


def _tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=HEADS, mlp_ratio=4, num_classes=0
    ).eval()


def _half_masks(depth, seed=1):
    """Keep masks over proj / fc2 input columns: 50 % of heads and 50 % of neurons per block."""
    g = torch.Generator().manual_seed(seed)
    layers, heads_kept, neurons_kept = [], [], []
    for i in range(depth):
        hk = torch.zeros(HEADS, dtype=torch.bool)
        hk[torch.randperm(HEADS, generator=g)[: HEADS // 2]] = True
        nk = torch.zeros(HIDDEN, dtype=torch.bool)
        nk[torch.randperm(HIDDEN, generator=g)[: HIDDEN // 2]] = True
        layers += [(f"blocks.{i}.attn.proj", hk.repeat_interleave(HEAD_DIM)), (f"blocks.{i}.mlp.fc2", nk)]
        heads_kept.append(hk)
        neurons_kept.append(nk)
    return layers, heads_kept, neurons_kept


@torch.no_grad()
def _mask_upstream(model, heads_kept, neurons_kept):
    """Remove the structures the way the pruner does: zero fc1 rows/bias and q/k/v rows/bias."""
    for blk, hk, nk in zip(model.blocks, heads_kept, neurons_kept):
        blk.mlp.fc1.weight[~nk] = 0
        blk.mlp.fc1.bias[~nk] = 0
        rows = (~hk).repeat_interleave(HEAD_DIM).repeat(3)  # [q | k | v] blocks of heads
        blk.attn.qkv.weight[rows] = 0
        blk.attn.qkv.bias[rows] = 0


def test_correction_reduces_embedding_error_of_a_tiny_vit():
    dense = _tiny_vit()
    layers, heads_kept, neurons_kept = _half_masks(len(dense.blocks))
    calib, held_out = torch.randn(192, 3, 32, 32), torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        target = dense(held_out)

    pruned = copy.deepcopy(dense)
    _mask_upstream(pruned, heads_kept, neurons_kept)
    corrected = copy.deepcopy(dense)  # the unmasked model goes in (see correct.py)
    report = correct_model(corrected, layers, calib)
    with torch.no_grad():
        before_upstream_mask = corrected(held_out)
        _mask_upstream(corrected, heads_kept, neurons_kept)
        emb_corrected, emb_pruned = corrected(held_out), pruned(held_out)

    # removing the structures upstream changes nothing once their columns are zero
    torch.testing.assert_close(emb_corrected, before_upstream_mask, rtol=1e-5, atol=1e-5)
    for name, keep in layers:
        assert torch.all(corrected.get_submodule(name).weight[:, ~keep] == 0)
        assert report[name].error_after < report[name].error_before
    err_pruned = (emb_pruned - target).norm() / target.norm()
    err_corrected = (emb_corrected - target).norm() / target.norm()
    assert err_pruned > 0.3  # 50 % sparsity really hurts this model
    assert err_corrected < 0.6 * err_pruned


def test_masked_model_is_detected(caplog):
    model = _tiny_vit()
    layers, heads_kept, neurons_kept = _half_masks(len(model.blocks))
    _mask_upstream(model, heads_kept, neurons_kept)
    with caplog.at_level(logging.WARNING, logger="elastic_fx.passes.correct"):
        report = correct_model(model, layers[1:2], torch.randn(16, 3, 32, 32))
    assert "masked upstream" in caplog.text
    assert report["blocks.0.mlp.fc2"].error_before == pytest.approx(0.0, abs=1e-12)


def test_correct_structures_then_slice_on_a_traced_vit():
    from elastic_fx.passes.correct import CORRECTION_META, correct_structures, correction_layers
    from elastic_fx.passes.discover import discover
    from elastic_fx.passes.slice import slice_graph
    from elastic_fx.tracing import trace

    gm = trace(_tiny_vit(), (torch.randn(2, 3, 32, 32),))
    smap = discover(gm)
    keep = {0: {"heads": [1, 3], "neurons": list(range(0, HIDDEN, 2))}, 1: {"heads": [0, 1, 2, 3]}}
    layers = correction_layers(smap, keep, gm)
    assert [n for n, _ in layers] == ["blocks.0.attn.proj", "blocks.0.mlp.fc2"]  # block 1 loses nothing
    assert layers[0][1].tolist() == [False] * HEAD_DIM + [True] * HEAD_DIM + [False] * HEAD_DIM + [True] * HEAD_DIM

    original = gm.get_submodule("blocks.0.mlp.fc2").weight.clone()
    corrected = correct_structures(gm, smap, keep, torch.randn(128, 3, 32, 32))
    assert torch.equal(gm.get_submodule("blocks.0.mlp.fc2").weight, original)  # input untouched
    assert set(corrected.meta[CORRECTION_META]) == {"blocks.0.attn.proj", "blocks.0.mlp.fc2"}
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        dense, unsliced = gm(x), corrected(x)
        small, small_uncorrected = slice_graph(corrected, smap, keep)(x), slice_graph(gm, smap, keep)(x)
    torch.testing.assert_close(small, unsliced, rtol=1e-5, atol=1e-5)
    assert (small - dense).norm() < 0.6 * (small_uncorrected - dense).norm()
    with pytest.raises(DataError, match="calibration"):
        correct_structures(gm, smap, keep, None)


def test_correct_pass_records_exactly_the_layers_it_changed():
    from elastic_fx.passes.correct import CorrectionResult, correct_pass
    from elastic_fx.passes.discover import discover
    from elastic_fx.tracing import trace

    gm = trace(_tiny_vit(), (torch.randn(2, 3, 32, 32),))
    smap = discover(gm)
    keep = {0: {"heads": [1, 3]}, 1: {"neurons": list(range(0, HIDDEN, 3))}}
    result = correct_pass(gm, smap, keep, torch.randn(64, 3, 32, 32))
    assert isinstance(result, CorrectionResult)
    assert list(result.layers) == ["blocks.0.attn.proj", "blocks.1.mlp.fc2"]
    before, after = gm.state_dict(), result.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.weight" for name in result.layers}
    for name, rep in result.layers.items():
        assert rep.error_after <= rep.error_before and rep.pruned_columns > 0
