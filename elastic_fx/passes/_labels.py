"""Provenance labels: which parameter rows / columns end up where in a traced graph.

The analysis runs the GraphModule once on its example inputs with an fx Interpreter
and, next to every real value, carries *labels*: int64 tensors of the value's shape whose
entries say which source feature each element came from. Sources are

* every linear layer's output (label = output feature index),
* every attention core's output (label = ``head * head_dim + j``),
* every floating-point ``get_attr`` tensor that is not a linear weight (label = element index).

Each source owns a disjoint id range, so one int64 says "feature f of source s".
Labels flow through *index ops* (view, permute, chunk, cat, getitem ...) by running the very
same op on the label tensors, and through *pointwise ops* (activations, scaling, gating,
adding a bias) unchanged. They stop at anything that mixes features (a linear, a matmul,
a convolution), and at a residual ``add`` of two unrelated streams (a tensor broadcast
against the labelled one, a shift mask, is not a stream). Norm layers pass labels on but are
recorded, so callers can check whether they mix structures. Constant padding adds unlabelled
(-1) entries; resampling (interpolate) gives each output its nearest input's label; a
reduction over positions (amax, mean ...) keeps labels that do not vary along it.

The same code reads torch.fx graphs (``call_module`` Linears, Tensor methods) and
torch.export graphs (``aten.*`` overloads), because ops are classified by name and the
label computation simply calls the node's own target.

Callers ask for *summaries* at watched nodes (see :class:`Watch`), so the full label
tensors are freed as soon as the interpreter frees the values.

Also here, because every pass classifies nodes the same way: :func:`op_name` and the op
classes, :func:`find_linears`. Nothing here modifies the graph or its module.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import DiscoveryError
from ._mha import MHA_TYPES

log = logging.getLogger(__name__)

#: Where provenance labels live, whatever device the analysed model runs on.
LABEL_DEVICE = "cpu"

# ----------------------------------------------------------------------------- op classes
INDEX_OPS = {
    "view", "reshape", "_unsafe_view", "view_as", "reshape_as", "permute", "transpose", "t", "swapaxes",
    "swapdims", "movedim", "moveaxis", "contiguous", "clone", "detach", "alias", "unbind", "chunk", "split",
    "split_with_sizes", "tensor_split", "flatten", "unflatten", "expand", "expand_as", "repeat", "squeeze",
    "unsqueeze", "select", "slice", "narrow", "getitem", "cat", "concat", "concatenate", "stack", "index",
    "index_select", "gather", "roll", "flip", "mT", "lift_fresh_copy",
}
# ops that keep every element in place (elementwise on the labelled operand)
UNARY_POINTWISE = {
    "gelu", "relu", "relu_", "silu", "sigmoid", "tanh", "erf", "exp", "neg", "abs", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "quick_gelu", "dropout", "feature_dropout",
    "alpha_dropout", "to", "float", "half", "bfloat16", "double", "type", "type_as", "_to_copy", "clamp",
    "clamp_min", "clamp_max", "pow", "square", "sqrt", "rsqrt", "masked_fill", "masked_fill_", "_assert_tensor_metadata",
    "identity",
}
ACTIVATIONS = {
    "gelu", "relu", "relu_", "silu", "sigmoid", "tanh", "erf", "hardswish", "hardsigmoid", "leaky_relu", "elu",
    "selu", "celu", "mish", "softplus", "quick_gelu", "activation",
}
MUL_LIKE = {"mul", "mul_", "imul", "div", "div_", "truediv", "itruediv", "floordiv", "rmul", "rtruediv"}
ADD_LIKE = {"add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "radd", "where", "addcmul", "lerp"}
NORM_OPS = {"layer_norm", "rms_norm", "group_norm", "native_layer_norm", "normalize"}
# resampling that keeps the channel axis (a per-head table interpolated to another window size)
RESAMPLE_OPS = {
    "interpolate", "upsample", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_nearest2d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "upsample_linear1d", "upsample_nearest1d",
}
PAD_OPS = {"pad", "constant_pad_nd"}
# reductions that keep features apart when they run over positions (Hiera's query pooling)
REDUCE_OPS = {"amax", "amin", "mean", "sum"}
SOFTMAX_OPS = {"softmax", "_softmax", "_safe_softmax"}
SDPA_OPS = {"scaled_dot_product_attention"}

_POINTWISE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_ACTIVATION_MODULES = (
    nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Mish, nn.Softplus,
)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A dialect-independent name for what ``node`` computes ("view", "linear", "layer_norm" ...)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return t.overloadpacket.__name__
        if t is operator.getitem:
            return "getitem"
        if t is operator.matmul:
            return "matmul"
        name = getattr(t, "__name__", str(t))
        return name
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, MHA_TYPES):
            return "multihead_attention"
        if isinstance(mod, _POINTWISE_MODULES):
            return "identity"
        if isinstance(mod, _ACTIVATION_MODULES):
            return "activation"
        if isinstance(mod, _NORM_MODULES):
            return "layer_norm"
        if isinstance(mod, nn.Softmax):
            return "softmax"
        return f"module:{type(mod).__name__}"
    return node.op


# ----------------------------------------------------------------------------- linear layers
@dataclass
class LinearInfo:
    """A linear layer call in the graph, in either dialect."""

    node: fx.Node
    input: fx.Node
    module: str  # qualified module name in the original model ("blocks.0.attn.qkv")
    weight: str  # qualified parameter name
    bias: Optional[str]  # qualified name when the bias is a parameter directly
    bias_node: Optional[fx.Node]  # when the bias is computed (e.g. cat of q_bias, k_bias, v_bias)
    in_features: int
    out_features: int


def find_linears(gm: fx.GraphModule) -> Dict[fx.Node, LinearInfo]:
    out = {}
    for n in gm.graph.nodes:
        name = op_name(gm, n)
        if name != "linear":
            continue
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            out[n] = LinearInfo(
                n, n.args[0], n.target, f"{n.target}.weight", f"{n.target}.bias" if mod.bias is not None else None,
                None, mod.in_features, mod.out_features,
            )
            continue
        args = list(n.args) + [None] * 3
        x, w, b = args[0], n.kwargs.get("weight", args[1]), n.kwargs.get("bias", args[2])
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue  # weight computed on the fly: not a prunable linear
        weight = _fetch_attr(gm, w.target)
        bias_name, bias_node = None, None
        if isinstance(b, fx.Node):
            if b.op == "get_attr":
                bias_name = b.target
            else:
                bias_node = b
        module = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
        out[n] = LinearInfo(n, x, module, w.target, bias_name, bias_node, weight.shape[1], weight.shape[0])
    return out


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def data_nodes(gm: fx.GraphModule) -> set:
    """Nodes whose value depends on a graph input (not only on parameters and constants)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out.add(n)
        elif n.op not in ("get_attr", "output"):
            if any(a in out for a in n.all_input_nodes):
                out.add(n)
    return out


# ----------------------------------------------------------------------------- propagation
Summarise = Callable[[fx.Node, Any, List[Any]], Any]


@dataclass
class Source:
    kind: str  # "linear" | "core" | "param"
    key: Any  # LinearInfo node | core node | parameter name
    base: int
    size: int


@dataclass
class Watch:
    """Summaries to take at a node once its labels are known: ``fn(node, value, channels)``."""

    fns: Dict[fx.Node, List[Tuple[str, Summarise]]] = field(default_factory=dict)

    def add(self, node: fx.Node, key: str, fn: Summarise) -> None:
        self.fns.setdefault(node, []).append((key, fn))


class LabelInterpreter(fx.Interpreter):
    """Runs ``gm`` on real inputs while propagating provenance labels (see module docstring)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        linears: Dict[fx.Node, LinearInfo],
        cores: set,  # attention core output nodes, value [..., H, N, head_dim]
        watch: Watch,
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.linears = linears
        self.cores = cores
        self.watch = watch
        self.data = data_nodes(gm)
        self.linear_weights = {li.weight for li in linears.values()}
        self.labels: Dict[fx.Node, List[Any]] = {}
        self.sources: List[Source] = []
        self.summaries: Dict[Tuple[fx.Node, str], Any] = {}
        self.shapes: Dict[fx.Node, Any] = {}
        self.norms: Dict[fx.Node, List[torch.Tensor]] = {}  # first normalised row of each channel
        self.nonlinear: set = set()  # sources whose features passed an activation or a gate
        self.core_axis: Dict[fx.Node, int] = {}  # the heads' axis of each core output (negative)
        self._next = 0
        self._bases: Optional[np.ndarray] = None
        self._decoded: Dict[int, Any] = {}

    # -- id bookkeeping
    def _new_source(self, kind: str, key: Any, size: int) -> int:
        base = self._next
        self.sources.append(Source(kind, key, base, size))
        self._next += size
        return base

    def decode(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ids -> (source index, local index); -1 / -1 for unlabelled entries.

        Memoised per tensor: the analysis decodes the same summaries many times.
        """
        key = id(ids)
        hit = self._decoded.get(key)
        if hit is not None and hit[0] is ids:
            return hit[1]
        if self._bases is None or len(self._bases) != len(self.sources):
            self._bases = np.array([s.base for s in self.sources] or [0], dtype=np.int64)
        raw = ids.numpy()
        src = np.searchsorted(self._bases, raw, side="right") - 1
        src[raw < 0] = -1
        local = np.where(src >= 0, raw - self._bases[np.clip(src, 0, None)], -1)
        out = (torch.from_numpy(src), torch.from_numpy(local))
        self._decoded[key] = (ids, out)
        return out

    # -- interpreter hook
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.shapes[n] = tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None, value)
        try:
            chans = self._labels_for(n, value)
        except LabelDataError:
            raise
        except Exception:  # an op we cannot replay on labels simply ends the trail
            log.debug("label propagation stops at %s", n.format_node(), exc_info=True)
            chans = []
        if chans:
            self.labels[n] = chans
        for key, fn in self.watch.fns.get(n, ()):
            try:
                self.summaries[(n, key)] = fn(n, value, chans)
            except Exception:  # a summary that does not apply (empty or odd tensors): no summary
                log.debug("no summary %s at %s", key, n.format_node(), exc_info=True)
        for dead in self.user_to_last_uses.get(n, ()):
            self.labels.pop(dead, None)
        return value

    def _core_axis(self, n: fx.Node, value: torch.Tensor) -> int:
        """The heads' axis of a core's output: where v's labels vary ([..., H, N, d]: -3;
        Hiera's mask-unit attention [B, H, windows, N, d]: -4)."""
        v = self._value_labels(n)
        if v is not None and v.dim() == value.dim():
            axis = head_axis(v, (-2, -1))
            if axis is not None:
                return axis
        return -3

    def _value_labels(self, n: fx.Node) -> Optional[torch.Tensor]:
        if op_name(self.module, n) in SDPA_OPS:
            v = n.kwargs.get("value", n.args[2] if len(n.args) > 2 else None)
        else:  # probabilities @ v
            v = n.args[1] if len(n.args) > 1 else None
        chans = self.labels.get(v, []) if isinstance(v, fx.Node) else []
        return chans[0] if chans and isinstance(chans[0], torch.Tensor) else None

    def _folded_heads(self, n: fx.Node, value: torch.Tensor) -> Optional[torch.Tensor]:
        """Heads folded into the batch axis: per row of v ``[batch * heads, M, d]``, its head
        (rows with the same features are one head, numbered in order of first appearance)."""
        v = self._value_labels(n)
        if v is None or v.dim() != 3 or v.shape[0] != value.shape[0] or bool((v < 0).any()):
            return None
        rows = v[:, 0, :]
        uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
        h = uniq.shape[0]
        if h < 2 or rows.shape[0] % h:
            return None
        first = torch.full((h,), rows.shape[0], dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(rows.shape[0]), reduce="amin")
        rank = torch.empty(h, dtype=torch.long)
        rank[torch.argsort(first)] = torch.arange(h)
        return rank[inverse]

    # -- label rules
    def _labels_for(self, n: fx.Node, value: Any) -> List[Any]:
        if n in self.linears:
            li = self.linears[n]
            base = self._new_source("linear", n, li.out_features)
            return [(base + torch.arange(li.out_features, device=LABEL_DEVICE)).expand(value.shape).contiguous()]
        if n in self.cores and isinstance(value, torch.Tensor) and value.dim() == 3:
            folded = self._folded_heads(n, value)  # [batch * heads, N, d]: head of each row
            if folded is not None:
                h, d = int(folded.max()) + 1, value.shape[-1]
                self.core_axis[n] = -3
                base = self._new_source("core", n, h * d)
                lab = base + folded.view(-1, 1, 1).to(LABEL_DEVICE) * d + torch.arange(d, device=LABEL_DEVICE).view(1, 1, d)
                return [lab.expand(value.shape).contiguous()]
        if n in self.cores and isinstance(value, torch.Tensor) and value.dim() >= 4:
            axis = self._core_axis(n, value)
            self.core_axis[n] = axis
            h, d = value.shape[axis], value.shape[-1]
            base = self._new_source("core", n, h * d)
            shape = [1] * value.dim()
            shape[axis], shape[-1] = h, d
            lab = (base + torch.arange(h * d, device=LABEL_DEVICE)).view(shape)
            return [lab.expand(value.shape).contiguous()]
        if n.op == "get_attr":
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and n.target not in self.linear_weights
                and value.numel() > 0
            ):
                base = self._new_source("param", n.target, value.numel())
                return [(base + torch.arange(value.numel(), device=LABEL_DEVICE)).view(value.shape)]
            return []
        if n.op not in ("call_function", "call_method", "call_module"):
            return []
        labelled = [a for a in n.all_input_nodes if a in self.labels]
        if not labelled:
            return []
        name = op_name(self.module, n)
        if name in INDEX_OPS:
            return self._replay(n, value)
        if name in UNARY_POINTWISE or name in ("identity", "activation"):
            first = n.all_input_nodes[0] if n.all_input_nodes else None
            chans = self._fit(self.labels.get(first, []), value)
            if name in ACTIVATIONS and chans:
                self.nonlinear |= self._source_set(chans)
            return chans
        if name in NORM_OPS or name == "layer_norm":
            chans = self._fit(self.labels.get(n.all_input_nodes[0], []), value)
            width = self._norm_width(n, value)
            if chans and width:
                self.norms[n] = [c.reshape(-1, width)[0].clone() for c in chans]
            return chans
        if name in MUL_LIKE or name in ADD_LIKE:
            return self._binary(n, name, value)
        if name in REDUCE_OPS and isinstance(value, torch.Tensor):  # pooling over positions, not features
            first = n.all_input_nodes[0]
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
            if dim is None or not isinstance(keep, bool):
                return []
            out = []
            for c in self.labels.get(first, []):
                if isinstance(c, torch.Tensor):
                    hi, lo = c.amax(dim, keepdim=keep), c.amin(dim, keepdim=keep)
                    if torch.equal(hi, lo) and hi.shape == value.shape:
                        out.append(hi)
            return out
        if name in PAD_OPS and isinstance(value, torch.Tensor):  # padded entries come from nowhere: -1
            first = n.all_input_nodes[0]
            pad = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
            mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 and isinstance(n.args[2], str) else "constant")
            if mode != "constant":
                return []
            out = [torch.nn.functional.pad(c, list(pad), value=-1) for c in self.labels.get(first, [])
                   if isinstance(c, torch.Tensor)]
            return [c for c in out if c.shape == value.shape]
        if name in RESAMPLE_OPS and isinstance(value, torch.Tensor) and value.dim() >= 3:
            # each output element mixes one channel's inputs: its label is the nearest input's
            first = n.all_input_nodes[0]
            return [
                torch.nn.functional.interpolate(c.double(), size=tuple(value.shape[2:]), mode="nearest").long()
                for c in self.labels.get(first, []) if isinstance(c, torch.Tensor) and c.dim() == value.dim()
            ]
        return []

    def _norm_width(self, n: fx.Node, value: torch.Tensor) -> int:
        """Number of trailing elements one normalisation mixes."""
        name = op_name(self.module, n)
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            shape = getattr(mod, "normalized_shape", None)
            if shape is not None:
                w = 1
                for s in shape:
                    w *= s
                return w
            return value.shape[-1]
        if name in ("layer_norm", "rms_norm", "native_layer_norm"):
            shape = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
            w = 1
            for s in shape:
                w *= int(s)
            return w
        return value.shape[-1]

    def _fit(self, chans: List[Any], value: Any) -> List[Any]:
        """Channels broadcast to ``value``'s shape (dropped when they do not fit)."""
        if not isinstance(value, torch.Tensor):
            return []
        out = []
        for c in chans:
            if isinstance(c, torch.Tensor):
                try:
                    out.append(c.expand(value.shape) if c.shape != value.shape else c)
                except RuntimeError:
                    continue
        return out

    def _binary(self, n: fx.Node, name: str, value: Any) -> List[Any]:
        if not isinstance(value, torch.Tensor):
            return []
        operands = [a for a in n.all_input_nodes]
        data_ops = [a for a in operands if a in self.data]
        ld = [a for a in data_ops if a in self.labels]
        lc = [a for a in operands if a not in self.data and a in self.labels]
        if name in ADD_LIKE and len(data_ops) >= 2:
            if len(ld) != len(data_ops):
                others = [a for a in data_ops if a not in self.labels]
                if ld and all(_smaller(self.env.get(a), value) for a in others):
                    # a mask broadcast over the labelled tensor (shifted-window attention), not a stream
                    return self._fit([c for a in ld for c in self.labels[a]], value)
                return []  # residual: a labelled stream plus an unrelated one
            srcs = [self._source_set(self.labels[a]) for a in ld]
            if not set.intersection(*srcs):
                return []
            return self._fit([c for a in ld for c in self.labels[a]], value)
        if ld:
            chans = self._fit([c for a in ld for c in self.labels[a]], value)
            if name in MUL_LIKE and len(ld) >= 2:  # gating: data times data
                self.nonlinear |= self._source_set(chans)
            return chans
        if lc:
            return self._fit([c for a in lc for c in self.labels[a]], value)
        return []

    def _source_set(self, chans: List[Any]) -> set:
        out = set()
        for c in chans:
            if isinstance(c, torch.Tensor) and c.numel():
                flat = c.reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)]
                src, _ = self.decode(sample[sample >= 0])
                out.update(src.tolist())
        return out

    def _replay(self, n: fx.Node, value: Any) -> List[Any]:
        """Run ``n``'s own op on label channels in place of the labelled inputs."""
        args_nodes = n.all_input_nodes
        n_ch = max(len(self.labels.get(a, [])) for a in args_nodes)
        out = []
        for ci in range(n_ch):

            def sub(a: Any) -> Any:
                if not isinstance(a, fx.Node):
                    return a
                real = self.env[a]
                chans = self.labels.get(a)
                if chans is not None and ci < len(chans):
                    return chans[ci]
                return _filler(real, n)

            args = tree_map(sub, n.args)
            kwargs = tree_map(sub, n.kwargs)
            if n.op == "call_method":
                self_obj, *rest = args
                res = getattr(self_obj, n.target)(*rest, **kwargs)
            elif n.op == "call_function":
                res = n.target(*args, **kwargs)
            else:
                res = self.module.get_submodule(n.target)(*args, **kwargs)
            if not _same_structure(res, value):
                return []
            out.append(res)
        return out


class LabelDataError(DiscoveryError):
    """An index the labels must follow has no data here (a model on the 'meta' device)."""


def _smaller(t: Any, value: torch.Tensor) -> bool:
    """``t`` is a tensor broadcast against ``value`` (fewer elements), not a stream of its size."""
    return isinstance(t, torch.Tensor) and t.numel() < value.numel()


def _filler(real: Any, node: fx.Node) -> Any:
    """Unlabelled floating data becomes -1 labels; indices, masks and non-tensors stay real.

    Labels live on the CPU (they are decoded with numpy) whatever device the model runs
    on, so the real indices and masks an index op takes (a relative-position index, a
    gather index) are brought to the CPU: on a GPU model they would otherwise meet the
    CPU labels in one op, fail, and silently end the label trail there.
    """
    if isinstance(real, torch.Tensor) and real.is_floating_point():
        return torch.full(real.shape, -1, dtype=torch.long, device=LABEL_DEVICE)
    if isinstance(real, torch.Tensor) and real.device.type != LABEL_DEVICE:
        if real.device.type == "meta":
            raise LabelDataError(
                f"'{node.name}' ({node.format_node()}) indexes with a tensor on the 'meta' device, which holds no "
                "values; the structure analysis must read them. Load the model's weights and buffers (on the CPU "
                "or a GPU) and trace it again."
            )
        return real.to(LABEL_DEVICE)
    if isinstance(real, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in real):
        return type(real)(_filler(r, node) for r in real)
    return real


def _same_structure(lab: Any, val: Any) -> bool:
    lf, _ = tree_flatten(lab)
    vf, _ = tree_flatten(val)
    if len(lf) != len(vf):
        return False
    for a, b in zip(lf, vf):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != torch.long:
                return False
    return True


def head_axis(c: torch.Tensor, skip: Tuple[int, int]) -> Optional[int]:
    """The one axis (negative), besides ``skip``, along which labels vary: the heads' axis.

    When none varies (one head): the last axis of size 1 after the batch, else -3. None when
    several vary.
    """
    r = c.dim()
    skipped = {s % r for s in skip}
    varying = [a for a in range(r) if a not in skipped and c.shape[a] > 1 and not bool((c == c.narrow(a, 0, 1)).all())]
    if len(varying) == 1:
        return varying[0] - r
    if varying:
        return None
    ones = [a for a in range(1, r) if a not in skipped and c.shape[a] == 1]
    return ones[-1] - r if ones else -3


def head_table(chans: Sequence[Any], axis: Optional[int], dim_axis: int) -> List[torch.Tensor]:
    """For q/k/v-like labels, one ``[H, d]`` id table per channel (first batch / token).

    ``axis`` is the heads' axis; None: the axis along which the labels vary (:func:`head_axis`).
    """
    out = []
    for c in chans:
        if not isinstance(c, torch.Tensor) or c.dim() < 3:
            continue
        token_axis = -2 if dim_axis % c.dim() == c.dim() - 1 else -1
        found = axis if axis is not None else head_axis(c, (dim_axis, token_axis))
        if found is None:
            continue
        idx = [0] * c.dim()
        idx[found] = slice(None)
        idx[dim_axis] = slice(None)
        t = c[tuple(idx)]
        if found % c.dim() > dim_axis % c.dim():
            t = t.t()
        out.append(t.clone())
    return out
