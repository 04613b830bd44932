"""Linear CKA: invariances, a naive Gram oracle, the mixed-width matrix, and the SPD covariance."""

import logging

import numpy as np
import pytest
import torch

from elastic_fx.errors import DataError, NumericalError
from elastic_fx.search import cka as cka_mod
from elastic_fx.search.cka import cka_covariance, cka_matrix, linear_cka
from elastic_fx.search.xnes import XNES


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _naive_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC form with explicit N x N Grams and the centring matrix H = I - 11^T / N."""
    x = x.reshape(x.shape[0], -1).double().numpy()
    y = y.reshape(y.shape[0], -1).double().numpy()
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, lc = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(kc * lc) / (np.linalg.norm(kc) * np.linalg.norm(lc)))


def _related(n: int, widths, seed: int):
    """Features that share a latent factor, so CKA values spread over (0, 1)."""
    g = _gen(seed)
    latent = torch.randn(n, 8, generator=g, dtype=torch.float64)
    feats = []
    for i, w in enumerate(widths):
        mix = torch.randn(8, w, generator=g, dtype=torch.float64)
        own = torch.randn(n, w, generator=g, dtype=torch.float64)
        feats.append((0.3 * i + 0.5) * latent @ mix + own + 3.0)
    return feats


def test_self_similarity_is_one():
    x = torch.randn(40, 7, generator=_gen(0))
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    wide = torch.randn(10, 50, generator=_gen(1))  # more features than inputs: Gram path
    assert float(linear_cka(wide, wide)) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transform_and_isotropic_scale():
    x, y = _related(60, [12, 9], seed=2)
    base = float(linear_cka(x, y))
    q = torch.linalg.qr(torch.randn(12, 12, generator=_gen(3), dtype=torch.float64))[0]
    assert float(linear_cka(x @ q, y)) == pytest.approx(base, abs=1e-12)
    assert float(linear_cka(4.5 * x, 0.01 * y)) == pytest.approx(base, abs=1e-12)
    assert float(linear_cka(x + 7.0, y)) == pytest.approx(base, abs=1e-12)  # centring
    # but not to an anisotropic scaling
    stretched = x * torch.linspace(0.1, 10, 12, dtype=torch.float64)
    assert float(linear_cka(stretched, y)) != pytest.approx(base, abs=1e-3)


@pytest.mark.parametrize("shapes", [((50, 6), (50, 11)), ((20, 64), (20, 5)), ((15, 40), (15, 3, 10))])
def test_matches_naive_gram_formula(shapes):
    g = _gen(4)
    x = torch.randn(*shapes[0], generator=g, dtype=torch.float64)
    y = torch.randn(*shapes[1], generator=g, dtype=torch.float64)
    y = y + 0.5 * x[:, 0].reshape((-1,) + (1,) * (y.ndim - 1))  # correlate them
    assert float(linear_cka(x, y)) == pytest.approx(_naive_cka(x, y), abs=1e-12)
    assert 0.0 <= float(linear_cka(x, y)) <= 1.0


def test_cka_matrix_matches_pairwise_with_mixed_widths(monkeypatch):
    n = 24
    widths = [4, 30, 8, 50, 1, 24]  # narrow (<= N) and wide (> N) structures interleaved
    feats = _related(n, widths, seed=5)
    feats[2] = feats[2].reshape(n, 2, 4)  # trailing dims are flattened
    monkeypatch.setattr(cka_mod, "_CHUNK_ENTRIES", 50)  # force several column chunks
    m = cka_matrix(feats)
    assert m.shape == (6, 6) and m.dtype == torch.float64
    for i in range(6):
        for j in range(6):
            assert float(m[i, j]) == pytest.approx(_naive_cka(feats[i], feats[j]), abs=1e-10)
    torch.testing.assert_close(m, m.T, rtol=0, atol=0)
    assert float(torch.linalg.eigvalsh(m).min()) > -1e-10  # a Gram matrix of unit vectors


def test_cka_matrix_constant_structure_and_bad_inputs(caplog):
    feats = [torch.randn(10, 3, generator=_gen(6)), torch.ones(10, 4), torch.randn(10, 20, generator=_gen(7))]
    with caplog.at_level(logging.WARNING, logger="elastic_fx.search.cka"):
        m = cka_matrix(feats)
    assert "constant activations" in caplog.text
    assert torch.all(m[1, [0, 2]] == 0) and m[1, 1] == 1
    with pytest.raises(DataError, match="same N inputs"):
        cka_matrix([torch.randn(10, 3), torch.randn(9, 3)])
    with pytest.raises(DataError, match="no features"):
        cka_matrix([])
    with pytest.raises(DataError, match="at least 2 inputs"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(NumericalError):
        linear_cka(torch.tensor([[1.0], [float("inf")]]), torch.randn(2, 1))


def test_cka_covariance_is_spd_with_unit_diagonal():
    feats = _related(30, [5] * 8, seed=8)
    feats.append(feats[0].clone())  # an exact duplicate makes the CKA matrix singular
    m = cka_matrix(feats)
    assert float(torch.linalg.eigvalsh(m).min()) < 1e-10
    noisy = m + 1e-3 * torch.randn(9, 9, generator=_gen(9), dtype=torch.float64)  # not symmetric
    cov = cka_covariance(noisy, min_eig=1e-2)
    torch.testing.assert_close(cov, cov.T, rtol=0, atol=0)
    torch.testing.assert_close(cov.diagonal(), torch.ones(9, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(cov).min()) > 5e-3
    torch.testing.assert_close(cov, m, atol=0.05, rtol=0)  # repaired, not rewritten
    shrunk = cka_covariance(m, shrinkage=1.0, scale=2.0)
    torch.testing.assert_close(shrunk, 2.0 * torch.eye(9, dtype=torch.float64))
    opt = XNES(np.ones(9), cov0=cov)
    np.testing.assert_allclose(opt.cov, cov.numpy(), rtol=1e-9, atol=1e-12)


def test_cka_covariance_rejects_bad_matrices():
    with pytest.raises(DataError, match="square"):
        cka_covariance(torch.ones(2, 3))
    with pytest.raises(DataError, match="non-positive diagonal"):
        cka_covariance(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(NumericalError):
        cka_covariance(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(DataError, match="shrinkage"):
        cka_covariance(torch.eye(2), shrinkage=1.5)
