"""Triton kernels, one file per op: kernel + launcher + PyTorch reference (the CPU path).

CUDA tensors run the Triton kernel; CPU tensors run the reference;
``ELASTIC_FX_FORCE_TRITON=1`` (with ``TRITON_INTERPRET=1`` on a CPU) forces the kernel.
"""

from .masked_attention import masked_attention, masked_attention_ref
from .sqgrad import accumulate_slices, ghost_sqnorm, ghost_sqnorm_ref, sqgrad_accumulate, sqgrad_accumulate_ref

__all__ = [
    "accumulate_slices",
    "ghost_sqnorm",
    "ghost_sqnorm_ref",
    "masked_attention",
    "masked_attention_ref",
    "sqgrad_accumulate",
    "sqgrad_accumulate_ref",
]
