"""Images in, model-ready tensors out: decode, resize, centre-crop and normalise ONCE.

Takes anything :func:`~elastic_fx.data.as_source` accepts (a folder, a tensor, a list
of images, None for synthetic images) and a :class:`PreprocessConfig`; returns
tensors. Reads image files; touches nothing else.

* :func:`load_tensor` -- float ``[N, 3, H, W]`` for fitness images and evaluation.
* :func:`raw_images` -- decoded uint8 pixels (not resized to the model), for crop
  based augmentation (:class:`elastic_fx.scoring.dino.MultiCropSampler`).
* :func:`to_model_input` -- uint8 ``[N, H, W, C]`` arrays (a labelled ``.npz``) to a
  normalised float batch.
* :func:`iter_batches` -- batches of an already-preprocessed tensor or loader.

Subsampling rule shared by :func:`load_tensor` and :func:`raw_images`: with ``n``
smaller than the source, ``n`` images are drawn by a seeded permutation (so a
class-per-folder dataset is not reduced to its first classes) and returned in
sorted-file order; corrupt files are replaced by the next files of the same permutation.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from .preprocess import PreprocessConfig, normalize, resize
from .sources import DEFAULT_SYNTHETIC_IMAGES, ImageLike, ImageSource, TensorSource, as_source, decoded

logger = logging.getLogger(__name__)


def _order(n_total: int, n: Optional[int], seed: int) -> Tuple[List[int], Optional[int]]:
    """Visiting order and how many images to take (see module docstring)."""
    if n is None or n >= n_total:
        if n is not None and n > n_total:
            logger.info("asked for %d images but the source has %d; using all of them", n, n_total)
        return list(range(n_total)), None
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}.")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g).tolist(), int(n)


def _collect(images: Any, n: Optional[int], seed: int,
             draft_size: Optional[Tuple[int, int]] = None) -> Tuple[ImageSource, List[ImageLike]]:
    """Decode the chosen images of a source, in sorted index order."""
    source = as_source(images, n_synthetic=n or DEFAULT_SYNTHETIC_IMAGES)
    order, want = _order(len(source), n, seed)
    picked = sorted(decoded(source, order, want, draft_size), key=lambda t: t[0])
    return source, [im for _, im in picked]


def to_uint8_chw(image: ImageLike) -> torch.Tensor:
    """A decoded image as uint8 ``[3, H, W]`` (PIL images are converted, tensors returned as is)."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return image


def resize_crop(img: torch.Tensor, size: Tuple[int, int], interpolation: str, crop_pct: float) -> torch.Tensor:
    """uint8 ``[3, h, w]`` -> float ``[1, 3, H, W]`` in ``[0, 1]``: shorter side to ``floor(side / crop_pct)``, centre crop.

    timm's eval geometry; with ``crop_pct = 1`` the shorter side becomes the crop size.
    """
    H, W = size
    h, w = img.shape[-2:]
    # Shorter side to floor(side / crop_pct) -- for non-square inputs, large enough for both sides.
    target = max(math.floor(H / crop_pct) / h, math.floor(W / crop_pct) / w)
    nh, nw = max(H, round(h * target)), max(W, round(w * target))
    x = resize(img.unsqueeze(0).float().div_(255.0), (nh, nw), interpolation).clamp_(0.0, 1.0)
    top, left = (nh - H) // 2, (nw - W) // 2
    return x[..., top:top + H, left:left + W]


def _eval_transform(img: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 ``[3, h, w]`` -> normalised float ``[3, H, W]``: resize, centre-crop, normalise."""
    return normalize(resize_crop(img, cfg.input_size, cfg.interpolation, cfg.crop_pct), cfg)[0]


def load_tensor(
    images: Any,
    cfg: PreprocessConfig,
    n: Optional[int] = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode, resize, centre-crop and normalise images ONCE: float ``[N, 3, H, W]``.

    ``images`` is anything :func:`as_source` takes (``None``: ``n`` synthetic images).
    A preprocessed float tensor is returned as is (its size must match ``cfg``).
    With ``n``, ``n`` images are drawn by a permutation seeded with ``seed`` and
    returned in sorted-file order; unreadable files are skipped (one warning).
    """
    source = as_source(images, n_synthetic=n or DEFAULT_SYNTHETIC_IMAGES)
    if isinstance(source, TensorSource) and source.preprocessed:
        if tuple(source.images.shape[-2:]) != cfg.input_size:
            raise DataError(
                f"preprocessed image tensor is {tuple(source.images.shape[-2:])} but the model expects "
                f"{cfg.input_size}; pass uint8 images to have them resized, or resize them yourself."
            )
        order, want = _order(len(source), n, seed)
        idx = sorted(order[:want] if want is not None else order)
        return source.images[idx].to(dtype)
    H, W = cfg.input_size
    draft = (math.floor(W / cfg.crop_pct), math.floor(H / cfg.crop_pct))
    _, decoded = _collect(source, n, seed, draft_size=draft)
    out = torch.empty(len(decoded), 3, H, W, dtype=dtype)
    for k, im in enumerate(decoded):
        out[k] = _eval_transform(to_uint8_chw(im), cfg)
    return out


def raw_images(
    images: Any,
    n: Optional[int] = None,
    *,
    seed: int = 0,
    max_short_side: Optional[int] = 512,
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Decoded pixels for crop-based augmentation, NOT resized to the model.

    Returns uint8 ``[N, 3, H, W]`` when all images share one size, else a list of uint8
    ``[3, H_i, W_i]`` tensors. Images whose shorter side exceeds ``max_short_side``
    are downscaled to it (keeps memory bounded for large photos; ``None`` keeps full
    resolution). A preprocessed float :class:`TensorSource` is returned as is (crops
    of normalised images equal normalised crops, so the sampler handles both).
    Subsampling as in :func:`load_tensor`.
    """
    source = as_source(images, n_synthetic=n or DEFAULT_SYNTHETIC_IMAGES)
    if isinstance(source, TensorSource):
        order, want = _order(len(source), n, seed)
        idx = sorted(order[:want] if want is not None else order)
        return source.images[idx]
    draft = (max_short_side, max_short_side) if max_short_side else None
    _, decoded = _collect(source, n, seed, draft_size=draft)
    out = [_shrink(to_uint8_chw(im), max_short_side) for im in decoded]
    if len({tuple(t.shape) for t in out}) == 1:
        return torch.stack(out)
    return out


def _shrink(img: torch.Tensor, max_short_side: Optional[int]) -> torch.Tensor:
    """uint8 ``[3, h, w]`` with its shorter side at most ``max_short_side``."""
    h, w = img.shape[-2:]
    if not max_short_side or min(h, w) <= max_short_side:
        return img
    s = max_short_side / min(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    x = F.interpolate(img.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def to_model_input(
    images: Union[torch.Tensor, np.ndarray],
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    size: Optional[int] = None,
) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` images -> normalised float ``[N, C, H, W]``.

    ``mean``/``std`` are the model's statistics (:func:`resolve_preprocess` gives
    them; there is no default). ``size`` resizes (bilinear, antialiased) to
    ``size x size`` when the model expects a different resolution. Float
    ``[N, H, W, C]`` input is taken to be in [0, 1] already; one channel is repeated.
    """
    if mean is None or std is None:
        raise DataError("to_model_input needs the model's mean and std; take them from "
                        "efx.data.resolve_preprocess(model) or pass them, e.g. mean=(0.5, 0.5, 0.5), "
                        "std=(0.5, 0.5, 0.5).")
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"images has shape {tuple(x.shape)}; expected uint8 [N, H, W, C] with C in (1, 3).")
    is_uint8 = x.dtype == torch.uint8
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if is_uint8:
        x = x / 255.0
    out = tuple(x.shape[-2:]) if size is None else (int(size), int(size))
    cfg = PreprocessConfig(out, mean, std, "bilinear", crop_pct=1.0)
    return normalize(resize(x, cfg.input_size, cfg.interpolation), cfg)


def iter_batches(images: Any, batch_size: int) -> Iterable[torch.Tensor]:
    """Batches of preprocessed images: slices of a float ``[N, C, H, W]`` tensor, or the
    items of a loader (``(batch, labels)`` pairs give their batch)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise DataError(f"images has shape {tuple(images.shape)}; expected [N, C, H, W] (use to_model_input for "
                            "uint8 [N, H, W, C] arrays).")
        if not images.is_floating_point():
            raise DataError(f"images has dtype {images.dtype}; expected normalised floats (see to_model_input).")
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
        return
    for item in images:  # a DataLoader or any iterable of batches / (batch, labels)
        yield item[0] if isinstance(item, (tuple, list)) else item
