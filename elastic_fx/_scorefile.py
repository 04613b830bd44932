"""The score file format: one safetensors file whose metadata holds one JSON document.

Tensors only, so reading never unpickles code. ``write`` and ``read`` move (metadata,
tensors) pairs in and out atomically and turn every foreign, truncated or tampered file into
a :class:`~elastic_fx.errors.ScoresError`; the field checkers below are shared by the two
score types of :mod:`elastic_fx.scores`. Touches only the file it is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import numpy as np
import torch

from ._io import atomic_write
from .errors import ScoresError

#: Metadata key of a score file and the format version written.
SCORES_FORMAT = "elastic_fx"
SCORES_VERSION = 2


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return is_real(v) and bool(np.isfinite(v))


def is_real(v: Any) -> bool:
    """An int or float (NaN included: a fitness may be NaN), not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: Block fields that are a positive count or absent (None).
_COUNT_FIELDS = ("num_heads", "head_dim", "hidden_features", "params_per_head", "params_per_neuron")


def check_block(b: dict, where: str) -> None:
    """One entry of the per-block description has the types the rest of the code relies on."""
    if not is_int(b.get("index")) or b["index"] < 0:
        raise ScoresError(f"{where!r}: a block index is {short(b.get('index'))}, not a block number; "
                          "the file is corrupt.")
    for key in _COUNT_FIELDS:
        v = b.get(key)
        if v is not None and (not is_int(v) or v < 1):
            raise ScoresError(f"{where!r}: block {b['index']} has {key}={short(v)}, not a positive count; "
                              "the file is corrupt.")
    if b.get("mlp_prunable") not in (None, True, False):
        raise ScoresError(f"{where!r}: block {b['index']} has mlp_prunable={short(b['mlp_prunable'])}, not "
                          "true/false; the file is corrupt.")
    for key in ("head_params", "neuron_params"):
        v = b.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ScoresError(f"{where!r}: block {b['index']} has {key}={short(v)}, not a list of parameter "
                              "names; the file is corrupt.")
    if b.get("num_heads") is not None and not b.get("params_per_head"):
        raise ScoresError(f"{where!r}: block {b['index']} has heads but no params_per_head; the file is corrupt.")
    if b.get("mlp_prunable") and not b.get("params_per_neuron"):
        raise ScoresError(f"{where!r}: block {b['index']} has a prunable FFN but no params_per_neuron; "
                          "the file is corrupt.")


def write(path: Union[str, os.PathLike], meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Path:
    """One score file, atomically: ``tensors`` plus ``meta`` as JSON under ``"elastic_fx"``."""
    from safetensors.torch import save_file

    try:
        blob = json.dumps(meta, default=json_default)
    except (TypeError, ValueError) as e:
        raise ScoresError(f"the scores' config cannot be written as JSON: {e}") from e
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", SCORES_FORMAT: blob}),
                        error=ScoresError)


def read(path: Union[str, os.PathLike], writer: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(metadata, tensors) of a score file; :class:`ScoresError` for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ScoresError(f"{str(path)!r} is a directory, not a score file; score files are written by {writer}.")
        raise ScoresError(f"no score file at {str(path)!r} (it does not exist); score files are written by {writer}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for foreign files
        raise ScoresError(
            f"{str(path)!r} is not an elastic_fx score file: not a safetensors score file ({type(e).__name__}: "
            f"{str(e)[:200]}); "
            f"score files are written by {writer}."
        ) from None
    if SCORES_FORMAT not in header:
        raise ScoresError(
            f"{str(path)!r} is a safetensors file without elastic_fx metadata (the {SCORES_FORMAT!r} "
            f"entry is missing), so it holds no scores; score files are written by {writer}."
        )
    try:
        meta = json.loads(header[SCORES_FORMAT])
    except json.JSONDecodeError as e:
        raise ScoresError(f"{str(path)!r}: the elastic_fx metadata is not valid JSON ({e}).") from None
    if not isinstance(meta, dict):
        raise ScoresError(f"{str(path)!r}: the elastic_fx metadata is a JSON {type(meta).__name__}, not an object; "
                          "the file is corrupt.")
    return meta, tensors


def json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (torch.device, Path)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")

def short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."
