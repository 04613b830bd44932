"""Backend selection shared by every kernel: Triton, or the PyTorch reference.

Takes a device and a ``backend`` name; returns whether the launcher runs its Triton
kernel (``True``) or its ``_ref`` oracle (``False``). Reads the environment, touches nothing.

* ``backend="auto"``: CUDA tensors go to Triton, CPU tensors to the reference, unless
  ``ELASTIC_FX_FORCE_TRITON=1`` sends CPU tensors to Triton too.
* ``backend="triton"`` / ``"torch"``: that one.

Triton on CPU tensors needs its interpreter, which ``triton.jit`` picks once, when a
kernel is decorated (at import time): ``TRITON_INTERPRET=1`` must be set before
elastic_fx is imported. :data:`_INTERPRETED` remembers what it picked.
"""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch

__all__ = ["BACKENDS", "FORCE_TRITON_ENV", "describe", "device_context", "use_triton"]

FORCE_TRITON_ENV = "ELASTIC_FX_FORCE_TRITON"
BACKENDS = ("auto", "triton", "torch")

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(device: torch.device, backend: str, *, op: str = "kernel",
               interpreter_cpu_only: bool = False) -> bool:
    """Whether the launcher of ``op`` runs Triton for tensors on ``device``.

    Args:
        device: where the op's tensors are.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).
        op: the launcher's name, for error messages.
        interpreter_cpu_only: the interpreted kernel addresses memory by raw host offsets,
            so under the interpreter only CPU tensors may reach it: CUDA tensors go to the
            reference (``"auto"``) or are refused (``"triton"``).

    Raises:
        ValueError: an unknown backend, or Triton asked for tensors it cannot run on.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "torch":
        return False
    if backend == "auto" and device.type != "cuda" and os.environ.get(FORCE_TRITON_ENV, "0").strip() != "1":
        return False
    if device.type == "cuda":
        if not (_INTERPRETED and interpreter_cpu_only):
            return True
        if backend == "auto":
            return False
        raise ValueError(
            f"{op}: backend='triton' got CUDA tensors while TRITON_INTERPRET=1; the interpreted kernel "
            "works on CPU tensors only: unset TRITON_INTERPRET or use backend='torch'"
        )
    if _INTERPRETED and (device.type == "cpu" or not interpreter_cpu_only):
        return True
    raise ValueError(
        f"{op}: the Triton backend got {device.type} tensors but Triton is not in interpreter mode; "
        "set TRITON_INTERPRET=1 before importing elastic_fx, move the tensors to a CUDA device, "
        "or use backend='torch'"
    )


def device_context(device: torch.device) -> ContextManager:
    """Make ``device`` current for a launch on a CUDA device; a no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def describe(t: object) -> str:
    """``(2, 3) float16 on cuda:0`` for a tensor, the type name otherwise: for error messages."""
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
    return type(t).__name__
