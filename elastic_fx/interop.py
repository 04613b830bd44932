"""Read the score files published by the paper's reference code, without trusting them.

What the files hold
-------------------
The reference code saves ``torch.save(dict)`` with

* ``mlp_scores``  float32 ``[num_blocks, hidden_dim]``: one score per FFN hidden neuron,
* ``head_scores`` float32 ``[num_blocks, num_heads]``: one score per attention head,

both already multiplied by the searched block weights ``|c|`` (only the product is
stored; larger = more important, the lowest are pruned first), plus ``num_blocks``,
``hidden_dim``, ``embed_dim``, ``num_heads``, ``head_dim``, the per-block floors
``min_hidden_dim_keep_ratio`` / ``min_head_keep_ratio``, a ``metadata`` dict, and two Enum
members of the reference's own package (``model_type``, ``mlp_architecture``, from module
``src.models.enums``). Its GA weight dumps (``{"mlp": [L, hidden], "head": [L, H]}``) are
read too. Head ``h`` of block ``i`` is the same structure as ours: q/k/v rows
``h*head_dim:(h+1)*head_dim`` and the same input columns of the out-projection.

Why a special loader
--------------------
Those enums make the files unloadable with ``torch.load(weights_only=True)``, and plain
unpickling would run whatever a tampered file asks for. :func:`load_reference_scores`
first lists every global the pickle references *without executing it*
(``torch.serialization.get_unsafe_globals_in_checkpoint``), refuses the file if any global
lies outside the reference's own package (``os.system``, ``builtins.eval``,
``subprocess.*``, ``functools.partial`` ...), and otherwise loads it with torch's
hardened ``weights_only`` unpickler, in which each reference global is bound to an inert
:class:`ReferenceObject` stand-in that only records the arguments it was built with. The
reference package is never imported.

From the reference's two ratios to our one sparsity
---------------------------------------------------
The reference ranks neurons and heads separately and prunes a fraction ``mlp_ratio`` of all
FFN neurons and ``head_ratio`` of all heads. elastic_fx labels a sub-network by one number,
the fraction of prunable block parameters removed (heads + neurons, each counted with every
parameter it owns). A pair therefore corresponds to::

    sparsity = (mlp_ratio * neuron_params + head_ratio * head_params) / (neuron_params + head_params)

where ``neuron_params`` / ``head_params`` are the parameters owned by all neurons / heads.
For ViT-B/16 a neuron owns 768 + 1 + 768 = 1537 parameters (fc1 row and bias, fc2 column),
a head 4 * 64 * 768 + 3 * 64 = 196 800 (q/k/v rows and biases, proj columns), so the
neurons own 56.66 M and the heads 28.34 M parameters, and the pair (0.35, 0.2) is
sparsity (0.35 * 56.66 + 0.2 * 28.34) / 85.00 = 0.300. :func:`ratios_to_sparsity` computes
this from a :class:`~elastic_fx.structures.StructureMap`. The per-block floors can keep a few
more structures than the ratios ask for, so the reference's actual sub-network may be
slightly denser. (The reference's own log line divides by *all* model parameters instead.)
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

from .budget import Floors
from .errors import BudgetError, ScoresError
from .scores import ElasticScores, new_scores

logger = logging.getLogger(__name__)

#: The reference's ``ModelType`` values and the timm model each was computed on.
REFERENCE_MODEL_TYPES: Dict[str, str] = {
    "deit-vit-b-16": "deit_base_distilled_patch16_224.fb_in1k",
    "deit-3-vit-s-16": "deit3_small_patch16_224.fb_in22k_ft_in1k",
    "deit-3-vit-b-16": "deit3_base_patch16_224.fb_in22k_ft_in1k",
    "deit-3-vit-l-16": "deit3_large_patch16_224.fb_in22k_ft_in1k",
    "deit-3-vit-h-14": "deit3_huge_patch14_224.fb_in22k_ft_in1k",
    "augreg-vit-s-16-in21k-ft-in1k": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "augreg-vit-b-16-in21k-ft-in1k": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "augreg-vit-l-16-in21k-ft-in1k": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3.lvd1689m",
    "siglip2-vit-b16": "vit_base_patch16_siglip_224.v2_webli",
    "siglip2-vit-g16": "vit_giantopt_patch16_siglip_256.v2_webli",
}

#: Top-level packages of the reference code whose globals become inert stand-ins.
REFERENCE_PACKAGES: Tuple[str, ...] = ("src",)


# ----------------------------------------------------------------------------- stand-ins
class ReferenceObject:
    """Inert stand-in for a class or enum of the reference's package.

    Calling it (or building it through pickle) records the arguments and the state and does
    nothing else. ``ref_path`` is the ``module.name`` it replaces. For an Enum member,
    ``value`` is the member's value (pickle rebuilds members as ``EnumClass(value)``).
    """

    ref_path: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "ReferenceObject":
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """The single constructor argument (an Enum member's value), else None."""
        return self.args[0] if len(self.args) == 1 and not self.kwargs else None

    def __repr__(self) -> str:
        return f"<reference {self.ref_path}{self.args!r}>"


def _stand_in(path: str) -> Type[ReferenceObject]:
    """A fresh ReferenceObject subclass named after the global it replaces."""
    return type(path.rsplit(".", 1)[-1], (ReferenceObject,), {"ref_path": path, "__module__": __name__})


def _is_reference_global(path: str, packages: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in packages)


# ----------------------------------------------------------------------------- the result
@dataclass
class ReferenceScores:
    """One reference score file, checked and converted to plain data.

    ``floors`` is ``{"neurons": min kept fraction, "heads": min kept fraction}`` when the file
    records them. ``model_type`` is the reference's ``ModelType`` value (e.g.
    ``"dino_vitb16"``); ``stand_ins`` lists the reference globals that were replaced by
    :class:`ReferenceObject` while loading.
    """

    mlp_scores: Tensor  # float32 [num_blocks, hidden_dim]
    head_scores: Tensor  # float32 [num_blocks, num_heads]
    num_blocks: int
    hidden_dim: int
    num_heads: int
    embed_dim: Optional[int] = None
    head_dim: Optional[int] = None
    floors: Optional[Dict[str, float]] = None
    model_type: Optional[str] = None
    mlp_architecture: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)
    raw_keys: Tuple[str, ...] = ()
    stand_ins: Tuple[str, ...] = ()
    source: str = ""

    @property
    def timm_model(self) -> Optional[str]:
        """The timm model the reference computed these scores on, if known."""
        return REFERENCE_MODEL_TYPES.get(self.model_type or "")

    def describe(self) -> str:
        """One line for logs and the CLI."""
        model = f"{self.model_type} (timm: {self.timm_model})" if self.model_type else "unknown model"
        return (
            f"{model}: {self.num_blocks} blocks x {self.hidden_dim} FFN neurons, "
            f"{self.num_heads} heads of dim {self.head_dim}, embed_dim {self.embed_dim}, floors {self.floors}"
        )


# ----------------------------------------------------------------------------- loading
def _unpickle_safely(path: str, packages: Sequence[str]) -> Tuple[Any, Tuple[str, ...]]:
    """``torch.load(weights_only=True)`` with reference globals bound to stand-ins."""
    try:
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError:
        found = None  # not a zip checkpoint (legacy torch.save format): weights_only decides alone
    except (zipfile.BadZipFile, RuntimeError, OSError, pickle.UnpicklingError) as e:
        raise ScoresError(f"{path} is not a readable torch.save file ({e}); was it truncated during download?") from e

    stand_ins: Dict[str, Type[ReferenceObject]] = {}
    for name in found or ():
        if not _is_reference_global(name, packages):
            raise ScoresError(
                f"refusing to load {path}: the file references {name}, which could execute code. "
                f"Only tensors, plain Python containers and the reference code's own classes "
                f"(packages {list(packages)}) are accepted; if you produced this file yourself, "
                "re-save it with plain types only"
            )
        stand_ins[name] = _stand_in(name)

    allow = [(cls, name) for name, cls in stand_ins.items()]
    try:
        with torch.serialization.safe_globals(allow):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ScoresError(
            f"refusing to load {path}: torch's safe unpickler rejected it ({_unpickler_reason(e)}). The "
            "file holds objects beyond tensors, plain containers and the reference code's enums, which "
            "could execute code"
        ) from e
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError) as e:
        raise ScoresError(f"{path} is not a readable torch.save file ({type(e).__name__}: {e})") from e
    return data, tuple(stand_ins)


#: Score tensors larger than this are refused before anything is computed on them.
MAX_SCORE_ELEMENTS = 50_000_000


def _check_declared_sizes(obj: Any, path: str, seen: Optional[set] = None) -> None:
    """Refuse tensors whose declared shape exceeds the values the file stores (stride 0,
    overlapping views) or any score table's plausible size, before one is materialised."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        stored = obj.untyped_storage().nbytes() // max(obj.element_size(), 1)
        if obj.numel() > MAX_SCORE_ELEMENTS or obj.numel() > stored:
            raise ScoresError(
                f"{path}: a tensor declares shape {list(obj.shape)} ({obj.numel()} values) but the file stores "
                f"{stored}; reference score tables are [num_blocks, width], stored in full. The file is malformed "
                "or crafted: re-download it"
            )
        return
    if isinstance(obj, ReferenceObject):
        _check_declared_sizes(obj.args, path, seen)
        _check_declared_sizes(obj.state, path, seen)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _check_declared_sizes(v, path, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_declared_sizes(v, path, seen)


def _unpickler_reason(e: Exception) -> str:
    """The specific part of torch's weights_only error (its generic advice does not apply here)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())


def _plain(obj: Any) -> Any:
    """Replace stand-ins by their value (Enum members) or their recorded data, recursively."""
    if isinstance(obj, ReferenceObject):
        if obj.value is not None:
            return obj.value
        return {"__reference__": obj.ref_path, "args": _plain(list(obj.args)), "state": _plain(obj.state)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _int_field(data: Mapping[str, Any], key: str, path: str) -> Optional[int]:
    if key not in data or data[key] is None:
        return None
    v = data[key]
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ScoresError(f"{path}: field {key!r} should be a positive integer, found {v!r}")
    return v


def _score_tensor(data: Mapping[str, Any], key: str, what: str, path: str) -> Tensor:
    t = data[key]
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        got = f"a tensor of shape {list(t.shape)} and dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ScoresError(f"{path}: {key!r} should be a float tensor [num_blocks, {what}], found {got}")
    if not bool(torch.isfinite(t).all()):
        raise ScoresError(f"{path}: {key!r} contains NaN or inf; the file is corrupt, re-download or recompute it")
    return t.detach().to(torch.float32).contiguous()


def load_reference_scores(path: "str | os.PathLike[str]", *, packages: Sequence[str] = REFERENCE_PACKAGES) -> ReferenceScores:
    """Load and check one reference score file; never executes code from it.

    Raises:
        ScoresError: the file is missing or unreadable, references a global outside
            ``packages`` (it could execute code), or its tensors disagree with its shape fields.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ScoresError(f"{path} is a directory, not a score file; give the reference code's .pt score file")
    if not os.path.isfile(path):
        raise ScoresError(f"score file {path} does not exist; download it from the reference code's scores/ folder")
    data, stand_ins = _unpickle_safely(path, packages)
    _check_declared_sizes(data, path)
    if isinstance(data, ReferenceObject) and isinstance(data.state, Mapping):
        data = data.state  # a pickled dataclass instance rather than its asdict()
    if not isinstance(data, Mapping):
        raise ScoresError(f"{path}: expected a dict of scores, found {type(data).__name__}")
    data = _plain(data)
    keys = tuple(str(k) for k in data)

    if "mlp_scores" in data and "head_scores" in data:
        mlp = _score_tensor(data, "mlp_scores", "hidden_dim", path)
        heads = _score_tensor(data, "head_scores", "num_heads", path)
        mlp_key, head_key = "mlp_scores", "head_scores"
    elif "mlp" in data and "head" in data:  # the reference's GA weight dump
        mlp = _score_tensor(data, "mlp", "hidden_dim", path)
        heads = _score_tensor(data, "head", "num_heads", path)
        mlp_key, head_key = "mlp", "head"
    else:
        raise ScoresError(
            f"{path}: not a reference score file; expected keys 'mlp_scores' and 'head_scores' "
            f"(or 'mlp' and 'head'), found {sorted(keys)}"
        )

    fields = {k: _int_field(data, k, path) for k in ("num_blocks", "hidden_dim", "num_heads", "embed_dim", "head_dim")}
    expected = {
        "num_blocks": (mlp.shape[0], f"{mlp_key} {list(mlp.shape)}"),
        "hidden_dim": (mlp.shape[1], f"{mlp_key} {list(mlp.shape)}"),
        "num_heads": (heads.shape[1], f"{head_key} {list(heads.shape)}"),
    }
    if heads.shape[0] != mlp.shape[0]:
        raise ScoresError(
            f"{path}: {mlp_key} has {mlp.shape[0]} blocks but {head_key} has {heads.shape[0]} "
            f"(shapes {list(mlp.shape)} and {list(heads.shape)}); the file is inconsistent"
        )
    for key, (actual, where) in expected.items():
        if fields[key] is not None and fields[key] != actual:
            raise ScoresError(
                f"{path}: field {key}={fields[key]} disagrees with {where}; expected "
                f"{mlp_key} [num_blocks, hidden_dim] and {head_key} [num_blocks, num_heads]"
            )
    floors = None
    if "min_hidden_dim_keep_ratio" in data or "min_head_keep_ratio" in data:
        floors = {
            "neurons": float(data.get("min_hidden_dim_keep_ratio", 0.0)),
            "heads": float(data.get("min_head_keep_ratio", 0.0)),
        }
    model_type = data.get("model_type")
    arch = data.get("mlp_architecture")
    metadata = data.get("metadata") if isinstance(data.get("metadata"), Mapping) else {}
    ref = ReferenceScores(
        mlp_scores=mlp,
        head_scores=heads,
        num_blocks=int(mlp.shape[0]),
        hidden_dim=int(mlp.shape[1]),
        num_heads=int(heads.shape[1]),
        embed_dim=fields["embed_dim"],
        head_dim=fields["head_dim"],
        floors=floors,
        model_type=None if model_type is None else str(model_type),
        mlp_architecture=None if arch is None else str(arch),
        metadata=dict(metadata),
        raw_keys=keys,
        stand_ins=stand_ins,
        source=path,
    )
    logger.info("loaded reference scores %s: %s", path, ref.describe())
    return ref


# ----------------------------------------------------------------------------- checks
def check_against(ref: ReferenceScores, blocks_description: List[dict]) -> None:
    """Raise ScoresError naming the first block/field where ``ref`` does not fit the model.

    ``blocks_description`` is :meth:`StructureMap.describe` output (in execution order);
    row ``i`` of the score tensors belongs to the ``i``-th described block.
    """
    made_for = f" (the file was made for {ref.model_type}" + (
        f", timm model {ref.timm_model})" if ref.timm_model else ")"
    ) if ref.model_type else ""
    hint = f"; import it for the model it was computed on{made_for}"
    if len(blocks_description) != ref.num_blocks:
        raise ScoresError(
            f"the score file has {ref.num_blocks} blocks (mlp_scores {list(ref.mlp_scores.shape)}) "
            f"but the model has {len(blocks_description)} blocks{hint}"
        )
    for desc in blocks_description:
        idx = desc.get("index")
        checks = [
            ("num_heads", desc.get("num_heads"), ref.num_heads, f"head_scores {list(ref.head_scores.shape)}"),
            ("head_dim", desc.get("head_dim"), ref.head_dim, "field head_dim"),
            ("hidden_features", desc.get("hidden_features"), ref.hidden_dim, f"mlp_scores {list(ref.mlp_scores.shape)}"),
        ]
        for name, ours, theirs, where in checks:
            if theirs is None:  # not recorded in the file (GA weight dumps have no head_dim)
                continue
            if ours != theirs:
                found = "absent" if ours is None else ours
                raise ScoresError(
                    f"block {idx}: {name} is {found} in the model but {theirs} in the score file ({where}){hint}"
                )
        if desc.get("mlp_prunable") is False:
            raise ScoresError(
                f"block {idx}: the score file scores its FFN neurons, but this model's FFN in that block "
                f"is not prunable (see StructureMap.summary()){hint}"
            )


def ratios_to_sparsity(mlp_ratio: float, head_ratio: float, structure_map: Any) -> float:
    """Our single sparsity for a reference (mlp_ratio, head_ratio) pair (see module docstring).

    ``structure_map`` is a :class:`~elastic_fx.structures.StructureMap`; the result is the
    fraction of its prunable parameters that the pair removes, before per-block floors.
    """
    for name, r in (("mlp_ratio", mlp_ratio), ("head_ratio", head_ratio)):
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0.0 <= r <= 1.0):
            raise BudgetError(f"{name} must be a fraction in [0, 1], got {r!r}; e.g. mlp_ratio=0.35, head_ratio=0.2")
    neuron_params = head_params = 0
    for block in structure_map.blocks:
        if block.attention is not None:
            head_params += block.attention.num_heads * block.attention.params_per_head
        if block.mlp is not None and block.mlp.prunable:
            neuron_params += block.mlp.hidden_features * block.mlp.params_per_neuron
    total = neuron_params + head_params
    if total == 0:
        raise BudgetError("the structure map has no prunable heads or neurons; nothing to convert")
    return (mlp_ratio * neuron_params + head_ratio * head_params) / total


def from_reference(ref: ReferenceScores, smap: Any) -> ElasticScores:
    """ElasticScores from the reference implementation's published score file.

    Its ``head_scores [L, H]`` and ``mlp_scores [L, hidden]`` are already the final
    per-structure scores (local score x |c|), so they become per-structure scores
    (``normalized``: not divided by parameter counts again) with ``c = 1``. The reference
    ranks heads and neurons separately with two ratios; ``budget_masks(..., mlp_ratio=,
    head_ratio=)`` reproduces that, and ``sparsity=`` ranks both kinds together (see
    :func:`ratios_to_sparsity`).
    """
    check_against(ref, smap.describe())
    heads = {b.index: ref.head_scores[i] for i, b in enumerate(smap.blocks) if b.attention is not None}
    neurons = {b.index: ref.mlp_scores[i] for i, b in enumerate(smap.blocks) if b.mlp is not None and b.mlp.prunable}
    floors = Floors()
    if ref.floors:
        floors = Floors(head_fraction=float(ref.floors.get("heads", floors.head_fraction)),
                        neuron_fraction=float(ref.floors.get("neurons", floors.neuron_fraction)))
    local = new_scores(smap, heads, neurons, method="reference-import", loss="unknown", mode="unknown", num_images=0,
                       config={"normalized": True, "source": ref.source, "model_type": ref.model_type})
    scores = ElasticScores.from_local(local, smap, floors)
    scores.config.update({"method": "reference-import", "source": ref.source, "model_type": ref.model_type})
    return scores
