"""Tests of the per-sample ("ghost") squared gradient norms (elastic_fx.kernels.ghost_sqnorm).

Every Triton call here passes ``backend="triton"``: on a GPU it runs natively, on the
CPU under ``TRITON_INTERPRET=1`` (set by tests/conftest.py, and below as a fallback when
this file runs alone). Shapes are tiny but awkward because the interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from elastic_fx.kernels.ghost_sqnorm import ghost_sqnorm, ghost_sqnorm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def per_sample_loop(x, g):
    """The definition: materialise every sample's gradient G_i^T X_i (float64)."""
    rows = torch.zeros(g.shape[2], dtype=torch.float64)
    cols = torch.zeros(x.shape[2], dtype=torch.float64)
    bias = torch.zeros(g.shape[2], dtype=torch.float64)
    for xi, gi in zip(x.double().cpu(), g.double().cpu()):
        w = gi.T @ xi
        rows += (w**2).sum(1)
        cols += (w**2).sum(0)
        bias += gi.sum(0) ** 2
    return rows, cols, bias


GHOST_SHAPES = [
    pytest.param(3, 19, 20, 33, id="B3_T19_in20_out33"),
    pytest.param(2, 1, 17, 5, id="B2_T1_in17_out5"),
]


@pytest.mark.parametrize("B,T,n_in,n_out", GHOST_SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.float16, 1e-4, 1e-4, id="fp16"),  # products of half inputs, fp32 accumulation
    pytest.param(torch.bfloat16, 1e-4, 1e-4, id="bf16"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ghost_matches_per_sample_loop(B, T, n_in, n_out, dtype, atol, rtol, backend):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, T, n_in, generator=gen).to(dtype).to(DEVICE)
    g = torch.randn(B, T, n_out, generator=gen).to(dtype).to(DEVICE)
    got = ghost_sqnorm(x, g, backend=backend)
    for name, a, b in zip(("rows", "cols", "bias"), got, per_sample_loop(x, g)):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.cpu().double(), b, atol=atol * b.abs().max().item(), rtol=rtol, msg=name)


def test_ghost_equals_autograd_per_sample_fisher():
    """Against an explicit per-sample autograd loop on a real nn.Linear."""
    torch.manual_seed(12)
    layer = torch.nn.Linear(13, 21).to(DEVICE)
    x = torch.randn(4, 6, 13, device=DEVICE)
    target = torch.randn(4, 6, 21, device=DEVICE)
    w_sq = torch.zeros_like(layer.weight)
    b_sq = torch.zeros_like(layer.bias)
    for i in range(4):
        layer.zero_grad()
        ((layer(x[i]) - target[i]) ** 2).sum().backward()
        w_sq += layer.weight.grad**2
        b_sq += layer.bias.grad**2
    y = layer(x)
    (g,) = torch.autograd.grad(((y - target) ** 2).sum(), y)  # per-sample output gradients
    rows, cols, bias = ghost_sqnorm(x, g, backend="triton")
    torch.testing.assert_close(rows, w_sq.sum(1), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(cols, w_sq.sum(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(bias, b_sq, atol=1e-3, rtol=1e-4)
    rows_ref, _, _ = ghost_sqnorm_ref(x, g)
    torch.testing.assert_close(rows_ref, w_sq.sum(1), atol=1e-3, rtol=1e-4)


def test_ghost_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"x is \(2, 5, 3\).*g is \(2, 4, 6\)"):
        ghost_sqnorm(torch.zeros(2, 5, 3), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="one dtype"):
        ghost_sqnorm(torch.zeros(2, 5, 3), torch.zeros(2, 5, 6, dtype=torch.float16))
