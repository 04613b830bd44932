"""Sanity tests of the model zoo itself (tests/zoo.py).

The zoo's ground truth is what discovery tests assert, so here it is checked against
the instantiated modules, independently of the configuration it was computed from:
attention and FFN modules are found by walking the model, put in execution order by
forward pre-hooks, and measured from their weights and the activations they see.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

from zoo import BAD, ZOO, HandViT, build, names, output_tensors, params

_Q_NAMES = ("qkv", "q", "q_proj", "query")
_OUT_NAMES = ("proj", "out", "o_proj", "out_proj")
_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_MLP_CLASS = re.compile(r"(mlp|swiglu|ffn|mlpblock)$", re.IGNORECASE)


# ---------------------------------------------------------------------------- introspection


def _linear_children(m: nn.Module) -> Dict[str, nn.Linear]:
    return {n: c for n, c in m.named_children() if isinstance(c, nn.Linear)}


def _is_attention(m: nn.Module) -> bool:
    if isinstance(m, nn.MultiheadAttention):
        return True
    has_q = any(n in _linear_children(m) for n in _Q_NAMES)
    return has_q and any(isinstance(getattr(m, a, None), int) for a in _HEAD_ATTRS)


def _is_mlp(m: nn.Module) -> bool:
    return bool(_MLP_CLASS.search(type(m).__name__)) and sum(isinstance(c, nn.Linear) for c in m.modules()) >= 2


def _attention_shape(m: nn.Module) -> Tuple[int, int]:
    """(heads, head_dim) from the projection weights and the module's head attributes."""
    if isinstance(m, nn.MultiheadAttention):
        assert m.in_proj_weight.shape[0] == 3 * m.embed_dim
        return m.num_heads, m.embed_dim // m.num_heads
    lin = _linear_children(m)
    width = lin["qkv"].weight.shape[0] // 3 if "qkv" in lin else next(lin[n] for n in _Q_NAMES if n in lin).out_features
    attr_heads = next(getattr(m, a) for a in _HEAD_ATTRS if isinstance(getattr(m, a, None), int))
    head_dim = getattr(m, "head_dim", None)
    if isinstance(head_dim, int):  # modules that reshape with a fixed head_dim and infer the head count
        assert width == attr_heads * head_dim, f"{type(m).__name__}: width {width} != {attr_heads} x {head_dim}"
    assert width % attr_heads == 0
    return attr_heads, width // attr_heads


def _mlp_shape(m: nn.Module) -> Dict[str, object]:
    """hidden width, gating and prunability of an FFN module from its Linear layers and norms."""
    linears = [c for c in m.modules() if isinstance(c, nn.Linear)]
    out, ins = linears[-1], linears[:-1]
    hidden = out.in_features
    if len(ins) == 2:
        assert all(i.out_features == hidden for i in ins)
        gated = True
    else:
        assert len(ins) == 1 and ins[0].out_features in (hidden, 2 * hidden)
        gated = ins[0].out_features == 2 * hidden
    hidden_norm = any(
        "norm" in type(c).__name__.lower() and getattr(c, "weight", None) is not None and c.weight.numel() == hidden
        for c in m.modules()
    )
    return dict(hidden=hidden, gated=gated, prunable=not hidden_norm, out=out)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return next(t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor))


def _observed_blocks(model: nn.Module, inputs: tuple) -> List[Dict[str, object]]:
    """Blocks in execution order: each attention opens a block, the next FFN joins it."""
    events: List[Tuple[str, nn.Module, Dict[str, object]]] = []
    handles = []

    def attn_hook(mod, args, kwargs):
        if isinstance(mod, nn.MultiheadAttention):
            q, kv = args[0], args[1]
            dim = 1 if mod.batch_first else 0
            tokens, kv_tokens = q.shape[dim], kv.shape[dim]
        else:
            x = _first_tensor(args, kwargs)
            latent = getattr(mod, "latent", None)
            tokens = latent.shape[1] if isinstance(latent, torch.Tensor) else x.shape[1]
            kv_tokens = x.shape[1]
        events.append(("attn", mod, dict(tokens=tokens, kv_tokens=kv_tokens)))

    def mlp_hook(mod, args, kwargs):
        events.append(("mlp", mod, {}))

    seen_width: Dict[int, int] = {}

    def width_hook(mod, args):
        seen_width[id(mod)] = args[0].shape[-1]

    for m in model.modules():
        if _is_attention(m):
            handles.append(m.register_forward_pre_hook(attn_hook, with_kwargs=True))
        elif _is_mlp(m):
            handles.append(m.register_forward_pre_hook(mlp_hook, with_kwargs=True))
            handles.append(_mlp_shape(m)["out"].register_forward_pre_hook(width_hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()

    blocks: List[Dict[str, object]] = []
    for kind, mod, info in events:
        if kind == "attn":
            heads, head_dim = _attention_shape(mod)
            blocks.append(dict(heads=heads, head_dim=head_dim, hidden=None, prunable=None, gated=None, **info))
        else:
            shape = _mlp_shape(mod)
            # the out projection really sees `hidden` features at run time
            assert seen_width[id(shape["out"])] == shape["hidden"]
            if not blocks or blocks[-1]["hidden"] is not None:
                blocks.append(dict(heads=None, head_dim=None, tokens=None, kv_tokens=None))
            blocks[-1].update(hidden=shape["hidden"], prunable=shape["prunable"], gated=shape["gated"])
    return blocks


def _out_projections(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """(label, Linear) for the output projection of every attention and FFN."""
    out = []
    for name, m in model.named_modules():
        if _is_attention(m):
            lin = m.out_proj if isinstance(m, nn.MultiheadAttention) else next(
                c for n, c in _linear_children(m).items() if n in _OUT_NAMES
            )
            out.append((f"{name} (attention)", lin))
        elif _is_mlp(m):
            out.append((f"{name} (ffn)", _mlp_shape(m)["out"]))
    return out


# ---------------------------------------------------------------------------- fixtures


@functools.lru_cache(maxsize=None)
def _built(name: str):
    model, inputs = build(name)
    with torch.no_grad():
        ref = output_tensors(model(*inputs))
    return model, inputs, ref


def _assert_same(got, ref) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", params())
def test_entry_builds_runs_and_matches_ground_truth(name: str) -> None:
    entry = ZOO[name]
    model, inputs, ref = _built(name)
    assert not model.training
    assert len(inputs) >= 1 and all(t.shape[0] == 2 for t in inputs)
    assert ref and all(torch.isfinite(t).all() for t in ref)
    assert all(t.shape[0] == 2 for t in ref)

    # deterministic: a second build has the same weights and inputs
    model2, inputs2 = entry.build()
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs2))
    if not entry.introspect:  # the module walk cannot read this family: the configuration is the truth
        assert entry.notes and entry.total_heads > 0 and entry.total_hidden > 0
        return

    blocks = _observed_blocks(model, inputs)
    observed = {key: [b[key] for b in blocks] for key in ("heads", "head_dim", "hidden", "prunable", "gated",
                                                          "tokens", "kv_tokens")}
    assert len(blocks) == entry.blocks
    assert observed["heads"] == entry.heads
    assert observed["head_dim"] == entry.head_dim
    assert observed["hidden"] == entry.hidden
    assert observed["prunable"] == entry.mlp_prunable
    assert observed["gated"] == entry.gated
    assert observed["tokens"] == entry.tokens
    assert observed["kv_tokens"] == entry.kv_tokens
    assert entry.notes


@pytest.mark.parametrize("name", params())
def test_every_attention_and_ffn_changes_the_output(name: str) -> None:
    """liven() makes each residual branch matter, so a wrong slice cannot hide under atol."""
    if not ZOO[name].introspect:
        pytest.skip("the module walk cannot find this family's projections (tests/passes cover it on the graph)")
    model, inputs, ref = _built(name)
    projs = _out_projections(model)
    assert len(projs) == sum(h is not None for h in ZOO[name].heads) + sum(h is not None for h in ZOO[name].hidden)
    scale = torch.cat([t.flatten() for t in ref]).abs().mean()
    for label, lin in projs:
        saved = lin.weight.detach().clone()
        try:
            with torch.no_grad():
                lin.weight.zero_()
                got = output_tensors(model(*inputs))
        finally:
            with torch.no_grad():
                lin.weight.copy_(saved)
        change = max((a - b).abs().max() for a, b in zip(got, ref))
        assert change > 0.05 * scale, f"{label}: zeroing its output projection changed the output by {change}"


@pytest.mark.parametrize("name", params())
def test_expected_tracer(name: str) -> None:
    entry = ZOO[name]
    model, inputs, ref = _built(name)
    if entry.tracer == "fx" or entry.fx_opaque:
        # keyword arguments left at their defaults are baked in, as elastic_fx's tracer does (Hiera's
        # forward takes mask=None and branches on it)
        sig = inspect.signature(model.forward).parameters.values()
        concrete = {p.name: p.default for p in list(sig)[1:] if p.default is not inspect.Parameter.empty}
        gm = torch.fx.symbolic_trace(model, concrete_args=concrete or None)
        gm.graph.lint()
        _assert_same(output_tensors(gm(*inputs)), ref)
    if entry.tracer == "export":
        if not entry.fx_opaque:
            with pytest.raises(Exception):
                torch.fx.symbolic_trace(model)
        ep = torch.export.export(model, inputs, strict=False)
        _assert_same(output_tensors(ep.module()(*inputs)), ref)


def test_zoo_covers_the_required_families() -> None:
    required = {
        "timm_vit", "timm_deit_distilled", "timm_deit3", "timm_dinov2_reg4", "timm_siglip_map", "timm_eva02",
        "timm_eva02_scale_mlp", "timm_beit", "hf_vit", "hf_deit", "hf_dinov2", "hf_clip_vision",
        "hf_siglip_vision", "torchvision_vit", "hand_separate_qkv", "hand_fused_chunk_swiglu",
    }
    assert required <= set(ZOO)
    entries = list(ZOO.values())
    assert {h for e in entries for h in e.heads} >= {2, 3, 4}
    assert any(h & (h - 1) for e in entries for h in e.hidden if h)  # a hidden width that is not a power of two
    assert any(False in e.mlp_prunable for e in entries) and any(True in e.gated for e in entries)
    assert any(len(set(e.heads)) > 1 for e in entries)  # per-block head counts differ somewhere
    assert any(t != kv for e in entries for t, kv in zip(e.tokens, e.kv_tokens))  # attention pooling
    assert set(names(family="hf")) <= set(names("export"))
    # issue 14: a hand-written model and a third-party one per pattern
    assert {"hand_wide_inner", "vitp_vit_wide", "hand_per_head_params", "vitp_qk_norm", "hand_parallel_block",
            "timm_vit_xp", "hand_relpos_tables", "timm_vit_relpos", "hf_beit_relpos", "hand_rope_from_shapes",
            "hf_dinov3", "timm_swin", "torchvision_swin", "hand_cached_bias_export", "timm_tiny_vit",
            "hand_talking_heads", "timm_cait", "vitp_deepvit", "hand_shifted_windows"} <= set(ZOO)
    for e in entries:
        assert e.blocks == len(e.heads) and e.total_heads > 0 and e.total_hidden > 0


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs(name: str) -> None:
    model, inputs = build(name)
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape[0] == 2
    if name == "data_dependent":
        x = inputs[0]
        for sign in (1.0, -1.0):  # both branches run eagerly
            xs = sign * x
            plain = xs.flip(-1) if xs.sum() > 0 else xs
            with torch.no_grad():
                torch.testing.assert_close(model(xs), HandViT.forward(model, plain))
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(model)
        with pytest.raises(Exception, match="data-dependent|data dependent"):
            torch.export.export(model, inputs, strict=False)
    else:
        assert not any(_is_attention(m) for m in model.modules())
        torch.fx.symbolic_trace(model)  # traceable, just not a transformer


def test_build_rejects_unknown_names() -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        build("vit_gigantic")
