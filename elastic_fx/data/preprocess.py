"""The model's own preprocessing: what size and statistics it expects, resolved once.

Takes a model (timm, Hugging Face, torchvision, a traced GraphModule, or anything
with an explicit config) and returns a :class:`PreprocessConfig`; touches nothing.

* :func:`preprocess_config` -- field by field from the model: a config stored on a
  traced GraphModule (``gm.meta[PREPROCESS_META]``), timm's ``pretrained_cfg``, a
  Hugging Face config / image processor, torchvision's known weights; explicit
  arguments win. No ImageNet statistics are assumed for a model that did not ask
  for them.
* :func:`resolve_preprocess` -- THE rule every caller uses to pick the preprocessing
  of a run: an explicit config wins, else the model's own (as above), else, for images
  that are already preprocessed (a float ``[N, 3, H, W]`` tensor), their size with
  identity normalisation, else a :class:`DataError` saying what to pass.
* :func:`resize` and :func:`normalize` -- the one resize and the one normalisation
  every image path of the package goes through.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

logger = logging.getLogger(__name__)

#: ``GraphModule.meta`` key under which the tracer stores the model's PreprocessConfig.
PREPROCESS_META = "elastic_fx.preprocess"

#: Statistics torchvision's own ImageNet weights were trained with. Used ONLY for
#: torchvision models, because that is what their weights expect.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

#: The ImageNet statistics: the fallback, announced in one line, for a model that carries none.
IMAGENET_MEAN, IMAGENET_STD = TORCHVISION_MEAN, TORCHVISION_STD

#: Hugging Face's ViTImageProcessor defaults, used for an HF model without processor info.
HF_VIT_DEFAULT_MEAN = (0.5, 0.5, 0.5)
HF_VIT_DEFAULT_STD = (0.5, 0.5, 0.5)

#: Statistics that leave already-normalised images unchanged.
IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)

#: PIL resampling codes (as found in HF processor configs) -> our interpolation names.
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

#: Where :func:`preprocess_config` looks, for error messages.
_LOOKED_AT = ("a traced config, timm pretrained_cfg, a Hugging Face config/processor, "
              "torchvision image_size")


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
        seq = values if isinstance(values, (list, tuple, np.ndarray, torch.Tensor)) else [values]
        vals = tuple(float(v) for v in (seq.reshape(-1) if isinstance(seq, (np.ndarray, torch.Tensor)) else seq))
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
    merged, source = _fields(model, hf_processor, input_size=input_size, mean=mean, std=std,
                             interpolation=interpolation, crop_pct=crop_pct)
    missing = [k for k in ("input_size", "mean", "std") if merged.get(k) is None]
    if missing:
        what = type(model).__name__ if model is not None else "no model"
        raise DataError(
            f"cannot tell the preprocessing of {what}: {', '.join(missing)} not found "
            f"(looked for {_LOOKED_AT}). Pass them explicitly, e.g. "
            "preprocess_config(model, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))."
        )
    return _config(merged, source)


def _fields(model: Any, hf_processor: Any, **explicit: Any) -> Tuple[dict, str]:
    """Config fields found on ``model`` (or ``hf_processor``) with the non-None ``explicit`` ones on top."""
    found: dict = {}
    source = "explicit arguments"
    if model is not None:
        found, source = _from_model(model, hf_processor)
    elif hf_processor is not None:
        found, source = _from_hf_processor(hf_processor), "hf_processor"
    merged = dict(found)
    merged.update({k: v for k, v in explicit.items() if v is not None})
    return merged, source


def _config(fields: Mapping[str, Any], source: str) -> PreprocessConfig:
    """A :class:`PreprocessConfig` from complete fields (None values take the defaults)."""
    merged = {k: v for k, v in fields.items() if v is not None}
    merged["input_size"] = _size2(merged["input_size"])
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


# --------------------------------------------------------------------------- one rule


def resolve_preprocess(
    model: Any = None,
    images: Any = None,
    explicit: Any = None,
    *,
    mean: Any = None,
    std: Any = None,
    input_size: Any = None,
    traced_size: Any = None,
    hf_processor: Any = None,
) -> PreprocessConfig:
    """The preprocessing a run uses: the one rule shared by scoring, search, evaluation, tracing.

    First match wins:

    1. ``explicit`` -- a :class:`PreprocessConfig` (or its dict), returned as is;
    2. what the graph carries: ``model.meta[PREPROCESS_META]`` of a traced GraphModule;
    3. the model's own config (timm / Hugging Face / torchvision, see
       :func:`preprocess_config`); ``mean``, ``std`` and ``input_size`` replace single
       fields of 2. and 3. (and complete them when the model gives only a size);
    4. ``images`` already preprocessed (a float tensor ``[N, C, H, W]`` or a
       preprocessed :class:`~elastic_fx.data.TensorSource`): identity normalisation
       (unless ``mean``/``std`` are given) at ``input_size``, else ``traced_size`` (the
       ``[H, W]`` the model was traced at, for images larger than the model's input
       that get cropped), else the images' own size;
    5. a :class:`DataError` naming what is missing and what to pass.
    """
    if explicit is not None:
        return explicit if isinstance(explicit, PreprocessConfig) else PreprocessConfig.from_dict(explicit)
    fields, source = _fields(model, hf_processor, input_size=input_size, mean=mean, std=std)
    missing = [k for k in ("input_size", "mean", "std") if fields.get(k) is None]
    if not missing:
        return _config(fields, source)
    size = _preprocessed_size(images)
    if size is not None:
        size = input_size if input_size is not None else traced_size if traced_size is not None else size
        return PreprocessConfig(_size2(size), IDENTITY_MEAN if mean is None else mean,
                                IDENTITY_STD if std is None else std)
    what = type(model).__name__ if model is not None else "no model"
    raise DataError(
        f"cannot tell how {what} expects its images: {', '.join(missing)} not found (looked for {_LOOKED_AT}). "
        "Pass mean=..., std=... (and input_size=...), or a PreprocessConfig, e.g. "
        "efx.data.preprocess_config(model, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)); "
        "or give the images as a float tensor [N, 3, H, W] that is already preprocessed."
    )


def _preprocessed_size(images: Any) -> Optional[Tuple[int, int]]:
    """``(H, W)`` of images that are already preprocessed for the model, else None."""
    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        ok = images.is_floating_point() and images.dim() == 4
        return tuple(int(s) for s in images.shape[-2:]) if ok else None  # type: ignore[return-value]
    if getattr(images, "preprocessed", False) and isinstance(getattr(images, "images", None), torch.Tensor):
        return tuple(int(s) for s in images.images.shape[-2:])  # type: ignore[return-value]
    return None


# --------------------------------------------------------------------------- resize, normalise


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
