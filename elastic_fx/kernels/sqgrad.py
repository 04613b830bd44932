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
and index tensors and cached (:mod:`elastic_fx.kernels._sqgrad_schedule`), so a
training-style loop that calls it step after step with fresh gradients of the same shapes
rebuilds nothing.

Dispatch
--------
See :mod:`elastic_fx.kernels._dispatch`: CUDA tensors go to Triton, CPU tensors to
:func:`sqgrad_accumulate_ref`. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
only (they address memory by raw host offsets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import describe, device_context, use_triton
from ._sqgrad_schedule import (
    REDUCE_TILE,
    Plan,
    call_table,
    check_disjoint,
    check_index_values,
    get_plan,
    group_targets,
)

__all__ = [
    "SqgradJob",
    "sqgrad_accumulate",
    "sqgrad_accumulate_many",
    "sqgrad_accumulate_ref",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PHASE1_WARPS = 8  # phase-1 launches; the tiles are chosen in _sqgrad_schedule


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
    prog_ptr,  # int64 [num_programs, 9]: one record per program (see _sqgrad_schedule.P1_FIELDS)
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
    prog_ptr,  # int64 [num_programs, 5]: one record per program (see _sqgrad_schedule.P2_FIELDS)
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


def _check_job(grad: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor,
               fisher: Optional[torch.Tensor], where: str = "sqgrad") -> int:
    """Validate one job's shapes, dtypes and devices (not the index values); return dim >= 0."""
    if not isinstance(grad, torch.Tensor) or grad.dtype not in SUPPORTED_DTYPES or grad.dim() == 0:
        raise ValueError(
            f"{where}: grad is {describe(grad)}; wanted a tensor with at least one dimension "
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
        raise ValueError(f"{where}: index is {describe(index)}; wanted an integer tensor [num_structures, k]")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 1:
        raise ValueError(f"{where}: out is {describe(out)}; wanted a 1-D float32 tensor [num_structures]")
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
                f"{where}: fisher is {describe(fisher)}; wanted float32 of grad's shape "
                f"{tuple(grad.shape)} on {grad.device}"
            )
    return dim


# ============================================================================ reference
def sqgrad_accumulate_ref(grad: torch.Tensor, dim: int, index: torch.Tensor, out: torch.Tensor,
                          fisher: Optional[torch.Tensor] = None) -> None:
    """Pure-PyTorch oracle and CPU path of :func:`sqgrad_accumulate` (same contract)."""
    dim = _check_job(grad, dim, index, out, fisher)
    check_index_values(index, grad.shape[dim], dim, tuple(grad.shape))
    sq = grad.detach().float().square()
    if fisher is not None:
        fisher.add_(sq)
    others = [d for d in range(grad.dim()) if d != dim]
    per_position = sq.sum(dim=others) if others else sq
    out.add_(per_position[index.to(device=per_position.device, dtype=torch.long)].sum(dim=1))


# ============================================================================ launchers
def _launch(plan: Plan, grads: Sequence[torch.Tensor], fishers: Sequence[Optional[torch.Tensor]],
            out0: torch.Tensor, call_t: torch.Tensor, vecs: Sequence[int], device: torch.device) -> None:
    """Phase 1 per (dtype, fisher) launch, then the reduce and gather phases."""
    n = len(grads)
    buf = torch.empty(plan.buffer_size, dtype=torch.float32, device=device)
    with device_context(device):
        for launch, vec in zip(plan.launches, vecs):
            g0, f0 = grads[launch.jobs[0]], fishers[launch.jobs[0]]
            _sqgrad_partial_kernel[(launch.programs.shape[0],)](
                g0, buf if f0 is None else f0, buf, call_t, launch.programs, n,
                BLOCK_R=launch.block_r, BLOCK_C=launch.block_c, HAS_FISHER=launch.has_fisher, VEC=vec,
                num_warps=_PHASE1_WARPS,
            )
        if plan.reduce_programs.shape[0]:
            _sqgrad_reduce_kernel[(plan.reduce_programs.shape[0],)](
                buf, plan.reduce_programs, BLOCK_P=REDUCE_TILE[0], BLOCK_D=REDUCE_TILE[1], num_warps=4,
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
    on one device. See :func:`sqgrad_accumulate` for the arguments. The schedule is cached
    per set of shapes and index tensors, so calling it step after step with fresh gradients
    rebuilds nothing.
    """
    jobs = list(jobs)
    if not jobs:
        return
    dims, device = _check_jobs(jobs)
    if not use_triton(device, backend, op="sqgrad", interpreter_cpu_only=True):
        for jb in jobs:
            sqgrad_accumulate_ref(jb.grad, jb.dim, jb.index, jb.out, jb.fisher)
        return
    _run_triton(jobs, dims, device, steps_per_program)


def _run_triton(jobs: List[SqgradJob], dims: List[int], device: torch.device,
                steps_per_program: Optional[int]) -> None:
    """Check memory layout, fetch the cached schedule, build the per-call offsets and launch."""
    targets, target_outs = group_targets(jobs)
    grads = [jb.grad.detach() if jb.grad.is_contiguous() else jb.grad.detach().contiguous() for jb in jobs]
    fishers = [None if jb.fisher is None else jb.fisher if jb.fisher.is_contiguous() else jb.fisher.contiguous()
               for jb in jobs]
    check_disjoint([f.reshape(-1) for f in fishers if f is not None], "fisher")
    plan = get_plan(jobs, dims, targets, target_outs, device, steps_per_program)
    call_t, vecs = call_table(plan, grads, fishers, target_outs, device)
    _launch(plan, grads, fishers, target_outs[0], call_t, vecs, device)
    for jb, f in zip(jobs, fishers):
        if f is not None and f is not jb.fisher:
            jb.fisher.copy_(f)
