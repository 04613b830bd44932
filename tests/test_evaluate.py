"""Evaluators: k-NN, linear probe, feature extraction, evaluation by budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from elastic_fx.data import LabelledData, load_labelled, to_model_input
from elastic_fx.errors import DataError, ElasticFxError
from elastic_fx.evaluate import (
    LinearProbeConfig,
    evaluate_features,
    extract_features,
    knn_top1,
    linear_probe,
)

ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"
CIFAR_NPZ = ASSETS / "cifar10-subset" / "cifar10_subset.npz"
CIFAR_VIT = ASSETS / "vit-cifar" / "vit_cifar.pt"


def blobs(n_train: int, n_test: int, classes: int = 10, dim: int = 32, sep: float = 3.0, seed: int = 123):
    """Gaussian clusters around random centres: linearly and k-NN separable for sep >> 1.

    (The seed differs from LinearProbeConfig.seed on purpose: with equal seeds the centres
    would equal the probe's initial weights up to scale, and the probe would start solved.)
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * sep
    y = torch.randperm(n_train + n_test, generator=g) % classes
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ----------------------------------------------------------------------------- k-NN


def test_knn_separable_is_perfect():
    xtr, ytr, xte, yte = blobs(1000, 300)
    assert knn_top1(xtr, ytr, xte, yte, k=20) == 1.0


def test_knn_shuffled_labels_is_chance():
    # test points of one cluster share their neighbours, so one shuffle swings +-0.04; average six
    xtr, ytr, xte, yte = blobs(2000, 1000)
    accs = [knn_top1(xtr, ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(s))], xte, yte)
            for s in range(6)]
    assert abs(sum(accs) / len(accs) - 0.1) < 0.04, accs


def test_knn_uses_l2_normalised_features():
    # classes differ only in direction; random per-row scales would wreck raw Euclidean k-NN
    xtr, ytr, xte, yte = blobs(600, 200, dim=16, sep=3.0)
    g = torch.Generator().manual_seed(2)
    scale_tr = torch.exp(torch.randn(len(xtr), 1, generator=g) * 3)
    scale_te = torch.exp(torch.randn(len(xte), 1, generator=g) * 3)
    plain = knn_top1(xtr, ytr, xte, yte)
    scaled = knn_top1((xtr * scale_tr).numpy(), ytr.numpy(), (xte * scale_te).numpy(), yte.numpy())
    assert scaled == plain


def test_knn_majority_vote_small_case():
    # 3 neighbours of class 1 at angle ~0, 2 of class 0 nearby: k=5 votes 3:2 for class 1
    train = torch.tensor([[1.0, 0.01], [1.0, -0.01], [1.0, 0.02], [1.0, 0.2], [1.0, -0.2], [-1.0, 0.0]])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    test = torch.tensor([[5.0, 0.0]])
    assert knn_top1(train, labels, test, torch.tensor([1]), k=5) == 1.0
    assert knn_top1(train, labels, test, torch.tensor([0]), k=6) == 1.0  # 3:3 tie -> smallest label (sklearn)


def test_knn_rejects_bad_input():
    xtr, ytr, xte, yte = blobs(50, 10)
    with pytest.raises(DataError, match="feature dims"):
        knn_top1(xtr, ytr, xte[:, :5], yte)
    with pytest.raises(DataError, match="one label per feature row"):
        knn_top1(xtr, ytr[:-1], xte, yte)
    with pytest.raises(DataError, match="positive int"):
        knn_top1(xtr, ytr, xte, yte, k=0)
    # k clamped to all 50 training samples: every test point gets the overall majority label
    majority = int(torch.bincount(ytr).argmax())
    assert knn_top1(xtr, ytr, xte, yte, k=500) == pytest.approx(float((yte == majority).float().mean()))


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_learns_separable_toy_set():
    xtr, ytr, xte, yte = blobs(600, 200)
    acc = linear_probe(xtr, ytr, xte, yte, LinearProbeConfig(epochs=15))
    assert acc >= 0.98, acc


def test_linear_probe_learns_a_linear_boundary():
    # not clustered: labels are the sign of a projection; a linear head fits it, chance is 0.5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1400, 8, generator=g)
    w = torch.randn(8, generator=g)
    keep = (x @ w).abs() > 0.5
    x, y = x[keep], (x[keep] @ w > 0).long()
    acc = linear_probe(x[:800], y[:800], x[800:], y[800:], LinearProbeConfig(epochs=40))
    assert acc >= 0.9, acc  # chance is 0.5


def test_linear_probe_shuffled_labels_is_near_chance_and_deterministic():
    xtr, ytr, xte, yte = blobs(600, 300)
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(4))]
    cfg = LinearProbeConfig(epochs=5)
    acc = linear_probe(xtr, shuffled, xte, yte, cfg)
    assert acc < 0.25, acc
    assert linear_probe(xtr, shuffled, xte, yte, cfg) == acc


def test_linear_probe_with_explicit_validation_split():
    xtr, ytr, xte, yte = blobs(600, 200)
    acc = linear_probe(xtr[:500], ytr[:500], xte, yte, LinearProbeConfig(epochs=10), val=(xtr[500:], ytr[500:]))
    assert acc >= 0.98


def test_linear_probe_config_defaults_follow_the_paper_and_validate():
    cfg = LinearProbeConfig()
    assert (cfg.epochs, cfg.lr, cfg.momentum, cfg.batch_size, cfg.weight_decay) == (100, 1e-3, 0.9, 256, 0.0)
    with pytest.raises(ElasticFxError, match="val_fraction"):
        LinearProbeConfig(val_fraction=1.0)
    with pytest.raises(ElasticFxError, match="epochs"):
        LinearProbeConfig(epochs=0)


# ----------------------------------------------------------------------------- features


class _Tokens(torch.nn.Module):
    """[B, 3, H, W] -> tokens [B, 1 + H*W, 3] whose first token is a per-image mean."""

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)


class _DictOut(torch.nn.Module):
    def __init__(self, with_pooler: bool):
        super().__init__()
        self.with_pooler = with_pooler
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        out = {"last_hidden_state": x.flatten(2).transpose(1, 2)}
        if self.with_pooler:
            out["pooler_output"] = self.drop(x.mean((2, 3)))
        return out


def test_extract_features_takes_class_token_and_batches_consistently():
    x = torch.randn(7, 3, 4, 4)
    feats = extract_features(_Tokens(), x, batch_size=3)
    torch.testing.assert_close(feats, x.mean((2, 3)))
    loader = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(3))]
    torch.testing.assert_close(extract_features(_Tokens(), loader), feats)


def test_extract_features_dict_outputs_and_eval_mode_restored():
    x = torch.randn(5, 3, 4, 4)
    model = _DictOut(with_pooler=True).train()
    feats = extract_features(model, x, batch_size=2)
    torch.testing.assert_close(feats, x.mean((2, 3)))  # dropout off: eval mode during extraction
    assert model.training  # ... and the caller's mode is back
    torch.testing.assert_close(extract_features(_DictOut(with_pooler=False), x), x.flatten(2).transpose(1, 2)[:, 0])


def test_extract_features_rejects_bad_images():
    with pytest.raises(DataError, match="to_model_input"):
        extract_features(_Tokens(), torch.zeros(2, 4, 4, 3, dtype=torch.uint8))
    with pytest.raises(DataError, match="empty"):
        extract_features(_Tokens(), [])


def test_evaluate_features_chains_extraction_and_both_protocols():
    # images whose mean colour encodes the class; the "model" pools colours -> separable features
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (4, 3))
    y = np.arange(200) % 4
    imgs = np.clip(colours[y][:, None, None, :] + rng.integers(-8, 9, (200, 6, 6, 3)), 0, 255).astype(np.uint8)
    data = LabelledData(imgs[:150], y[:150], imgs[150:], y[150:], ["a", "b", "c", "d"])
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    result = evaluate_features(pool, data, mean=(0.5,) * 3, std=(0.5,) * 3, k=5,
                               linear=LinearProbeConfig(epochs=10, lr=0.5))
    assert result["knn_top1"] == 1.0
    assert result["linear_top1"] >= 0.9  # chance is 0.25
    feats = LabelledData(rng.normal(size=(40, 3)), y[:40], rng.normal(size=(20, 3)), y[:20])
    got = evaluate_features(None, feats, k=3)
    assert set(got) == {"knn_top1", "knn_correct"}  # no probe asked for: no probe result
    assert got["knn_correct"].shape == (20,) and got["knn_correct"].mean() == got["knn_top1"]
    assert result["linear_correct"].mean() == result["linear_top1"] and result["knn_correct"].all()
    with pytest.raises(DataError, match="model is None"):
        evaluate_features(None, data)


# ----------------------------------------------------------------------------- budgets


def _tiny_vit(num_classes: int = 3, depth: int = 2):
    import timm

    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=depth,
                                                             num_heads=4, mlp_ratio=2, num_classes=num_classes).eval()


def _colour_data(n_train: int = 30, n_test: int = 15, classes: int = 3) -> LabelledData:
    """uint8 16x16 images whose brightness depends on the class: k-NN can tell them apart."""
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 120, (n, 16, 16, 3)) + (y * 60)[:, None, None, None]
        return x.astype(np.uint8), y

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return LabelledData(xtr, ytr, xte, yte)


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def budget_setup():
    import elastic_fx as efx
    from elastic_fx.scoring.local import local_scores

    data = _colour_data()
    gm = efx.trace(_tiny_vit(), (to_model_input(data.x_train[:2], MEAN, STD),))
    smap = efx.discover(gm)
    scores = efx.ElasticScores.from_local(local_scores(gm, None, method="magnitude", structures=smap), smap)
    return gm, smap, scores, data


def _knn_of(gm, smap, data):
    from elastic_fx.passes.embedding import embedding_module

    return evaluate_features(embedding_module(gm, smap), data, mean=MEAN, std=STD, k=5)["knn_top1"]


def test_evaluate_budgets_slices_every_budget_and_matches_direct_evaluation(budget_setup):
    import elastic_fx as efx
    from elastic_fx.evaluate import evaluate_budgets

    gm, smap, scores, data = budget_setup
    results = evaluate_budgets(gm, scores, data, [0.0, 0.3, 0.6], mean=MEAN, std=STD, k=5)
    assert [r.target_sparsity for r in results] == [0.0, 0.3, 0.6]
    assert results[0].sparsity == 0.0 and results[0].params == sum(p.numel() for p in gm.parameters())
    for r in results:
        assert r.sparsity >= r.target_sparsity - 1e-9 and r.linear_top1 is None and 0 <= r.knn_top1 <= 1
    assert results[0].params > results[1].params > results[2].params
    assert results[0].gflops > results[1].gflops > results[2].gflops
    # dense row = the unpruned embedding; 60 % row = the embedding of efx.slice with the same keep
    assert results[0].knn_top1 == _knn_of(gm, smap, data)
    small = efx.slice(gm, smap, scores.keep(smap, 0.6))
    assert results[2].knn_top1 == _knn_of(small, smap, data)
    assert results[2].params == sum(p.numel() for p in small.parameters())


def test_evaluate_budgets_linear_probe_and_table(budget_setup):
    from elastic_fx.evaluate import evaluate_budgets, format_budget_table

    gm, _, scores, data = budget_setup
    results = evaluate_budgets(gm, scores, data, [0.0, 0.5], mean=MEAN, std=STD, k=5,
                               linear=LinearProbeConfig(epochs=3))
    assert all(r.linear_top1 is not None and 0 <= r.linear_top1 <= 1 for r in results)
    table = format_budget_table(results, title="tiny")
    lines = table.splitlines()
    assert lines[0] == "tiny" and "linear top-1" in lines[2] and len(lines) == 2 + 2 + len(results)
    assert f"| {100 * results[1].knn_top1:.1f} |" in lines[-1] and lines[-1].startswith("| 0.50 |")
    assert "linear" not in format_budget_table(evaluate_budgets(gm, scores, data, [0.5], mean=MEAN, std=STD, k=5))
    assert results[0].as_dict()["knn_top1"] == results[0].knn_top1


def test_evaluate_budgets_takes_the_models_own_preprocessing():
    import timm

    import elastic_fx as efx
    from elastic_fx.evaluate import evaluate_budgets
    from elastic_fx.scoring.local import local_scores

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                              num_classes=3).eval()
    gm = efx.trace(model)
    smap = efx.discover(gm)
    mean, std = gm.meta["elastic_fx.preprocess"].mean, gm.meta["elastic_fx.preprocess"].std
    scores = efx.ElasticScores.from_local(local_scores(gm, None, method="magnitude", structures=smap), smap)
    data = _colour_data()
    own = evaluate_budgets(model, scores, data, [0.4], k=5)  # nn.Module: traced at its own input size
    explicit = evaluate_budgets(gm, scores, data, [0.4], mean=mean, std=std, k=5)
    assert own[0].knn_top1 == explicit[0].knn_top1 and own[0].params == explicit[0].params


def test_evaluate_features_defaults_to_the_models_own_preprocessing():
    import timm

    from elastic_fx.data import preprocess_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                              num_classes=0).eval()
    cfg = preprocess_config(model)  # timm's pretrained_cfg statistics, not ImageNet by default
    data = _colour_data()
    own = evaluate_features(model, data, k=5)
    explicit = evaluate_features(model, data, mean=cfg.mean, std=cfg.std, image_size=16, k=5)
    assert own["knn_top1"] == explicit["knn_top1"] and np.array_equal(own["knn_correct"], explicit["knn_correct"])
    with pytest.raises(DataError, match="mean=..., std=..."):  # no config, no statistics: no silent ImageNet
        evaluate_features(_tiny_vit(num_classes=0), data, k=5)


def test_evaluate_budgets_rejects_bad_input(budget_setup, tmp_path):
    import elastic_fx as efx
    from elastic_fx.errors import BudgetError, ScoresError
    from elastic_fx.evaluate import evaluate_budgets

    gm, smap, scores, data = budget_setup
    for bad in ([1.0], [-0.1], [], ["0.5"]):
        with pytest.raises(BudgetError, match="sparsit"):
            evaluate_budgets(gm, scores, data, bad, mean=MEAN, std=STD)
    feats = LabelledData(np.zeros((4, 8), np.float32), np.arange(4) % 2, np.zeros((2, 8), np.float32), np.arange(2))
    with pytest.raises(DataError, match="uint8 images"):
        evaluate_budgets(gm, scores, feats, [0.5], mean=MEAN, std=STD)
    with pytest.raises(DataError, match="mean=..., std=..."):  # no config on a bare VisionTransformer
        evaluate_budgets(gm, scores, data, [0.5])
    other = efx.trace(_tiny_vit(num_classes=3, depth=3), (to_model_input(data.x_train[:2], MEAN, STD),))
    with pytest.raises(ScoresError, match="blocks"):
        evaluate_budgets(other, scores, data, [0.5], mean=MEAN, std=STD)
    with pytest.raises(ScoresError, match="does not exist"):
        evaluate_budgets(gm, tmp_path / "missing.efx", data, [0.5], mean=MEAN, std=STD)


# ----------------------------------------------------------------------------- real asset


@pytest.mark.skipif(not (CIFAR_NPZ.exists() and CIFAR_VIT.exists()),
                    reason=f"real CIFAR assets not found under {ASSETS} (optional quality check)")
def test_knn_on_real_cifar_vit_is_well_above_chance():
    import timm

    ckpt = torch.load(CIFAR_VIT, map_location="cpu", weights_only=True)
    model = timm.models.vision_transformer.VisionTransformer(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.reset_classifier(0)  # features without the head
    data = load_labelled(CIFAR_NPZ)
    # a spread-out subsample keeps this a few seconds; measured 0.48-0.60 (full split: 0.568)
    tr = np.linspace(0, len(data.y_train) - 1, 500).astype(int)
    te = np.linspace(0, len(data.y_test) - 1, 200).astype(int)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    f_train = extract_features(model, to_model_input(data.x_train[tr], mean, std), batch_size=250)
    f_test = extract_features(model, to_model_input(data.x_test[te], mean, std), batch_size=200)
    assert f_train.shape == (500, ckpt["config"]["embed_dim"])
    acc = knn_top1(f_train, data.y_train[tr], f_test, data.y_test[te], k=20)
    assert acc > 0.35, f"k-NN {acc:.3f} on the real ViT; full-split reference is 0.568, chance 0.1"
