"""Image sources and the model's own preprocessing.

Three kinds of image source feed scoring (DINO crops) and fitness/evaluation:

* :class:`ImageFolderSource` -- every image file under a folder (recursive by
  default), decoded lazily; files that cannot be decoded are skipped and counted in
  ONE warning per pass.
* :class:`TensorSource` -- a tensor the caller already holds: float ``[N, 3, H, W]``
  is taken as *already preprocessed* (never normalised again); uint8 ``[N, H, W, 3]``
  or ``[N, 3, H, W]`` is raw pixels, preprocessed like decoded files.
* :class:`SyntheticSource` -- procedural images (gradients, stripes, checkers, shapes,
  colour noise), deterministic from a seed; used when the user gives no images.

Preprocessing (:class:`PreprocessConfig`) always comes from the model itself
(:func:`preprocess_config`): timm's ``pretrained_cfg``, a Hugging Face image-processor
config, torchvision's known weights, a config stored on a traced GraphModule, or
explicit arguments. No ImageNet statistics are assumed for a model that did not ask
for them.

Two entry points turn any source into tensors:

* :func:`load_tensor` -- decode, resize, centre-crop and normalise ONCE: float
  ``[N, 3, H, W]`` for fitness images and evaluation.
* :func:`raw_images` -- decoded uint8 pixels (not resized to the model), for crop
  based augmentation (:class:`elastic_fx.scoring.dino.MultiCropSampler`).

Subsampling rule shared by both: with ``n`` smaller than the source, ``n`` images are
drawn by a seeded permutation (so a class-per-folder dataset is not reduced to its
first classes) and returned in sorted-file order; corrupt files are replaced by the
next files of the same permutation.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .errors import DataError

logger = logging.getLogger(__name__)

#: ``GraphModule.meta`` key under which the tracer stores the model's PreprocessConfig.
PREPROCESS_META = "elastic_fx.preprocess"

#: File extensions an :class:`ImageFolderSource` reads (compared case-insensitively).
IMAGE_EXTENSIONS: Tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
)

#: Images a :class:`SyntheticSource` makes when the user gives none (the paper's
#: scoring uses 1000 unlabelled images).
DEFAULT_SYNTHETIC_IMAGES = 1000

#: Statistics torchvision's own ImageNet weights were trained with. Used ONLY for
#: torchvision models, because that is what their weights expect.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

#: Hugging Face's ViTImageProcessor defaults, used for an HF model without processor info.
HF_VIT_DEFAULT_MEAN = (0.5, 0.5, 0.5)
HF_VIT_DEFAULT_STD = (0.5, 0.5, 0.5)

#: PIL resampling codes (as found in HF processor configs) -> our interpolation names.
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

#: How many failing file names one warning lists.
_NAMED_FAILURES = 3

ImageLike = Union[Image.Image, torch.Tensor]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model expects its input: size, per-channel statistics, resize rule.

    ``input_size`` is ``(H, W)``. Evaluation images are resized so their shorter side
    is ``floor(side / crop_pct)`` and centre-cropped to ``input_size`` (timm's eval
    transform); crops for self-distillation are resized straight to ``input_size``.
    Pixels are scaled to ``[0, 1]`` and normalised as ``(x - mean) / std``.
    """

    input_size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.input_size)
        if len(size) != 2 or min(size) < 1:
            raise DataError(f"input_size must be (H, W) with positive sides, got {self.input_size!r}.")
        mean, std = _triple(self.mean, "mean"), _triple(self.std, "std")
        if min(std) <= 0:
            raise DataError(f"std must be positive per channel, got {std}.")
        interp = str(self.interpolation).lower()
        if interp not in _INTERPOLATIONS:
            raise DataError(
                f"interpolation {self.interpolation!r} is not supported; use one of {_INTERPOLATIONS}."
            )
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "interpolation", interp)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (lists for tuples)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {"input_size", "mean", "std", "interpolation", "crop_pct"}
        extra = set(d) - known
        if extra:
            raise DataError(f"unknown preprocess keys {sorted(extra)}; expected a subset of {sorted(known)}.")
        return cls(**dict(d))


def _triple(values: Any, name: str) -> Tuple[float, float, float]:
    """A per-channel statistic as 3 floats; a single value is repeated."""
    try:
        vals = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be 3 numbers (R, G, B), got {values!r}.") from e
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise DataError(f"{name} must have 3 values (R, G, B), got {len(vals)}: {values!r}.")
    return vals  # type: ignore[return-value]


def _size2(value: Any, name: str = "input_size") -> Tuple[int, int]:
    """An input size as (H, W): accepts an int, (H, W), (C, H, W) or an HF size dict."""
    if isinstance(value, Mapping) or hasattr(value, "height"):
        value = _hf_size(value)
        if value is None:
            raise DataError(f"{name} has no height/width or shortest_edge.")
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    seq = tuple(int(v) for v in value)
    if len(seq) == 3:
        if seq[0] not in (1, 3):
            raise DataError(f"{name} {tuple(value)} looks like (C, H, W) with C={seq[0]}; expected C=3.")
        seq = seq[1:]
    if len(seq) != 2:
        raise DataError(f"{name} must be an int, (H, W) or (C, H, W), got {value!r}.")
    return seq  # type: ignore[return-value]


def preprocess_config(
    model: Optional[torch.nn.Module] = None,
    *,
    input_size: Any = None,
    mean: Any = None,
    std: Any = None,
    interpolation: Optional[str] = None,
    crop_pct: Optional[float] = None,
    hf_processor: Any = None,
) -> PreprocessConfig:
    """The preprocessing ``model`` expects, field by field.

    Explicit arguments win. The rest comes from the first of:

    1. a ``torch.fx.GraphModule`` whose ``meta[PREPROCESS_META]`` holds a config
       (a :class:`PreprocessConfig` or its dict) -- stored there after tracing;
    2. timm: ``model.pretrained_cfg`` (``input_size``, ``mean``, ``std``,
       ``interpolation``, ``crop_pct``). If the model was built with another
       ``img_size`` than its pretrained config, the model's actual size wins;
    3. Hugging Face: ``model.config.image_size`` (or ``config.vision_config``), with
       mean/std/size/resample from ``hf_processor`` (an image processor or its
       ``preprocessor_config.json`` dict); without one, the HF ViT default
       0.5/0.5, with a warning;
    4. torchvision ViT: ``model.image_size`` with torchvision's ImageNet statistics
       (what its weights use), logged.

    Raises :class:`DataError` naming the missing fields when nothing supplies them.
    """
    found: dict = {}
    source = "explicit arguments"
    if model is not None:
        found, source = _from_model(model, hf_processor)
    elif hf_processor is not None:
        found, source = _from_hf_processor(hf_processor), "hf_processor"

    explicit = {
        "input_size": input_size, "mean": mean, "std": std,
        "interpolation": interpolation, "crop_pct": crop_pct,
    }
    merged = dict(found)
    merged.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in ("input_size", "mean", "std") if merged.get(k) is None]
    if missing:
        what = type(model).__name__ if model is not None else "no model"
        raise DataError(
            f"cannot tell the preprocessing of {what}: {', '.join(missing)} not found "
            "(looked for a traced config, timm pretrained_cfg, a Hugging Face config/processor, "
            "torchvision image_size). Pass them explicitly, e.g. "
            "preprocess_config(model, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))."
        )
    merged["input_size"] = _size2(merged["input_size"])
    merged = {k: v for k, v in merged.items() if v is not None}
    cfg = PreprocessConfig(**merged)
    logger.debug("preprocessing from %s: %s", source, cfg)
    return cfg


def _from_model(model: torch.nn.Module, hf_processor: Any) -> Tuple[dict, str]:
    """Partial config fields found on ``model`` and a description of where."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, Mapping) and meta.get(PREPROCESS_META) is not None:
        stored = meta[PREPROCESS_META]
        d = stored.to_dict() if isinstance(stored, PreprocessConfig) else dict(stored)
        return d, f"GraphModule.meta[{PREPROCESS_META!r}]"

    pcfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(pcfg, Mapping) and pcfg.get("mean") is not None:
        return _from_timm(model, pcfg), "timm pretrained_cfg"

    config = getattr(model, "config", None)
    hf_size = _hf_image_size(config) if config is not None else None
    if hf_size is not None or hf_processor is not None:
        d = _from_hf_processor(hf_processor) if hf_processor is not None else {}
        if hf_size is not None:
            # The model's own size (its position embeddings) beats the processor's.
            if d.get("input_size") not in (None, hf_size):
                logger.warning(
                    "%s expects %s inputs but the image processor says %s; using the model's %s.",
                    type(model).__name__, hf_size, d["input_size"], hf_size,
                )
            d["input_size"] = hf_size
        if d.get("mean") is None:
            logger.warning(
                "%s has no image-processor information; using the Hugging Face ViT default "
                "mean=std=(0.5, 0.5, 0.5). Pass hf_processor=AutoImageProcessor.from_pretrained(...) "
                "or mean=/std= if the model was trained otherwise.",
                type(model).__name__,
            )
            d.update(mean=HF_VIT_DEFAULT_MEAN, std=HF_VIT_DEFAULT_STD, interpolation="bilinear", crop_pct=1.0)
        return d, "Hugging Face config"

    if type(model).__module__.startswith("torchvision") and hasattr(model, "image_size"):
        logger.info(
            "%s is a torchvision model: using torchvision's ImageNet statistics, which its weights expect.",
            type(model).__name__,
        )
        return {
            "input_size": int(model.image_size), "mean": TORCHVISION_MEAN, "std": TORCHVISION_STD,
            "interpolation": "bilinear", "crop_pct": 224 / 256,
        }, "torchvision"

    # Unknown model: its input size may still be readable (e.g. a timm model built directly).
    size = _patch_embed_size(model)
    return ({"input_size": size} if size is not None else {}), "model attributes"


def _from_timm(model: torch.nn.Module, pcfg: Mapping[str, Any]) -> dict:
    """Fields of a timm ``pretrained_cfg``; the model's real img_size beats a stale one."""
    d = {
        "input_size": pcfg.get("input_size"),
        "mean": pcfg.get("mean"),
        "std": pcfg.get("std"),
        "interpolation": _interp_name(pcfg.get("interpolation")),
        "crop_pct": pcfg.get("crop_pct"),
    }
    actual = _patch_embed_size(model)
    if actual is not None and d["input_size"] is not None and _size2(d["input_size"]) != actual:
        logger.info(  # a deliberate img_size override; the stale config is not the user's mistake
            "%s was built for %s inputs but its pretrained_cfg says %s; using the model's %s.",
            type(model).__name__, actual, _size2(d["input_size"]), actual,
        )
        d["input_size"] = actual
    elif d["input_size"] is None:
        d["input_size"] = actual
    return d


def _patch_embed_size(model: torch.nn.Module) -> Optional[Tuple[int, int]]:
    """``model.patch_embed.img_size`` (timm) when it is a fixed size."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return None
    try:
        return _size2(size)
    except (DataError, TypeError, ValueError):
        return None


def _hf_image_size(config: Any) -> Optional[Tuple[int, int]]:
    """``config.image_size`` of an HF model, or of its ``vision_config``."""
    for cfg in (config, getattr(config, "vision_config", None)):
        size = getattr(cfg, "image_size", None) if cfg is not None else None
        if size is not None:
            return _size2(size)
    return None


def _from_hf_processor(proc: Any) -> dict:
    """Size, statistics and resampling from an HF image processor or its JSON dict.

    A processor that resizes straight to ``{"height", "width"}`` (HF ViT) becomes
    ``crop_pct = 1.0``: we keep the aspect ratio and centre-crop instead of squashing,
    a small difference on non-square photos. ``shortest_edge`` + ``crop_size`` (CLIP)
    maps exactly onto ``crop_pct = crop / shortest_edge``.
    """
    d = proc.to_dict() if hasattr(proc, "to_dict") else dict(proc)
    size = _hf_size(d.get("size"))
    crop = _hf_size(d.get("crop_size")) if d.get("do_center_crop", d.get("crop_size") is not None) else None
    out: dict = {
        "mean": d.get("image_mean"),
        "std": d.get("image_std"),
        "interpolation": _interp_name(d.get("resample")),
    }
    if crop is not None:
        out["input_size"] = crop
        # "shortest_edge" resize then crop == timm's crop_pct rule.
        short = _hf_shortest_edge(d.get("size"))
        out["crop_pct"] = min(1.0, min(crop) / short) if short else 1.0
    elif size is not None:
        out["input_size"] = size
        out["crop_pct"] = 1.0
    return {k: v for k, v in out.items() if v is not None}


def _hf_size(size: Any) -> Optional[Tuple[int, int]]:
    """(H, W) from an HF size dict / SizeDict / int; None when it only gives an edge."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    get = size.get if isinstance(size, Mapping) else (lambda k: getattr(size, k, None))
    if get("height") is not None and get("width") is not None:
        return int(get("height")), int(get("width"))
    if get("shortest_edge") is not None:
        e = int(get("shortest_edge"))
        return e, e
    return None


def _hf_shortest_edge(size: Any) -> Optional[int]:
    if size is None or isinstance(size, (int, np.integer)):
        return None
    get = size.get if isinstance(size, Mapping) else (lambda k: getattr(size, k, None))
    e = get("shortest_edge")
    return int(e) if e is not None else None


def _interp_name(value: Any) -> Optional[str]:
    """Our interpolation name for a timm string or a PIL resample code."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.lower()
        if v in _INTERPOLATIONS:
            return v
        logger.debug("interpolation %r not supported by tensor resizing; using bicubic", value)
        return "bicubic"
    try:
        return _PIL_RESAMPLE.get(int(value), "bicubic")
    except (TypeError, ValueError):
        return "bicubic"


# --------------------------------------------------------------------------- sources


class ImageFolderSource:
    """Image files under a folder, listed in a deterministic (sorted) order.

    Files are matched by extension (case-insensitive); hidden files and folders
    (name starting with ".") are ignored. ``load(i)`` decodes one file to an RGB PIL
    image or returns ``None`` when it cannot be decoded; iterating decodes lazily,
    skips such files and ends with ONE warning that counts them.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        recursive: bool = True,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(path).expanduser()
        if not self.root.exists():
            raise DataError(f"image folder {str(self.root)!r} does not exist; pass a folder of images.")
        if not self.root.is_dir():
            raise DataError(f"{str(self.root)!r} is a file, expected a folder of images.")
        self.recursive = recursive
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.files: List[Path] = self._list()
        if not self.files:
            hint = "" if recursive else " (recursive=False: images in sub-folders were not looked at)"
            raise DataError(
                f"no image files ({', '.join(self.extensions)}) in folder {str(self.root)!r}{hint}; "
                "point to a folder that contains images."
            )
        self.name = str(self.root)

    def _list(self) -> List[Path]:
        files = []
        walker = os.walk(self.root) if self.recursive else [next(os.walk(self.root))]
        for dirpath, dirnames, filenames in walker:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in self.extensions:
                    files.append(Path(dirpath) / f)
        return sorted(files, key=lambda p: p.relative_to(self.root).as_posix())

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.name!r}, {len(self)} files)"

    def load(self, i: int, draft_size: Optional[Tuple[int, int]] = None) -> Optional[Image.Image]:
        """File ``i`` as an RGB image, or ``None`` if it cannot be decoded.

        ``draft_size`` (W, H) lets the JPEG decoder skip resolution not needed for an
        image at least that large (much faster for big photos).
        """
        image, _ = self._decode(i, draft_size)
        return image

    def _decode(self, i: int, draft_size: Optional[Tuple[int, int]] = None) -> Tuple[Optional[Image.Image], str]:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                if draft_size is not None:
                    im.draft("RGB", draft_size)
                im.load()
                return im.convert("RGB"), ""
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            logger.debug("cannot decode %s: %s", path, e)
            return None, f"{type(e).__name__}: {e}"

    def __iter__(self) -> Iterator[Image.Image]:
        for _, image in _decoded(self, range(len(self))):
            yield image


class TensorSource:
    """Images already in memory as a tensor.

    * float ``[N, 3, H, W]``: already preprocessed for the model -- used as is, never
      normalised again (``preprocessed`` is True);
    * uint8 ``[N, H, W, 3]`` or ``[N, 3, H, W]``: raw pixels, preprocessed like files.
    """

    def __init__(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(
                f"expected images as a 4-d tensor [N, 3, H, W] (float, preprocessed) or uint8 "
                f"[N, H, W, 3] / [N, 3, H, W], got {shape}."
            )
        if images.shape[0] == 0:
            raise DataError("the image tensor is empty (N = 0); pass at least one image.")
        if images.dtype == torch.uint8:
            if images.shape[1] != 3 and images.shape[-1] == 3:
                images = images.permute(0, 3, 1, 2)
            self.preprocessed = False
        elif images.is_floating_point():
            self.preprocessed = True
        else:
            raise DataError(f"image tensor dtype {images.dtype} not supported; use float (preprocessed) or uint8.")
        if images.shape[1] != 3:
            raise DataError(f"expected 3 colour channels, got image tensor of shape {tuple(images.shape)}.")
        self.images = images
        self.name = f"tensor{tuple(images.shape)}"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        kind = "preprocessed" if self.preprocessed else "uint8"
        return f"TensorSource({kind}, {tuple(self.images.shape)})"

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as ``[3, H, W]`` (uint8, or float when preprocessed)."""
        return self.images[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.images)


class ImageListSource:
    """A list of PIL images (or uint8 ``[3, H, W]`` tensors) given directly."""

    def __init__(self, images: Sequence[ImageLike]) -> None:
        if len(images) == 0:
            raise DataError("the image list is empty; pass at least one image.")
        for k, im in enumerate(images):
            ok = isinstance(im, Image.Image) or (
                isinstance(im, torch.Tensor) and im.dtype == torch.uint8 and im.dim() == 3 and im.shape[0] == 3
            )
            if not ok:
                raise DataError(f"item {k} of the image list is {type(im).__name__}; expected a PIL image "
                                "or a uint8 [3, H, W] tensor.")
        self.images = list(images)
        self.name = f"list of {len(self.images)} images"
        self.preprocessed = False

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> ImageLike:
        im = self.images[i]
        return im.convert("RGB") if isinstance(im, Image.Image) else im

    def __iter__(self) -> Iterator[ImageLike]:
        return (self.load(i) for i in range(len(self)))


class SyntheticSource:
    """Procedural RGB images, deterministic from ``seed`` (image ``i`` from ``(seed, i)``).

    Each image layers a background (a two-colour linear or radial gradient), a
    texture (sine stripes or a checkerboard at a random frequency and angle, blended
    in), 2-6 shapes (ellipses, rotated rectangles, polygons) in random colours and a
    little colour noise. Vectorised numpy; about a millisecond per 224 x 224 image.
    Images are independent of ``n``: ``SyntheticSource(10)`` is a prefix of
    ``SyntheticSource(20)`` with the same seed.
    """

    def __init__(self, n: int = DEFAULT_SYNTHETIC_IMAGES, size: int = 224, seed: int = 0) -> None:
        if int(n) < 1 or int(size) < 8:
            raise DataError(f"SyntheticSource needs n >= 1 and size >= 8, got n={n}, size={size}.")
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self.name = f"synthetic(n={self.n}, size={self.size}, seed={self.seed})"
        self.preprocessed = False

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"SyntheticSource(n={self.n}, size={self.size}, seed={self.seed})"

    def array(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``[size, size, 3]``."""
        if not 0 <= i < self.n:
            raise IndexError(f"image {i} out of range for {self!r}")
        return _synthetic_image(np.random.default_rng([self.seed, i]), self.size)

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image."""
        return Image.fromarray(self.array(i), "RGB")

    def tensor(self, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Images (all, or ``indices``) as uint8 ``[N, 3, size, size]``."""
        idx = range(self.n) if indices is None else indices
        return torch.from_numpy(np.stack([self.array(i) for i in idx])).permute(0, 3, 1, 2).contiguous()

    def __iter__(self) -> Iterator[Image.Image]:
        return (self.load(i) for i in range(self.n))


def _synthetic_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """One procedural image (see :class:`SyntheticSource`)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [S, S] in [0, 1)
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    if rng.random() < 0.6:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
    else:  # radial gradient around a random centre
        cy, cx = rng.random(2)
        t = np.hypot(xx - cx, yy - cy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]

    # Texture: stripes or checkerboard, random frequency and angle, blended in.
    a, freq = rng.uniform(0, np.pi), rng.uniform(2, 24)
    u = np.cos(a) * xx + np.sin(a) * yy
    if rng.random() < 0.5:
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))
    else:
        v = -np.sin(a) * xx + np.cos(a) * yy
        pattern = ((np.floor(freq * u) + np.floor(freq * v)) % 2).astype(np.float32)
    tex_colour = rng.random(3, dtype=np.float32)
    alpha = rng.uniform(0.15, 0.6)
    w = (np.float32(alpha) * pattern)[..., None]
    img = img * (1 - w) + tex_colour * w

    # Shapes.
    for _ in range(int(rng.integers(2, 7))):
        mask = _random_shape_mask(rng, xx, yy, size)
        colour = rng.random(3, dtype=np.float32)
        opacity = rng.uniform(0.6, 1.0)
        img[mask] = img[mask] * (1 - opacity) + colour * opacity

    sigma = rng.uniform(0.0, 0.06)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)


def _random_shape_mask(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """Boolean mask of one random ellipse, rotated rectangle or polygon."""
    kind = rng.integers(0, 3)
    cx, cy = rng.random(2)
    rx, ry = rng.uniform(0.04, 0.35, size=2)
    a = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u, v = np.cos(a) * dx + np.sin(a) * dy, -np.sin(a) * dx + np.cos(a) * dy
    if kind == 0:
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if kind == 1:
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    k = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
    radii = rng.uniform(0.3, 1.0, size=k) * max(rx, ry)
    pts = [(float((cx + r * np.cos(t)) * size), float((cy + r * np.sin(t)) * size)) for r, t in zip(radii, angles)]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    return np.asarray(canvas) > 0


ImageSource = Union[ImageFolderSource, TensorSource, ImageListSource, SyntheticSource]


def as_source(
    images: Any = None, *, n_synthetic: int = DEFAULT_SYNTHETIC_IMAGES, synthetic_seed: int = 0
) -> ImageSource:
    """Turn what the user passed into an image source.

    ``str``/``Path`` -> :class:`ImageFolderSource`; tensor (or numpy array) ->
    :class:`TensorSource`; a list of PIL images / uint8 tensors -> :class:`ImageListSource`;
    a source -> itself; ``None`` -> :class:`SyntheticSource` of ``n_synthetic`` images.
    """
    if images is None:
        logger.info(
            "no images given: using %d procedural synthetic images (seed %d). Pass a folder of "
            "real images for scores that reflect your data.", n_synthetic, synthetic_seed,
        )
        return SyntheticSource(n_synthetic, seed=synthetic_seed)
    if isinstance(images, (ImageFolderSource, TensorSource, ImageListSource, SyntheticSource)):
        return images
    if isinstance(images, (str, os.PathLike)):
        return ImageFolderSource(images)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        return TensorSource(images)
    if isinstance(images, (list, tuple)):
        return ImageListSource(images)
    raise DataError(
        f"cannot use {type(images).__name__} as images; pass a folder path, a tensor "
        "[N, 3, H, W], a list of PIL images, or None for synthetic images."
    )


# --------------------------------------------------------------------------- decoding


def _decoded(source: ImageSource, order: Sequence[int], want: Optional[int] = None,
             draft_size: Optional[Tuple[int, int]] = None) -> Iterator[Tuple[int, ImageLike]]:
    """Yield ``(index, image)`` in ``order`` until ``want`` images; warn once about failures."""
    failures: List[Tuple[int, str]] = []
    got = 0
    try:
        for i in order:
            if want is not None and got >= want:
                break
            if isinstance(source, ImageFolderSource):
                image, why = source._decode(i, draft_size)
                if image is None:
                    failures.append((i, why))
                    continue
            else:
                image = source.load(i)
            got += 1
            yield i, image
    finally:
        if failures and isinstance(source, ImageFolderSource):
            named = ", ".join(
                f"{source.files[i].relative_to(source.root).as_posix()} ({why})"
                for i, why in failures[:_NAMED_FAILURES]
            )
            more = f" and {len(failures) - _NAMED_FAILURES} more" if len(failures) > _NAMED_FAILURES else ""
            logger.warning(
                "skipped %d unreadable image file(s) of %d in %s: %s%s",
                len(failures), len(source), source.name, named, more,
            )
    if got == 0:
        raise DataError(
            f"none of the {len(order)} image files tried in {source.name!r} could be decoded; "
            "check that the folder holds valid images."
        )


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
    picked = sorted(_decoded(source, order, want, draft_size), key=lambda t: t[0])
    return source, [im for _, im in picked]


def _to_uint8_chw(image: ImageLike) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return image


def resize(x: torch.Tensor, size: Tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize float images ``[B, C, h, w]`` to ``size`` with antialiasing when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``x`` in ``[0, 1]``, shape ``[..., 3, H, W]``."""
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def _eval_transform(img: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 ``[3, h, w]`` -> normalised float ``[3, H, W]``: resize, centre-crop, normalise."""
    H, W = cfg.input_size
    h, w = img.shape[-2:]
    # Shorter side to floor(side / crop_pct) -- for non-square inputs, large enough for both sides.
    target = max(math.floor(H / cfg.crop_pct) / h, math.floor(W / cfg.crop_pct) / w)
    nh, nw = max(H, round(h * target)), max(W, round(w * target))
    x = resize(img.unsqueeze(0).float().div_(255.0), (nh, nw), cfg.interpolation).clamp_(0.0, 1.0)
    top, left = (nh - H) // 2, (nw - W) // 2
    x = x[..., top:top + H, left:left + W]
    return normalize(x, cfg)[0]


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
        out[k] = _eval_transform(_to_uint8_chw(im), cfg)
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
    out = [_shrink(_to_uint8_chw(im), max_short_side) for im in decoded]
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
