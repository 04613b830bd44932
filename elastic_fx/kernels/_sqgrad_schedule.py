"""Host-side schedule of :mod:`elastic_fx.kernels.sqgrad`: program tables, buffer layout, offsets.

Takes the jobs of one :func:`~elastic_fx.kernels.sqgrad.sqgrad_accumulate_many` call
(gradient shapes, dtypes, dims, index tensors, outputs); returns the int64 tables the
three kernels read (one record per program, layouts ``P1_FIELDS`` ... ``GJOB_FIELDS``
below, which the kernels index by the same field counts), the fp32 work-buffer layout
and, per call, the element offsets of every tensor from one base per launch. Touches
nothing but its own plan cache (``PLANS``: the last ``PLAN_CACHE_SIZE`` schedules, keyed
by shapes and the identity and version of each index tensor) and the device copies of
the tables it builds.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import triton

from ._dispatch import _INTERPRETED

if TYPE_CHECKING:  # the job record is the op's public type; only its fields are read here
    from .sqgrad import SqgradJob

logger = logging.getLogger(__name__)

# Phase-1 tiles: 16 KiB of gradient per step on a GPU; small tiles under the interpreter,
# which runs every program in Python.
TILE_GPU = {torch.float32: (32, 128), torch.float16: (64, 128), torch.bfloat16: (64, 128)}
TILE_INTERP = (8, 32)
WAVES = 4  # aim for about this many programs per SM in phase 1
GATHER_TILE = 256 if _INTERPRETED else 4096  # BLOCK_S * BLOCK_K of phase 3
REDUCE_TILE = (4, 32) if _INTERPRETED else (8, 512)  # (BLOCK_P, BLOCK_D) of phase 2
PLAN_CACHE_SIZE = 32

# Record layouts of the int64 tables the kernels read (one row per program / job / target).
P1_FIELDS = 9  # job, r0, c0, n_steps, lim_r, lim_c, ld, row_mode, part_offset
P2_FIELDS = 5  # part_base, parts, D, pos_base, d0
P3_FIELDS = 2  # target, s0
TGT_FIELDS = 4  # S, job_begin, job_end, out_stride
GJOB_FIELDS = 3  # pos_base, K, idx_base


@dataclass(frozen=True)
class Layout:
    """A gradient seen as the contiguous matrix ``[R, C]`` the kernels stream."""

    dim: int
    D: int  # size along dim
    outer: int
    row_mode: bool
    R: int
    C: int

    @classmethod
    def of(cls, shape: Tuple[int, ...], dim: int) -> "Layout":
        D = shape[dim]
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1 :])
        if inner > 1:
            return cls(dim, D, outer, True, outer * D, inner)
        return cls(dim, D, outer, False, outer, D)


def check_index_values(index: torch.Tensor, size: int, dim: int, shape: Tuple[int, ...],
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


# ============================================================================ programs and buffer layout
def _tile(dtype: torch.dtype) -> Tuple[int, int]:
    return TILE_INTERP if _INTERPRETED else TILE_GPU[dtype]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: fewest, largest programs run fastest


@dataclass
class Launch:
    """One phase-1 launch: the jobs of one (dtype, has_fisher) pair."""

    dtype: torch.dtype
    has_fisher: bool
    jobs: List[int]
    programs: torch.Tensor  # int64 [P, P1_FIELDS] on the device
    block_r: int
    block_c: int
    ld_multiple_of_16b: bool  # every row stride is a multiple of 16 bytes


class Plan:
    """Programs, buffer layout and index buffer for one set of jobs (shapes + index tensors).

    The fp32 work buffer holds, per job, its partial sums ``[parts, D]`` (phase 1), then,
    for jobs with more than one part, their per-position sums ``[D]`` (phase 2). Phase 3
    reads each job's per-position sums at ``pos_base`` (= its partials when ``parts == 1``).
    """

    def __init__(self, layouts: List[Layout], dtypes: List[torch.dtype], has_fisher: List[bool],
                 indices: List[torch.Tensor], targets: List[int], target_sizes: List[int],
                 target_strides: List[int], device: torch.device, steps_per_program: Optional[int]):
        self.index_refs: List[weakref.ref] = []  # set by get_plan: the caller's index tensors
        self.device = device
        part_base, parts, cursor = self._build_phase1(layouts, dtypes, has_fisher, steps_per_program)
        pos_base, cursor = self._build_reduce(layouts, part_base, parts, cursor)
        self.buffer_size = max(cursor, 1)
        self._build_gather(indices, targets, target_sizes, target_strides, parts, pos_base)

    def _build_phase1(self, layouts: List[Layout], dtypes: List[torch.dtype], has_fisher: List[bool],
                      steps_per_program: Optional[int]) -> Tuple[List[int], List[int], int]:
        """One launch per (dtype, fisher) pair; returns each job's partial base and part count."""
        n = len(layouts)
        groups: Dict[Tuple[torch.dtype, bool], List[int]] = {}
        for j in range(n):
            if layouts[j].R * layouts[j].C > 0:
                groups.setdefault((dtypes[j], has_fisher[j]), []).append(j)
        part_base, parts, cursor = [0] * n, [0] * n, 0
        self.launches: List[Launch] = []
        for (dtype, fish), jobs in groups.items():
            br, bc = _tile(dtype)
            tiles = sum(math.ceil(layouts[j].R / br) * math.ceil(layouts[j].C / bc) for j in jobs)
            steps = steps_per_program or max(1, math.ceil(tiles / (WAVES * _num_sms(self.device))))
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
            self.launches.append(Launch(
                dtype, fish, jobs, torch.from_numpy(table).to(self.device), br, bc,
                all(layouts[j].C * esize % 16 == 0 for j in jobs),
            ))
        return part_base, parts, cursor

    def _build_reduce(self, layouts: List[Layout], part_base: List[int], parts: List[int],
                      cursor: int) -> Tuple[List[int], int]:
        """Programs summing the partial rows of jobs with more than one; returns pos_base per job."""
        pos_base = list(part_base)
        records = []
        block_d = REDUCE_TILE[1]
        for j, lay in enumerate(layouts):
            if parts[j] > 1:
                pos_base[j] = cursor
                records.extend((part_base[j], parts[j], lay.D, cursor, d0) for d0 in range(0, lay.D, block_d))
                cursor += lay.D
        self.reduce_programs = torch.tensor(records, dtype=torch.int64, device=self.device).reshape(-1, P2_FIELDS)
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
        self.block_s = max(1, min(triton.next_power_of_2(max_s), GATHER_TILE // self.block_k))
        progs = [(t, s0) for t in by_target for s0 in range(0, target_sizes[t], self.block_s)]
        idx = torch.cat(flat_idx) if flat_idx else torch.zeros(1, dtype=torch.int64)
        if int(idx.max()) < 2**31 - 1 and idx_cursor < 2**31 - 1:
            idx = idx.to(torch.int32)
        self.index_buffer = idx.to(self.device)
        self.gather_programs = torch.tensor(progs, dtype=torch.int64, device=self.device).reshape(-1, P3_FIELDS)
        self.targets = torch.tensor(tgts, dtype=torch.int64, device=self.device).reshape(-1, TGT_FIELDS)
        self.gather_jobs = torch.tensor(gjobs, dtype=torch.int64, device=self.device).reshape(-1, GJOB_FIELDS)

    @staticmethod
    def _phase1_records(j: int, lay: Layout, br: int, bc: int, steps: int, base: int) -> Tuple[np.ndarray, int]:
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
        rec = np.empty((blk.size, P1_FIELDS), dtype=np.int64)
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


PLANS: "OrderedDict[tuple, Plan]" = OrderedDict()


def get_plan(jobs: List[SqgradJob], dims: List[int], targets: List[int], target_outs: List[torch.Tensor],
             device: torch.device, steps_per_program: Optional[int]) -> Plan:
    """The cached schedule of these jobs, or a new one (which checks every index value)."""
    key = (
        str(device),
        steps_per_program,
        tuple(
            (tuple(jb.grad.shape), d, jb.grad.dtype, jb.fisher is not None, id(jb.index), jb.index._version, t)
            for jb, d, t in zip(jobs, dims, targets)
        ),
        tuple((o.numel(), o.stride(0) if o.numel() else 1) for o in target_outs),
    )
    plan = PLANS.get(key)
    if plan is not None and plan.alive([jb.index for jb in jobs]):
        PLANS.move_to_end(key)
        return plan
    indices = []
    for jb, d in zip(jobs, dims):
        ix = jb.index.detach().to("cpu", torch.int64)
        check_index_values(ix, jb.grad.shape[d], d, tuple(jb.grad.shape))
        indices.append(ix)
    plan = Plan(
        [Layout.of(tuple(jb.grad.shape), d) for jb, d in zip(jobs, dims)],
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
    PLANS[key] = plan
    if len(PLANS) > PLAN_CACHE_SIZE:
        PLANS.popitem(last=False)
    logger.debug("sqgrad: built a plan for %d jobs on %s", len(jobs), device)
    return plan


def _elements(t: torch.Tensor) -> set:
    """Byte addresses of the fp32 entries of a 1-D tensor."""
    return {t.data_ptr() + 4 * i * t.stride(0) for i in range(t.numel())}


def check_disjoint(tensors: Sequence[torch.Tensor], what: str) -> None:
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


# ============================================================================ per call
def group_targets(jobs: Sequence[SqgradJob]) -> Tuple[List[int], List[torch.Tensor]]:
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
    check_disjoint(target_outs, "out")
    return targets, target_outs


def call_table(plan: Plan, grads: Sequence[torch.Tensor], fishers: Sequence[Optional[torch.Tensor]],
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
