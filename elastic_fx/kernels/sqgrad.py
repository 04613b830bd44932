"""Fused squared-gradient accumulation per structure: the local scores of SnapViT.

What it computes
----------------
A structure (attention head, FFN neuron) owns positions ``index[s]`` along dimension
``dim`` of a parameter (see :class:`elastic_fx.structures.ParamSlice`). For one gradient

    out[s]  += sum of grad[e]**2 over every element e whose coordinate along dim is in index[s]
    fisher  += grad**2                      (optional: the per-parameter diagonal Fisher)

always accumulated in fp32, whatever the gradient dtype (fp32, fp16, bf16). A head's
score is the sum of these over its q/k/v rows, their biases and its out-projection
columns; a neuron's over its in-projection row(s) and bias and its out-projection column.

How the Triton path works
-------------------------
The gradient is read once, as the contiguous matrix it already is in memory:

* ``inner > 1`` (``dim`` is not the last axis, e.g. rows of a ``[3E, E]`` qkv weight):
  *row mode*: the matrix ``[outer * D, inner]``; position of row r is ``r % D``.
* ``inner == 1`` (``dim`` is the last axis: out-projection columns, biases):
  *column mode*: the matrix ``[outer, D]``; position of column c is ``c``.

1. ``_sqgrad_partial_kernel`` streams ``[BLOCK_R, BLOCK_C]`` tiles, squares them in
   registers (and adds the squares to ``fisher`` in the same pass), and writes per-row
   (row mode) or per-column (column mode) sums into a partial buffer ``[parts, D]``.
   Long rows or columns are split into chunks so that the GPU has enough programs; each
   chunk writes its own partial row, so there are no atomics.
2. ``_sqgrad_reduce_kernel`` sums the partial rows of a gradient into one fp32 value per
   position (skipped where there is a single part).
3. ``_sqgrad_gather_kernel`` adds, for each structure, the values of its positions to
   ``out[s]``. One program owns a block of structures of one ``out`` and loops over every
   gradient feeding that ``out`` in a fixed order.

Every sum runs in an order fixed by the shapes and the device's SM count, so two runs
give bit-identical results. No ``grad**2`` temporary is ever materialised.

Many gradients, one launch
--------------------------
:func:`sqgrad_accumulate_many` takes a list of :class:`SqgradJob` (gradient, dim, index,
out, fisher) and runs all of them with one launch per phase (per gradient dtype), which
is what makes a whole model's accumulation bandwidth-bound instead of launch-bound.
Gradients of different tensors are addressed as element offsets from one base tensor
per launch; the schedule (program tables, index buffer) is built once per set of shapes
and index tensors and cached. For a training-style loop, :class:`SqgradPlan` binds the
outputs once and leaves only a few list comparisons of host work per step.

Per-sample ("ghost") squared norms
----------------------------------
:func:`ghost_sqnorm` gives the exact empirical-Fisher diagonal per row and per column
of a linear layer, ``sum_i ||(G_i^T X_i)[j, :]||^2`` etc., without storing per-sample
gradients: ``_ghost_sqnorm_kernel`` forms each sample's gradient tile on chip with
``tl.dot``, squares and reduces it, and never writes it out (same FLOPs as one batch
weight-gradient). The reference uses the ghost-norm identity
``||(G^T X)[j, :]||^2 = g_j^T (X X^T) g_j``.

Dispatch
--------
``backend="auto"``: CUDA tensors go to Triton, CPU tensors to the PyTorch reference;
``ELASTIC_FX_FORCE_TRITON=1`` (or ``backend="triton"``) sends CPU tensors to Triton too,
which then needs ``TRITON_INTERPRET=1`` set before this module is imported.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from ..structures import ParamSlice

__all__ = [
    "SqgradJob",
    "SqgradPlan",
    "accumulate_slices",
    "ghost_sqnorm",
    "ghost_sqnorm_ref",
    "sqgrad_accumulate",
    "sqgrad_accumulate_many",
    "sqgrad_accumulate_ref",
]

logger = logging.getLogger(__name__)

FORCE_TRITON_ENV = "ELASTIC_FX_FORCE_TRITON"
BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# triton.jit picks the interpreter once, when a kernel is decorated (at import time).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Phase-1 tiles: 16 KiB of gradient per step on a GPU; small tiles under the interpreter,
# which runs every program in Python.
_TILE_GPU = {torch.float32: (32, 128), torch.float16: (64, 128), torch.bfloat16: (64, 128)}
_TILE_INTERP = (8, 32)
_PHASE1_WARPS = 8
_WAVES = 4  # aim for about this many programs per SM in phase 1
_GATHER_TILE = 256 if _INTERPRETED else 4096  # BLOCK_S * BLOCK_K of phase 3
_REDUCE_TILE = (4, 32) if _INTERPRETED else (8, 512)  # (BLOCK_P, BLOCK_D) of phase 2
_PLAN_CACHE_SIZE = 32

# Record layouts of the int64 tables the kernels read (one row per program / job / target).
_P1_FIELDS = 9  # job, r0, c0, n_steps, lim_r, lim_c, ld, row_mode, part_offset
_P2_FIELDS = 5  # part_base, parts, D, pos_base, d0
_P3_FIELDS = 2  # target, s0
_TGT_FIELDS = 4  # S, job_begin, job_end, out_stride
_GJOB_FIELDS = 3  # pos_base, K, idx_base


# ============================================================================ kernels
@triton.jit
def _square_tile(acc, g_ptr, f_ptr, rows, cols, lim_r, lim_c, ld, HAS_FISHER: tl.constexpr):
    """acc + grad[rows, cols]**2 (fp32); adds the squares to fisher in the same pass."""
    mask = (rows < lim_r)[:, None] & (cols < lim_c)[None, :]
    offs = rows[:, None] * ld + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    sq = g * g
    if HAS_FISHER:
        f = tl.load(f_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        tl.store(f_ptr + offs, f + sq, mask=mask, eviction_policy="evict_first")
    return acc + sq


@triton.jit
def _sqgrad_partial_kernel(
    g_ptr,  # grad dtype: base of this launch; gradient j starts at g_ptr + call[j]
    f_ptr,  # fp32: base of the fisher buffers; fisher j starts at f_ptr + call[num_jobs + j]
    buf_ptr,  # fp32 [buffer]: partial sums, written at part_offset + [0, BLOCK_R or BLOCK_C)
    call_ptr,  # int64 [2 * num_jobs + num_targets]: per-call element offsets
    prog_ptr,  # int64 [num_programs, 9]: one record per program (see _P1_FIELDS)
    num_jobs,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_FISHER: tl.constexpr,
    VEC: tl.constexpr,  # >1: offsets, row strides and column limits are multiples of VEC
):
    rec = prog_ptr + tl.program_id(0).to(tl.int64) * 9
    job = tl.load(rec)
    r0 = tl.load(rec + 1)
    c0 = tl.multiple_of(tl.load(rec + 2), BLOCK_C)
    n_steps = tl.load(rec + 3)
    lim_r = tl.load(rec + 4)
    lim_c = tl.load(rec + 5)
    ld = tl.load(rec + 6)
    row_mode = tl.load(rec + 7)
    part_offset = tl.load(rec + 8)
    g_off = tl.load(call_ptr + job)
    f_off = g_off * 0
    if HAS_FISHER:
        f_off = tl.load(call_ptr + num_jobs + job)
    if VEC > 1:
        g_off = tl.multiple_of(g_off, VEC)
        f_off = tl.multiple_of(f_off, 4)
        ld = tl.multiple_of(ld, VEC)
        lim_c = tl.multiple_of(lim_c, VEC)
    g_base = g_ptr + g_off
    f_base = f_ptr + f_off
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = c0 + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    if row_mode != 0:
        # a block of whole rows (one chunk of their columns): reduce along the row
        for s in range(n_steps):
            acc = _square_tile(acc, g_base, f_base, rows, cols + s * BLOCK_C, lim_r, lim_c, ld, HAS_FISHER)
        tl.store(buf_ptr + part_offset + tl.arange(0, BLOCK_R), tl.sum(acc, axis=1), mask=rows < lim_r)
    else:
        # a block of columns (one chunk of their rows): reduce down the columns
        for s in range(n_steps):
            acc = _square_tile(acc, g_base, f_base, rows + s * BLOCK_R, cols, lim_r, lim_c, ld, HAS_FISHER)
        tl.store(buf_ptr + part_offset + tl.arange(0, BLOCK_C), tl.sum(acc, axis=0), mask=cols < lim_c)


@triton.jit
def _sqgrad_reduce_kernel(
    buf_ptr,  # fp32 [buffer]: reads partials [parts, D] at part_base, writes [D] at pos_base
    prog_ptr,  # int64 [num_programs, 5]: one record per program (see _P2_FIELDS)
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rec = prog_ptr + tl.program_id(0).to(tl.int64) * 5
    part_base = tl.load(rec)
    parts = tl.load(rec + 1)
    D = tl.load(rec + 2)
    pos_base = tl.load(rec + 3)
    d = tl.load(rec + 4) + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < parts)[:, None] & d_mask[None, :]
        acc += tl.load(buf_ptr + part_base + p[:, None] * D + d[None, :], mask=mask, other=0.0)
    tl.store(buf_ptr + pos_base + d, tl.sum(acc, axis=0), mask=d_mask)


@triton.jit
def _sqgrad_gather_kernel(
    buf_ptr,  # fp32 [buffer]: per-position sums of every job at its pos_base
    idx_ptr,  # int32/int64 [sum S*K]: every job's index[S, K], row-major, at its idx_base
    out_ptr,  # fp32: base of the outputs; target t's out starts at out_ptr + call[2*num_jobs + t]
    call_ptr,  # int64 [2 * num_jobs + num_targets]: per-call element offsets
    prog_ptr,  # int64 [num_programs, 2]: (target, s0)
    tgt_ptr,  # int64 [num_targets, 4]: (S, job_begin, job_end, out_stride)
    gjob_ptr,  # int64 [num_gather_jobs, 3]: (pos_base, K, idx_base), grouped by target
    num_jobs,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rec = prog_ptr + tl.program_id(0).to(tl.int64) * 2
    target = tl.load(rec)
    s = tl.load(rec + 1) + tl.arange(0, BLOCK_S)
    trec = tgt_ptr + target * 4
    S = tl.load(trec)
    job_begin = tl.load(trec + 1)
    job_end = tl.load(trec + 2)
    out_stride = tl.load(trec + 3)
    s_mask = s < S
    acc = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
    for j in range(job_begin, job_end):
        pos_base = tl.load(gjob_ptr + j * 3)
        K = tl.load(gjob_ptr + j * 3 + 1)
        idx_base = tl.load(gjob_ptr + j * 3 + 2)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = s_mask[:, None] & (k < K)[None, :]
            pos = tl.load(idx_ptr + idx_base + s[:, None] * K + k[None, :], mask=mask, other=0)
            acc += tl.load(buf_ptr + pos_base + pos, mask=mask, other=0.0)
    out_ptrs = out_ptr + tl.load(call_ptr + 2 * num_jobs + target) + s * out_stride
    tl.store(out_ptrs, tl.load(out_ptrs, mask=s_mask, other=0.0) + tl.sum(acc, axis=1), mask=s_mask)


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
        g_sum = tl.zeros([BLOCK_J], dtype=tl.float32)
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
            g_sum += tl.sum(g_t.to(tl.float32), axis=1)
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


# ============================================================================ jobs and checks
@dataclass(frozen=True)
class SqgradJob:
    """One gradient to accumulate: ``out[s] += sum(grad**2 at positions index[s] along dim)``.

    ``fisher`` (fp32, ``grad``'s shape), if given, receives ``+= grad**2``. Several jobs
    may share one ``out`` (the slices of one structure group); no two may share a
    ``fisher`` buffer.
    """

    grad: torch.Tensor
    dim: int
    index: torch.Tensor
    out: torch.Tensor
    fisher: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class _Layout:
    """A gradient seen as the contiguous matrix ``[R, C]`` the kernels stream."""

    dim: int
    D: int  # size along dim
    outer: int
    row_mode: bool
    R: int
    C: int

    @classmethod
    def of(cls, shape: Tuple[int, ...], dim: int) -> "_Layout":
        D = shape[dim]
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1 :])
        if inner > 1:
            return cls(dim, D, outer, True, outer * D, inner)
        return cls(dim, D, outer, False, outer, D)


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
    return type(t).__name__


def _check_job(grad: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor,
               fisher: Optional[torch.Tensor], where: str = "sqgrad") -> int:
    """Validate one job's shapes, dtypes and devices (not the index values); return dim >= 0."""
    if not isinstance(grad, torch.Tensor) or grad.dtype not in SUPPORTED_DTYPES or grad.dim() == 0:
        raise ValueError(
            f"{where}: grad is {_describe(grad)}; wanted a tensor with at least one dimension "
            f"of dtype float32, float16 or bfloat16"
        )
    ndim = grad.dim()
    if not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(
            f"{where}: dim={dim!r} for grad of shape {tuple(grad.shape)}; wanted an int in [{-ndim}, {ndim})"
        )
    dim %= ndim
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.dtype.is_floating_point \
            or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{where}: index is {_describe(index)}; wanted an integer tensor [num_structures, k]")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 1:
        raise ValueError(f"{where}: out is {_describe(out)}; wanted a 1-D float32 tensor [num_structures]")
    if out.numel() != index.shape[0]:
        raise ValueError(
            f"{where}: out has shape {tuple(out.shape)} but index has shape {tuple(index.shape)}; "
            f"wanted out of shape ({index.shape[0]},), one entry per structure"
        )
    if out.numel() > 1 and out.stride(0) == 0:
        raise ValueError(f"{where}: out is an expanded view (stride 0); pass a tensor that owns its entries")
    if out.device != grad.device:
        raise ValueError(f"{where}: out is on {out.device} but grad is on {grad.device}; wanted both on one device")
    if fisher is not None:
        if not isinstance(fisher, torch.Tensor) or fisher.dtype != torch.float32 or fisher.shape != grad.shape \
                or fisher.device != grad.device:
            raise ValueError(
                f"{where}: fisher is {_describe(fisher)}; wanted float32 of grad's shape "
                f"{tuple(grad.shape)} on {grad.device}"
            )
    return dim


def _check_index_values(index: torch.Tensor, size: int, dim: int, shape: Tuple[int, ...],
                        where: str = "sqgrad") -> None:
    """Every position must lie in [0, size)."""
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        s = int((index == bad).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{where}: index[{s}] holds position {bad}, but grad of shape {shape} has size {size} "
            f"along dim {dim}; wanted positions in [0, {size})"
        )


def _use_triton(device: torch.device, backend: str) -> bool:
    """Resolve ``backend`` for tensors on ``device`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"sqgrad: backend={backend!r}; wanted one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "auto" and device.type != "cuda" and os.environ.get(FORCE_TRITON_ENV, "0").strip() != "1":
        return False
    if device.type == "cuda":
        if not _INTERPRETED:
            return True
        if backend == "auto":
            return False  # the interpreted kernels address memory by raw host offsets
        raise ValueError(
            "sqgrad: backend='triton' got CUDA tensors while TRITON_INTERPRET=1; the interpreted kernels "
            "work on CPU tensors only: unset TRITON_INTERPRET or use backend='torch'"
        )
    if device.type == "cpu" and _INTERPRETED:
        return True
    raise ValueError(
        f"sqgrad: the Triton backend got {device.type} tensors but Triton is not in interpreter mode; "
        "set TRITON_INTERPRET=1 before importing elastic_fx, move the tensors to a CUDA device, "
        "or use backend='torch'"
    )


# ============================================================================ reference
def sqgrad_accumulate_ref(grad: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor,
                          fisher: Optional[torch.Tensor] = None) -> None:
    """Pure-PyTorch oracle and CPU path of :func:`sqgrad_accumulate` (same contract)."""
    dim = _check_job(grad, dim, index, out, fisher)
    _check_index_values(index, grad.shape[dim], dim, tuple(grad.shape))
    sq = grad.detach().float().square()
    if fisher is not None:
        fisher.add_(sq)
    others = [d for d in range(grad.dim()) if d != dim]
    per_position = sq.sum(dim=others) if others else sq
    out.add_(per_position[index.to(device=per_position.device, dtype=torch.long)].sum(dim=1))


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


# ============================================================================ schedule
def _tile(dtype: torch.dtype) -> Tuple[int, int]:
    return _TILE_INTERP if _INTERPRETED else _TILE_GPU[dtype]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: fewest, largest programs run fastest


@dataclass
class _Launch:
    """One phase-1 launch: the jobs of one (dtype, has_fisher) pair."""

    dtype: torch.dtype
    has_fisher: bool
    jobs: List[int]
    programs: torch.Tensor  # int64 [P, _P1_FIELDS] on the device
    block_r: int
    block_c: int
    ld_multiple_of_16b: bool  # every row stride is a multiple of 16 bytes


class _Plan:
    """Programs, buffer layout and index buffer for one set of jobs (shapes + index tensors).

    The fp32 work buffer holds, per job, its partial sums ``[parts, D]`` (phase 1), then,
    for jobs with more than one part, their per-position sums ``[D]`` (phase 2). Phase 3
    reads each job's per-position sums at ``pos_base`` (= its partials when ``parts == 1``).
    """

    def __init__(self, layouts: List[_Layout], dtypes: List[torch.dtype], has_fisher: List[bool],
                 indices: List[torch.Tensor], targets: List[int], target_sizes: List[int],
                 target_strides: List[int], device: torch.device, steps_per_program: Optional[int]):
        self.index_refs: List[weakref.ref] = []  # set by _get_plan: the caller's index tensors
        self.device = device
        part_base, parts, cursor = self._build_phase1(layouts, dtypes, has_fisher, steps_per_program)
        pos_base, cursor = self._build_reduce(layouts, part_base, parts, cursor)
        self.buffer_size = max(cursor, 1)
        self._build_gather(indices, targets, target_sizes, target_strides, parts, pos_base)

    def _build_phase1(self, layouts: List[_Layout], dtypes: List[torch.dtype], has_fisher: List[bool],
                      steps_per_program: Optional[int]) -> Tuple[List[int], List[int], int]:
        """One launch per (dtype, fisher) pair; returns each job's partial base and part count."""
        n = len(layouts)
        groups: Dict[Tuple[torch.dtype, bool], List[int]] = {}
        for j in range(n):
            if layouts[j].R * layouts[j].C > 0:
                groups.setdefault((dtypes[j], has_fisher[j]), []).append(j)
        part_base, parts, cursor = [0] * n, [0] * n, 0
        self.launches: List[_Launch] = []
        for (dtype, fish), jobs in groups.items():
            br, bc = _tile(dtype)
            tiles = sum(math.ceil(layouts[j].R / br) * math.ceil(layouts[j].C / bc) for j in jobs)
            steps = steps_per_program or max(1, math.ceil(tiles / (_WAVES * _num_sms(self.device))))
            records = []
            for j in jobs:
                lay = layouts[j]
                recs, n_chunks = self._phase1_records(j, lay, br, bc, steps, cursor)
                records.append(recs)
                part_base[j] = cursor
                parts[j] = n_chunks * (lay.outer if lay.row_mode else 1)
                cursor += parts[j] * lay.D
            table = np.concatenate(records)
            # longest programs first: a shorter tail; each program writes its own partial row,
            # so the order changes no result
            table = table[np.argsort(-table[:, 3], kind="stable")]
            esize = torch.empty((), dtype=dtype).element_size()
            self.launches.append(_Launch(
                dtype, fish, jobs, torch.from_numpy(table).to(self.device), br, bc,
                all(layouts[j].C * esize % 16 == 0 for j in jobs),
            ))
        return part_base, parts, cursor

    def _build_reduce(self, layouts: List[_Layout], part_base: List[int], parts: List[int],
                      cursor: int) -> Tuple[List[int], int]:
        """Programs summing the partial rows of jobs with more than one; returns pos_base per job."""
        pos_base = list(part_base)
        records = []
        block_d = _REDUCE_TILE[1]
        for j, lay in enumerate(layouts):
            if parts[j] > 1:
                pos_base[j] = cursor
                records.extend((part_base[j], parts[j], lay.D, cursor, d0) for d0 in range(0, lay.D, block_d))
                cursor += lay.D
        self.reduce_programs = torch.tensor(records, dtype=torch.int64, device=self.device).reshape(-1, _P2_FIELDS)
        return pos_base, cursor

    def _build_gather(self, indices: List[torch.Tensor], targets: List[int], target_sizes: List[int],
                      target_strides: List[int], parts: List[int], pos_base: List[int]) -> None:
        """Per target, the jobs feeding it (in job order) and programs over blocks of structures."""
        by_target: Dict[int, List[int]] = {}
        for j, t in enumerate(targets):
            if parts[j] and indices[j].shape[1] and target_sizes[t]:
                by_target.setdefault(t, []).append(j)
        gjobs, tgts, flat_idx = [], [], []
        idx_cursor, max_k, max_s = 0, 1, 1
        for t, (size, stride) in enumerate(zip(target_sizes, target_strides)):
            begin = len(gjobs)
            for j in by_target.get(t, []):
                K = int(indices[j].shape[1])
                gjobs.append((pos_base[j], K, idx_cursor))
                flat_idx.append(indices[j].reshape(-1))
                idx_cursor += size * K
                max_k, max_s = max(max_k, K), max(max_s, size)
            tgts.append((size, begin, len(gjobs), stride))
        self.block_k = min(128, triton.next_power_of_2(max_k))
        self.block_s = max(1, min(triton.next_power_of_2(max_s), _GATHER_TILE // self.block_k))
        progs = [(t, s0) for t in by_target for s0 in range(0, target_sizes[t], self.block_s)]
        idx = torch.cat(flat_idx) if flat_idx else torch.zeros(1, dtype=torch.int64)
        if int(idx.max()) < 2**31 - 1 and idx_cursor < 2**31 - 1:
            idx = idx.to(torch.int32)
        self.index_buffer = idx.to(self.device)
        self.gather_programs = torch.tensor(progs, dtype=torch.int64, device=self.device).reshape(-1, _P3_FIELDS)
        self.targets = torch.tensor(tgts, dtype=torch.int64, device=self.device).reshape(-1, _TGT_FIELDS)
        self.gather_jobs = torch.tensor(gjobs, dtype=torch.int64, device=self.device).reshape(-1, _GJOB_FIELDS)

    @staticmethod
    def _phase1_records(j: int, lay: _Layout, br: int, bc: int, steps: int, base: int) -> Tuple[np.ndarray, int]:
        """Program records of one job and its number of chunks along the reduced axis."""
        if lay.row_mode:  # blocks of rows, chunks of columns
            n_blocks, along, step_len, length = math.ceil(lay.R / br), math.ceil(lay.C / bc), bc, lay.C
        else:  # blocks of columns, chunks of rows
            n_blocks, along, step_len, length = math.ceil(lay.C / bc), math.ceil(lay.R / br), br, lay.R
        n_chunks = math.ceil(along / steps)
        per_chunk = math.ceil(along / n_chunks)  # balanced; every chunk non-empty
        n_chunks = math.ceil(along / per_chunk)
        blk = np.repeat(np.arange(n_blocks, dtype=np.int64), n_chunks)
        chk = np.tile(np.arange(n_chunks, dtype=np.int64), n_blocks)
        rec = np.empty((blk.size, _P1_FIELDS), dtype=np.int64)
        rec[:, 0] = j
        rec[:, 3] = np.minimum(per_chunk, along - chk * per_chunk)
        chunk_end = np.minimum(length, (chk + 1) * per_chunk * step_len)
        rec[:, 6] = lay.C
        if lay.row_mode:
            rec[:, 1] = blk * br
            rec[:, 2] = chk * per_chunk * bc
            rec[:, 4] = lay.R
            rec[:, 5] = chunk_end
            rec[:, 7] = 1
            rec[:, 8] = base + chk * lay.R + blk * br
        else:
            rec[:, 1] = chk * per_chunk * br
            rec[:, 2] = blk * bc
            rec[:, 4] = chunk_end
            rec[:, 5] = lay.C
            rec[:, 7] = 0
            rec[:, 8] = base + chk * lay.C + blk * bc
        return rec, n_chunks

    def alive(self, indices: Sequence[torch.Tensor]) -> bool:
        """The cached plan still refers to these very index tensors (ids can be reused)."""
        return all(r() is ix for r, ix in zip(self.index_refs, indices))


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()


def _get_plan(jobs: List[SqgradJob], dims: List[int], targets: List[int], target_outs: List[torch.Tensor],
              device: torch.device, steps_per_program: Optional[int]) -> _Plan:
    key = (
        str(device),
        steps_per_program,
        tuple(
            (tuple(jb.grad.shape), d, jb.grad.dtype, jb.fisher is not None, id(jb.index), jb.index._version, t)
            for jb, d, t in zip(jobs, dims, targets)
        ),
        tuple((o.numel(), o.stride(0) if o.numel() else 1) for o in target_outs),
    )
    plan = _PLANS.get(key)
    if plan is not None and plan.alive([jb.index for jb in jobs]):
        _PLANS.move_to_end(key)
        return plan
    indices = []
    for jb, d in zip(jobs, dims):
        ix = jb.index.detach().to("cpu", torch.int64)
        _check_index_values(ix, jb.grad.shape[d], d, tuple(jb.grad.shape))
        indices.append(ix)
    plan = _Plan(
        [_Layout.of(tuple(jb.grad.shape), d) for jb, d in zip(jobs, dims)],
        [jb.grad.dtype for jb in jobs],
        [jb.fisher is not None for jb in jobs],
        indices,
        targets,
        [o.numel() for o in target_outs],
        [o.stride(0) if o.numel() else 1 for o in target_outs],
        device,
        steps_per_program,
    )
    plan.index_refs = [weakref.ref(jb.index) for jb in jobs]
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    logger.debug("sqgrad: built a plan for %d jobs on %s", len(jobs), device)
    return plan


def _elements(t: torch.Tensor) -> set:
    """Byte addresses of the fp32 entries of a 1-D tensor."""
    return {t.data_ptr() + 4 * i * t.stride(0) for i in range(t.numel())}


def _check_disjoint(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Raise if two distinct 1-D fp32 buffers share an entry (the kernels would race on it)."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + 4 * ((t.numel() - 1) * t.stride(0) + 1), i)
        for i, t in enumerate(tensors) if t.numel()
    )
    for (a0, a1, i), (b0, _, k) in zip(spans, spans[1:]):
        if b0 >= a1:
            continue
        ta, tb = tensors[i], tensors[k]
        # spans meet; contiguous buffers then share entries, strided ones (columns of one
        # matrix, say) may still interleave without touching
        if (ta.stride(0) == 1 and tb.stride(0) == 1) or _elements(ta) & _elements(tb):
            raise ValueError(
                f"sqgrad: two different {what} tensors share memory (shapes {tuple(ta.shape)} and "
                f"{tuple(tb.shape)}); pass the very same tensor for a shared {what}, or disjoint buffers"
            )


# ============================================================================ launchers
def _group_targets(jobs: Sequence[SqgradJob]) -> Tuple[List[int], List[torch.Tensor]]:
    """A target is one output tensor; jobs passing the very same view share a target."""
    target_of: Dict[tuple, int] = {}
    target_outs: List[torch.Tensor] = []
    targets = []
    for jb in jobs:
        key = (jb.out.data_ptr(), jb.out.numel(), jb.out.stride(0) if jb.out.numel() else 1)
        if key not in target_of:
            target_of[key] = len(target_outs)
            target_outs.append(jb.out)
        targets.append(target_of[key])
    _check_disjoint(target_outs, "out")
    return targets, target_outs


def _call_table(plan: _Plan, grads: Sequence[torch.Tensor], fishers: Sequence[Optional[torch.Tensor]],
                target_outs: Sequence[torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, List[int]]:
    """Per-call element offsets (grads, fishers, outs) from each launch's base, and VEC per launch."""
    n = len(grads)
    call = [0] * (2 * n + len(target_outs))
    vecs = []
    for launch in plan.launches:
        g0 = grads[launch.jobs[0]]
        f0 = fishers[launch.jobs[0]]
        esize = g0.element_size()
        ok = launch.ld_multiple_of_16b and g0.data_ptr() % 16 == 0 and (f0 is None or f0.data_ptr() % 16 == 0)
        for j in launch.jobs:
            call[j], rem = divmod(grads[j].data_ptr() - g0.data_ptr(), esize)
            if rem:  # cannot happen for tensors torch allocates; guard the offset arithmetic anyway
                raise ValueError(f"sqgrad job {j}: grad's address is not a multiple of its element size")
            ok = ok and (call[j] * esize) % 16 == 0
            if f0 is not None:
                call[n + j] = (fishers[j].data_ptr() - f0.data_ptr()) // 4
                ok = ok and call[n + j] % 4 == 0
        vecs.append(16 // esize if ok else 1)
    out0 = target_outs[0].data_ptr()
    for t, o in enumerate(target_outs):
        call[2 * n + t] = (o.data_ptr() - out0) // 4
    call_t = torch.tensor(call, dtype=torch.int64)
    if device.type == "cuda":
        call_t = call_t.to(device, non_blocking=True)  # staged copy: no wait on the stream
    return call_t, vecs


def _launch(plan: _Plan, grads: Sequence[torch.Tensor], fishers: Sequence[Optional[torch.Tensor]],
            out0: torch.Tensor, call_t: torch.Tensor, vecs: Sequence[int], device: torch.device) -> None:
    """Phase 1 per (dtype, fisher) launch, then the reduce and gather phases."""
    n = len(grads)
    buf = torch.empty(plan.buffer_size, dtype=torch.float32, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for launch, vec in zip(plan.launches, vecs):
            g0, f0 = grads[launch.jobs[0]], fishers[launch.jobs[0]]
            _sqgrad_partial_kernel[(launch.programs.shape[0],)](
                g0, buf if f0 is None else f0, buf, call_t, launch.programs, n,
                BLOCK_R=launch.block_r, BLOCK_C=launch.block_c, HAS_FISHER=launch.has_fisher, VEC=vec,
                num_warps=_PHASE1_WARPS,
            )
        if plan.reduce_programs.shape[0]:
            _sqgrad_reduce_kernel[(plan.reduce_programs.shape[0],)](
                buf, plan.reduce_programs, BLOCK_P=_REDUCE_TILE[0], BLOCK_D=_REDUCE_TILE[1], num_warps=4,
            )
        if plan.gather_programs.shape[0]:
            _sqgrad_gather_kernel[(plan.gather_programs.shape[0],)](
                buf, plan.index_buffer, out0, call_t, plan.gather_programs, plan.targets, plan.gather_jobs, n,
                BLOCK_S=plan.block_s, BLOCK_K=plan.block_k, num_warps=4,
            )


def sqgrad_accumulate(grad: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor,
                      fisher: Optional[torch.Tensor] = None, *, backend: str = "auto",
                      steps_per_program: Optional[int] = None) -> None:
    """``out[s] += sum of grad[e]**2`` over elements ``e`` whose coordinate along ``dim`` is in ``index[s]``.

    Args:
        grad: the gradient, fp32 / fp16 / bf16, any shape (at least 1-D).
        dim: the axis ``index`` addresses (negative counts from the end).
        index: int ``[S, K]``, positions along ``dim`` owned by each of ``S`` structures
            (a repeated position is counted each time it appears).
        out: fp32 ``[S]``, accumulated in place (may be a strided view, e.g. ``scores[:, block]``).
        fisher: optional fp32 tensor of ``grad``'s shape; receives ``+= grad**2`` in place.
        backend: ``"auto"`` (CUDA -> Triton, CPU -> PyTorch, unless the env var
            ``ELASTIC_FX_FORCE_TRITON=1``), ``"triton"`` or ``"torch"``.
        steps_per_program: tuning knob: tiles one Triton program streams before it writes a
            partial sum (``None``: chosen from the device's SM count).

    Raises:
        ValueError: shapes, dtypes or devices do not fit, or an index is out of range.
    """
    sqgrad_accumulate_many([SqgradJob(grad, dim, index, out, fisher)], backend=backend,
                           steps_per_program=steps_per_program)


def _check_jobs(jobs: Sequence[SqgradJob]) -> Tuple[List[int], torch.device]:
    dims = [_check_job(jb.grad, jb.dim, jb.index, jb.out, jb.fisher, where=f"sqgrad job {i}")
            for i, jb in enumerate(jobs)]
    device = jobs[0].grad.device
    for i, jb in enumerate(jobs):
        if jb.grad.device != device:
            raise ValueError(f"sqgrad job {i}: grad is on {jb.grad.device} but job 0 is on {device}; "
                             f"wanted every job on one device")
    return dims, device


def sqgrad_accumulate_many(jobs: Sequence[SqgradJob], *, backend: str = "auto",
                           steps_per_program: Optional[int] = None) -> None:
    """Run every job of :func:`sqgrad_accumulate` with one launch per phase (per gradient dtype).

    Jobs may share an ``out`` tensor (their contributions are added in job order); two
    different ``out`` or ``fisher`` tensors must not overlap in memory. All tensors must be
    on one device. See :func:`sqgrad_accumulate` for the arguments. To accumulate the same
    gradients step after step with the least host work, build a :class:`SqgradPlan` once.
    """
    jobs = list(jobs)
    if not jobs:
        return
    dims, device = _check_jobs(jobs)
    if not _use_triton(device, backend):
        for jb in jobs:
            sqgrad_accumulate_ref(jb.grad, jb.dim, jb.index, jb.out, jb.fisher)
        return
    _run_triton(jobs, dims, device, steps_per_program)


def _run_triton(jobs: List[SqgradJob], dims: List[int], device: torch.device,
                steps_per_program: Optional[int]) -> None:
    """Check memory layout, fetch the cached schedule, build the per-call offsets and launch."""
    targets, target_outs = _group_targets(jobs)
    grads = [jb.grad.detach() if jb.grad.is_contiguous() else jb.grad.detach().contiguous() for jb in jobs]
    fishers = [None if jb.fisher is None else jb.fisher if jb.fisher.is_contiguous() else jb.fisher.contiguous()
               for jb in jobs]
    _check_disjoint([f.reshape(-1) for f in fishers if f is not None], "fisher")
    plan = _get_plan(jobs, dims, targets, target_outs, device, steps_per_program)
    call_t, vecs = _call_table(plan, grads, fishers, target_outs, device)
    _launch(plan, grads, fishers, target_outs[0], call_t, vecs, device)
    for jb, f in zip(jobs, fishers):
        if f is not None and f is not jb.fisher:
            jb.fisher.copy_(f)


class SqgradPlan:
    """Accumulate the same set of gradients step after step, with the least host work.

    Built once from template jobs: their gradients give each job's shape, dtype and device;
    their ``out`` and ``fisher`` buffers are bound to the plan. Every :meth:`run` then takes
    only the new gradients, checks them with a few list comparisons, reuses the device-side
    offset table when the gradients sit at the same addresses as last time (the caching
    allocator usually puts them there) and launches the kernels (one phase-1 launch per
    gradient dtype, plus the gather). The host work per step is a fraction of a microsecond
    per job plus the launches (about 30 us for the 72 jobs of a ViT-B/16, measured on a CPU
    with the kernels stubbed out), so a whole-model step can stay bound by memory bandwidth.

    Example::

        plan = SqgradPlan([SqgradJob(p.grad, s.dim, s.index, scores[b], fisher[s.name]) ...])
        for batch in loader:
            loss(batch).backward()
            plan.run([p.grad for p in params_in_job_order])
    """

    def __init__(self, jobs: Sequence[SqgradJob], *, backend: str = "auto",
                 steps_per_program: Optional[int] = None):
        self.jobs = list(jobs)
        if not self.jobs:
            raise ValueError("SqgradPlan: got no jobs; wanted at least one SqgradJob")
        dims, self.device = _check_jobs(self.jobs)
        self.use_triton = _use_triton(self.device, backend)
        self._shapes = [jb.grad.shape for jb in self.jobs]
        self._dtypes = [jb.grad.dtype for jb in self.jobs]
        self._devices = [self.device] * len(self.jobs)
        self._last_ptrs: Optional[List[int]] = None
        self._call: Optional[Tuple[torch.Tensor, List[int]]] = None
        if not self.use_triton:
            for jb, d in zip(self.jobs, dims):
                _check_index_values(jb.index, jb.grad.shape[d], d, tuple(jb.grad.shape))
            return
        for i, jb in enumerate(self.jobs):
            if jb.fisher is not None and not jb.fisher.is_contiguous():
                raise ValueError(f"SqgradPlan job {i}: fisher is not contiguous; wanted a contiguous fp32 buffer "
                                 f"(e.g. torch.zeros_like(grad, dtype=torch.float32))")
        targets, self._target_outs = _group_targets(self.jobs)
        self._fishers = [jb.fisher for jb in self.jobs]
        _check_disjoint([f.reshape(-1) for f in self._fishers if f is not None], "fisher")
        self._plan = _get_plan(self.jobs, dims, targets, self._target_outs, self.device, steps_per_program)

    def run(self, grads: Sequence[torch.Tensor]) -> None:
        """Accumulate ``grads[i]`` as job ``i`` (same shape, dtype and device as its template)."""
        grads = list(grads)
        if [g.shape for g in grads] != self._shapes or [g.dtype for g in grads] != self._dtypes \
                or [g.device for g in grads] != self._devices:
            self._raise_mismatch(grads)
        if not self.use_triton:
            for jb, g in zip(self.jobs, grads):
                sqgrad_accumulate_ref(g, jb.dim, jb.index, jb.out, jb.fisher)
            return
        if not all(g.is_contiguous() for g in grads):
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        grads = [g.detach() for g in grads] if any(g.requires_grad for g in grads) else grads
        ptrs = [g.data_ptr() for g in grads]
        if ptrs != self._last_ptrs:
            self._call = _call_table(self._plan, grads, self._fishers, self._target_outs, self.device)
            self._last_ptrs = ptrs
        call_t, vecs = self._call
        _launch(self._plan, grads, self._fishers, self._target_outs[0], call_t, vecs, self.device)

    def _raise_mismatch(self, grads: Sequence[torch.Tensor]) -> None:
        if len(grads) != len(self.jobs):
            raise ValueError(f"SqgradPlan.run: got {len(grads)} gradients; wanted {len(self.jobs)}, one per job")
        for i, (g, shape, dtype) in enumerate(zip(grads, self._shapes, self._dtypes)):
            if not isinstance(g, torch.Tensor) or g.shape != shape or g.dtype != dtype or g.device != self.device:
                raise ValueError(
                    f"SqgradPlan.run: gradient {i} is {_describe(g)}; wanted {tuple(shape)} "
                    f"{str(dtype).replace('torch.', '')} on {self.device}, as the plan was built"
                )


def accumulate_slices(grads: Mapping[str, Optional[torch.Tensor]], slices: Sequence[ParamSlice], out: torch.Tensor,
                      fisher: Optional[MutableMapping[str, torch.Tensor]] = None, *, backend: str = "auto") -> None:
    """Accumulate the squared gradients of every slice whose parameter is in ``grads`` into ``out``.

    ``out`` is fp32 ``[num_structures]`` of the group the slices describe (heads of one
    attention, neurons of one FFN). Slices whose parameter has no gradient are skipped.
    ``fisher``, if given, maps parameter names to fp32 buffers of the parameter's shape and
    receives ``+= grad**2`` once per parameter; missing buffers are created (zeros).
    All slices run in one batched call (see :func:`sqgrad_accumulate_many`).
    """
    jobs = []
    fisher_done = set()
    for s in slices:
        g = grads.get(s.name)
        if g is None:
            continue
        if tuple(g.shape) != tuple(s.shape):
            raise ValueError(f"accumulate_slices: grads[{s.name!r}] has shape {tuple(g.shape)}; "
                             f"wanted {tuple(s.shape)} as its ParamSlice says")
        f = None
        if fisher is not None and s.name not in fisher_done:
            f = fisher.get(s.name)
            if f is None:
                f = fisher[s.name] = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            fisher_done.add(s.name)
        jobs.append(SqgradJob(g, s.dim, s.index, out, f))
    sqgrad_accumulate_many(jobs, backend=backend)


# ============================================================================ ghost norms
def _check_ghost(x: torch.Tensor, g: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(g, torch.Tensor) or x.dim() != 3 or g.dim() != 3 \
            or x.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"ghost_sqnorm: x is {_describe(x)} and g is {_describe(g)}; wanted x [B, T, in] and "
            f"g [B, T, out] with the same B and T"
        )
    if x.dtype not in SUPPORTED_DTYPES or g.dtype != x.dtype:
        raise ValueError(f"ghost_sqnorm: x is {x.dtype} and g is {g.dtype}; wanted one dtype of "
                         f"float32, float16, bfloat16 for both")
    if x.device != g.device:
        raise ValueError(f"ghost_sqnorm: x is on {x.device} and g on {g.device}; wanted one device")


def ghost_sqnorm(x: torch.Tensor, g: torch.Tensor, *, backend: str = "auto"
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact per-sample squared gradient norms of a linear layer, summed over the batch.

    With ``W_i = G_i^T X_i`` the weight gradient of sample ``i`` (never materialised):

        rows[j] = sum_i ||W_i[j, :]||^2     cols[c] = sum_i ||W_i[:, c]||^2
        bias[j] = sum_i (sum_t G_i[t, j])^2

    Args:
        x: ``[B, T, in]`` layer inputs per sample.
        g: ``[B, T, out]`` gradients of the loss w.r.t. the layer outputs per sample.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (as for :func:`sqgrad_accumulate`).

    Returns:
        ``(rows [out], cols [in], bias [out])``, fp32. ``rows`` summed over a head's q/k/v
        rows (plus ``bias``) and ``cols`` over its out-projection columns give the true
        empirical-Fisher diagonal per structure.
    """
    _check_ghost(x, g)
    if not _use_triton(x.device, backend):
        return ghost_sqnorm_ref(x, g)
    B, T, n_in = x.shape
    n_out = g.shape[2]
    if _INTERPRETED:
        bj = bc = bt = 16
        warps = 1
    else:
        bj, bc, bt, warps = 64, 64, 32, 4
    nj, nc = triton.cdiv(n_out, bj), triton.cdiv(n_in, bc)
    rows = torch.empty((nc, n_out), dtype=torch.float32, device=x.device)
    cols = torch.empty((nj, n_in), dtype=torch.float32, device=x.device)
    bias = torch.empty(n_out, dtype=torch.float32, device=x.device)
    if B * T == 0:
        return rows.zero_().sum(0), cols.zero_().sum(0), bias.zero_()
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
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
