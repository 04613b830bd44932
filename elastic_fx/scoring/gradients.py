"""The gradient pass: Σ g² per attention head and FFN neuron over batches of images.

Takes a traced GraphModule, its :class:`~elastic_fx.structures.StructureMap`, an
:class:`Objective` (``fn(model, batch) -> scalar loss``, built by :mod:`.objective`), the
data and a :class:`PassConfig`; returns per-block fp32 score sums ``(heads, neurons,
stats)``. For the duration of the pass it may move the model to ``cfg.device``, switch
every module to eval mode and change ``requires_grad`` flags; all of it is restored
afterwards, also on errors. ``.grad`` attributes are never touched.

Only parameters named by a prunable structure get ``requires_grad``; each batch runs
forward, ``torch.autograd.grad`` and one batched call of the fused squared-gradient
kernel (:func:`~elastic_fx.kernels.sqgrad.sqgrad_accumulate_many`) for every structure
of the model. On CUDA the forward and backward run under bf16 autocast by default
(``PassConfig.amp_dtype``; float32 elsewhere): the weights stay fp32, so their gradients
come out in fp32, and squares and sums are accumulated in fp32 whatever the dtype.
Gradients are never stored beyond one batch. Every batch is checked (one device sync): a
NaN or inf in the loss or a gradient raises :class:`~elastic_fx.errors.NumericalError`
naming the batch, its images and the parameter, before anything reaches the totals.

* ``mode="per-batch"``: the gradient of each batch's (mean) loss, squared, summed over
  the structure's entries and over batches.
* ``mode="per-sample"``: the empirical Fisher, each image's own gradient squared. By the
  ghost-norm kernel (:func:`elastic_fx.kernels.ghost_sqnorm.ghost_sqnorm`, per-sample norms
  without per-sample gradients, :class:`_GhostPlan`) when every scored parameter is the
  weight or bias of an ``nn.Linear`` called once as a module in the graph and the
  objective knows its per-image row layout; otherwise by micro-batches of one image.
  Graphs captured by ``torch.export`` inline their linear layers as ``aten.linear`` on
  ``get_attr`` weights, which module hooks cannot see, and ``nn.MultiheadAttention``
  keeps its in-projection inside the module: both use micro-batches.

With a distributed context, each rank runs a contiguous block of whole batches and the
per-batch buffers are added in global batch order, so every rank returns the
single-process scores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from .._precision import compute_dtype
from ..distributed import DistContext, current
from ..errors import ConfigError, NumericalError, ScoresError
from ..kernels.ghost_sqnorm import ghost_sqnorm
from ..kernels.sqgrad import SqgradJob, sqgrad_accumulate_many
from ..structures import StructureMap
from .dino import LossFn
from ._groups import ScoredGroup, Scores, scored_groups, scored_parameters

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "PER_SAMPLE_METHODS",
    "Objective",
    "PassConfig",
    "batch_gradients",
    "check_finite_grads",
    "describe_batch",
    "device_of",
    "fisher_pass",
    "pass_dtype",
    "run_batches",
    "target_device",
]

MODES = ("per-batch", "per-sample")
PER_SAMPLE_METHODS = ("auto", "ghost", "loop")


# ============================================================================ set-up
@dataclass
class PassConfig:
    """Settings of one gradient pass (see :func:`~elastic_fx.scoring.local.local_scores` for their meaning).

    ``amp_dtype``: the autocast dtype; None is bf16 on CUDA and float32 (no autocast)
    elsewhere (:func:`pass_dtype` resolves it for a device).

    Raises:
        ConfigError: an option has a value outside what it accepts.
    """

    batch_size: int = 16
    mode: str = "per-batch"
    seed: int = 0
    num_images: int = 1000
    device: Optional[torch.device] = None
    progress: bool = True
    amp_dtype: Optional[torch.dtype] = None
    backend: str = "auto"
    per_sample: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ConfigError(f"num_images must be a positive integer, got {self.num_images!r}.")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.per_sample not in PER_SAMPLE_METHODS:
            raise ConfigError(f"per_sample must be one of {PER_SAMPLE_METHODS}, got {self.per_sample!r}.")
        if self.backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"backend must be 'auto', 'triton' or 'torch', got {self.backend!r}.")
        if self.amp_dtype is not None:
            compute_dtype("cpu", self.amp_dtype, what="amp_dtype")  # refuses what no device computes in


@dataclass
class Objective:
    """``fn(model, batch) -> loss``, what it is called, and how batch rows map to images.

    ``views`` is set when the loss is a mean over images of per-image terms and the
    module ``module`` receives ``views * B`` rows laid out view-major (row ``v * B + b``
    belongs to image ``b``); the ghost-norm path needs it. ``None``: unknown layout.
    """

    fn: LossFn
    name: str
    method: str
    module: Optional[nn.Module] = None
    views: Optional[int] = None
    extra: dict = field(default_factory=dict)
    #: ``skip(n)`` advances the loss's random state exactly as one call on ``n`` images
    #: would, without computing anything (a rank skipping the batches before its shard).
    skip: Optional[Callable[[int], None]] = None


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ============================================================================ buffers and batches
class _Buffers:
    """Flat fp32 accumulators, one view per group, for the totals and one batch.

    ``record=True`` (a distributed pass) keeps every batch's buffer instead of adding it
    to the total, so that the ranks can add them later in global batch order.
    """

    def __init__(self, groups: Sequence[ScoredGroup], device: torch.device, record: bool = False) -> None:
        sizes = [g.size for g in groups]
        self.total = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        self.batch = torch.zeros_like(self.total)
        self.steps: Optional[List[torch.Tensor]] = [] if record else None
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.spans = list(zip(offsets[:-1], offsets[1:]))
        self.batch_views = [self.batch[a:b] for a, b in self.spans]
        # index tensors on the device, kept alive so the kernel's schedule cache stays valid
        self.index = {id(s): s.index.to(device) for g in groups for s in g.slices}

    def commit(self) -> None:
        """The checked batch buffer joins the totals (or the record of batches)."""
        if self.steps is None:
            self.total += self.batch
        else:
            self.steps.append(self.batch.clone())

    def split(self, flat: torch.Tensor, groups: Sequence[ScoredGroup]) -> Scores:
        """``flat`` cut into per-group copies: ``(heads, neurons)`` by block."""
        heads, neurons = {}, {}
        for g, (a, b) in zip(groups, self.spans):
            (heads if g.kind == "heads" else neurons)[g.block] = flat[a:b].clone()
        return heads, neurons


def _batches(data: Any, batch_size: int) -> Iterator[Tuple[int, int, Any, int]]:
    """``(batch index, first image, batch, images in it)`` over a tensor, a list or (images, labels)."""
    if isinstance(data, tuple):
        x, y = data
        for bi, start in enumerate(range(0, len(x), batch_size)):
            xb = x[start:start + batch_size]
            yield bi, start, (xb, y[start:start + batch_size]), len(xb)
        return
    for bi, start in enumerate(range(0, len(data), batch_size)):
        b = data[start:start + batch_size]
        yield bi, start, b, len(b)


def _take(batch: Any, j: int) -> Any:
    """Image ``j`` of a batch, as a batch of one."""
    if isinstance(batch, tuple):
        return tuple(_take(t, j) for t in batch)
    if isinstance(batch, torch.Tensor):
        return batch[j:j + 1]
    return [batch[j]]


# ============================================================================ the pass
@contextlib.contextmanager
def _scoring_state(gm: nn.Module, params: Mapping[str, nn.Parameter], device: Optional[torch.device]):
    """Gradients only for ``params``, eval mode, optional device move; everything restored after."""
    flags = {p: p.requires_grad for p in gm.parameters()}
    modes = {m: m.training for m in gm.modules()}
    home = device_of(gm)
    moved = device is not None and torch.device(device) != home
    try:
        if moved:
            gm.to(device)
        for p in flags:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for m in modes:  # attribute, not .eval(): torch.export modules refuse eval()
            m.training = False
        with torch.enable_grad():
            yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for m, t in modes.items():
            m.training = t
        if moved:
            gm.to(home)


def pass_dtype(cfg: PassConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype of the pass on ``device``: ``cfg.amp_dtype``, else bf16 on CUDA and float32."""
    return compute_dtype(device, cfg.amp_dtype, what="amp_dtype")


def _amp(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _jobs(groups: Sequence[ScoredGroup], bufs: _Buffers, grads: Mapping[str, torch.Tensor]) -> List[SqgradJob]:
    jobs = []
    for g, out in zip(groups, bufs.batch_views):
        for s in g.slices:
            gr = grads.get(s.name)
            if gr is not None:
                jobs.append(SqgradJob(gr, s.dim, bufs.index[id(s)], out))
    return jobs


def describe_batch(bi: int, start: int, n: int) -> str:
    """How error messages name a batch: its index and the images in it."""
    return f"batch {bi} (image {start})" if n == 1 else f"batch {bi} (images {start}-{start + n - 1})"


def _raise_nonfinite(what: str, loss: torch.Tensor, grads: Mapping[str, Optional[torch.Tensor]],
                     amp_dtype: Optional[torch.dtype]) -> None:
    """Name the first non-finite thing: the loss, a gradient, or a squared gradient that overflowed."""
    default = " (the default on CUDA)" if amp_dtype == torch.bfloat16 else ""
    hint = (f"no score was changed. The pass ran under {str(amp_dtype).replace('torch.', '')} autocast{default}: "
            "run it in float32 (amp_dtype=torch.float32), and check the images for NaN/inf"
            if amp_dtype not in (None, torch.float32) else
            "no score was changed. Check the images and the model's weights for NaN/inf")
    if not torch.isfinite(loss.detach()).all():
        raise NumericalError(f"the loss of {what} is {loss.detach().float().item()}; {hint}.")
    for name, g in grads.items():
        if g is not None and not torch.isfinite(g).all():
            kind = "NaN" if torch.isnan(g).any() else "inf"
            raise NumericalError(f"the gradient of {what} holds {kind} in parameter {name!r}; {hint}.")
    raise NumericalError(
        f"the squared gradients of {what} overflow float32 (a gradient above 1e19 in magnitude); {hint}."
    )


def _grads(loss: torch.Tensor, names: Sequence[str], params: Sequence[nn.Parameter], what: str) -> Dict[str, torch.Tensor]:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ScoresError(f"the loss of {what} must be a scalar tensor, got {type(loss).__name__} "
                          f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}.")
    if not loss.requires_grad:
        raise ScoresError(
            f"the loss of {what} does not depend on the model's head / neuron parameters (it has no gradient); "
            "a loss_fn must compute the loss from model(batch) without detaching it."
        )
    got = torch.autograd.grad(loss, list(params), allow_unused=True)
    return {n: g for n, g in zip(names, got) if g is not None}


def _check_batch(loss: torch.Tensor, buf: torch.Tensor, grads: Mapping[str, torch.Tensor], what: str,
                 amp_dtype: Optional[torch.dtype]) -> float:
    """One sync: the loss value, after checking that loss and squared gradients are finite."""
    lv = loss.detach().float().reshape(())
    ok = torch.isfinite(lv) & torch.isfinite(buf).all()
    if not bool(ok):
        _raise_nonfinite(what, loss, grads, amp_dtype)
    return float(lv)


def check_finite_grads(loss: torch.Tensor, grads: Mapping[str, torch.Tensor], what: str,
                        amp_dtype: Optional[torch.dtype]) -> float:
    """Like :func:`_check_batch`, for raw gradients (one sync)."""
    lv = loss.detach().float().reshape(())
    flags = [torch.isfinite(lv)] + [torch.isfinite(g).all() for g in grads.values()]
    if not bool(torch.stack(flags).all()):
        _raise_nonfinite(what, loss, grads, amp_dtype)
    return float(lv)


def target_device(gm: nn.Module, cfg: PassConfig) -> torch.device:
    """Where the pass runs: ``cfg.device``, else where the model's parameters are."""
    return cfg.device if cfg.device is not None else device_of(gm)


def batch_gradients(gm: nn.Module, objective: Objective, batch: Any, params: Mapping[str, nn.Parameter],
                    what: str, cfg: PassConfig, device: torch.device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Forward (under autocast unless the pass runs in float32) and ``torch.autograd.grad``:
    ``(loss, {name: grad})``, the gradients in the parameters' dtype."""
    with _amp(device, pass_dtype(cfg, device)):
        loss = objective.fn(gm, batch)
    return loss, _grads(loss, list(params), list(params.values()), what)


def run_batches(gm: nn.Module, params: Mapping[str, nn.Parameter], objective: Objective, data: Any,
                n_images: int, cfg: PassConfig, step: Callable[[int, int, Any, int], float], *,
                shard: Optional[Tuple[int, int]] = None, skip: Optional[Callable[[int], None]] = None) -> dict:
    """Call ``step(batch_index, first_image, batch, n)`` on every batch, in the scoring state.

    Gradients only for ``params``, eval mode, the model on ``cfg.device`` (all restored
    afterwards, also on errors); a progress bar in images/s. ``step`` returns the batch's
    loss. Returns timing statistics.

    ``shard=(first, stop)`` runs only batches ``first <= index < stop`` (indices and image
    numbers stay global); ``skip(n)`` is called for each batch of ``n`` images before the
    shard (to advance random state). ``n_images`` is then the number of images in the shard.
    """
    losses: List[float] = []
    first, stop = shard if shard is not None else (0, None)
    with _scoring_state(gm, params, cfg.device):
        device = device_of(gm)
        bar = _progress(n_images, cfg.progress, objective.name)
        t0 = time.perf_counter()
        try:
            for bi, start, batch, n in _batches(data, cfg.batch_size):
                if stop is not None and bi >= stop:
                    break
                if bi < first:
                    if skip is not None:
                        skip(n)
                    continue
                losses.append(step(bi, start, batch, n))
                bar.update(n)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
        finally:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 3), "images_per_s": round(n_images / max(seconds, 1e-9), 2),
        "mean_loss": float(sum(losses) / max(len(losses), 1)), "device": str(device),
    }


def fisher_pass(gm: fx.GraphModule, smap: StructureMap, objective: Objective, data: Any, n_images: int,
                cfg: PassConfig, *, dist: Optional[DistContext] = None
                ) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor], dict]:
    """Σ g² per structure over the data (see the module docstring). Returns (heads, neurons, stats).

    With a distributed ``dist`` context, rank ``r`` runs a contiguous block of whole
    batches (:meth:`DistContext.span`), keeps each batch's buffer, and the buffers are
    added in global batch order (:meth:`DistContext.ordered_sum`): every rank returns
    exactly the scores one process computes on the same images.
    """
    ctx = dist if dist is not None else current(False)
    groups = scored_groups(smap)
    params = scored_parameters(gm, groups)
    device = target_device(gm, cfg)
    cfg = replace(cfg, amp_dtype=pass_dtype(cfg, device))  # the NaN/inf hint names what ran
    bufs = _Buffers(groups, device, record=ctx.enabled)
    ghost = _GhostPlan.build(gm, objective, groups, params, cfg.per_sample) if cfg.mode == "per-sample" else None
    losses: List[float] = []

    def step(bi: int, start: int, batch: Any, n: int) -> float:
        if cfg.mode == "per-batch":
            value = _fisher_step(gm, objective, batch, params, groups, bufs, describe_batch(bi, start, n), cfg,
                                 device)
        elif ghost is not None:
            value = ghost.step(gm, objective, batch, n, params, bufs, describe_batch(bi, start, n), cfg, device)
        else:
            per_image = [_fisher_step(gm, objective, _take(batch, j), params, groups, bufs,
                                      describe_batch(bi, start + j, 1), cfg, device) for j in range(n)]
            value = sum(per_image) / n
        losses.append(value)
        return value

    if not ctx.enabled:
        stats = run_batches(gm, params, objective, data, n_images, cfg, step)
    else:
        stats = ctx.all_or_nothing(lambda: _run_shard(gm, params, objective, data, cfg, step, ghost, ctx),
                                   "the gradient pass")
        stats = _merged_stats(ctx, stats, losses, n_images)
        ctx.ordered_sum(bufs.steps, bufs.total)
        bufs.steps = None
    stats["per_sample"] = None if cfg.mode == "per-batch" else ("ghost" if ghost is not None else "loop")
    stats["amp_dtype"] = str(cfg.amp_dtype).replace("torch.", "")
    heads, neurons = bufs.split(bufs.total, groups)
    return heads, neurons, stats


def _num_items(data: Any) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def _run_shard(gm: nn.Module, params: Mapping[str, nn.Parameter], objective: Objective, data: Any,
               cfg: PassConfig, step: Callable[[int, int, Any, int], float], ghost: Optional["_GhostPlan"],
               ctx: DistContext) -> dict:
    """This rank's contiguous block of whole batches; the crop generator skips the batches before it."""
    total = _num_items(data)
    first, stop = ctx.span(-(-total // cfg.batch_size))
    n_mine = max(0, min(stop * cfg.batch_size, total) - first * cfg.batch_size)
    calls_per_image = cfg.mode == "per-sample" and ghost is None  # the loop calls the loss once per image

    def skip(n: int) -> None:
        if objective.skip is not None:
            for size in ([1] * n if calls_per_image else [n]):
                objective.skip(size)

    mine = replace(cfg, progress=cfg.progress and ctx.is_main)
    return run_batches(gm, params, objective, data, n_mine, mine, step, shard=(first, stop), skip=skip)


def _merged_stats(ctx: DistContext, stats: dict, losses: List[float], n_images: int) -> dict:
    """Timing and mean loss over all ranks (the mean as one process computes it, in batch order)."""
    gathered = ctx.all_gather_object((stats["seconds"], losses), "gathering the pass statistics")
    seconds = max(s for s, _ in gathered)
    every = [v for _, part in gathered for v in part]
    return {
        "seconds": round(seconds, 3), "images_per_s": round(n_images / max(seconds, 1e-9), 2),
        "mean_loss": float(sum(every) / max(len(every), 1)), "device": stats["device"],
        "world_size": ctx.world_size,
    }


def _fisher_step(gm: nn.Module, objective: Objective, batch: Any, params: Mapping[str, nn.Parameter],
                 groups: Sequence[ScoredGroup], bufs: _Buffers, what: str, cfg: PassConfig,
                 device: torch.device) -> float:
    """One forward/backward; adds the squared gradients of ``batch``'s loss to the totals."""
    loss, grads = batch_gradients(gm, objective, batch, params, what, cfg, device)
    bufs.batch.zero_()
    sqgrad_accumulate_many(_jobs(groups, bufs, grads), backend=cfg.backend)
    value = _check_batch(loss, bufs.batch, grads, what, cfg.amp_dtype)
    bufs.commit()
    return value


def _progress(total: int, enabled: bool, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=f"scoring ({name})", disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


# ============================================================================ per-sample ghost norms
@dataclass
class _GhostLinear:
    module: nn.Linear
    name: str  # qualified module name
    rows: Optional[torch.Tensor] = None  # fp32 [out]: Σ_i ||W_i[j, :]||², this batch
    cols: Optional[torch.Tensor] = None  # fp32 [in]: Σ_i ||W_i[:, c]||²
    bias: Optional[torch.Tensor] = None  # fp32 [out]: Σ_i b_i[j]²


class _GhostPlan:
    """Per-sample squared gradients of ``nn.Linear`` parameters via forward/grad hooks."""

    def __init__(self, linears: Dict[str, _GhostLinear], owner: Dict[str, Tuple[str, str]], views: int,
                 groups: Sequence[ScoredGroup]) -> None:
        self.linears = linears
        self.owner = owner  # parameter name -> (linear name, "weight" | "bias")
        self.views = views  # rows per image the linear layers see (view-major)
        self.groups = list(groups)

    @classmethod
    def build(cls, gm: fx.GraphModule, objective: Objective, groups: Sequence[ScoredGroup],
              params: Mapping[str, nn.Parameter], choice: str) -> Optional["_GhostPlan"]:
        """A plan when the ghost path applies; None (micro-batches) otherwise, or raise for choice='ghost'."""
        if choice == "loop":
            return None
        why = cls._why_not(gm, objective, params)
        if why is not None:
            if choice == "ghost":
                raise ScoresError(f"per_sample='ghost' cannot be used here: {why}. Use per_sample='auto' or 'loop'.")
            log.info("per-sample scores by micro-batches of one image: %s", why)
            return None
        linears: Dict[str, _GhostLinear] = {}
        owner: Dict[str, Tuple[str, str]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
                for kind in ("weight", "bias"):
                    pname = f"{n.target}.{kind}"
                    if pname in params:
                        owner[pname] = (n.target, kind)
                        linears.setdefault(n.target, _GhostLinear(gm.get_submodule(n.target), n.target))
        return cls(linears, owner, int(objective.views), groups)

    @staticmethod
    def _why_not(gm: fx.GraphModule, objective: Objective, params: Mapping[str, nn.Parameter]) -> Optional[str]:
        if objective.views is None or objective.module is None:
            return "a custom loss_fn's batch layout is unknown (per-image terms cannot be told apart)"
        calls: Dict[str, int] = {}
        linear_params = set()
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
                if isinstance(gm.get_submodule(n.target), nn.Linear):
                    m = gm.get_submodule(n.target)
                    linear_params.add(f"{n.target}.weight")
                    if m.bias is not None:
                        linear_params.add(f"{n.target}.bias")
            if n.op == "get_attr" and n.target in params:
                return f"parameter {n.target!r} is used directly in the graph (not through an nn.Linear module)"
        for name in params:
            if name not in linear_params:
                return f"parameter {name!r} does not belong to an nn.Linear module called in the graph"
            mod = name.rsplit(".", 1)[0]
            if calls.get(mod, 0) != 1:
                return f"linear layer {mod!r} is called {calls.get(mod, 0)} times"
        return None

    def step(self, gm: nn.Module, objective: Objective, batch: Any, n: int, params: Mapping[str, nn.Parameter],
             bufs: _Buffers, what: str, cfg: PassConfig, device: torch.device) -> float:
        """One forward/backward with capture hooks; adds per-image squared gradients to the totals."""
        for gl in self.linears.values():
            w = gl.module.weight
            gl.rows = torch.zeros(w.shape[0], dtype=torch.float32, device=device)
            gl.cols = torch.zeros(w.shape[1], dtype=torch.float32, device=device)
            gl.bias = torch.zeros(w.shape[0], dtype=torch.float32, device=device)
        handles = [gl.module.register_forward_hook(self._forward_hook(gl, n, cfg.backend))
                   for gl in self.linears.values()]
        try:
            loss, grads = batch_gradients(gm, objective, batch, params, what, cfg, device)
        finally:
            for h in handles:
                h.remove()
        bufs.batch.zero_()
        scale = float(n) ** 2  # the loss is a mean over n images: per-image gradient = n * captured
        for g, out in zip(self.groups, bufs.batch_views):
            for s in g.slices:
                lin, kind = self.owner[s.name]
                gl = self.linears[lin]
                if kind == "bias":
                    per_pos = gl.bias
                else:
                    per_pos = gl.rows if s.dim == 0 else gl.cols
                out.add_(per_pos[bufs.index[id(s)]].sum(dim=1), alpha=scale)
        value = _check_batch(loss, bufs.batch, grads, what, cfg.amp_dtype)
        bufs.commit()
        return value

    def _forward_hook(self, gl: _GhostLinear, n_images: int, backend: str):
        views = self.views

        def per_sample(t: torch.Tensor) -> torch.Tensor:
            """[views * B, ..., C] (view-major rows) -> [B, views * T, C]."""
            rows = t.shape[0]
            if rows != views * n_images:
                raise RuntimeError(
                    f"linear layer {gl.name!r} saw {rows} rows, expected {views} views x {n_images} images"
                )
            t = t.reshape(views, n_images, -1, t.shape[-1])
            return t.transpose(0, 1).reshape(n_images, -1, t.shape[-1])

        def hook(module: nn.Module, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = inputs[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                xs = per_sample(x.to(g.dtype))
                gs = per_sample(g)
                rows, cols, bias = ghost_sqnorm(xs, gs, backend=backend)
                gl.rows += rows
                gl.cols += cols
                gl.bias += bias

            output.register_hook(on_grad)

        return hook

