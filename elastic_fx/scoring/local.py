"""Local (label-free) importance scores: squared gradients per attention head and FFN neuron.

    ls = efx.local_scores(model, images, method="dino", loss_fn=None, batch_size=16,
                          mode="per-batch", seed=0)
    ls.head_scores[b]     # fp32 [num_heads] of block b (block indices as in the StructureMap)
    ls.neuron_scores[b]   # fp32 [hidden_features]
    ls.save("vit.scores.safetensors"); ls = efx.LocalScores.load("vit.scores.safetensors", smap)

What a score is
---------------
A structure owns entries of several parameters (:class:`~elastic_fx.structures.ParamSlice`):
a head its q/k/v rows, their biases and its out-projection columns (plus per-head tables
such as a relative-position bias); a neuron its in-projection row(s), their bias and its
out-projection column. Its score is the sum, over all those entries, of squared gradients
of the self-supervised loss -- the diagonal Fisher / Gauss-Newton approximation of the
loss curvature (paper, eq. "H_local"):

* ``mode="per-batch"`` (the paper's setting): for each batch of images, the gradient of
  that batch's (mean) loss, squared, summed over the structure's entries and over batches.
  With a ``loss_fn`` this is exactly ``sum_b sum_{e in s} (d loss_fn(model, batch_b) / d theta_e)^2``.
* ``mode="per-sample"``: the true empirical Fisher, ``sum_i sum_{e in s} (d l_i / d theta_e)^2``
  with ``l_i`` image ``i``'s own loss term. Computed by the ghost-norm kernel
  (:func:`elastic_fx.kernels.sqgrad.ghost_sqnorm`, per-sample norms without per-sample
  gradients) when every scored parameter is the weight or bias of an ``nn.Linear`` called
  once as a module in the graph and the loss is known to be a mean of per-image terms (the
  built-in ``"dino"`` and ``"ce"`` losses); otherwise by micro-batches of one image (exact,
  slower). Graphs captured by ``torch.export`` (Hugging Face models) inline their linear
  layers as ``aten.linear`` on ``get_attr`` weights, which module hooks cannot see, and
  ``nn.MultiheadAttention`` keeps its in-projection inside the module: both use micro-batches.

Scores are stored as RAW SUMS (``head_scores`` / ``neuron_scores``, the contract above).
The paper ranks structures by the *mean* over their parameters; ``head_means`` /
``neuron_means`` (or :meth:`LocalScores.normalized`) divide by the parameter count of one
head / neuron, which is what the budget ranks.

The gradient pass
-----------------
Only parameters named by a prunable structure get ``requires_grad`` (all flags are restored
afterwards); each batch runs forward, ``torch.autograd.grad`` and one batched call of the
fused squared-gradient kernel (:func:`~elastic_fx.kernels.sqgrad.sqgrad_accumulate_many`)
for every structure of the model. Gradients are never stored beyond one batch and
``.grad`` attributes are never touched. Every batch is checked (one device sync): a NaN or
inf in the loss or a gradient raises :class:`~elastic_fx.errors.NumericalError` naming the
batch, its images and the parameter, before anything reaches the totals.

The default loss is DINO multi-crop self-distillation (:mod:`elastic_fx.scoring.dino`) on
the model's pooled embedding (:func:`elastic_fx.embedding.embedding_module`), with crops
taken from the decoded images at the model's own preprocessing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from ..data import PREPROCESS_META, PreprocessConfig, TensorSource, as_source, load_tensor, raw_images
from ..distributed import SAME_IMAGES_HINT, SAME_WEIGHTS_HINT, DistContext, checksums, current
from ..errors import DataError, NumericalError, ScoresError
from ..kernels.sqgrad import SqgradJob, ghost_sqnorm, sqgrad_accumulate_many
from ..structures import ParamSlice, StructureMap
from ..tracing import EXAMPLE_INPUTS_META, trace
from .dino import DinoConfig, DinoLoss, LossFn, MultiCropSampler, ce_loss

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "MODES",
    "SCORES_FORMAT",
    "LocalScores",
    "PassConfig",
    "ScoredGroup",
    "batch_gradients",
    "build_objective",
    "fisher_pass",
    "local_scores",
    "new_scores",
    "resolve_model",
    "run_batches",
    "scored_groups",
    "scored_parameters",
]

#: Methods :func:`local_scores` understands; ``"fisher"`` is an alias of ``"dino"``
#: (the DINO local scores used without the global search).
METHODS = ("dino", "ce", "magnitude", "lamp", "snip", "random")
METHOD_ALIASES = {"fisher": "dino"}
MODES = ("per-batch", "per-sample")
PER_SAMPLE_METHODS = ("auto", "ghost", "loop")

#: Metadata key of a score file and the format version written.
SCORES_FORMAT = "elastic_fx"
SCORES_VERSION = 1

Images = Union[str, os.PathLike, torch.Tensor, Sequence[Any], None]


# ============================================================================ LocalScores
@dataclass
class LocalScores:
    """Per-block importance of every attention head and FFN neuron of one model.

    Attributes:
        head_scores: block index -> fp32 ``[num_heads]``: the SUM over the head's
            parameter entries of the method's per-entry score (Σ g² for ``"dino"``).
            Blocks without attention have no entry.
        neuron_scores: block index -> fp32 ``[hidden_features]`` (prunable FFNs only).
        method: ``"dino"``, ``"ce"``, ``"custom"`` (a ``loss_fn``), or a baseline name.
        loss: what was differentiated (``"dino"``, ``"cross-entropy"``, the ``loss_fn``'s
            name, or ``"none"``).
        mode: ``"per-batch"`` / ``"per-sample"`` (``"none"`` for data-free baselines).
        num_images: images the scores were computed on (0 for data-free baselines).
        fingerprint: :meth:`StructureMap.fingerprint` of the model.
        blocks: per-block layout (``StructureMap.describe()`` plus parameter counts and
            the names of the parameters each group owns), used by :meth:`check`.
        config: everything else worth keeping (batch size, seed, DINO settings, timing ...).
    """

    head_scores: Dict[int, torch.Tensor]
    neuron_scores: Dict[int, torch.Tensor]
    method: str
    loss: str
    mode: str
    num_images: int
    fingerprint: str
    blocks: List[dict]
    config: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"LocalScores(method={self.method!r}, mode={self.mode!r}, images={self.num_images}, "
                f"blocks={len(self.blocks)}, model={self.fingerprint})")

    # ------------------------------------------------------------------ derived
    @property
    def normalized_scores(self) -> bool:
        """True when the scores are already per-parameter means (see :meth:`normalized`)."""
        return bool(self.config.get("normalized", False))

    def _per(self, key: str) -> Dict[int, int]:
        return {int(b["index"]): int(b[key]) for b in self.blocks if b.get(key)}

    @property
    def head_means(self) -> Dict[int, torch.Tensor]:
        """Per-head score divided by the number of parameters one head owns (the paper's average)."""
        if self.normalized_scores:
            return dict(self.head_scores)
        per = self._per("params_per_head")
        return {b: s / per[b] for b, s in self.head_scores.items()}

    @property
    def neuron_means(self) -> Dict[int, torch.Tensor]:
        """Per-neuron score divided by the number of parameters one neuron owns."""
        if self.normalized_scores:
            return dict(self.neuron_scores)
        per = self._per("params_per_neuron")
        return {b: s / per[b] for b, s in self.neuron_scores.items()}

    def normalized(self) -> "LocalScores":
        """A copy whose ``head_scores`` / ``neuron_scores`` are per-parameter means."""
        if self.normalized_scores:
            return self
        return LocalScores(
            head_scores=self.head_means, neuron_scores=self.neuron_means, method=self.method, loss=self.loss,
            mode=self.mode, num_images=self.num_images, fingerprint=self.fingerprint,
            blocks=[dict(b) for b in self.blocks], config={**self.config, "normalized": True},
        )

    def summary(self) -> str:
        """One line per block: heads and neurons with their min / median / max score."""
        rows = [f"LocalScores(method={self.method}, mode={self.mode}, images={self.num_images}, "
                f"model {self.fingerprint})"]
        for b in self.blocks:
            i = int(b["index"])
            parts = [f"block {i:>3}"]
            for name, d in (("heads", self.head_scores), ("neurons", self.neuron_scores)):
                if i in d:
                    s = d[i]
                    parts.append(f"{name} {s.numel():>5}: min {s.min():.3g} med {s.median():.3g} max {s.max():.3g}")
            rows.append("  ".join(parts))
        return "\n".join(rows)

    # ------------------------------------------------------------------ identity
    def check(self, smap: StructureMap) -> None:
        """Raise :class:`ScoresError` unless these scores belong to a model with ``smap``'s structure.

        The message names the first block and field that differ.
        """
        if smap.fingerprint() == self.fingerprint:
            return
        mine = _blocks_description(smap)
        path = self.config.get("path")
        where = f"the scores in {path!r}" if path else "these scores"
        hint = "Recompute the scores for this model with efx.local_scores(model, images)."
        if len(mine) != len(self.blocks):
            raise ScoresError(
                f"{where} were computed for a model with {len(self.blocks)} blocks, but this model has "
                f"{len(mine)} blocks. {hint}"
            )
        for theirs, ours in zip(self.blocks, mine):
            for key in _CHECKED_FIELDS:
                if theirs.get(key) != ours.get(key):
                    raise ScoresError(
                        f"{where} were computed for a different model: block {ours['index']} has "
                        f"{key}={_short(theirs.get(key))} in the scores but {key}={_short(ours.get(key))} in this "
                        f"model. {hint}"
                    )
        raise ScoresError(
            f"{where} were computed for a model with structure fingerprint {self.fingerprint}, this model has "
            f"{smap.fingerprint()}. {hint}"
        )

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one safetensors file: the score tensors plus a JSON description (atomically).

        Tensors are named ``head_scores.{b}`` / ``neuron_scores.{b}``; the metadata entry
        ``"elastic_fx"`` holds version, method, loss, mode, image count, fingerprint,
        per-block layout and config. Nothing in the file is executable.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"head_scores.{b}": t.detach().to("cpu", torch.float32).contiguous()
                   for b, t in self.head_scores.items()}
        tensors.update({f"neuron_scores.{b}": t.detach().to("cpu", torch.float32).contiguous()
                        for b, t in self.neuron_scores.items()})
        config = {k: v for k, v in self.config.items() if k != "path"}
        meta = {
            "version": SCORES_VERSION, "method": self.method, "loss": self.loss, "mode": self.mode,
            "num_images": int(self.num_images), "fingerprint": self.fingerprint, "blocks": self.blocks,
            "config": config,
        }
        try:
            blob = json.dumps(meta, default=_json_default)
        except (TypeError, ValueError) as e:
            raise ScoresError(f"the scores' config cannot be written as JSON: {e}") from e
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": "pt", SCORES_FORMAT: blob})
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        log.info("saved %s scores of %d blocks to %s", self.method, len(self.blocks), path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], smap: Optional[StructureMap] = None) -> "LocalScores":
        """Read a file written by :meth:`save`; with ``smap``, refuse scores of another model.

        Raises:
            ScoresError: the file is missing, not a safetensors file, has no elastic_fx
                metadata, is inconsistent, or (with ``smap``) belongs to a different model.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ScoresError(f"no score file at {str(path)!r}; write one with LocalScores.save(path).")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for foreign files
            raise ScoresError(
                f"{str(path)!r} is not a safetensors score file ({type(e).__name__}: {str(e)[:200]}); "
                "score files are written by LocalScores.save()."
            ) from None
        if SCORES_FORMAT not in header:
            raise ScoresError(
                f"{str(path)!r} is a safetensors file without elastic_fx metadata (the {SCORES_FORMAT!r} "
                "entry is missing), so it holds no local scores; score files are written by LocalScores.save()."
            )
        try:
            meta = json.loads(header[SCORES_FORMAT])
        except json.JSONDecodeError as e:
            raise ScoresError(f"{str(path)!r}: the elastic_fx metadata is not valid JSON ({e}).") from None
        scores = cls._from_parts(meta, tensors, str(path))
        if smap is not None:
            scores.check(smap)
        return scores

    @classmethod
    def _from_parts(cls, meta: Any, tensors: Mapping[str, torch.Tensor], where: str) -> "LocalScores":
        required = ("version", "method", "loss", "mode", "num_images", "fingerprint", "blocks")
        if not isinstance(meta, dict) or any(k not in meta for k in required):
            missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
            raise ScoresError(f"{where!r}: the elastic_fx metadata lacks {missing}; the file is corrupt.")
        if int(meta["version"]) > SCORES_VERSION:
            raise ScoresError(
                f"{where!r} was written by a newer elastic_fx (score format {meta['version']}, this version "
                f"reads up to {SCORES_VERSION}); upgrade elastic_fx."
            )
        heads, neurons = {}, {}
        for b in meta["blocks"]:
            i = int(b["index"])
            for kind, size_key, store in (("head_scores", "num_heads", heads), ("neuron_scores", "hidden_features", neurons)):
                wanted = b.get(size_key) if (kind == "head_scores" or b.get("mlp_prunable")) else None
                name = f"{kind}.{i}"
                if wanted is None:
                    continue
                t = tensors.get(name)
                if t is None or tuple(t.shape) != (int(wanted),):
                    got = "missing" if t is None else f"of shape {tuple(t.shape)}"
                    raise ScoresError(f"{where!r}: tensor {name} is {got}, expected [{wanted}]; the file is corrupt.")
                store[i] = t.to(torch.float32)
        config = dict(meta.get("config") or {})
        config["path"] = where
        return cls(heads, neurons, str(meta["method"]), str(meta["loss"]), str(meta["mode"]),
                   int(meta["num_images"]), str(meta["fingerprint"]), list(meta["blocks"]), config)


_CHECKED_FIELDS = ("num_heads", "head_dim", "hidden_features", "mlp_prunable", "head_params", "neuron_params")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (torch.device, Path)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _blocks_description(smap: StructureMap) -> List[dict]:
    """``smap.describe()`` plus parameter counts and the names of each group's parameters."""
    out = []
    for d, b in zip(smap.describe(), smap.blocks):
        a, m = b.attention, b.mlp
        d = dict(d)
        d["params_per_head"] = a.params_per_head if a is not None else None
        d["params_per_neuron"] = m.params_per_neuron if m is not None else None
        d["head_params"] = sorted(s.name for s in a.slices) if a is not None else None
        d["neuron_params"] = sorted(s.name for s in m.slices) if m is not None else None
        out.append(d)
    return out


def new_scores(smap: StructureMap, heads: Mapping[int, torch.Tensor], neurons: Mapping[int, torch.Tensor], *,
               method: str, loss: str, mode: str, num_images: int, config: Optional[dict] = None) -> LocalScores:
    """Assemble a :class:`LocalScores` for ``smap`` (used by the gradient pass and the baselines)."""
    return LocalScores(
        head_scores={b: t.detach().to("cpu", torch.float32) for b, t in heads.items()},
        neuron_scores={b: t.detach().to("cpu", torch.float32) for b, t in neurons.items()},
        method=method, loss=loss, mode=mode, num_images=int(num_images), fingerprint=smap.fingerprint(),
        blocks=_blocks_description(smap), config=dict(config or {}),
    )


# ============================================================================ structures
@dataclass
class ScoredGroup:
    """One scored group: the heads of one attention or the neurons of one FFN."""

    block: int
    kind: str  # "heads" | "neurons"
    size: int
    slices: Tuple[ParamSlice, ...]  # parameter slices only (buffers get no gradient)


def scored_groups(smap: StructureMap) -> List[ScoredGroup]:
    """Every prunable group of ``smap`` with the parameter (not buffer) slices it owns."""
    out = []
    for b in smap.blocks:
        for kind, g in b.groups():
            out.append(ScoredGroup(b.index, kind, g.size, tuple(s for s in g.slices if not s.buffer)))
    return out


def scored_parameters(gm: nn.Module, groups: Sequence[ScoredGroup]) -> Dict[str, nn.Parameter]:
    """The parameters named by the groups' slices, in first-use order."""
    params: Dict[str, nn.Parameter] = {}
    for g in groups:
        for s in g.slices:
            if s.name not in params:
                try:
                    params[s.name] = gm.get_parameter(s.name)
                except AttributeError:
                    raise ScoresError(
                        f"the structure map names parameter {s.name!r}, which this model does not have; "
                        "run efx.discover(gm) on this very GraphModule"
                    ) from None
    return params


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

    def split(self, flat: torch.Tensor, groups: Sequence[ScoredGroup]) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        heads, neurons = {}, {}
        for g, (a, b) in zip(groups, self.spans):
            (heads if g.kind == "heads" else neurons)[g.block] = flat[a:b].clone()
        return heads, neurons


# ============================================================================ set-up
@dataclass
class PassConfig:
    """Settings of one gradient pass (see :func:`local_scores` for their meaning)."""

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
            raise ScoresError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ScoresError(f"num_images must be a positive integer, got {self.num_images!r}.")
        if self.mode not in MODES:
            raise ScoresError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.per_sample not in PER_SAMPLE_METHODS:
            raise ScoresError(f"per_sample must be one of {PER_SAMPLE_METHODS}, got {self.per_sample!r}.")
        if self.backend not in ("auto", "triton", "torch"):
            raise ScoresError(f"backend must be 'auto', 'triton' or 'torch', got {self.backend!r}.")
        if self.amp_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ScoresError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {self.amp_dtype!r}.")


def resolve_model(model: nn.Module, example_inputs: Any = None,
                  structures: Optional[StructureMap] = None) -> Tuple[fx.GraphModule, StructureMap]:
    """``model`` as a traced GraphModule with its StructureMap (tracing / discovering if needed)."""
    from ..passes.discover import STRUCTURE_META, discover

    if not isinstance(model, nn.Module):
        raise ScoresError(f"model must be a torch.nn.Module or a traced GraphModule, got {type(model).__name__}.")
    gm = model if isinstance(model, fx.GraphModule) and EXAMPLE_INPUTS_META in model.meta else trace(model, example_inputs)
    smap = structures if structures is not None else gm.meta.get(STRUCTURE_META) or discover(gm)
    return gm, smap


def _preprocessing(gm: fx.GraphModule, source: Any, explicit: Optional[PreprocessConfig]) -> PreprocessConfig:
    """The model's preprocessing; neutral statistics when images come preprocessed."""
    if explicit is not None:
        return explicit
    stored = gm.meta.get(PREPROCESS_META)
    if stored is not None:
        return stored if isinstance(stored, PreprocessConfig) else PreprocessConfig.from_dict(stored)
    if getattr(source, "preprocessed", False):
        ex = gm.meta.get(EXAMPLE_INPUTS_META) or ()
        size = tuple(ex[0].shape[-2:]) if ex and isinstance(ex[0], torch.Tensor) and ex[0].dim() == 4 \
            else tuple(source.images.shape[-2:])
        # crops of normalised images are not normalised again: the statistics are unused
        return PreprocessConfig(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    raise DataError(
        "cannot tell how this model expects its images (no timm / Hugging Face / torchvision preprocessing "
        "config was found). Pass preprocess=efx.data.preprocess_config(model, input_size=..., mean=..., std=...), "
        "or give images as a float tensor [N, 3, H, W] that is already preprocessed."
    )


@dataclass
class _Objective:
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


def _labelled(images: Any, labels: Any, cfg: PreprocessConfig, num_images: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images and their labels, subsampled together."""
    source = as_source(images)
    if not isinstance(source, TensorSource):
        raise DataError(
            "labels need images given as a tensor [N, 3, H, W] in the same order (a folder has no defined "
            "label order); load them first, e.g. efx.data.load_tensor(folder, cfg)."
        )
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.shape[0] != len(source):
        raise DataError(f"labels must be a 1-d tensor with one entry per image ({len(source)}), got {tuple(y.shape)}.")
    idx = torch.arange(len(source))
    if num_images < len(source):
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(source), generator=gen)[:num_images].sort().values
    x = load_tensor(source.images[idx], cfg)
    return x, y[idx]


def build_objective(gm: fx.GraphModule, smap: StructureMap, method: str, loss_fn: Optional[LossFn], images: Images,
                    cfg: PassConfig, *, dino: Optional[DinoConfig] = None, labels: Any = None,
                    preprocess: Optional[PreprocessConfig] = None) -> Tuple[_Objective, Any, int]:
    """The loss to differentiate, the data it runs on, and the number of images.

    * a ``loss_fn`` gets preprocessed float batches ``[B, 3, H, W]`` (``(images, labels)``
      tuples when ``labels`` are given) and the traced GraphModule;
    * ``"ce"`` needs ``labels`` and a model that outputs logits;
    * ``"dino"`` (and ``"snip"``) take multi-crops of the decoded images (or of an
      already-preprocessed float tensor) and run the pooled-embedding module.
    """
    source = as_source(images, n_synthetic=cfg.num_images, synthetic_seed=cfg.seed)
    pre = _preprocessing(gm, source, preprocess)
    if loss_fn is not None:
        if labels is not None:
            data: Any = _labelled(source, labels, pre, cfg.num_images, cfg.seed)
        else:
            data = load_tensor(source, pre, cfg.num_images, seed=cfg.seed)
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)

        def custom(model: nn.Module, batch: Any) -> torch.Tensor:
            return loss_fn(model, _to_device(batch, _device_of(model)))

        return _Objective(custom, name, "custom"), data, len(data[0] if isinstance(data, tuple) else data)
    if method == "ce":
        if labels is None:
            raise ScoresError("method='ce' needs labels=<int tensor [N]>; use method='dino' for label-free scores.")
        data = _labelled(source, labels, pre, cfg.num_images, cfg.seed)

        def ce(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            dev = _device_of(model)
            return ce_loss(lambda t: _logits(model(t)), x.to(dev), y.to(dev))

        return _Objective(ce, "cross-entropy", "ce", module=gm, views=1), data, len(data[0])
    from ..embedding import embedding_module

    dcfg = dino if dino is not None else DinoConfig()
    emb = embedding_module(gm, smap)
    emb.eval()  # DinoLoss restores the mode it finds: keep it eval
    sampler = MultiCropSampler(pre, dcfg, seed=cfg.seed)
    dino_fn = DinoLoss(sampler)

    def dino_objective(model: nn.Module, batch: Any) -> torch.Tensor:
        return dino_fn(emb, batch)  # emb shares model's parameters

    data = raw_images(source, cfg.num_images, seed=cfg.seed)
    extra = {"dino": asdict(dcfg), "preprocess": pre.to_dict()}
    return _Objective(dino_objective, "dino", "dino", module=emb, views=dcfg.n_views, extra=extra,
                      skip=lambda n: _skip_crops(sampler, n)), data, len(data)


def _skip_crops(sampler: MultiCropSampler, n: int) -> None:
    """Advance the crop generator as ``sampler(<n images>)`` does, without cropping.

    The boxes' random draws depend on the number of images and views only, never on the
    image sizes, so drawing boxes for ``n`` dummy images consumes exactly the same numbers.
    """
    sizes = [(1, 1)] * n
    d = sampler.dino
    sampler.boxes(sizes, d.global_scale, d.n_global)
    if d.n_local:
        sampler.boxes(sizes, d.local_scale, d.n_local)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return tuple(_to_device(b, device) for b in batch)
    return batch


def _example_from(images: Any, preprocess: Optional[PreprocessConfig]) -> Any:
    """Example inputs for tracing a raw module: two of the given preprocessed images, if any."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
        return (images[:2].float(),)
    if preprocess is not None:
        return (torch.randn(2, 3, *preprocess.input_size, generator=torch.Generator().manual_seed(0)),)
    return None


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits",):
        v = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ScoresError(f"method='ce' needs a model that returns logits [B, classes]; it returned {type(out).__name__}.")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ============================================================================ the pass
@contextlib.contextmanager
def _scoring_state(gm: nn.Module, params: Mapping[str, nn.Parameter], device: Optional[torch.device]):
    """Gradients only for ``params``, eval mode, optional device move; everything restored after."""
    flags = {p: p.requires_grad for p in gm.parameters()}
    modes = {m: m.training for m in gm.modules()}
    home = _device_of(gm)
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


def _amp(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None or dtype == torch.float32:
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
    return f"batch {bi} (image {start})" if n == 1 else f"batch {bi} (images {start}-{start + n - 1})"


def _raise_nonfinite(what: str, loss: torch.Tensor, grads: Mapping[str, Optional[torch.Tensor]],
                     amp_dtype: Optional[torch.dtype]) -> None:
    """Name the first non-finite thing: the loss, a gradient, or a squared gradient that overflowed."""
    hint = ("no score was changed. Check the images for NaN/inf, run in float32 (amp_dtype=None)"
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
    return cfg.device if cfg.device is not None else _device_of(gm)


def batch_gradients(gm: nn.Module, objective: _Objective, batch: Any, params: Mapping[str, nn.Parameter],
                    what: str, cfg: PassConfig, device: torch.device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Forward (under autocast if asked) and ``torch.autograd.grad``: ``(loss, {name: grad})``."""
    with _amp(device, cfg.amp_dtype):
        loss = objective.fn(gm, batch)
    return loss, _grads(loss, list(params), list(params.values()), what)


def run_batches(gm: nn.Module, params: Mapping[str, nn.Parameter], objective: _Objective, data: Any,
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
        device = _device_of(gm)
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


def fisher_pass(gm: fx.GraphModule, smap: StructureMap, objective: _Objective, data: Any, n_images: int,
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
    heads, neurons = bufs.split(bufs.total, groups)
    return heads, neurons, stats


def _num_items(data: Any) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def _run_shard(gm: nn.Module, params: Mapping[str, nn.Parameter], objective: _Objective, data: Any,
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


def _fisher_step(gm: nn.Module, objective: _Objective, batch: Any, params: Mapping[str, nn.Parameter],
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
    def build(cls, gm: fx.GraphModule, objective: _Objective, groups: Sequence[ScoredGroup],
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
    def _why_not(gm: fx.GraphModule, objective: _Objective, params: Mapping[str, nn.Parameter]) -> Optional[str]:
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

    def step(self, gm: nn.Module, objective: _Objective, batch: Any, n: int, params: Mapping[str, nn.Parameter],
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


# ============================================================================ entry point
def local_scores(
    model: nn.Module,
    images: Images = None,
    method: str = "dino",
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 16,
    mode: str = "per-batch",
    seed: int = 0,
    *,
    num_images: int = 1000,
    device: Union[str, torch.device, None] = None,
    dino: Optional[DinoConfig] = None,
    progress: bool = True,
    example_inputs: Any = None,
    labels: Any = None,
    amp_dtype: Optional[torch.dtype] = None,
    preprocess: Optional[PreprocessConfig] = None,
    structures: Optional[StructureMap] = None,
    backend: str = "auto",
    per_sample: str = "auto",
    distributed: Optional[bool] = None,
) -> LocalScores:
    """Importance of every attention head and FFN neuron of ``model``, without labels.

    Args:
        model: an ``nn.Module`` (traced with :func:`elastic_fx.trace`, structures found by
            :func:`elastic_fx.discover`) or a GraphModule from :func:`elastic_fx.trace`.
        images: a folder of images, an image source, a uint8 tensor, a float tensor
            ``[N, 3, H, W]`` already preprocessed for the model, or None (synthetic images).
        method: ``"dino"`` (default; ``"fisher"`` is an alias), ``"ce"`` (needs ``labels``),
            or a baseline: ``"magnitude"``, ``"lamp"``, ``"snip"``, ``"random"``
            (see :mod:`elastic_fx.scoring.baselines`).
        loss_fn: ``loss_fn(model, batch) -> scalar`` replaces the loss. It receives the
            traced GraphModule and preprocessed float batches ``[B, 3, H, W]`` (or
            ``(images, labels)`` when ``labels`` are given).
        batch_size: images per gradient step (16 in the paper; each image gives 12 crops).
        mode: ``"per-batch"`` (square each batch's mean gradient; the paper) or
            ``"per-sample"`` (square each image's own gradient: the empirical Fisher).
        seed: seeds the image subsample, the crops and the random baseline.
        num_images: images used (1000 in the paper); all of them when fewer exist.
        device: run the pass there (the model is moved for the pass and moved back).
        dino: multi-crop / temperature settings (:class:`DinoConfig`).
        progress: show a progress bar (images/s) on a terminal.
        example_inputs: example inputs for tracing an ``nn.Module``.
        labels: int ``[N]`` class labels aligned with a tensor of images (``"ce"``).
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` to run forward in autocast.
        preprocess: the model's :class:`PreprocessConfig` when it cannot be read from it.
        structures: a StructureMap to use instead of discovering one.
        backend: squared-gradient kernel backend (``"auto"``, ``"triton"``, ``"torch"``).
        per_sample: ``"auto"`` (ghost norms where they apply, else a loop over images),
            ``"ghost"`` or ``"loop"``.
        distributed: ``None`` (auto): under ``torchrun`` (``WORLD_SIZE > 1``) or in an
            initialised process group, every rank scores a contiguous block of the batches
            and all ranks return the single-process scores (see :mod:`elastic_fx.distributed`);
            every rank must make the same call. ``False``: this process scores alone.
            The baselines (``magnitude``, ``lamp``, ``random``, ``snip``) are never split.

    Raises:
        NumericalError: a loss or gradient was NaN/inf (the message names the batch).
        DataError: the images cannot be used. ScoresError: bad arguments.
    """
    method = METHOD_ALIASES.get(method, method)
    if method not in METHODS:
        raise ScoresError(f"method must be one of {METHODS} (or 'fisher'), got {method!r}.")
    ctx = current(False if method in ("magnitude", "lamp", "random", "snip") else distributed, device)
    cfg = PassConfig(batch_size=batch_size, mode=mode, seed=seed, num_images=num_images,
                     device=ctx.device(device), progress=progress,
                     amp_dtype=amp_dtype, backend=backend, per_sample=per_sample)
    if example_inputs is None and not (isinstance(model, fx.GraphModule) and EXAMPLE_INPUTS_META in model.meta):
        example_inputs = _example_from(images, preprocess)
        if example_inputs is not None:
            example_inputs = tuple(t.to(_device_of(model)) for t in example_inputs)
    gm, smap = resolve_model(model, example_inputs, structures)
    if method in ("magnitude", "lamp", "random", "snip"):
        from . import baselines

        if method == "snip":
            return baselines.snip_scores(gm, images, loss_fn=loss_fn, batch_size=batch_size, seed=seed,
                                         num_images=num_images, device=device, dino=dino, progress=progress,
                                         labels=labels, amp_dtype=amp_dtype, preprocess=preprocess,
                                         structures=smap)
        fn = {"magnitude": baselines.magnitude_scores, "lamp": baselines.lamp_scores}.get(method)
        return fn(gm, structures=smap) if fn else baselines.random_scores(gm, seed, structures=smap)

    objective, data, n_images = ctx.all_or_nothing(
        lambda: build_objective(gm, smap, method, loss_fn, images, cfg, dino=dino, labels=labels,
                                preprocess=preprocess), "loading the images")
    if ctx.enabled:
        ctx.check_same(checksums(gm), "model weights", SAME_WEIGHTS_HINT)
        ctx.check_same(checksums(data), "images", SAME_IMAGES_HINT)
    heads, neurons, stats = fisher_pass(gm, smap, objective, data, n_images, cfg, dist=ctx)
    config = {
        "batch_size": batch_size, "seed": seed, "num_images_requested": num_images,
        "amp_dtype": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        "backend": backend, **objective.extra, **stats,
    }
    log.info("local scores (%s, %s) of %d images in %.1f s (%.1f images/s)", objective.method, mode, n_images,
             stats["seconds"], stats["images_per_s"])
    return new_scores(smap, heads, neurons, method=objective.method, loss=objective.name, mode=mode,
                      num_images=n_images, config=config)
