"""Tests of elastic_fx.kernels.masked_attention.

On a CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py sets it; it
is set here too so the file also runs on its own), so its shapes stay tiny. On a GPU the
same tests run natively, plus a few ViT-sized cases.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import importlib  # noqa: E402

# elastic_fx.kernels.masked_attention is the public FUNCTION (the contract); the module
# of the same name is reached through importlib.
ma_module = importlib.import_module("elastic_fx.kernels.masked_attention")
from elastic_fx.kernels import _dispatch  # noqa: E402
from elastic_fx.kernels.masked_attention import masked_attention, masked_attention_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="ViT-sized kernel shapes run only natively on a GPU")

# (dtype, atol, rtol): the kernel rounds softmax probabilities to the input dtype before
# the second matmul, as flash attention does, so 16-bit tolerances are a few ulps.
DTYPE_TOLS = [
    (torch.float32, 2e-5, 1e-4),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (C, B, H, N, N_kv, d): token counts that are not multiples of any block size, q and kv
# lengths that differ, head dims that are not powers of two (24 and 80 exercise the d-mask).
INTERPRETER_SHAPES = [
    (2, 1, 3, 1, 1, 16),
    (2, 1, 3, 5, 5, 16),
    (2, 2, 3, 19, 19, 32),
    (2, 1, 3, 7, 13, 32),
    (2, 2, 2, 17, 9, 24),
    (2, 1, 3, 50, 50, 32),
]
GPU_SHAPES = [
    pytest.param((4, 3, 12, 197, 197, 64), marks=needs_cuda, id="vitb16"),
    pytest.param((3, 2, 16, 257, 257, 80), marks=needs_cuda, id="n257-d80"),
    pytest.param((3, 2, 8, 50, 50, 128), marks=needs_cuda, id="n50-d128"),
    pytest.param((2, 2, 6, 197, 50, 32), marks=needs_cuda, id="n197-kv50-d32"),
]


def _qkv(shape, dtype, device=DEVICE, seed=0):
    C, B, H, N, N_kv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(C, B, H, N, d, generator=g)
    k = torch.randn(C, B, H, N_kv, d, generator=g)
    v = torch.randn(C, B, H, N_kv, d, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _keep(C, H, device=DEVICE, seed=0):
    """A random mask with at least one kept and one masked pair, and candidate 0 fully masked."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(C, H, generator=g) < 0.5
    keep[0] = False
    keep[-1, 0] = True
    return keep.to(device)


def _dense_sdpa(q, k, v, scale=None):
    """F.scaled_dot_product_attention on [C*B, H, N, d] views, in fp32."""
    C, B, H, N, d = q.shape
    flat = [t.float().reshape(C * B, H, t.shape[3], d) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*flat, scale=scale).reshape(C, B, H, N, d)


# ----------------------------------------------------------------------- kernel vs oracle


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES + GPU_SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype, atol, rtol):
    q, k, v = _qkv(shape, dtype)
    keep = _keep(shape[0], shape[2])
    out = masked_attention(q, k, v, keep, backend="triton")
    ref = masked_attention_ref(q, k, v, keep)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
def test_keep_all_equals_sdpa(dtype, atol, rtol, backend):
    shape = (2, 2, 3, 19, 19, 32) if not CUDA else (3, 4, 12, 197, 197, 64)
    q, k, v = _qkv(shape, dtype, seed=1)
    keep = torch.ones(shape[0], shape[2], dtype=torch.bool, device=DEVICE)
    out = masked_attention(q, k, v, keep, backend=backend)
    assert out.is_contiguous() and out.dtype == dtype
    torch.testing.assert_close(out.float(), _dense_sdpa(q, k, v), atol=atol, rtol=rtol)


def test_masked_pairs_are_exact_zeros_and_never_read():
    """NaN-filled masked pairs still give exact zeros: the kernel returns before loading them."""
    shape = (3, 2, 4, 11, 11, 16)
    q, k, v = _qkv(shape, torch.float32, seed=2)
    keep = torch.tensor([[False] * 4, [True, False, True, False], [True] * 4], device=DEVICE)
    poisoned = [t.clone() for t in (q, k, v)]
    for t in poisoned:
        t.permute(0, 2, 1, 3, 4)[~keep] = float("nan")  # [C, H, B, N, d] view: masked (c, h) rows
        assert torch.isnan(t[1, :, 1]).all() and not torch.isnan(t[1, :, 0]).any()
    for backend in ("triton", "torch"):
        out = masked_attention(*poisoned, keep, backend=backend)
        masked = out.permute(0, 2, 1, 3, 4)[~keep]
        assert torch.equal(masked, torch.zeros_like(masked)), backend
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out, masked_attention_ref(q, k, v, keep), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_candidate_gives_zeros(backend):
    shape = (3, 2, 3, 9, 9, 16)
    q, k, v = _qkv(shape, torch.float16, seed=3)
    keep = torch.ones(3, 3, dtype=torch.bool, device=DEVICE)
    keep[1] = False
    out = masked_attention(q, k, v, keep, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0
    none = masked_attention(q, k, v, torch.zeros_like(keep), backend=backend)
    assert torch.equal(none, torch.zeros_like(none))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS, ids=DTYPE_IDS)
def test_permuted_packed_qkv_views(dtype, atol, rtol):
    """q/k/v as strided views of one packed [C, B, N, 3, H, d] tensor, as the search produces them."""
    C, B, H, N, d = (2, 2, 3, 13, 16) if not CUDA else (4, 2, 12, 197, 64)
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(C, B, N, 3 * H * d, generator=g).to(device=DEVICE, dtype=dtype)
    q, k, v = qkv.view(C, B, N, 3, H, d).permute(3, 0, 1, 4, 2, 5)
    assert not q.is_contiguous()
    keep = _keep(C, H, seed=4)
    out = masked_attention(q, k, v, keep, backend="triton")
    expected = masked_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), keep)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_custom_scale(backend):
    shape = (2, 1, 3, 10, 12, 32)
    q, k, v = _qkv(shape, torch.float32, seed=5)
    keep = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    out = masked_attention(q, k, v, keep, scale=0.3, backend=backend)
    torch.testing.assert_close(out, _dense_sdpa(q, k, v, scale=0.3), atol=2e-5, rtol=1e-4)
    default = masked_attention(q, k, v, keep, backend=backend)
    assert not torch.allclose(out, default)


def test_empty_candidate_axis():
    q, k, v = _qkv((0, 1, 2, 4, 4, 16), torch.float32)
    out = masked_attention(q, k, v, torch.zeros(0, 2, dtype=torch.bool, device=DEVICE), backend="triton")
    assert out.shape == (0, 1, 2, 4, 16)


# ----------------------------------------------------------------------- reference on CPU


@pytest.mark.parametrize("N,d", [(197, 64), (257, 64), (50, 80)])
def test_reference_at_vit_shapes_matches_sdpa_times_mask(N, d):
    C, B, H = 4, 2, 6
    q, k, v = _qkv((C, B, H, N, N, d), torch.float32, device="cpu", seed=6)
    keep = _keep(C, H, device="cpu", seed=6)
    dense = _dense_sdpa(q, k, v) * keep[:, None, :, None, None]
    torch.testing.assert_close(masked_attention_ref(q, k, v, keep), dense, atol=1e-5, rtol=1e-5)


def test_reference_bf16_matches_fp32_sdpa():
    q, k, v = _qkv((2, 2, 4, 197, 197, 64), torch.bfloat16, device="cpu", seed=7)
    keep = _keep(2, 4, device="cpu", seed=7)
    out = masked_attention_ref(q, k, v, keep)
    assert out.dtype == torch.bfloat16
    dense = _dense_sdpa(q, k, v) * keep[:, None, :, None, None]
    torch.testing.assert_close(out.float(), dense, atol=1e-2, rtol=1e-2)


def test_reference_only_attends_kept_pairs(monkeypatch):
    """The reference gathers kept (c, h) pairs: SDPA sees K*B rows, not C*B*H."""
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(tuple(q.shape))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(ma_module.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv((3, 2, 4, 7, 7, 16), torch.float32, device="cpu")
    keep = torch.zeros(3, 4, dtype=torch.bool)
    keep[0, 1] = keep[2, 3] = keep[2, 0] = True
    masked_attention_ref(q, k, v, keep)
    assert seen == [(3, 2, 7, 16)]


def test_reference_never_reads_a_device_mask_on_the_host():
    """With head_keep off the CPU the reference must not call .cpu()/.tolist() on it (a host
    sync per block on a GPU). Meta tensors hold no values, so any such read raises here."""
    q, k, v = (torch.empty(2, 3, 4, 9, 16, device="meta") for _ in range(3))
    out = masked_attention_ref(q, k, v, torch.empty(2, 4, dtype=torch.bool, device="meta"))
    assert out.shape == (2, 3, 4, 9, 16) and out.device.type == "meta" and out.dtype == torch.float32


# ----------------------------------------------------------------------- dispatch


def test_dispatch(monkeypatch):
    calls = []
    real_ref = ma_module.masked_attention_ref

    def spy(*args, **kwargs):
        calls.append("ref")
        return real_ref(*args, **kwargs)

    monkeypatch.setattr(ma_module, "masked_attention_ref", spy)
    q, k, v = _qkv((2, 1, 2, 5, 5, 16), torch.float32, device="cpu")
    keep = torch.ones(2, 2, dtype=torch.bool)
    monkeypatch.delenv(_dispatch.FORCE_TRITON_ENV, raising=False)

    masked_attention(q, k, v, keep)  # auto + CPU -> reference
    assert calls == ["ref"]
    masked_attention(q, k, v, keep, backend="torch")
    assert calls == ["ref", "ref"]
    if _dispatch._INTERPRETED:
        masked_attention(q, k, v, keep, backend="triton")
        monkeypatch.setenv(_dispatch.FORCE_TRITON_ENV, "1")
        masked_attention(q, k, v, keep)  # auto + forced -> Triton interpreter
        assert calls == ["ref", "ref"]
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            masked_attention(q, k, v, keep, backend="triton")
    if CUDA:
        calls.clear()
        masked_attention(*(t.cuda() for t in (q, k, v)), keep.cuda())  # auto + CUDA -> Triton
        assert calls == []


# ----------------------------------------------------------------------- validation


def _valid(device="cpu"):
    q, k, v = _qkv((2, 1, 3, 5, 6, 16), torch.float32, device=device)
    return q, k, v, torch.ones(2, 3, dtype=torch.bool, device=device)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), r"q must have rank 5.*got rank 4"),
        (lambda q, k, v, m: (q, k[:1], v[:1], m), r"does not match q.*C=2"),
        (lambda q, k, v, m: (q, k[:, :, :2], v[:, :, :2], m), r"does not match q.*H=3"),
        (lambda q, k, v, m: (q, k[..., :8], v[..., :8], m), r"does not match q.*d=16"),
        (lambda q, k, v, m: (q, k, v[:, :, :, :4], m), r"k and v must have the same shape"),
        (lambda q, k, v, m: (q, k, v, m[:, :2]), r"head_keep must have shape \[C, H\] = \[2, 3\], got \(2, 2\)"),
        (lambda q, k, v, m: (q, k, v, m.float()), r"head_keep must be a bool tensor"),
        (lambda q, k, v, m: (q.double(), k.double(), v.double(), m), r"unsupported dtype torch.float64"),
        (lambda q, k, v, m: (q, k.half(), v.half(), m), r"share one dtype"),
        (lambda q, k, v, m: (q, k[..., :0, :], v[..., :0, :], m), r"no tokens"),
    ],
    ids=["rank", "C", "H", "d", "kv-shape", "keep-shape", "keep-dtype", "float64", "mixed-dtype", "no-keys"],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_validation_errors(mutate, match, backend):
    with pytest.raises(ValueError, match=match):
        masked_attention(*mutate(*_valid()), backend=backend)


def test_unsupported_head_dim_and_backend():
    q = torch.zeros(1, 1, 1, 2, 300)
    keep = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"unsupported head dim d=300"):
        masked_attention(q, q, q, keep)
    q, k, v, keep = _valid()
    with pytest.raises(ValueError, match=r"backend must be one of"):
        masked_attention(q, k, v, keep, backend="cuda")
    with pytest.raises(ValueError, match=r"scale must be a finite float"):
        masked_attention(q, k, v, keep, scale=float("nan"))


def test_config_pruning_keeps_fp32_tiles_small_and_never_empties():
    import triton

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=s)
        for bm, bn, s in ((64, 16, 2), (64, 32, 2), (64, 64, 3), (128, 64, 3), (128, 128, 2))
    ]

    def pruned(dtype, n, block_d):
        args = {"q_ptr": torch.empty(0, dtype=dtype), "N": n, "N_KV": n}
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in
                ma_module._prune_configs(configs, args, BLOCK_D=block_d)]

    assert pruned(torch.bfloat16, 197, 64) == [(64, 32), (64, 64), (128, 64), (128, 128)]
    assert pruned(torch.float32, 197, 64) == [(64, 16), (64, 32)]  # FP32_TILES: the tiles that do not spill
    assert pruned(torch.bfloat16, 197, 256) == [(64, 32)]
    assert pruned(torch.bfloat16, 20, 64) == [(64, 32)]  # tiles no larger than the problem needs
    assert pruned(torch.float32, 1, 256) == [(64, 16), (64, 32)]
    assert ma_module._dot_precision(torch.float32) == "tf32x3"  # not the FMA dots that spilled
