"""discover(gm) -> StructureMap: attention heads and FFN neurons, from the graph alone.

No module names, no per-family adapters. The pass

1. finds the *attention cores*: ``scaled_dot_product_attention`` calls, explicit
   ``softmax(q @ kᵀ) @ v`` chains, and ``nn.MultiheadAttention`` leaf modules;
2. runs the graph once with provenance labels (:mod:`._labels`) to learn which rows of
   which linear layers reach each head of q, k and v, which linear consumes each head's
   output (the out-projection), and which linear layers feed another linear through
   pointwise ops only (an FFN: in-projection(s) -> activation / gate -> out-projection);
3. turns each into a :class:`~elastic_fx.structures.ParamSlice` list, including composite
   biases (``cat(q_bias, k_bias, v_bias)``) and per-head tables added to the attention
   logits (relative position bias);
4. orders everything into blocks by execution order, and finds the pooled embedding.

Head count and head_dim are read from the shapes the graph computes at the core
(``[..., heads, tokens, head_dim]``; the heads' axis is where the labels vary, so
``[B, heads, windows, tokens, head_dim]`` reads too), never assumed. Parameters that meet the
heads or neurons elementwise (a per-head q/k scale or temperature, a hidden bias added after
its projection) are sliced with them. An FFN whose hidden activations are normalised across
neurons (a LayerNorm over the hidden dim) is recorded as not prunable. An attention operation
found but not prunable (heads mixed across, folded into the batch, a per-head table shared by
several blocks ...) still opens its block, with the reason in ``Block.attention_reason`` (shown
by ``summary()`` and logged); its FFN is pruned as usual.

Any failure inside the analysis is raised as a :class:`~elastic_fx.errors.DiscoveryError`
naming the model.

Takes a GraphModule from :func:`elastic_fx.trace` (it runs it once on the example inputs
stored in its meta); returns a :class:`~elastic_fx.structures.StructureMap`. What it
writes: ``gm.meta[STRUCTURE_META]`` (``"elastic_fx.structure"``) = that StructureMap,
read back with :func:`elastic_fx.structures.structures_of`. Nothing else of ``gm`` (its
graph, parameters, node meta) is changed. Attention cores are found by
:mod:`._attention`, the same way slicing and masking find them.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..errors import DiscoveryError, ElasticFxError, first_line
from ..structures import STRUCTURE_META, AttentionGroup, Block, MlpGroup, ParamSlice, StructureMap, structures_of
from ..tracing import TRACER_META, example_inputs_of, model_name, trace
from ._attention import AttentionCore, find_cores, find_mha_nodes, find_unresolved, mha_head_rows
from ._labels import (
    ADD_LIKE, MUL_LIKE, LabelInterpreter, LinearInfo, Watch, _fetch_attr, data_nodes, find_linears, head_table, op_name,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- summaries
def _sum_heads(head_axis: Optional[int], dim_axis: int):
    def fn(node, value, chans):
        return head_table(chans, head_axis, dim_axis)

    return fn


def _sum_per_head(node, value, chans):
    """Per-head unique ids of a tensor added to the logits ([..., H, N, M])."""
    out = []
    for c in chans:
        if isinstance(c, torch.Tensor) and c.dim() >= 3:
            out.append([torch.unique(c.select(-3, h)) for h in range(c.shape[-3])])
    return out


def _sum_row(node, value, chans):
    """Labels of a linear's input along its feature dim, and whether they hold at every position."""
    out = []
    for c in chans:
        if not isinstance(c, torch.Tensor) or c.dim() == 0:
            continue
        rows = c.reshape(-1, c.shape[-1])
        out.append((rows[0].clone(), bool((rows == rows[0]).all())))
    return out


def _sum_vector(node, value, chans):
    return [c.clone() for c in chans if isinstance(c, torch.Tensor) and c.dim() == 1]


# ----------------------------------------------------------------------------- analysis
class _Analysis:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.linears: Dict[fx.Node, LinearInfo] = find_linears(gm)
        self.cores = find_cores(gm)
        self.mhas = find_mha_nodes(gm)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.notes: List[str] = []
        watch = Watch()
        for li in self.linears.values():
            watch.add(li.input, f"in:{li.node.name}", _sum_row)
            if li.bias_node is not None:
                watch.add(li.bias_node, f"bias:{li.node.name}", _sum_vector)
        for c in self.cores:
            # the heads' axis is read from the labels (-3 for [..., H, N, d]; -4 with a windows axis)
            watch.add(c.q, f"q:{c.node.name}", _sum_heads(None, -1))
            watch.add(c.k, f"k:{c.node.name}", _sum_heads(None, -2) if c.k_transposed else _sum_heads(None, -1))
            watch.add(c.v, f"v:{c.node.name}", _sum_heads(None, -1))
            for e in c.extras:
                watch.add(e, f"extra:{c.node.name}", _sum_per_head)
        # parameters (or tensors computed from them) multiplied into or added to the data:
        # per-head q/k norm scales, per-head temperatures, per-head gates ...
        self.data = data = data_nodes(gm)
        self.scalings: List[fx.Node] = []
        for n in gm.graph.nodes:
            if op_name(gm, n) in MUL_LIKE | ADD_LIKE and any(a not in data for a in n.all_input_nodes) and any(
                a in data for a in n.all_input_nodes
            ):
                watch.add(n, "pairs", self._sum_pairs)
                self.scalings.append(n)
        self.interp = LabelInterpreter(gm, self.linears, {c.node for c in self.cores}, watch)
        with torch.no_grad():
            self.interp.run(*example_inputs_of(gm))
        self.sum = self.interp.summaries
        self.src_of = {(s.kind, s.key): i for i, s in enumerate(self.interp.sources)}

    def _sum_pairs(self, node, value, chans):
        """Unique (data id, parameter id) pairs an elementwise op combines, or None."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        labels = self.interp.labels
        data = self.interp.data
        d = [labels[a][0] for a in node.all_input_nodes if a in data and a in labels and isinstance(labels[a][0], torch.Tensor)]
        c = [labels[a][0] for a in node.all_input_nodes if a not in data and a in labels and isinstance(labels[a][0], torch.Tensor)]
        if not d or not c:
            return None
        try:
            dl, cl = d[0].expand(value.shape), c[0].expand(value.shape)
        except RuntimeError:
            return None
        if value.dim() >= 2:  # labels never depend on the batch position
            dl, cl = dl[0], cl[0]
        pairs = torch.stack([dl.reshape(-1), cl.reshape(-1)])
        pairs = pairs[:, (pairs >= 0).all(0)]
        return torch.unique(pairs, dim=1) if pairs.numel() else None

    def per_structure_params(self, owners: Dict[int, torch.Tensor], n: int, what: str,
                             skip: Sequence[str] = ()) -> Optional[List[ParamSlice]]:
        """Parameters combined elementwise with the structures' features, sliced per structure.

        ``owners`` maps a label source to the owning structure of each of its features. A
        parameter element met by one structure only is that structure's; one met by all of
        them is shared (broadcast, nothing to slice). Returns None (with a note) for a
        parameter that is neither.
        """
        per_param: Dict[int, List[set]] = {}
        for node in self.scalings:
            pairs = self.sum.get((node, "pairs"))
            if pairs is None:
                continue
            dsrc, dloc = self.decode(pairs[0])
            psrc, ploc = self.decode(pairs[1])
            head = torch.full(dsrc.shape, -1, dtype=torch.long)
            for s, own in owners.items():
                m = dsrc == s
                head[m] = own[dloc[m]]
            hit = (head >= 0) & (psrc >= 0)
            for ps in psrc[hit].unique().tolist():
                if self.source(ps).kind != "param" or self.source(ps).key in skip:
                    continue
                m = hit & (psrc == ps)
                sets = per_param.setdefault(ps, [set() for _ in range(n)])
                for h, e in zip(head[m].tolist(), ploc[m].tolist()):
                    sets[h].add(e)
        out = []
        for ps, sets in per_param.items():
            name = self.source(ps).key
            if all(st == sets[0] for st in sets):
                continue  # shared by every structure (a q-norm weight over head_dim, a scalar)
            elems = [torch.tensor(sorted(st), dtype=torch.long) if st else None for st in sets]
            sl = _slice_from_element_sets(name, self.param_shape(name), elems)
            if sl is None:
                self.notes.append(f"{what}: parameter '{name}' is combined with several structures but cannot "
                                  "be split by structure; not pruned")
                return None
            out.append(sl)
        return out

    # -- helpers
    def param_shape(self, name: str) -> Tuple[int, ...]:
        return tuple(_fetch_attr(self.gm, name).shape)

    def decode(self, ids: torch.Tensor):
        return self.interp.decode(ids)

    def source(self, i: int):
        return self.interp.sources[i]

    # -- attention
    def attention(self, core: AttentionCore) -> Optional[Tuple[AttentionGroup, int]]:
        shape = self.interp.shapes.get(core.node)
        cs = self.src_of.get(("core", core.node))
        folded = bool(shape) and len(shape) == 3 and cs is not None  # [batch * heads, N, d]
        if not shape or (len(shape) < 4 and not folded):
            self.notes.append(f"attention at node '{core.node.name}' has shape {shape}; heads need [..., H, N, d]")
            return None
        axis = self.interp.core_axis.get(core.node, -3)
        num_heads, head_dim = shape[axis], shape[-1]
        if folded:
            num_heads = self.source(cs).size // head_dim
        num_tokens = _numel(shape[axis + 1:-1])  # windows x tokens per window, when there are windows
        k_shape = self.interp.shapes.get(core.k) or shape
        num_kv = (_numel(k_shape[axis + 1:-2]) * k_shape[-1]) if core.k_transposed else _numel(k_shape[axis + 1:-1])
        owners: Dict[int, torch.Tensor] = {}  # linear source -> owner head per output row
        for role in ("q", "k", "v"):
            tables = self.sum.get((getattr(core, role), f"{role}:{core.node.name}"), [])
            found = False
            for t in tables:
                if folded and t.shape[0] % num_heads == 0:
                    t = t[: num_heads]  # batch-major rows: the first batch element's heads, in order
                if t.shape[0] != num_heads:
                    continue
                src, loc = self.decode(t)
                for h in range(num_heads):
                    for s, l in zip(src[h].tolist(), loc[h].tolist()):
                        if s < 0 or self.source(s).kind != "linear":
                            continue
                        found = True
                        own = owners.setdefault(s, torch.full((self.source(s).size,), -1, dtype=torch.long))
                        if own[l] not in (-1, h):
                            self.notes.append(f"attention at '{core.node.name}': a projection row feeds two heads; skipped")
                            return None
                        own[l] = h
            if not found:
                self.notes.append(
                    f"attention at '{core.node.name}': {role} is not produced by a linear layer; its heads are not pruned"
                )
                return None
        if any(self._mixes(own_src, own) for own_src, own in owners.items()):
            return None
        slices: List[ParamSlice] = []
        in_projs = []
        for s, own in sorted(owners.items(), key=lambda kv: self.order[self.source(kv[0]).key]):
            li = self.linears[self.source(s).key]
            got = self._row_slices(li, own, num_heads, f"attention at '{core.node.name}'")
            if got is None:
                return None
            slices.extend(got)
            in_projs.append(li.module)
        self._out_why = "no linear layer consumes the head outputs"
        out = self._out_proj(core, num_heads, head_dim)
        if out is None:
            self.notes.append(f"attention at '{core.node.name}': {self._out_why}; its heads are not pruned")
            return None
        out_li, out_slice = out
        slices.append(out_slice)
        extras = self._extras(core, num_heads)
        if extras is None:
            return None
        cs = self.src_of.get(("core", core.node))
        head_owners = dict(owners)
        if cs is not None:
            head_owners[cs] = torch.arange(num_heads * head_dim) // head_dim
        per_head = self.per_structure_params(head_owners, num_heads, f"attention at '{core.node.name}'",
                                             skip=[sl.name for sl in slices + extras])
        if per_head is None:
            return None
        extras = extras + per_head
        slices.extend(extras)
        group = AttentionGroup(
            num_heads=num_heads, head_dim=head_dim, out_proj=out_li.module, in_projs=tuple(in_projs),
            slices=tuple(slices), num_tokens=num_tokens, num_kv_tokens=num_kv, kind=core.kind,
            core=core.node.name, extras=tuple(s.name for s in extras),
        )
        return group, self.order[out_li.node]

    def _mixes(self, src: int, owner: torch.Tensor) -> bool:
        """True (with a note) if a norm on the path mixes rows of different structures."""
        for node, rows in self.interp.norms.items():
            for r in rows:
                s, l = self.decode(r)
                sel = l[s == src]
                if sel.numel() == 0:
                    continue
                ids = owner[sel]
                ids = ids[ids >= 0].unique()
                if ids.numel() > 1:
                    self.mixing_node = node
                    return True
        return False

    def _row_slices(self, li: LinearInfo, owner: torch.Tensor, n: int, what: str) -> Optional[List[ParamSlice]]:
        index = _index_from_owner(owner, n)
        if index is None:
            self.notes.append(f"{what}: structures own unequal numbers of rows of '{li.module}'; skipped")
            return None
        out = [ParamSlice(li.weight, self.param_shape(li.weight), 0, index)]
        if li.bias is not None:
            out.append(ParamSlice(li.bias, self.param_shape(li.bias), 0, index))
        elif li.bias_node is not None:
            got = self._composite(self.sum.get((li.bias_node, f"bias:{li.node.name}"), []), owner, n)
            if got is None:
                self.notes.append(f"{what}: the bias of '{li.module}' is computed in a way we cannot map; skipped")
                return None
            out.extend(got)
        return out

    def _composite(self, chans: Sequence[torch.Tensor], owner: torch.Tensor, n: int) -> Optional[List[ParamSlice]]:
        """A bias built from parameters (``cat(q_bias, zeros, v_bias)``): map each element to its row's owner."""
        per_param: Dict[str, torch.Tensor] = {}
        for c in chans:
            src, loc = self.decode(c)
            for s in src.unique().tolist():
                if s < 0 or self.source(s).kind != "param":
                    continue
                name = self.source(s).key
                rows = (src == s).nonzero().squeeze(1)
                elem_owner = per_param.setdefault(name, torch.full((self.source(s).size,), -1, dtype=torch.long))
                elem_owner[loc[rows]] = owner[rows]
        # Rows whose bias comes from no parameter (a constant, e.g. zeros for k) need no slice:
        # the constant is built from the sliced parameters' shapes.
        out = []
        for name, elem_owner in per_param.items():
            shape = self.param_shape(name)
            if len(shape) != 1:
                return None
            index = _index_from_owner(elem_owner, n)
            if index is None:
                return None
            out.append(ParamSlice(name, shape, 0, index))
        return out

    def _out_proj(self, core: AttentionCore, num_heads: int, head_dim: int) -> Optional[Tuple[LinearInfo, ParamSlice]]:
        cs = self.src_of.get(("core", core.node))
        if cs is None:
            return None
        for li in sorted(self.linears.values(), key=lambda l: self.order[l.node]):
            for row, uniform in self.sum.get((li.input, f"in:{li.node.name}"), []):
                src, loc = self.decode(row)
                hit = src == cs
                if not hit.any():
                    continue
                if not uniform:
                    self._out_why = (
                        f"the head outputs reach '{li.module}' in a layout that changes from token to token (an "
                        "attention over channels, [..., heads, head_dim, tokens], as XCiT's cross-covariance "
                        "attention, is not read as heads)"
                    )
                    return None
                owner = torch.full((li.in_features,), -1, dtype=torch.long)
                owner[hit] = loc[hit] // head_dim
                index = _index_from_owner(owner, num_heads)
                if index is None:
                    return None
                return li, ParamSlice(li.weight, self.param_shape(li.weight), 1, index)
        return None

    def _extras(self, core: AttentionCore, num_heads: int) -> Optional[List[ParamSlice]]:
        out = []
        for e in core.extras:
            for per_head in self.sum.get((e, f"extra:{core.node.name}"), []):
                if len(per_head) != num_heads:
                    continue  # broadcast over heads (a plain mask): nothing per head
                sets: Dict[int, List[torch.Tensor]] = {}
                rows: Dict[int, torch.Tensor] = {}  # a linear layer producing the table: its rows per head
                for h, ids in enumerate(per_head):
                    src, loc = self.decode(ids)
                    for s in src.unique().tolist():
                        if s >= 0 and self.source(s).kind == "param":
                            sets.setdefault(s, [None] * num_heads)[h] = loc[src == s]
                        elif s >= 0 and self.source(s).kind == "linear":
                            own = rows.setdefault(s, torch.full((self.source(s).size,), -1, dtype=torch.long))
                            own[loc[src == s]] = h
                for s, own in rows.items():
                    li = self.linears[self.source(s).key]
                    got = self._row_slices(li, own, num_heads, f"attention at '{core.node.name}' (per-head table)")
                    if got is None:
                        return None
                    out.extend(got)
                for s, elems in sets.items():
                    name = self.source(s).key
                    sl = _slice_from_element_sets(name, self.param_shape(name), elems)
                    if sl is None:
                        self.notes.append(
                            f"attention at '{core.node.name}': per-head parameter '{name}' cannot be split "
                            "by head; its heads are not pruned"
                        )
                        return None
                    out.append(sl)
        return out

    # -- feed-forward
    def mlp(self, li: LinearInfo, attention_out: set) -> Optional[Tuple[MlpGroup, int]]:
        if li.node in attention_out or li.node not in self.data:
            return None  # an out-projection, or a linear on constants (a relative-position MLP over coordinates)
        chans = self.sum.get((li.input, f"in:{li.node.name}"), [])
        if not chans:
            return None
        width = li.in_features
        per_src: Dict[int, List[torch.Tensor]] = {}
        for row, uniform in chans:
            src, loc = self.decode(row)
            lin = self._linear_sources_mask(src, exclude=li.node)
            if not lin.any():
                continue
            if not uniform:
                return None
            for s in src[lin].unique().tolist():
                cols = torch.full((width,), -1, dtype=torch.long)
                m = src == s
                cols[m] = loc[m]
                per_src.setdefault(s, []).append(cols)
        if not per_src:
            return None
        slices: List[ParamSlice] = []
        in_projs = []
        owners = {}
        if any(self.source(s).key in attention_out for s in per_src):
            return None  # an attention out-projection feeding a norm and a linear is a residual stream
        if not any(s in self.interp.nonlinear for s in per_src):
            return None  # linear -> (norm) -> linear with no activation or gate is not an FFN
        for s, col_lists in sorted(per_src.items(), key=lambda kv: self.order[self.source(kv[0]).key]):
            src_li = self.linears[self.source(s).key]
            owner = torch.full((src_li.out_features,), -1, dtype=torch.long)
            for cols in col_lists:
                if (cols < 0).any():
                    return None  # some hidden column is not fed by this projection
                if (owner[cols] >= 0).any() and not torch.equal(owner[cols], torch.arange(width)):
                    return None
                owner[cols] = torch.arange(width)
            owners[s] = owner
            got = self._row_slices(src_li, owner, width, f"FFN into '{li.module}'")
            if got is None:
                return None
            slices.extend(got)
            in_projs.append(src_li.module)
        per_neuron = self.per_structure_params(owners, width, f"FFN into '{li.module}'", skip=[sl.name for sl in slices])
        if per_neuron is None:
            return None
        slices.extend(per_neuron)  # a hidden bias added apart from its projection, a per-neuron scale ...
        slices.append(ParamSlice(li.weight, self.param_shape(li.weight), 1, torch.arange(width).unsqueeze(1)))
        shape = self.interp.shapes.get(li.node)
        batch = self._batch
        tokens = max(1, _numel(shape) // max(1, li.out_features) // batch) if shape else 1
        prunable, reason = True, None
        for s, own in owners.items():
            if self._mixes(s, own):
                prunable = False
                node = self.mixing_node
                reason = (
                    f"its hidden activations pass through {op_name(self.gm, node)} at node '{node.name}', which "
                    "normalises across neurons; removing a neuron would change the others"
                )
                break
        gated = len(in_projs) > 1 or any(sl.index.shape[1] > 1 for sl in slices if sl.dim == 0)
        group = MlpGroup(
            hidden_features=width, out_proj=li.module, in_projs=tuple(in_projs), slices=tuple(slices),
            num_tokens=tokens, gated=gated, prunable=prunable, reason=reason,
        )
        return group, self.order[li.node]

    def _linear_sources_mask(self, src: torch.Tensor, exclude: fx.Node) -> torch.Tensor:
        if not hasattr(self, "_is_linear"):
            self._is_linear = torch.tensor([s.kind == "linear" for s in self.interp.sources] + [False])
        mask = self._is_linear[src]  # src == -1 indexes the trailing False
        own = self.src_of.get(("linear", exclude))
        if own is not None:
            mask = mask & (src != own)
        return mask

    # -- nn.MultiheadAttention (a torch.nn leaf: its layout is defined by PyTorch)
    def mha(self, node: fx.Node) -> Tuple[AttentionGroup, int]:
        m = self.gm.get_submodule(node.target)  # nn.MultiheadAttention or our SlicedMultiheadAttention
        E, H = m.embed_dim, m.num_heads
        hd = getattr(m, "head_dim", E // H)
        inner = H * hd  # == E for PyTorch's module; smaller once sliced
        pre = node.target
        q_shape = self.interp.shapes.get(node.args[0]) if node.args else None
        tokens = (q_shape[1] if m.batch_first else q_shape[0]) if q_shape else 1
        kv_shape = self.interp.shapes.get(node.args[1]) if len(node.args) > 1 else q_shape
        kv_tokens = (kv_shape[1] if m.batch_first else kv_shape[0]) if kv_shape else tokens
        per_head, qkv_rows = mha_head_rows(H, hd, inner)  # [H, hd], [H, 3hd]
        slices = []
        if m._qkv_same_embed_dim:
            slices.append(ParamSlice(f"{pre}.in_proj_weight", tuple(m.in_proj_weight.shape), 0, qkv_rows))
        else:
            for nm in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                slices.append(ParamSlice(f"{pre}.{nm}", tuple(getattr(m, nm).shape), 0, per_head))
        if m.in_proj_bias is not None:
            slices.append(ParamSlice(f"{pre}.in_proj_bias", tuple(m.in_proj_bias.shape), 0, qkv_rows))
        if m.bias_k is not None:
            slices.append(ParamSlice(f"{pre}.bias_k", tuple(m.bias_k.shape), 2, per_head))
            slices.append(ParamSlice(f"{pre}.bias_v", tuple(m.bias_v.shape), 2, per_head))
        slices.append(ParamSlice(f"{pre}.out_proj.weight", tuple(m.out_proj.weight.shape), 1, per_head))
        group = AttentionGroup(
            num_heads=H, head_dim=hd, out_proj=f"{pre}.out_proj", in_projs=(pre,), slices=tuple(slices),
            num_tokens=tokens, num_kv_tokens=kv_tokens, kind="mha", core=pre,
            extras=tuple(s.name for s in slices if s.name.endswith(("bias_k", "bias_v"))),
        )
        return group, self.order[node]

    @property
    def _batch(self) -> int:
        ex = example_inputs_of(self.gm)
        return int(ex[0].shape[0]) if ex and isinstance(ex[0], torch.Tensor) and ex[0].dim() else 1


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _index_from_owner(owner: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """[n, k] positions per structure from a per-position owner vector; None if unequal."""
    valid = owner >= 0
    counts = torch.bincount(owner[valid], minlength=n)
    if n == 0 or counts.numel() != n or counts[0] == 0 or not bool((counts == counts[0]).all()):
        return None
    positions = torch.arange(owner.numel())[valid]
    order = torch.sort(owner[valid], stable=True).indices  # stable: positions stay ascending per owner
    return positions[order].view(n, int(counts[0]))


def _slice_from_element_sets(name: str, shape: Tuple[int, ...], elems: List[Optional[torch.Tensor]]) -> Optional[ParamSlice]:
    """Find the dim of a parameter along which per-head element sets are disjoint slabs."""
    if any(e is None for e in elems):
        return None
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    strides = list(reversed(strides))
    for dim in range(len(shape)):
        coords = [(e // strides[dim]) % shape[dim] for e in elems]
        sets = [torch.unique(c) for c in coords]
        if any(s.numel() != sets[0].numel() for s in sets):
            continue
        allc = torch.cat(sets)
        if allc.unique().numel() != allc.numel():
            continue  # overlapping across heads: not this dim
        return ParamSlice(name, shape, dim, torch.stack(sets))
    return None


# ----------------------------------------------------------------------------- entry point
def prepare(model: nn.Module, example_inputs: Optional[Sequence] = None,
            structures: Optional[StructureMap] = None) -> Tuple[fx.GraphModule, StructureMap]:
    """``model`` as a traced GraphModule and its StructureMap: the one way every stage gets them.

    A GraphModule from :func:`elastic_fx.trace` is used as it is; a StructureMap passed in
    (or stored in ``gm.meta`` by an earlier :func:`discover`) is not searched for again.
    """
    gm = trace(model, example_inputs)
    if structures is not None:
        return gm, structures
    return gm, structures_of(gm) if STRUCTURE_META in gm.meta else discover(gm)


def discover(gm: fx.GraphModule) -> StructureMap:
    """Find every attention head and FFN hidden neuron of a traced ViT.

    Args:
        gm: a GraphModule from :func:`elastic_fx.trace` (or a sliced one).

    Raises:
        DiscoveryError: the graph has no attention heads and no FFN neurons.
    """
    if not isinstance(gm, fx.GraphModule):
        raise DiscoveryError(
            f"discover() takes the GraphModule returned by efx.trace(model), got {type(gm).__name__}; "
            "call gm = efx.trace(model) first"
        )
    try:
        return _discover(gm)
    except ElasticFxError:
        raise
    except Exception as e:  # an op or layout the analysis does not handle: say which model and what to try
        raise DiscoveryError(
            f"discovery failed on {model_name(gm)}: {type(e).__name__}: {first_line(e)}. What to try: keep the "
            "submodule that computes it opaque with efx.register_leaf_module(ThatModule) and trace again (its "
            "structures are then not pruned); please report the model"
        ) from e


def _discover(gm: fx.GraphModule) -> StructureMap:
    an = _Analysis(gm)
    groups: List[Tuple[int, str, object]] = []
    attention_out = set()
    for core in an.cores:
        noted = len(an.notes)
        got = an.attention(core)
        if got is not None:
            groups.append((got[1], "attention", got[0]))
            attention_out.update(li.node for li in an.linears.values() if li.module == got[0].out_proj)
        else:  # found but not prunable: the block still opens here and says why
            why = an.notes[-1] if len(an.notes) > noted else f"attention at '{core.node.name}' could not be mapped"
            groups.append((an.order[core.node], "left_out", why))
    groups = _unshare(groups, an)
    for softmax, why in find_unresolved(gm, an.cores):
        an.notes.append(why)
        groups.append((an.order[softmax], "left_out", why))
    for node in an.mhas:
        g, pos = an.mha(node)
        groups.append((pos, "attention", g))
    for li in sorted(an.linears.values(), key=lambda l: an.order[l.node]):
        got = an.mlp(li, attention_out)
        if got is not None:
            groups.append((got[1], "mlp", got[0]))
    if not any(kind == "attention" for _, kind, _ in groups) and not (
        any(kind == "left_out" for _, kind, _ in groups) and any(kind == "mlp" for _, kind, _ in groups)
    ):
        raise DiscoveryError(
            f"no attention heads or FFN neurons found in {model_name(gm)} "
            f"({len(an.linears)} linear layers, {len(an.cores) + len(an.mhas)} attention operations, "
            f"{sum(kind == 'mlp' for _, kind, _ in groups)} feed-forward layer pairs, "
            f"{sum(kind == 'left_out' for _, kind, _ in groups)} attention operations left out). "
            "elastic_fx prunes Vision Transformers: blocks of multi-head attention and feed-forward layers. "
            "If this is a ViT whose attention sits inside an opaque module, trace it without registering "
            "that module as a leaf." + (f" Notes: {'; '.join(an.notes)}" if an.notes else "")
        )
    # buffers and plain tensor attributes (torch.export's lifted constants) are sliced but not counted
    parameters = {name for name, _ in gm.named_parameters()}
    for _, kind, g in groups:
        if kind == "left_out":
            continue
        if any(s.name not in parameters for s in g.slices):
            g.slices = tuple(ParamSlice(s.name, s.shape, s.dim, s.index, s.name not in parameters) for s in g.slices)
            g.__post_init__()
    groups.sort(key=lambda g: g[0])
    blocks: List[Block] = []
    for _, kind, g in groups:
        if kind == "left_out":  # an attention we leave out opens its block like any other
            blocks.append(Block(index=len(blocks), attention_reason=g))
            log.info("block %d: attention not pruned: %s", blocks[-1].index, g)
            continue
        opened_empty = bool(blocks) and blocks[-1].attention is None and blocks[-1].mlp is None
        if kind == "attention" and opened_empty:
            pass  # a left-out attention right before this one: the same block
        elif kind == "attention" or not blocks or blocks[-1].mlp is not None:
            blocks.append(Block(index=len(blocks)))
        setattr(blocks[-1], kind, g)
    smap = StructureMap(
        blocks=blocks,
        total_params=sum(p.numel() for p in gm.parameters()),
        fixed_flops=_fixed_flops(an, blocks),
        embedding=_embedding_node(an, blocks),
        source=model_name(gm),
        notes=an.notes,
    )
    gm.meta[STRUCTURE_META] = smap
    log.info("discovered %d blocks (tracer: %s)", len(blocks), gm.meta.get(TRACER_META, "?"))
    return smap


def _unshare(groups: list, an: _Analysis) -> list:
    """Attention units sharing a per-head parameter (one relative-position MLP for every block,
    timm's ``vit_srelpos``) cannot keep different heads: leave them out, saying why."""
    users: Dict[str, List[str]] = {}
    for _, kind, g in groups:
        if kind == "attention":
            for name in {s.name for s in g.slices}:
                users.setdefault(name, []).append(g.core)
    out = []
    for pos, kind, g in groups:
        shared = sorted({s.name for s in g.slices if len(users[s.name]) > 1}) if kind == "attention" else []
        if shared:
            why = (f"attention at '{g.core}' shares the per-head parameter '{shared[0]}' with "
                   f"{len(users[shared[0]]) - 1} other attention unit(s); heads sharing one table cannot be removed "
                   "block by block, so its heads are not pruned")
            an.notes.append(why)
            out.append((pos, "left_out", why))
        else:
            out.append((pos, kind, g))
    return out


def _fixed_flops(an: _Analysis, blocks: List[Block]) -> int:
    """FLOPs of everything not owned by a head or neuron (patch embedding, classifier ...)."""
    batch = an._batch
    total = 0
    for li in an.linears.values():
        shape = an.interp.shapes.get(li.input)
        if shape:
            total += 2 * (_numel(shape) // li.in_features // batch) * li.in_features * li.out_features
    for n in an.gm.graph.nodes:
        name = op_name(an.gm, n)
        if name == "multihead_attention":
            m = an.gm.get_submodule(n.target)
            shape = an.interp.shapes.get(n.args[0])
            tokens = _numel(shape) // m.embed_dim // batch if shape else 0
            total += 2 * tokens * 4 * m.embed_dim * m.embed_dim
        elif name in ("conv2d", "convolution", "module:Conv2d", "conv1d", "module:Conv1d"):
            w = _conv_weight(an.gm, n)
            out = an.interp.shapes.get(n)
            if w is not None and out:
                total += 2 * (_numel(out) // batch) * (w.numel() // w.shape[0])
    owned = 0
    for b in blocks:
        for g in (b.attention, b.mlp):
            if g is None:
                continue
            entries = sum(s.numel_per_structure for s in g.slices if len(s.shape) == 2 and s.name not in getattr(g, "extras", ()))
            owned += 2 * g.num_tokens * entries * g.size
    return max(0, total - owned)


def _conv_weight(gm: fx.GraphModule, n: fx.Node) -> Optional[torch.Tensor]:
    if n.op == "call_module":
        return getattr(gm.get_submodule(n.target), "weight", None)
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return _fetch_attr(gm, w.target)
    return None


def _embedding_node(an: _Analysis, blocks: List[Block]) -> Optional[str]:
    """The pooled representation: the input of a classifier linear after the blocks,
    else the model's first ``[batch, dim]`` output."""
    in_groups = set()
    for b in blocks:
        for g in (b.attention, b.mlp):
            if g is not None:
                in_groups.update(g.in_projs)
                in_groups.add(g.out_proj)
    out_node = next(n for n in an.gm.graph.nodes if n.op == "output")
    # linear layers that reach the output without passing another linear
    terminal, stack, seen = [], list(out_node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in an.linears:
            terminal.append(an.linears[n])
            continue
        stack.extend(n.all_input_nodes)
    heads = sorted((li for li in terminal if li.module not in in_groups), key=lambda l: an.order[l.node])
    if heads:
        return heads[0].input.name
    leaves = [n for n in out_node.all_input_nodes]
    for n in leaves:
        shape = an.interp.shapes.get(n)
        if isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(s, int) for s in shape):
            return n.name
    for n in leaves:
        shape = an.interp.shapes.get(n)
        if isinstance(shape, tuple) and len(shape) == 3 and all(isinstance(s, int) for s in shape):
            return n.name
    return None

