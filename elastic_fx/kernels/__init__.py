"""Triton kernels, one file per op: kernel + launcher + PyTorch reference (the CPU path).

Imports nothing from the rest of elastic_fx; backend selection for every op lives in
``_dispatch``: CUDA tensors run the Triton kernel, CPU tensors the reference, and
``ELASTIC_FX_FORCE_TRITON=1`` (with ``TRITON_INTERPRET=1`` on a CPU) forces the kernel.
"""

from .ghost_sqnorm import ghost_sqnorm, ghost_sqnorm_ref
from .masked_attention import masked_attention, masked_attention_ref
from .sqgrad import SqgradJob, sqgrad_accumulate, sqgrad_accumulate_many, sqgrad_accumulate_ref

__all__ = [
    "SqgradJob",
    "ghost_sqnorm",
    "ghost_sqnorm_ref",
    "masked_attention",
    "masked_attention_ref",
    "sqgrad_accumulate",
    "sqgrad_accumulate_many",
    "sqgrad_accumulate_ref",
]
