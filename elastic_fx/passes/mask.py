"""build_masked(gm, smap) -> MaskedModel: one forward scores many keep-masks at once.

The search scores every (candidate, sparsity) *pair* by the pooled embeddings of the
sub-network it keeps. Deep-copying and slicing the model per pair is what makes the
reference implementation slow. This pass instead rewrites a copy of the traced graph
so that it takes per-pair keep-masks:

* the image batch ``[B, 3, H, W]`` is repeated once per pair, pair-major, so every
  tensor in the graph carries ``P * B`` samples (index ``p * B + b``);
* **kept work only** (``gather=True``, the default): per pair, every in-projection of a
  group (q/k/v, fc1, gate) computes only the rows its kept heads or neurons own, and the
  out-projection reads only their columns, with gathered weights: one GEMM of
  ``B * tokens`` rows per pair (:class:`~._masked_modules._GatheredLinear`). A plain FFN
  (only elementwise ops between its projections) runs whole per pair on its kept neurons
  (:class:`~._masked_modules._GatheredFFN`), so no hidden feature of a removed neuron is
  computed or stored. The kept positions come from the host copy of the masks and reach
  the device in one copy per forward (no sync). Executed FLOPs equal those of the sliced
  models (``benchmarks/bench_search.py`` counts them);
* **out-projection masking** (where a projection cannot be gathered, and with
  ``gather=False``; alone already exact): the input of an attention out-projection is
  multiplied by the pair's head mask expanded over the head's columns, and the input of
  a prunable FFN out-projection (the hidden activations) by the pair's neuron mask. A
  removed structure then contributes exactly nothing, which is what the physically
  sliced model computes (slicing removes exactly those columns);
* **masked attention cores** (``use_kernel=True``, the FLOP saving): every
  ``scaled_dot_product_attention`` call and every simple explicit
  ``softmax(q @ kᵀ * s) @ v`` chain (found by :mod:`._attention`, as discovery finds
  them) becomes a call to a :class:`~._masked_modules._MaskedAttention` module on
  ``[P, B, H, N, d]`` views, which runs
  :func:`elastic_fx.kernels.masked_attention.masked_attention`, so masked (pair, head)
  combinations cost no attention FLOPs. Cores with an additive/boolean mask (relative
  position bias, padding) or a causal flag, which the kernel does not take, run dense
  SDPA with the masked heads' outputs zeroed. ``nn.MultiheadAttention`` leaves are
  replaced by the same decomposition slicing uses (:func:`._mha.mha_forward`), with
  masked attention, sharing the module's parameters;
* the output is the pooled embedding (:func:`elastic_fx.passes.embedding.embedding_module`),
  returned as ``[P, B, D]``; everything after it is removed.

Masks reach the graph through small stateful modules (:mod:`._masked_modules`) called
from ``call_module`` nodes, so ``masked.graph_module.code`` stays readable;
:meth:`MaskedModel.forward` sets them before it runs the graph and clears them afterwards.

Takes a traced GraphModule and its StructureMap; returns a :class:`MaskedModel`, which
owns a deep copy of ``gm``'s parameters, taken once when it is built: moving it to a GPU
or casting it to bf16 (:meth:`MaskedModel.cast`) leaves ``gm`` as it is, and later edits
of ``gm`` are not seen. ``gm`` is not modified. What the pass rewrote is listed in
``MaskedModel.rewrites`` and in ``graph_module.meta[MASK_META]``.

Masks that arrive on the device instead of the host cost one sync per forward (the kept
positions must be known to the host to size the GEMMs); :func:`masks_to` moves host masks.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..errors import DataError, SliceError
from ..structures import AttentionGroup, MlpGroup, StructureMap
from ..tracing import example_inputs_of
from ._attention import CoreCall, find_cores, find_mha_nodes, plain_attention
from ._labels import ACTIVATIONS, MUL_LIKE, UNARY_POINTWISE, LinearInfo, _fetch_attr, find_linears, op_name
from ._masked_modules import _GatheredFFN, _GatheredLinear, _MaskedAttention, _MaskedMHA, _MaskSlot, bind_positions
from .embedding import embedding_module

log = logging.getLogger(__name__)

__all__ = ["MaskedModel", "build_masked", "masks_to"]

#: ``GraphModule.meta`` key of the masked graph: what the pass rewrote (list of strings).
MASK_META = "elastic_fx.mask"

_ASSERT_METADATA = {"_assert_tensor_metadata"}
#: Ops whose dtype argument :meth:`MaskedModel.cast` retargets.
_CASTS = {"to", "_to_copy", "type"}


# ============================================================================ graph analysis
@dataclass
class _Rewrite:
    """Everything the pass decided, before it touches the graph."""

    slots: List[Tuple[str, int, object, List[fx.Node]]] = field(default_factory=list)  # kind, block, group, linears
    gathers: List[Tuple[str, int, object, LinearInfo, str, torch.Tensor, bool]] = field(default_factory=list)
    ffns: List[Tuple[int, object, List[LinearInfo], LinearInfo, torch.Tensor]] = field(default_factory=list)
    cores: Dict[int, CoreCall] = field(default_factory=dict)
    mhas: Dict[int, fx.Node] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


class _ShapeProbe(fx.Interpreter):
    """Runs a graph and records the shape of every tensor value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.shapes: Dict[fx.Node, Tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


class _BatchAxes:
    """Which axis of each node's value holds the batch: the graph is run on 2 and 3 images."""

    def __init__(self, gm: fx.GraphModule) -> None:
        example = example_inputs_of(gm)
        if not example or not isinstance(example[0], torch.Tensor) or example[0].dim() != 4:
            raise SliceError("the masked forward needs a model traced on an image batch [B, 3, H, W]")
        one = example[0][:1]
        self.runs = []
        for b in (2, 3):
            probe = _ShapeProbe(gm)
            try:
                with torch.no_grad():
                    probe.run(one.repeat(b, 1, 1, 1), *example[1:])
            except Exception as e:
                raise SliceError(
                    f"the traced graph does not run on a batch of {b} images ({type(e).__name__}: {e}); the "
                    "masked forward stacks pairs along the batch, so trace the model with a dynamic batch size "
                    "(efx.trace(model) does so unless the model specialises on it)"
                ) from e
            self.runs.append(probe.shapes)

    def rank(self, n: fx.Node) -> int:
        return len(self.runs[0][n])

    def __call__(self, n: fx.Node) -> int:
        a, b = self.runs[0].get(n), self.runs[1].get(n)
        diff = [] if a is None or b is None or len(a) != len(b) else [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) != 1 or a[diff[0]] * 3 != b[diff[0]] * 2:
            raise SliceError(
                f"cannot tell which axis of node '{n.name}' holds the batch (shapes {a} and {b} for 2 and 3 "
                "images); the masked forward needs every masked tensor to carry the batch on one axis"
            )
        return diff[0]


# ============================================================================ the model
class MaskedModel(nn.Module):
    """A copy of the traced graph that takes keep-masks; output: pooled embeddings per pair.

    ``forward(images [B, 3, H, W], head_masks {block: bool [P, H_b]},
    neuron_masks {block: bool [P, F_b]}) -> [P, B, D]``: row ``p`` equals the
    embedding of the physically sliced model that keeps what pair ``p``'s masks keep.
    Blocks missing from a dict are kept whole. See the module docstring for how;
    ``use_kernel`` replaces attention cores by masked attention, ``gather`` computes the
    projections per pair on the kept heads and neurons only. :meth:`cast` makes it compute
    in another dtype (bf16 weights on a GPU); images are cast to :attr:`dtype` on the way in.

    Attributes:
        smap: the StructureMap the masks refer to.
        graph_module: the rewritten GraphModule (readable with ``.code``).
        rewrites: one line per change the pass made (also in ``graph_module.meta[MASK_META]``).
    """

    def __init__(self, gm: fx.GraphModule, smap: StructureMap, *, use_kernel: bool = True, gather: bool = True) -> None:
        super().__init__()
        if not isinstance(gm, fx.GraphModule):
            raise SliceError(f"MaskedModel takes the GraphModule returned by efx.trace(), got {type(gm).__name__}")
        if not isinstance(smap, StructureMap):
            raise SliceError(f"MaskedModel takes the StructureMap from efx.discover(gm), got {type(smap).__name__}")
        self.smap = smap
        self.use_kernel = bool(use_kernel)
        self.gather = bool(gather)
        self.head_sizes: Dict[int, int] = {b.index: b.attention.num_heads for b in smap.blocks if b.attention}
        self.neuron_sizes: Dict[int, int] = {
            b.index: b.mlp.hidden_features for b in smap.blocks if b.mlp is not None and b.mlp.prunable
        }
        own = copy.deepcopy(gm)  # once per MaskedModel, never per candidate
        self.graph_module = embedding_module(own, smap).eval()
        self._head_sinks: Dict[int, List[nn.Module]] = {}
        self._neuron_sinks: Dict[int, List[nn.Module]] = {}
        self.rewrites: List[str] = []
        self._graph_device: Optional[torch.device] = None
        _rewrite(self)
        self.graph_module.meta[MASK_META] = list(self.rewrites)
        self._built_dtype = self.dtype
        # the build-time tensors, kept while the model computes in another dtype (see cast)
        self._built: Optional[List[Tuple[dict, str, torch.Tensor]]] = None

    # -------------------------------------------------------------- dtype
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in: its floating parameters' (float32 without any)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def cast(self, dtype: torch.dtype) -> "MaskedModel":
        """Compute in ``dtype`` from now on, e.g. bf16 weights on a GPU; returns ``self``.

        Every floating tensor the model owns (parameters, buffers, tensor constants) is cast
        from the copy taken when the model was built, which is kept while the model runs in
        another dtype: casting back gives the exact build-time weights again, so one model
        may serve fp32 and bf16 runs in any order. Casts the graph makes to the model's
        dtype (``x.to(torch.float32)`` baked in by torch.export, where the model wrote
        ``x.to(self.dtype)``) follow it. The source GraphModule is never touched.
        """
        old = self.dtype
        if dtype == old:
            return self
        self._follow_dtype(old, dtype)
        if self._built is None:
            once: Dict[int, torch.Tensor] = {}  # one entry per tensor, however many modules hold it
            self._built = [(store, name, once.setdefault(id(t), t.detach()))
                           for store, name, t in self._float_tensors()]
        cast: Dict[int, torch.Tensor] = {}  # a tensor shared by several modules stays shared
        for store, name, built in self._built:
            now = store[name]
            new = cast.get(id(built))
            if new is None:
                new = cast[id(built)] = built.to(device=now.device, dtype=dtype)
            if isinstance(now, nn.Parameter):
                now.data = new
            else:
                store[name] = new
        if dtype == self._built_dtype:
            self._built = None  # back to the build-time tensors themselves: nothing left to keep
        return self

    def _follow_dtype(self, old: torch.dtype, new: torch.dtype) -> None:
        """Point the graph's explicit casts to ``old`` (the model's dtype) at ``new``."""
        gm = self.graph_module
        changed = False
        for n in gm.graph.nodes:
            if n.op not in ("call_function", "call_method") or op_name(gm, n) not in _CASTS:
                continue
            args = tuple(new if a is old else a for a in n.args)
            kwargs = {k: new if v is old else v for k, v in n.kwargs.items()}
            if args != n.args or kwargs != n.kwargs:
                n.args, n.kwargs = args, kwargs
                changed = True
        if changed:
            gm.recompile()

    def _float_tensors(self):
        """``(store, name, tensor)`` of every floating tensor of the graph: parameters, buffers
        and plain tensor attributes (torch.export constants, a gathered FFN's bias)."""
        for mod in self.graph_module.modules():
            for store in (mod._parameters, mod._buffers, mod.__dict__):
                for name, t in list(store.items()):
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        yield store, name, t

    # -------------------------------------------------------------- masks in
    def _pairs(self, head_masks: Mapping, neuron_masks: Mapping) -> int:
        sizes = {int(m.shape[0]) for m in list(head_masks.values()) + list(neuron_masks.values())
                 if isinstance(m, torch.Tensor) and m.dim() >= 1}
        if len(sizes) > 1:
            raise SliceError(f"the masks disagree on the number of pairs: first dims {sorted(sizes)}")
        return sizes.pop() if sizes else 1

    def _check(self, kind: str, masks: Mapping, sizes: Dict[int, int], P: int, device) -> Dict[int, torch.Tensor]:
        unknown = sorted(set(masks) - set(sizes))
        if unknown:
            raise SliceError(
                f"{kind} masks name blocks {unknown}, which have no "
                f"{'attention' if kind == 'head' else 'prunable FFN'}; blocks with {kind}s: {sorted(sizes)}"
            )
        out = {}
        for bi, size in sizes.items():
            m = masks.get(bi)
            if m is None:
                out[bi] = torch.ones((P, size), dtype=torch.bool, device=device)
                continue
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (P, size):
                got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise SliceError(
                    f"block {bi}: the {kind} mask must be a bool tensor [pairs={P}, {kind}s={size}], got {got}; "
                    "build them with elastic_fx.keep.keep_tensors(smap, keeps)"
                )
            out[bi] = m
        return out

    def _set(self, head_masks: Mapping, neuron_masks: Mapping, device) -> int:
        head_masks, neuron_masks = head_masks or {}, neuron_masks or {}
        P = self._pairs(head_masks, neuron_masks)
        host_heads = self._check("head", head_masks, self.head_sizes, P, device)
        host_neurons = self._check("neuron", neuron_masks, self.neuron_sizes, P, device)
        heads, neurons = masks_to(device, host_heads, host_neurons)
        gathered, hosts = [], []
        for sinks, masks, host in ((self._head_sinks, heads, host_heads), (self._neuron_sinks, neurons, host_neurons)):
            for bi, mods in sinks.items():
                for mod in mods:
                    if isinstance(mod, (_GatheredLinear, _GatheredFFN)):
                        gathered.append(mod)
                        hosts.append(host[bi])  # kept positions from the host copy: no sync
                    else:
                        mod.set_mask(masks[bi])
        bind_positions(gathered, hosts, torch.device(device))
        return P

    def _clear(self) -> None:
        for sinks in (self._head_sinks, self._neuron_sinks):
            for mods in sinks.values():
                for mod in mods:
                    mod.clear()

    # -------------------------------------------------------------- forward
    def forward(
        self,
        images: torch.Tensor,
        head_masks: Optional[Mapping[int, torch.Tensor]] = None,
        neuron_masks: Optional[Mapping[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Embeddings ``[P, B, D]`` of every pair's sub-network on the same ``images [B, 3, H, W]``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"images must be a tensor [B, 3, H, W], got {got}")
        self._follow_device(images.device)
        P = self._set(head_masks, neuron_masks, images.device)
        try:
            x = images.to(self.dtype)
            x = x if P == 1 else x.repeat(P, 1, 1, 1)  # pair-major: row p * B + b
            emb = self.graph_module(x)
        finally:
            self._clear()
        return emb.reshape(P, images.shape[0], -1)

    def _follow_device(self, device: torch.device) -> None:
        """Point device constants baked into the graph (``arange(device=cpu)``, plain tensor
        attributes from torch.export) at the device the parameters now live on."""
        if self._graph_device == device:
            return
        gm = self.graph_module
        changed = False
        for n in gm.graph.nodes:
            dev = n.kwargs.get("device") if n.op == "call_function" else None
            if isinstance(dev, (torch.device, str)) and torch.device(dev) != device:
                n.kwargs = {**n.kwargs, "device": device}
                changed = True
            if n.op == "get_attr":
                owner_name, _, attr = n.target.rpartition(".")
                owner = gm.get_submodule(owner_name) if owner_name else gm
                val = getattr(owner, attr, None)
                is_state = attr in owner._parameters or attr in owner._buffers
                if isinstance(val, torch.Tensor) and not is_state and val.device != device:
                    setattr(owner, attr, val.to(device))
        if changed:
            gm.recompile()
        self._graph_device = device


# ============================================================================ the pass
def _rewrite(model: MaskedModel) -> None:
    gm, smap = model.graph_module, model.smap
    graph = gm.graph
    for n in list(graph.nodes):  # torch.export's dtype/device asserts: pure checks, pinned to the trace device
        if op_name(gm, n) in _ASSERT_METADATA and not n.users:
            graph.erase_node(n)
    axes = _BatchAxes(gm)
    out_value = next(n for n in graph.nodes if n.op == "output").args[0]
    if axes(out_value) != 0:
        raise SliceError(f"the embedding carries the batch on axis {axes(out_value)}; expected axis 0")
    plan = _plan(gm, smap, axes, model.use_kernel, model.gather)
    for kind, bi, group, linears in plan.slots:
        _insert_slot(model, kind, bi, group, linears, axes)
    for i, (kind, bi, group, li, mode, owner, packed) in enumerate(plan.gathers):
        _replace_linear(model, i, kind, bi, group, li, mode, owner, axes(li.input), packed)
    for bi, group, ins, out, owner in plan.ffns:
        _replace_ffn(model, bi, group, ins, out, owner, axes(out.input))
    for bi, core in plan.cores.items():
        _replace_core(model, bi, core, axes(core.q))
    for bi, node in plan.mhas.items():
        owner_name, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        mod = _MaskedMHA(getattr(owner, attr), bi, model.use_kernel)
        setattr(owner, attr, mod)
        model._head_sinks.setdefault(bi, []).append(mod)
        model.rewrites.append(f"block {bi}: nn.MultiheadAttention '{node.target}' -> decomposed masked attention")
    graph.eliminate_dead_code()
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    for note in plan.notes:
        log.info("masking: %s", note)
        model.rewrites.append(note)


def _insert_slot(model: MaskedModel, kind: str, bi: int, group, linears: List[fx.Node], axes: _BatchAxes) -> None:
    """Multiply the input of every call of ``group``'s out-projection by the pair's mask."""
    gm, graph = model.graph_module, model.graph_module.graph
    x = linears[0].args[0]
    ax = axes(x)
    if ax == axes.rank(x) - 1:
        raise SliceError(f"block {bi}: the batch axis of '{x.name}' is its feature axis; cannot mask {kind}")
    slot = _MaskSlot(kind, bi, group.size, group.out_slice().owner_map(), ax)
    name = f"efx_mask_{kind}_{bi}"
    gm.add_submodule(name, slot)
    for lin in linears:
        inp = lin.args[0]
        with graph.inserting_before(lin):
            masked = graph.call_module(name, (inp,))
        lin.replace_input_with(inp, masked)
    sinks = model._head_sinks if kind == "heads" else model._neuron_sinks
    sinks.setdefault(bi, []).append(slot)
    model.rewrites.append(f"block {bi}: {kind} mask on the input of {group.out_proj}")


def _replace_linear(model: MaskedModel, i: int, kind: str, bi: int, group, li: LinearInfo, mode: str,
                    owner: torch.Tensor, batch_axis: int, packed: bool) -> None:
    """Replace one linear call by a :class:`_GatheredLinear` sharing its parameters."""
    gm, graph = model.graph_module, model.graph_module.graph
    weight = _fetch_attr(gm, li.weight)
    bias = _fetch_attr(gm, li.bias) if li.bias is not None else None
    mod = _GatheredLinear(kind, bi, mode, owner, group.size, batch_axis, weight, bias, li.bias_node is not None,
                          packed=packed)
    name = f"efx_gather_{kind}_{bi}_{i}"
    gm.add_submodule(name, mod)
    args = (li.input,) + ((li.bias_node,) if li.bias_node is not None else ())
    with graph.inserting_before(li.node):
        new = graph.call_module(name, args)
    li.node.replace_all_uses_with(new)
    graph.erase_node(li.node)
    sinks = model._head_sinks if kind == "heads" else model._neuron_sinks
    sinks.setdefault(bi, []).append(mod)
    model.rewrites.append(f"block {bi}: {li.module} computed per pair on the kept {kind} only "
                          f"({mode}{', front-packed' if packed else ''})")


def _replace_ffn(model: MaskedModel, bi: int, group, ins: List[LinearInfo], out: LinearInfo, owner: torch.Tensor,
                 batch_axis: int) -> None:
    """Replace in-projections -> elementwise ops -> out-projection by one :class:`_GatheredFFN`."""
    gm, graph = model.graph_module, model.graph_module.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    # the elementwise segment: every node between the in-projections and the out-projection's input
    starts = {li.node for li in ins}
    seg_nodes, frontier = set(), list(starts)
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u is not out.node and u not in seg_nodes:
                seg_nodes.add(u)
                frontier.append(u)
    seg = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {li.node: seg.placeholder(f"hidden_{i}") for i, li in enumerate(ins)}
    for n in sorted(seg_nodes, key=order.__getitem__):
        env[n] = seg.node_copy(n, lambda a: env[a])
    seg.output(env[out.input])
    segment = fx.GraphModule(gm, seg)
    inputs: List[fx.Node] = []
    for li in ins:
        if li.input not in inputs:
            inputs.append(li.input)
    mod = _GatheredFFN(bi, owner, group.size, batch_axis,
                       [_fetch_attr(gm, li.weight) for li in ins],
                       [_fetch_attr(gm, li.bias) if li.bias is not None else None for li in ins],
                       [inputs.index(li.input) for li in ins],
                       _fetch_attr(gm, out.weight), _fetch_attr(gm, out.bias) if out.bias is not None else None,
                       segment)
    name = f"efx_ffn_{bi}"
    gm.add_submodule(name, mod)
    with graph.inserting_before(out.node):
        new = graph.call_module(name, tuple(inputs))
    out.node.replace_all_uses_with(new)
    graph.erase_node(out.node)
    for n in sorted(seg_nodes | starts, key=order.__getitem__, reverse=True):  # dropout is never dead code to fx
        if not n.users:
            graph.erase_node(n)
    model._neuron_sinks.setdefault(bi, []).append(mod)
    model.rewrites.append(f"block {bi}: FFN {', '.join(li.module for li in ins)} -> {out.module} computed per pair "
                          "on the kept neurons only")


def _replace_core(model: MaskedModel, bi: int, core: CoreCall, batch_axis: int) -> None:
    gm, graph = model.graph_module, model.graph_module.graph
    mod = _MaskedAttention(bi, batch_axis, core.scale, core.is_causal, core.k_transposed)
    name = f"efx_attention_{bi}"
    gm.add_submodule(name, mod)
    args = (core.q, core.k, core.v) + ((core.attn_mask,) if core.attn_mask is not None else ())
    with graph.inserting_before(core.node):
        new = graph.call_module(name, args)
    core.node.replace_all_uses_with(new)
    graph.erase_node(core.node)
    for n in core.chain:  # probabilities -> softmax -> scalings -> q @ kᵀ; dropout is never dead code to fx
        if not n.users:
            graph.erase_node(n)
    model._head_sinks.setdefault(bi, []).append(mod)
    model.rewrites.append(f"block {bi}: attention core '{core.node.name}' -> masked attention")


def _gatherable(gm: fx.GraphModule, li: LinearInfo, group, dim: int, axes: _BatchAxes) -> Optional[torch.Tensor]:
    """The owner map of ``li``'s weight along ``dim`` (0: output rows, 1: input columns), or
    None when the linear cannot be computed per pair (no such slice, a weight that is not a
    plain tensor attribute, a bias computed per sample, the batch on the feature axis)."""
    sl = next((s for s in group.slices if s.name == li.weight and s.dim == dim), None)
    if sl is None:
        return None
    try:
        weight = _fetch_attr(gm, li.weight)
    except AttributeError:
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or tuple(weight.shape) != tuple(sl.shape):
        return None
    if li.bias_node is not None and li.bias_node in data_nodes_of(gm):
        return None
    x = li.input
    if not isinstance(x, fx.Node) or axes.rank(x) < 2 or axes(x) == axes.rank(x) - 1:
        return None
    return sl.owner_map()


def data_nodes_of(gm: fx.GraphModule) -> set:
    from ._labels import data_nodes

    cached = gm.meta.get("_efx_data_nodes")
    if cached is None:
        cached = gm.meta["_efx_data_nodes"] = data_nodes(gm)
    return cached


_ELEMENTWISE = UNARY_POINTWISE | ACTIVATIONS | {"identity", "activation"}


def _packable(gm: fx.GraphModule, ins: List[LinearInfo], outs: List[LinearInfo], owners: List[torch.Tensor]) -> bool:
    """Whether the features between ``ins`` and ``outs`` may be front-packed per pair.

    True when every in-projection's output reaches only the out-projections, through
    elementwise ops (activations, dropout, casts, a scalar scale) and products of two such
    values (gating), and all in-projections order their features by the same owners: then
    no op in between depends on where a feature sits.
    """
    if not ins or not outs or any(not torch.equal(o, owners[0]) for o in owners[1:]):
        return False
    ends = {li.node for li in outs}
    path = {li.node for li in ins}
    frontier = list(path)
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in ends:
                if u.args[0] is not n:
                    return False  # feeds an out-projection as its weight or bias
                continue
            if u in path:
                continue
            name = op_name(gm, u)
            tensors = [a for a in u.all_input_nodes]
            if name in _ELEMENTWISE and u.args and u.args[0] is n and tensors == [n]:
                pass
            elif name in MUL_LIKE and all(a in path for a in tensors):
                pass
            else:
                return False
            path.add(u)
            frontier.append(u)
    return all(li.input in path for li in outs)


def _plan_gathers(gm: fx.GraphModule, plan: _Rewrite, kind: str, bi: int, group, infos: Dict[str, List[LinearInfo]],
                  axes: _BatchAxes, shared: frozenset = frozenset()) -> bool:
    """Plan the per-pair gathered projections of one group; True when its out-projection is
    gathered on every call (then it needs no mask slot). Projections in ``shared`` (used by
    another group too) are left whole."""
    if group.out_proj in shared:
        return False
    ins = []
    for name in group.in_projs:
        if name in shared:
            continue
        for li in infos.get(name, []):
            owner = _gatherable(gm, li, group, 0, axes)
            if owner is not None:
                ins.append((li, owner))
    outs = infos.get(group.out_proj, [])
    owners = [_gatherable(gm, li, group, 1, axes) for li in outs]
    if not outs or any(o is None for o in owners):
        plan.gathers += [(kind, bi, group, li, "rows", o, False) for li, o in ins]
        return False
    every_in = len(ins) == sum(len(infos.get(name, [])) for name in group.in_projs)
    packed = kind == "neurons" and every_in and _packable(gm, [li for li, _ in ins], outs,
                                                          [o for _, o in ins] + owners)
    in_lis = [li for li, _ in ins]
    if (packed and len(outs) == 1 and all(li.bias_node is None for li in in_lis + outs)
            and len({axes(li.input) for li in in_lis + outs}) == 1):
        plan.ffns.append((bi, group, in_lis, outs[0], owners[0]))  # the whole FFN per pair
        return True
    plan.gathers += [(kind, bi, group, li, "rows", o, packed) for li, o in ins]
    plan.gathers += [(kind, bi, group, li, "cols", o, packed) for li, o in zip(outs, owners)]
    return True


def _plan(gm: fx.GraphModule, smap: StructureMap, axes: _BatchAxes, use_kernel: bool, gather: bool = True) -> _Rewrite:
    """Decide every change before touching the graph (so a refusal leaves nothing half done)."""
    plan = _Rewrite()
    cores = {c.node.name: c for c in find_cores(gm)}
    by_module: Dict[str, List[fx.Node]] = {}
    infos: Dict[str, List[LinearInfo]] = {}
    for n, li in find_linears(gm).items():
        by_module.setdefault(li.module, []).append(n)
        infos.setdefault(li.module, []).append(li)
    # a projection shared by two groups (one fused input projection feeding attention and the
    # FFN) is not gathered: each group would replace the same node; it runs whole instead
    uses: Dict[str, int] = {}
    for b in smap.blocks:
        for g in (b.attention, b.mlp):
            for name in set(getattr(g, "in_projs", ()) or ()) | {getattr(g, "out_proj", None)} - {None}:
                uses[name] = uses.get(name, 0) + 1
    shared = {name for name, k in uses.items() if k > 1}
    for b in smap.blocks:
        a: Optional[AttentionGroup] = b.attention
        if a is not None and a.kind == "mha":
            node = _mha_node(gm, b.index, a)
            if node is None:
                plan.notes.append(_off_path(b.index, "attention", a.core))
            else:
                plan.mhas[b.index] = node
        elif a is not None:
            lins = by_module.get(a.out_proj, [])
            if not lins:
                plan.notes.append(_off_path(b.index, "attention", a.out_proj))
            else:
                if not (gather and _plan_gathers(gm, plan, "heads", b.index, a, infos, axes, shared)):
                    plan.slots.append(("heads", b.index, a, lins))
                if use_kernel:
                    _plan_core(gm, plan, b.index, a.core, cores, axes)
        m: Optional[MlpGroup] = b.mlp
        if m is not None and m.prunable:
            lins = by_module.get(m.out_proj, [])
            if not lins:
                plan.notes.append(_off_path(b.index, "FFN", m.out_proj))
            else:
                if not (gather and _plan_gathers(gm, plan, "neurons", b.index, m, infos, axes, shared)):
                    plan.slots.append(("neurons", b.index, m, lins))
    return plan


def _off_path(bi: int, what: str, name: str) -> str:
    return (f"block {bi}: the {what} '{name}' does not feed the embedding (the pooled output ends before it); "
            "its masks have no effect, as slicing it has none")


def _plan_core(gm: fx.GraphModule, plan: _Rewrite, bi: int, name: str, cores: Dict[str, Any],
               axes: _BatchAxes) -> None:
    core = cores.get(name)
    if core is None:
        if not any(n.name == name for n in gm.graph.nodes):
            plan.notes.append(f"block {bi}: the attention core is not in the embedding graph; left dense")
            return
        got, why = None, "not recognised as an attention core in the embedding graph"
    else:
        got, why = plain_attention(gm, core, axes.rank(core.node))
    if got is not None and axes(got.q) >= axes.rank(got.q) - 3:
        got, why = None, "its batch is not a leading dim"
    if got is not None and axes.rank(got.q) > 4:
        got, why = None, "its q has more than 4 dims (heads beside a windows axis)"
    if got is None:
        plan.notes.append(
            f"block {bi}: attention core '{name}' left dense ({why}); its heads are still masked exactly "
            "at the out-projection"
        )
        return
    plan.cores[bi] = got


def _mha_node(gm: fx.GraphModule, bi: int, a: AttentionGroup) -> Optional[fx.Node]:
    node = next((n for n in find_mha_nodes(gm) if n.target == a.core), None)
    if node is None:
        return None
    for u in node.users:
        if op_name(gm, u) == "getitem" and u.args[1] == 1 and u.users:
            raise SliceError(
                f"block {bi}: the model uses the attention weights of '{a.core}'; the masked forward does not "
                "compute them"
            )
    return node


# ============================================================================ mask transfer
def masks_to(device: torch.device | str, *dicts: Mapping[int, torch.Tensor]) -> Tuple[Dict[int, torch.Tensor], ...]:
    """The bool masks of ``dicts`` on ``device``, moved with ONE copy, not one per block.

    A blocking host-to-device copy waits for the GPU queue to drain, so one copy per
    block per forward would stall the GPU once per block. Masks already on ``device`` stay
    as they are; the others are packed into one flat tensor (pinned when going to CUDA),
    copied with ``non_blocking=True`` and split into views on the device.
    """
    device = torch.device(device)
    moving = [(di, k, m) for di, d in enumerate(dicts) for k, m in d.items() if m.device != device]
    out = [dict(d) for d in dicts]
    if not moving:
        return tuple(out)
    flat = torch.cat([m.reshape(-1) for _, _, m in moving])
    if device.type == "cuda" and flat.device.type == "cpu":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    start = 0
    for di, k, m in moving:
        out[di][k] = flat[start : start + m.numel()].view(m.shape)
        start += m.numel()
    return tuple(out)


# ============================================================================ public helpers
def build_masked(gm: fx.GraphModule, smap: StructureMap, **kw: Any) -> MaskedModel:
    """``MaskedModel(gm, smap, **kw)``: the graph of ``gm`` rewritten to take keep-masks."""
    return MaskedModel(gm, smap, **kw)
