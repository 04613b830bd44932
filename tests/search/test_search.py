"""The search space, the fitness size, the held-out selection and the search's bad input."""

import numpy as np
import pytest
import torch

import elastic_fx as efx
from elastic_fx.errors import ConfigError, DataError
from elastic_fx.pipeline import SearchConfig, prune
from elastic_fx.scores import Layout
from elastic_fx.search.fitness import PCACosineFitness, choose_dim, error_share
from elastic_fx.search.search import split_fitness_images
from elastic_fx.search.space import SearchSpace
from zoo import build

LAYOUT = Layout(ffn_blocks=(0, 1), head_blocks=((0, 3), (1, 3)))


# ----------------------------------------------------------------------------- the space
def test_log_space_is_positive_centred_and_starts_at_the_no_search_ranking():
    space = SearchSpace(LAYOUT, "log", "global")
    assert np.array_equal(space.factors(space.origin()), np.ones(LAYOUT.dim))
    z = np.random.default_rng(0).normal(size=(5, LAYOUT.dim))
    c = space.factors(z)
    assert (c > 0).all()
    assert np.allclose(np.log(c).mean(axis=1), 0.0)  # no free scale: the geometric mean is 1
    assert np.allclose(space.factors(z + 3.0), c)  # a common shift changes nothing
    # separate ranking: each kind is ranked on its own, so each kind is centred on its own
    sep = SearchSpace(LAYOUT, "log", "separate").factors(z)
    heads = LAYOUT.is_head
    assert np.allclose(np.log(sep[:, heads]).mean(axis=1), 0) and np.allclose(np.log(sep[:, ~heads]).mean(axis=1), 0)


def test_linear_space_passes_candidates_through():
    space = SearchSpace(LAYOUT, "linear")
    z = np.linspace(-1, 2, LAYOUT.dim)
    assert np.array_equal(space.factors(z), z) and np.array_equal(space.origin(), np.ones(LAYOUT.dim))
    with pytest.raises(ConfigError, match="'curved' is not one of"):
        SearchSpace(LAYOUT, "curved")


# ----------------------------------------------------------------------------- the fitness size
def _embeddings(n=40, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    dense = torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 2.0, 1.0],
                                                                                dtype=torch.float64)
    dense = dense @ basis[:, :4].T  # the dense images span 4 directions of 12
    return dense, basis


def test_error_share_counts_the_error_inside_the_leading_components():
    dense, basis = _embeddings()
    pc1 = torch.linalg.svd(dense - dense.mean(0), full_matrices=False)[2][0]
    inside = dense + 0.1 * pc1  # all error along the first principal direction
    outside = dense + 0.1 * basis[:, 8]  # all error where the dense images have no variance
    share = error_share(dense, torch.stack([inside, outside]))
    assert share.shape == (2, 12)  # min(N - 1, D) components
    assert share[0, 0] == pytest.approx(1.0) and float(share[1, 3]) == pytest.approx(0.0, abs=1e-9)
    assert choose_dim(dense, inside[None]) == (1, pytest.approx(1.0))
    # 12 components of 40 images cover the whole 12-dim space, so they hold any error ...
    assert choose_dim(dense, torch.stack([inside, outside]))[0] == 12
    # ... but 6 images give 5 components, and the PCA cannot hold error outside their span
    few = dense[:6]
    assert choose_dim(few, (few + 0.1 * basis[:, 8])[None]) == (None, 1.0)


def test_full_space_fitness_is_the_centred_cosine():
    dense, basis = _embeddings()
    pruned = dense + 0.3 * basis[:, 9]
    fit = PCACosineFitness(dense, dim=None)
    assert fit.full_space and fit.dim == 12
    mu = dense.mean(0)
    want = torch.nn.functional.cosine_similarity(pruned - mu, dense - mu, dim=1).mean()
    assert float(fit(pruned[None])[0]) == pytest.approx(float(want))
    # a 4-component PCA does not see that error at all
    assert float(PCACosineFitness(dense, dim=4)(pruned[None])[0]) == pytest.approx(1.0)
    assert float(want) < 0.999


# ----------------------------------------------------------------------------- the split
def test_fitness_split_is_fixed_disjoint_and_refuses_too_few_images():
    s, q = split_fitness_images(20, 0.5, seed=3)
    s2, q2 = split_fitness_images(20, 0.5, seed=3)
    assert torch.equal(s, s2) and torch.equal(q, q2)
    assert len(s) == len(q) == 10 and not set(s.tolist()) & set(q.tolist())
    assert sorted(s.tolist() + q.tolist()) == list(range(20))
    s0, q0 = split_fitness_images(20, 0.0, seed=3)
    assert len(s0) == 20 and len(q0) == 0
    with pytest.raises(DataError, match=r"6 fitness images .* give 3 search and 3 selection .* at least 8"):
        split_fitness_images(6, 0.5, seed=0)
    with pytest.raises(DataError, match="selection_fraction=0"):
        split_fitness_images(12, 0.9, seed=0)  # leaves 1 search image


# ----------------------------------------------------------------------------- prune end to end
@pytest.fixture(scope="module")
def setup():
    model, _ = build("timm_vit")
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, images


def _config(**kw):
    return SearchConfig(**{"num_images": 8, "num_fitness_images": 12, "batch_size": 4, **kw})


def test_an_explicit_config_wins_over_keyword_defaults(setup):
    model, images = setup
    cfg = SearchConfig(iterations=2, seed=3, sparsities=(0.3,), num_images=8, num_fitness_images=12, batch_size=4)
    out = prune(model, images, config=cfg, progress=False)
    assert len(out.history) == 2 and out.sparsities == (0.3,) and out.config["seed"] == 3
    assert cfg.iterations == 2 and cfg.seed == 3  # never mutated
    again = prune(model, images, iterations=1, config=cfg, progress=False)  # a keyword given overrides it
    assert len(again.history) == 1 and again.config["seed"] == 3 and cfg.iterations == 2


def test_no_search_ranking_is_always_a_candidate_and_wins_when_nothing_beats_it(setup):
    model, images = setup
    seen = []
    out = prune(model, images, iterations=0, sparsities=(0.3, 0.5), config=_config(), progress=False,
                callback=seen.append)
    assert seen[0]["phase"] == "c1" and np.array_equal(seen[0]["factors"], np.ones((1, out.layout.dim)))
    assert out.selection["chosen"] == "c=1" and np.array_equal(out.c, np.ones(out.layout.dim))
    assert "nothing beat c = 1" in out.selection["summary"]
    seen.clear()
    out = prune(model, images, iterations=2, sparsities=(0.3, 0.5), config=_config(), progress=False,
                callback=seen.append)
    phases = [d["phase"] for d in seen]
    assert phases == ["c1", "generation", "generation", "selection"]
    pool = out.selection["pool"]
    assert [e["name"] for e in pool[:2]] == ["c=1", "final mean"]
    assert np.allclose(seen[-1]["fitness"], [e["selection"] for e in pool])
    winner = max(range(len(pool)), key=lambda i: pool[i]["selection"])
    best = out.selection["best"]
    assert best["name"] == pool[winner]["name"] and best["confidence"] == 0.95
    sure = best["gain_interval"] is not None and best["gain_interval"][0] > 0
    if pool[winner]["selection"] > pool[0]["selection"] and sure:
        assert out.selection["chosen"] == "search" and out.selection["winner"]["name"] == pool[winner]["name"]
    else:
        assert out.selection["chosen"] == "c=1" and np.array_equal(out.c, np.ones(out.layout.dim))
    # the score file keeps the record
    assert out.config["pca_dim"] is None or out.config["pca_dim"] >= 1


class _FixedEvaluator:
    """Stands in for the search's evaluator: fixed per-image selection fitness per candidate."""

    def __init__(self, per_image):
        self.per_image = torch.as_tensor(np.stack(per_image), dtype=torch.float32)

    def per_pair(self, factors, images, score, per_image=False):
        assert per_image and len(factors) == len(self.per_image)
        return self.per_image[:, None, :]  # one sparsity


def _choose(per_image, confidence):
    from elastic_fx.search.search import _select

    space = SearchSpace(LAYOUT, "log", "global")
    pool = [("c=1", space.origin(), 0.5), ("final mean", np.full(LAYOUT.dim, 0.1), 0.6),
            ("top-1", np.linspace(-0.2, 0.2, LAYOUT.dim), 0.7)]
    return _select(pool, space, _FixedEvaluator(per_image), torch.zeros(len(per_image[0]), 3, 8, 8),
                   torch.zeros(1), None, None, confidence, seed=0)


def test_a_gain_within_the_noise_of_the_selection_images_keeps_the_no_search_ranking():
    rng = np.random.default_rng(0)
    c1 = rng.uniform(0.5, 0.9, 64)
    noisy = c1 + rng.normal(0.002, 0.05, 64)  # higher on average, but by far less than its spread
    sure = c1 + 0.01 + rng.normal(0, 0.002, 64)  # higher on (almost) every image
    assert noisy.mean() > c1.mean()
    chosen, record = _choose([c1, c1 - 0.01, noisy], 0.95)
    assert chosen[0] == "c=1" and record["chosen"] == "c=1"
    lo, hi = record["best"]["gain_interval"]
    assert record["best"]["name"] == "top-1" and lo <= 0 < hi and "reaches 0" in record["summary"]
    chosen, record = _choose([c1, c1 - 0.01, noisy], 0.0)  # any gain wins without the test
    assert chosen[0] == "top-1" and record["chosen"] == "search" and record["best"]["gain_interval"] is None
    chosen, record = _choose([c1, noisy - 0.5, sure], 0.95)
    assert chosen[0] == "top-1" and record["best"]["gain_interval"][0] > 0 and "wins on the selection" in record["summary"]


def test_paired_interval_brackets_the_mean_gain():
    from elastic_fx.search.search import paired_interval

    gain = np.random.default_rng(1).normal(0.3, 1.0, 400)
    lo, hi = paired_interval(gain, 0.95, seed=0)
    assert lo < gain.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * gain.std() / 20, rel=0.15)
    assert paired_interval(gain, 0.95, seed=0) == (lo, hi)  # seeded
    assert paired_interval(gain, 0.5, seed=0)[0] > lo


def test_selection_images_replace_the_split(setup):
    model, images = setup
    out = prune(model, images, iterations=1, sparsities=(0.3,), config=_config(), progress=False,
                selection_images=images[:6])
    assert out.config["search_images"] == 12 and out.config["selection_images"] == 6


def test_the_score_file_keeps_the_selection_and_the_ranking(setup, tmp_path):
    model, images = setup
    out = prune(model, images, iterations=1, sparsities=(0.3,), config=_config(ranking="separate"), progress=False)
    back = efx.ElasticScores.load(out.save(tmp_path / "s.efx"))
    assert back.selection == out.selection and back.ranking == "separate" and back.head_offset == 0.15
    assert np.array_equal(back.c, out.c) and back.preprocess == out.preprocess


@pytest.mark.parametrize("kw, err, match", [
    ({"ranking": "both"}, ConfigError, "ranking='both' is not one of"),
    ({"sigma0": 0.0}, ConfigError, "positive"),
    ({"sigma0": -1.0}, ConfigError, "positive"),
    ({"space": "polar"}, ConfigError, "space"),
    ({"selection_fraction": 1.0}, ConfigError, "selection_fraction"),
    ({"pca_dim": 0}, ConfigError, "pca_dim"),
    ({"fitness": "cosine"}, ConfigError, "fitness='cosine' is not one of"),
    ({"temperature": 0.0}, ConfigError, "temperature"),
    ({"selection_confidence": 1.0}, ConfigError, "selection_confidence"),
    ({"num_fitness_images": 6}, DataError, "at least 8 fitness images"),
    ({"selection_fraction": 0.95}, DataError, "search"),
])
def test_bad_search_settings_are_refused_before_any_work(setup, kw, err, match):
    model, images = setup
    with pytest.raises(err, match=match):
        prune(model, images, iterations=1, sparsities=(0.3,), config=_config(**kw), progress=False)


def test_a_model_without_normalisation_gets_imagenet_statistics_and_the_scores_remember(tmp_path, caplog):
    """A bare timm ViT built in user code, images from a folder: prune, then ElasticModel on the bare model."""
    import timm
    from PIL import Image

    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1,
                                                             num_heads=2, num_classes=0).eval()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = prune(model, str(tmp_path), iterations=1, sparsities=(0.3,), progress=False,
                config=SearchConfig(num_images=4, num_fitness_images=8, batch_size=2),
                example_inputs=(torch.randn(2, 3, 32, 32),))
    assert any("ImageNet mean/std" in r.getMessage() for r in caplog.records)
    assert tuple(out.preprocess["input_size"]) == (32, 32) and out.config["example_input_shape"] == [2, 3, 32, 32]
    path = out.save(tmp_path / "s.efx")
    small = efx.ElasticModel(model, path).at(sparsity=0.3)  # the size travelled with the scores
    assert small(torch.randn(1, 3, 32, 32)).shape[-1] == 24
