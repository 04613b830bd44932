"""slice(gm, smap, keep) -> a physically smaller GraphModule.

Takes a traced GraphModule, its StructureMap and a keep-mask
(``{block: {"heads": [...], "neurons": [...]}}``; blocks and keys not named are kept whole)
and returns a NEW module in which

* every parameter a removed head or neuron owned is gone: each ParamSlice's tensor is
  ``index_select``-ed into a new contiguous tensor (q/k/v rows, packed in-projection rows,
  composite-bias parts, out-projection columns, gated FFN rows, per-head bias tables ...);
* every constant that depended on the old width is rewritten: ``view``/``reshape``/
  ``expand``/``unflatten`` shape arguments, ``split`` sizes, slice bounds, and
  ``nn.Linear.in_features/out_features``. Which dims shrink is not guessed: the graph is
  run once with provenance labels (see ``_labels``) and, at every such node, the labels
  say which positions along each dim survive;
* ``nn.MultiheadAttention`` leaves with fewer heads become
  :class:`SlicedMultiheadAttention` (PyTorch's module ties the inner width to embed_dim).

:func:`slice_pass` returns a :class:`SliceResult` (the new module, and which parameters,
nodes and modules it changed); :func:`slice_graph` (``efx.slice``) returns its module.
The new module's meta is a copy of ``gm.meta`` without the StructureMap (its widths are
stale: run discover on the new module). The input module is left untouched.

Keep-masks are validated by :func:`elastic_fx.keep.normalize_keep`: removing *every*
head of an attention or every neuron of an FFN is refused with a :class:`SliceError` (the
budget module's floors always keep at least one); so are unknown blocks, out-of-range
and duplicate indices.

The result is checked before it is returned: ``graph.lint()``, then a run on the example
inputs in which every rewritten node must produce the predicted shape.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..errors import ElasticFxError, SliceError, first_line
from ..keep import KeepMask, normalize_keep
from ..structures import STRUCTURE_META, ParamSlice, StructureMap
from ..tracing import example_inputs_of, model_name
from ._attention import SlicedMultiheadAttention, find_cores, find_mha_nodes
from ._labels import LabelInterpreter, Watch, _fetch_attr, find_linears, op_name

log = logging.getLogger(__name__)

SHAPE_ARG_OPS = {"view", "reshape", "_unsafe_view", "expand", "unflatten"}
SPLIT_OPS = {"split", "split_with_sizes"}
SLICE_OPS = {"slice", "narrow", "getitem"}

Shape = Tuple[int, ...]


@dataclass
class SliceResult:
    """What :func:`slice_pass` returns: the new module and everything it changed.

    Attributes:
        module: the sliced GraphModule (``gm`` itself is untouched).
        sliced_params: ``{qualified name: (old shape, new shape)}`` of every parameter and
            buffer that lost entries (names as in ``gm``; MultiheadAttention ones included).
        rewritten_nodes: ``{node name: (old args, new args)}`` of every node whose width
            constants (shape arguments, split sizes, slice bounds) were rewritten.
        replaced_modules: qualified names of ``nn.MultiheadAttention`` leaves replaced by
            :class:`SlicedMultiheadAttention`.
    """

    module: fx.GraphModule
    sliced_params: Dict[str, Tuple[Shape, Shape]] = field(default_factory=dict)
    rewritten_nodes: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)
    replaced_modules: List[str] = field(default_factory=list)


def _slice_owners(smap: StructureMap, keep: Dict[int, Dict[str, List[int]]]) -> Dict[str, List[Tuple[ParamSlice, List[int]]]]:
    """parameter name -> [(slice, kept structure indices)]."""
    owners: Dict[str, List[Tuple[ParamSlice, List[int]]]] = {}
    for b in smap.blocks:
        for kind, g in (("heads", b.attention), ("neurons", b.mlp)):
            if g is None or (kind == "neurons" and not g.prunable):
                continue
            for s in g.slices:
                owners.setdefault(s.name, []).append((s, keep[b.index][kind]))
    return owners


# ----------------------------------------------------------------------------- the pass
def slice_graph(gm: fx.GraphModule, smap: StructureMap, keep: Optional[KeepMask]) -> fx.GraphModule:
    """Return a new GraphModule with only the kept heads and neurons (see module docstring)."""
    return slice_pass(gm, smap, keep).module


def slice_pass(gm: fx.GraphModule, smap: StructureMap, keep: Optional[KeepMask]) -> SliceResult:
    """:func:`slice_graph`, returning what it changed as well (a :class:`SliceResult`)."""
    if not isinstance(gm, fx.GraphModule):
        raise SliceError(f"slice() takes a GraphModule from efx.trace(), got {type(gm).__name__}")
    try:
        return _slice_pass(gm, smap, keep)
    except ElasticFxError:
        raise
    except Exception as e:  # a bug or an op we do not handle: still a user-facing error, with the cause
        raise SliceError(
            f"slicing {model_name(gm)} failed: {type(e).__name__}: {first_line(e)}. "
            "What to try: check that the structure map comes from efx.discover on this very GraphModule; keep "
            "the block's heads/neurons whole ({block: {}}) to slice around it; please report the model"
        ) from e


def _slice_pass(gm: fx.GraphModule, smap: StructureMap, keep: Optional[KeepMask]) -> SliceResult:
    full = normalize_keep(smap, keep)
    owners = _slice_owners(smap, full)
    mha_nodes = {n: n.target for n in find_mha_nodes(gm)}
    plan = _plan_rewrites(gm, smap, full, owners)
    new = copy.deepcopy(gm)
    new.meta = {k: v for k, v in gm.meta.items() if k != STRUCTURE_META}
    _slice_parameters(new, owners, skip_prefixes=tuple(f"{t}." for t in mha_nodes.values()))
    replaced = _replace_mha(new, smap, full, mha_nodes)
    rewritten = _rewrite_nodes(new, plan)
    new.graph.lint()
    new.recompile()
    _verify(new, plan)
    sliced = {}
    for name in owners:
        old, now = tuple(_fetch_attr(gm, name).shape), tuple(_fetch_attr(new, name).shape)
        if old != now:
            sliced[name] = (old, now)
    return SliceResult(new, sliced, rewritten, replaced)


def _kept_positions(entries: List[Tuple[ParamSlice, List[int]]], dim: int, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    for s, kept in entries:
        if s.dim == dim:
            m = torch.zeros(size, dtype=torch.bool)
            m[s.kept_positions(kept)] = True
            keep &= m
    return keep.nonzero().squeeze(1)


def _slice_parameters(gm: fx.GraphModule, owners, skip_prefixes: Tuple[str, ...]) -> None:
    linear_modules = {n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)}
    for name, entries in owners.items():
        if name.startswith(skip_prefixes):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        old = getattr(owner, attr)
        new = old.detach()
        for dim in sorted({s.dim for s, _ in entries}):
            new = new.index_select(dim, _kept_positions(entries, dim, new.shape[dim]).to(new.device))
        new = new.contiguous().clone()
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        elif attr in getattr(owner, "_buffers", {}):
            owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)
        else:  # a plain tensor attribute (torch.export's lifted constants)
            setattr(owner, attr, new)
        if owner_name in linear_modules and isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = owner.weight.shape


def _replace_mha(gm: fx.GraphModule, smap: StructureMap, keep, mha_nodes) -> List[str]:
    replaced = []
    by_core = {b.attention.core: b.index for b in smap.blocks if b.attention is not None and b.attention.kind == "mha"}
    for node, target in mha_nodes.items():
        bi = by_core.get(target)
        if bi is None:
            continue
        mha = gm.get_submodule(target)
        heads = keep[bi]["heads"]
        if len(heads) == mha.num_heads:
            continue
        parent, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, SlicedMultiheadAttention(mha, heads))
        replaced.append(target)
    return replaced


# ----------------------------------------------------------------------------- constants
def _kept_dims(interp: LabelInterpreter, lut, chans: List[Any], value: Any) -> Any:
    """Per dim, which positions survive (a position survives if any element there is kept)."""
    if isinstance(value, (tuple, list)):
        return [
            _kept_dims(interp, lut, [c[i] for c in chans if isinstance(c, (tuple, list))], v)
            for i, v in enumerate(value)
        ]
    if not isinstance(value, torch.Tensor):
        return None
    if value.numel() == 0:  # an empty tensor (zero class tokens, say): nothing to remove, every dim stays
        return [torch.ones(s, dtype=torch.bool) for s in value.shape]
    labelled = [c for c in chans if isinstance(c, torch.Tensor) and c.shape == value.shape]
    if not labelled:  # no provenance (e.g. a bias computed from q by einsum): nothing to rewrite or check
        return None
    kept = torch.ones(value.shape, dtype=torch.bool)
    for c in labelled:
        kept &= lut(c)
    return [kept.movedim(d, 0).reshape(value.shape[d], -1).any(1) for d in range(value.dim())]


def _plan_rewrites(gm, smap, keep, owners) -> Dict[str, Any]:
    """Run the ORIGINAL graph with labels; record surviving positions at every width-bearing node."""
    linears = find_linears(gm)
    cores = {c.node for c in find_cores(gm)}
    core_heads = {}
    for b in smap.blocks:
        if b.attention is not None and b.attention.kind != "mha":
            core_heads[b.attention.core] = keep[b.index]["heads"]
    interp_ref: List[LabelInterpreter] = []
    cache: Dict[int, torch.Tensor] = {}

    def source_lut(si: int) -> torch.Tensor:
        if si in cache:
            return cache[si]
        src = interp_ref[0].sources[si]
        lut = torch.ones(src.size, dtype=torch.bool)
        if src.kind == "linear":
            w = linears[src.key].weight
            for s, kept in owners.get(w, []):
                if s.dim == 0:
                    m = torch.zeros(src.size, dtype=torch.bool)
                    m[s.kept_positions(kept)] = True
                    lut &= m
        elif src.kind == "core" and src.key.name in core_heads:
            heads = torch.as_tensor(core_heads[src.key.name], dtype=torch.long)
            d = interp_ref[0].shapes[src.key][-1]
            lut = torch.isin(torch.arange(src.size) // d, heads)
        elif src.kind == "param":
            shape = tuple(_fetch_attr(gm, src.key).shape)
            for s, kept in owners.get(src.key, []):
                coord = torch.arange(src.size).view(shape).movedim(s.dim, 0).contiguous()
                m = torch.zeros(shape[s.dim], dtype=torch.bool)
                m[s.kept_positions(kept)] = True
                lut &= m[torch.arange(shape[s.dim]).view(-1, *([1] * (len(shape) - 1))).expand(coord.shape)].movedim(0, s.dim).reshape(-1)
        cache[si] = lut
        return lut

    def lut(ids: torch.Tensor) -> torch.Tensor:
        src, loc = interp_ref[0].decode(ids.reshape(-1).contiguous())
        kept = torch.ones(src.shape, dtype=torch.bool)
        for si in src.unique().tolist():
            if si < 0:
                continue
            m = src == si
            kept[m] = source_lut(si)[loc[m]]
        return kept.view(ids.shape)

    def summarise(node, value, chans):
        return _kept_dims(interp_ref[0], lut, chans, value)

    watch = Watch()
    for n in gm.graph.nodes:
        name = op_name(gm, n)
        if name in SHAPE_ARG_OPS or name in SPLIT_OPS:
            watch.add(n, "out", summarise)
        if name in SLICE_OPS and n.args and isinstance(n.args[0], fx.Node):
            watch.add(n.args[0], "in", summarise)
            watch.add(n, "out", summarise)
    interp = LabelInterpreter(gm, linears, cores, watch)
    interp_ref.append(interp)
    with torch.no_grad():
        interp.run(*example_inputs_of(gm))
    plan: Dict[str, Any] = {}
    for (node, key), kept in interp.summaries.items():
        plan.setdefault(node.name, {})[key] = kept
        plan[node.name].setdefault("shape", interp.shapes.get(node))
    return plan


def _new_size(kept_dim: torch.Tensor) -> int:
    return int(kept_dim.sum())


def _rewrite_nodes(gm: fx.GraphModule, plan: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Rewrite the width constants the plan calls for; ``{node name: (old args, new args)}``."""
    changed = {}
    for n in list(gm.graph.nodes):
        info = plan.get(n.name)
        if info is None:
            continue
        name = op_name(gm, n)
        before = n.args
        try:
            if name in SHAPE_ARG_OPS and "out" in info and info["out"] is not None:
                _rewrite_shape_args(n, name, info)
            elif name in SPLIT_OPS and info.get("out"):
                _rewrite_split(n, info)
            elif name in SLICE_OPS and info.get("in"):
                _rewrite_slice(n, name, info)
        except SliceError:
            raise
        except Exception as e:
            raise SliceError(f"could not rewrite the width constants at {n.format_node()}: {e}") from e
        if n.args != before:
            changed[n.name] = (before, n.args)
    return changed


def _changed(info) -> Optional[List[int]]:
    old = info["shape"]
    new = [_new_size(k) for k in info["out"]]
    return None if list(old) == new else new


def _rewrite_shape_args(n: fx.Node, name: str, info) -> None:
    new = _changed(info)
    if new is None:
        return
    old = list(info["shape"])
    if name == "unflatten":
        dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
        sizes = list(n.args[2] if len(n.args) > 2 else n.kwargs["sizes"])
        d0 = dim % len(old)
        for i in range(len(sizes)):
            if sizes[i] != -1 and old[d0 + i] != new[d0 + i]:
                sizes[i] = new[d0 + i]
        n.args = (n.args[0], dim, type(n.args[2])(sizes) if len(n.args) > 2 else sizes)
        return
    if len(n.args) == 2 and isinstance(n.args[1], fx.Node):
        return  # reshape(t.shape): follows t, which is already sliced consistently
    # shape given as varargs (Tensor.view(a, b, c)) or as one list/tuple argument
    packed = len(n.args) == 2 and isinstance(n.args[1], (list, tuple))
    shape = list(n.args[1] if packed else n.args[1:])
    if len(shape) != len(old):
        raise SliceError(f"shape arguments {shape} do not match the output rank {len(old)}")
    for i, a in enumerate(shape):
        if old[i] != new[i] and not (isinstance(a, int) and a == -1):
            shape[i] = _scaled_size(n, a, old[i], new[i])
    n.args = (n.args[0], type(n.args[1])(shape)) if packed else (n.args[0], *shape)


def _scaled_size(n: fx.Node, a: Any, old: int, new: int) -> Any:
    """The new size argument: ``new`` itself, or, for a size computed as ``batch * heads`` (heads
    folded into the batch axis, SAM), the same product with the new head count, so the batch
    stays dynamic."""
    if isinstance(a, fx.Node) and a.op == "call_function" and getattr(a.target, "__name__", "") == "mul":
        x, c = (a.args + (None, None))[:2]
        if isinstance(x, int) and not isinstance(c, int):
            x, c = c, x
        if isinstance(c, int) and c > 0 and old % c == 0 and (new * c) % old == 0:
            graph = n.graph
            with graph.inserting_before(n):
                return graph.call_function(a.target, (x, new * c // old))
    return new


def _rewrite_split(n: fx.Node, info) -> None:
    outs = info["out"]
    old_sizes, new_sizes = [], []
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    for kept, shape in zip(outs, info["shape"]):
        if kept is None:
            return
        old_sizes.append(shape[dim])
        new_sizes.append(_new_size(kept[dim]))
    if old_sizes == new_sizes:
        return
    if isinstance(n.args[1], int) and len(set(new_sizes[:-1])) <= 1 and new_sizes[-1] <= new_sizes[0]:
        arg: Any = new_sizes[0]
    else:
        arg = new_sizes
    n.args = (n.args[0], arg, *n.args[2:])


def _rewrite_slice(n: fx.Node, name: str, info) -> None:
    kept_in = info["in"]
    if not isinstance(kept_in, list) or kept_in and not isinstance(kept_in[0], torch.Tensor):
        return

    def remap(dim: int, start: Optional[int], stop: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
        k = kept_in[dim]
        size = k.numel()
        cum = torch.cat([torch.zeros(1, dtype=torch.long), k.long().cumsum(0)])
        def conv(x):
            if x is None:
                return None
            x = max(0, min(size, x + size if x < 0 else x))
            return int(cum[x])
        return conv(start), conv(stop)

    if name == "getitem":
        idx = n.args[1]
        items = idx if isinstance(idx, tuple) else (idx,)
        if not any(isinstance(i, slice) for i in items):
            return
        rank = len(kept_in)
        out, dim = [], 0
        for it in items:
            if it is Ellipsis:
                dim += rank - (len(items) - 1 - sum(1 for x in items if x is None))
                out.append(it)
                continue
            if it is None:
                out.append(it)
                continue
            if isinstance(it, slice) and (it.step in (None, 1)) and not bool(kept_in[dim].all()):
                s, e = remap(dim, it.start, it.stop)
                out.append(slice(s, e, it.step))
            else:
                out.append(it)
            dim += 1
        n.args = (n.args[0], tuple(out) if isinstance(idx, tuple) else out[0])
        return
    if name == "slice":  # aten.slice.Tensor(x, dim, start, end, step)
        args = list(n.args) + [None] * (5 - len(n.args))
        dim = args[1] or 0
        if bool(kept_in[dim].all()):
            return
        s, e = remap(dim, args[2], args[3] if args[3] is None or args[3] < (1 << 62) else None)
        n.args = (args[0], dim, s, e, *(a for a in args[4:5] if a is not None))
        return
    if name == "narrow":
        x, dim, start, length = n.args
        if bool(kept_in[dim].all()):
            return
        s, e = remap(dim, start, start + length)
        n.args = (x, dim, s, e - s)


def _verify(gm: fx.GraphModule, plan: Dict[str, Any]) -> None:
    """Run the sliced graph; every rewritten node must produce its predicted shape."""

    class Check(fx.Interpreter):
        def run_node(self, n):
            try:
                out = super().run_node(n)
            except Exception as e:
                raise SliceError(f"the sliced graph fails at {n.format_node()}: {e}") from e
            info = plan.get(n.name)
            if info and "out" in info and isinstance(out, torch.Tensor) and isinstance(info["out"], list):
                want = [_new_size(k) for k in info["out"]]
                if list(out.shape) != want:
                    raise SliceError(
                        f"the sliced graph computes shape {tuple(out.shape)} at {n.format_node()}, expected {tuple(want)}"
                    )
            return out

    with torch.no_grad():
        Check(gm).run(*example_inputs_of(gm))

