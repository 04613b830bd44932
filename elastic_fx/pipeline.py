"""prune(model, images) -> ElasticScores: the one place that knows the order of the stages.

trace -> discover -> local scores (DINO squared gradients) -> xNES search. Each stage is
called with what the previous one produced, so a GraphModule and StructureMap made by the
caller (``efx.trace`` / ``efx.discover``) are used as they are. The model's preprocessing
is resolved once, here, and travels with the scores. Writes nothing but the search's
optional checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, as_source, load_tensor, resolve_preprocess
from .distributed import SAME_WEIGHTS_HINT, checksums, current
from .errors import ConfigError, DataError
from .passes.discover import prepare
from .scores import ElasticScores
from .scoring.local import local_scores
from .search.search import CHECKPOINT_NAME, SearchConfig, load_checkpoint, search, validate
from .structures import StructureMap
from .tracing import example_inputs_of

log = logging.getLogger(__name__)

__all__ = ["SearchConfig", "prune"]


def prune(
    model: nn.Module,
    images: Any = None,
    iterations: Optional[int] = None,
    sparsities: Optional[Sequence[float]] = None,
    fitness_images: Any = None,
    seed: Optional[int] = None,
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
    *,
    config: Optional[SearchConfig] = None,
    structures: Optional[StructureMap] = None,
    local: Any = None,
    selection_images: Any = None,
    device: Optional[str] = None,
    progress: bool = True,
    example_inputs: Any = None,
    preprocess: Any = None,
    distributed: Optional[bool] = None,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> ElasticScores:
    """Score every head and FFN neuron without labels and search the global reweighting.

    Args:
        model: an ``nn.Module`` (traced here) or a GraphModule from :func:`elastic_fx.trace`.
        images: a folder path, an image source, or a preprocessed float tensor ``[N, 3, H, W]``;
            ``None`` uses procedural synthetic images.
        iterations, sparsities, seed: xNES generations, search sparsities, seed. Left at
            ``None`` they come from ``config`` (default :class:`SearchConfig`: 50,
            (0.1, 0.3, 0.5, 0.6), 0); given, they override it. ``config`` is never mutated.
        fitness_images: images for the fitness (split into search and selection parts);
            ``None`` = a seeded sample of ``images``. Images the model did not train on are
            best: on a model that memorised its training images the search imitated the
            dense model where it is not representative (benchmarks/results/quality.md).
        checkpoint_dir: where to checkpoint after every generation.
        resume: continue from ``checkpoint_dir``'s checkpoint.
        config: a :class:`SearchConfig` for everything else.
        structures: the StructureMap of ``model`` from :func:`elastic_fx.discover` (found
            here when not given).
        local: precomputed LocalScores (skips the gradient pass).
        selection_images: images for choosing the winner (instead of a split of the fitness
            images).
        preprocess: a :class:`~elastic_fx.data.PreprocessConfig`; default: the model's own
            (timm / Hugging Face / torchvision config), or, for images given as a
            preprocessed tensor, that tensor's size.
        distributed: ``None`` (auto): split the work over the ranks when launched by
            ``torchrun`` or inside an initialised process group; every rank must make the
            same call and gets the same result; rank 0 alone writes the checkpoint.
            ``False``: this process works alone. A ``device`` of ``"cuda"`` means
            ``cuda:LOCAL_RANK`` when distributed.
        callback: called after every evaluation (see :func:`elastic_fx.search.search.search`).

    Returns:
        ElasticScores.
    """
    overrides = {k: v for k, v in (("iterations", iterations), ("seed", seed)) if v is not None}
    if sparsities is not None:
        overrides["sparsities"] = tuple(sparsities)
    if config is not None and not isinstance(config, SearchConfig):
        raise ConfigError(f"config must be an elastic_fx.SearchConfig, got {type(config).__name__}")
    cfg = replace(config or SearchConfig(), **overrides)
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = current(distributed, wanted)
    dev = ctx.device(wanted)
    if example_inputs is None and isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4:
        example_inputs = (images[:2].clone(),)
    gm, smap = prepare(model, example_inputs, structures)
    ctx.check_same(checksums(gm), "model weights", SAME_WEIGHTS_HINT)
    validate(cfg, smap)
    for src in (fitness_images, selection_images):
        if isinstance(src, (str, os.PathLike)):
            as_source(src)  # a missing or empty folder fails now, not after the gradient pass
    fit_src = fitness_images if fitness_images is not None else images
    pre = _preprocess(gm, fit_src, preprocess)

    t0 = time.time()
    resumed = None
    if resume and checkpoint_dir:
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        resumed = ctx.main_then_share(lambda: load_checkpoint(path, smap, cfg), "reading the checkpoint")
    if resumed is not None:
        local = resumed["local"]
    elif local is None:
        local = local_scores(gm, images, batch_size=cfg.batch_size, seed=cfg.seed, num_images=cfg.num_images,
                             device=str(dev), progress=progress, preprocess=pre, structures=smap,
                             distributed=ctx.enabled)
    else:
        local.check(smap)
    t_local = time.time() - t0

    fit_x = ctx.all_or_nothing(lambda: load_tensor(fit_src, pre, cfg.num_fitness_images, seed=cfg.seed + 1),
                               "loading the fitness images")
    sel_x = None
    if selection_images is not None:
        sel_x = ctx.all_or_nothing(lambda: load_tensor(selection_images, pre, cfg.num_fitness_images,
                                                       seed=cfg.seed + 2), "loading the selection images")
    scores = search(gm, smap, local, fit_x, cfg, ctx=ctx, device=dev, selection_images=sel_x,
                     checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, callback=callback,
                     preprocess=pre.to_dict())
    scores.config["example_input_shape"] = list(example_inputs_of(gm)[0].shape)
    scores.config["local_seconds"] = round(t_local, 2)
    scores.config["fitness_images"] = int(len(fit_x)) + (int(len(sel_x)) if sel_x is not None else 0)
    if isinstance(fitness_images, (str, os.PathLike)):
        scores.config["fitness_folder"] = str(Path(fitness_images).expanduser().resolve())
    if isinstance(images, (str, os.PathLike)):  # the default INT8 calibration folder of ElasticModel.export
        scores.config["images"] = str(Path(images).expanduser().resolve())
    return scores


def _preprocess(gm, images: Any, explicit: Any) -> PreprocessConfig:
    """The model's preprocessing (:func:`elastic_fx.data.resolve_preprocess`); a model that carries
    no normalisation gets the ImageNet statistics at its traced input size, said in one line."""
    try:
        return resolve_preprocess(gm, images, explicit)
    except DataError:
        size = tuple(example_inputs_of(gm)[0].shape[-2:])
        log.warning("the model carries no normalisation: using the ImageNet mean/std at %dx%d "
                    "(pass preprocess=efx.data.PreprocessConfig(...) to override)", *size)
        return PreprocessConfig(size, IMAGENET_MEAN, IMAGENET_STD)
