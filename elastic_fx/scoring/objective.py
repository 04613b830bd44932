"""The loss the gradient pass differentiates, and the data it runs on.

Takes the traced GraphModule, its StructureMap, the method (``"dino"``, ``"ce"``, or a
user ``loss_fn``), the images (and labels) and a :class:`~.gradients.PassConfig`;
returns an :class:`~.gradients.Objective` (``fn(model, batch) -> scalar loss``, its name,
the row layout the ghost-norm path needs, the settings worth recording), the data in
the form that objective takes, and the number of images. Loads and subsamples the
images; touches neither the model's weights nor its flags (the DINO objective puts the
embedding module, which shares the model's parameters, in eval mode).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from ..data import PreprocessConfig, TensorSource, as_source, load_tensor, raw_images
from ..passes.embedding import embedding_module
from ..errors import DataError, ScoresError
from ..structures import StructureMap
from ._resolve import resolve_preprocessing
from .dino import DinoConfig, DinoLoss, LossFn, MultiCropSampler, ce_loss
from .gradients import Objective, PassConfig, device_of

__all__ = ["Images", "build_objective"]

Images = Union[str, os.PathLike, torch.Tensor, Sequence[Any], None]


def _labelled(images: Any, labels: Any, cfg: PreprocessConfig, num_images: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images and their labels, subsampled together."""
    source = as_source(images)
    if not isinstance(source, TensorSource):
        raise DataError(
            "labels need images given as a tensor [N, 3, H, W] in the same order (a folder has no defined "
            "label order); load them first, e.g. efx.data.load_tensor(folder, cfg)."
        )
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.shape[0] != len(source):
        raise DataError(f"labels must be a 1-d tensor with one entry per image ({len(source)}), got {tuple(y.shape)}.")
    idx = torch.arange(len(source))
    if num_images < len(source):
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(source), generator=gen)[:num_images].sort().values
    x = load_tensor(source.images[idx], cfg)
    return x, y[idx]


def build_objective(gm: fx.GraphModule, smap: StructureMap, method: str, loss_fn: Optional[LossFn], images: Images,
                    cfg: PassConfig, *, dino: Optional[DinoConfig] = None, labels: Any = None,
                    preprocess: Optional[PreprocessConfig] = None) -> Tuple[Objective, Any, int]:
    """The loss to differentiate, the data it runs on, and the number of images.

    * a ``loss_fn`` gets preprocessed float batches ``[B, 3, H, W]`` (``(images, labels)``
      tuples when ``labels`` are given) and the traced GraphModule;
    * ``"ce"`` needs ``labels`` and a model that outputs logits;
    * ``"dino"`` (and ``"snip"``) take multi-crops of the decoded images (or of an
      already-preprocessed float tensor) and run the pooled-embedding module.
    """
    source = as_source(images, n_synthetic=cfg.num_images, synthetic_seed=cfg.seed)
    pre = resolve_preprocessing(gm, source, preprocess)
    if loss_fn is not None:
        if labels is not None:
            data: Any = _labelled(source, labels, pre, cfg.num_images, cfg.seed)
        else:
            data = load_tensor(source, pre, cfg.num_images, seed=cfg.seed)
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)

        def custom(model: nn.Module, batch: Any) -> torch.Tensor:
            return loss_fn(model, _to_device(batch, device_of(model)))

        return Objective(custom, name, "custom"), data, len(data[0] if isinstance(data, tuple) else data)
    if method == "ce":
        if labels is None:
            raise ScoresError("method='ce' needs labels=<int tensor [N]>; use method='dino' for label-free scores.")
        data = _labelled(source, labels, pre, cfg.num_images, cfg.seed)

        def ce(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            dev = device_of(model)
            return ce_loss(lambda t: _logits(model(t)), x.to(dev), y.to(dev))

        return Objective(ce, "cross-entropy", "ce", module=gm, views=1), data, len(data[0])
    dcfg = dino if dino is not None else DinoConfig()
    emb = embedding_module(gm, smap)
    emb.eval()  # DinoLoss restores the mode it finds: keep it eval
    sampler = MultiCropSampler(pre, dcfg, seed=cfg.seed)
    dino_fn = DinoLoss(sampler)

    def dino_objective(model: nn.Module, batch: Any) -> torch.Tensor:
        return dino_fn(emb, batch)  # emb shares model's parameters

    data = raw_images(source, cfg.num_images, seed=cfg.seed)
    extra = {"dino": asdict(dcfg), "preprocess": pre.to_dict()}
    return Objective(dino_objective, "dino", "dino", module=emb, views=dcfg.n_views, extra=extra,
                     skip=lambda n: _skip_crops(sampler, n)), data, len(data)


def _skip_crops(sampler: MultiCropSampler, n: int) -> None:
    """Advance the crop generator as ``sampler(<n images>)`` does, without cropping.

    The boxes' random draws depend on the number of images and views only, never on the
    image sizes, so drawing boxes for ``n`` dummy images consumes exactly the same numbers.
    """
    sizes = [(1, 1)] * n
    d = sampler.dino
    sampler.boxes(sizes, d.global_scale, d.n_global)
    if d.n_local:
        sampler.boxes(sizes, d.local_scale, d.n_local)


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of ``batch`` (a tensor or a tuple of them) on ``device``; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return tuple(_to_device(b, device) for b in batch)
    return batch


def _logits(out: Any) -> torch.Tensor:
    """The logits tensor in a model's output (a tensor, ``.logits`` / ``["logits"]``, or a tuple's first)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits",):
        v = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ScoresError(f"method='ce' needs a model that returns logits [B, classes]; it returned {type(out).__name__}.")

