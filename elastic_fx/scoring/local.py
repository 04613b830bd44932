"""Local (label-free) importance scores: squared gradients per attention head and FFN neuron.

    ls = efx.local_scores(model, images, method="dino", loss_fn=None, batch_size=16,
                          mode="per-batch", seed=0)
    ls.head_scores[b]     # fp32 [num_heads] of block b (block indices as in the StructureMap)
    ls.neuron_scores[b]   # fp32 [hidden_features]
    ls.save("vit.scores.safetensors"); ls = efx.LocalScores.load("vit.scores.safetensors", smap)

:func:`local_scores` takes a model (an ``nn.Module`` or a traced GraphModule) and images,
and returns a :class:`LocalScores`. It only chooses the method and calls the pieces:
:mod:`._resolve` (trace + discover, preprocessing), :mod:`.objective` (the loss and the
data), :mod:`.gradients` (the gradient pass) or :mod:`.baselines` (magnitude, LAMP, SNIP,
random). The model is left as it was found (see :mod:`.gradients` for what the pass
changes temporarily); a raw module is traced, which writes the trace into a new GraphModule.

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
  with ``l_i`` image ``i``'s own loss term (ghost norms where they apply, else
  micro-batches of one image; see :mod:`.gradients`). Ghost norms need a loss known to be
  a mean of per-image terms: the built-in ``"dino"`` and ``"ce"`` losses.

Scores are stored as RAW SUMS (``head_scores`` / ``neuron_scores``, the contract above).
The paper ranks structures by the *mean* over their parameters; ``head_means`` /
``neuron_means`` (or :meth:`LocalScores.normalized`) divide by the parameter count of one
head / neuron, which is what the budget ranks.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from ..data import PreprocessConfig
from ..distributed import SAME_IMAGES_HINT, SAME_WEIGHTS_HINT, checksums, current
from ..errors import ConfigError, ScoresError
from ..structures import StructureMap
from ..tracing import EXAMPLE_INPUTS_META
from ._resolve import example_inputs_from, resolve_model
from .dino import DinoConfig, LossFn
from .gradients import PassConfig, device_of, fisher_pass
from .objective import Images, build_objective

# Old import paths of names that moved to ._groups / .gradients (shims; nothing here uses them).
from ._groups import ScoredGroup, scored_groups, scored_parameters  # noqa: F401
from .gradients import MODES, batch_gradients, run_batches  # noqa: F401

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
BASELINES = ("magnitude", "lamp", "random", "snip")

#: Metadata key of a score file and the format version written.
SCORES_FORMAT = "elastic_fx"
SCORES_VERSION = 1


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
        DataError: the images cannot be used.
        ConfigError: an option has a value outside what it accepts (method, mode, batch size ...).
        ScoresError: the arguments do not fit together (``"ce"`` without labels,
            ``per_sample="ghost"`` where it cannot apply, a loss that is not a scalar).
    """
    method = METHOD_ALIASES.get(method, method)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS} (or 'fisher'), got {method!r}.")
    ctx = current(False if method in BASELINES else distributed, device)
    cfg = PassConfig(batch_size=batch_size, mode=mode, seed=seed, num_images=num_images,
                     device=ctx.device(device), progress=progress,
                     amp_dtype=amp_dtype, backend=backend, per_sample=per_sample)
    if example_inputs is None and not (isinstance(model, fx.GraphModule) and EXAMPLE_INPUTS_META in model.meta):
        example_inputs = example_inputs_from(images, preprocess)
        if example_inputs is not None:
            example_inputs = tuple(t.to(device_of(model)) for t in example_inputs)
    gm, smap = resolve_model(model, example_inputs, structures)
    if method in BASELINES:
        # imported here, not at the top: baselines.py imports LocalScores / new_scores from this
        # module until they move to elastic_fx/scores.py (then this import can go to the top)
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
