"""PCA-cosine fitness: identity, unrelated embeddings, a naive oracle, batching, small data."""

import logging

import numpy as np
import pytest
import torch

from elastic_fx.errors import DataError, NumericalError
from elastic_fx.search.fitness import PCACosineFitness, holdout_split


def _embeddings(n: int = 300, d: int = 96, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """ViT-like embeddings: a large shared offset plus anisotropic variation."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    z = z @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (z + 5.0 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)


def _noise(like: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)


def _naive(dense: np.ndarray, pruned: np.ndarray, dim: int) -> float:
    """numpy oracle: eigenvectors of the dense covariance, then a loop of cosines."""
    mu = dense.mean(axis=0)
    cov = (dense - mu).T @ (dense - mu)
    w, v = np.linalg.eigh(cov)
    comps = v[:, np.argsort(w)[::-1][:dim]]
    sims = []
    for a, b in zip(dense, pruned):
        p, q = (a - mu) @ comps, (b - mu) @ comps
        sims.append(p @ q / (np.linalg.norm(p) * np.linalg.norm(q)))
    return float(np.mean(sims))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_embeddings_score_one(dtype):
    dense = _embeddings(dtype=dtype)
    fit = PCACosineFitness(dense, dim=32)
    assert fit.dim == 32
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fit(dense), torch.tensor(1.0, dtype=dtype), atol=atol, rtol=0)


def test_unrelated_embeddings_score_near_zero():
    dense = _embeddings(n=400, seed=1)
    fit = PCACosineFitness(dense, dim=48)
    other = _embeddings(n=400, seed=2)
    unrelated = fit.mean + (other - other.mean(dim=0))  # same centroid, independent deviations
    assert abs(float(fit(unrelated))) < 0.05
    # Their raw cosine is high (the shared offset); centring is what removes it.
    assert torch.nn.functional.cosine_similarity(dense, unrelated, dim=-1).mean() > 0.9
    # Flipping the deviations from the dense mean gives exactly -1.
    mirrored = 2 * fit.mean - dense
    torch.testing.assert_close(fit(mirrored), torch.tensor(-1.0, dtype=torch.float64))
    # Collapsing every image onto the dense mean scores 0, not NaN.
    collapsed = fit.mean.expand_as(dense).clone()
    assert float(fit(collapsed)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("dim", [1, 16, 60])
def test_matches_naive_numpy(dim):
    dense = _embeddings(n=200, d=64, seed=3)
    pruned = dense + 0.05 * _noise(dense, seed=4)
    fit = PCACosineFitness(dense, dim=dim)
    expected = _naive(dense.numpy(), pruned.numpy(), dim)
    assert float(fit(pruned)) == pytest.approx(expected, abs=1e-10)
    assert float(fit(pruned)) < 1.0


def test_batched_leading_dims_match_loop_and_order_by_noise():
    dense = _embeddings(n=120, d=48, seed=5, dtype=torch.float32)
    fit = PCACosineFitness(dense, dim=24)
    g = torch.Generator().manual_seed(6)
    levels = torch.tensor([0.0, 0.01, 0.1, 1.0])
    pruned = torch.stack(
        [torch.stack([dense + lv * torch.randn(dense.shape, generator=g) for lv in levels]) for _ in range(3)]
    )  # [candidates=3, sparsities=4, N, D]
    scores = fit(pruned)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    for c in range(3):
        for s in range(4):
            torch.testing.assert_close(scores[c, s], fit(pruned[c, s]))
        assert torch.all(scores[c, :-1] > scores[c, 1:])  # more noise, lower fitness
    torch.testing.assert_close(fit.candidate_fitness(pruned), scores.mean(dim=1))
    assert fit.project(pruned).shape == (3, 4, 120, 24)
    assert fit.per_image(pruned).shape == (3, 4, 120)


def test_float32_agrees_with_float64():
    dense = _embeddings(n=150, d=40, seed=7)
    pruned = dense + 0.2 * _noise(dense, seed=8)
    f64 = PCACosineFitness(dense, dim=20)(pruned)
    f32 = PCACosineFitness(dense.float(), dim=20)(pruned.float())
    assert float(f32) == pytest.approx(float(f64), abs=1e-5)


def test_fewer_images_than_dims_lowers_dim_with_warning(caplog):
    dense = _embeddings(n=50, d=64, seed=9)
    with caplog.at_level(logging.WARNING, logger="elastic_fx.search.fitness"):
        fit = PCACosineFitness(dense)  # default 192 > 50 images
    assert fit.dim == 49  # 50 centred points span 49 directions
    assert "192" in caplog.text and "49" in caplog.text
    torch.testing.assert_close(fit(dense), torch.tensor(1.0, dtype=torch.float64))
    narrow = PCACosineFitness(_embeddings(n=300, d=16, seed=9), dim=192)
    assert narrow.dim == 16
    assert float(narrow.explained_variance_ratio.sum()) == pytest.approx(1.0)


def test_bad_inputs_raise_data_errors():
    with pytest.raises(DataError, match="at least 2"):
        PCACosineFitness(torch.randn(1, 8))
    with pytest.raises(DataError, match="expected a tensor \\[N images, D\\]"):
        PCACosineFitness(torch.randn(4, 2, 8))
    with pytest.raises(NumericalError):
        PCACosineFitness(torch.tensor([[0.0, float("nan")], [1.0, 2.0], [3.0, 1.0]]))
    fit = PCACosineFitness(torch.randn(10, 8), dim=4)
    with pytest.raises(DataError, match="expected \\[..., 10, 8\\]"):
        fit(torch.randn(9, 8))
    with pytest.raises(DataError, match="width 7"):
        fit.project(torch.randn(10, 7))


def test_holdout_split_and_heldout_scoring():
    search, held = holdout_split(100, 0.2, seed=0)
    assert len(search) == 80 and len(held) == 20
    assert sorted(torch.cat([search, held]).tolist()) == list(range(100))
    assert torch.equal(holdout_split(100, 0.2, seed=0)[1], held)
    dense = _embeddings(n=100, d=32, seed=10)
    pruned = dense + 0.3 * _noise(dense, seed=11)
    fit = PCACosineFitness(dense[search], dim=16)
    held_score = fit(pruned[held], dense=dense[held])
    cos = torch.nn.functional.cosine_similarity
    expected_sims = cos(fit.project(pruned[held]), fit.project(dense[held]), dim=-1)
    torch.testing.assert_close(held_score, expected_sims.mean())
    with pytest.raises(DataError, match="holdout_fraction"):
        holdout_split(10, 1.0)


# ----------------------------------------------------------------------------- neighbourhood fitness
def _cloud(n=30, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_neighbourhood_fitness_is_one_for_the_dense_embeddings_and_ignores_rotation_and_scale():
    from elastic_fx.search.fitness import NeighbourhoodFitness

    dense = _cloud()
    fit = NeighbourhoodFitness(dense)
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    assert float(fit(dense)) == pytest.approx(1.0)
    assert float(fit(3.0 * dense @ q)) == pytest.approx(1.0)  # k-NN cannot see a rotation or a rescaling
    per = fit.per_image(torch.stack([dense, dense + 0.2 * _cloud(seed=2), _cloud(seed=3)]))
    assert per.shape == (3, 30) and ((per >= 0) & (per <= 1 + 1e-9)).all()
    small, large = fit(dense + 0.2 * _cloud(seed=2)), fit(dense + 1.0 * _cloud(seed=2))
    assert 1.0 > float(small) > float(large) > float(fit(_cloud(seed=3))) - 0.05


def test_neighbourhood_fitness_scores_held_out_images_against_their_own_dense_neighbours():
    from elastic_fx.search.fitness import NeighbourhoodFitness

    fit = NeighbourhoodFitness(_cloud(n=20))
    other = _cloud(n=12, seed=5)
    assert float(fit(other, dense=other)) == pytest.approx(1.0)
    assert float(fit(other + 0.5 * _cloud(n=12, seed=6), dense=other)) < 0.9


def test_neighbourhood_fitness_only_sees_which_images_are_close():
    """Moving one image far from its neighbours costs that image (and its neighbours), not the rest."""
    from elastic_fx.search.fitness import NeighbourhoodFitness

    dense = _cloud(n=24, d=6)
    fit = NeighbourhoodFitness(dense, temperature=0.05)
    moved = dense.clone()
    moved[0] = -moved[0]
    per = fit.per_image(moved)
    assert float(per[0]) < 0.5 and float(per[1:].min()) > float(per[0])


@pytest.mark.parametrize("dense, kw, err, match", [
    (torch.zeros(2, 4), {}, "DataError", "at least 3"),
    (torch.full((5, 4), float("nan")), {}, "NumericalError", "NaN"),
    (torch.randn(5, 4), {"temperature": 0.0}, "DataError", "temperature"),
    (torch.randn(5), {}, "DataError", "shape"),
])
def test_neighbourhood_fitness_bad_input(dense, kw, err, match):
    import elastic_fx.errors as errors
    from elastic_fx.search.fitness import NeighbourhoodFitness

    with pytest.raises(getattr(errors, err), match=match):
        NeighbourhoodFitness(dense, **kw)
    if err == "DataError" and kw:
        return
    fit = NeighbourhoodFitness(torch.randn(5, 4))
    with pytest.raises(errors.DataError, match="expected"):
        fit(torch.randn(6, 4))
