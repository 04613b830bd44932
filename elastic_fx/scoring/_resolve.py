"""The model and its preprocessing, as the scoring stage needs them.

Takes what a user hands to :func:`~elastic_fx.scoring.local.local_scores` (an
``nn.Module`` or a traced GraphModule, the images, an explicit preprocessing); returns a
GraphModule with its StructureMap (tracing and discovering when needed), the model's
:class:`~elastic_fx.data.PreprocessConfig`, and example inputs for tracing. Writes the
trace / discovery results into the GraphModule's ``meta`` (as ``trace`` and ``discover``
do); touches nothing else.

This is the one place in scoring/ that resolves either; other stages do the same job
in their own code for now (one shared helper each is planned, below scoring).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..data import PREPROCESS_META, PreprocessConfig
from ..errors import DataError, ScoresError
from ..passes.discover import STRUCTURE_META, discover
from ..structures import StructureMap
from ..tracing import EXAMPLE_INPUTS_META, trace

__all__ = ["example_inputs_from", "resolve_model", "resolve_preprocessing"]


def resolve_model(model: nn.Module, example_inputs: Any = None,
                  structures: Optional[StructureMap] = None) -> Tuple[fx.GraphModule, StructureMap]:
    """``model`` as a traced GraphModule with its StructureMap (tracing / discovering if needed)."""
    if not isinstance(model, nn.Module):
        raise ScoresError(f"model must be a torch.nn.Module or a traced GraphModule, got {type(model).__name__}.")
    gm = model if isinstance(model, fx.GraphModule) and EXAMPLE_INPUTS_META in model.meta else trace(model, example_inputs)
    smap = structures if structures is not None else gm.meta.get(STRUCTURE_META) or discover(gm)
    return gm, smap


def resolve_preprocessing(gm: fx.GraphModule, source: Any, explicit: Optional[PreprocessConfig]) -> PreprocessConfig:
    """The model's preprocessing; neutral statistics when images come preprocessed."""
    if explicit is not None:
        return explicit
    stored = gm.meta.get(PREPROCESS_META)
    if stored is not None:
        return stored if isinstance(stored, PreprocessConfig) else PreprocessConfig.from_dict(stored)
    if getattr(source, "preprocessed", False):
        ex = gm.meta.get(EXAMPLE_INPUTS_META) or ()
        size = tuple(ex[0].shape[-2:]) if ex and isinstance(ex[0], torch.Tensor) and ex[0].dim() == 4 \
            else tuple(source.images.shape[-2:])
        # crops of normalised images are not normalised again: the statistics are unused
        return PreprocessConfig(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    raise DataError(
        "cannot tell how this model expects its images (no timm / Hugging Face / torchvision preprocessing "
        "config was found). Pass preprocess=efx.data.preprocess_config(model, input_size=..., mean=..., std=...), "
        "or give images as a float tensor [N, 3, H, W] that is already preprocessed."
    )


def example_inputs_from(images: Any, preprocess: Optional[PreprocessConfig]) -> Any:
    """Example inputs for tracing a raw module: two of the given preprocessed images, if any."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        return (images[:2].float(),)
    if preprocess is not None:
        return (torch.randn(2, 3, *preprocess.input_size, generator=torch.Generator().manual_seed(0)),)
    return None
