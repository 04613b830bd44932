"""search(gm, smap, local, images) -> ElasticScores: the xNES search over block/head reweightings.

Takes a traced graph, its StructureMap, the local scores and preprocessed fitness images;
returns :class:`~elastic_fx.scores.ElasticScores`. Writes nothing but the optional
per-generation checkpoint.

1. The fitness images are split, once and seeded, into a *search* part and a *selection*
   part (or the caller passes ``selection_images``). Dense embeddings of both are computed
   once; the fitness is fitted on the search part.
2. ``c = 1`` (the no-search ranking) is evaluated first. With ``fitness="pca-cosine"`` and
   ``pca_dim="auto"`` its pruned embeddings also fix the PCA size: the fewest components that
   hold 95 % of the pruning error (:func:`~elastic_fx.search.fitness.choose_dim`), or the full
   embedding space.
3. ``iterations`` generations of xNES in the search space (:mod:`~elastic_fx.search.space`;
   by default ``c = exp(z)`` centred, started at ``z = 0``, i.e. at ``c = 1``). Every
   candidate's factors rescale the local scores, the budget cuts the ranking at every
   search sparsity (nested masks), and all (candidate, sparsity) pairs of a generation run
   in one batched masked forward (bf16 weights on CUDA, float32 on the CPU); fitness (in
   float32), averaged over sparsities: by default how well each image keeps its neighbours
   among the fitness images (:class:`~elastic_fx.search.fitness.NeighbourhoodFitness`), or
   the paper's PCA cosine to the fp32 dense embeddings (Eq. 6, ``fitness="pca-cosine"``).
4. Selection on held-out images: ``c = 1``, the final mean and the best
   ``selection_candidates`` distinct candidates by search fitness are scored on the
   selection part; the best there wins when its per-image gain over ``c = 1`` has a paired-
   bootstrap interval (``selection_confidence``, 95 %) above 0, else ``c = 1`` is returned.
   Both fitnesses of ``c = 1`` and of the winner go into ``ElasticScores.selection``.

The run checkpoints after every generation (atomically); ``resume=True`` continues from the
checkpoint and ends with exactly the result of an uninterrupted run. Under ``torchrun``
(:mod:`elastic_fx.distributed`) every rank calls it with the same arguments: the dense
embeddings are split by image batches and every evaluation's (candidate, sparsity) pairs by
contiguous chunks; rank 0 owns xNES and writes the checkpoints. The result does not depend
on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx as fx

from .._io import atomic_write
from .._precision import compute_dtype
from ..budget import DEFAULT_HEAD_OFFSET, RANKINGS, Floors, max_sparsity, nested_masks
from ..distributed import SAME_IMAGES_HINT, DistContext, checksums
from ..errors import BudgetError, ConfigError, DataError, ElasticFxError, ScoresError
from ..passes.embedding import embedding_module
from ..passes.mask import build_masked
from ..scores import ElasticScores, Layout, LocalScores, rescale
from ..structures import StructureMap
from .cka import cka_covariance, cka_matrix, structure_features
from .evaluate import DEFAULT_ROWS_PER_FORWARD, masked_embeddings
from .fitness import DEFAULT_ERROR_SHARE, DEFAULT_TEMPERATURE, NeighbourhoodFitness, PCACosineFitness, choose_dim
from .space import SPACES, SearchSpace
from .xnes import XNES, XNESConfig, initial_mean

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "search_checkpoint.pt"

#: Initial spread of the log-space search (std of ``z``; a factor of ``e^0.25`` ~ 1.28 per sigma).
#: Set before measuring; the spread curve in benchmarks/results/quality.md (selection fitness on
#: train images for 0.1 / 0.25 / 0.5) is flat within its noise on the CIFAR ViT, so it was kept.
DEFAULT_SIGMA_LOG = 0.25
#: The fitnesses a search can use (see :mod:`~elastic_fx.search.fitness`).
FITNESSES = ("neighbours", "pca-cosine")

#: Initial spread of the linear space (the reference's).
DEFAULT_SIGMA_LINEAR = 1.0


def default_eta_sigma(d: int) -> float:
    """Step-size learning rate ``(3 + ln d) / (5 sqrt d)`` (separable NES; 0.22 for d = 42).

    xNES's own rate ``0.6 (3 + ln d) / (d sqrt d)`` (0.015 for d = 42) leaves the spread
    where it started over 50 generations; this one lets it shrink or grow within a run.
    """
    return (3.0 + math.log(d)) / (5.0 * math.sqrt(d))


@dataclass
class SearchConfig:
    """Everything that defines a search run (stored in the score file).

    Attributes:
        iterations: xNES generations.
        sparsities: the search sparsities (fraction of prunable parameters removed).
        seed: seeds the image split, the crops, the subsampling and xNES.
        popsize: candidates per generation; None: ``4 + floor(3 ln d)``.
        fitness: ``"neighbours"`` (how well each fitness image keeps its neighbours among the
            others, :class:`~elastic_fx.search.fitness.NeighbourhoodFitness`) or ``"pca-cosine"``
            (the paper's Eq. 6: PCA-projected cosine to the dense embedding).
        temperature: the neighbourhood fitness's softmax temperature.
        pca_dim: with ``"pca-cosine"``, PCA components: an int (the paper: 192), ``"auto"`` (the
            fewest holding ``error_share`` of the pruning error), or None (full space).
        error_share: the share ``"auto"`` must hold.
        num_images: gradient images (local scores).
        num_fitness_images: fitness images in all (search + selection parts).
        selection_fraction: the share of the fitness images held out for selection.
        selection_candidates: distinct top candidates (by search fitness) re-scored there.
        selection_confidence: the best of them replaces ``c = 1`` only when its per-image gain
            over ``c = 1`` on the selection images has a paired-bootstrap interval at this level
            whose lower end is above 0; 0 takes any gain.
        batch_size: images per gradient batch.
        eval_batch_size: images per masked forward.
        pair_chunk: (candidate, sparsity) pairs per masked forward; None: all that fit.
        space: ``"log"`` (``c = exp(z)`` centred, from ``c = 1``) or ``"linear"`` (the reference's).
        sigma0: initial spread; None: the space's default.
        eta_sigma: step-size learning rate; None: :func:`default_eta_sigma`; ``"xnes"``: xNES's own.
        ranking: ``"global"`` (heads and neurons in one ranking, paper Eq. 9) or ``"separate"``.
        head_offset: with ``"separate"``, head removal trails neuron removal by this fraction.
        mean_start, mean_end: the linear space's initial ramp over depth.
        floors: per-block floors.
        cka_init: initial covariance from CKA similarities of the structures (paper App. E).
    """

    iterations: int = 50
    sparsities: Sequence[float] = (0.1, 0.3, 0.5, 0.6)
    seed: int = 0
    popsize: Optional[int] = None
    fitness: str = "neighbours"
    temperature: float = DEFAULT_TEMPERATURE
    pca_dim: Union[int, str, None] = "auto"
    error_share: float = DEFAULT_ERROR_SHARE
    num_images: int = 1000
    num_fitness_images: int = 1000
    selection_fraction: float = 0.5
    selection_candidates: int = 8
    selection_confidence: float = 0.95
    batch_size: int = 16
    eval_batch_size: int = 64
    pair_chunk: Optional[int] = None
    space: str = "log"
    sigma0: Optional[float] = None
    eta_sigma: Union[float, str, None] = None
    ranking: str = "global"
    head_offset: float = DEFAULT_HEAD_OFFSET
    mean_start: float = 1.2
    mean_end: float = 0.8
    floors: Floors = field(default_factory=Floors)
    cka_init: bool = False

    @property
    def spread(self) -> float:
        if self.sigma0 is not None:
            return float(self.sigma0)
        return DEFAULT_SIGMA_LOG if self.space == "log" else DEFAULT_SIGMA_LINEAR


#: Settings a checkpoint must share with the run that resumes it.
_RESUME_KEYS = ("sparsities", "seed", "popsize", "fitness", "temperature", "pca_dim", "space", "sigma0", "eta_sigma",
                "ranking", "head_offset", "selection_fraction", "cka_init")


def validate(cfg: SearchConfig, smap: StructureMap) -> None:
    """Raise an ElasticFxError naming the first setting that cannot work for ``smap``."""
    def integer(name: str, low: int) -> None:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")

    integer("iterations", 0)
    integer("num_fitness_images", 2)
    integer("selection_candidates", 0)
    integer("eval_batch_size", 1)
    if cfg.popsize is not None:
        integer("popsize", 2)
    if cfg.pair_chunk is not None:
        integer("pair_chunk", 1)
    if cfg.space not in SPACES:
        raise ConfigError(f"space={cfg.space!r} is not one of {SPACES}")
    if cfg.fitness not in FITNESSES:
        raise ConfigError(f"fitness={cfg.fitness!r} is not one of {FITNESSES}: 'neighbours' scores how well each "
                          "image keeps its neighbours, 'pca-cosine' the PCA cosine to the dense embedding (paper Eq. 6)")
    if not (isinstance(cfg.temperature, (int, float)) and not isinstance(cfg.temperature, bool)
            and math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ConfigError(f"temperature must be a positive number (e.g. 0.07), got {cfg.temperature!r}")
    if not (isinstance(cfg.selection_confidence, (int, float)) and 0 <= cfg.selection_confidence < 1):
        raise ConfigError(f"selection_confidence must be in [0, 1) (e.g. 0.95; 0 takes any gain over c = 1), "
                          f"got {cfg.selection_confidence!r}")
    if cfg.ranking not in RANKINGS:
        raise ConfigError(f"ranking={cfg.ranking!r} is not one of {RANKINGS}: 'global' ranks heads and neurons "
                          "together (paper Eq. 9), 'separate' ranks each kind on its own (the reference code)")
    if not (isinstance(cfg.head_offset, (int, float)) and 0 <= cfg.head_offset < 1):
        raise ConfigError(f"head_offset must be in [0, 1), got {cfg.head_offset!r}")
    if not (isinstance(cfg.spread, (int, float)) and math.isfinite(cfg.spread) and cfg.spread > 0):
        raise ConfigError(f"sigma0 (the initial spread) must be a positive number, got {cfg.sigma0!r}")
    if not (cfg.eta_sigma is None or cfg.eta_sigma == "xnes"
            or (isinstance(cfg.eta_sigma, (int, float)) and cfg.eta_sigma > 0)):
        raise ConfigError(f"eta_sigma must be a positive number, None or 'xnes', got {cfg.eta_sigma!r}")
    if not (cfg.pca_dim is None or cfg.pca_dim == "auto"
            or (isinstance(cfg.pca_dim, int) and not isinstance(cfg.pca_dim, bool) and cfg.pca_dim >= 1)):
        raise ConfigError(f"pca_dim must be a positive integer, 'auto' or None (full space), got {cfg.pca_dim!r}")
    if not (isinstance(cfg.selection_fraction, (int, float)) and 0 <= cfg.selection_fraction < 1):
        raise ConfigError(f"selection_fraction must be in [0, 1), got {cfg.selection_fraction!r}; "
                          "0 turns selection on held-out images off")
    if cfg.selection_fraction > 0:
        split_fitness_images(cfg.num_fitness_images, cfg.selection_fraction, cfg.seed)  # enough images for both parts?
    if not cfg.sparsities:
        raise BudgetError("give at least one search sparsity, e.g. sparsities=(0.1, 0.3, 0.5, 0.6)")
    top = max_sparsity(smap, cfg.floors)
    for s in cfg.sparsities:
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1):
            raise BudgetError(f"search sparsity {s!r} is outside [0, 1); sparsity is the fraction of prunable "
                              "parameters removed")
        if s > top + 1e-9:
            raise BudgetError(f"search sparsity {s} cannot be reached: the per-block floors allow at most "
                              f"{top:.3f}; lower the sparsity or relax the floors")


#: The fewest images each part of the fitness split may have.
MIN_SEARCH_IMAGES = 4
MIN_SELECTION_IMAGES = 4


def split_fitness_images(n: int, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(search, selection) indices of ``n`` fitness images: a fixed, seeded split."""
    if fraction == 0:
        return torch.arange(n), torch.arange(0)
    held = int(round(n * fraction))
    if held < MIN_SELECTION_IMAGES or n - held < MIN_SEARCH_IMAGES:
        raise DataError(
            f"{n} fitness images with selection_fraction={fraction:g} give {n - held} search and {held} selection "
            f"images; each part needs at least {MIN_SEARCH_IMAGES}. Use at least "
            f"{math.ceil(max(MIN_SELECTION_IMAGES / fraction, MIN_SEARCH_IMAGES / (1 - fraction)))} fitness images "
            "(num_fitness_images), or selection_fraction=0 to choose on the search images alone."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[held:].sort().values, perm[:held].sort().values


class _Evaluator:
    """Fitness of candidates (factor vectors) on one part of the fitness images; pairs split over ranks."""

    def __init__(self, ctx: DistContext, masked: Any, smap: StructureMap, cfg: SearchConfig, layout: Layout,
                 heads: Dict[int, torch.Tensor], neurons: Dict[int, torch.Tensor], device: torch.device) -> None:
        self.ctx, self.masked, self.smap, self.cfg, self.layout = ctx, masked, smap, cfg, layout
        self.heads, self.neurons, self.device = heads, neurons, device
        self.dtype = compute_dtype(device)  # bf16 weights on CUDA, float32 on the CPU
        self.chunk = cfg.pair_chunk or max(1, DEFAULT_ROWS_PER_FORWARD // cfg.eval_batch_size)

    def keeps(self, c: np.ndarray) -> List[dict]:
        hs, ns = rescale(self.layout, c, self.heads, self.neurons)
        return nested_masks(self.smap, hs, ns, self.cfg.sparsities, floors=self.cfg.floors,
                            ranking=self.cfg.ranking, head_offset=self.cfg.head_offset)

    def embeddings(self, images: torch.Tensor, keeps: List[dict]) -> torch.Tensor:
        return masked_embeddings(self.masked, images, keeps, batch_size=self.cfg.eval_batch_size,
                                 pair_chunk=self.chunk, device=self.device, dtype=self.dtype)

    def __call__(self, cands: np.ndarray, images: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
                 ) -> np.ndarray:
        """Mean fitness over the search sparsities, one value per candidate (float64)."""
        return self.per_pair(cands, images, score).mean(1).double().numpy()

    def per_pair(self, cands: np.ndarray, images: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
                 per_image: bool = False) -> torch.Tensor:
        """``score`` of every (candidate, sparsity) pair: ``[candidates, sparsities]``, or
        ``[candidates, sparsities, images]`` when ``score`` returns one value per image."""
        n_s = len(self.cfg.sparsities)

        def mine() -> torch.Tensor:
            lo, hi = self.ctx.span(len(cands) * n_s, unit=self.chunk)
            keeps = []
            for ci in range(lo // n_s, -(-hi // n_s)) if hi > lo else ():
                for si, keep in enumerate(self.keeps(cands[ci])):
                    if lo <= ci * n_s + si < hi:
                        keeps.append(keep)
            if not keeps:
                return torch.empty(0, *shape, dtype=torch.float32)
            emb = self.embeddings(images, keeps)
            return torch.stack([score(e) for e in emb.float()]).float().cpu()  # [pairs of this rank, ...]

        shape = (len(images),) if per_image else ()
        per_pair = self.ctx.gather_cat(self.ctx.all_or_nothing(mine, "evaluating candidates"))
        return per_pair.view(len(cands), n_s, *shape)


class _TopK:
    """The best distinct candidates seen, by search fitness (ties keep the earlier one)."""

    def __init__(self, k: int, entries: Optional[List[Tuple[float, List[float]]]] = None) -> None:
        self.k = k
        self.entries: List[Tuple[float, List[float]]] = list(entries or [])

    def add(self, zs: np.ndarray, f: np.ndarray) -> None:
        for z, v in zip(zs, f):
            if self.k == 0 or any(np.array_equal(z, e[1]) for e in self.entries):
                continue
            self.entries.append((float(v), [float(x) for x in z]))
            self.entries.sort(key=lambda e: -e[0])
            del self.entries[self.k :]


def search(
    gm: fx.GraphModule,
    smap: StructureMap,
    local: LocalScores,
    fitness_images: torch.Tensor,
    config: SearchConfig = SearchConfig(),
    *,
    ctx: DistContext,
    device: torch.device,
    selection_images: Optional[torch.Tensor] = None,
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    preprocess: Optional[Dict[str, Any]] = None,
) -> ElasticScores:
    """Search the global reweighting of ``local`` for ``gm``; see the module docstring.

    ``fitness_images``: preprocessed ``[N, 3, H, W]``, identical on every rank. With
    ``selection_images`` the fitness images are all used for the search and selection uses
    these instead of a split. ``callback`` gets, after every evaluation, a dict with
    ``phase`` (``"c1"``, ``"generation"``, ``"selection"``), ``generation``, ``factors``
    ``[k, d]`` and ``fitness`` ``[k]`` (used by the benchmark to study the proxy).
    """
    cfg = config
    validate(cfg, smap)
    layout = Layout.of(smap)
    if layout.dim == 0:
        raise ElasticFxError("this model has no prunable heads or FFN neurons to search over")
    space = SearchSpace(layout, cfg.space, cfg.ranking)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    state = ctx.main_then_share(lambda: load_checkpoint(ckpt_path, smap, cfg) if resume else None,
                                "reading the checkpoint")
    if resume and state is None:
        raise ElasticFxError(f"resume=True but no checkpoint found at {ckpt_path}; run without resume first")

    # 1. the image parts and their dense embeddings
    if selection_images is not None:
        search_x, select_x = fitness_images, selection_images
        if len(select_x) < MIN_SELECTION_IMAGES:
            raise DataError(f"{len(select_x)} selection images given; at least {MIN_SELECTION_IMAGES} are needed "
                            "(more give a more reliable choice: use as many as the search images)")
    else:
        si, qi = split_fitness_images(len(fitness_images), cfg.selection_fraction, cfg.seed)
        search_x, select_x = fitness_images[si], fitness_images[qi]
    ctx.check_same(checksums(search_x), "fitness images", SAME_IMAGES_HINT)
    # The dense reference stays float32 (the source graph as it is) also where the candidates
    # run in bf16 weights: it is computed once, and against it the bf16 fitness stays closer
    # to the all-fp32 fitness than against a bf16 dense model (half the difference, measured
    # on the CPU). The fitness itself is computed in float32 from float32 embeddings.
    embed = embedding_module(gm, smap).to(device).eval()
    dense_search = _dense(ctx, embed, search_x, cfg.eval_batch_size, device)
    dense_select = _dense(ctx, embed, select_x, cfg.eval_batch_size, device) if len(select_x) else None
    masked = build_masked(gm, smap, use_kernel=device.type == "cuda")
    masked.cast(compute_dtype(device)).to(device).eval()  # its own bf16 copy on CUDA; gm stays as it is
    heads = {b: t.double() for b, t in local.head_means.items()}
    neurons = {b: t.double() for b, t in local.neuron_means.items()}
    evaluate = _Evaluator(ctx, masked, smap, cfg, layout, heads, neurons, device)

    # 2. c = 1, and with it the PCA size
    c1 = space.factors(space.origin())
    c1_search: Optional[float] = None
    dim, held = None, float("nan")
    if state is not None:
        dim, held, c1_search = state["pca"]["dim"], state["pca"]["error_share"], state["c1_search"]
    elif cfg.fitness == "pca-cosine" and cfg.pca_dim == "auto":
        dim, held, c1_search = ctx.main_then_share(
            lambda: _auto_pca(cfg, evaluate, search_x, dense_search, c1), "scoring c = 1 and choosing the PCA size")
    elif cfg.fitness == "pca-cosine":
        dim = cfg.pca_dim
    if cfg.fitness == "pca-cosine":
        fitness = ctx.main_then_share(lambda: PCACosineFitness(dense_search, dim=dim), "fitting the PCA")
    else:
        fitness = NeighbourhoodFitness(dense_search, cfg.temperature)
    log.info("fitness: %s on %d search images%s, %d selection images", fitness.describe(), len(search_x),
             "" if held != held else f" ({100 * held:.1f} % of the pruning error inside)", len(select_x))

    def on_search(cands: np.ndarray) -> np.ndarray:
        return evaluate(space.factors(cands), search_x, fitness)

    if c1_search is None:
        c1_search = float(on_search(space.origin()[None])[0])
    _notify(callback, "c1", 0, c1[None], np.array([c1_search]))

    # 3. xNES
    es: Optional[XNES] = None
    history: List[dict] = list(state["history"]) if state is not None else []
    top = _TopK(cfg.selection_candidates, state["top"] if state is not None else None)

    def start() -> int:
        nonlocal es
        if state is not None:
            es = XNES.from_state_dict(state["xnes"])
            return es.popsize
        if cfg.space == "log":
            mean0 = space.origin()
        else:
            heads_per_block = [b.attention.num_heads if b.attention else 0 for b in smap.blocks]
            pos = {b.index: i for i, b in enumerate(smap.blocks)}
            mean0 = initial_mean(len(layout.ffn_blocks), heads_per_block, cfg.mean_start, cfg.mean_end,
                                 ffn_block_indices=[pos[b] for b in layout.ffn_blocks])
        cov0 = _cka_cov(gm, smap, search_x, layout) if cfg.cka_init else None
        eta = None if cfg.eta_sigma == "xnes" else (cfg.eta_sigma or default_eta_sigma(layout.dim))
        es = XNES(mean0, XNESConfig(popsize=cfg.popsize, seed=cfg.seed, sigma0=cfg.spread, eta_sigma=eta), cov0=cov0)
        return es.popsize

    def tell(gen: int, cands: np.ndarray, f: np.ndarray, t0: float) -> None:
        es.tell(cands, f)
        top.add(cands, f)
        dt = time.time() - t0
        history.append({
            "generation": gen, "best": float(np.max(f)), "mean": float(np.mean(f)), "median": float(np.median(f)),
            "best_so_far": float(es.best[1]), "sigma": float(es.sigma), "seconds": dt,
            "evals_per_s": len(cands) * len(cfg.sparsities) / max(dt, 1e-9),
        })
        if ckpt_path is not None:
            payload = {"local": _local_state(local), "xnes": es.state_dict(), "history": history, "top": top.entries,
                       "c1_search": c1_search, "pca": {"dim": dim, "error_share": held},
                       "fingerprint": smap.fingerprint(), "config": _jsonable(asdict(cfg))}
            atomic_write(ckpt_path, lambda tmp: torch.save(payload, tmp), error=ScoresError)

    popsize = ctx.main_then_share(start, "starting xNES")
    bar = _progress(cfg.iterations, len(history), progress and ctx.is_main)
    t1 = time.time()
    try:
        _note_recovery(ctx, ckpt_path, len(history))
        for gen in range(len(history), cfg.iterations):
            tg = time.time()
            cands = ctx.main_then_share(lambda: es.ask(), "sharing the candidates")
            f = on_search(cands)
            ctx.main_then_share(lambda: tell(gen, cands, f, tg), "updating xNES and writing the checkpoint")
            _notify(callback, "generation", gen, space.factors(cands), f)
            _note_recovery(ctx, ckpt_path, gen + 1)
            if bar is not None:
                bar.set_postfix(best=f"{es.best[1]:.4f}", c1=f"{c1_search:.4f}", sigma=f"{es.sigma:.3f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        mean_z, top_entries, history, eta_sigma = ctx.main_then_share(
            lambda: (es.mean, top.entries, history, es.eta_sigma), "sharing the search result")
        mean_search = float(on_search(np.asarray(mean_z)[None])[0]) if cfg.iterations else c1_search

        # 4. selection on held-out images
        pool = [("c=1", space.origin(), c1_search), ("final mean", np.asarray(mean_z), mean_search)]
        pool += [(f"top-{i + 1}", np.asarray(z), f) for i, (f, z) in enumerate(top_entries)]
        chosen, record = _select(pool, space, evaluate, select_x, dense_select, fitness, callback,
                                 cfg.selection_confidence, cfg.seed)
        t_search = time.time() - t1
    finally:
        _note_recovery(ctx, None, None)
    best_c = space.factors(chosen[1])
    log.info("search done in %.1fs: %s", t_search, record["summary"])
    return ElasticScores(
        local=local, c=best_c, layout=layout, sparsities=tuple(float(s) for s in cfg.sparsities), floors=cfg.floors,
        ranking=cfg.ranking, head_offset=float(cfg.head_offset), history=history, best_fitness=float(chosen[2]),
        mean_fitness=mean_search, selection=record, preprocess=preprocess,
        config={**_jsonable(asdict(cfg)), "method": local.method, "pca_dim_requested": cfg.pca_dim,
                "pca_dim": None if not isinstance(fitness, PCACosineFitness) or fitness.full_space else fitness.dim,
                "pca_error_share": held, "fitness_used": fitness.describe(), "popsize": popsize,
                "search_seconds": round(t_search, 2),
                "search_images": int(len(search_x)), "selection_images": int(len(select_x)),
                "eta_sigma_used": eta_sigma},
    )


def _select(pool, space: SearchSpace, evaluate: _Evaluator, select_x: torch.Tensor, dense_select, fitness,
            callback, confidence: float = 0.0, seed: int = 0) -> Tuple[Tuple[str, np.ndarray, float], Dict[str, Any]]:
    """Re-score the pool on the selection images; ``c = 1`` unless something beats it there
    (with ``confidence`` > 0: by a paired-bootstrap interval over the images above 0)."""
    c1 = pool[0]
    if dense_select is None:  # no held-out images: best search fitness, c = 1 unless beaten
        best = max(pool, key=lambda e: e[2])
        chosen = best if best[2] > c1[2] else c1
        record = {"c1": {"search": c1[2], "selection": None}, "winner": {"name": chosen[0], "search": chosen[2],
                  "selection": None}, "chosen": "c=1" if chosen is c1 else "search",
                  "summary": f"{chosen[0]} chosen on search fitness {chosen[2]:.4f} (no selection images)"}
        return chosen, record
    factors = np.stack([space.factors(z) for _, z, _ in pool])
    images = evaluate.per_pair(factors, select_x, lambda e: fitness.per_image(e, dense=dense_select),
                               per_image=True).mean(1).double().numpy()  # [candidates, images]
    sel = images.mean(1)
    _notify(callback, "selection", -1, factors, sel)
    i = best = int(np.argmax(sel))
    interval = None
    if sel[i] <= sel[0]:
        i = 0
    elif confidence > 0:
        interval = paired_interval(images[i] - images[0], confidence, seed)
        if interval[0] <= 0:
            i = 0
    chosen = pool[i]
    record = {
        "c1": {"search": float(c1[2]), "selection": float(sel[0])},
        "winner": {"name": chosen[0], "search": float(chosen[2]), "selection": float(sel[i])},
        "pool": [{"name": n, "search": float(f), "selection": float(s)} for (n, _, f), s in zip(pool, sel)],
        "chosen": "c=1" if i == 0 else "search",
        "best": {"name": pool[best][0], "selection": float(sel[best]),
                 "gain_interval": None if interval is None else [float(v) for v in interval],
                 "confidence": float(confidence)},
    }
    record["summary"] = (
        f"{pool[best][0]} beat c = 1 on the selection images by {sel[best] - sel[0]:+.4f}, but its "
        f"{100 * confidence:g} % interval [{interval[0]:+.4f}, {interval[1]:+.4f}] reaches 0; returning the "
        "no-search ranking"
        if i == 0 and interval is not None else
        f"nothing beat c = 1 on the selection images (c = 1: {sel[0]:.4f}); returning the no-search ranking"
        if i == 0 else
        f"{chosen[0]} wins on the selection images: {sel[i]:.4f} vs {sel[0]:.4f} for c = 1 "
        f"(search fitness {chosen[2]:.4f} vs {c1[2]:.4f})"
    )
    return chosen, record


def paired_interval(gain: np.ndarray, confidence: float, seed: int = 0, resamples: int = 2000,
                    ) -> Tuple[float, float]:
    """Two-sided ``confidence`` percentile-bootstrap interval of the mean per-image ``gain`` (seeded)."""
    rng = np.random.default_rng(seed)
    means = gain[rng.integers(0, len(gain), size=(resamples, len(gain)))].mean(axis=1)
    tail = 50 * (1 - confidence)
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def _auto_pca(cfg: SearchConfig, evaluate: _Evaluator, images: torch.Tensor, dense: torch.Tensor,
              c1: np.ndarray) -> Tuple[Optional[int], float, float]:
    """One masked forward of c = 1 serves twice: its pruning error fixes the PCA size (the fewest
    components holding ``error_share`` of it), then its search fitness is read off the same embeddings.
    Returns ``(dim, share held, c = 1's search fitness)``, the fitness computed as the evaluator does."""
    pruned = evaluate.embeddings(images, evaluate.keeps(c1)).float().cpu()  # [S, N, D]
    dim, held = choose_dim(dense, pruned, cfg.error_share)
    fitness = PCACosineFitness(dense, dim=dim)
    return dim, held, float(torch.stack([fitness(e) for e in pruned]).mean().double())


def _dense(ctx: DistContext, embed: torch.nn.Module, x: torch.Tensor, bs: int, device: torch.device) -> torch.Tensor:
    """Dense embeddings ``[N, D]`` (float32, CPU), image batches split over the ranks."""
    first, stop = ctx.span(len(x), unit=bs)
    with torch.no_grad():
        mine = [embed(x[i : i + bs].to(device)).float().cpu() for i in range(first, stop, bs)]
    return torch.cat([t for part in ctx.all_gather_object(mine, "embedding the fitness images") for t in part])


def _notify(callback, phase: str, gen: int, factors: np.ndarray, f: np.ndarray) -> None:
    if callback is not None:
        callback({"phase": phase, "generation": gen, "factors": np.asarray(factors), "fitness": np.asarray(f)})


def _note_recovery(ctx: DistContext, ckpt_path: Optional[Path], generations: Optional[int]) -> None:
    """What a distributed failure message tells the user about resuming."""
    if not ctx.enabled:
        return
    if generations is None:
        ctx.recovery = "no checkpoint was written yet"
    elif ckpt_path is None:
        ctx.recovery = ("no checkpoint is being written; pass checkpoint_dir (elastic-fx prune --checkpoint-dir) "
                        "to be able to resume")
    elif generations == 0:
        ctx.recovery = f"no generation has finished yet, so {ckpt_path} holds nothing from this run"
    else:
        ctx.recovery = (f"the last good checkpoint is {ckpt_path} (after generation {generations}); continue with "
                        "resume=True (elastic-fx prune --resume), with any number of processes")


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, (tuple, list)):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _progress(total: int, done: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="xNES generations", unit="gen", disable=None)


def _local_state(local: LocalScores) -> Dict[str, Any]:
    """The local scores as plain tensors and strings (``torch.load(weights_only=True)`` reads them)."""
    meta, tensors = local._parts()
    return {"meta": json.dumps(meta, default=str), "tensors": tensors}


def load_checkpoint(path: Optional[Path], smap: StructureMap, cfg: SearchConfig) -> Optional[Dict[str, Any]]:
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a checkpoint")
    except Exception as e:
        raise ScoresError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it and start again") from e
    if state.get("fingerprint") != smap.fingerprint():
        raise ScoresError(f"checkpoint {path} belongs to a different model; use another --checkpoint-dir")
    saved = state.get("config", {})

    def norm(v):
        return [float(x) for x in v] if isinstance(v, (tuple, list)) else v

    for key in _RESUME_KEYS:
        mine = norm(_jsonable(asdict(cfg))[key])
        if norm(saved.get(key)) != mine:
            raise ScoresError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r}, this run asks for {mine!r}; "
                "resume with the same settings or start a new run"
            )
    try:
        local = state["local"]
        state["local"] = LocalScores._from_parts(json.loads(local["meta"]), local["tensors"], str(path))
    except (KeyError, TypeError, ValueError) as e:
        raise ScoresError(f"checkpoint {path} is incomplete ({type(e).__name__}: {e}); delete it and start again") from e
    return state


def _cka_cov(gm, smap, images, layout):
    """CKA similarity between structure outputs -> initial xNES covariance (paper App. E)."""
    feats = structure_features(gm, smap, images[: min(len(images), 256)], layout)
    return cka_covariance(cka_matrix(feats)).numpy()
