"""Baseline importance scores, in the same per-structure format as the local scores.

Each function takes a model (an ``nn.Module`` or a traced GraphModule, with an optional
StructureMap); :func:`snip_scores` also takes images and runs one gradient pass
(:mod:`.gradients`), leaving the model as it found it. Nothing is written. Every
function returns a :class:`~elastic_fx.scoring.local.LocalScores` whose
``head_scores[b]`` / ``neuron_scores[b]`` are SUMS over the parameter entries each head /
neuron owns (the same :class:`~elastic_fx.structures.ParamSlice` entries the squared
gradients are summed over; buffers excluded), so that ``head_means`` / ``neuron_means``
and the budget treat every method alike.

* :func:`magnitude_scores` -- ``Σ w²``: the squared L2 norm of the structure's weights.
  (Squared, so that the per-parameter mean is the mean squared weight, and so that it
  adds up over the structure's tensors the way squared gradients do.)
* :func:`lamp_scores` -- LAMP (Lee et al., ICLR 2021, "Layer-adaptive sparsity for the
  magnitude-based pruning"). LAMP scores one weight ``u`` of a layer by
  ``w_u² / Σ_{v in the layer, |w_v| >= |w_u|} w_v²``: its squared magnitude relative to
  all weights of the same layer that are at least as large, which makes scores comparable
  across layers (the largest weight of every layer scores 1). Structured adaptation used
  here: a "layer" is one parameter tensor (a weight matrix or a bias vector); every entry
  of it gets its LAMP score (ties share the denominator of the ``>=`` definition), and a
  structure's score is the SUM of the LAMP scores of the entries it owns, over all its
  tensors. Entries owned by no structure still count in their layer's denominators.
* :func:`snip_scores` -- SNIP-magnitude, ``Σ |w ⊙ ḡ|`` over the structure's entries (the
  connection sensitivity of Lee et al., ICLR 2019), with ``ḡ`` the gradient of the DINO
  self-distillation loss averaged over the same image batches as the local scores (one
  pass; the image-weighted mean of the batch gradients, i.e. SNIP with the whole
  calibration set as its batch).
* :func:`random_scores` -- uniform ``[0, 1)`` per structure from a seeded generator.

"fisher-only" is not a function: it is the ``method="dino"`` local scores used without the
global search (``local_scores(..., method="fisher")`` is an alias of ``"dino"``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..data import PreprocessConfig
from ..structures import StructureMap
from ._groups import ScoredGroup, scored_groups, scored_parameters, sum_per_structure
from ._resolve import resolve_model
from .dino import DinoConfig, LossFn
from .gradients import (PassConfig, batch_gradients, check_finite_grads, describe_batch, pass_dtype, run_batches,
                        target_device)
from ..scores import LocalScores, new_scores
from .objective import build_objective

log = logging.getLogger(__name__)

__all__ = ["lamp_scores", "magnitude_scores", "random_scores", "snip_scores", "sum_per_structure"]


def _data_free(model: nn.Module, structures: Optional[StructureMap], example_inputs: Any
               ) -> Tuple[nn.Module, StructureMap, Sequence[ScoredGroup], Dict[str, nn.Parameter]]:
    gm, smap = resolve_model(model, example_inputs, structures)
    groups = scored_groups(smap)
    return gm, smap, groups, scored_parameters(gm, groups)


def magnitude_scores(model: nn.Module, *, structures: Optional[StructureMap] = None,
                     example_inputs: Any = None) -> LocalScores:
    """``Σ w²`` over each head's / neuron's parameter entries (squared L2 magnitude)."""
    gm, smap, groups, params = _data_free(model, structures, example_inputs)
    heads, neurons = sum_per_structure({n: p.detach().double().square() for n, p in params.items()}, groups)
    return new_scores(smap, heads, neurons, method="magnitude", loss="none", mode="none", num_images=0,
                      config={"definition": "sum of squared weights"})


def lamp_entry_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry of one tensor: ``w² / Σ_{|v| >= |w|} v²`` (float64, ``w``'s shape)."""
    sq = w.detach().to("cpu", torch.float64).reshape(-1).square()
    ordered, _ = torch.sort(sq)
    # suffix[i] = Σ_{j >= i} ordered[j]; a trailing 0 keeps searchsorted's index in range
    suffix = torch.cat([ordered.flip(0).cumsum(0).flip(0), ordered.new_zeros(1)])
    first = torch.searchsorted(ordered, sq, side="left")  # first entry with magnitude >= this one's
    denom = suffix[first]
    scores = torch.where(denom > 0, sq / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    return scores.view(w.shape)


def lamp_scores(model: nn.Module, *, structures: Optional[StructureMap] = None,
                example_inputs: Any = None) -> LocalScores:
    """Σ of per-entry LAMP scores (per parameter tensor) over each structure's entries."""
    gm, smap, groups, params = _data_free(model, structures, example_inputs)
    heads, neurons = sum_per_structure({n: lamp_entry_scores(p) for n, p in params.items()}, groups)
    return new_scores(smap, heads, neurons, method="lamp", loss="none", mode="none", num_images=0,
                      config={"definition": "sum over the structure's entries of w^2 / sum of v^2 over entries "
                                            "of the same tensor with |v| >= |w|"})


def random_scores(model: Union[nn.Module, StructureMap], seed: int = 0, *,
                  structures: Optional[StructureMap] = None, example_inputs: Any = None) -> LocalScores:
    """Uniform ``[0, 1)`` scores, one per structure, from ``torch.Generator().manual_seed(seed)``."""
    smap = model if isinstance(model, StructureMap) else structures
    if smap is None:
        _, smap = resolve_model(model, example_inputs, None)
    gen = torch.Generator().manual_seed(int(seed))
    heads: Dict[int, torch.Tensor] = {}
    neurons: Dict[int, torch.Tensor] = {}
    for g in scored_groups(smap):
        (heads if g.kind == "heads" else neurons)[g.block] = torch.rand(g.size, generator=gen)
    return new_scores(smap, heads, neurons, method="random", loss="none", mode="none", num_images=0,
                      config={"seed": int(seed)})


def snip_scores(
    model: nn.Module,
    images: Any = None,
    *,
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 16,
    seed: int = 0,
    num_images: int = 1000,
    device: Union[str, torch.device, None] = None,
    dino: Optional[DinoConfig] = None,
    progress: bool = True,
    labels: Any = None,
    amp_dtype: Optional[torch.dtype] = None,
    preprocess: Optional[PreprocessConfig] = None,
    structures: Optional[StructureMap] = None,
    example_inputs: Any = None,
) -> LocalScores:
    """SNIP-magnitude: ``Σ |w ⊙ ḡ|`` per structure, ``ḡ`` the mean DINO-loss gradient (one pass).

    Arguments as for :func:`elastic_fx.scoring.local.local_scores` (a ``loss_fn``
    replaces the DINO loss). Memory: one fp32 gradient sum per scored parameter.
    """
    gm, smap = resolve_model(model, example_inputs, structures)
    cfg = PassConfig(batch_size=batch_size, seed=seed, num_images=num_images,
                     device=None if device is None else torch.device(device), progress=progress, amp_dtype=amp_dtype)
    objective, data, n_images = build_objective(gm, smap, "dino", loss_fn, images, cfg, dino=dino, labels=labels,
                                                preprocess=preprocess)
    groups = scored_groups(smap)
    params = scored_parameters(gm, groups)
    device = target_device(gm, cfg)
    cfg = replace(cfg, amp_dtype=pass_dtype(cfg, device))
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}

    def step(bi: int, start: int, batch: Any, n: int) -> float:
        what = describe_batch(bi, start, n)
        loss, grads = batch_gradients(gm, objective, batch, params, what, cfg, device)
        value = check_finite_grads(loss, grads, what, cfg.amp_dtype)
        for name, g in grads.items():
            sums[name].add_(g.float(), alpha=float(n))  # image-weighted mean over batches
        return value

    stats = run_batches(gm, params, objective, data, n_images, cfg, step)
    per_entry = {n: (p.detach().float() * (sums[n].to(p.device) / n_images)).abs() for n, p in params.items()}
    heads, neurons = sum_per_structure(per_entry, groups)
    config = {"batch_size": batch_size, "seed": seed, "num_images_requested": num_images, **objective.extra, **stats}
    return new_scores(smap, heads, neurons, method="snip", loss=objective.name, mode="per-batch",
                      num_images=n_images, config=config)
