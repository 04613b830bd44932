"""Post-pruning weight correction of column-pruned layers (paper App. B.4, SparseGPT-style).

Which layers, and what is being fixed
-------------------------------------
Removing an attention head or an FFN neuron removes *input columns* of one linear layer,
the group's out-projection (``attn.proj`` / ``mlp.fc2``). Everything upstream of those
columns (the head's q/k/v rows, the neuron's fc1 row) only feeds the removed columns, so
for the function computed by the model "remove the structure" is the same as "zero the
out-projection's columns". Weight correction then changes the *kept* columns so that the
layer's output on real inputs moves as little as possible::

    minimise  || W X - W' X ||_F^2   over W' with W'[:, pruned] = 0,

where ``X`` (``[in_features, tokens]``) are the layer's inputs on calibration images. Only
``H = X X^T`` is needed, so inputs are folded into a running ``H`` (:class:`HessianAccumulator`)
and never stored.

The solver (:func:`correct_linear`)
-----------------------------------
``H`` is damped, ``H_d = H + lambda I`` with ``lambda = p * mean(diag H)`` (``damping="mean"``,
``p = 0.01``, the paper's Eq. 11) or ``lambda = p * max(diag H)`` (``damping="max"``,
``p = 0.1``, for models with extreme activation outliers such as DINOv3). Inputs that are
always zero ("dead", ``H_jj = 0``) get ``H_jj = 1`` and their weights zeroed (they cannot
affect the output), which keeps ``H_d`` positive definite. With ``U`` the upper Cholesky
factor of ``H_d^{-1}``, SparseGPT's sweep visits the columns in order; a pruned column j
carries the error ``e = W[:, j] / U[j, j]`` and every not-yet-visited column k > j is
updated by ``W[:, k] -= e * U[j, k]`` (Eq. 12-13). Updates are applied lazily in blocks of
``block_size`` columns; the blocking changes only the round-off, never the result.

Exactly what the sweep computes, and the column order
-----------------------------------------------------
Row ``j`` of ``U`` (divided by ``U[j, j]``) is the optimal-brain-surgeon update for removing
column j when only the columns ``k >= j`` may still move. Visited kept columns are frozen.
Hence:

* if every pruned column is visited before every kept column, the sweep returns the
  exact minimiser of the *damped* objective ``tr((W - W') H_d (W - W')^T)``::

      W'[:, K] = W H_d[:, K] H_d[K, K]^{-1} = (W H[:, K] + lambda W[:, K]) (H[K, K] + lambda I)^{-1}

  (a ridge regression pulled towards the original kept weights, not towards zero), which
  :func:`correct_linear_lstsq` computes in closed form; with ``lambda = 0`` and full-rank
  ``H`` it is ordinary least squares ``W X X_K^T (X_K X_K^T)^{-1}``;
* in the natural order (the paper's and the reference code's), a pruned column can only be
  compensated by kept columns to its *right*: a head pruned at the end of ``attn.proj``'s
  input gets no compensation at all. The result is a constrained version of the above.

``CorrectionConfig.order`` therefore defaults to ``"pruned_first"`` (same sweep, columns
permuted so the pruned ones come first, then permuted back): it is never worse on the
layer objective and costs the same. ``order="natural"`` reproduces the paper exactly.

The model-level driver (:func:`correct_model`)
----------------------------------------------
Layers are corrected one after another in execution order (paper: "sequentially, layer by
layer, starting from the first Transformer block"). For layer ``i`` a forward pre-hook
collects ``H`` from that layer's inputs in the *current* model: all earlier listed layers
are already corrected (their pruned columns zeroed, so their structures are effectively
removed), while this layer's own upstream rows are intact, so the pruned columns of ``X``
still carry their original activations and the target ``W X`` is the dense layer's output
on those inputs. After correction the kept columns see exactly the activations the pruned
model produces (heads and neurons are independent within a group), so slicing away the
upstream rows later changes nothing. **Pass the unmasked model**: if the upstream rows of
the pruned structures were already zeroed, their inputs are dead and there is nothing
left to compensate (a warning is logged when that is detected).

With a StructureMap: :func:`correction_layers` turns a keep dict into the
``(out-projection, column mask)`` list in graph execution order, and
:func:`correct_structures` returns a corrected deep copy of a traced model, ready for
``slice_graph`` with the same keep dict (:func:`correct_pass` returns the copy with the
per-layer report; the input model is never modified)::

    corrected = correct_structures(gm, smap, keep, calibration=images)
    small = slice_graph(corrected, smap, keep)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import DataError, ElasticFxError, NumericalError, SliceError
from ..keep import KeepMask
from ..structures import StructureMap

logger = logging.getLogger(__name__)

#: ``keep_cols`` may be a bool mask over input columns (True = keep) or the kept indices.
KeepCols = Union[Tensor, Sequence[int]]
#: Calibration data: a tensor ``[N, C, H, W]`` or a re-iterable of batches (tensors, or
#: tuples/lists whose first item is the image tensor, as a DataLoader yields).
Calibration = Union[Tensor, Iterable]

#: GraphModule.meta key under which correct_structures records its per-layer report.
CORRECTION_META = "elastic_fx.correction"

_DEFAULT_PERCENT = {"mean": 0.01, "max": 0.1}
_ORDERS = ("pruned_first", "natural")


@dataclass
class CorrectionConfig:
    """How to damp ``H`` and sweep the columns.

    Attributes:
        damping: ``"mean"`` (lambda = percent * mean(diag H), paper Eq. 11) or ``"max"``
            (lambda = percent * max(diag H); for activation outliers, e.g. DINOv3).
        percent: the damping fraction; ``None`` means 0.01 for ``mean`` and 0.1 for ``max``.
            0 is allowed when ``H`` is full rank (exact least squares).
        block_size: columns per lazy-update block (paper: 128). Does not change the result.
        order: ``"pruned_first"`` (exact layer-wise optimum, default) or ``"natural"``
            (the paper's left-to-right sweep); see the module docstring.
        dtype: precision of the Cholesky factorisation and the sweep.
        max_images: calibration images used per layer by :func:`correct_model` (paper: 1000);
            ``None`` uses all of them.
    """

    damping: str = "mean"
    percent: Optional[float] = None
    block_size: int = 128
    order: str = "pruned_first"
    dtype: torch.dtype = torch.float64
    max_images: Optional[int] = 1000

    def __post_init__(self) -> None:
        if self.damping not in _DEFAULT_PERCENT:
            raise ElasticFxError(
                f"unknown damping strategy {self.damping!r}; expected one of {sorted(_DEFAULT_PERCENT)} "
                "('max' for models with extreme activation outliers such as DINOv3)"
            )
        if self.order not in _ORDERS:
            raise ElasticFxError(f"unknown column order {self.order!r}; expected one of {list(_ORDERS)}")
        if self.percent is not None and not self.percent >= 0:
            raise ElasticFxError(f"damping percent must be >= 0, got {self.percent}; try 0.01 (mean) or 0.1 (max)")
        if self.block_size < 1:
            raise ElasticFxError(f"block_size must be >= 1, got {self.block_size}; the paper uses 128")
        if self.max_images is not None and self.max_images < 1:
            raise ElasticFxError(f"max_images must be >= 1 or None, got {self.max_images}")

    @property
    def damping_percent(self) -> float:
        """The damping fraction actually used."""
        return _DEFAULT_PERCENT[self.damping] if self.percent is None else float(self.percent)


# ----------------------------------------------------------------------------- H accumulation
class HessianAccumulator:
    """Running ``H = sum over token vectors x of x x^T`` for one linear layer's input.

    Memory is ``in_features^2`` entries regardless of how many tokens are added; a batch is
    folded in chunks of ``chunk_rows`` token vectors so the temporary copy stays bounded too.
    ``H`` lives on the device of the first added input (or ``device``).
    """

    def __init__(
        self,
        in_features: int,
        dtype: torch.dtype = torch.float64,
        device: Optional[Union[str, torch.device]] = None,
        chunk_rows: int = 16384,
    ) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self._H: Optional[Tensor] = None if device is None else torch.zeros(
            in_features, in_features, dtype=dtype, device=device
        )
        self.count = 0  # token vectors folded in

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Fold in inputs ``x[..., in_features]`` (any leading dims: batch, tokens)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has last dimension {x.shape[-1]} (shape {tuple(x.shape)}), "
                f"expected in_features={self.in_features}"
            )
        rows = x.detach().reshape(-1, self.in_features)
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=rows.device)
        for start in range(0, rows.shape[0], self.chunk_rows):
            chunk = rows[start : start + self.chunk_rows].to(device=self._H.device, dtype=self.dtype)
            self._H.addmm_(chunk.T, chunk)
        self.count += rows.shape[0]

    @property
    def H(self) -> Tensor:
        """``[in_features, in_features]`` sum of outer products (zeros before any ``add``)."""
        if self._H is None:
            return torch.zeros(self.in_features, self.in_features, dtype=self.dtype)
        return self._H


# ----------------------------------------------------------------------------- layer solvers
def _keep_mask(keep_cols: KeepCols, in_features: int, device: torch.device) -> Tensor:
    """Normalise a bool mask or a list of kept indices to a bool ``[in_features]`` mask."""
    keep = torch.as_tensor(keep_cols, device=device)
    if keep.dtype == torch.bool:
        if keep.shape != (in_features,):
            raise SliceError(
                f"keep mask has shape {tuple(keep.shape)}, expected ({in_features},): one entry per "
                "input column of the layer (True = keep)"
            )
        return keep
    if keep.dim() != 1 or keep.is_floating_point():
        raise SliceError(
            f"keep_cols must be a bool mask [{in_features}] or a 1-D list of kept column indices, "
            f"got dtype {keep.dtype} shape {tuple(keep.shape)}"
        )
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= in_features):
        raise SliceError(
            f"kept column indices must lie in [0, {in_features}), got range "
            f"[{int(keep.min())}, {int(keep.max())}]"
        )
    mask = torch.zeros(in_features, dtype=torch.bool, device=device)
    mask[keep.long()] = True
    return mask


def _prepare(
    weight: Tensor, H: Tensor, keep_cols: KeepCols, config: CorrectionConfig
) -> Tuple[Tensor, Tensor, Tensor, float]:
    """Validate, copy to ``config.dtype``, neutralise dead inputs and damp ``H``.

    Returns ``(W, H_d, keep, lambda)`` with dead columns of ``W`` zeroed.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if H.shape != (n, n):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({n}, {n}) for weight {tuple(weight.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise NumericalError(
            "the input Hessian H contains NaN/inf: the calibration activations overflowed; "
            "run the model in float32 while collecting H"
        )
    device = H.device
    keep = _keep_mask(keep_cols, n, device)
    W = weight.detach().to(device=device, dtype=config.dtype).clone()
    Hd = H.detach().to(dtype=config.dtype).clone()
    dead = torch.diagonal(Hd) == 0
    if bool(dead.any()):
        Hd[dead, dead] = 1.0
        W[:, dead] = 0.0
    diag = torch.diagonal(Hd)
    level = diag.mean() if config.damping == "mean" else diag.max()
    lam = config.damping_percent * float(level)
    Hd.diagonal().add_(lam)
    return W, Hd, keep, lam


def _upper_cholesky_of_inverse(Hd: Tensor, config: CorrectionConfig) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H_d^{-1}`` (``H_d^{-1} = U^T U``)."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise NumericalError(
            f"the damped Hessian is not positive definite (damping={config.damping!r}, "
            f"percent={config.damping_percent}); increase CorrectionConfig.percent or use damping='max'"
        )
    return U


def correct_linear(
    weight: Tensor, H: Tensor, keep_cols: KeepCols, config: Optional[CorrectionConfig] = None
) -> Tensor:
    """Zero the pruned input columns of ``weight`` and correct the kept ones (OBS sweep).

    Args:
        weight: ``[out, in]`` the layer's dense weight.
        H: ``[in, in]`` ``sum x x^T`` over the layer's inputs (any positive scale; only
            relative damping is used).
        keep_cols: bool ``[in]`` (True = keep) or the kept column indices.
        config: damping / order / block size; see :class:`CorrectionConfig`.

    Returns:
        A new ``[out, in]`` tensor of ``weight``'s dtype and device whose pruned columns are
        exactly zero, minimising ``||(W - W') X||^2`` as described in the module docstring
        (with ``order="pruned_first"`` it equals :func:`correct_linear_lstsq`).
    """
    config = config or CorrectionConfig()
    W, Hd, keep, _ = _prepare(weight, H, keep_cols, config)
    pruned = ~keep
    if not bool(pruned.any()):
        return weight.detach().clone()

    perm = None
    if config.order == "pruned_first":
        perm = torch.cat([torch.nonzero(pruned).flatten(), torch.nonzero(keep).flatten()])
        W, Hd, pruned = W[:, perm], Hd[perm][:, perm], pruned[perm]
    U = _upper_cholesky_of_inverse(Hd, config)
    _obs_sweep_(W, U, pruned, config.block_size)

    if perm is not None:
        out = torch.empty_like(W)
        out[:, perm] = W
        W = out
    return W.to(device=weight.device, dtype=weight.dtype)


def _obs_sweep_(W: Tensor, U: Tensor, pruned: Tensor, block_size: int) -> None:
    """In place: SparseGPT's blocked sweep for a column mask shared by all rows."""
    n = W.shape[1]
    pruned_list = pruned.tolist()
    for i in range(0, n, block_size):
        j = min(i + block_size, n)
        cols = [c for c in range(i, j) if pruned_list[c]]
        if not cols:  # nothing to remove here: no error to propagate
            continue
        block = W[:, i:j]  # a view: updates land in W
        U_blk = U[i:j, i:j]
        errors = torch.zeros_like(block)
        for c in cols:
            k = c - i
            err = block[:, k] / U_blk[k, k]
            block[:, k:].sub_(err[:, None] * U_blk[k, k:][None, :])
            block[:, k] = 0.0  # exactly zero (it is zero up to round-off already)
            errors[:, k] = err
        if j < n:
            W[:, j:].sub_(errors @ U[i:j, j:])


def correct_linear_lstsq(
    weight: Tensor, H: Tensor, keep_cols: KeepCols, config: Optional[CorrectionConfig] = None
) -> Tensor:
    """Closed-form reference: ``W'[:, K] = W H_d[:, K] H_d[K, K]^{-1}``, ``W'[:, pruned] = 0``.

    Same dead-input handling and damping as :func:`correct_linear`; equal to its result with
    ``order="pruned_first"`` (any ``block_size``), and with ``order="natural"`` whenever every
    pruned column lies left of every kept column. With ``percent=0`` and full-rank ``H`` this
    is ordinary least squares of ``W X`` on the kept inputs.
    """
    config = config or CorrectionConfig()
    W, Hd, keep, _ = _prepare(weight, H, keep_cols, config)
    out = torch.zeros_like(W)
    if bool(keep.any()):
        rhs = W @ Hd[:, keep]  # [out, k]
        out[:, keep] = torch.linalg.solve(Hd[keep][:, keep], rhs.T).T  # H_d symmetric
    return out.to(device=weight.device, dtype=weight.dtype)


def reconstruction_error(weight: Tensor, new_weight: Tensor, H: Tensor) -> float:
    """Relative output error ``||(W - W') X||^2 / ||W X||^2`` computed from ``H = X X^T``."""
    W = weight.detach().to(device=H.device, dtype=torch.float64)
    delta = W - new_weight.detach().to(device=H.device, dtype=torch.float64)
    Hf = H.to(torch.float64)
    base = float(((W @ Hf) * W).sum())
    err = float(((delta @ Hf) * delta).sum())
    return err / base if base > 0 else 0.0


# ----------------------------------------------------------------------------- model driver
@dataclass
class LayerCorrection:
    """What :func:`correct_model` did to one layer.

    ``error_before`` / ``error_after`` are relative output errors (see
    :func:`reconstruction_error`) of "just zero the pruned columns" and of the corrected
    weight, on that layer's calibration inputs.
    """

    error_before: float
    error_after: float
    tokens: int
    pruned_columns: int
    dead_columns: int


class _StopForward(Exception):
    """Raised from a hook once the layer of interest has seen its input."""


def _batches(calibration: Calibration, batch_size: int) -> Iterator[Tensor]:
    if isinstance(calibration, Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise DataError(f"calibration tensor has shape {tuple(calibration.shape)}; expected [N, ...] with N >= 1")
        yield from calibration.split(batch_size)
        return
    for item in calibration:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, Tensor):
            raise DataError(
                f"calibration batches must be tensors (or tuples whose first item is a tensor), "
                f"got {type(batch).__name__}"
            )
        yield batch


def _check_reiterable(calibration: Calibration) -> None:
    if isinstance(calibration, Tensor):
        return
    try:
        if iter(calibration) is calibration:
            raise DataError(
                "calibration is a one-shot iterator, but correction runs one pass per corrected layer; "
                "pass a tensor [N, C, H, W], a list of batches, or a DataLoader"
            )
    except TypeError as e:
        raise DataError(f"calibration must be a tensor or an iterable of batches, got {type(calibration).__name__}") from e


def _default_forward(model: nn.Module, batch: Tensor) -> object:
    return model(batch)


def _resolve_linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        layer = model.get_submodule(name)
    except AttributeError as e:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise SliceError(
            f"layer {name!r} not found in the model; linear layers are e.g. {linears[:6]}"
        ) from e
    if not isinstance(layer, nn.Linear):
        raise SliceError(
            f"layer {name!r} is a {type(layer).__name__}, but weight correction needs an nn.Linear "
            "(the out-projection of an attention or FFN group)"
        )
    return layer


@torch.no_grad()
def _collect_hessian(
    model: nn.Module,
    layer: nn.Linear,
    calibration: Calibration,
    batch_size: int,
    forward: Callable[[nn.Module, Tensor], object],
    config: CorrectionConfig,
    device: torch.device,
) -> HessianAccumulator:
    """Run the calibration images through ``model``, folding ``layer``'s inputs into H.

    The forward pass is cut short right after the layer has seen its input (a pre-hook
    raises :class:`_StopForward`), so later blocks are not computed.
    """
    acc = HessianAccumulator(layer.in_features, dtype=torch.float64, device=device)

    def hook(_module: nn.Module, args: tuple) -> None:
        acc.add(args[0])
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    seen = 0
    try:
        for batch in _batches(calibration, batch_size):
            if config.max_images is not None:
                if seen >= config.max_images:
                    break
                batch = batch[: config.max_images - seen]
            seen += batch.shape[0]
            try:
                forward(model, batch.to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return acc


def correct_model(
    model: nn.Module,
    layers: Sequence[Tuple[str, KeepCols]],
    calibration: Calibration,
    *,
    config: Optional[CorrectionConfig] = None,
    batch_size: int = 32,
    forward: Optional[Callable[[nn.Module, Tensor], object]] = None,
) -> Dict[str, LayerCorrection]:
    """Correct column-pruned linear layers of ``model`` in place, one after another.

    Args:
        model: the **unmasked** model (see the module docstring): pruned heads/neurons still
            produce their activations upstream; this function zeros their columns in the
            listed layers. Works on any ``nn.Module`` including an fx ``GraphModule``.
        layers: ``(qualified name of an nn.Linear, keep mask over its input columns)`` in
            execution order (e.g. ``blocks.0.attn.proj``, ``blocks.0.mlp.fc2``, ...).
        calibration: images ``[N, C, H, W]`` or a re-iterable of batches (list, DataLoader);
            at most ``config.max_images`` are used per layer.
        config: damping, column order, block size; see :class:`CorrectionConfig`.
        batch_size: images per forward pass when ``calibration`` is a tensor.
        forward: ``forward(model, batch)`` runs the model (default ``model(batch)``).

    Returns:
        ``{layer name: LayerCorrection}`` with the relative output error of the layer before
        (pruned columns only zeroed) and after correction.

    One (truncated) forward pass over the calibration data per layer; memory is one
    ``in_features^2`` float64 matrix. The model is run in eval mode and its mode restored.
    """
    config = config or CorrectionConfig()
    forward = forward or _default_forward
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    _check_reiterable(calibration)
    resolved = [(name, _resolve_linear(model, name), keep) for name, keep in layers]
    names = [n for n, _, _ in resolved]
    if len(set(names)) != len(names):
        raise SliceError(f"each layer may be corrected once, but the list repeats some of {names}")

    was_training = model.training
    model.eval()
    report: Dict[str, LayerCorrection] = {}
    try:
        for name, layer, keep_cols in resolved:
            device = layer.weight.device
            keep = _keep_mask(keep_cols, layer.in_features, device)
            acc = _collect_hessian(model, layer, calibration, batch_size, forward, config, device)
            if acc.count == 0:
                raise SliceError(
                    f"layer {name!r} never ran during the calibration forward passes; check the layer "
                    "name, or pass forward=... if the model is not called as model(images)"
                )
            H = acc.H
            dead = torch.diagonal(H) == 0
            pruned = ~keep
            n_pruned, n_dead_pruned = int(pruned.sum()), int((dead & pruned).sum())
            if n_pruned and n_dead_pruned == n_pruned and not bool(dead.all()):
                logger.warning(
                    "%s: every pruned input column is always zero, so there is nothing to compensate; "
                    "was the model masked upstream before correction? Pass the unmasked model.",
                    name,
                )
            new_weight = correct_linear(layer.weight, H, keep, config)
            zeroed = layer.weight.detach().clone()
            zeroed[:, pruned] = 0
            report[name] = LayerCorrection(
                error_before=reconstruction_error(layer.weight, zeroed, H),
                error_after=reconstruction_error(layer.weight, new_weight, H),
                tokens=acc.count,
                pruned_columns=n_pruned,
                dead_columns=int(dead.sum()),
            )
            layer.weight.data.copy_(new_weight)
            logger.info(
                "corrected %s: %d/%d columns pruned, relative output error %.4g -> %.4g (%d tokens)",
                name, n_pruned, layer.in_features, report[name].error_before, report[name].error_after, acc.count,
            )
    finally:
        model.train(was_training)
    return report


# ----------------------------------------------------------------------------- StructureMap glue
def correction_layers(
    smap: StructureMap, keep: Optional[KeepMask], model: Optional[nn.Module] = None
) -> List[Tuple[str, Tensor]]:
    """``(out-projection name, bool keep mask over its input columns)`` for every group that
    loses at least one head or neuron under ``keep`` (blocks/keys not named are kept whole).

    Columns come from the group's out-projection ParamSlice (``dim=1`` of
    ``<out_proj>.weight``), so any layout discovery understands is handled. The list is in
    execution order: the order in which ``model``'s graph calls the modules when ``model``
    is an fx GraphModule, else block order with attention before the FFN.
    """
    keep = keep or {}
    layers: List[Tuple[str, Tensor]] = []
    for block in smap.blocks:
        for kind, group in block.groups():
            kept = keep.get(block.index, {}).get(kind)
            if kept is None:
                continue
            try:
                cols = group.out_slice()
            except SliceError:
                logger.warning("block %d %s: no column slice of %s.weight; not corrected",
                               block.index, kind, group.out_proj)
                continue
            mask = torch.zeros(cols.shape[1], dtype=torch.bool)
            mask[cols.kept_positions(kept)] = True
            if not bool(mask.all()):
                layers.append((group.out_proj, mask))
    if isinstance(model, fx.GraphModule):
        position = {}
        for i, node in enumerate(model.graph.nodes):
            if node.op == "call_module":
                position.setdefault(node.target, i)
        missing = [name for name, _ in layers if name not in position]
        for name in missing:
            logger.warning(
                "%s is not called as a module in the traced graph (e.g. it sits inside "
                "nn.MultiheadAttention), so its inputs cannot be hooked; it is left uncorrected", name
            )
        layers = sorted((l for l in layers if l[0] in position), key=lambda l: position[l[0]])
    return layers


@dataclass
class CorrectionResult:
    """What :func:`correct_pass` returns: the corrected copy and what changed in it.

    Attributes:
        module: the corrected deep copy (the input model is untouched).
        layers: ``{out-projection name: LayerCorrection}`` for every corrected layer, in
            execution order; their weights are the only tensors that differ from the input's.
    """

    module: nn.Module
    layers: Dict[str, LayerCorrection]


def correct_structures(
    model: nn.Module,
    smap: StructureMap,
    keep: Optional[KeepMask],
    calibration: Optional[Calibration],
    *,
    config: Optional[CorrectionConfig] = None,
    batch_size: int = 32,
    forward: Optional[Callable[[nn.Module, Tensor], object]] = None,
) -> nn.Module:
    """A corrected deep copy of the unmasked ``model`` for the budget ``keep``.

    The copy computes the pruned-and-corrected function (removed structures' columns are
    zero in the out-projections); slice it with the same ``keep`` afterwards. ``model``
    itself is not modified. Per-layer errors are logged and stored in the copy's
    ``meta["elastic_fx.correction"]`` when it is a GraphModule. :func:`correct_pass`
    returns the same copy together with the per-layer report.
    """
    return correct_pass(model, smap, keep, calibration, config=config, batch_size=batch_size, forward=forward).module


def correct_pass(
    model: nn.Module,
    smap: StructureMap,
    keep: Optional[KeepMask],
    calibration: Optional[Calibration],
    *,
    config: Optional[CorrectionConfig] = None,
    batch_size: int = 32,
    forward: Optional[Callable[[nn.Module, Tensor], object]] = None,
) -> CorrectionResult:
    """:func:`correct_structures`, returning what it changed as well (a :class:`CorrectionResult`)."""
    if calibration is None:
        raise DataError(
            "weight correction needs calibration images: pass calibration= a tensor [N, C, H, W] "
            "(about 1000 images, preprocessed like the model's inputs) or a DataLoader"
        )
    new = copy.deepcopy(model)
    layers = correction_layers(smap, keep, new)
    report = correct_model(new, layers, calibration, config=config, batch_size=batch_size, forward=forward)
    if isinstance(new, fx.GraphModule):
        new.meta[CORRECTION_META] = {k: dataclasses.asdict(v) for k, v in report.items()}
    return CorrectionResult(new, report)
