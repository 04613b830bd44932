"""Load a model from a command-line spec.

``timm:NAME``             timm.create_model (``--pretrained`` downloads weights)
``hf:ID_OR_DIR``          a Hugging Face vision model (AutoModel; a local dir works offline)
``torchvision:NAME``      torchvision.models.get_model
``path/to/file.py:fn``    any factory function returning an nn.Module

``checkpoint`` loads a local state dict (``torch.load(weights_only=True)``; a dict nested
under ``state_dict`` / ``model`` is unwrapped) with strict key matching.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import ElasticFxError

log = logging.getLogger(__name__)

SPEC_HELP = "timm:NAME, hf:ID_OR_DIR, torchvision:NAME or path/to/file.py:factory"


def load_model(spec: str, *, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs) -> nn.Module:
    """Build the model named by ``spec`` (see module docstring), in eval mode."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ElasticFxError(f"model spec {spec!r} is not one of {SPEC_HELP}")
    if kind == "timm":
        model = _timm(name, pretrained, **kwargs)
    elif kind == "hf":
        model = _hf(name, pretrained)
    elif kind == "torchvision":
        model = _torchvision(name, pretrained)
    elif kind.endswith(".py") or Path(kind).suffix == ".py":
        model = _factory(kind, name, **kwargs)
    else:
        raise ElasticFxError(f"unknown model source {kind!r} in {spec!r}; use {SPEC_HELP}")
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()


def _timm(name: str, pretrained: bool, **kwargs) -> nn.Module:
    import timm

    if name not in timm.list_models(pretrained=False) and not timm.is_model(name):
        raise ElasticFxError(f"timm has no model called {name!r}; list them with timm.list_models('*vit*')")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # network errors surface in many types
        if pretrained:
            raise ElasticFxError(
                f"could not load pretrained weights for timm:{name} ({type(e).__name__}: {e}). Without network "
                "access, build it without --pretrained and pass --checkpoint PATH to a local state dict."
            ) from e
        raise


def _hf(name: str, pretrained: bool) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as e:
        raise ElasticFxError("hf: models need the transformers package: pip install transformers") from e
    try:
        if pretrained or Path(name).is_dir():
            model = AutoModel.from_pretrained(name)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(name))
    except Exception as e:
        raise ElasticFxError(
            f"could not load Hugging Face model {name!r} ({type(e).__name__}: {e}). Give a local directory "
            "holding config.json (and weights), or make the hub reachable."
        ) from e
    # CLIP-style wrappers: keep the vision tower
    return getattr(model, "vision_model", model) if not hasattr(model, "embeddings") else model


def _torchvision(name: str, pretrained: bool) -> nn.Module:
    try:
        import torchvision
    except ImportError as e:
        raise ElasticFxError("torchvision: models need torchvision: pip install torchvision") from e
    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except ValueError as e:
        raise ElasticFxError(f"torchvision has no model called {name!r}") from e
    except Exception as e:
        raise ElasticFxError(
            f"could not build torchvision:{name} ({type(e).__name__}: {e}); without network access drop "
            "--pretrained and pass --checkpoint PATH"
        ) from e


def _factory(path: str, fn: str, **kwargs) -> nn.Module:
    p = Path(path)
    if not p.is_file():
        raise ElasticFxError(f"no such file: {path} (model spec path/to/file.py:factory)")
    spec = importlib.util.spec_from_file_location(f"elastic_fx_user_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise ElasticFxError(f"{path} defines no callable {fn!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ElasticFxError(f"{path}:{fn}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local state dict into ``model`` (strict), never unpickling code."""
    p = Path(path)
    if not p.is_file():
        raise ElasticFxError(f"checkpoint {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ElasticFxError(
            f"could not read checkpoint {path} ({type(e).__name__}: {e}); elastic_fx loads plain state dicts "
            "(torch.save(model.state_dict()) or .safetensors) without unpickling code"
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ElasticFxError(f"checkpoint {path} holds {type(state).__name__}, not a state dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ElasticFxError(
            f"checkpoint {path} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); was it saved from this architecture?"
        )
