"""A zoo of tiny random-weight Vision Transformers, with the structure tests assert.

This is a helper module for the test suite, not a test file. Tests import it as
``from zoo import ZOO, build`` (``tests/`` is on ``sys.path`` through the pytest
``pythonpath`` setting).

Every :class:`ZooEntry` couples a ``build()`` function with the ground truth that
discovery must find: per block, in execution order, the number of attention heads,
the head dimension, the FFN hidden width, and whether that FFN can be pruned. The
ground truth is computed from the same configuration dictionaries that ``build()``
passes to the model constructors, never typed in by hand, and ``tests/test_zoo.py``
checks it once more against the instantiated modules.

Conventions
-----------
* ``build()`` seeds ``torch.manual_seed(0)``, builds the model, re-draws its weights
  (see :func:`liven`), and returns ``(model.eval(), inputs)`` where ``inputs`` is a
  tuple of tensors with batch size 2 (drawn from a separate generator seeded with 1).
* Models are tiny (images of 28-32 pixels, 16 patches, width 32-48, depth 2; TinyViT 64
  pixels) so that tracing, discovery and slicing of every entry take about a second on a CPU
  (a few seconds for torch.export).
* A "block" is one attention operation together with the FFN that follows it. Extra
  attention modules outside the main stack are blocks too: the attention-pooling
  (MAP) heads of SigLIP (timm ``global_pool='map'`` and Hugging Face
  ``vision_use_head=True``) are counted as one extra block appended after the main
  stack, with their own heads, their own MLP, one query token (the learned latent /
  probe) and all patch tokens as keys and values.
* ``tracer`` says which tracer is expected to succeed: ``"fx"`` means
  ``torch.fx.symbolic_trace`` works (and ``torch.export`` does too); ``"export"``
  means only ``torch.export.export(..., strict=False)`` works (all Hugging Face models,
  vit-pytorch's einops models, TinyViT), or that fx keeps the attention opaque
  (``fx_opaque``: torchvision's Swin).
* Issue 14 added one hand-written and at least one third-party model per pattern (see
  ``tests/passes/test_any_vit.py``); ``left_out`` lists blocks whose attention discovery
  leaves out on purpose (heads mixed across, or folded into the batch), ``introspect=False``
  the entries ``tests/test_zoo.py``'s module walk cannot read.
* Hugging Face models return a ``ModelOutput``; :func:`output_tensors` flattens any
  output into a tuple of tensors.

Bad inputs for negative tests live in :data:`BAD` (also reachable through
:func:`build`): a small CNN, a plain MLP, and a ViT whose forward branches on data.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Inputs = Tuple[torch.Tensor, ...]
Built = Tuple[nn.Module, Inputs]

BATCH = 2


# ---------------------------------------------------------------------------- entry


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo and the structure discovery must find in it.

    The per-block lists are in execution order and all have length ``blocks``.
    ``heads``/``head_dim`` are None for a block without attention, ``hidden``,
    ``mlp_prunable`` and ``gated`` are None for a block without an FFN.
    ``tokens``/``kv_tokens`` are the query and key/value token counts of each
    block's attention (they differ only for attention pooling).
    """

    name: str
    build: Callable[[], Built]
    blocks: int
    heads: List[Optional[int]]
    head_dim: List[Optional[int]]
    hidden: List[Optional[int]]
    mlp_prunable: List[Optional[bool]]
    tracer: str  # "fx" | "export"
    notes: str
    gated: List[Optional[bool]] = field(default_factory=list)
    tokens: List[Optional[int]] = field(default_factory=list)
    kv_tokens: List[Optional[int]] = field(default_factory=list)
    embed_dim: int = 0
    family: str = ""  # "timm" | "hf" | "torchvision" | "hand"
    requires: Tuple[str, ...] = ()  # importable packages the entry needs
    # blocks whose attention discovery leaves out on purpose (heads mixed, heads folded into the
    # batch ...); their ground-truth heads are listed all the same, the FFNs are still pruned
    left_out: Tuple[int, ...] = ()
    # False where tests/test_zoo.py's module walk (attention = a module with a q/qkv Linear and a
    # num_heads attribute, FFN = a module named *Mlp) cannot read the model; the ground truth is
    # then the configuration's alone
    introspect: bool = True
    # torch.fx traces the model but keeps its attention inside an opaque function (torch.fx.wrap),
    # so elastic_fx uses torch.export (tracer "export") although fx succeeds
    fx_opaque: bool = False

    def __post_init__(self) -> None:
        if self.tracer not in ("fx", "export"):
            raise ValueError(f"{self.name}: tracer must be 'fx' or 'export', got {self.tracer!r}")
        for attr in ("heads", "head_dim", "hidden", "mlp_prunable", "gated", "tokens", "kv_tokens"):
            got = len(getattr(self, attr))
            if got != self.blocks:
                raise ValueError(f"{self.name}: {attr} has {got} entries, expected one per block ({self.blocks})")

    @property
    def missing(self) -> List[str]:
        """Required packages that are not installed."""
        return [r for r in self.requires if importlib.util.find_spec(r) is None]

    @property
    def available(self) -> bool:
        """True when every package the entry needs is installed."""
        return not self.missing

    @property
    def total_heads(self) -> int:
        return sum(h for h in self.heads if h is not None)

    @property
    def total_hidden(self) -> int:
        return sum(h for h in self.hidden if h is not None)


def _entry(
    name: str,
    build_fn: Callable[[], Built],
    layers: Sequence[dict],
    *,
    tracer: str,
    notes: str,
    embed_dim: int,
    family: str,
    requires: Tuple[str, ...] = (),
    **extra,
) -> ZooEntry:
    """Assemble an entry from per-block dicts with keys heads/head_dim/hidden/prunable/gated/tokens/kv_tokens."""

    def col(key: str) -> list:
        return [layer.get(key) for layer in layers]

    return ZooEntry(
        name=name,
        build=build_fn,
        blocks=len(layers),
        heads=col("heads"),
        head_dim=col("head_dim"),
        hidden=col("hidden"),
        mlp_prunable=col("prunable"),
        tracer=tracer,
        notes=notes,
        gated=col("gated"),
        tokens=col("tokens"),
        kv_tokens=col("kv_tokens"),
        embed_dim=embed_dim,
        family=family,
        requires=requires,
        **extra,
    )


def _layer(
    heads: Optional[int],
    width: Optional[int],
    hidden: Optional[int],
    tokens: Optional[int],
    *,
    prunable: bool = True,
    gated: bool = False,
    kv_tokens: Optional[int] = None,
) -> dict:
    """Ground truth of one block; ``width`` is heads * head_dim."""
    has_attn, has_mlp = heads is not None, hidden is not None
    return dict(
        heads=heads,
        head_dim=width // heads if has_attn else None,
        hidden=hidden,
        prunable=prunable if has_mlp else None,
        gated=gated if has_mlp else None,
        tokens=tokens if has_attn else None,
        kv_tokens=(kv_tokens if kv_tokens is not None else tokens) if has_attn else None,
    )


# ---------------------------------------------------------------------------- helpers


def liven(model: nn.Module, noise: float = 0.1) -> nn.Module:
    """Re-draw weights so every head and neuron visibly changes the output.

    Library initialisations (truncated normal, std 0.02; layer scale 1e-5) make
    attention nearly uniform and residual branches nearly silent, which would let
    a wrong slice pass a closeness test. Here every matrix-like weight (Linear, Conv,
    MultiheadAttention in-projection, Embedding) is drawn from N(0, 1/fan_in), and
    every other parameter (biases, norms, tokens, position tables, layer-scale
    gammas, relative-position-bias tables) gets N(0, noise^2) added to its value.
    Uses the global RNG, so call it after ``torch.manual_seed``.
    """
    with torch.no_grad():
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() >= 2 and pname.endswith("weight"):
                    fan_in = p[0].numel()
                    p.normal_(0.0, fan_in**-0.5)
                else:
                    p.add_(torch.randn_like(p) * noise)
    return model


def _images(size: int, channels: int = 3) -> Inputs:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, channels, size, size, generator=gen),)


def _finish(model: nn.Module, size: int) -> Built:
    liven(model)
    return model.eval(), _images(size)


def output_tensors(out: object) -> Tuple[torch.Tensor, ...]:
    """Flatten a model output (tensor, tuple, dict, Hugging Face ModelOutput) into tensors."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if hasattr(out, "to_tuple"):  # transformers.utils.ModelOutput
        out = out.to_tuple()
    if isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        return tuple(t for o in out for t in output_tensors(o))
    return ()


# ---------------------------------------------------------------------------- hand-written ViTs


class PatchEmbed(nn.Module):
    """Conv patchify, then (B, C, H, W) -> (B, N, C)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SeparateQKVAttention(nn.Module):
    """Separate q/k/v Linears, ``view(B, N, H, -1)`` and an explicit softmax (no SDPA)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.out(x)


class FusedChunkAttention(nn.Module):
    """One fused qkv Linear split with ``chunk(3, dim=-1)``, then view/transpose, SDPA.

    The head-merge reshape uses the literal width ``num_heads * head_dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(x)


class FusedExplicitAttention(nn.Module):
    """timm-style fused qkv (``reshape(B, N, 3, H, hd)`` + ``unbind``) with an explicit softmax."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class InterleavedQKVAttention(nn.Module):
    """Fused qkv in the head-interleaved (Megatron / GPT-NeoX) layout: per head [q | k | v].

    Head ``h`` owns rows ``[3*h*hd, 3*(h+1)*hd)`` of the qkv weight, one contiguous run,
    unlike the timm layout where it owns three runs (one in each of q, k and v).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class GeluMlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PackedSwiGLU(nn.Module):
    """SwiGLU with ONE packed in-projection ``[gate | value]`` split by ``chunk(2, dim=-1)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, 2 * hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(F.silu(gate) * value)


class NormedMlp(nn.Module):
    """Linear -> GELU -> LayerNorm(hidden) -> Linear: the norm couples all neurons (not prunable)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, _ = t.shape
    return t.view(B, N, heads, -1).transpose(1, 2)


class WideAttention(nn.Module):
    """Inner width heads * head_dim different from the model width (vit-pytorch's ``dim_head``)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int = 0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=False)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked: fx cannot iterate a traced value
        q, k, v = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class PerHeadParamAttention(nn.Module):
    """Per-head parameters inside attention: a q/k norm scale ``[H, 1, hd]`` (vit-pytorch qk-norm),
    a temperature ``[H, 1, 1]`` (XCiT), and a learned scalar per head on the head outputs."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.q_gamma = nn.Parameter(torch.ones(num_heads, 1, head_dim))
        self.k_gamma = nn.Parameter(torch.ones(num_heads, 1, head_dim))
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.head_scale = nn.Parameter(torch.ones(num_heads))
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked: fx cannot iterate a traced value
        q, k, v = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        q = F.normalize(q, dim=-1) * self.q_gamma
        k = F.normalize(k, dim=-1) * self.k_gamma
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        o = (attn @ v) * self.head_scale.view(1, -1, 1, 1)
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


def _rel_index(grid: int) -> torch.Tensor:
    """[N, N] index into a ((2g-1)^2)-row relative-position table (Swin / BEiT layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    return rel[..., 0] * (2 * grid - 1) + rel[..., 1]


class RelPosIndexAttention(nn.Module):
    """A per-head bias gathered from a table ``[(2g-1)^2, H]`` with an index buffer, reshaped and
    permuted to ``[H, N, N]`` and added to the logits (BEiT / Swin); no class token."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, num_heads))
        self.register_buffer("index", _rel_index(grid), persistent=False)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def bias(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked: fx cannot iterate a traced value
        q, k, v = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + self.bias().unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class RelPosMlpAttention(RelPosIndexAttention):
    """The per-head bias made by a small MLP from log-spaced coordinates, its last Linear
    giving one value per head (timm's relpos ViTs), passed to SDPA as ``attn_mask``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int) -> None:
        super().__init__(dim, num_heads, head_dim, grid)
        del self.table
        side = torch.arange(-(grid - 1), grid, dtype=torch.float32)
        coords = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
        self.register_buffer("coords", torch.sign(coords) * torch.log1p(coords.abs()), persistent=False)
        self.bias_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, num_heads))

    def bias(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.bias_mlp(self.coords)[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked: fx cannot iterate a traced value
        q, k, v = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias().unsqueeze(0))
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class ShapeRopeAttention(nn.Module):
    """RoPE on the patch tokens whose angles are built in forward from the input's shape
    (``arange(N - prefix)``), as Hugging Face DINOv3 does."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int = 0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def rope(self, t: torch.Tensor, prefix: int) -> torch.Tensor:
        n = t.shape[-2] - prefix
        pos = torch.arange(n, device=t.device, dtype=t.dtype)
        freqs = 1.0 / (100.0 ** (torch.arange(0, self.head_dim, 2, device=t.device, dtype=t.dtype) / self.head_dim))
        ang = torch.cat([pos[:, None] * freqs[None]] * 2, dim=-1)
        body = t[..., prefix:, :]
        a, b = body.chunk(2, dim=-1)
        body = body * ang.cos() + torch.cat([-b, a], dim=-1) * ang.sin()
        return torch.cat([t[..., :prefix, :], body], dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked: fx cannot iterate a traced value
        q, k, v = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        q, k = self.rope(q, 1), self.rope(k, 1)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class ShiftedWindowAttention(nn.Module):
    """Swin-style attention inside windows of ``w x w`` tokens, optionally shifted by ``w // 2``
    (torch.roll, with a mask on the logits of tokens that came from different regions), and a
    per-head relative-position table gathered with an index buffer. Logits are viewed as
    ``[B, windows, H, n, n]`` to add the mask and back, as Swin does."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int, shift: bool = False) -> None:
        super().__init__()
        self.num_heads, self.grid, self.w = num_heads, grid, grid // 2
        self.shift = self.w // 2 if shift else 0
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.table = nn.Parameter(torch.zeros((2 * self.w - 1) ** 2, num_heads))
        self.register_buffer("index", _rel_index(self.w), persistent=False)
        region = torch.zeros(grid, grid)
        if self.shift:
            cuts = (slice(0, -self.w), slice(-self.w, -self.shift), slice(-self.shift, None))
            for i, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
                region[a, b] = i
        r = self.partition(region[None, :, :, None]).squeeze(-1)  # [windows, n]
        mask = (r[:, :, None] != r[:, None, :]).float() * -100.0
        self.register_buffer("mask", mask, persistent=False)

    def partition(self, x: torch.Tensor) -> torch.Tensor:  # [B, g, g, C] -> [B * windows, n, C]
        B, g, _, C = x.shape
        x = x.view(B, g // self.w, self.w, g // self.w, self.w, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, self.w * self.w, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        g, w, H = self.grid, self.w, self.num_heads
        x = x.view(B, g, g, C)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = self.partition(x)  # [B * nW, n, C]
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        q, k, v = _split_heads(q, H), _split_heads(k, H), _split_heads(v, H)
        n = w * w
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias.unsqueeze(0)
        nw = self.mask.shape[0]
        attn = attn.view(-1, nw, H, n, n) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, H, n, n).softmax(dim=-1)
        o = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, H * q.shape[-1]))
        o = o.view(B, g // w, g // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, g, g, C)
        if self.shift:
            o = torch.roll(o, shifts=(self.shift, self.shift), dims=(1, 2))
        return o.reshape(B, N, C)


class _ShiftedWindowAttention(ShiftedWindowAttention):
    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int) -> None:
        super().__init__(dim, num_heads, head_dim, grid, shift=True)


class TalkingHeadsAttention(nn.Module):
    """Talking-heads attention (CaiT): the logits and the probabilities are mixed across heads
    by two heads x heads Linears, so its heads are not independent (left out, with the reason)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.mix_l = nn.Linear(num_heads, num_heads)
        self.mix_w = nn.Linear(num_heads, num_heads)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked: fx cannot iterate a traced value
        q, k, v = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn = self.mix_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.mix_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class CachedBiasAttention(nn.Module):
    """A per-head bias ``[H, N, N]`` computed from a parameter once in eval mode and cached as a
    plain tensor attribute (timm TinyViT), plus a shape check fx cannot trace: torch.export
    captures the cache as a lifted constant, which slicing must replace like a buffer."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, grid: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.biases = nn.Parameter(torch.zeros(num_heads, (2 * grid - 1) ** 2))
        self.register_buffer("index", _rel_index(grid), persistent=False)
        self.cache: Dict[str, torch.Tensor] = {}

    def bias(self) -> torch.Tensor:
        if self.training:
            return self.biases[:, self.index]
        key = str(self.biases.device)
        if key not in self.cache:
            self.cache[key] = self.biases[:, self.index].detach()
        return self.cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        if N != self.index.shape[0]:  # Python control flow on a shape: fx cannot trace it
            raise ValueError(f"expected {self.index.shape[0]} tokens, got {N}")
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked: fx cannot iterate a traced value
        q, k, v = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias())
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class ParallelBlock(nn.Module):
    """One fused input projection feeding attention AND the FFN (timm ``ParallelScalingBlock``):
    ``in_proj`` = [mlp hidden | q | k | v], the FFN's bias a separate parameter added after the split."""

    def __init__(self, dim: int, heads: int, hidden: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.split = heads, [hidden] + [heads * head_dim] * 3
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, hidden + 3 * heads * head_dim, bias=False)
        self.mlp_bias = nn.Parameter(torch.zeros(hidden))
        self.attn_out = nn.Linear(heads * head_dim, dim)
        self.mlp_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h, q, k, v = torch.split(self.in_proj(self.norm(x)), self.split, dim=-1)
        o = F.scaled_dot_product_attention(
            _split_heads(q, self.num_heads), _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)
        )
        a = self.attn_out(o.transpose(1, 2).reshape(B, N, -1))
        return x + a + self.mlp_out(F.gelu(h + self.mlp_bias))


_ATTENTIONS = {
    "separate": SeparateQKVAttention,
    "chunk": FusedChunkAttention,
    "fused_explicit": FusedExplicitAttention,
    "interleaved": InterleavedQKVAttention,
}
#: attentions that take (dim, heads, head_dim, grid)
_ATTENTIONS_HD = {
    "wide": WideAttention,
    "per_head": PerHeadParamAttention,
    "relpos_index": RelPosIndexAttention,
    "relpos_mlp": RelPosMlpAttention,
    "rope": ShapeRopeAttention,
    "talking": TalkingHeadsAttention,
    "cached_bias": CachedBiasAttention,
    "window": ShiftedWindowAttention,
    "shifted_window": _ShiftedWindowAttention,
}
_MLPS = {"gelu": GeluMlp, "swiglu": PackedSwiGLU, "normed": NormedMlp}


class HandBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, attn: str, mlp: str, head_dim: Optional[int] = None,
                 grid: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attn in _ATTENTIONS_HD:
            self.attn = _ATTENTIONS_HD[attn](dim, heads, head_dim or dim // heads, grid)
        else:
            self.attn = _ATTENTIONS[attn](dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLPS[mlp](dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _hand_block(dim: int, heads: int, hidden: int, attn: str, mlp: str, head_dim: Optional[int], grid: int) -> nn.Module:
    if attn == "parallel":
        return ParallelBlock(dim, heads, hidden, head_dim or dim // heads)
    return HandBlock(dim, heads, hidden, attn, mlp, head_dim, grid)


class HandViT(nn.Module):
    """A minimal ViT whose blocks may differ in head count, FFN width and FFN kind."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        dim: int,
        heads: Sequence[int],
        hidden: Sequence[int],
        attn: Sequence[str],
        mlp: Sequence[str],
        pool: str = "cls",
        num_classes: int = 10,
        head_dim: Optional[Sequence[int]] = None,
        registers: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.pool = pool
        n_patches = (img_size // patch_size) ** 2
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        # registers=0 keeps an EMPTY register parameter [1, 0, dim] (DINOv3 / vit-pytorch with no extra tokens)
        self.registers = nn.Parameter(torch.zeros(1, registers, dim)) if registers is not None else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + (pool == "cls"), dim))
        hds = head_dim or [None] * len(heads)
        self.blocks = nn.ModuleList(
            _hand_block(dim, h, f, a, m, d, grid) for h, f, a, m, d in zip(heads, hidden, attn, mlp, hds)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.registers is not None:
            x = torch.cat([x[:, :1], self.registers.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(x)


_HAND_CFG = {
    "hand_separate_qkv": dict(
        img_size=32, patch_size=8, dim=48, heads=[3, 4], hidden=[72, 120],
        attn=["separate", "separate"], mlp=["gelu", "gelu"], pool="cls",
    ),
    "hand_fused_chunk_swiglu": dict(
        img_size=32, patch_size=8, dim=40, heads=[2, 4], hidden=[60, 100],
        attn=["chunk", "chunk"], mlp=["swiglu", "swiglu"], pool="mean",
    ),
    "hand_normed_ffn": dict(
        img_size=28, patch_size=7, dim=48, heads=[3, 2], hidden=[72, 90],
        attn=["fused_explicit", "fused_explicit"], mlp=["normed", "gelu"], pool="cls",
    ),
    "hand_interleaved_qkv": dict(
        img_size=32, patch_size=8, dim=36, heads=[3, 2], hidden=[54, 54],
        attn=["interleaved", "interleaved"], mlp=["gelu", "gelu"], pool="cls",
    ),
    # issue 14, one per pattern
    "hand_wide_inner": dict(  # 3: inner width heads x head_dim != dim; mean pooling, an empty register tensor
        img_size=32, patch_size=8, dim=32, heads=[4, 2], head_dim=[16, 24], hidden=[48, 40],
        attn=["wide", "wide"], mlp=["gelu", "gelu"], pool="mean", registers=0,
    ),
    "hand_per_head_params": dict(  # 2: q/k norm scale [H,1,hd], temperature [H,1,1], per-head scalar
        img_size=32, patch_size=8, dim=36, heads=[3, 4], head_dim=[12, 8], hidden=[54, 60],
        attn=["per_head", "per_head"], mlp=["gelu", "gelu"], pool="cls",
    ),
    "hand_parallel_block": dict(  # 5: one in_proj [mlp | q | k | v], separate mlp bias
        img_size=32, patch_size=8, dim=32, heads=[2, 4], head_dim=[16, 8], hidden=[64, 48],
        attn=["parallel", "parallel"], mlp=["gelu", "gelu"], pool="cls",
    ),
    "hand_relpos_tables": dict(  # 1: table + index buffer; a per-head table made by an MLP
        img_size=32, patch_size=8, dim=32, heads=[4, 2], hidden=[48, 64],
        attn=["relpos_index", "relpos_mlp"], mlp=["gelu", "gelu"], pool="mean",
    ),
    "hand_rope_from_shapes": dict(  # 4: RoPE angles from the input shape; zero register tokens
        img_size=32, patch_size=8, dim=32, heads=[2, 4], hidden=[40, 56],
        attn=["rope", "rope"], mlp=["gelu", "gelu"], pool="cls", registers=0,
    ),
    "hand_talking_heads": dict(  # 8: block 0 mixes heads (left out with the reason), block 1 plain
        img_size=32, patch_size=8, dim=32, heads=[4, 2], hidden=[48, 48],
        attn=["talking", "chunk"], mlp=["gelu", "gelu"], pool="cls",
    ),
    "hand_shifted_windows": dict(  # 6: 2 x 2 windows of a 4 x 4 grid, block 1 shifted by one token (masked)
        img_size=32, patch_size=8, dim=32, heads=[2, 4], hidden=[48, 40],
        attn=["window", "shifted_window"], mlp=["gelu", "gelu"], pool="mean",
    ),
    "hand_cached_bias_export": dict(  # 7: fx fails, torch.export lifts a cached per-head bias to a constant
        img_size=32, patch_size=8, dim=32, heads=[2, 4], hidden=[48, 40],
        attn=["cached_bias", "cached_bias"], mlp=["gelu", "gelu"], pool="mean",
    ),
}
#: hand entries that differ from the defaults (tracer "fx", nothing left out, module walk works)
_HAND_META = {
    "hand_parallel_block": dict(introspect=False),
    "hand_talking_heads": dict(left_out=(0,)),
    "hand_cached_bias_export": dict(tracer="export"),
    # attention runs over the 4 tokens of a window; the module walk would read the 16 of the grid
    "hand_shifted_windows": dict(tokens=4, introspect=False),
}


def _build_hand(name: str) -> Callable[[], Built]:
    def build_fn() -> Built:
        torch.manual_seed(0)
        cfg = _HAND_CFG[name]
        return _finish(HandViT(**cfg), cfg["img_size"])

    build_fn.__name__ = f"build_{name}"
    return build_fn


def _hand_layers(cfg: dict, tokens: Optional[int] = None) -> List[dict]:
    if tokens is None:
        tokens = (cfg["img_size"] // cfg["patch_size"]) ** 2 + (cfg["pool"] == "cls") + (cfg.get("registers") or 0)
    head_dims = cfg.get("head_dim") or [cfg["dim"] // h for h in cfg["heads"]]
    return [
        _layer(h, h * d, f, tokens, prunable=m != "normed", gated=m == "swiglu")
        for h, d, f, m in zip(cfg["heads"], head_dims, cfg["hidden"], cfg["mlp"])
    ]


# ---------------------------------------------------------------------------- timm


def _timm_cls(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


# constructor class, kwargs, number of prefix tokens (cls + dist + registers)
_TIMM_CFG = {
    "timm_vit": (
        ("timm.models.vision_transformer", "VisionTransformer"),
        dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=1.5, num_classes=10),
        1,
    ),
    "timm_deit_distilled": (
        ("timm.models.deit", "VisionTransformerDistilled"),
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0, num_classes=10),
        2,
    ),
    "timm_deit3": (
        ("timm.models.vision_transformer", "VisionTransformer"),
        dict(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0,
            no_embed_class=True, init_values=0.1, num_classes=10,
        ),
        1,
    ),
    "timm_dinov2_reg4": (
        ("timm.models.vision_transformer", "VisionTransformer"),
        dict(
            img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.5,
            init_values=0.1, reg_tokens=4, no_embed_class=True, num_classes=0,
        ),
        5,
    ),
    "timm_siglip_map": (
        ("timm.models.vision_transformer", "VisionTransformer"),
        dict(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=1.5,
            class_token=False, global_pool="map", num_classes=10,
        ),
        0,
    ),
    "timm_eva02": (
        ("timm.models.eva", "Eva"),
        dict(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=1.5,
            swiglu_mlp=True, scale_mlp=False, use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=10,
        ),
        1,
    ),
    "timm_eva02_scale_mlp": (
        ("timm.models.eva", "Eva"),
        dict(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, mlp_ratio=1.5, qkv_fused=False,
            swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=10,
        ),
        1,
    ),
    "timm_beit": (
        ("timm.models.beit", "Beit"),
        dict(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=3.0,
            use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, num_classes=10,
        ),
        1,
    ),
}


def _build_timm(name: str) -> Callable[[], Built]:
    def build_fn() -> Built:
        (module, cls_name), kwargs, _ = _TIMM_CFG[name]
        torch.manual_seed(0)
        model = _timm_cls(module, cls_name)(**kwargs)
        return _finish(model, kwargs["img_size"])

    build_fn.__name__ = f"build_{name}"
    return build_fn


def _timm_layers(name: str) -> List[dict]:
    _, c, prefix = _TIMM_CFG[name]
    tokens = (c["img_size"] // c["patch_size"]) ** 2 + prefix
    hidden = int(c["embed_dim"] * c["mlp_ratio"])
    gated = bool(c.get("swiglu_mlp", False))
    prunable = not c.get("scale_mlp", False)  # scale_mlp puts a LayerNorm over the FFN hidden
    layers = [
        _layer(c["num_heads"], c["embed_dim"], hidden, tokens, prunable=prunable, gated=gated)
        for _ in range(c["depth"])
    ]
    if c.get("global_pool") == "map":  # AttentionPoolLatent: latent_len=1 query, same heads and mlp_ratio
        layers.append(_layer(c["num_heads"], c["embed_dim"], hidden, 1, kv_tokens=tokens))
    return layers


# ---------------------------------------------------------------------------- Hugging Face transformers

# model class, config class, config kwargs, prefix tokens
_HF_CFG = {
    "hf_vit": (
        "ViTModel", "ViTConfig",
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=72,
             image_size=32, patch_size=8),
        1,
    ),
    "hf_deit": (
        "DeiTModel", "DeiTConfig",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
             image_size=32, patch_size=8),
        2,
    ),
    "hf_dinov2": (
        "Dinov2Model", "Dinov2Config",
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
             layerscale_value=0.5, image_size=32, patch_size=8),
        1,
    ),
    "hf_dinov2_swiglu": (
        "Dinov2Model", "Dinov2Config",
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=3, use_swiglu_ffn=True,
             image_size=32, patch_size=8),
        1,
    ),
    "hf_dinov2_registers": (
        "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, num_register_tokens=4,
             image_size=32, patch_size=8),
        5,
    ),
    "hf_clip_vision": (
        "CLIPVisionModel", "CLIPVisionConfig",
        dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80,
             image_size=32, patch_size=8, attn_implementation="eager"),
        1,
    ),
    "hf_siglip_vision": (
        "SiglipVisionModel", "SiglipVisionConfig",
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
             image_size=32, patch_size=8, vision_use_head=True),
        0,
    ),
    "hf_beit_relpos": (
        "BeitModel", "BeitConfig",
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
             image_size=32, patch_size=8, use_relative_position_bias=True),
        1,
    ),
    "hf_dinov3": (
        "DINOv3ViTModel", "DINOv3ViTConfig",
        dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
             image_size=32, patch_size=8, num_register_tokens=0),
        1,
    ),
}
#: Hugging Face entries the module walk of tests/test_zoo.py cannot read
_HF_META = {"hf_beit_relpos": dict(introspect=False), "hf_dinov3": dict(introspect=False)}


def _build_hf(name: str) -> Callable[[], Built]:
    def build_fn() -> Built:
        model_cls, config_cls, kwargs, _ = _HF_CFG[name]
        transformers = importlib.import_module("transformers")
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**kwargs)
        model = getattr(transformers, model_cls)(config)
        return _finish(model, kwargs["image_size"])

    build_fn.__name__ = f"build_{name}"
    return build_fn


def _hf_hidden(c: dict) -> int:
    if "intermediate_size" in c:
        return c["intermediate_size"]
    hidden = int(c["hidden_size"] * c["mlp_ratio"])
    if c.get("use_swiglu_ffn"):  # Dinov2SwiGLUFFN: 2/3 of the width, rounded up to a multiple of 8
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden


def _hf_layers(name: str) -> List[dict]:
    _, _, c, prefix = _HF_CFG[name]
    tokens = (c["image_size"] // c["patch_size"]) ** 2 + prefix
    hidden = _hf_hidden(c)
    gated = bool(c.get("use_swiglu_ffn", False))
    layers = [
        _layer(c["num_attention_heads"], c["hidden_size"], hidden, tokens, gated=gated)
        for _ in range(c["num_hidden_layers"])
    ]
    if c.get("vision_use_head"):  # SiglipMultiheadAttentionPoolingHead: nn.MultiheadAttention + SiglipMLP
        layers.append(_layer(c["num_attention_heads"], c["hidden_size"], hidden, 1, kv_tokens=tokens))
    return layers


# ---------------------------------------------------------------------------- torchvision

_TV_CFG = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=72, num_classes=10)


def _build_torchvision() -> Built:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return _finish(VisionTransformer(**_TV_CFG), _TV_CFG["image_size"])


def _tv_layers() -> List[dict]:
    c = _TV_CFG
    tokens = (c["image_size"] // c["patch_size"]) ** 2 + 1
    return [_layer(c["num_heads"], c["hidden_dim"], c["mlp_dim"], tokens) for _ in range(c["num_layers"])]


# ---------------------------------------------------------------------------- issue 14: more third-party ViTs

# name -> (family, requires, tracer, build kwargs, extra entry fields)
_T = dict(img_size=32, patch_size=8, num_classes=10)
_VP = dict(image_size=32, patch_size=8, num_classes=10)
_X_CFG = {
    "timm_tiny_vit": ("timm", ("timm",), "export",
                      dict(embed_dims=(16, 32, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3),
                           window_sizes=(2, 2, 4, 2), mlp_ratio=4.0, num_classes=10), dict(introspect=False)),
    "timm_cait": ("timm", ("timm",), "fx",
                  dict(_T, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, depth_token_only=1,
                       mlp_ratio_token_only=3.0), dict(left_out=(0, 1), introspect=False)),
    "timm_vit_xp": ("timm", ("timm",), "fx",
                    dict(_T, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, qkv_bias=False, qk_norm=True,
                         no_embed_class=True), dict(introspect=False)),
    "timm_vit_relpos": ("timm", ("timm",), "fx",
                        dict(_T, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, rel_pos_type="mlp"),
                        dict(introspect=False)),  # RelPosMlp reads as an FFN to the module walk
    "timm_swin": ("timm", ("timm",), "fx",
                  dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                       mlp_ratio=4.0, num_classes=10), {}),
    "timm_hiera": ("timm", ("timm",), "fx",
                   dict(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), q_pool=1, mlp_ratio=4.0,
                        num_classes=10), dict(introspect=False)),
    "timm_sam": ("timm", ("timm",), "export",
                 dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, window_size=4,
                      global_attn_indexes=(1,), use_rel_pos=True, mlp_ratio=4.0, neck_chans=16, num_classes=10),
                 dict(introspect=False)),
    "torchvision_swin": ("torchvision", ("torchvision",), "export",
                         dict(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                              mlp_ratio=4.0, num_classes=10), dict(fx_opaque=True, introspect=False)),
    "vitp_vit_wide": ("vit_pytorch", ("vit_pytorch",), "export",
                      dict(_VP, dim=32, depth=2, heads=4, dim_head=16, mlp_dim=48, pool="mean"),
                      dict(introspect=False)),
    "vitp_qk_norm": ("vit_pytorch", ("vit_pytorch",), "export",
                     dict(_VP, dim=32, depth=2, heads=4, dim_head=12, mlp_dim=40), dict(introspect=False)),
    "open_clip_vit": ("open_clip", ("open_clip",), "fx",
                      dict(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=2.0, output_dim=16),
                      dict(introspect=False)),
    "vitp_deepvit": ("vit_pytorch", ("vit_pytorch",), "export",
                     dict(_VP, dim=32, depth=2, heads=4, dim_head=16, mlp_dim=48),
                     dict(left_out=(0, 1), introspect=False)),
}


def _x_model(name: str, kw: dict) -> nn.Module:
    if name == "timm_tiny_vit":
        return _timm_cls("timm.models.tiny_vit", "TinyVit")(**kw)
    if name == "timm_cait":
        return _timm_cls("timm.models.cait", "Cait")(**kw)
    if name == "timm_vit_xp":
        block = _timm_cls("timm.models.vision_transformer", "ParallelScalingBlock")
        return _timm_cls("timm.models.vision_transformer", "VisionTransformer")(block_fn=block, **kw)
    if name == "timm_vit_relpos":
        return _timm_cls("timm.models.vision_transformer_relpos", "VisionTransformerRelPos")(**kw)
    if name == "timm_swin":
        return _timm_cls("timm.models.swin_transformer", "SwinTransformer")(**kw)
    if name == "torchvision_swin":
        return _timm_cls("torchvision.models.swin_transformer", "SwinTransformer")(**kw)
    if name == "timm_hiera":
        return _timm_cls("timm.models.hiera", "Hiera")(**kw)
    if name == "timm_sam":
        return _timm_cls("timm.models.vision_transformer_sam", "VisionTransformerSAM")(**kw)
    if name == "vitp_vit_wide":
        return _timm_cls("vit_pytorch", "ViT")(**kw)
    if name == "vitp_qk_norm":
        return _timm_cls("vit_pytorch.simple_vit_with_qk_norm", "SimpleViT")(**kw)
    if name == "vitp_deepvit":
        return _timm_cls("vit_pytorch.deepvit", "DeepViT")(**kw)
    if name == "open_clip_vit":
        return _timm_cls("open_clip.transformer", "VisionTransformer")(**kw)
    raise KeyError(name)


def _x_size(kw: dict) -> int:
    size = kw.get("img_size", kw.get("image_size", 64 if "embed_dims" in kw else 32))
    return size[0] if isinstance(size, tuple) else size


def _build_x(name: str) -> Callable[[], Built]:
    def build_fn() -> Built:
        kw = _X_CFG[name][3]
        torch.manual_seed(0)
        return _finish(_x_model(name, kw), _x_size(kw))

    build_fn.__name__ = f"build_{name}"
    return build_fn


def _x_layers(name: str) -> List[dict]:
    """Ground truth from the configuration: how each family lays out its blocks."""
    c = _X_CFG[name][3]
    if name == "timm_tiny_vit":  # stage 0 is convolutional; each later stage: windowed attention blocks
        out = []
        for i in range(1, 4):
            window = c["window_sizes"][i]
            dim = c["embed_dims"][i]
            out += [_layer(c["num_heads"][i], dim, int(dim * c["mlp_ratio"]), window * window)] * c["depths"][i]
        return out
    if name == "timm_cait":  # talking-heads blocks, then class-attention blocks (1 query token)
        tokens = (c["img_size"] // c["patch_size"]) ** 2
        body = [_layer(c["num_heads"], c["embed_dim"], int(c["embed_dim"] * c["mlp_ratio"]), tokens)] * c["depth"]
        hidden = int(c["embed_dim"] * c["mlp_ratio_token_only"])
        head = [_layer(c["num_heads"], c["embed_dim"], hidden, 1, kv_tokens=tokens + 1)] * c["depth_token_only"]
        return body + head
    if name in ("timm_vit_xp", "timm_vit_relpos"):
        tokens = (c["img_size"] // c["patch_size"]) ** 2 + 1
        return [_layer(c["num_heads"], c["embed_dim"], int(c["embed_dim"] * c["mlp_ratio"]), tokens)] * c["depth"]
    if name == "timm_sam":  # windowed blocks (window x window tokens) and the global ones (the whole grid)
        grid = c["img_size"] // c["patch_size"]
        return [
            _layer(c["num_heads"], c["embed_dim"], int(c["embed_dim"] * c["mlp_ratio"]),
                   grid * grid if i in c["global_attn_indexes"] else c["window_size"] ** 2)
            for i in range(c["depth"])
        ]
    if name == "timm_hiera":  # heads and width double per stage (head_dim stays); tokens: not checked (no walk)
        out = []
        for i, depth in enumerate(c["stages"]):
            heads, dim = c["num_heads"] * 2**i, c["embed_dim"] * 2**i
            out += [_layer(heads, dim, int(dim * c["mlp_ratio"]), None)] * depth
        return out
    if name in ("timm_swin", "torchvision_swin"):
        window = c["window_size"] if isinstance(c["window_size"], int) else c["window_size"][0]
        out = []
        for i, (d, h) in enumerate(zip(c["depths"], c["num_heads"])):
            dim = c["embed_dim"] * 2**i
            out += [_layer(h, dim, int(dim * c["mlp_ratio"]), window * window)] * d
        return out
    if name == "open_clip_vit":  # nn.MultiheadAttention blocks, class token, mlp c_fc -> GELU -> c_proj
        tokens = (c["image_size"] // c["patch_size"]) ** 2 + 1
        return [_layer(c["heads"], c["width"], int(c["width"] * c["mlp_ratio"]), tokens)] * c["layers"]
    # vit-pytorch: inner width heads x dim_head; mean pooling has no class token, SimpleViT none at all
    tokens = (c["image_size"] // c["patch_size"]) ** 2 + (name == "vitp_deepvit")
    return [_layer(c["heads"], c["heads"] * c["dim_head"], c["mlp_dim"], tokens)] * c["depth"]


# ---------------------------------------------------------------------------- bad inputs


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResNetLike(nn.Module):
    """A tiny residual CNN: no attention anywhere."""

    def __init__(self, ch: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())
        self.layer1 = _ResBlock(ch)
        self.layer2 = _ResBlock(ch)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MlpOnly(nn.Module):
    """Flatten the image, then Linear -> GELU -> Linear -> GELU -> Linear: FFNs but no attention."""

    def __init__(self, img_size: int = 32, hidden: int = 72, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * img_size * img_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x.flatten(1)))
        return self.fc3(F.gelu(self.fc2(x)))


class DataDependentViT(HandViT):
    """A hand-written ViT whose forward branches on a tensor value: no tracer can capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            x = x.flip(-1)
        return super().forward(x)


def resnet_like() -> Built:
    """A small residual CNN (no attention): discovery must refuse it."""
    torch.manual_seed(0)
    return _finish(ResNetLike(), 32)


def mlp_only() -> Built:
    """A plain MLP on flattened images (no attention): discovery must refuse it."""
    torch.manual_seed(0)
    return _finish(MlpOnly(), 32)


def data_dependent() -> Built:
    """A ViT with ``if x.sum() > 0:`` in forward: fx and torch.export both fail on it."""
    torch.manual_seed(0)
    cfg = dict(_HAND_CFG["hand_separate_qkv"])
    return _finish(DataDependentViT(**cfg), cfg["img_size"])


#: Negative inputs: name -> build function.
BAD: Dict[str, Callable[[], Built]] = {
    "resnet_like": resnet_like,
    "mlp_only": mlp_only,
    "data_dependent": data_dependent,
}


# ---------------------------------------------------------------------------- the zoo

_NOTES = {
    "timm_vit": "timm VisionTransformer: fused qkv reshape(B,N,3,H,hd)+unbind, SDPA, GELU Mlp; 1 cls token.",
    "timm_deit_distilled": "timm VisionTransformerDistilled: cls + distillation token (18 tokens), "
    "two heads (head, head_dist) averaged in eval.",
    "timm_deit3": "DeiT-III style: layer scale (ls1/ls2 gamma, init 0.1 then perturbed), no_embed_class.",
    "timm_dinov2_reg4": "DINOv2 reg4 style: 1 cls + 4 register tokens + 16 patches = 21 tokens, layer scale, "
    "no_embed_class, num_classes=0 (outputs the cls embedding); img 28 / patch 7.",
    "timm_siglip_map": "SigLIP style: no cls token, global_pool='map'. Block 2 is the AttentionPoolLatent head: "
    "q Linear on a learned latent (1 query token), fused kv Linear (2*dim, reshape(B,N,2,H,hd)), SDPA, "
    "proj, then x + mlp(norm(x)); its heads/mlp_ratio equal the main stack's. Note its head-merge "
    "reshape uses the INPUT width C, not H*hd.",
    "timm_eva02": "EVA-02 (tiny/small style): RoPE on q/k of patch tokens (cls skipped), fused qkv WITHOUT "
    "bias in the Linear: separate q_bias/v_bias parameters (k_bias is a zero buffer) concatenated and "
    "applied with F.linear(x, qkv.weight, bias) -- the qkv Linear module is never called. scale_mlp=False "
    "-> GluMlp: ONE packed fc1 (out 2*hidden) chunked in two, silu(first half) * second half "
    "(gate first); fc2 in = hidden. Prunable. Head-merge reshape(B, N, C) uses the INPUT width C.",
    "timm_eva02_scale_mlp": "EVA-02 (base style): qkv_fused=False -> separate q_proj/k_proj(no bias)/v_proj; "
    "RoPE; scale_mlp=True -> SwiGLU with two separate fc1_g/fc1_x and a LayerNorm over the hidden width "
    "before fc2: FFN NOT prunable (heads still are).",
    "timm_beit": "BEiT: per-block relative position bias table [num_rel_dist, H] (a per-head parameter "
    "added as the SDPA attn_mask), q_bias/v_bias like EVA (F.linear on qkv.weight), layer scale "
    "gamma_1/gamma_2, no abs pos embed; qkv reshape(B,N,3,H,-1) infers head_dim, head-merge "
    "reshape(B, N, C) uses the INPUT width C.",
    "hf_vit": "HF ViTModel (v5): separate q_proj/k_proj/v_proj/o_proj, view(B,N,-1,head_dim) (heads "
    "inferred), SDPA; returns BaseModelOutputWithPooling (pooler: dense+tanh). fx.symbolic_trace fails "
    "(TypeError: 'Proxy' object does not support item assignment); torch.export(strict=False) works.",
    "hf_deit": "HF DeiTModel: cls + distillation token (18 tokens), otherwise like hf_vit. fx fails, export works.",
    "hf_dinov2": "HF Dinov2Model: layer scale (layer_scale1/2, lambda1), bicubic pos-embed interpolation "
    "path in embeddings; fx fails (TraceError: Proxy object cannot be iterated), export works.",
    "hf_dinov2_swiglu": "HF Dinov2Model use_swiglu_ffn=True: Dinov2SwiGLUFFN with SEPARATE gate_proj/up_proj "
    "and down_proj (transformers v5; older versions packed them in weights_in); hidden = "
    "ceil8(int(int(48*3)*2/3)) = 96. fx fails, export works.",
    "hf_dinov2_registers": "HF Dinov2WithRegistersModel: 1 cls + 4 registers + 16 patches = 21 tokens. "
    "fx fails, export works.",
    "hf_clip_vision": "HF CLIPVisionModel, attn_implementation='eager' (explicit matmul+softmax, not SDPA), "
    "pre_layrnorm before the encoder, QuickGELU MLP. fx fails, export works.",
    "hf_siglip_vision": "HF SiglipVisionModel with vision_use_head=True: no cls token; block 2 is "
    "SiglipMultiheadAttentionPoolingHead = torch.nn.MultiheadAttention(batch_first) with a PACKED "
    "in_proj_weight [3*dim, dim] (probe = 1 query token, patches = keys/values; under torch.export it "
    "becomes split_with_sizes + linear + bmm/softmax since need_weights=True) + LayerNorm + SiglipMLP "
    "with the same intermediate_size. fx fails, export works.",
    "torchvision_vit": "torchvision VisionTransformer: nn.MultiheadAttention (packed in_proj_weight, "
    "out_proj) which fx keeps as a leaf call_module; MLPBlock is an nn.Sequential (0: Linear, 3: Linear).",
    "hand_separate_qkv": "Hand-written: separate q/k/v Linears, view(B,N,H,-1) (head_dim inferred), explicit "
    "softmax (no SDPA), GELU MLP; blocks differ: heads 3/4 (head_dim 16/12), hidden 72/120.",
    "hand_fused_chunk_swiglu": "Hand-written: fused qkv split with chunk(3,-1) then view(B,N,H,hd)/transpose, "
    "SDPA, merge reshape with literal H*hd; FFN = SwiGLU with ONE packed fc_in [gate|value] chunked in two; "
    "no cls token, mean pooling; heads 2/4 (head_dim 20/10), hidden 60/100.",
    "hand_normed_ffn": "Hand-written: timm-style fused qkv with explicit softmax; block 0 FFN has a LayerNorm "
    "over the hidden width (NOT prunable), block 1 a plain GELU MLP (prunable); img 28 / patch 7.",
    "hand_interleaved_qkv": "Hand-written: fused qkv in the head-interleaved layout view(B,N,H,3,hd) (each "
    "head's q,k,v rows are one contiguous run of 3*hd rows), SDPA, merge reshape with -1.",
    "hand_wide_inner": "Hand-written (issue 14, pattern 3): inner width heads x head_dim (64, 48) != dim 32, no "
    "class token (mean pooling) and an EMPTY register parameter [1, 0, dim] concatenated in.",
    "hand_per_head_params": "Hand-written (pattern 2): q/k normalised and scaled by per-head gammas [H,1,hd], "
    "logits times a per-head temperature [H,1,1], head outputs times a per-head scalar [H].",
    "hand_parallel_block": "Hand-written (pattern 5): ONE in_proj [mlp hidden | q | k | v] split with torch.split, "
    "the FFN bias a separate parameter added after the split, attn_out and mlp_out summed into the residual.",
    "hand_relpos_tables": "Hand-written (pattern 1): block 0 gathers a [(2g-1)^2, H] table with an index buffer, "
    "view/permute to [H,N,N], added to explicit logits; block 1 makes the table with Linear(2,16)-ReLU-"
    "Linear(16,H) from coordinates and passes it to SDPA as attn_mask.",
    "hand_rope_from_shapes": "Hand-written (pattern 4): RoPE whose angles are built in forward from arange(N - 1) "
    "(the token count read from the shape), class token skipped, zero register tokens.",
    "hand_talking_heads": "Hand-written (pattern 8): block 0 talking-heads attention (logits and probabilities "
    "mixed over heads by two Linear(H, H)): left out with the reason, FFN pruned; block 1 plain.",
    "hand_shifted_windows": "Hand-written (pattern 6): 2x2-token windows of the 4x4 grid; block 1 rolls by one "
    "token and masks pairs from different regions (logits viewed [B, windows, H, n, n] + mask); per-head "
    "relative-position table gathered with an index buffer; explicit softmax.",
    "hand_cached_bias_export": "Hand-written (pattern 7): a shape check fx cannot trace, and a per-head bias "
    "cached as a plain tensor attribute in eval mode, which torch.export lifts to a constant.",
    "hf_beit_relpos": "HF BeitModel use_relative_position_bias=True: a shared table interpolated to the window "
    "(F.interpolate), gathered with an index built in forward, permuted to [H,N,N]. fx fails, export works.",
    "hf_dinov3": "HF DINOv3ViTModel, 0 register tokens (empty tensors in the graph), RoPE whose position "
    "tensors are built from the input shape in forward. fx fails, export works.",
    "timm_tiny_vit": "timm TinyVit: conv stage 0, then one windowed-attention block per stage (heads 2,2,3); "
    "eval-mode attention-bias cache lifted to a constant by torch.export (fx fails on shape checks).",
    "timm_cait": "timm Cait: 2 talking-heads blocks (proj_l / proj_w mix heads: left out, FFNs pruned), then "
    "1 class-attention block (q on the class token, 1 query token, 17 keys).",
    "timm_vit_xp": "timm VisionTransformer with ParallelScalingBlock (vit_*_xp): in_proj = [mlp | q | k | v], "
    "mlp_bias added after the split, qk-norm, separate attn_out_proj / mlp_out_proj.",
    "timm_vit_relpos": "timm VisionTransformerRelPos (rel_pos_type='mlp'): the per-head bias is RelPosMlp's "
    "last Linear (one output per head) over log-spaced coordinates, passed to SDPA as attn_mask.",
    "timm_swin": "timm SwinTransformer: window attention, every second block shifted (logits viewed to "
    "[B, windows, H, N, N] to add the shift mask), per-head relative-position table; PatchMerging between stages.",
    "timm_hiera": "timm Hiera: mask-unit attention q/k/v [B, heads, windows, N, head_dim] (heads on axis -4), "
    "query pooling by amax over a stride axis, global attention in the last stages; heads 1,2,2,4,8.",
    "timm_sam": "timm VisionTransformerSAM: block 0 windowed (4x4 windows, padded), block 1 global; q/k/v "
    "reshaped to [B * heads, N, d] (heads folded into the batch axis), decomposed relative position bias "
    "computed from q by einsum and passed as attn_mask; conv neck. fx fails, export works.",
    "torchvision_swin": "torchvision SwinTransformer: shifted_window_attention is torch.fx.wrap'ed (opaque under "
    "fx, weights passed in), so elastic_fx traces with torch.export; masks built from x.new_zeros.",
    "vitp_vit_wide": "vit-pytorch ViT(dim=32, heads=4, dim_head=16): inner width 64 != 32, pool='mean' (zero "
    "class tokens: an empty [0, dim] parameter), einops rearrange. fx fails, export works.",
    "vitp_qk_norm": "vit-pytorch SimpleViT with qk-norm: RMSNorm gamma [heads, 1, dim_head] per head, no class "
    "token, sin-cos positions. fx fails, export works.",
    "open_clip_vit": "open_clip VisionTransformer: ResidualAttentionBlock with nn.MultiheadAttention (fx leaf), "
    "mlp = Sequential(c_fc, GELU, c_proj), class token, attention pooling off, projection to output_dim.",
    "vitp_deepvit": "vit-pytorch DeepViT: re-attention (einsum with a heads x heads matrix + LayerNorm over heads "
    "between softmax and @ v): left out with the reason, FFNs pruned.",
}


def _make_zoo() -> Dict[str, ZooEntry]:
    zoo: Dict[str, ZooEntry] = {}
    for name, (_, kwargs, _) in _TIMM_CFG.items():
        zoo[name] = _entry(
            name, _build_timm(name), _timm_layers(name), tracer="fx", notes=_NOTES[name],
            embed_dim=kwargs["embed_dim"], family="timm", requires=("timm",),
        )
    for name, (_, _, kwargs, _) in _HF_CFG.items():
        zoo[name] = _entry(
            name, _build_hf(name), _hf_layers(name), tracer="export", notes=_NOTES[name],
            embed_dim=kwargs["hidden_size"], family="hf", requires=("transformers",), **_HF_META.get(name, {}),
        )
    zoo["hf_siglip_vision"] = dataclasses.replace(zoo["hf_siglip_vision"], left_out=(2,))
    zoo["torchvision_vit"] = _entry(
        "torchvision_vit", _build_torchvision, _tv_layers(), tracer="fx", notes=_NOTES["torchvision_vit"],
        embed_dim=_TV_CFG["hidden_dim"], family="torchvision", requires=("torchvision",),
    )
    for name, cfg in _HAND_CFG.items():
        meta = {"tracer": "fx", **_HAND_META.get(name, {})}
        layers = _hand_layers(cfg, meta.pop("tokens", None))
        zoo[name] = _entry(
            name, _build_hand(name), layers, notes=_NOTES[name], embed_dim=cfg["dim"], family="hand", **meta,
        )
    for name, (family, requires, tracer, kw, extra) in _X_CFG.items():
        zoo[name] = _entry(
            name, _build_x(name), _x_layers(name), tracer=tracer, notes=_NOTES[name],
            embed_dim=kw.get("embed_dim", kw.get("dim", kw.get("width", 0))), family=family, requires=requires, **extra,
        )
    return zoo


#: Every model of the zoo, by name, in a fixed order.
ZOO: Dict[str, ZooEntry] = _make_zoo()


def build(name: str) -> Built:
    """Build a zoo entry (or a :data:`BAD` input) by name: ``(model.eval(), inputs)``."""
    if name in ZOO:
        return ZOO[name].build()
    if name in BAD:
        return BAD[name]()
    raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO) + sorted(BAD)}")


def names(tracer: Optional[str] = None, family: Optional[str] = None) -> List[str]:
    """Zoo entry names, optionally only those for one tracer ("fx"/"export") or family."""
    return [
        n
        for n, e in ZOO.items()
        if (tracer is None or e.tracer == tracer) and (family is None or e.family == family)
    ]


def params(tracer: Optional[str] = None, family: Optional[str] = None) -> list:
    """``pytest.param`` objects for parametrization; entries whose packages are missing are skipped."""
    import pytest

    out = []
    for n in names(tracer, family):
        missing = ZOO[n].missing
        marks = [pytest.mark.skip(reason=f"{n} needs {', '.join(missing)}")] if missing else []
        out.append(pytest.param(n, id=n, marks=marks))
    return out
