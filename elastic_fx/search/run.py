"""prune(model, images) -> ElasticScores: local scores, then the xNES search (paper Alg. 1).

1. local scores: DINO multi-crop squared gradients per head and neuron;
2. fitness images decoded and preprocessed ONCE; dense embeddings, PCA fitted on them;
3. T generations of xNES: every candidate c rescales the local scores, the budget module
   cuts the ranking at every search sparsity (nested masks), and ALL (candidate,
   sparsity) pairs of the generation are evaluated in one batched masked forward;
   fitness = mean PCA cosine similarity to the dense embeddings, averaged over sparsities;
4. the best candidate ever seen wins (the final mean's fitness is reported too).

The run checkpoints after every generation (atomically); ``resume=True`` continues from
the checkpoint and ends with exactly the result of an uninterrupted run.

Under ``torchrun`` (see :mod:`elastic_fx.distributed`) every rank calls ``prune`` with the
same arguments: the gradient pass is split by batches, the dense embeddings by image
batches, and every generation's (candidate, sparsity) pairs by contiguous pair chunks;
rank 0 owns xNES and writes the checkpoints. The trajectory, the checkpoints and the
returned scores are those of one process with the same seed, whatever the number of
processes, and a checkpoint written with N processes resumes with any other number.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..budget import Floors, nested_masks
from ..errors import BudgetError, ElasticFxError, ScoresError
from ..structures import StructureMap
from .candidate import Layout, rescale
from .fitness import PCACosineFitness
from .xnes import XNES, XNESConfig, initial_mean

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "search_checkpoint.pt"


@dataclass
class SearchConfig:
    """Everything that defines a search run (stored in the score file)."""

    iterations: int = 50
    sparsities: Sequence[float] = (0.1, 0.3, 0.5, 0.6)
    seed: int = 0
    popsize: Optional[int] = None  # None: 4 + floor(3 ln d)
    pca_dim: int = 192
    num_images: int = 1000  # gradient images
    num_fitness_images: int = 1000
    batch_size: int = 16  # gradient pass
    eval_batch_size: int = 64  # masked forward (images per chunk)
    pair_chunk: Optional[int] = None  # (candidate, sparsity) pairs per forward; None = all
    mean_start: float = 1.2
    mean_end: float = 0.8
    floors: Floors = field(default_factory=Floors)
    cka_init: bool = False


def _validate(cfg: SearchConfig, smap: StructureMap) -> None:
    from ..budget import max_sparsity

    if cfg.iterations < 0:
        raise ElasticFxError(f"iterations must be >= 0, got {cfg.iterations}")
    if not cfg.sparsities:
        raise BudgetError("give at least one search sparsity, e.g. sparsities=(0.1, 0.3, 0.5, 0.6)")
    top = max_sparsity(smap, cfg.floors)
    for s in cfg.sparsities:
        if not (isinstance(s, (int, float)) and 0 <= s < 1):
            raise BudgetError(f"search sparsity {s!r} is outside [0, 1); sparsity is the fraction of prunable parameters removed")
        if s > top + 1e-9:
            raise BudgetError(
                f"search sparsity {s} cannot be reached: the per-block floors allow at most {top:.3f}; "
                "lower the sparsity or relax the floors"
            )


def prune(
    model: nn.Module,
    images: Any = None,
    iterations: int = 50,
    sparsities: Sequence[float] = (0.1, 0.3, 0.5, 0.6),
    fitness_images: Any = None,
    seed: int = 0,
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
    *,
    config: Optional[SearchConfig] = None,
    local: Any = None,
    device: Optional[str] = None,
    progress: bool = True,
    example_inputs: Any = None,
    preprocess: Any = None,
    distributed: Optional[bool] = None,
):
    """Score every head and FFN neuron without labels and search the global reweighting.

    Args:
        model: an ``nn.Module`` (traced here) or a GraphModule from :func:`elastic_fx.trace`.
        images: a folder path, an image source, or a preprocessed float tensor ``[N, 3, H, W]``;
            ``None`` uses procedural synthetic images.
        iterations: xNES generations.
        sparsities: the search sparsities (fraction of prunable parameters removed).
        fitness_images: images for the fitness; ``None`` = a fixed split of ``images``.
        seed: seeds the crops, the subsampling and xNES.
        checkpoint_dir: where to checkpoint after every generation.
        resume: continue from ``checkpoint_dir``'s checkpoint.
        config: a :class:`SearchConfig` for everything else (overrides the keywords above
            only where they are left at their defaults).
        local: precomputed LocalScores (skips the gradient pass).
        preprocess: a :class:`~elastic_fx.data.PreprocessConfig`; default: the model's own
            (timm / Hugging Face / torchvision config), or, for images given as a
            preprocessed tensor, that tensor's size.
        distributed: ``None`` (auto): split the work over the ranks when launched by
            ``torchrun`` (``WORLD_SIZE > 1``) or inside an initialised process group; every
            rank must make the same call and gets the same result; rank 0 alone writes the
            checkpoint. ``False``: this process works alone. A ``device`` of ``"cuda"``
            means ``cuda:LOCAL_RANK`` when distributed.

    Returns:
        ElasticScores.
    """
    from ..data import load_tensor
    from ..distributed import SAME_IMAGES_HINT, SAME_WEIGHTS_HINT, checksums, current
    from ..elastic import ElasticScores, _atomic_write
    from ..embedding import embedding_module
    from ..passes.discover import discover
    from ..passes.mask import DEFAULT_ROWS_PER_FORWARD, build_masked, masked_embeddings
    from ..scoring.local import local_scores
    from ..tracing import trace

    cfg = config or SearchConfig()
    cfg.iterations, cfg.sparsities, cfg.seed = iterations, tuple(sparsities), seed
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = current(distributed, wanted)
    dev = ctx.device(wanted)
    if example_inputs is None and isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4:
        example_inputs = (images[:2].clone(),)
    gm = trace(model, example_inputs)
    smap = discover(gm)
    ctx.check_same(checksums(gm), "model weights", SAME_WEIGHTS_HINT)
    _validate(cfg, smap)
    layout = Layout.of(smap)
    if layout.dim == 0:
        raise ElasticFxError("this model has no prunable heads or FFN neurons to search over")
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    # rank 0 reads the checkpoint (it need exist on rank 0's machine only) and shares it
    state = ctx.main_then_share(lambda: _load_checkpoint(ckpt_path, smap, cfg) if resume else None,
                                "reading the checkpoint")
    if resume and state is None:
        raise ElasticFxError(f"resume=True but no checkpoint found at {ckpt_path}; run without resume first")

    fit_src = fitness_images if fitness_images is not None else images
    pre = _preprocess(gm, fit_src, preprocess)

    # 1. local scores
    t0 = time.time()
    if state is not None:
        local = state["local"]
    elif local is None:
        local = local_scores(gm, images, batch_size=cfg.batch_size, seed=seed, num_images=cfg.num_images,
                             device=str(dev), progress=progress, preprocess=pre, structures=smap,
                             distributed=ctx.enabled)
    heads_l = {b: t.double() for b, t in local.head_means.items()}
    neurons_l = {b: t.double() for b, t in local.neuron_means.items()}
    t_local = time.time() - t0

    # 2. fitness images and the dense reference (image batches split over the ranks)
    fit_x = ctx.all_or_nothing(lambda: load_tensor(fit_src, pre, cfg.num_fitness_images, seed=seed + 1),
                               "loading the fitness images")
    ctx.check_same(checksums(fit_x), "fitness images", SAME_IMAGES_HINT)
    embed = embedding_module(gm, smap).to(dev).eval()
    ebs = cfg.eval_batch_size
    first, stop = ctx.span(len(fit_x), unit=ebs)
    with torch.no_grad():
        mine = [embed(fit_x[i : i + ebs].to(dev)).float().cpu() for i in range(first, stop, ebs)]
    dense = torch.cat([t for part in ctx.all_gather_object(mine, "embedding the fitness images") for t in part])
    fitness = ctx.main_then_share(lambda: PCACosineFitness(dense, dim=cfg.pca_dim), "fitting the PCA")
    # The masked-attention kernel saves FLOPs on a GPU; on a CPU its PyTorch reference
    # (gathering the kept heads) measured slower than dense attention with masked outputs.
    masked = build_masked(gm, smap, use_kernel=dev.type == "cuda").to(dev).eval()
    amp = torch.bfloat16 if dev.type == "cuda" else None
    n_s = len(cfg.sparsities)
    chunk = cfg.pair_chunk or max(1, DEFAULT_ROWS_PER_FORWARD // ebs)  # pairs per masked forward

    def my_pairs(cands: np.ndarray) -> torch.Tensor:
        """Fitness of this rank's pairs: a contiguous run of whole pair chunks, one value per pair.

        Every forward sees exactly the pairs and images it sees in one process, and each
        pair's fitness is computed on its own, so no value depends on the number of ranks.
        """
        lo, hi = ctx.span(len(cands) * n_s, unit=chunk)
        keeps = []
        for ci in range(lo // n_s, -(-hi // n_s)) if hi > lo else ():
            hs, ns = rescale(layout, cands[ci], heads_l, neurons_l)
            for si, keep in enumerate(nested_masks(smap, hs, ns, cfg.sparsities, floors=cfg.floors)):
                if lo <= ci * n_s + si < hi:
                    keeps.append(keep)
        if not keeps:
            return torch.empty(0, dtype=torch.float32)
        emb = masked_embeddings(masked, fit_x, keeps, batch_size=ebs, pair_chunk=chunk, device=dev, amp_dtype=amp)
        return torch.stack([fitness(e) for e in emb.float()]).cpu()  # [pairs of this rank]

    def evaluate(cands: np.ndarray) -> np.ndarray:
        per_pair = ctx.gather_cat(ctx.all_or_nothing(lambda: my_pairs(cands), "evaluating candidates"))  # [P]
        return per_pair.view(len(cands), n_s).mean(1).double().numpy()

    # 3. xNES: rank 0 owns the optimiser; the others only see its candidates
    es: Optional[XNES] = None
    history = list(state["history"]) if state is not None else []

    def start() -> int:
        nonlocal es
        if state is not None:
            es = XNES.from_state_dict(state["xnes"])
        else:
            heads_per_block = [b.attention.num_heads if b.attention else 0 for b in smap.blocks]
            pos = {b.index: i for i, b in enumerate(smap.blocks)}
            mean0 = initial_mean(len(layout.ffn_blocks), heads_per_block, cfg.mean_start, cfg.mean_end,
                                 ffn_block_indices=[pos[b] for b in layout.ffn_blocks])
            cov0 = _cka_cov(gm, smap, fit_x, layout) if cfg.cka_init else None
            es = XNES(mean0, XNESConfig(popsize=cfg.popsize, seed=seed), cov0=cov0)
        return es.popsize

    def tell(gen: int, cands: np.ndarray, f: np.ndarray, tg: float) -> None:
        es.tell(cands, f)
        dt = time.time() - tg
        history.append({
            "generation": gen, "best": float(np.max(f)), "mean": float(np.mean(f)), "median": float(np.median(f)),
            "best_so_far": float(es.best[1]), "seconds": dt,
            "evals_per_s": len(cands) * len(cfg.sparsities) / max(dt, 1e-9),
        })
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {"local": local, "xnes": es.state_dict(), "history": history,
                                          "fingerprint": smap.fingerprint(), "config": asdict(cfg)}, _atomic_write)

    popsize = ctx.main_then_share(start, "starting xNES")
    bar = _progress(cfg.iterations, len(history), progress and ctx.is_main)
    t1 = time.time()
    try:
        _note_recovery(ctx, ckpt_path, len(history))
        for gen in range(len(history), cfg.iterations):
            tg = time.time()
            cands = ctx.main_then_share(lambda: es.ask(), "sharing the candidates")
            f = evaluate(cands)
            ctx.main_then_share(lambda: tell(gen, cands, f, tg), "updating xNES and writing the checkpoint")
            _note_recovery(ctx, ckpt_path, gen + 1)
            if bar is not None:
                bar.set_postfix(best=f"{es.best[1]:.4f}", evals_s=f"{history[-1]['evals_per_s']:.1f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        t_search = time.time() - t1

        best_x, best_f, mean_c, history = ctx.main_then_share(
            lambda: (es.best[0], float(es.best[1]), es.mean, history), "sharing the search result")
        if best_x is not None:
            best_c = np.asarray(best_x)
            mean_f = float(evaluate(np.asarray(mean_c)[None])[0])
        else:  # iterations == 0: the local ranking alone
            best_c = layout.ones()
            best_f = mean_f = float(evaluate(best_c[None])[0])
    finally:
        _note_recovery(ctx, None, None)
    scores = ElasticScores(
        head_sums={b: t.clone() for b, t in local.head_scores.items()},
        neuron_sums={b: t.clone() for b, t in local.neuron_scores.items()},
        head_means={b: t.clone() for b, t in heads_l.items()},
        neuron_means={b: t.clone() for b, t in neurons_l.items()},
        c=best_c, layout=layout, fingerprint=smap.fingerprint(), blocks=smap.describe(),
        sparsities=tuple(cfg.sparsities), floors=cfg.floors, history=history, best_fitness=best_f,
        mean_fitness=mean_f,
        config={**_jsonable(asdict(cfg)), "method": getattr(local, "method", "dino"), "pca_dim": fitness.dim,
                "popsize": popsize, "local_seconds": round(t_local, 2), "search_seconds": round(t_search, 2),
                "fitness_images": int(len(fit_x))},
    )
    log.info("search done: best fitness %.4f (final mean %.4f) in %.1fs", best_f, mean_f, t_search)
    return scores


def _note_recovery(ctx, ckpt_path: Optional[Path], generations: Optional[int]) -> None:
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


def _preprocess(gm, images: Any, explicit: Any):
    """The model's preprocessing; for already-preprocessed tensors their size is enough."""
    from ..data import PreprocessConfig, preprocess_config
    from ..errors import DataError
    from ..tracing import PREPROCESS_META

    if explicit is not None:
        return explicit
    if gm.meta.get(PREPROCESS_META) is not None:
        return gm.meta[PREPROCESS_META]
    try:
        return preprocess_config(gm)
    except DataError:
        if isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4:
            return PreprocessConfig(input_size=tuple(images.shape[-2:]), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        raise


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


def _save_checkpoint(path: Path, state: Dict[str, Any], atomic) -> None:
    local = state["local"]
    payload = dict(state)
    payload["local"] = {
        "head_scores": {int(b): t for b, t in local.head_scores.items()},
        "neuron_scores": {int(b): t for b, t in local.neuron_scores.items()},
        "head_means": {int(b): t for b, t in local.head_means.items()},
        "neuron_means": {int(b): t for b, t in local.neuron_means.items()},
        "method": getattr(local, "method", "dino"),
    }
    atomic(path, lambda tmp: torch.save(payload, tmp))


class _Local:
    """LocalScores as stored in a checkpoint (only what the search needs)."""

    def __init__(self, d: Dict[str, Any]) -> None:
        self.head_scores, self.neuron_scores = d["head_scores"], d["neuron_scores"]
        self.head_means, self.neuron_means = d["head_means"], d["neuron_means"]
        self.method = d["method"]


def _load_checkpoint(path: Optional[Path], smap: StructureMap, cfg: SearchConfig) -> Optional[Dict[str, Any]]:
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ScoresError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it and start again") from e
    if state.get("fingerprint") != smap.fingerprint():
        raise ScoresError(f"checkpoint {path} belongs to a different model; use another --checkpoint-dir")
    saved = state.get("config", {})
    def norm(v):
        return [float(x) for x in v] if isinstance(v, (tuple, list)) else v

    for key in ("sparsities", "seed", "popsize", "pca_dim"):
        mine = norm(getattr(cfg, key))
        if norm(saved.get(key)) != mine:
            raise ScoresError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r}, this run asks for {mine!r}; "
                "resume with the same settings or start a new run"
            )
    state["local"] = _Local(state["local"])
    return state


def _cka_cov(gm, smap, images, layout):
    """CKA similarity between structure outputs -> initial xNES covariance (paper App. E)."""
    from .cka import cka_covariance, cka_matrix

    feats = _structure_features(gm, smap, images[: min(len(images), 256)], layout)
    return cka_covariance(cka_matrix(feats)).numpy()


def _structure_features(gm, smap, images, layout) -> List[torch.Tensor]:
    """Per-image features of every searched structure: each FFN's hidden activations and
    each head's output, mean-pooled over tokens, in candidate-vector order."""
    import torch.fx as fx

    from ..passes._labels import find_linears

    linears = {li.module: li for li in find_linears(gm).values()}
    want = {}
    for b in smap.blocks:
        if b.mlp is not None and b.mlp.prunable and b.mlp.out_proj in linears:
            want[("ffn", b.index)] = linears[b.mlp.out_proj].input
        if b.attention is not None and b.attention.out_proj in linears:
            want[("heads", b.index)] = linears[b.attention.out_proj].input
    got: Dict[Any, torch.Tensor] = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            for key, node in want.items():
                if node is n:
                    got[key] = out.detach().float().reshape(out.shape[0], -1, out.shape[-1]).mean(1)
            return out

    with torch.no_grad():
        Grab(gm).run(images)
    feats = []
    for b in layout.ffn_blocks:
        feats.append(got[("ffn", b)])
    for b, h in layout.head_blocks:
        x = got.get(("heads", b))
        blk = smap.block(b).attention
        for i in range(h):
            if x is None:
                feats.append(torch.zeros(len(images), 1))
                continue
            cols = next(s for s in blk.slices if s.name == f"{blk.out_proj}.weight").index[i]
            feats.append(x[:, cols])
    return feats
