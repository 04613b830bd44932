"""The dtype a stage computes in: bf16 on CUDA, float32 elsewhere, unless asked otherwise.

The gradient pass (autocast around fp32 weights, fp32 accumulation) and the masked
forward of the search (bf16 weights) both default to bf16 on a GPU, where it halves the
memory traffic and uses the tensor cores, and to float32 on the CPU, where bf16 is
slower and its rounding would be the only thing it buys.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError

#: The dtypes a stage may be asked to compute in.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(device: torch.device | str, dtype: Optional[torch.dtype] = None, *,
                  what: str = "dtype") -> torch.dtype:
    """``dtype``, or by default bfloat16 on CUDA and float32 on any other device.

    Raises:
        ConfigError: ``dtype`` is not one of :data:`DTYPES` (``what`` names the argument).
    """
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"{what} must be None (bfloat16 on CUDA, float32 elsewhere), torch.float32, "
                          f"torch.bfloat16 or torch.float16, got {dtype!r}")
    return dtype
