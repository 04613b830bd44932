"""Local (label-free) importance scores: squared gradients per attention head and FFN neuron.

    ls = efx.local_scores(model, images, method="dino", loss_fn=None, batch_size=16,
                          mode="per-batch", seed=0)
    ls.head_scores[b]     # fp32 [num_heads] of block b (block indices as in the StructureMap)
    ls.neuron_scores[b]   # fp32 [hidden_features]
    ls.save("vit.scores.safetensors"); ls = efx.LocalScores.load("vit.scores.safetensors", smap)

:func:`local_scores` takes a model (an ``nn.Module`` or a traced GraphModule) and images,
and returns a :class:`LocalScores`. It only chooses the method and calls the pieces:
:mod:`._resolve` (trace + discover, preprocessing), :mod:`.objective` (the loss and the
data), :mod:`.gradients` (the gradient pass) or :mod:`.baselines` (magnitude, LAMP, SNIP,
random). The model is left as it was found (see :mod:`.gradients` for what the pass
changes temporarily); a raw module is traced, which writes the trace into a new GraphModule.

What a score is
---------------
A structure owns entries of several parameters (:class:`~elastic_fx.structures.ParamSlice`):
a head its q/k/v rows, their biases and its out-projection columns (plus per-head tables
such as a relative-position bias); a neuron its in-projection row(s), their bias and its
out-projection column. Its score is the sum, over all those entries, of squared gradients
of the self-supervised loss -- the diagonal Fisher / Gauss-Newton approximation of the
loss curvature (paper, eq. "H_local"):

* ``mode="per-batch"`` (the paper's setting): for each batch of images, the gradient of
  that batch's (mean) loss, squared, summed over the structure's entries and over batches.
  With a ``loss_fn`` this is exactly ``sum_b sum_{e in s} (d loss_fn(model, batch_b) / d theta_e)^2``.
* ``mode="per-sample"``: the true empirical Fisher, ``sum_i sum_{e in s} (d l_i / d theta_e)^2``
  with ``l_i`` image ``i``'s own loss term (ghost norms where they apply, else
  micro-batches of one image; see :mod:`.gradients`). Ghost norms need a loss known to be
  a mean of per-image terms: the built-in ``"dino"`` and ``"ce"`` losses.

Scores are stored as RAW SUMS (``head_scores`` / ``neuron_scores``, the contract above).
The paper ranks structures by the *mean* over their parameters; ``head_means`` /
``neuron_means`` (or :meth:`LocalScores.normalized`) divide by the parameter count of one
head / neuron, which is what the budget ranks.

The default loss is DINO multi-crop self-distillation (:mod:`elastic_fx.scoring.dino`) on
the model's pooled embedding (:func:`elastic_fx.passes.embedding.embedding_module`), with crops
taken from the decoded images at the model's own preprocessing.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from ..data import PreprocessConfig
from ..distributed import SAME_IMAGES_HINT, SAME_WEIGHTS_HINT, checksums, current
from ..errors import ConfigError
from ..scores import LocalScores, new_scores
from ..structures import StructureMap
from ..tracing import EXAMPLE_INPUTS_META
from . import baselines
from ._resolve import example_inputs_from, resolve_model
from .dino import DinoConfig, LossFn
from .gradients import PassConfig, device_of, fisher_pass
from .objective import Images, build_objective

log = logging.getLogger(__name__)

__all__ = ["METHODS", "LocalScores", "local_scores"]

#: Methods :func:`local_scores` understands; ``"fisher"`` is an alias of ``"dino"``
#: (the DINO local scores used without the global search).
METHODS = ("dino", "ce", "magnitude", "lamp", "snip", "random")
METHOD_ALIASES = {"fisher": "dino"}
BASELINES = ("magnitude", "lamp", "random", "snip")



# ============================================================================ entry point
def local_scores(
    model: nn.Module,
    images: Images = None,
    method: str = "dino",
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 16,
    mode: str = "per-batch",
    seed: int = 0,
    *,
    num_images: int = 1000,
    device: Union[str, torch.device, None] = None,
    dino: Optional[DinoConfig] = None,
    progress: bool = True,
    example_inputs: Any = None,
    labels: Any = None,
    amp_dtype: Optional[torch.dtype] = None,
    preprocess: Optional[PreprocessConfig] = None,
    structures: Optional[StructureMap] = None,
    backend: str = "auto",
    per_sample: str = "auto",
    distributed: Optional[bool] = None,
) -> LocalScores:
    """Importance of every attention head and FFN neuron of ``model``, without labels.

    Args:
        model: an ``nn.Module`` (traced with :func:`elastic_fx.trace`, structures found by
            :func:`elastic_fx.discover`) or a GraphModule from :func:`elastic_fx.trace`.
        images: a folder of images, an image source, a uint8 tensor, a float tensor
            ``[N, 3, H, W]`` already preprocessed for the model, or None (synthetic images).
        method: ``"dino"`` (default; ``"fisher"`` is an alias), ``"ce"`` (needs ``labels``),
            or a baseline: ``"magnitude"``, ``"lamp"``, ``"snip"``, ``"random"``
            (see :mod:`elastic_fx.scoring.baselines`).
        loss_fn: ``loss_fn(model, batch) -> scalar`` replaces the loss. It receives the
            traced GraphModule and preprocessed float batches ``[B, 3, H, W]`` (or
            ``(images, labels)`` when ``labels`` are given).
        batch_size: images per gradient step (16 in the paper; each image gives 12 crops).
        mode: ``"per-batch"`` (square each batch's mean gradient; the paper) or
            ``"per-sample"`` (square each image's own gradient: the empirical Fisher).
        seed: seeds the image subsample, the crops and the random baseline.
        num_images: images used (1000 in the paper); all of them when fewer exist.
        device: run the pass there (the model is moved for the pass and moved back).
        dino: multi-crop / temperature settings (:class:`DinoConfig`).
        progress: show a progress bar (images/s) on a terminal.
        example_inputs: example inputs for tracing an ``nn.Module``.
        labels: int ``[N]`` class labels aligned with a tensor of images (``"ce"``).
        amp_dtype: the autocast dtype of the forward and backward: None (default) is
            ``torch.bfloat16`` on CUDA and float32 (no autocast) elsewhere;
            ``torch.float32`` turns autocast off, ``torch.float16`` is also accepted. The
            weights stay fp32, so gradients, their squares and the sums are fp32 always.
        preprocess: the model's :class:`PreprocessConfig` when it cannot be read from it.
        structures: a StructureMap to use instead of discovering one.
        backend: squared-gradient kernel backend (``"auto"``, ``"triton"``, ``"torch"``).
        per_sample: ``"auto"`` (ghost norms where they apply, else a loop over images),
            ``"ghost"`` or ``"loop"``.
        distributed: ``None`` (auto): under ``torchrun`` (``WORLD_SIZE > 1``) or in an
            initialised process group, every rank scores a contiguous block of the batches
            and all ranks return the single-process scores (see :mod:`elastic_fx.distributed`);
            every rank must make the same call. ``False``: this process scores alone.
            The baselines (``magnitude``, ``lamp``, ``random``, ``snip``) are never split.

    Raises:
        NumericalError: a loss or gradient was NaN/inf (the message names the batch).
        DataError: the images cannot be used.
        ConfigError: an option has a value outside what it accepts (method, mode, batch size ...).
        ScoresError: the arguments do not fit together (``"ce"`` without labels,
            ``per_sample="ghost"`` where it cannot apply, a loss that is not a scalar).
    """
    method = METHOD_ALIASES.get(method, method)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS} (or 'fisher'), got {method!r}.")
    ctx = current(False if method in BASELINES else distributed, device)
    cfg = PassConfig(batch_size=batch_size, mode=mode, seed=seed, num_images=num_images,
                     device=ctx.device(device), progress=progress,
                     amp_dtype=amp_dtype, backend=backend, per_sample=per_sample)
    if example_inputs is None and not (isinstance(model, fx.GraphModule) and EXAMPLE_INPUTS_META in model.meta):
        example_inputs = example_inputs_from(images, preprocess)
        if example_inputs is not None:
            example_inputs = tuple(t.to(device_of(model)) for t in example_inputs)
    gm, smap = resolve_model(model, example_inputs, structures)
    if method in BASELINES:

        if method == "snip":
            return baselines.snip_scores(gm, images, loss_fn=loss_fn, batch_size=batch_size, seed=seed,
                                         num_images=num_images, device=device, dino=dino, progress=progress,
                                         labels=labels, amp_dtype=amp_dtype, preprocess=preprocess,
                                         structures=smap)
        fn = {"magnitude": baselines.magnitude_scores, "lamp": baselines.lamp_scores}.get(method)
        return fn(gm, structures=smap) if fn else baselines.random_scores(gm, seed, structures=smap)

    objective, data, n_images = ctx.all_or_nothing(
        lambda: build_objective(gm, smap, method, loss_fn, images, cfg, dino=dino, labels=labels,
                                preprocess=preprocess), "loading the images")
    if ctx.enabled:
        ctx.check_same(checksums(gm), "model weights", SAME_WEIGHTS_HINT)
        ctx.check_same(checksums(data), "images", SAME_IMAGES_HINT)
    heads, neurons, stats = fisher_pass(gm, smap, objective, data, n_images, cfg, dist=ctx)
    config = {
        "batch_size": batch_size, "seed": seed, "num_images_requested": num_images,
        "backend": backend, **objective.extra, **stats,  # stats name the autocast dtype that ran
    }
    log.info("local scores (%s, %s) of %d images in %.1f s (%.1f images/s)", objective.method, mode, n_images,
             stats["seconds"], stats["images_per_s"])
    return new_scores(smap, heads, neurons, method=objective.method, loss=objective.name, mode=mode,
                      num_images=n_images, config=config)
