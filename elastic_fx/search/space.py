"""The search space: how an xNES point ``z`` becomes a factor vector ``c`` for :func:`~elastic_fx.scores.rescale`.

Two parameterisations:

* ``"log"`` (the default): ``c = exp(z - centre(z))``. Factors are positive by
  construction (no ``abs`` folding) and have no free scale: the ranking ignores a common
  factor, so the centring removes the one direction the fitness cannot see (with
  ``ranking="global"`` the mean over all factors; with ``"separate"`` the mean over the
  FFN factors and over the head factors, since each kind is ranked on its own). The
  search starts at ``z = 0``, i.e. ``c = 1``: the no-search ranking.
* ``"linear"`` (the reference implementation's): ``c = z`` with ``|c|`` taken by
  ``rescale``, started at a ramp ``mean_start -> mean_end`` over depth.

Takes and returns numpy arrays; touches nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..scores import Layout

SPACES = ("log", "linear")


@dataclass(frozen=True)
class SearchSpace:
    """Maps xNES points to factor vectors for one layout."""

    layout: Layout
    kind: str = "log"
    ranking: str = "global"

    def __post_init__(self) -> None:
        if self.kind not in SPACES:
            raise ConfigError(f"search space {self.kind!r} is not one of {SPACES}: 'log' searches c = exp(z) "
                              "around the no-search ranking, 'linear' the reference's c = z")

    def _centre(self, z: np.ndarray) -> np.ndarray:
        if self.ranking == "separate":
            out = z.copy()
            for part in (self.layout.is_head, ~self.layout.is_head):
                if part.any():
                    out[..., part] -= out[..., part].mean(axis=-1, keepdims=True)
            return out
        return z - z.mean(axis=-1, keepdims=True)

    def factors(self, z: np.ndarray) -> np.ndarray:
        """``[..., d]`` xNES points -> ``[..., d]`` factor vectors ``c``."""
        z = np.asarray(z, dtype=np.float64)
        if self.kind == "linear":
            return z.copy()
        return np.exp(self._centre(z))

    def origin(self) -> np.ndarray:
        """The xNES point of the no-search ranking (``c = 1`` up to scale)."""
        return np.zeros(self.layout.dim) if self.kind == "log" else self.layout.ones()
