"""Tests of the fused squared-gradient accumulator (elastic_fx.kernels.sqgrad).

Every Triton call here passes ``backend="triton"``: on a GPU it runs natively, on the
CPU under ``TRITON_INTERPRET=1`` (set by tests/conftest.py, and below as a fallback when
this file runs alone). Shapes are tiny but awkward (no powers of two) because the
interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from collections import namedtuple  # noqa: E402

from elastic_fx.kernels import _dispatch  # noqa: E402
from elastic_fx.kernels import sqgrad as sq  # noqa: E402
from elastic_fx.kernels.sqgrad import (  # noqa: E402
    SqgradJob,
    sqgrad_accumulate,
    sqgrad_accumulate_many,
    sqgrad_accumulate_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Squares of fp16/bf16 values are exact in fp32, so every dtype differs from the oracle
# only by the fp32 summation order: the same tolerance fits all three.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-5, 1e-5, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 1e-5, id="bf16"),
]


def head_rows(num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of head h in a fused qkv projection [3E, E]: q, k and v rows."""
    embed = num_heads * head_dim
    return torch.stack([
        torch.cat([torch.arange(p * embed + h * head_dim, p * embed + (h + 1) * head_dim) for p in range(3)])
        for h in range(num_heads)
    ])


def head_cols(num_heads: int, head_dim: int) -> torch.Tensor:
    return torch.arange(num_heads * head_dim).view(num_heads, head_dim)


def make_grad(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


# (shape, dim, index): ViT-like slices at awkward sizes (3 heads of dim 5, 37 neurons)
CASES = [
    pytest.param((45, 15), 0, head_rows(3, 5), id="qkv_weight_rows"),
    pytest.param((45,), 0, head_rows(3, 5), id="qkv_bias"),
    pytest.param((15, 15), 1, head_cols(3, 5), id="out_proj_cols"),
    pytest.param((37, 15), 0, torch.arange(37)[:, None], id="fc1_rows"),
    pytest.param((15, 37), -1, torch.arange(37)[:, None], id="fc2_cols"),
    pytest.param((70, 7), 1, torch.arange(7)[:, None], id="tall_cols_many_partial_rows"),
    pytest.param((38, 15), 0, torch.stack([torch.arange(19), torch.arange(19) + 19], 1), id="gated_fc1"),
    pytest.param((3, 10, 19), 1, torch.randperm(10, generator=torch.Generator().manual_seed(1)).view(5, 2),
                 id="3d_middle_dim_permuted"),
    pytest.param((3, 4, 50), 2, torch.arange(0, 50, 3)[:, None], id="3d_last_dim_partial_cover"),
    pytest.param((37, 50), 0, torch.tensor([[36, 0, 5], [5, 5, 1]]), id="repeated_positions"),
]


@pytest.mark.parametrize("shape,dim,index", CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("with_fisher,steps", [(False, None), (True, 1)], ids=["plain", "fisher_chunked"])
def test_matches_reference(shape, dim, index, dtype, atol, rtol, with_fisher, steps):
    grad = make_grad(shape, dtype)
    out = torch.randn(index.shape[0], device=DEVICE)  # accumulates onto what is there
    fisher = torch.randn(shape, device=DEVICE) if with_fisher else None
    out_ref = out.clone()
    fisher_ref = fisher.clone() if with_fisher else None

    sqgrad_accumulate(grad, dim, index, out, fisher, backend="triton", steps_per_program=steps)
    sqgrad_accumulate_ref(grad, dim, index, out_ref, fisher_ref)

    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    if with_fisher:
        torch.testing.assert_close(fisher, fisher_ref, atol=atol, rtol=rtol)


# What discovery records per parameter (elastic_fx.structures.ParamSlice); the kernels
# take plain (grad, dim, index, out), so a local record keeps these tests off structures.
Slice = namedtuple("Slice", "name shape dim index")


def block_slices(heads: int, head_dim: int, hidden: int):
    """The slices of one ViT block, as discovery describes them."""
    embed = heads * head_dim
    hr, hc, n = head_rows(heads, head_dim), head_cols(heads, head_dim), torch.arange(hidden)[:, None]
    attn = [
        Slice("attn.qkv.weight", (3 * embed, embed), 0, hr),
        Slice("attn.qkv.bias", (3 * embed,), 0, hr),
        Slice("attn.proj.weight", (embed, embed), 1, hc),
    ]
    mlp = [
        Slice("mlp.fc1.weight", (hidden, embed), 0, n),
        Slice("mlp.fc1.bias", (hidden,), 0, n),
        Slice("mlp.fc2.weight", (embed, hidden), 1, n),
    ]
    return attn, mlp


def test_many_jobs_mixed_dtypes_and_strided_outputs():
    """Two blocks in one call: outputs are columns of a [structures, blocks] matrix."""
    heads, head_dim, hidden = 3, 5, 23
    attn, mlp = block_slices(heads, head_dim, hidden)
    head_scores = torch.zeros(heads, 2, device=DEVICE)  # out = head_scores[:, b]: stride 2
    neuron_scores = torch.zeros(hidden, 2, device=DEVICE)
    jobs, ref_jobs = [], []
    for b in range(2):
        for k, (sl, scores) in enumerate([(s, head_scores) for s in attn] + [(s, neuron_scores) for s in mlp]):
            dtype = (torch.bfloat16, torch.float32, torch.float16)[(b + k) % 3]
            grad = make_grad(sl.shape, dtype, seed=10 * b + k)
            fisher = torch.zeros(sl.shape, device=DEVICE)
            jobs.append(SqgradJob(grad, sl.dim, sl.index, scores[:, b], fisher))
            ref_jobs.append(SqgradJob(grad, sl.dim, sl.index, torch.zeros(scores.shape[0], device=DEVICE),
                                      torch.zeros(sl.shape, device=DEVICE)))
    sqgrad_accumulate_many(jobs, backend="triton", steps_per_program=1)
    for jb in ref_jobs:
        sqgrad_accumulate_ref(jb.grad, jb.dim, jb.index, jb.out, jb.fisher)
    for b in range(2):
        want_heads = sum(jb.out for jb in ref_jobs[6 * b: 6 * b + 3])
        want_neurons = sum(jb.out for jb in ref_jobs[6 * b + 3: 6 * b + 6])
        torch.testing.assert_close(head_scores[:, b], want_heads, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(neuron_scores[:, b], want_neurons, atol=1e-5, rtol=1e-5)
    for jb, rj in zip(jobs, ref_jobs):
        torch.testing.assert_close(jb.fisher, rj.fisher, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulator_holds_exact_sum_of_two_batches(backend):
    """Fed known gradients twice, the buffers hold exactly their sum (integers stay exact)."""
    heads, head_dim, hidden = 3, 5, 23
    attn, mlp = block_slices(heads, head_dim, hidden)
    gen = torch.Generator().manual_seed(3)
    batches = [
        {s.name: torch.randint(-4, 5, s.shape, generator=gen).float().to(DEVICE) for s in attn + mlp}
        for _ in range(2)
    ]
    batches[1] = {k: v.to(torch.bfloat16) for k, v in batches[1].items()}  # small ints are exact in bf16
    head_scores = torch.zeros(heads, device=DEVICE)
    neuron_scores = torch.zeros(hidden, device=DEVICE)
    fisher = {s.name: torch.zeros(s.shape, device=DEVICE) for s in attn + mlp}
    for grads in batches:
        for slices, out in ((attn, head_scores), (mlp, neuron_scores)):
            sqgrad_accumulate_many([SqgradJob(grads[s.name], s.dim, s.index, out, fisher[s.name]) for s in slices],
                                   backend=backend)

    def expected(slices, count):
        total = torch.zeros(count, dtype=torch.float64)
        for grads in batches:
            for s in slices:
                g2 = grads[s.name].double().cpu() ** 2
                others = [d for d in range(g2.dim()) if d != s.dim]
                per_pos = g2.sum(others) if others else g2
                total += per_pos[s.index].sum(1)
        return total.float()

    assert torch.equal(head_scores.cpu(), expected(attn, heads))
    assert torch.equal(neuron_scores.cpu(), expected(mlp, hidden))
    for name, f in fisher.items():
        want = sum(grads[name].double().cpu() ** 2 for grads in batches).float()
        assert torch.equal(f.cpu(), want), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_repeated_calls_on_fresh_gradients_hold_exact_sum(backend):
    """The same jobs step after step (cached schedule) on fresh gradient tensors, new and repeated addresses."""
    heads, head_dim, hidden = 3, 5, 23
    attn, mlp = block_slices(heads, head_dim, hidden)
    slices = attn + mlp
    head_scores, neuron_scores = torch.zeros(heads, device=DEVICE), torch.zeros(hidden, device=DEVICE)
    outs = [head_scores] * len(attn) + [neuron_scores] * len(mlp)
    fisher = {s.name: torch.zeros(s.shape, device=DEVICE) for s in slices}
    template = [torch.zeros(s.shape, device=DEVICE) for s in slices]

    def step(grads):
        sqgrad_accumulate_many([SqgradJob(g, s.dim, s.index, out, fisher[s.name])
                                for g, s, out in zip(grads, slices, outs)], backend=backend)

    gen = torch.Generator().manual_seed(4)
    steps = [[torch.randint(-4, 5, s.shape, generator=gen).float().to(DEVICE) for s in slices] for _ in range(2)]
    step(steps[0])
    step(steps[1])
    for g, t in zip(steps[0], template):  # the same addresses on every later step
        t.copy_(g)
    step(template)
    want_h, want_n = torch.zeros(heads, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64)
    for grads in (steps[0], steps[1], steps[0]):
        for g, s in zip(grads, slices):
            g2 = g.double().cpu() ** 2
            per_pos = g2.sum(1 - s.dim) if g2.dim() == 2 else g2
            (want_h if s.name.startswith("attn") else want_n).add_(per_pos[s.index].sum(1))
    assert torch.equal(head_scores.cpu(), want_h.float())
    assert torch.equal(neuron_scores.cpu(), want_n.float())
    for g0, g1, s in zip(*steps, slices):
        assert torch.equal(fisher[s.name].cpu(), (2 * g0.double() ** 2 + g1.double() ** 2).float().cpu()), s.name


def test_out_of_range_index_rejected_before_any_write():
    out = torch.zeros(5, device=DEVICE)
    with pytest.raises(ValueError, match="position 5"):
        sqgrad_accumulate_many([SqgradJob(torch.ones(5, 7, device=DEVICE), 0, torch.arange(1, 6)[:, None], out)],
                               backend="triton")
    assert torch.equal(out.cpu(), torch.zeros(5))


def test_deterministic_bit_for_bit():
    grad = make_grad((37, 50), torch.float32, seed=5)
    index = torch.arange(50).view(10, 5)
    results = []
    for _ in range(2):
        out = torch.zeros(10, device=DEVICE)
        fisher = torch.zeros(37, 50, device=DEVICE)
        sqgrad_accumulate(grad, 1, index, out, fisher, backend="triton", steps_per_program=1)
        results.append((out, fisher))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_accumulate_in_fp32(dtype):
    """300**2 overflows fp16; the sums must still be finite and right."""
    grad = torch.full((7, 9), 300.0, dtype=dtype, device=DEVICE)
    out = torch.zeros(7, device=DEVICE)
    sqgrad_accumulate(grad, 0, torch.arange(7)[:, None], out, backend="triton")
    assert torch.equal(out.cpu(), torch.full((7,), 9 * 300.0**2))


def test_non_contiguous_grad_and_fisher():
    base = make_grad((19, 37), torch.float32, seed=7)
    grad = base.t()  # [37, 19], not contiguous
    fisher = torch.zeros(19, 37, device=DEVICE).t()
    fisher_ref = torch.zeros(37, 19, device=DEVICE)
    index = torch.arange(37)[:, None]
    out, out_ref = torch.zeros(37, device=DEVICE), torch.zeros(37, device=DEVICE)
    sqgrad_accumulate(grad, 0, index, out, fisher, backend="triton")
    sqgrad_accumulate_ref(grad, 0, index, out_ref, fisher_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fisher, fisher_ref, atol=0, rtol=0)


def test_index_changed_in_place_is_seen():
    """The cached schedule must follow an index tensor that was modified in place."""
    grad = make_grad((23, 11), torch.float32, seed=8)
    index = torch.arange(23)[:, None].clone()
    out = torch.zeros(23, device=DEVICE)
    sqgrad_accumulate(grad, 0, index, out, backend="triton")
    index.copy_(index.flip(0))
    out2, out_ref = torch.zeros(23, device=DEVICE), torch.zeros(23, device=DEVICE)
    sqgrad_accumulate(grad, 0, index, out2, backend="triton")
    sqgrad_accumulate_ref(grad, 0, index, out_ref)
    torch.testing.assert_close(out2, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, out.flip(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_inputs_change_nothing(backend):
    out = torch.ones(4, device=DEVICE)
    sqgrad_accumulate(make_grad((0, 5), torch.float32), 1, torch.arange(5).view(5, 1)[:4], out, backend=backend)
    sqgrad_accumulate(make_grad((6, 5), torch.float32), 0, torch.empty(4, 0, dtype=torch.long), out,
                      backend=backend)
    assert torch.equal(out.cpu(), torch.ones(4))


def test_interleaved_outputs_allowed_but_overlapping_rejected():
    grad = make_grad((6, 4), torch.float32, seed=9)
    index = torch.arange(6)[:, None]
    scores = torch.zeros(6, 2, device=DEVICE)
    sqgrad_accumulate_many([SqgradJob(grad, 0, index, scores[:, 0]), SqgradJob(grad, 0, index, scores[:, 1])],
                           backend="triton")
    torch.testing.assert_close(scores[:, 0], scores[:, 1], atol=0, rtol=0)
    flat = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="share memory"):
        sqgrad_accumulate_many([SqgradJob(grad, 0, index, flat[:6]), SqgradJob(grad, 0, index, flat[2:])],
                               backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_invalid_inputs_raise_value_error(backend):
    grad = make_grad((37, 50), torch.float32)
    index = torch.arange(50).view(10, 5)
    out = torch.zeros(10, device=DEVICE)
    with pytest.raises(ValueError, match=r"position 50.*size 50 along dim 1.*\[0, 50\)"):
        sqgrad_accumulate(grad, 1, index + 1, out, backend=backend)
    with pytest.raises(ValueError, match="position -1"):
        sqgrad_accumulate(grad, 1, index - 1, out, backend=backend)
    with pytest.raises(ValueError, match=r"out is \(10,\) float64"):
        sqgrad_accumulate(grad, 1, index, out.double(), backend=backend)
    with pytest.raises(ValueError, match=r"out has shape \(9,\).*wanted out of shape \(10,\)"):
        sqgrad_accumulate(grad, 1, index, out[:9], backend=backend)
    with pytest.raises(ValueError, match=r"fisher is \(50, 37\) float32.*wanted float32 of grad's shape \(37, 50\)"):
        sqgrad_accumulate(grad, 1, index, out, torch.zeros(50, 37, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"dim=2 for grad of shape \(37, 50\)"):
        sqgrad_accumulate(grad, 2, index, out, backend=backend)
    with pytest.raises(ValueError, match="integer tensor"):
        sqgrad_accumulate(grad, 1, index.float(), out, backend=backend)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        sqgrad_accumulate(grad.double(), 1, index, out, backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(10))  # nothing was written by the failed calls


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend='cuda'"):
        sqgrad_accumulate(make_grad((3, 3), torch.float32), 0, torch.arange(3)[:, None],
                          torch.zeros(3, device=DEVICE), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setattr(_dispatch, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sqgrad_accumulate(torch.ones(3, 3), 0, torch.arange(3)[:, None], torch.zeros(3), backend="triton")


def test_auto_dispatch(monkeypatch):
    """CUDA -> Triton; CPU -> reference unless ELASTIC_FX_FORCE_TRITON=1."""
    calls = []
    monkeypatch.setattr(sq, "_run_triton", lambda *a, **k: calls.append(a))
    grad = torch.randn(4, 3)
    out = torch.zeros(4)
    monkeypatch.delenv(_dispatch.FORCE_TRITON_ENV, raising=False)
    sqgrad_accumulate(grad, 0, torch.arange(4)[:, None], out)
    assert calls == [] and out.sum() > 0  # the reference ran on the CPU tensors
    if _dispatch._INTERPRETED:
        monkeypatch.setenv(_dispatch.FORCE_TRITON_ENV, "1")
        sqgrad_accumulate(grad, 0, torch.arange(4)[:, None], out)
        assert len(calls) == 1
    if torch.cuda.is_available() and not _dispatch._INTERPRETED:
        sqgrad_accumulate(grad.cuda(), 0, torch.arange(4)[:, None], out.cuda())
        assert len(calls) == 1
