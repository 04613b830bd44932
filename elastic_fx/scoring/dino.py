"""DINO multi-crop self-distillation loss, the label-free signal behind the local scores.

Teacher = the frozen model (no classifier head), student = the same weights. Each image
gives ``n_global`` global crops (area scale 0.25-1.0) and ``n_local`` local crops
(0.05-0.25), all resized to the model's own input size and normalised with the model's
own statistics. Every crop of every image is sampled independently (the reference
implementation samples one crop box per batch, so all its "views" are identical).

The loss is a soft cross-entropy from every teacher global view ``k`` to every student
view ``m != k`` on L2-normalised pooled embeddings:

    p_t = softmax(z_t / teacher_temp),  log p_s = log_softmax(z_s / student_temp)
    loss = mean over (k, m != k) and images of  -sum_d p_t[d] log p_s[d]

With the defaults ``teacher_temp = student_temp = 1.0`` this is the reference's loss
(no temperature, no centering, no projection head). Because the embeddings are unit
vectors, the logits lie in [-1, 1] and the distributions are close to uniform; lower
temperatures sharpen them (DINO itself uses 0.04 / 0.1 with a projection head).

Takes images (uint8 ``[B, 3, H, W]``, PIL images, or already-normalised floats) and an
embedding function or model; returns crops (:class:`MultiCropSampler`) and a scalar loss
(:func:`dino_loss`, :class:`DinoLoss`, :func:`ce_loss`). :class:`DinoLoss` puts the model
in eval mode for one call and restores its mode; nothing else is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import PreprocessConfig, normalize, resize
from ..errors import ConfigError, DataError

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
#: Any loss the gradient pass accepts: ``loss_fn(model, batch) -> scalar``.
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10


@dataclass
class DinoConfig:
    """Multi-crop and temperature settings.

    Defaults reproduce the reference: 2 global crops at area scale 0.25-1.0, 10 local
    crops at 0.05-0.25, and no temperature (both 1.0).

    Raises:
        ConfigError: a view count, a scale range or a temperature is out of range.
    """

    n_global: int = 2
    n_local: int = 10
    global_scale: Tuple[float, float] = (0.25, 1.0)
    local_scale: Tuple[float, float] = (0.05, 0.25)
    teacher_temp: float = 1.0
    student_temp: float = 1.0

    def __post_init__(self) -> None:
        if self.n_global < 1 or self.n_local < 0:
            raise ConfigError(f"need n_global >= 1 and n_local >= 0, got {self.n_global} and {self.n_local}.")
        if self.n_global + self.n_local < 2:
            raise ConfigError("need at least 2 views in total (a teacher view and another student view).")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}.")
        if self.teacher_temp <= 0 or self.student_temp <= 0:
            raise ConfigError(
                f"temperatures must be positive, got teacher {self.teacher_temp}, student {self.student_temp}."
            )

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local


class MultiCropSampler:
    """Random-resized crops of each image, at the model's input size, normalised.

    ``__call__(images)`` takes uint8 ``[B, 3, H, W]``, a list of uint8 ``[3, H_i, W_i]``
    tensors or PIL images, or a float ``[B, 3, H, W]`` tensor that is *already
    normalised* (crop-and-resize commutes with per-channel normalisation, so those are
    cropped but not normalised again). It returns ``(global_views [n_global, B, 3, H,
    W], local_views [n_local, B, 3, H, W])``, float32 on the images' device.

    Crop boxes follow RandomResizedCrop: area fraction uniform in the scale range,
    aspect ratio log-uniform in 3/4..4/3, up to 10 tries, then a centre crop. Every
    (view, image) pair draws its own box from one seeded generator, so a sampler
    created with the same seed and called on the same batches yields the same views.
    """

    def __init__(self, cfg: PreprocessConfig, dino: Optional[DinoConfig] = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.dino = dino if dino is not None else DinoConfig()
        self.generator = torch.Generator().manual_seed(int(seed))

    def boxes(self, sizes: Sequence[Tuple[int, int]], scale: Tuple[float, float], n_views: int) -> torch.Tensor:
        """Crop boxes ``[n_views, B, 4]`` as (top, left, height, width) for images of ``sizes``."""
        hw = torch.tensor(sizes, dtype=torch.float64)  # [B, 2]
        B = hw.shape[0]
        H, W = hw[:, 0], hw[:, 1]
        area = H * W
        g = self.generator
        u_scale = torch.rand(n_views, B, _ATTEMPTS, generator=g, dtype=torch.float64)
        u_ratio = torch.rand(n_views, B, _ATTEMPTS, generator=g, dtype=torch.float64)
        u_pos = torch.rand(n_views, B, 2, generator=g, dtype=torch.float64)

        target = area[None, :, None] * (scale[0] + (scale[1] - scale[0]) * u_scale)
        log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        ok = (w > 0) & (h > 0) & (w <= W[None, :, None]) & (h <= H[None, :, None])
        first = torch.argmax(ok.to(torch.int8), dim=-1, keepdim=True)  # first valid try
        any_ok = ok.any(dim=-1)
        h = h.gather(-1, first)[..., 0]
        w = w.gather(-1, first)[..., 0]

        # Fallback (no valid try): the largest centre crop with an aspect ratio in range.
        in_ratio = W / H
        fw = torch.where(in_ratio < _RATIO[0], W, torch.where(in_ratio > _RATIO[1], torch.round(H * _RATIO[1]), W))
        fh = torch.where(in_ratio < _RATIO[0], torch.round(W / _RATIO[0]), H)
        h = torch.where(any_ok, h, fh[None].expand_as(h))
        w = torch.where(any_ok, w, fw[None].expand_as(w))
        top = torch.where(any_ok, torch.floor(u_pos[..., 0] * (H - h + 1)), torch.div(H - h, 2, rounding_mode="floor"))
        left = torch.where(any_ok, torch.floor(u_pos[..., 1] * (W - w + 1)), torch.div(W - w, 2, rounding_mode="floor"))
        return torch.stack([top, left, h, w], dim=-1).to(torch.long)

    def __call__(
        self, images: Union[torch.Tensor, Sequence[Union[torch.Tensor, Image.Image]]]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        imgs, normalised = _as_image_list(images)
        sizes = [tuple(int(s) for s in im.shape[-2:]) for im in imgs]
        d = self.dino
        g_boxes = self.boxes(sizes, d.global_scale, d.n_global)
        l_boxes = self.boxes(sizes, d.local_scale, d.n_local) if d.n_local else None
        views = [self._crop(imgs, g_boxes, normalised)]
        if l_boxes is not None:
            views.append(self._crop(imgs, l_boxes, normalised))
        else:
            H, W = self.cfg.input_size
            views.append(torch.empty(0, len(imgs), 3, H, W, device=views[0].device))
        return views[0], views[1]

    def _crop(self, imgs: List[torch.Tensor], boxes: torch.Tensor, normalised: bool) -> torch.Tensor:
        """Crop + resize every (view, image) box; normalise uint8 sources once, batched."""
        V, B = boxes.shape[:2]
        H, W = self.cfg.input_size
        out = torch.empty(V, B, 3, H, W, device=imgs[0].device)
        for v in range(V):
            for b, img in enumerate(imgs):
                top, left, h, w = boxes[v, b].tolist()
                crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
                if not normalised:
                    crop = crop / 255.0
                out[v, b] = resize(crop, (H, W), self.cfg.interpolation)[0]
        if not normalised:
            out = normalize(out.clamp_(0.0, 1.0), self.cfg)
        return out


def _as_image_list(images: Any) -> Tuple[List[torch.Tensor], bool]:
    """Images as a list of ``[3, H, W]`` tensors, and whether they are already normalised."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}.")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise DataError(f"expected uint8 pixels or normalised floats, got dtype {images.dtype}.")
        return list(images), images.is_floating_point()
    if len(images) == 0:
        raise DataError("empty image batch; pass at least one image.")
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            im = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] != 3 or im.dtype != torch.uint8:
            raise DataError("a list of images must hold PIL images or uint8 [3, H, W] tensors.")
        out.append(im)
    return out, False


def dino_loss(
    embed_fn: EmbedFn,
    global_views: torch.Tensor,
    local_views: torch.Tensor,
    cfg: Optional[DinoConfig] = None,
    *,
    teacher_fn: Optional[EmbedFn] = None,
) -> torch.Tensor:
    """Soft cross-entropy from each teacher global view to every other student view.

    ``embed_fn`` maps a normalised batch ``[M, 3, H, W]`` to pooled embeddings
    ``[M, D]``. The student runs as ONE batched call over all ``(n_global + n_local) * B``
    views. The teacher is the same frozen weights, so by default its embeddings are the
    student's global-view embeddings *detached* -- identical values without a second
    forward pass. Pass ``teacher_fn`` for a distinct teacher (run under ``no_grad``).
    Embeddings are L2-normalised; the softmax runs over the embedding dimension; the
    result is the mean over (teacher k, student m != k) pairs and over images.
    """
    cfg = cfg if cfg is not None else DinoConfig()
    if global_views.dim() != 5 or local_views.dim() != 5 or global_views.shape[1:] != local_views.shape[1:]:
        raise DataError(
            f"expected views [V, B, 3, H, W] of one shape, got global {tuple(global_views.shape)} "
            f"and local {tuple(local_views.shape)}."
        )
    G, B = global_views.shape[:2]
    views = torch.cat([global_views, local_views], dim=0)  # [V, B, 3, H, W]
    V = views.shape[0]
    if V < 2:
        raise DataError(f"need at least 2 views for a teacher/student pair, got {V}.")

    z_s = _embed(embed_fn, views.flatten(0, 1), V * B).view(V, B, -1)
    z_s = F.normalize(z_s, dim=-1)
    if teacher_fn is None:
        z_t = z_s[:G].detach()
    else:
        with torch.no_grad():
            z_t = F.normalize(_embed(teacher_fn, global_views.flatten(0, 1), G * B).view(G, B, -1), dim=-1)

    p_t = torch.softmax(z_t.float() / cfg.teacher_temp, dim=-1)  # [G, B, D]
    log_p_s = torch.log_softmax(z_s.float() / cfg.student_temp, dim=-1)  # [V, B, D]
    ce = -torch.einsum("kbd,mbd->kmb", p_t, log_p_s)  # [G, V, B]
    keep = torch.ones(G, V, dtype=torch.bool, device=ce.device)
    keep[torch.arange(G), torch.arange(G)] = False  # no (view k, same view k) pair
    return ce[keep].mean()


def _embed(fn: EmbedFn, x: torch.Tensor, m: int) -> torch.Tensor:
    z = fn(x)
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != m:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DataError(
            f"the embedding function must return pooled embeddings [{m}, D], got {shape}; "
            "use the model without its classifier head (e.g. timm num_classes=0)."
        )
    return z


def ce_loss(logits_fn: EmbedFn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy with labels, for models that have a classifier head."""
    logits = logits_fn(images)
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise DataError(
            f"expected logits [B, classes] and labels [B], got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise DataError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    n_cls = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
        raise DataError(f"labels must lie in [0, {n_cls}), got range [{int(labels.min())}, {int(labels.max())}].")
    return F.cross_entropy(logits.float(), labels.long())


class DinoLoss:
    """``loss_fn(model, batch)`` for the gradient pass: sample crops, then :func:`dino_loss`.

    ``batch`` is whatever :class:`MultiCropSampler` takes (e.g. a slice of
    :func:`elastic_fx.data.raw_images`). ``embed(model, x)`` returns pooled embeddings;
    by default ``model(x)``, which is right for a model without its classifier head.
    The model runs in eval mode (no dropout / drop-path, so teacher and student agree);
    its previous mode is restored afterwards.
    """

    def __init__(
        self,
        sampler: MultiCropSampler,
        embed: Optional[Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.sampler = sampler
        self.embed = embed if embed is not None else (lambda model, x: model(x))

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            device = _device_of(model)
            if device is not None:  # crop on the model's device: uint8 travels, not 12 float views
                if isinstance(batch, torch.Tensor):
                    batch = batch.to(device)
                elif isinstance(batch, (list, tuple)):
                    batch = [b.to(device) if isinstance(b, torch.Tensor) else b for b in batch]
            global_views, local_views = self.sampler(batch)
            if device is not None:
                global_views, local_views = global_views.to(device), local_views.to(device)
            return dino_loss(lambda x: self.embed(model, x), global_views, local_views, self.sampler.dino)
        finally:
            model.train(was_training)


def _device_of(model: torch.nn.Module) -> Optional[torch.device]:
    p = next(model.parameters(), None)
    return p.device if p is not None else None
