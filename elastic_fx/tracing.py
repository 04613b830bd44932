"""trace(model) -> torch.fx.GraphModule.

torch.fx symbolic tracing first (its graphs keep ``nn.Linear`` / ``nn.MultiheadAttention``
as modules, which reads well and exports well); when that fails — Hugging Face models,
anything with Python control flow on shapes — ``torch.export`` (dynamo capture, batch
dimension dynamic), whose ``.module()`` is an fx GraphModule too, with parameters as
``get_attr`` nodes under their original qualified names.

Either way the traced module must reproduce the eager model's outputs on the example
inputs; otherwise the next tracer is tried. Users extend the tracer with
:func:`register_leaf_module` (keep a submodule opaque) and
:func:`register_no_trace_function` (keep a function call opaque).

The example inputs travel with the GraphModule in ``gm.meta[EXAMPLE_INPUTS_META]``: the
analysis passes (discovery, slicing) run the graph on them.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional, Sequence, Set, Tuple, Type

import torch
import torch.fx as fx
from torch import nn

from .data import PREPROCESS_META, preprocess_config
from .errors import DataError, NumericalError, TracingError

log = logging.getLogger(__name__)

EXAMPLE_INPUTS_META = "elastic_fx.example_inputs"
TRACER_META = "elastic_fx.tracer"
MODEL_NAME_META = "elastic_fx.model_name"

_LEAF_MODULES: Set[Type[nn.Module]] = set()
_NO_TRACE_FUNCTIONS: Set[Callable] = set()


def register_leaf_module(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Keep every instance of ``cls`` opaque (a single ``call_module`` node) under fx.

    Usable as a class decorator. Structures inside a leaf module are not discovered.
    """
    _LEAF_MODULES.add(cls)
    return cls


def register_no_trace_function(fn: Callable) -> Callable:
    """Keep calls of the module-level function ``fn`` opaque under fx (``torch.fx.wrap``-like)."""
    _NO_TRACE_FUNCTIONS.add(fn)
    return fn


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(_NO_TRACE_FUNCTIONS))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, tuple(_LEAF_MODULES)):
            return True
        return super().is_leaf_module(m, qualname)


def default_example_inputs(model: nn.Module, batch_size: int = 2) -> Tuple[torch.Tensor]:
    """A random image batch at the model's own input size (see ``data.preprocess_config``)."""
    try:
        cfg = preprocess_config(model)
    except DataError as e:
        raise TracingError(
            f"cannot tell the input size of {type(model).__name__} ({e}); pass example_inputs, e.g. "
            "efx.trace(model, (torch.randn(2, 3, 224, 224),))"
        ) from e
    h, w = cfg.input_size
    try:
        p = next(model.parameters())
        device, dtype = p.device, (p.dtype if p.is_floating_point() else torch.float32)
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch_size, 3, h, w, generator=gen).to(device=device, dtype=dtype),)


def _concrete_defaults(model: nn.Module, n_inputs: int) -> dict:
    """Bake the forward's defaulted parameters beyond the example inputs into the trace."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def _outputs_match(a: Any, b: Any) -> Optional[str]:
    """None if two (nested) outputs are numerically equal, else a reason."""
    la, lb = _tensor_leaves(a), _tensor_leaves(b)
    if len(la) != len(lb):
        return f"the traced module returns {len(lb)} tensors, the model {len(la)}"
    for i, (x, y) in enumerate(zip(la, lb)):
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(y.shape)} traced vs {tuple(x.shape)} eager"
        if x.is_floating_point() and not torch.allclose(x, y, rtol=1e-4, atol=1e-5):
            return f"output {i} differs by {(x - y).abs().max().item():.3g}"
    return None


def _tensor_leaves(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict) or hasattr(x, "to_tuple"):
        vals = x.values() if isinstance(x, dict) else x.to_tuple()
        return [t for v in vals for t in _tensor_leaves(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensor_leaves(v)]
    return []


def _trace_fx(model: nn.Module, example_inputs: Tuple[Any, ...]) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model, concrete_args=_concrete_defaults(model, len(example_inputs)) or None)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _trace_export(model: nn.Module, example_inputs: Tuple[Any, ...]) -> fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dyn = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)
    try:
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dyn, strict=False)
    except Exception as first:  # a model that specialises the batch size: export it static
        log.debug("export with a dynamic batch failed (%s); retrying with static shapes", first)
        ep = torch.export.export(model, tuple(example_inputs), strict=False)
    return ep.module()


def _opaque_weight_calls(gm: fx.GraphModule) -> list:
    """Python functions fx kept opaque (``torch.fx.wrap``) that take weights: structures hide inside."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in _NO_TRACE_FUNCTIONS:
            continue
        mod = getattr(n.target, "__module__", "") or ""
        if mod.split(".")[0] in ("torch", "_operator", "operator", "math", "builtins"):
            continue
        weights = [a for a in n.all_input_nodes if a.op == "get_attr"]
        if any(_attr_dim(gm, a.target) >= 2 for a in weights):
            out.append(getattr(n.target, "__name__", str(n.target)))
    return out


def _attr_dim(gm: fx.GraphModule, target: str) -> int:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj.dim() if isinstance(obj, torch.Tensor) else 0


def trace(
    model: nn.Module,
    example_inputs: Optional[Sequence[Any]] = None,
    *,
    method: str = "auto",
) -> fx.GraphModule:
    """Capture ``model`` as a ``torch.fx.GraphModule`` with the same outputs.

    Args:
        model: any ``nn.Module`` (put in eval mode here; tracing never trains).
        example_inputs: a tuple of example positional inputs; default: a random batch of
            2 images at the model's own input size.
        method: ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``.

    Raises:
        TracingError: neither tracer captured a module with the model's outputs; the
            message shows both reasons and what to try.
    """
    if isinstance(model, fx.GraphModule) and EXAMPLE_INPUTS_META in model.meta:
        return model
    if not isinstance(model, nn.Module):
        raise TracingError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "fx", "export"):
        raise TracingError(f"method must be 'auto', 'fx' or 'export', got {method!r}")
    model.eval()
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)

    try:
        with torch.no_grad():
            expected = model(*example_inputs)
    except Exception as e:  # the model itself fails: no tracer can help, say so before trying any
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise TracingError(
            f"{type(model).__name__} fails on the example inputs {shapes} before any tracing "
            f"({type(e).__name__}: {_first_line(e)}); pass example_inputs the model accepts, e.g. "
            "efx.trace(model, (torch.randn(2, 3, H, W),)) at its own input size"
        ) from e
    _check_finite(model, example_inputs, expected)
    tracers = {"fx": _trace_fx, "export": _trace_export}
    order = ["fx", "export"] if method == "auto" else [method]
    reasons = {}
    for name in order:
        try:
            gm = tracers[name](model, example_inputs)
            with torch.no_grad():
                got = gm(*example_inputs)
            mismatch = _outputs_match(expected, got)
            if mismatch is not None:
                raise RuntimeError(f"traced module does not reproduce the model: {mismatch}")
            hidden = _opaque_weight_calls(gm) if name == "fx" and method == "auto" else []
            if hidden:  # e.g. torchvision's shifted_window_attention: torch.export sees inside
                try:
                    alt = _trace_export(model, example_inputs)
                    with torch.no_grad():
                        if _outputs_match(expected, alt(*example_inputs)) is None:
                            log.info("fx kept %s opaque; using torch.export, which traces into it", hidden)
                            gm, name = alt, "export"
                except Exception:
                    log.debug("torch.export failed; keeping the fx graph with %s opaque", hidden, exc_info=True)
        except Exception as e:  # each tracer fails in its own ways; we report them all
            reasons[name] = f"{type(e).__name__}: {_first_line(e)}"
            log.debug("%s tracing failed", name, exc_info=True)
            continue
        gm.meta[EXAMPLE_INPUTS_META] = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in example_inputs)
        gm.meta[TRACER_META] = name
        gm.meta[MODEL_NAME_META] = type(model).__name__
        _carry_preprocess(model, gm)
        log.info("traced %s with %s (%d nodes)", type(model).__name__, name, len(gm.graph.nodes))
        return gm

    detail = "\n".join(f"  - torch.{'fx' if k == 'fx' else 'export'}: {v}" for k, v in reasons.items())
    raise TracingError(
        f"could not trace {type(model).__name__}:\n{detail}\n"
        "What to try: a forward with Python control flow that depends on tensor values cannot "
        "be captured by either tracer. Keep the offending submodule opaque with "
        "efx.register_leaf_module(ThatModule) (its structures are then not pruned) or wrap the "
        "offending function with efx.register_no_trace_function(fn); check that example_inputs "
        "match the model's forward signature."
    )


def _check_finite(model: nn.Module, example_inputs: Tuple[Any, ...], outputs: Any) -> None:
    """NaN / inf in the model's own outputs is a numbers problem, not a tracing one: say where it comes from."""
    if all(torch.isfinite(t).all() for t in _tensor_leaves(outputs) if t.is_floating_point()):
        return
    for i, x in enumerate(_tensor_leaves(example_inputs)):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise NumericalError(f"example input {i} holds NaN or inf; give finite inputs (images scaled to numbers)")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NumericalError(f"{type(model).__name__} has NaN or inf in its weights ({name}); load a sound "
                                 "checkpoint")
    raise NumericalError(f"{type(model).__name__} returns NaN or inf on finite inputs and finite weights (an "
                         "overflow, or a division by zero in its forward); check the model in float32")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _carry_preprocess(model: nn.Module, gm: fx.GraphModule) -> None:
    """Remember the model's preprocessing so callers holding only the GraphModule find it."""
    try:
        gm.meta[PREPROCESS_META] = preprocess_config(model)
    except Exception:  # not every model carries a config; callers may pass one explicitly
        log.debug("no preprocessing config found for %s", type(model).__name__, exc_info=True)


def model_name(gm: Any) -> str:
    """The traced model's class name (a torch.export GraphModule's own class says nothing)."""
    return getattr(gm, "meta", {}).get(MODEL_NAME_META) or type(gm).__name__


def example_inputs_of(gm: fx.GraphModule) -> Tuple[Any, ...]:
    """The example inputs recorded by :func:`trace` (raises if ``gm`` was not traced by it)."""
    try:
        return gm.meta[EXAMPLE_INPUTS_META]
    except KeyError:
        raise TracingError(
            "this GraphModule carries no example inputs; create it with efx.trace(model, example_inputs)"
        ) from None
