"""xNES: defaults, utilities, convergence, Hessian alignment, determinism and exact resume."""

import io
import math

import numpy as np
import pytest
import torch

from elastic_fx.errors import ElasticFxError, NumericalError, ScoresError
from elastic_fx.search.xnes import (
    XNES,
    XNESConfig,
    default_learning_rate,
    default_popsize,
    expm_symmetric,
    initial_mean,
    rank_utilities,
)


def _quadratic(hessian: np.ndarray, optimum: np.ndarray):
    """Fitness to MAXIMISE: -(x - x*)^T H (x - x*), one value per row."""

    def f(x: np.ndarray) -> np.ndarray:
        z = x - optimum
        return -np.einsum("ni,ij,nj->n", z, hessian, z)

    return f


def _rotated_ellipsoid(d: int, log10_cond: float, seed: int):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eigvals = np.logspace(0.0, log10_cond, d)
    return (q * eigvals) @ q.T, q, rng.standard_normal(d)


def _run(opt: XNES, f, generations: int) -> None:
    for _ in range(generations):
        x = opt.ask()
        opt.tell(x, f(x))


# ------------------------------------------------------------------ defaults
@pytest.mark.parametrize("d, expected", [(156, 19), (84, 17), (10, 10), (1, 4)])
def test_popsize_formula(d, expected):
    assert default_popsize(d) == expected
    assert XNES(np.zeros(d)).popsize == expected
    assert XNES(np.zeros(d)).ask().shape == (expected, d)


def test_learning_rate_formula_and_overrides():
    d = 156
    assert default_learning_rate(d) == pytest.approx(0.6 * (3 + math.log(d)) / (d * math.sqrt(d)))
    opt = XNES(np.zeros(d))
    assert opt.eta_sigma == opt.eta_B == default_learning_rate(d)
    custom = XNES(np.zeros(d), XNESConfig(popsize=7, eta_sigma=0.3, eta_B=0.2))
    assert (custom.popsize, custom.eta_sigma, custom.eta_B) == (7, 0.3, 0.2)


@pytest.mark.parametrize(
    "config",
    [XNESConfig(popsize=1), XNESConfig(sigma0=0.0), XNESConfig(eta_mu=-1.0), XNESConfig(eta_B=float("nan"))],
)
def test_invalid_config_rejected(config):
    with pytest.raises(ElasticFxError, match="XNESConfig is invalid"):
        XNES(np.zeros(5), config)


def test_rank_utilities_follow_the_formula():
    n = 19
    rng = np.random.default_rng(0)
    fitness = rng.standard_normal(n)
    u = rank_utilities(fitness)
    raw = np.maximum(0.0, np.log(n / 2 + 1) - np.log(np.arange(1, n + 1)))
    expected_by_rank = raw / raw.sum() - 1.0 / n
    np.testing.assert_allclose(u[np.argsort(-fitness)], expected_by_rank, rtol=0, atol=1e-15)
    assert abs(u.sum()) < 1e-12
    assert u[np.argmax(fitness)] == u.max()


def test_rank_utilities_share_ties_and_ignore_order():
    f = np.array([3.0, 1.0, 3.0, 0.0, 2.0, 1.0])
    u = rank_utilities(f)
    assert u[0] == u[2] and u[1] == u[5]
    assert u[0] > u[4] > u[1] >= u[3]  # ranks past n/2 all get -1/n
    perm = np.array([5, 3, 1, 0, 4, 2])
    np.testing.assert_array_equal(rank_utilities(f[perm]), u[perm])


def test_expm_symmetric_matches_torch():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 6))
    a = 0.3 * (a + a.T)
    ours = expm_symmetric(a)
    ref = torch.linalg.matrix_exp(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ours, ours.T)


# --------------------------------------------------------------- initial mean
def test_initial_mean_layout_vit_b():
    m = initial_mean(12, [12] * 12)
    assert m.shape == (12 + 144,) and m.dtype == np.float64
    ramp = np.linspace(1.2, 0.8, 12)
    np.testing.assert_allclose(m[:12], ramp)
    np.testing.assert_allclose(m[12:].reshape(12, 12), np.repeat(ramp[:, None], 12, axis=1))
    assert m[0] == pytest.approx(1.2) and m[-1] == pytest.approx(0.8)


def test_initial_mean_uneven_blocks():
    m = initial_mean(2, [1, 0, 3], start=2.0, end=0.0)
    np.testing.assert_allclose(m, [2.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    m = initial_mean(2, [1, 0, 3], start=2.0, end=0.0, ffn_block_indices=[1, 2])
    np.testing.assert_allclose(m[:2], [1.0, 0.0])
    with pytest.raises(ElasticFxError, match="ffn_block_indices"):
        initial_mean(2, [1, 1], ffn_block_indices=[0, 5])
    with pytest.raises(ElasticFxError, match="no FFN blocks and no heads"):
        initial_mean(0, [])


# ------------------------------------------------------------------ optimising
def test_converges_on_sphere_d10():
    d = 10
    optimum = np.linspace(-1.0, 1.0, d)
    opt = XNES(np.full(d, 3.0), XNESConfig(seed=0))
    f = _quadratic(np.eye(d), optimum)
    start = -f(opt.mean[None])[0]
    _run(opt, f, 600)
    assert np.linalg.norm(opt.mean - optimum) < 1e-3
    best_x, best_f = opt.best
    assert -best_f < 1e-6 * start
    assert best_f == pytest.approx(f(best_x[None])[0], rel=0, abs=0)
    assert opt.sigma < 1e-3 and opt.generation == 600


@pytest.mark.parametrize("seed", [0, 1])
def test_rotated_ellipsoid_cov_inverse_aligns_with_hessian(seed):
    """The paper's claim: Sigma^-1 adapts to the Hessian (here cond(H) = 1000, d = 10)."""
    d = 10
    hessian, q, optimum = _rotated_ellipsoid(d, 3.0, seed=100 + seed)
    opt = XNES(np.full(d, 3.0), XNESConfig(seed=seed))
    f = _quadratic(hessian, optimum)
    chol = np.linalg.cholesky(hessian)
    assert np.linalg.cond(chol.T @ opt.cov @ chol) == pytest.approx(1000.0)
    _run(opt, f, 300)
    # Average the scale-free precision over 300 more generations to beat sampling noise.
    precision = np.zeros((d, d))
    for _ in range(300):
        _run(opt, f, 1)
        p = np.linalg.inv(opt.cov)
        precision += p / np.trace(p)
    assert np.linalg.norm(opt.mean - optimum) < 1e-2
    # Whitened by the true Hessian, the learned covariance is close to isotropic.
    assert np.linalg.cond(chol.T @ opt.cov @ chol) < 20.0
    assert np.linalg.cond(chol.T @ np.linalg.inv(precision) @ chol) < 6.0
    _, vecs = np.linalg.eigh(precision)
    assert abs(vecs[:, -1] @ q[:, -1]) > 0.9  # steepest direction
    assert abs(vecs[:, 0] @ q[:, 0]) > 0.9  # flattest direction


def test_cov0_sets_initial_covariance():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 5))
    cov0 = a @ a.T + 0.5 * np.eye(5)
    opt = XNES(np.zeros(5), XNESConfig(sigma0=0.5, popsize=4000), cov0=cov0)
    np.testing.assert_allclose(opt.cov, 0.25 * cov0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(opt.B, opt.B.T, atol=1e-12)  # B = e^A, A symmetric
    assert np.linalg.det(opt.B) == pytest.approx(1.0)
    samples = opt.ask()
    np.testing.assert_allclose(np.cov(samples.T), 0.25 * cov0, atol=0.1 * np.abs(cov0).max())
    with pytest.raises(ElasticFxError, match="positive definite"):
        XNES(np.zeros(2), cov0=np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ElasticFxError, match="expected \\[5, 5\\]"):
        XNES(np.zeros(5), cov0=np.eye(4))


def test_tell_accepts_reordered_candidates():
    """Candidates not straight from ask() are mapped back by solving B s = (x - m) / sigma."""
    d = 6
    f = _quadratic(np.diag(np.arange(1.0, d + 1)), np.ones(d))
    a = XNES(np.zeros(d), XNESConfig(seed=4))
    b = XNES(np.zeros(d), XNESConfig(seed=4))
    _run(a, f, 5)
    _run(b, f, 5)
    x = a.ask()
    perm = np.random.default_rng(0).permutation(len(x))
    a.tell(x, f(x))
    b.tell(b.ask()[perm], f(x)[perm])
    np.testing.assert_allclose(b.mean, a.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.cov, a.cov, rtol=1e-9, atol=1e-12)


def test_tell_validates_and_ranks_nan_last(caplog):
    opt = XNES(np.zeros(3), XNESConfig(popsize=4))
    x = opt.ask()
    with pytest.raises(ElasticFxError, match="expected candidates"):
        opt.tell(x[:, :2], np.zeros(4))
    with pytest.raises(NumericalError, match="none is finite"):
        opt.tell(x, np.full(4, np.nan))
    opt.tell(x, np.array([np.nan, 1.0, 2.0, 0.0]))
    assert "not finite" in caplog.text
    assert opt.best[1] == 2.0 and np.array_equal(opt.best[0], x[2])


# -------------------------------------------------------- determinism / resume
def test_same_seed_same_run_different_seed_different_run():
    d = 8
    f = _quadratic(np.eye(d), np.zeros(d))
    runs = []
    for seed in (7, 7, 8):
        opt = XNES(np.ones(d), XNESConfig(seed=seed))
        _run(opt, f, 20)
        runs.append((opt.mean, opt.cov))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])


def test_ask_is_idempotent_until_tell():
    opt = XNES(np.zeros(4))
    np.testing.assert_array_equal(opt.ask(), opt.ask())


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("split_between_ask_and_tell", [False, True])
def test_resume_is_bit_identical(split_between_ask_and_tell):
    d, t = 12, 15
    hessian, _, optimum = _rotated_ellipsoid(d, 2.0, seed=5)
    f = _quadratic(hessian, optimum)
    mean0 = initial_mean(3, [3, 3, 3])
    straight = XNES(mean0, XNESConfig(seed=11))
    _run(straight, f, 2 * t)

    first = XNES(mean0, XNESConfig(seed=11))
    _run(first, f, t)
    if split_between_ask_and_tell:
        pending = first.ask()
    resumed = XNES.from_state_dict(_roundtrip(first.state_dict()))
    if split_between_ask_and_tell:
        np.testing.assert_array_equal(resumed.ask(), pending)
    _run(resumed, f, t)

    assert resumed.generation == straight.generation == 2 * t
    np.testing.assert_array_equal(resumed.mean, straight.mean)
    np.testing.assert_array_equal(resumed.cov, straight.cov)
    assert resumed.sigma == straight.sigma
    np.testing.assert_array_equal(resumed.best[0], straight.best[0])
    assert resumed.best[1] == straight.best[1]
    np.testing.assert_array_equal(resumed.ask(), straight.ask())


def test_from_state_dict_rejects_foreign_or_broken_state():
    with pytest.raises(ScoresError, match="not an xNES state"):
        XNES.from_state_dict({"mean": torch.zeros(3)})
    state = XNES(np.zeros(3)).state_dict()
    del state["B"]
    with pytest.raises(ScoresError, match="incomplete or corrupt"):
        XNES.from_state_dict(state)
