"""Exponential natural evolution strategy (xNES), as an ask/tell optimiser.

The search runs over the global reweighting vector ``c`` in R^d, one factor per FFN
block and one per attention head (``d = 156`` for a ViT-B/16). The search
distribution is ``N(mean, Sigma)`` with ``Sigma = sigma^2 B B^T``. ``B`` is kept with
determinant 1 and is updated multiplicatively through the matrix exponential of a
symmetric, trace-free natural gradient, so the covariance stays symmetric positive
definite by construction (the exponential parameterisation of Glasmachers et al.,
2010, cited by the paper as [19]).

One generation::

    s_k ~ N(0, I)                    x_k = mean + sigma * B s_k       (ask)
    u_k = rank utility of x_k        (higher fitness -> larger u_k; we MAXIMISE)
    G_delta = sum_k u_k s_k          G_M = sum_k u_k (s_k s_k^T - I)
    G_sigma = tr(G_M) / d            G_B = G_M - G_sigma I
    mean  <- mean + eta_mu * sigma * B G_delta
    sigma <- sigma * exp(eta_sigma / 2 * G_sigma)
    B     <- B expm(eta_B / 2 * G_B)                                  (tell)

Defaults (from the reference notes): population ``4 + floor(3 ln d)``, ``eta_mu = 1``,
``eta_sigma = eta_B = 0.6 (3 + ln d) / (d sqrt d)``, utilities
``max(0, ln(lambda/2 + 1) - ln(rank))`` normalised to sum 1, minus ``1/lambda``.

On a quadratic landscape the covariance adapts towards the inverse Hessian, which is
why the paper reads ``Sigma^-1`` as a surrogate of the inter-block curvature.

Everything is float64 numpy; randomness comes from one seeded ``numpy`` PCG64
generator whose state is part of :meth:`XNES.state_dict`, so a run that is saved and
restored continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import ElasticFxError, NumericalError, ScoresError

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

#: Tag written into :meth:`XNES.state_dict` so a foreign dict is recognised.
STATE_FORMAT = "elastic_fx.xnes"
STATE_VERSION = 1


@dataclass(frozen=True)
class XNESConfig:
    """Hyper-parameters of :class:`XNES`; ``None`` means "the default for this ``d``".

    Attributes:
        popsize: candidates per generation; ``None`` -> ``4 + floor(3 ln d)``.
        eta_mu: learning rate of the mean.
        eta_sigma: learning rate of the global step size; ``None`` -> the default rate.
        eta_B: learning rate of the shape matrix ``B``; ``None`` -> the default rate.
        sigma0: initial global step size (multiplies ``cov0`` when one is given).
        seed: seed of the PCG64 generator that draws the candidates.
    """

    popsize: Optional[int] = None
    eta_mu: float = 1.0
    eta_sigma: Optional[float] = None
    eta_B: Optional[float] = None
    sigma0: float = 1.0
    seed: int = 0


def default_popsize(d: int) -> int:
    """``4 + floor(3 ln d)``: 19 for d = 156 (ViT-B/16), 17 for d = 84 (ViT-S/16)."""
    return 4 + int(math.floor(3.0 * math.log(d)))


def default_learning_rate(d: int) -> float:
    """``0.6 (3 + ln d) / (d sqrt d)``, the rate for both ``sigma`` and ``B``."""
    return 0.6 * (3.0 + math.log(d)) / (d * math.sqrt(d))


def rank_utilities(fitness: np.ndarray) -> np.ndarray:
    """Rank-based utilities for a population (higher fitness is better).

    ``u(rank) = max(0, ln(n/2 + 1) - ln(rank))`` for ranks 1..n, normalised to sum 1,
    minus ``1/n``, so the utilities sum to zero. Candidates with equal fitness share the
    mean utility of the ranks they occupy, which makes the update independent of the
    order in which tied candidates were listed (identical pruning masks tie often).
    """
    f = np.asarray(fitness, dtype=np.float64)
    n = f.shape[0]
    ranks = np.arange(1, n + 1, dtype=np.float64)
    raw = np.maximum(0.0, math.log(n / 2.0 + 1.0) - np.log(ranks))
    by_rank = raw / raw.sum() - 1.0 / n
    order = np.argsort(-f, kind="stable")
    utilities = np.empty(n, dtype=np.float64)
    utilities[order] = by_rank
    for value in np.unique(f[~np.isnan(f)]):
        tied = f == value
        if tied.sum() > 1:
            utilities[tied] = utilities[tied].mean()
    return utilities


def expm_symmetric(m: np.ndarray) -> np.ndarray:
    """Matrix exponential of a symmetric matrix through its eigendecomposition.

    ``expm(V diag(w) V^T) = V diag(exp(w)) V^T``. For symmetric input this is the sound
    choice: ``eigh`` is backward stable, the exponential of each eigenvalue is exact to
    rounding, and the result is symmetric positive definite by construction, which a
    generic Pade/scaling-and-squaring ``matrix_exp`` only gives up to rounding.
    """
    sym = 0.5 * (m + m.T)
    w, v = np.linalg.eigh(sym)
    e = (v * np.exp(w)) @ v.T
    return 0.5 * (e + e.T)  # exactly symmetric, not just up to rounding


def initial_mean(
    blocks_with_ffn: int,
    heads_per_block: Sequence[int],
    start: float = 1.2,
    end: float = 0.8,
    ffn_block_indices: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Initial xNES mean: a linear ramp ``start -> end`` over depth (later blocks pruned more).

    Layout of the candidate vector: ``[one factor per FFN block ..., then one factor
    per head, block by block]``. Block ``b`` of ``L = len(heads_per_block)`` blocks gets
    ``linspace(start, end, L)[b]`` and each of its heads gets that value.

    FFN factors: by default the ``i``-th FFN belongs to block ``i`` when
    ``blocks_with_ffn == L``; otherwise, without ``ffn_block_indices``, the FFN factors
    get their own ramp ``linspace(start, end, blocks_with_ffn)``. Pass
    ``ffn_block_indices`` (the block of each FFN) to place them on the block ramp.
    A single block gets ``start``.
    """
    heads = [int(h) for h in heads_per_block]
    if blocks_with_ffn < 0 or any(h < 0 for h in heads):
        raise ElasticFxError(
            f"initial_mean got blocks_with_ffn={blocks_with_ffn} and heads_per_block={heads}; "
            "expected non-negative counts. Pass the counts found by discover()."
        )
    num_blocks = len(heads)
    block_ramp = np.linspace(start, end, num_blocks, dtype=np.float64)
    if ffn_block_indices is not None:
        idx = [int(i) for i in ffn_block_indices]
        if len(idx) != blocks_with_ffn or any(not 0 <= i < num_blocks for i in idx):
            raise ElasticFxError(
                f"initial_mean got ffn_block_indices={idx} for blocks_with_ffn={blocks_with_ffn} "
                f"and {num_blocks} blocks; expected {blocks_with_ffn} block indices in "
                f"[0, {num_blocks})."
            )
        ffn = block_ramp[idx]
    elif blocks_with_ffn == num_blocks:
        ffn = block_ramp.copy()
    else:
        ffn = np.linspace(start, end, blocks_with_ffn, dtype=np.float64)
    head_values = np.repeat(block_ramp, heads) if num_blocks else np.zeros(0)
    mean = np.concatenate([ffn, head_values]).astype(np.float64)
    if mean.size == 0:
        raise ElasticFxError(
            "initial_mean got no FFN blocks and no heads; expected at least one structure "
            "to search over. Check that discover() found the model's blocks."
        )
    return mean


def _as_float64(x: ArrayLike, what: str) -> np.ndarray:
    """``x`` as a float64 numpy array (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.array(x, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(arr)):
        raise NumericalError(f"xNES {what} contains NaN or inf; expected finite numbers.")
    return arr


def _check_config(config: XNESConfig) -> None:
    """Reject hyper-parameters that make no sense, before anything is sampled."""
    problems = []
    if config.popsize is not None and config.popsize < 2:
        problems.append(f"popsize={config.popsize} (need >= 2 or None)")
    for name in ("eta_mu", "eta_sigma", "eta_B", "sigma0"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            problems.append(f"{name}={value} (need a finite positive number)")
    if problems:
        raise ElasticFxError(
            "XNESConfig is invalid: " + "; ".join(problems) + ". Leave a field as None "
            "to use the default for the search dimension."
        )


class XNES:
    """xNES ask/tell optimiser that MAXIMISES a fitness over ``R^d``.

    Usage::

        opt = XNES(initial_mean(12, [12] * 12), XNESConfig(seed=0))
        for _ in range(50):
            xs = opt.ask()                      # [popsize, d] float64
            opt.tell(xs, evaluate(xs))          # fitness [popsize], higher is better
        best_x, best_f = opt.best               # the best single sample ever seen

    ``cov0`` (e.g. from :func:`elastic_fx.search.cka.cka_covariance`) sets the initial
    covariance to ``sigma0^2 * cov0``; without it the covariance starts at
    ``sigma0^2 * I``.
    """

    def __init__(
        self,
        mean0: ArrayLike,
        config: XNESConfig = XNESConfig(),
        cov0: Optional[ArrayLike] = None,
    ) -> None:
        _check_config(config)
        mean = _as_float64(mean0, "mean0")
        if mean.ndim != 1 or mean.size == 0:
            raise ElasticFxError(
                f"xNES mean0 has shape {tuple(mean.shape)}; expected a non-empty vector [d]."
            )
        self._config = config
        self._d = int(mean.size)
        self._mean = mean
        self._sigma, self._B = self._initial_shape(cov0, float(config.sigma0))
        self._rng = np.random.Generator(np.random.PCG64(config.seed))
        self._generation = 0
        self._best_x: Optional[np.ndarray] = None
        self._best_f = -math.inf
        self._pending: Optional[np.ndarray] = None  # standard-normal samples of the last ask

    # ------------------------------------------------------------------ set-up
    def _initial_shape(self, cov0: Optional[ArrayLike], sigma0: float) -> Tuple[float, np.ndarray]:
        """Split ``sigma0^2 * cov0`` into a step size and a unit-determinant ``B``.

        ``B`` is the symmetric square root ``expm(log(cov0) / 2)`` divided by
        ``det(cov0)^(1/2d)``, i.e. ``B = e^A`` with ``A`` symmetric, as in the paper.
        """
        d = self._d
        if cov0 is None:
            return sigma0, np.eye(d)
        cov = _as_float64(cov0, "cov0")
        if cov.shape != (d, d):
            raise ElasticFxError(
                f"xNES cov0 has shape {tuple(cov.shape)}; expected [{d}, {d}] to match mean0."
            )
        if not np.allclose(cov, cov.T, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(cov).max())):
            raise ElasticFxError(
                "xNES cov0 is not symmetric; expected a symmetric positive definite matrix. "
                "Build it with elastic_fx.search.cka.cka_covariance()."
            )
        w, v = np.linalg.eigh(0.5 * (cov + cov.T))
        if w.min() <= 0:
            raise ElasticFxError(
                f"xNES cov0 has smallest eigenvalue {w.min():.3g}; expected a positive definite "
                "matrix. Build it with elastic_fx.search.cka.cka_covariance(), which clips "
                "eigenvalues."
            )
        log_w = np.log(w)
        scale = math.exp(log_w.mean() / 2.0)  # det(cov0)^(1/2d)
        B = (v * np.exp(0.5 * (log_w - log_w.mean()))) @ v.T
        return sigma0 * scale, B

    # ------------------------------------------------------------ properties
    @property
    def config(self) -> XNESConfig:
        return self._config

    @property
    def dim(self) -> int:
        """Search dimension ``d``."""
        return self._d

    @property
    def popsize(self) -> int:
        return self._config.popsize or default_popsize(self._d)

    @property
    def eta_sigma(self) -> float:
        return self._config.eta_sigma or default_learning_rate(self._d)

    @property
    def eta_B(self) -> float:
        return self._config.eta_B or default_learning_rate(self._d)

    @property
    def mean(self) -> np.ndarray:
        """Current mean ``[d]`` (a copy)."""
        return self._mean.copy()

    @property
    def sigma(self) -> float:
        """Global step size."""
        return self._sigma

    @property
    def B(self) -> np.ndarray:
        """Unit-determinant shape matrix ``[d, d]`` (a copy)."""
        return self._B.copy()

    @property
    def cov(self) -> np.ndarray:
        """Current covariance ``sigma^2 B B^T`` ``[d, d]``."""
        return self._sigma**2 * (self._B @ self._B.T)

    @property
    def best(self) -> Tuple[Optional[np.ndarray], float]:
        """Best single candidate told so far and its fitness; ``(None, -inf)`` before any tell."""
        x = None if self._best_x is None else self._best_x.copy()
        return x, self._best_f

    @property
    def generation(self) -> int:
        """Number of completed ``tell`` calls."""
        return self._generation

    # --------------------------------------------------------------- ask/tell
    def ask(self) -> np.ndarray:
        """Candidates ``[popsize, d]`` (float64) for this generation.

        Asking twice without a ``tell`` returns the same candidates: the generator only
        advances once per generation, so results depend on the seed and the history of
        ``tell`` calls alone.
        """
        if self._pending is None:
            self._pending = self._rng.standard_normal((self.popsize, self._d))
        return self._mean + self._sigma * (self._pending @ self._B.T)

    def tell(self, candidates: ArrayLike, fitness: ArrayLike) -> None:
        """Update the distribution from candidates and their fitness (higher is better).

        ``candidates`` are normally exactly what :meth:`ask` returned; other points
        (e.g. injected by hand) are accepted and mapped back to the standard-normal
        frame by solving ``B s = (x - mean) / sigma``. Non-finite fitness values rank
        last (with a warning); if all are non-finite a :class:`NumericalError` is raised.
        """
        x, f = self._check_told(candidates, fitness)
        samples = self._samples_for(x)
        self._update_best(x, f)
        self._update_distribution(samples, f)
        self._pending = None
        self._generation += 1

    def _check_told(self, candidates: ArrayLike, fitness: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
        """Validate shapes; map non-finite fitness to ``-inf``."""
        x = _as_float64(candidates, "candidates")
        if isinstance(fitness, torch.Tensor):
            fitness = fitness.detach().to("cpu", torch.float64).numpy()
        f = np.array(fitness, dtype=np.float64, copy=True).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self._d or x.shape[0] != f.shape[0] or x.shape[0] < 1:
            raise ElasticFxError(
                f"xNES.tell got candidates {tuple(x.shape)} and fitness {tuple(f.shape)}; "
                f"expected candidates [n, {self._d}] and fitness [n] with the same n >= 1 "
                "(pass exactly what ask() returned)."
            )
        bad = ~np.isfinite(f)
        if bad.all():
            raise NumericalError(
                f"xNES.tell got {f.size} fitness values and none is finite; expected at least "
                "one finite value. Check the embeddings of the pruned candidates for NaN."
            )
        if bad.any():
            logger.warning("xNES: %d of %d fitness values are not finite; ranking them last.",
                           int(bad.sum()), f.size)
            f[bad] = -math.inf
        return x, f

    def _samples_for(self, x: np.ndarray) -> np.ndarray:
        """Standard-normal coordinates of the candidates (exact for asked candidates)."""
        pending = self._pending
        if pending is not None and pending.shape == x.shape:
            asked = self._mean + self._sigma * (pending @ self._B.T)
            if np.array_equal(asked, x):
                return pending
        logger.debug("xNES.tell: candidates differ from the last ask(); solving for samples.")
        return np.linalg.solve(self._B, ((x - self._mean) / self._sigma).T).T

    def _update_best(self, x: np.ndarray, f: np.ndarray) -> None:
        k = int(np.argmax(f))  # first maximum: ties keep the earlier candidate
        if f[k] > self._best_f:
            self._best_f = float(f[k])
            self._best_x = x[k].copy()

    def _update_distribution(self, s: np.ndarray, f: np.ndarray) -> None:
        """One natural-gradient step of mean, sigma and B (see the module docstring)."""
        d = self._d
        u = rank_utilities(f)
        grad_delta = u @ s
        grad_m = (s.T * u) @ s - u.sum() * np.eye(d)
        grad_m = 0.5 * (grad_m + grad_m.T)  # exact symmetry; rounding breaks it slightly
        grad_sigma = np.trace(grad_m) / d
        grad_b = grad_m - grad_sigma * np.eye(d)
        self._mean = self._mean + self._config.eta_mu * self._sigma * (self._B @ grad_delta)
        self._sigma = self._sigma * math.exp(0.5 * self.eta_sigma * grad_sigma)
        self._B = self._B @ expm_symmetric(0.5 * self.eta_B * grad_b)
        if not (np.all(np.isfinite(self._B)) and math.isfinite(self._sigma) and self._sigma > 0):
            raise NumericalError(
                f"xNES diverged at generation {self._generation}: sigma={self._sigma}; expected "
                "finite parameters. Lower eta_sigma/eta_B or sigma0."
            )

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly: plain tensors, floats, ints, lists, dicts.

        Safe for ``torch.save`` / ``torch.load(weights_only=True)``.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": asdict(self._config),
            "mean": torch.from_numpy(self._mean.copy()),
            "sigma": float(self._sigma),
            "B": torch.from_numpy(self._B.copy()),
            "rng_state": _copy_rng_state(self._rng.bit_generator.state),
            "generation": int(self._generation),
            "best_x": None if self._best_x is None else torch.from_numpy(self._best_x.copy()),
            "best_f": float(self._best_f),
            "pending": None if self._pending is None else torch.from_numpy(self._pending.copy()),
        }

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "XNES":
        """Rebuild an optimiser from :meth:`state_dict`; it continues bit for bit."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ScoresError(
                "This is not an xNES state (missing format tag "
                f"{STATE_FORMAT!r}); expected the dict returned by XNES.state_dict()."
            )
        if state.get("version") != STATE_VERSION:
            raise ScoresError(
                f"xNES state version {state.get('version')!r} is not supported; expected "
                f"{STATE_VERSION}. Re-run the search with this elastic_fx version."
            )
        try:
            config = XNESConfig(**state["config"])
            opt = cls(_to_numpy(state["mean"]), config)
            opt._sigma = float(state["sigma"])
            opt._B = _to_numpy(state["B"])
            opt._rng.bit_generator.state = _copy_rng_state(state["rng_state"])
            opt._generation = int(state["generation"])
            opt._best_f = float(state["best_f"])
            opt._best_x = None if state["best_x"] is None else _to_numpy(state["best_x"])
            opt._pending = None if state["pending"] is None else _to_numpy(state["pending"])
        except (KeyError, TypeError, ValueError) as e:
            raise ScoresError(
                f"xNES state is incomplete or corrupt ({e!r}); expected the dict returned by "
                "XNES.state_dict(). Re-run the search or restore an intact checkpoint."
            ) from e
        if opt._B.shape != (opt._d, opt._d):
            raise ScoresError(
                f"xNES state has B {opt._B.shape} for d={opt._d}; the state is corrupt."
            )
        return opt


def _to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy of a saved tensor/array/list."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().copy()
    return np.array(x, dtype=np.float64, copy=True)


def _copy_rng_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """Deep copy of a numpy bit-generator state made of dicts, strings and ints."""
    return {k: (_copy_rng_state(v) if isinstance(v, dict) else v) for k, v in state.items()}
