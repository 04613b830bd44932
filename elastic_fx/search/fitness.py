"""Label-free fitness of a pruned candidate against the dense model.

Two fitnesses: :class:`NeighbourhoodFitness` (the search's default: does each image keep its
neighbours among the fitness images?) and :class:`PCACosineFitness` (the paper's Eq. 6:
PCA-projected cosine similarity to the dense embedding), described here.

The dense model embeds ``N`` fixed images once (default 1000, decoded and preprocessed
once by the caller and kept as a tensor). A PCA with ``dim`` components (default 192)
is fitted on those dense embeddings, centred and not whitened. A pruned candidate
embeds the same images; its fitness is the mean over images of the cosine similarity
between the projected dense and the projected pruned embedding of each image, and the
search averages that over its sparsities (paper Eq. 6)::

    F(candidate) = mean_s mean_i cos(P(z_i), P(z_i^(s))),  P(z) = (z - mu_dense) V_dim

How centring enters the cosine (the choice made here): both embeddings are projected
with the *same* affine map, which subtracts the dense mean ``mu_dense``, exactly like
a fitted PCA's ``transform``. So the cosine compares deviations from the dense
embedding centroid. Two consequences, both wanted:

* The large offset that every image's ViT embedding shares (its common direction)
  does not dominate the cosine; raw cosines of ViT embeddings sit near 1 for almost
  any pair and barely separate candidates.
* The pruned embeddings are centred with the dense mean, not their own. A pruned
  model that shifts every embedding by the same vector is therefore penalised, as it
  should be: the goal is to reproduce the dense embeddings, not just their spread.
  A pruned model that collapses every image onto the dense mean scores 0.

Whitening is not applied, so each principal direction weighs in with its own variance.

How many components (``dim="auto"``, the search's default): a PCA fitted on the dense
embeddings need not contain the *error* pruning causes; a cosine measured inside a subspace
that misses half of that error lets a search push damage where it is not measured.
:func:`error_share` measures the share of the pruned-minus-dense error energy inside the
first ``k`` components, and :func:`choose_dim` takes the fewest components that hold a
target share (95 %) at every search sparsity, or the full embedding space (``dim=None``: no
projection, cosine of the centred embeddings) when no PCA of these images reaches it.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch

from ..errors import DataError, NumericalError

logger = logging.getLogger(__name__)

#: Paper defaults: 1000 fixed images, PCA to 192 dimensions.
DEFAULT_NUM_IMAGES = 1000
DEFAULT_PCA_DIM = 192

#: Temperature of the neighbourhood fitness (that of the weighted k-NN vote used to evaluate features).
DEFAULT_TEMPERATURE = 0.07

#: Norms below this count as zero vectors (their cosine is 0, not NaN).
_EPS = 1e-12
#: ``dim="auto"``: the share of the pruning error the PCA subspace must hold.
DEFAULT_ERROR_SHARE = 0.95


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dense(dense: torch.Tensor, minimum: int, who: str) -> torch.Tensor:
    """``dense`` is a finite ``[N, D]`` tensor with ``N >= minimum``; returns it."""
    if not isinstance(dense, torch.Tensor) or dense.ndim != 2:
        shape = tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
        raise DataError(f"dense embeddings have shape {shape}; expected a tensor [N images, D].")
    n = dense.shape[0]
    if n < minimum:
        raise DataError(
            f"{who} got {n} dense embedding(s); expected at least {minimum} (the paper uses "
            f"{DEFAULT_NUM_IMAGES} images). Point the search at more images."
        )
    if not torch.isfinite(dense).all():
        raise NumericalError("dense embeddings contain NaN or inf; expected finite values.")
    return dense


def _check_pruned(pruned: torch.Tensor, n: int, width: int) -> None:
    if pruned.ndim < 2 or pruned.shape[-2] != n or pruned.shape[-1] != width:
        raise DataError(
            f"pruned embeddings have shape {tuple(pruned.shape)}; expected [..., {n}, "
            f"{width}] (the same images, in the same order, as the dense embeddings)."
        )


def holdout_split(
    num_images: int, holdout_fraction: float, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of image indices into (search, held-out) sets.

    The search fits the PCA and scores candidates on the first set; the held-out set
    reports how well the chosen candidate generalises (score it with
    ``fitness(pruned_heldout, dense=dense_heldout)``). Both index tensors are sorted.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(
            f"holdout_fraction={holdout_fraction}; expected a fraction in [0, 1). "
            "Use e.g. 0.2 to keep 20% of the images for reporting."
        )
    num_held = int(round(num_images * holdout_fraction))
    if num_images - num_held < 2:
        raise DataError(
            f"{num_images} images with holdout_fraction={holdout_fraction} leave "
            f"{num_images - num_held} image(s) for the search; expected at least 2. "
            "Use more images or a smaller held-out fraction."
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_images, generator=gen)
    held, search = perm[:num_held], perm[num_held:]
    return search.sort().values, held.sort().values


class PCACosineFitness:
    """Mean PCA-projected cosine similarity between pruned and dense embeddings.

    Args:
        dense: dense-model embeddings ``[N, D]`` of the fixed fitness images.
        dim: PCA components to keep (default 192). Centred ``N`` points span at most
            ``N - 1`` directions, so ``dim`` is lowered to ``min(dim, N - 1, D)`` with a
            logged warning when it does not fit (a component beyond that would be an
            arbitrary direction of the null space). ``N < 2`` raises :class:`DataError`.

    Attributes:
        dim: the effective number of components.
        mean: dense mean ``[D]`` (float64). components: ``[D, dim]`` (float64,
        orthonormal columns, by decreasing explained variance).
        explained_variance_ratio: ``[dim]`` share of the dense variance per component.

    Calling the object on pruned embeddings ``[..., N, D]`` (leading dims: candidates,
    sparsities, ...) returns the mean cosine over the ``N`` images, shape ``[...]``;
    it is exactly 1 when the pruned embeddings equal the dense ones.
    """

    def __init__(self, dense: torch.Tensor, dim: Optional[int] = DEFAULT_PCA_DIM) -> None:
        dense = self._check_dense(dense)
        n, d = dense.shape
        full = dim is None  # the full embedding space: centred, not projected
        if full:
            dim = d
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise DataError(f"PCA dim={dim}; expected a positive number of components (e.g. 192).")
        effective = d if full else min(dim, n - 1, d)
        if effective < dim and not full:
            logger.warning(
                "PCA fitness: asked for %d components but %d embeddings of width %d support "
                "at most %d; using %d. Use more fitness images (the paper uses 1000) to keep %d.",
                dim, n, d, min(n - 1, d), effective, dim,
            )
        x = dense.detach().to(torch.float64)
        self.mean = x.mean(dim=0)
        centred = x - self.mean
        # Right singular vectors of the centred data = principal axes (no N x N or D x D
        # eigendecomposition, and better conditioned than forming the covariance).
        _, svals, vh = torch.linalg.svd(centred, full_matrices=False)
        self.dim = int(effective)
        self.full_space = bool(full)
        # The full space needs no basis: the identity keeps every direction, including
        # those the dense images do not span (where pruning error may lie).
        self.components = torch.eye(d, dtype=torch.float64) if full else vh[: self.dim].T.contiguous()
        variance = svals**2
        total = float(variance.sum())
        if total == 0:
            logger.warning("PCA fitness: all %d dense embeddings are identical; every cosine will be 0.", n)
        self.explained_variance_ratio = variance[: min(self.dim, variance.numel())] / max(total, _EPS)
        self.num_images = int(n)
        self.width = int(d)
        self._cache: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
        # Unit-norm projected dense embeddings, computed once (and once per other device).
        self._dense_unit = {dense.device: self._unit_rows(self.project(dense))}

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _check_dense(dense: torch.Tensor) -> torch.Tensor:
        return _check_dense(dense, 2, "PCA fitness")

    def _check_pruned(self, pruned: torch.Tensor, n: int) -> None:
        _check_pruned(pruned, n, self.width)

    # ------------------------------------------------------------ projection
    def _affine(self, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mu, V)`` on ``device`` in ``dtype``, cached per device and dtype."""
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.mean.to(device=device, dtype=dtype),
                self.components.to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """PCA coordinates ``(z - mean) V``: ``[..., D] -> [..., dim]``.

        Centred before the product, not as ``z V - mean V``: ViT embeddings share an
        offset much larger than their spread, and subtracting after the product would
        leave rounding noise of the offset's size in every coordinate. float64 input
        stays float64; other dtypes are computed in float32.
        """
        if z.shape[-1] != self.width:
            raise DataError(
                f"embeddings have width {z.shape[-1]}; expected {self.width} (the dense width)."
            )
        dtype = _compute_dtype(z.dtype)
        mean, v = self._affine(z.device, dtype)
        return (z.to(dtype) - mean) @ v

    def _dense_unit_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._dense_unit:
            first = next(iter(self._dense_unit.values()))
            self._dense_unit[device] = first.to(device)
        return self._dense_unit[device]

    @staticmethod
    def _unit_rows(p: torch.Tensor) -> torch.Tensor:
        """Rows scaled to unit norm; zero rows stay zero (their cosine is 0)."""
        return p / p.norm(dim=-1, keepdim=True).clamp_min(_EPS)

    # --------------------------------------------------------------- scoring
    def per_image(self, pruned: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cosine per image: ``[..., N, D] -> [..., N]``.

        ``dense`` defaults to the embeddings the PCA was fitted on; pass the dense
        embeddings of other images (e.g. a held-out split) to score those instead.
        """
        if dense is None:
            ref = self._dense_unit_on(pruned.device)
        else:
            if dense.ndim != 2:
                raise DataError(f"dense embeddings have shape {tuple(dense.shape)}; expected [N, D].")
            ref = self._unit_rows(self.project(dense))
        self._check_pruned(pruned, ref.shape[0])
        q = self._unit_rows(self.project(pruned))
        ref = ref.to(device=q.device, dtype=q.dtype)
        return (q * ref).sum(dim=-1)

    def __call__(self, pruned: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cosine over the images: ``[..., N, D] -> [...]`` (1 for pruned == dense)."""
        return self.per_image(pruned, dense).mean(dim=-1)

    def describe(self) -> str:
        return "PCA cosine, " + ("the full embedding space" if self.full_space else f"PCA to {self.dim} dims")

    def candidate_fitness(self, pruned: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 6 for a batch: ``[candidates, sparsities, N, D] -> [candidates]``."""
        if pruned.ndim != 4:
            raise DataError(
                f"pruned embeddings have shape {tuple(pruned.shape)}; expected "
                "[candidates, sparsities, N, D]."
            )
        return self(pruned).mean(dim=-1)


class NeighbourhoodFitness:
    """How well a pruned model keeps each image's neighbourhood among the fitness images.

    k-NN classification (the usual label-free read-out of a ViT's embeddings) only looks at
    which images lie close to which. This fitness scores exactly that: for image ``i`` the
    dense model defines a distribution over the *other* fitness images,
    ``p_i(j) = softmax_j(cos(z_i, z_j) / T)``, the pruned model another, ``q_i``, computed
    from the pruned embeddings alone (as k-NN would use them); the score of image ``i`` is
    their overlap ``sum_j min(p_i(j), q_i(j))`` in ``[0, 1]``, 1 when every cosine is kept.

    Unlike the PCA cosine it ignores what k-NN ignores (a rotation or a common rescaling of
    the embeddings) and weighs the close pairs that decide a vote most. ``T`` = 0.07 is the
    temperature of the weighted k-NN vote commonly used to evaluate ViT features; the
    choice of this fitness as the default rests on the proxy study in
    benchmarks/results/quality.md (correlation with k-NN accuracy on train-split images).

    Args:
        dense: dense embeddings ``[N, D]`` of the fitness images (``N >= 3``).
        temperature: ``T`` above, > 0.
        chunk: pruned embedding sets compared per step (bounds memory at ``chunk * N * N``).
    """

    def __init__(self, dense: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, chunk: int = 16) -> None:
        _check_dense(dense, 3, "the neighbourhood fitness")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise DataError(f"temperature={temperature!r}; expected a positive number such as 0.07")
        self.temperature = float(temperature)
        self.chunk = max(1, int(chunk))
        self.width = int(dense.shape[1])
        self.num_images = int(dense.shape[0])
        self._dense = self.neighbours(dense.detach())

    def describe(self) -> str:
        return f"neighbourhood overlap (T = {self.temperature:g})"

    def neighbours(self, z: torch.Tensor) -> torch.Tensor:
        """Each image's distribution over the other images: ``[..., N, D] -> [..., N, N]`` (float32+)."""
        z = z.to(_compute_dtype(z.dtype))
        unit = z / z.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        logits = unit @ unit.transpose(-1, -2) / self.temperature
        eye = torch.eye(z.shape[-2], dtype=torch.bool, device=z.device)
        return logits.masked_fill(eye, float("-inf")).softmax(dim=-1)

    def per_image(self, pruned: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Overlap per image: ``[..., N, D] -> [..., N]``; ``dense`` scores other images than the fitted ones."""
        ref = self._dense if dense is None else self.neighbours(dense.detach())
        n = ref.shape[-1]
        _check_pruned(pruned, n, self.width)
        lead = pruned.shape[:-2]
        flat = pruned.reshape(-1, n, self.width)
        ref = ref.to(flat.device)
        out = [torch.minimum(self.neighbours(flat[i : i + self.chunk]), ref.to(_compute_dtype(flat.dtype))).sum(-1)
               for i in range(0, flat.shape[0], self.chunk)]
        return torch.cat(out).reshape(*lead, n)

    def __call__(self, pruned: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean overlap over the images: ``[..., N, D] -> [...]`` (1 for pruned == dense)."""
        return self.per_image(pruned, dense).mean(dim=-1)


def error_share(dense: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Share of the pruning error inside the first ``k`` dense principal components, per ``k``.

    ``dense`` ``[N, D]``, ``pruned`` ``[S, N, D]`` (one slice per sparsity). Returns
    ``[S, K]`` with ``K = min(N - 1, D)``: entry ``[s, k - 1]`` is
    ``||(pruned_s - dense) V_k||^2 / ||pruned_s - dense||^2``.
    """
    x = dense.detach().to(torch.float64)
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    k = min(x.shape[0] - 1, x.shape[1])
    err = pruned.detach().to(torch.float64) - x  # [S, N, D]
    energy = (err @ vh[:k].T).pow(2).sum(dim=1)  # [S, K]: error energy along each component
    total = err.pow(2).sum(dim=(1, 2)).clamp_min(_EPS)
    return energy.cumsum(dim=-1) / total[:, None]


def choose_dim(dense: torch.Tensor, pruned: torch.Tensor, share: float = DEFAULT_ERROR_SHARE,
               ) -> Tuple[Optional[int], float]:
    """Fewest PCA components holding ``share`` of the pruning error at every sparsity.

    Returns ``(dim, held)``: ``dim`` is None (the full embedding space) when even every
    component the images support holds less than ``share``; ``held`` is the smallest share
    (over sparsities) inside the chosen subspace (1.0 for the full space).
    """
    if not 0.0 < share <= 1.0:
        raise DataError(f"error share {share!r} must be in (0, 1], e.g. 0.95")
    curve = error_share(dense, pruned).min(dim=0).values  # [K], worst sparsity
    ok = torch.nonzero(curve >= share - 1e-12)
    if ok.numel() == 0:
        return None, 1.0
    k = int(ok[0, 0]) + 1
    return k, float(curve[k - 1])
