"""Linear centred kernel alignment (CKA) between structures, and the xNES covariance built from it.

The paper (App. E) initialises the xNES covariance with ``Sigma_ij = CKA(act_i, act_j)``,
the CKA between the activations of structures ``i`` and ``j`` (two heads, a head and an
FFN, two FFNs) on a set of images; this beats ``Sigma = I`` clearly on SigLIPv2.

Linear CKA of centred features ``X [N, p]`` and ``Y [N, q]`` (rows = the same N inputs)::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <X X^T, Y Y^T>_F / (||X X^T||_F ||Y Y^T||_F)     (the Gram form)

Both forms are equal; the first costs ``N p q`` and never builds an ``N x N`` Gram
matrix, the second costs ``N^2 (p + q)``. Each quantity below is computed in the
cheaper form: features narrower than ``N`` stay in feature space, wider ones are
reduced to their ``N x N`` Gram matrix once.

Linear CKA is the cosine between the vectorised centred Gram matrices, so a CKA
matrix is a Gram matrix of unit vectors: symmetric, positive semi-definite, unit
diagonal, entries in [0, 1]. It can still be (nearly) singular, which
:func:`cka_covariance` repairs before xNES samples from it.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch
import torch.fx as fx

from ..errors import DataError, NumericalError
from ..passes._labels import find_linears

logger = logging.getLogger(__name__)

#: Upper bound on the entries of one chunk of the feature-space cross products.
_CHUNK_ENTRIES = 1 << 24


def _centred(x: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``x [N, ...]`` flattened to ``[N, F]``, cast to ``dtype``, columns centred."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{what} has shape {shape}; expected [N inputs, features...].")
    if x.shape[0] < 2:
        raise DataError(f"{what} has {x.shape[0]} input(s); CKA needs at least 2 inputs (rows).")
    flat = x.detach().reshape(x.shape[0], -1).to(dtype)
    if not torch.isfinite(flat).all():
        raise NumericalError(f"{what} contains NaN or inf; expected finite activations.")
    return flat - flat.mean(dim=0, keepdim=True)


def _self_norm(x: torch.Tensor) -> torch.Tensor:
    """``||X^T X||_F = ||X X^T||_F`` from whichever of the two is smaller."""
    n, f = x.shape
    return torch.linalg.matrix_norm(x.T @ x if f <= n else x @ x.T)


def _cross_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||Y^T X||_F^2`` in feature space (``N p q``) or Gram space (``N^2 (p + q)``)."""
    n, p = x.shape
    q = y.shape[1]
    if n * p * q <= n * n * (p + q):
        return (y.T @ x).square().sum()
    return ((x @ x.T) * (y @ y.T)).sum()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den`` is 0 (a constant feature aligns with nothing)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def linear_cka(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Linear CKA of activations ``x [N, ...]`` and ``y [N, ...]`` (0-dim tensor in [0, 1]).

    Trailing dimensions are flattened into features; rows must be the same ``N`` inputs.
    Invariant to orthogonal transforms and isotropic scaling of either input. A
    constant (zero-variance) input gives 0.
    """
    xc = _centred(x, dtype, "x")
    yc = _centred(y, dtype, "y")
    if xc.shape[0] != yc.shape[0]:
        raise DataError(
            f"x has {xc.shape[0]} rows and y has {yc.shape[0]}; expected the same inputs in both."
        )
    return _ratio(_cross_sq(xc, yc), _self_norm(xc) * _self_norm(yc))


def _segment_sum(values: torch.Tensor, segments: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """Sum ``values`` along ``dim`` into ``count`` bins given by ``segments``."""
    shape = list(values.shape)
    shape[dim] = count
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_add_(dim, segments, values)


def _narrow_cross(z: torch.Tensor, seg: torch.Tensor, count: int) -> torch.Tensor:
    """``[count, count]`` of ``||X_j^T X_i||_F^2`` for structures concatenated in ``z [N, S]``.

    ``seg[c]`` is the structure owning column ``c``. Rows of ``Z^T Z`` are built in
    chunks so memory stays bounded; squared entries are summed per block.
    """
    total = z.shape[1]
    chunk = max(1, _CHUNK_ENTRIES // max(total, 1))
    out = torch.zeros(count, count, dtype=z.dtype, device=z.device)
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        sq = (z[:, start:stop].T @ z).square()  # [chunk, S]
        per_col_block = _segment_sum(sq, seg, count, dim=1)  # [chunk, count]
        out.index_add_(0, seg[start:stop], per_col_block)
    return out


def cka_matrix(features: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Pairwise linear CKA ``[n, n]`` between ``n`` structures' activations.

    ``features[i]`` is ``[N, ...]`` (the same ``N`` inputs for every structure, e.g. one
    pooled head output per image). Structures with at most ``N`` features are handled
    in feature space, all together (``Z^T Z`` in bounded chunks); wider ones through
    their centred ``N x N`` Gram matrix, built once per structure. A constant
    structure gets CKA 0 with every other one (with a warning) and 1 with itself.
    """
    if len(features) == 0:
        raise DataError("cka_matrix got no features; expected one activation tensor per structure.")
    cols = [_centred(f, dtype, f"features[{i}]") for i, f in enumerate(features)]
    rows = {c.shape[0] for c in cols}
    if len(rows) != 1:
        raise DataError(
            f"cka_matrix got features with row counts {sorted(rows)}; expected the same N inputs "
            "for every structure."
        )
    n_inputs = cols[0].shape[0]
    narrow = [i for i, c in enumerate(cols) if c.shape[1] <= n_inputs]
    wide = [i for i, c in enumerate(cols) if c.shape[1] > n_inputs]
    num = torch.zeros(len(cols), len(cols), dtype=dtype, device=cols[0].device)

    z: Optional[torch.Tensor] = None
    seg = torch.zeros(0, dtype=torch.long)
    if narrow:
        z = torch.cat([cols[i] for i in narrow], dim=1)
        seg = torch.cat([torch.full((cols[i].shape[1],), k, dtype=torch.long) for k, i in enumerate(narrow)])
        seg = seg.to(z.device)
        idx = torch.tensor(narrow, device=num.device)
        num[idx.unsqueeze(1), idx.unsqueeze(0)] = _narrow_cross(z, seg, len(narrow))

    grams: List[torch.Tensor] = [cols[i] @ cols[i].T for i in wide]
    for a, i in enumerate(wide):
        if z is not None:  # wide x narrow: ||X_j^T X_i||^2 = sum over columns of (K_i Z) * Z
            per_col = ((grams[a] @ z) * z).sum(dim=0)
            cross = _segment_sum(per_col, seg, len(narrow), dim=0)
            num[i, narrow] = cross
            num[narrow, i] = cross
        for b in range(a, len(wide)):
            value = (grams[a] * grams[b]).sum()
            num[i, wide[b]] = value
            num[wide[b], i] = value

    norms = num.diagonal().clamp_min(0).sqrt()  # ||X_i^T X_i||_F
    dead = (norms == 0).nonzero().flatten().tolist()
    if dead:
        logger.warning("cka_matrix: structures %s have constant activations; their CKA is set to 0.", dead)
    cka = _ratio(num, norms.unsqueeze(1) * norms.unsqueeze(0))
    cka = 0.5 * (cka + cka.T)
    cka.fill_diagonal_(1.0)
    return cka


def cka_covariance(
    similarity: torch.Tensor,
    min_eig: float = 1e-3,
    shrinkage: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Turn a structure-level CKA (or correlation) matrix into an SPD xNES covariance.

    Steps: symmetrise; rescale to unit diagonal (a correlation matrix, so every factor
    starts with the same variance as under ``Sigma = I``); shrink towards the identity
    by ``shrinkage`` in [0, 1]; clip eigenvalues below ``min_eig``; restore the unit
    diagonal; multiply by ``scale``. The result is float64 ``[n, n]``, symmetric, with
    smallest eigenvalue > 0 (at least about ``min_eig * scale``); pass it as
    ``XNES(mean0, config, cov0=...)``.
    """
    square = isinstance(similarity, torch.Tensor) and similarity.ndim == 2
    if not square or similarity.shape[0] != similarity.shape[1]:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise DataError(f"similarity matrix has shape {shape}; expected a square [n, n] tensor.")
    if not 0.0 <= shrinkage <= 1.0 or not min_eig > 0 or not scale > 0:
        raise DataError(
            f"cka_covariance got shrinkage={shrinkage}, min_eig={min_eig}, scale={scale}; "
            "expected shrinkage in [0, 1] and positive min_eig and scale."
        )
    c = similarity.detach().to(torch.float64)
    if not torch.isfinite(c).all():
        raise NumericalError("similarity matrix contains NaN or inf; expected finite CKA values.")
    c = 0.5 * (c + c.T)
    diag = c.diagonal()
    if (diag <= 0).any():
        raise DataError(
            f"similarity matrix has non-positive diagonal entries {diag[diag <= 0].tolist()}; "
            "expected a CKA/correlation matrix (unit diagonal)."
        )
    c = _unit_diagonal(c)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    c = (1.0 - shrinkage) * c + shrinkage * eye
    w, v = torch.linalg.eigh(c)
    clipped = int((w < min_eig).sum())
    if clipped:
        logger.info("cka_covariance: clipped %d of %d eigenvalues to %g.", clipped, w.numel(), min_eig)
    c = (v * w.clamp_min(min_eig)) @ v.T
    c = _unit_diagonal(0.5 * (c + c.T))
    return scale * 0.5 * (c + c.T)


def _unit_diagonal(c: torch.Tensor) -> torch.Tensor:
    """``D^-1/2 C D^-1/2`` (a congruence, so definiteness is kept)."""
    inv = c.diagonal().rsqrt()
    return c * inv.unsqueeze(1) * inv.unsqueeze(0)


def structure_features(gm: fx.GraphModule, smap, images: torch.Tensor, layout) -> List[torch.Tensor]:
    """Per-image features of every searched structure, in candidate-vector order: each FFN's
    hidden activations and each head's output, mean-pooled over tokens."""
    linears = {li.module: li for li in find_linears(gm).values()}
    want = {}
    for b in smap.blocks:
        if b.mlp is not None and b.mlp.prunable and b.mlp.out_proj in linears:
            want[("ffn", b.index)] = linears[b.mlp.out_proj].input
        if b.attention is not None and b.attention.out_proj in linears:
            want[("heads", b.index)] = linears[b.attention.out_proj].input
    got = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            for key, node in want.items():
                if node is n:
                    got[key] = out.detach().float().reshape(out.shape[0], -1, out.shape[-1]).mean(1)
            return out

    with torch.no_grad():
        Grab(gm).run(images)
    feats = [got[("ffn", b)] for b in layout.ffn_blocks]
    for b, h in layout.head_blocks:
        x = got.get(("heads", b))
        cols = smap.block(b).attention.out_columns()
        for i in range(h):
            feats.append(torch.zeros(len(images), 1) if x is None else x[:, cols[i]])
    return feats
