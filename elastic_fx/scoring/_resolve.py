"""The model and its preprocessing, as the scoring stage needs them.

Takes what a user hands to :func:`~elastic_fx.scoring.local.local_scores` (an
``nn.Module`` or a traced GraphModule, the images, an explicit preprocessing); returns a
GraphModule with its StructureMap (:func:`elastic_fx.passes.discover.prepare`), the
model's :class:`~elastic_fx.data.PreprocessConfig` (:func:`elastic_fx.data.resolve_preprocess`),
and example inputs for tracing. Touches nothing but what ``trace`` / ``discover`` record
in the GraphModule's ``meta``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..data import PreprocessConfig, resolve_preprocess
from ..errors import ScoresError
from ..passes.discover import prepare
from ..structures import StructureMap
from ..tracing import EXAMPLE_INPUTS_META

__all__ = ["example_inputs_from", "resolve_model", "resolve_preprocessing"]


def resolve_model(model: nn.Module, example_inputs: Any = None,
                  structures: Optional[StructureMap] = None) -> Tuple[fx.GraphModule, StructureMap]:
    """``model`` as a traced GraphModule with its StructureMap (tracing / discovering if needed)."""
    if not isinstance(model, nn.Module):
        raise ScoresError(f"model must be a torch.nn.Module or a traced GraphModule, got {type(model).__name__}.")
    return prepare(model, example_inputs, structures)


def resolve_preprocessing(gm: fx.GraphModule, source: Any, explicit: Optional[PreprocessConfig]) -> PreprocessConfig:
    """The model's preprocessing; neutral statistics at the traced size when images come preprocessed."""
    ex = gm.meta.get(EXAMPLE_INPUTS_META) or ()
    traced = tuple(ex[0].shape[-2:]) if ex and isinstance(ex[0], torch.Tensor) and ex[0].dim() == 4 else None
    return resolve_preprocess(gm, source, explicit, traced_size=traced)


def example_inputs_from(images: Any, preprocess: Optional[PreprocessConfig]) -> Any:
    """Example inputs for tracing a raw module: two of the given preprocessed images, if any."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        return (images[:2].float(),)
    if preprocess is not None:
        return (torch.randn(2, 3, *preprocess.input_size, generator=torch.Generator().manual_seed(0)),)
    return None
