"""Several processes, one result: the gradient pass and the search on ``torch.distributed``.

elastic_fx writes no scheduler of its own. It runs under ``torchrun`` (or any launcher
that sets the ``torch.distributed`` environment variables ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and uses the process group PyTorch
users already run::

    torchrun --nproc-per-node 8 -m elastic_fx.cli prune timm:vit_large_patch16_224 \\
        --images calib/ --out vit_l.efx --checkpoint-dir ckpt/

    ctx = efx.distributed.current()      # DistContext(rank=3, world_size=8, ...)
    ctx.is_main                          # rank 0 writes checkpoints and outputs

What is split, and why the result does not depend on the number of processes
---------------------------------------------------------------------------
* **Gradient pass** (data-parallel): the images are cut into batches exactly as one
  process cuts them; rank ``r`` takes a CONTIGUOUS block of whole batches (rank 0 the
  first block, rank 1 the next ...). DINO crops are drawn from one seeded generator in
  batch order, so a rank first advances the generator past the batches before its
  block: every image gets the crops it gets in a single process. Each rank keeps the
  squared-gradient buffer of each of its batches, then :meth:`DistContext.ordered_sum`
  adds them in global batch order along a chain ``rank 0 -> 1 -> ... -> N-1``, which is
  the very sequence of additions a single process performs. The scores are therefore
  bit-for-bit those of one process (in fp32, as stored), not just close, as long as each
  batch's gradients are computed bit-identically (same hardware, same kernels).
* **Search** (candidate-parallel): rank 0 owns the xNES state, asks, and broadcasts the
  candidates; the ``(candidate, sparsity)`` pairs are cut into contiguous slices aligned
  to the pair chunks of the masked forward, so every forward runs exactly the pairs and
  images it runs in one process; the per-pair fitness values are gathered in order and
  rank 0 tells. The xNES trajectory is bit-for-bit that of one process with the same seed.
* **Checkpoints and outputs** are written by rank 0 only (atomically). A checkpoint
  holds global state only, so a run resumes with any number of processes.

Failures
--------
Every collective runs on a gloo process group with a timeout (``ELASTIC_FX_DIST_TIMEOUT``
seconds, default 600). A rank that dies closes its connections and the others stop at
their next collective at once; a rank that hangs is given up on after the timeout. Either
way the survivors raise :class:`DistributedError` naming the rank(s) that stopped
answering and the last good checkpoint. An :class:`~elastic_fx.errors.ElasticFxError`
raised on one rank (bad input, NaN gradients) is raised on every rank with the same
message, so all processes stop together and say the same thing. torchrun stops the
survivors of a failed rank with SIGTERM; :func:`raise_on_sigterm` turns that into the
same kind of message. Ranks that were given different weights or images are refused
before any work (:meth:`DistContext.check_same` on exact checksums).

The default process group is created here only when none exists: ``gloo`` on a CPU-only
machine, ``cpu:gloo,cuda:nccl`` when CUDA is present (NCCL for the user's GPU
collectives, gloo for elastic_fx's small control messages). A group created by the user
is reused; when it has no gloo backend, a gloo side group is added for elastic_fx.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.distributed as dist

from .errors import DistributedError, ElasticFxError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SAME_IMAGES_HINT",
    "SAME_WEIGHTS_HINT",
    "ENV_TIMEOUT",
    "DistContext",
    "DistributedError",
    "checksums",
    "current",
    "raise_on_sigterm",
    "shutdown",
    "split",
    "timeout_seconds",
]

T = TypeVar("T")

#: Environment variable: seconds a collective may wait for the other ranks.
ENV_TIMEOUT = "ELASTIC_FX_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
#: Seconds the survivors of a failure wait for each other before naming the missing ranks.
_GRACE_S = 1.0
_STORE_PREFIX = "elastic_fx/answered"


#: What to do when the ranks disagree on their inputs.
SAME_WEIGHTS_HINT = (
    "Load pretrained weights or a checkpoint on every rank, or seed the random initialisation identically "
    "(torch.manual_seed) before building the model."
)
SAME_IMAGES_HINT = (
    "Give every rank the same image folder (the same path and files on every node) or the same tensor."
)


# ============================================================================ helpers
def timeout_seconds() -> float:
    """The collective timeout: ``$ELASTIC_FX_DIST_TIMEOUT`` seconds, default 600."""
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r}; expected a positive number of seconds, e.g. 600.")
    return value


def split(n: int, parts: int, unit: int = 1) -> List[Tuple[int, int]]:
    """``parts`` contiguous ranges ``[lo, hi)`` covering ``range(n)`` in order.

    Boundaries fall on multiples of ``unit`` (the last range ends at ``n``); the
    ``ceil(n / unit)`` units are dealt out as evenly as possible, earlier parts taking
    the extra ones. Parts beyond the number of units get empty ranges.
    """
    if n < 0 or parts < 1 or unit < 1:
        raise ValueError(f"split needs n >= 0, parts >= 1 and unit >= 1, got {n}, {parts}, {unit}")
    units = -(-n // unit)
    base, extra = divmod(units, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + base + (1 if r < extra else 0)
        out.append((min(lo * unit, n), min(hi * unit, n)))
        lo = hi
    return out


def _env_world() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (1 process if unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise DistributedError(
            f"the torch.distributed environment is malformed ({e}); expected integers in RANK, WORLD_SIZE and "
            "LOCAL_RANK. Launch with torchrun, which sets them."
        ) from None
    return rank, world, local


# ============================================================================ context
@dataclass
class DistContext:
    """Where this process stands in a run of ``world_size`` processes.

    Attributes:
        rank: this process's rank (0 is the main process).
        world_size: number of processes (1: no distribution, every method is local).
        local_rank: rank on this node; picks the GPU ``cuda:local_rank``.
        group: the gloo process group elastic_fx talks on (``None``: the default group).
        timeout_s: how long a collective may wait before the run stops.
        recovery: what to tell the user after a failure (set by the search: the last
            good checkpoint).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    recovery: str = "no checkpoint was written yet"

    @property
    def enabled(self) -> bool:
        """True when there are other processes to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints and outputs."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"

    # ------------------------------------------------------------------ placement
    def device(self, requested: Union[str, torch.device, None] = None) -> Optional[torch.device]:
        """The device this rank computes on.

        ``"cuda"`` without an index means ``cuda:local_rank`` when distributed (one GPU
        per process); an explicit index or ``"cpu"`` is kept; ``None`` stays ``None``
        (the caller's default).
        """
        if requested is None:
            return None
        dev = torch.device(requested)
        if self.enabled and dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    def span(self, n: int, unit: int = 1) -> Tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of ``range(n)`` (see :func:`split`)."""
        return split(n, self.world_size, unit)[self.rank]

    # ------------------------------------------------------------------ collectives
    def broadcast_object(self, obj: Any = None, src: int = 0, what: str = "sharing state") -> Any:
        """``obj`` from rank ``src`` on every rank (pickled; for small objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        self._guarded(what, lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return box[0]

    def all_gather_object(self, obj: Any, what: str = "gathering results") -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        self._guarded(what, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def gather_cat(self, t: torch.Tensor, what: str = "gathering fitness values") -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0 in rank order (result on ``t``'s device)."""
        if not self.enabled:
            return t
        parts = self.all_gather_object(t.detach().cpu(), what)
        return torch.cat(parts).to(t.device)

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.enabled:
            self._guarded(what, lambda: dist.barrier(group=self.group))

    def ordered_sum(self, parts: Sequence[torch.Tensor], out: torch.Tensor,
                    what: str = "summing the score buffers") -> torch.Tensor:
        """``out += p`` for every rank's ``parts``, rank 0's first, in list order; on every rank.

        The additions run one after another along a chain ``0 -> 1 -> ... -> N-1`` (each
        rank receives the running total, adds its parts, passes it on; the last rank
        broadcasts it), so the floating-point result is exactly that of one process
        adding all parts in the same order. Cheap: ``N - 1`` hops of one buffer, plus a
        broadcast; the buffers are one value per head / neuron.
        """
        if not self.enabled:
            for p in parts:
                out += p
            return out
        host = torch.empty(out.shape, dtype=out.dtype)
        if self.rank > 0:
            self._guarded(what, lambda: dist.recv(host, src=self.rank - 1, group=self.group))
            out.copy_(host)
        for p in parts:
            out += p
        host.copy_(out)
        last = self.world_size - 1
        if self.rank < last:
            self._guarded(what, lambda: dist.send(host, dst=self.rank + 1, group=self.group))
        self._guarded(what, lambda: dist.broadcast(host, src=last, group=self.group))
        out.copy_(host)
        return out

    def check_same(self, value: Any, what: str, hint: str) -> None:
        """Raise on every rank if ``value`` (e.g. :func:`checksums` of the model) differs from rank 0's."""
        if not self.enabled:
            return
        values = self.all_gather_object(value, f"comparing the {what}")
        for r, theirs in enumerate(values[1:], start=1):
            if theirs != values[0]:
                where = _first_difference(values[0], theirs)
                raise DistributedError(
                    f"rank {r} holds different {what} than rank 0{where}; every rank must work on the same "
                    f"{what}. {hint}"
                )

    # ------------------------------------------------------------------ error protocol
    def main_then_share(self, fn: Callable[[], T], what: str = "sharing rank 0's result") -> T:
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank.

        An :class:`ElasticFxError` raised by ``fn`` is raised on every rank; another
        exception is raised as is on rank 0 and as a :class:`DistributedError` elsewhere.
        """
        if not self.enabled:
            return fn()
        if not self.is_main:
            kind, value = self.broadcast_object(None, 0, what)
            if kind == "error":
                raise value
            return value
        try:
            value = fn()
        except ElasticFxError as e:
            self.broadcast_object(("error", e), 0, what)
            raise
        except Exception as e:
            self.broadcast_object(("error", DistributedError(f"rank 0 failed while {what}: {type(e).__name__}: {e}")),
                                  0, what)
            raise
        self.broadcast_object(("ok", value), 0, what)
        return value

    def all_or_nothing(self, fn: Callable[[], T], what: str = "computing") -> T:
        """Run ``fn`` on every rank; if any rank fails, every rank raises the lowest rank's error.

        Ranks hold consecutive pieces of the work in order, so the lowest failing rank
        holds the first failure a single process would have met.
        """
        if not self.enabled:
            return fn()
        own: Optional[BaseException] = None
        shared: Optional[ElasticFxError] = None
        result: Any = None
        try:
            result = fn()
        except ElasticFxError as e:
            own, shared = e, e
        except Exception as e:
            own, shared = e, DistributedError(f"rank {self.rank} failed while {what}: {type(e).__name__}: {e}")
        statuses = self.all_gather_object(shared, what)
        for r, err in enumerate(statuses):
            if err is not None:
                if r == self.rank and own is not None:
                    raise own
                raise err
        return result

    def _guarded(self, what: str, op: Callable[[], Any]) -> Any:
        """Run a collective; turn a dead or silent peer into an instructive error."""
        try:
            return op()
        except (RuntimeError, ConnectionError, TimeoutError) as e:  # DistBackendError is a RuntimeError
            raise DistributedError(self._failure_message(what, e)) from e

    def _failure_message(self, what: str, cause: BaseException) -> str:
        missing = self._unanswered()
        if missing is None:
            who = "another rank"
        else:
            who = ("rank " if len(missing) == 1 else "ranks ") + ", ".join(str(r) for r in missing)
        detail = _first_sentence(str(cause)) or type(cause).__name__
        return (
            f"{who} stopped responding while {what} (rank {self.rank} of {self.world_size} saw: {detail}). "
            f"The run stops here; {self.recovery}. A dead rank is reported at once; a hanging one after "
            f"{ENV_TIMEOUT}={self.timeout_s:g} s."
        )

    def _unanswered(self) -> Optional[List[int]]:
        """Best effort: the ranks that do not check in on the rendezvous store within a grace period."""
        store = _default_store()
        if store is None:
            return None
        try:
            store.set_timeout(datetime.timedelta(seconds=_GRACE_S + 1))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # keys outlive a torchrun restart
            keys = [f"{_STORE_PREFIX}/{attempt}/{r}" for r in range(self.world_size)]
            store.set(keys[self.rank], "1")
            deadline = time.monotonic() + _GRACE_S
            while True:
                missing = [r for r, k in zip(range(self.world_size), keys) if not store.check([k])]
                if not missing or time.monotonic() > deadline:
                    return missing or None
                time.sleep(0.05)
        except Exception:  # the store lived in the dead process, or is unreachable
            return None


def checksums(obj: Any) -> Any:
    """Exact, hardware-independent fingerprints of tensors: integer sums of their bits.

    A module gives ``[(name, checksum)]`` over its parameters and buffers, a tensor one
    integer, a list or tuple a list. Integer addition is associative, so the value does
    not depend on the device or on how the sum is split; two random initialisations or
    two different image sets differ with near certainty.
    """
    if isinstance(obj, torch.nn.Module):
        named = list(obj.named_parameters()) + list(obj.named_buffers())
        return [(name, checksums(t)) for name, t in named]
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().contiguous().reshape(-1)
        if flat.numel() == 0:
            return 0
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        return (int(flat.view(as_int).sum(dtype=torch.int64)), tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, (list, tuple)):
        return [checksums(x) for x in obj]
    return obj


def _first_difference(ours: Any, theirs: Any) -> str:
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return f" ({len(theirs)} entries instead of {len(ours)})"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                name = a[0] if isinstance(a, tuple) and a and isinstance(a[0], str) else f"entry {i}"
                return f" (first difference: {name})"
    return ""


def _first_sentence(text: str) -> str:
    """The gist of a backend error: no source location, the first sentence, at most 160 characters."""
    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 160 else text[:157] + "..."


def _default_store() -> Any:
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None or not dist.is_initialized():
        return None
    try:
        return getter()
    except Exception:
        return None


# ============================================================================ the current context
_SINGLE = DistContext()
_context: Optional[DistContext] = None
_owns_group = False


def current(distributed: Optional[bool] = None, device: Union[str, torch.device, None] = None) -> DistContext:
    """The distributed context of this process, initialising the process group if needed.

    Args:
        distributed: ``None`` (auto): distributed when a process group of more than one
            process exists or the launcher's environment says ``WORLD_SIZE > 1`` (torchrun);
            ``False``: this process works alone; ``True``: require a distributed launch.
        device: where this process will compute; a CPU device means gloo only (no NCCL).

    Returns:
        The cached :class:`DistContext` (a single-process one when not distributed).

    Raises:
        DistributedError: ``distributed=True`` without a launcher, or the rendezvous failed.
    """
    global _context, _owns_group
    if distributed is False:
        return _SINGLE
    if _context is not None and dist.is_available() and dist.is_initialized():
        return _context
    _context = None
    if not dist.is_available():
        if distributed:
            raise DistributedError("this PyTorch build has no torch.distributed; install a build with it")
        return _SINGLE
    timeout = timeout_seconds()
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        if world == 1:
            return _SINGLE
        group = None if "gloo" in str(dist.get_backend()) else dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        _context = DistContext(rank, world, local, group, timeout)
        return _context
    rank, world, local = _env_world()
    if world <= 1:
        if distributed:
            raise DistributedError(
                "distributed=True but this process was not started by a distributed launcher (WORLD_SIZE is "
                f"{os.environ.get('WORLD_SIZE', 'unset')}); run it with torchrun --nproc-per-node N ..."
            )
        return _SINGLE
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not os.environ.get("TORCHELASTIC_USE_AGENT_STORE"):
        raise DistributedError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun, which sets the "
            "rendezvous address, or set MASTER_ADDR and MASTER_PORT yourself"
        )
    on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    backend = "cpu:gloo,cuda:nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(local % torch.cuda.device_count())
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:
        raise DistributedError(
            f"rank {rank} of {world} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({type(e).__name__}: {e}); check that "
            f"every rank was started and can reach rank 0, or raise {ENV_TIMEOUT}"
        ) from e
    _owns_group = True
    atexit.register(shutdown)
    _context = DistContext(rank, world, local, None, timeout)
    log.info("distributed: rank %d of %d (local rank %d), backend %s, timeout %g s", rank, world, local, backend,
             timeout)
    return _context


def raise_on_sigterm() -> Any:
    """Turn SIGTERM into a :class:`DistributedError` that names the last good checkpoint.

    When one rank fails, torchrun stops the others with SIGTERM, usually before their own
    collectives notice; without a handler they die silently. For command-line programs
    running distributed: call once, from the main thread, before the work starts.
    Returns the previous handler (to restore it with ``signal.signal``).
    """

    def handler(signum: int, frame: Any) -> None:
        ctx = _context if _context is not None else _SINGLE
        raise DistributedError(
            f"rank {ctx.rank} was stopped by the launcher (signal {signum}), usually because another rank failed "
            f"(the launcher's report names it); {ctx.recovery}"
        )

    return signal.signal(signal.SIGTERM, handler)


def shutdown() -> None:
    """Destroy the process group if elastic_fx created it (registered with ``atexit``)."""
    global _context, _owns_group
    if _owns_group and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a dead peer; the process is ending anyway
            pass
    _owns_group = False
    _context = None
