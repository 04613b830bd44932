"""Load a model from a command-line spec.

``timm:NAME``             timm.create_model (``--pretrained`` downloads weights)
``hf:ID_OR_DIR``          a Hugging Face vision model (AutoModel; a local dir works offline)
``torchvision:NAME``      torchvision.models.get_model
``path/to/file.py:fn``    any factory function returning an nn.Module

``checkpoint`` loads a local state dict (``torch.load(weights_only=True)``; a dict nested
under ``state_dict`` / ``model`` is unwrapped) with strict key matching.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from .errors import ConfigError, ElasticFxError, ModelError

log = logging.getLogger(__name__)

SPEC_HELP = "timm:NAME, hf:ID_OR_DIR, torchvision:NAME or path/to/file.py:factory"


def load_model(spec: str, *, pretrained: bool = False, checkpoint: Optional[str] = None,
               input_size: Optional[Tuple[int, int]] = None, **kwargs) -> nn.Module:
    """Build the model named by ``spec`` (see module docstring), in eval mode.

    ``input_size`` ``(H, W)`` builds (or resizes) the model for that input where its family
    supports it (timm ``img_size``, Hugging Face ``image_size`` with interpolated position
    embeddings, torchvision ``image_size``, a timm-style ``set_input_size``); otherwise a
    :class:`ConfigError` says which sizes the model accepts.
    """
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelError(f"model spec {spec!r} is not one of {SPEC_HELP}")
    if input_size is not None:
        input_size = _check_size(input_size)
    if kind == "timm":
        model = _timm(name, pretrained, input_size, **kwargs)
    elif kind == "hf":
        model = _hf(name, pretrained, input_size)
    elif kind == "torchvision":
        model = _torchvision(name, pretrained, input_size)
    elif kind.endswith(".py") or Path(kind).suffix == ".py":
        model = _factory(kind, name, **kwargs)
    else:
        raise ModelError(f"unknown model source {kind!r} in {spec!r}; use {SPEC_HELP}")
    if checkpoint:
        load_checkpoint(model, checkpoint)
    if input_size is not None:
        patch = _patch(model)
        if patch and (input_size[0] % patch[0] or input_size[1] % patch[1]):
            raise _refuse_size(model, input_size)  # timm builds such a model, then fails on every input
        if kind not in ("timm", "hf", "torchvision"):
            resize_model(model, input_size)
    return model.eval()


def _check_size(size) -> Tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigError(f"--input-size takes two positive integers H W, got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"--input-size {h} {w}: sides must be positive, e.g. --input-size 224 224")
    return h, w


def _patch(model: nn.Module) -> Optional[Tuple[int, int]]:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        ps = getattr(model, "patch_size", None)
    if ps is None:
        return None
    return (int(ps), int(ps)) if isinstance(ps, int) else tuple(int(p) for p in ps)[:2]


def _current_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None) or getattr(model, "image_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)[:2]


def _refuse_size(model: nn.Module, size: Tuple[int, int], why: str = "") -> ConfigError:
    patch, now = _patch(model), _current_size(model)
    accepts = (f"multiples of its patch size {patch[0]}x{patch[1]} (> 0)" if patch
               else f"only {now[0]}x{now[1]}" if now else "only the size it was built for")
    return ConfigError(f"--input-size {size[0]} {size[1]} does not fit {type(model).__name__}: it accepts {accepts}"
                       f"{'; ' + why if why else ''}. Choose one of those sizes, or drop --input-size.")


def resize_model(model: nn.Module, size: Tuple[int, int]) -> None:
    """Resize an already built model in place for ``size`` inputs, or raise ConfigError."""
    size = _check_size(size)
    if _current_size(model) == size:
        return
    patch = _patch(model)
    if patch and (size[0] % patch[0] or size[1] % patch[1]):
        raise _refuse_size(model, size)
    if callable(getattr(model, "set_input_size", None)):  # timm VisionTransformer and relatives
        try:
            model.set_input_size(img_size=size)
            return
        except Exception as e:  # noqa: BLE001 - timm raises several types for sizes it cannot take
            raise _refuse_size(model, size, f"{type(e).__name__}: {e}") from None
    raise _refuse_size(model, size, "it cannot be resized after it is built")


def _timm(name: str, pretrained: bool, input_size: Optional[Tuple[int, int]] = None, **kwargs) -> nn.Module:
    import timm

    if name not in timm.list_models(pretrained=False) and not timm.is_model(name):
        raise ModelError(f"timm has no model called {name!r}; list them with timm.list_models('*vit*')")
    if input_size is not None:
        kwargs["img_size"] = input_size
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # network errors surface in many types
        if input_size is not None and not pretrained:
            try:
                model = timm.create_model(name, pretrained=False, **{k: v for k, v in kwargs.items() if k != "img_size"})
            except Exception:  # noqa: BLE001 - report the first failure below
                model = None
            if model is not None:
                raise _refuse_size(model, input_size, f"{type(e).__name__}: {e}") from None
        if pretrained:
            raise ModelError(
                f"could not load pretrained weights for timm:{name} ({type(e).__name__}: {e}). Without network "
                "access, build it without --pretrained and pass --checkpoint PATH to a local state dict."
            ) from e
        raise


def _hf(name: str, pretrained: bool, input_size: Optional[Tuple[int, int]] = None) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as e:
        raise ModelError("hf: models need the transformers package: pip install transformers") from e
    try:
        config = AutoConfig.from_pretrained(name)
        vision = getattr(config, "vision_config", None) or config
        if input_size is not None:
            if input_size[0] != input_size[1] or not hasattr(vision, "image_size"):
                raise ConfigError(f"--input-size {input_size[0]} {input_size[1]}: Hugging Face {type(config).__name__} "
                                  "models take square inputs (image_size); give --input-size S S")
            patch = int(getattr(vision, "patch_size", 1) or 1)
            if input_size[0] % patch:
                raise ConfigError(f"--input-size {input_size[0]} {input_size[1]} does not fit hf:{name}: it accepts "
                                  f"multiples of its patch size {patch} (> 0); choose one, or drop --input-size")
            vision.image_size = input_size[0]
        if pretrained or Path(name).is_dir():
            # a new image_size: the checkpoint's position embeddings are interpolated to it below
            with _quiet_transformers():  # its load report lists the resized position table as a mismatch
                model = AutoModel.from_pretrained(name, config=config, ignore_mismatched_sizes=input_size is not None)
            if input_size is not None:
                _hf_interpolate_positions(model, name)
        else:
            model = AutoModel.from_config(config)
    except ElasticFxError:
        raise
    except Exception as e:
        raise ModelError(
            f"could not load Hugging Face model {name!r} ({type(e).__name__}: {e}). Give a local directory "
            "holding config.json (and weights), or make the hub reachable."
        ) from e
    # CLIP-style wrappers: keep the vision tower
    return getattr(model, "vision_model", model) if not hasattr(model, "embeddings") else model


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _hf_interpolate_positions(model: nn.Module, name: str) -> None:
    """Replace freshly initialised position embeddings by the checkpoint's, interpolated."""
    from transformers import AutoModel

    with _quiet_transformers():
        original = AutoModel.from_pretrained(name)
    theirs = dict(original.state_dict())
    own = model.state_dict()
    for key, value in own.items():
        old = theirs.get(key)
        if old is None or old.shape == value.shape:
            continue
        table = _interpolate_grid(old, value.shape) if "position_embedding" in key else None
        if table is None:  # e.g. BEiT's relative position bias: a table this code cannot resize
            raise ConfigError(f"--input-size: hf:{name} has a {key} of shape {list(old.shape)} that cannot be "
                              "resized here; drop --input-size and use the model's own size")
        model.load_state_dict({key: table}, strict=False)


def _interpolate_grid(old: torch.Tensor, shape: torch.Size) -> Optional[torch.Tensor]:
    """``[1, extra + g*g, D]`` (or ``[extra + g*g, D]``) position table resized to ``shape``
    (bicubic over the grid, the extra tokens' entries kept); None for any other table."""
    import math

    flat = old.reshape(-1, old.shape[-1])
    n_new = int(torch.Size(shape).numel() // shape[-1])
    g_old = int(math.isqrt(flat.shape[0]))
    extra = flat.shape[0] - g_old * g_old
    g_new = int(math.isqrt(max(n_new - extra, 0)))
    if old.shape[-1] != shape[-1] or extra > 8 or g_new * g_new + extra != n_new:
        return None  # not a [extra tokens + square grid, width] table
    grid = flat[extra:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    out = torch.cat([flat[:extra], grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1)])
    return out.reshape(shape)


def load_image_processor(spec: str):
    """The Hugging Face image processor saved with ``hf:ID_OR_DIR`` (None when there is none)."""
    kind, _, name = spec.partition(":")
    if kind != "hf":
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - no processor saved, or the hub is unreachable
        log.debug("no image processor for %s: %s", spec, e)
        return None


def _torchvision(name: str, pretrained: bool, input_size: Optional[Tuple[int, int]] = None) -> nn.Module:
    try:
        import torchvision
    except ImportError as e:
        raise ModelError("torchvision: models need torchvision: pip install torchvision") from e
    extra = {}
    if input_size is not None:
        if input_size[0] != input_size[1]:
            raise ConfigError(f"--input-size {input_size[0]} {input_size[1]}: torchvision models take square inputs "
                              "(image_size); give --input-size S S")
        extra["image_size"] = input_size[0]
    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **extra)
    except TypeError as e:
        raise ConfigError(f"--input-size: torchvision:{name} cannot be built for another input size ({e}); "
                          "drop --input-size") from None
    except AssertionError as e:  # torchvision asserts the size divides into patches
        raise ConfigError(f"--input-size {input_size[0]} {input_size[1]} does not fit torchvision:{name} ({e}); "
                          "it accepts multiples of its patch size (> 0): choose one, or drop --input-size") from None
    except ValueError as e:
        if extra and "image_size" in str(e):
            raise ConfigError(f"--input-size {input_size[0]} {input_size[1]} does not fit torchvision:{name}: "
                              f"{e}; choose a multiple of the patch size, or without --pretrained any such size") from None
        raise ModelError(f"torchvision has no model called {name!r}") from e
    except Exception as e:
        raise ModelError(
            f"could not build torchvision:{name} ({type(e).__name__}: {e}); without network access drop "
            "--pretrained and pass --checkpoint PATH"
        ) from e


def _factory(path: str, fn: str, **kwargs) -> nn.Module:
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a Python file" if p.is_dir() else "does not exist"
        raise ModelError(f"no such file: {path} {what} (model spec path/to/file.py:factory)")
    spec = importlib.util.spec_from_file_location(f"elastic_fx_user_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    where = f"{path}:{fn}"
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelError(f"{path} has a syntax error at line {e.lineno}: {e.msg}; fix the model file") from None
    except ImportError as e:
        raise ModelError(f"{path} failed to import {e.name or ''} ({e}); install the package or fix the "
                             "import in the model file") from None
    except SystemExit as e:
        raise ModelError(f"{path} called sys.exit({e.code}) while loading; a model file must only define "
                             "its factory") from None
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        raise ModelError(f"{path} raised {type(e).__name__} while loading: {e}; fix the model file") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise ModelError(f"{path} defines no callable {fn!r}")
    try:
        model = factory(**kwargs)
    except SystemExit as e:
        raise ModelError(f"{where}() called sys.exit({e.code}) instead of returning a model; fix the factory") from None
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        raise ModelError(f"{where}() raised {type(e).__name__}: {e}; fix the factory") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{path}:{fn}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local state dict into ``model`` (strict), never unpickling code."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ModelError(f"--checkpoint {path} {what}; give a state-dict file (.pt, .pth or .safetensors)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"could not read checkpoint {path} ({_first_line(e)}); elastic_fx loads only plain state dicts "
            "(torch.save(model.state_dict()) or .safetensors) and never runs code from a file: save the weights "
            "alone and pass that file"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds {type(state).__name__}, not a state dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"checkpoint {path} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); was it saved from this architecture?"
        )


def _first_line(e: BaseException) -> str:
    """One line of an exception: torch's unpickling refusals run to several lines of advice,
    some of it unsafe (``weights_only=False``), none of which is repeated."""
    import pickle

    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return "it holds Python objects other than tensors, which could run code when loaded; refused"
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(e).__name__}: {line[:200]}"
