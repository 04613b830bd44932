"""Per-sample ("ghost") squared gradient norms of a linear layer, summed over the batch.

Takes a layer's inputs ``x [B, T, in]`` and the gradients of the loss w.r.t. its outputs
``g [B, T, out]``, per sample; returns fp32 ``(rows [out], cols [in], bias [out])``:

    rows[j] = sum_i ||W_i[j, :]||^2     cols[c] = sum_i ||W_i[:, c]||^2
    bias[j] = sum_i (sum_t G_i[t, j])^2          with W_i = G_i^T X_i

the exact empirical-Fisher diagonal per row and per column, without storing per-sample
gradients. Allocates its outputs; touches nothing else.

* ``_ghost_sqnorm_kernel`` (Triton): one program per ``[BLOCK_J, BLOCK_C]`` tile of the
  weight gradient. For each sample it forms that sample's gradient tile on chip with
  ``tl.dot`` over the tokens, squares and reduces it, and never writes it out (same
  FLOPs as one batch weight-gradient). Each program writes its own partial row/column
  sums; the launcher reduces them in a fixed order (no atomics: deterministic).
* ``ghost_sqnorm_ref`` (PyTorch): the oracle and the CPU path, by the ghost-norm
  identity ``||(G^T X)[j, :]||^2 = g_j^T (X X^T) g_j`` with ``X X^T`` only ``[T, T]``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import _INTERPRETED, describe, device_context, use_triton

__all__ = ["ghost_sqnorm", "ghost_sqnorm_ref"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_J, BLOCK_C, BLOCK_T, num_warps) on a GPU. fp32 dots run as three tf32 products
# ("tf32x3"), whose split operands need more registers: BLOCK_T = 16 keeps them spill-free
# on sm_80 (tests/kernels/test_compile.py checks every variant).
_GPU_TILES = {torch.float32: (64, 64, 16, 4), torch.float16: (64, 64, 32, 4), torch.bfloat16: (64, 64, 32, 4)}
_INTERPRETER_TILE = (16, 16, 16, 1)  # every program runs in Python: small tiles


@triton.jit
def _ghost_sqnorm_kernel(
    x_ptr,  # [B, T, IN]: layer inputs per sample
    g_ptr,  # [B, T, OUT]: gradients w.r.t. the layer outputs per sample
    rows_ptr,  # fp32 [cdiv(IN, BLOCK_C), OUT]: partial row sums, one row per column block
    cols_ptr,  # fp32 [cdiv(OUT, BLOCK_J), IN]: partial column sums, one row per row block
    bias_ptr,  # fp32 [OUT]
    B,
    T,
    IN,
    OUT,
    stride_xb,
    stride_xt,
    stride_xc,
    stride_gb,
    stride_gt,
    stride_gj,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs
    UPCAST: tl.constexpr,  # dot in fp32 (the interpreter has no bf16 matmul)
):
    pid_j = tl.program_id(0)
    pid_c = tl.program_id(1)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j_mask = j < OUT
    c_mask = c < IN
    rows_acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    cols_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    x_b = x_ptr  # pointers advance per sample: no 32-bit b * stride products
    g_b = g_ptr
    for _ in range(B):
        w = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)  # this sample's gradient tile
        # per-token partial sums of G_b[:, j], reduced once after the token loop: a tl.sum
        # inside the loop on the dot's own fp32 operand fails TritonGPUOptimizeThreadLocality
        g_acc = tl.zeros([BLOCK_J, BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < T
            g_t = tl.load(
                g_b + t[None, :] * stride_gt + j[:, None] * stride_gj,
                mask=j_mask[:, None] & t_mask[None, :],
                other=0.0,
            )  # [BLOCK_J, BLOCK_T] = G_b[t, j]^T
            x_t = tl.load(
                x_b + t[:, None] * stride_xt + c[None, :] * stride_xc,
                mask=t_mask[:, None] & c_mask[None, :],
                other=0.0,
            )  # [BLOCK_T, BLOCK_C]
            if UPCAST:
                g_t = g_t.to(tl.float32)
                x_t = x_t.to(tl.float32)
            w = tl.dot(g_t, x_t, w, input_precision=PRECISION)
            g_acc += g_t.to(tl.float32)
        g_sum = tl.sum(g_acc, axis=1)
        sq = w * w
        rows_acc += tl.sum(sq, axis=1)
        cols_acc += tl.sum(sq, axis=0)
        bias_acc += g_sum * g_sum
        x_b += stride_xb
        g_b += stride_gb
    tl.store(rows_ptr + pid_c * OUT + j, rows_acc, mask=j_mask)
    tl.store(cols_ptr + pid_j * IN + c, cols_acc, mask=c_mask)
    if pid_c == 0:
        tl.store(bias_ptr + j, bias_acc, mask=j_mask)


def _check_ghost(x: torch.Tensor, g: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(g, torch.Tensor) or x.dim() != 3 or g.dim() != 3 \
            or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"ghost_sqnorm: x is {describe(x)} and g is {describe(g)}; wanted x [B, T, in] and "
            f"g [B, T, out] with the same B and T"
        )
    if x.dtype not in SUPPORTED_DTYPES or g.dtype != x.dtype:
        raise ValueError(f"ghost_sqnorm: x is {x.dtype} and g is {g.dtype}; wanted one dtype of "
                         f"float32, float16, bfloat16 for both")
    if x.device != g.device:
        raise ValueError(f"ghost_sqnorm: x is on {x.device} and g on {g.device}; wanted one device")


def ghost_sqnorm_ref(x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch oracle of :func:`ghost_sqnorm`, by the ghost-norm identity.

    ``||(G^T X)[j, :]||^2 = g_j^T (X X^T) g_j`` and ``||(G^T X)[:, c]||^2 = x_c^T (G G^T) x_c``
    per sample, with ``X X^T`` and ``G G^T`` only ``[T, T]``.
    """
    _check_ghost(x, g)
    xf, gf = x.detach().float(), g.detach().float()
    rows = ((xf @ xf.transpose(1, 2)) @ gf * gf).sum(dim=(0, 1))
    cols = ((gf @ gf.transpose(1, 2)) @ xf * xf).sum(dim=(0, 1))
    bias = gf.sum(dim=1).square().sum(dim=0)
    return rows, cols, bias


def ghost_sqnorm(x: torch.Tensor, g: torch.Tensor, *, backend: str = "auto"
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-sample squared gradient norms of a linear layer, summed over the batch.

    With ``W_i = G_i^T X_i`` the weight gradient of sample ``i`` (never materialised):

        rows[j] = sum_i ||W_i[j, :]||^2     cols[c] = sum_i ||W_i[:, c]||^2
        bias[j] = sum_i (sum_t G_i[t, j])^2

    Args:
        x: ``[B, T, in]`` layer inputs per sample.
        g: ``[B, T, out]`` gradients of the loss w.r.t. the layer outputs per sample.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :mod:`elastic_fx.kernels._dispatch`).

    Returns:
        ``(rows [out], cols [in], bias [out])``, fp32. ``rows`` summed over a head's q/k/v
        rows (plus ``bias``) and ``cols`` over its out-projection columns give the true
        empirical-Fisher diagonal per structure.

    Raises:
        ValueError: x and g are not ``[B, T, *]`` of one supported dtype on one device.
    """
    _check_ghost(x, g)
    if not use_triton(x.device, backend, op="ghost_sqnorm", interpreter_cpu_only=True):
        return ghost_sqnorm_ref(x, g)
    B, T, n_in = x.shape
    n_out = g.shape[2]
    bj, bc, bt, warps = _INTERPRETER_TILE if _INTERPRETED else _GPU_TILES[x.dtype]
    nj, nc = triton.cdiv(n_out, bj), triton.cdiv(n_in, bc)
    rows = torch.empty((nc, n_out), dtype=torch.float32, device=x.device)
    cols = torch.empty((nj, n_in), dtype=torch.float32, device=x.device)
    bias = torch.empty(n_out, dtype=torch.float32, device=x.device)
    if B * T == 0:
        return rows.zero_().sum(0), cols.zero_().sum(0), bias.zero_()
    with device_context(x.device):
        _ghost_sqnorm_kernel[(nj, nc)](
            x, g, rows, cols, bias, B, T, n_in, n_out,
            x.stride(0), x.stride(1), x.stride(2), g.stride(0), g.stride(1), g.stride(2),
            BLOCK_J=bj, BLOCK_C=bc, BLOCK_T=bt,
            # fp32: three tf32 products (about fp32 accuracy on tensor cores); "ieee" when interpreted
            PRECISION="ieee" if _INTERPRETED else "tf32x3" if x.dtype == torch.float32 else "tf32",
            UPCAST=_INTERPRETED and x.dtype != torch.float32,
            num_warps=warps,
        )
    # partial sums are reduced in a fixed order (torch reductions use no atomics)
    return rows.sum(dim=0), cols.sum(dim=0), bias
