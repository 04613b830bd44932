"""Batched masked embeddings: many sub-networks of one model on the same images, in few forwards.

Takes a :class:`~elastic_fx.passes.mask.MaskedModel` (the graph rewritten to take keep
masks), preprocessed images and ``P`` keep dicts (one per (candidate, sparsity) pair);
returns the pooled embeddings ``[P, N, D]`` in float32. Each forward runs ``pair_chunk``
pairs on one image batch, so the images are decoded and moved once per batch whatever ``P``
is. Row ``p`` equals the embeddings of the physically sliced model
``efx.slice(gm, smap, keeps[p])``, computed in the model's weights' dtype: bf16 on CUDA by
default (the weights themselves, not autocast around fp32 weights), float32 on the CPU.
Touches nothing but the masked model's device placement and dtype.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from .._precision import compute_dtype
from ..errors import ConfigError, DataError
from ..keep import keep_tensors
from ..passes.mask import MaskedModel

#: Rows (pairs x images) per masked forward by default.
DEFAULT_ROWS_PER_FORWARD = 256


def masked_embeddings(
    model: MaskedModel,
    images: torch.Tensor,
    keeps: Sequence[Optional[Mapping]],
    *,
    batch_size: int = 64,
    pair_chunk: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Pooled embeddings ``[P, N, D]`` (float32) of ``P`` sub-networks on ``N`` images.

    Args:
        model: from :func:`~elastic_fx.passes.mask.build_masked`.
        images: ``[N, 3, H, W]`` preprocessed images (any device; moved batch by batch and
            cast to ``dtype``).
        keeps: ``P`` keep dicts, e.g. one per (candidate, sparsity) from the budget module.
        batch_size: images per forward.
        pair_chunk: pairs per forward (each forward runs ``pair_chunk * batch_size``
            rows); default ``max(1, 256 // batch_size)``.
        device: where to compute; default where ``model``'s parameters are. The model
            is moved there (it owns its parameters; the source GraphModule stays put).
        dtype: the dtype of the model's weights and activations during the forward: None
            gives bfloat16 on CUDA and float32 elsewhere; ``torch.float32`` is full
            precision. The model is cast once (:meth:`MaskedModel.cast`, reversible) and
            stays in it.
        amp_dtype: the former name of ``dtype`` (same meaning).

    Returns:
        float32 tensor ``[P, N, D]`` on ``device``; row ``p`` equals the embeddings of
        ``efx.slice(gm, smap, keeps[p])`` (to the rounding of ``dtype``).
    """
    if not isinstance(model, MaskedModel):
        raise ConfigError(f"masked_embeddings takes a MaskedModel from build_masked(gm, smap), got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"images must be a non-empty tensor [N, 3, H, W], got {got}")
    if batch_size < 1 or (pair_chunk is not None and pair_chunk < 1):
        raise ConfigError(f"batch_size and pair_chunk must be >= 1, got {batch_size} and {pair_chunk}")
    if dtype is not None and amp_dtype is not None and dtype != amp_dtype:
        raise ConfigError(f"dtype={dtype} and amp_dtype={amp_dtype} disagree; amp_dtype is the former name of "
                          "dtype, pass only dtype")
    # host masks, passed as they are: the model reads the kept positions there (on a device that
    # read would be a sync per forward) and moves a forward's masks and positions in one copy each
    head_masks, neuron_masks = keep_tensors(model.smap, keeps)
    P, N = len(keeps), images.shape[0]
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = compute_dtype(dev, dtype if dtype is not None else amp_dtype)
    model.cast(dtype).to(dev).eval()  # cast first: a bf16 model crosses to the GPU at half the size
    chunk = pair_chunk or max(1, DEFAULT_ROWS_PER_FORWARD // batch_size)
    out: Optional[torch.Tensor] = None
    with torch.inference_mode():
        for i in range(0, N, batch_size):
            x = images[i : i + batch_size].to(dev, dtype, non_blocking=True)
            for p0 in range(0, P, chunk):
                sl = slice(p0, p0 + chunk)
                emb = model(x, {k: v[sl] for k, v in head_masks.items()}, {k: v[sl] for k, v in neuron_masks.items()})
                if out is None:
                    out = torch.empty((P, N, emb.shape[-1]), dtype=torch.float32, device=dev)
                out[sl, i : i + x.shape[0]] = emb.float()
    return out
