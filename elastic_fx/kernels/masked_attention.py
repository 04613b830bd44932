"""Batched attention with a per-(candidate, head) keep-mask.

The candidate-scoring forward of the search runs C pruning candidates on the same B
images at once. Every attention tensor therefore has shape ``[C, B, H, N, d]`` and a
boolean ``head_keep[C, H]`` says which heads each candidate keeps. This op returns

    out[c, b, h] = softmax(q[c, b, h] @ k[c, b, h]^T * scale) @ v[c, b, h]   if head_keep[c, h]
    out[c, b, h] = 0                                                          otherwise

and spends no attention FLOPs on masked pairs:

* ``_masked_attention_kernel`` (Triton, CUDA): a flash-style kernel with one program per
  (query block, c*B*H) pair. A program whose (c, h) is masked writes zeros and returns
  before it loads q, k or v.
* ``masked_attention_ref`` (PyTorch): the oracle and the CPU path. It gathers the kept
  (c, h) pairs, runs ``scaled_dot_product_attention`` on them alone and leaves zeros
  everywhere else.

The op is forward-only: the search needs no gradient through it.

Dispatch (``backend="auto"``, see :mod:`elastic_fx.kernels._dispatch`): CUDA tensors go
to Triton, CPU tensors to the reference; ``ELASTIC_FX_FORCE_TRITON=1`` sends CPU tensors
to Triton too, which then needs ``TRITON_INTERPRET=1`` set before this module is imported
(the test suite does that).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import _INTERPRETED, use_triton

__all__ = ["masked_attention", "masked_attention_ref"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _autotune_configs() -> list[triton.Config]:
    """Tile configurations tried on a GPU; one small tile under the interpreter.

    The interpreter executes every program in Python, so small tiles keep the tests fast
    and a single config skips the autotuner's benchmarking entirely.
    """
    if _INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
            (64, 16, 4, 2),  # fp32 only (see _prune_configs)
            (64, 32, 4, 2),
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (128, 32, 4, 2),
            (128, 64, 4, 3),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
        )
    ]


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the fp32 tiles. fp32 dots run as three
#: tf32 tensor-core dots (``tf32x3``); at head dim 64 these tiles do not spill on sm_90
#: (64x32) and sm_80 (64x16), where the exact FMA dots spilled 1.7 KB per thread at best
#: (benchmarks/results/kernels_compile.md).
FP32_TILES = {(64, 16, 4, 2), (64, 32, 4, 2)}


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles far larger than the problem, or too large for shared memory.

    fp32 keeps only :data:`FP32_TILES` (bigger fp32 tiles spill registers); 16-bit dtypes
    drop the fp32-only 64x16 tile, which wastes their tensor cores.
    """
    n_q, n_kv, block_d = named_args["N"], named_args["N_KV"], kwargs["BLOCK_D"]
    fp32 = named_args["q_ptr"].dtype == torch.float32
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if bm > max(64, triton.next_power_of_2(n_q)) or bn > max(32, triton.next_power_of_2(n_kv)):
            continue
        if fp32 and (bm, bn, cfg.num_warps, cfg.num_stages) not in FP32_TILES:
            continue
        if not fp32 and bn < 32:
            continue
        if block_d > 128 and (bm > 64 or bn > 64 or cfg.num_stages > 2):
            continue
        kept.append(cfg)
    return kept or configs[:1]


@triton.jit
def _attend_kv_block(
    acc, l_i, m_i, q,  # running output [BLOCK_M, BLOCK_D] fp32, sum and max [BLOCK_M] fp32, q tile
    k_base, v_base, start_n, N_KV,
    stride_kn, stride_kd, stride_vn, stride_vd,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """One online-softmax step: fold keys/values [start_n, start_n + BLOCK_N) into acc."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < N_KV) & (offs_d[None, :] < HEAD_DIM)
    if MASK_N:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    if DOT_IN_FP32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
    if MASK_N:
        qk = tl.where(offs_n[None, :] < N_KV, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every block holds at least one real key
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block, where m_i = -inf
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASK_N:
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
    p = p.to(v.dtype)  # round the probabilities to the input dtype, as flash attention does
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.autotune(
    configs=_autotune_configs(),
    key=["N", "N_KV", "HEAD_DIM", "BLOCK_D"],  # tensor dtypes are added to the key by Triton
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _masked_attention_kernel(
    q_ptr,  # [C, B, H, N, HEAD_DIM], any strides
    k_ptr,  # [C, B, H, N_KV, HEAD_DIM], any strides
    v_ptr,  # [C, B, H, N_KV, HEAD_DIM], any strides
    keep_ptr,  # [C, H] uint8: 1 = head kept
    out_ptr,  # [C, B, H, N, HEAD_DIM], q's dtype
    B, H, N, N_KV,
    stride_qc, stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kc, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vc, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_keep_c, stride_keep_h,
    stride_oc, stride_ob, stride_oh, stride_on, stride_od,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= max(HEAD_DIM, 16)
    DOT_PRECISION: tl.constexpr,  # "tf32x3" for fp32 inputs (fp32-accurate on tensor cores), else "tf32" (unused for 16-bit)
    DOT_IN_FP32: tl.constexpr,  # interpreter only: upcast bf16 dot operands (see _dot_in_fp32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A 1-D grid: query blocks of one (c, b, h) are neighbours, and C*B*H may exceed
    # the 65535 limit of the second grid axis.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_m_blocks
    pid_cbh = pid // num_m_blocks
    h = pid_cbh % H
    b = (pid_cbh // H) % B
    c = pid_cbh // (H * B)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out_base = out_ptr + c.to(tl.int64) * stride_oc + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    out_ptrs = out_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    out_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)

    keep = tl.load(keep_ptr + c * stride_keep_c + h * stride_keep_h)
    if keep == 0:
        # Masked (candidate, head): exact zeros, no loads of q/k/v, no FLOPs.
        tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=out_mask)
        return

    q_base = q_ptr + c.to(tl.int64) * stride_qc + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + c.to(tl.int64) * stride_kc + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + c.to(tl.int64) * stride_vc + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=out_mask, other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full key blocks need no bounds mask; the ragged tail (197 = 3*64 + 5) gets one pass with it.
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_kv_block(
            acc, l_i, m_i, q, k_base, v_base, start_n, N_KV,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            BLOCK_N, BLOCK_D, HEAD_DIM, False, DOT_PRECISION, DOT_IN_FP32,
        )
    if n_full < N_KV:
        acc, l_i, m_i = _attend_kv_block(
            acc, l_i, m_i, q, k_base, v_base, n_full, N_KV,
            stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
            BLOCK_N, BLOCK_D, HEAD_DIM, True, DOT_PRECISION, DOT_IN_FP32,
        )

    acc = acc / l_i[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- helpers


def _default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_keep: torch.Tensor,
              scale: float | None) -> None:
    """Raise ValueError naming what was found and what was wanted."""
    for name, t in (("q", q), ("k", k), ("v", v), ("head_keep", head_keep)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"masked_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 5:
            raise ValueError(
                f"masked_attention: {name} must have rank 5 [C, B, H, N, d], got rank {t.dim()} "
                f"with shape {tuple(t.shape)}"
            )
    C, B, H, N, d = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"masked_attention: k and v must have the same shape [C, B, H, N_kv, d], "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    kc, kb, kh, n_kv, kd = k.shape
    if (kc, kb, kh, kd) != (C, B, H, d):
        raise ValueError(
            f"masked_attention: k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}; "
            f"wanted [C={C}, B={B}, H={H}, N_kv, d={d}] (only the token count may differ)"
        )
    if n_kv == 0 and N > 0:
        raise ValueError(f"masked_attention: k/v have no tokens (N_kv=0, shape {tuple(k.shape)}); "
                         "softmax over zero keys is undefined")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"masked_attention: unsupported head dim d={d} (q shape {tuple(q.shape)}); "
                         f"wanted 1 <= d <= {MAX_HEAD_DIM}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"masked_attention: unsupported dtype {q.dtype}; wanted one of "
                         f"{', '.join(str(t) for t in SUPPORTED_DTYPES)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"masked_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"masked_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if head_keep.dtype != torch.bool:
        raise ValueError(f"masked_attention: head_keep must be a bool tensor, got dtype {head_keep.dtype}; "
                         "pass e.g. `scores > threshold` or `mask.bool()`")
    if tuple(head_keep.shape) != (C, H):
        raise ValueError(f"masked_attention: head_keep must have shape [C, H] = [{C}, {H}], "
                         f"got {tuple(head_keep.shape)}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"masked_attention: scale must be a finite float, got {scale!r}")


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the kernel must upcast its dot operands to fp32.

    Triton's interpreter stores bf16 as uint16 and its ``tl.dot`` multiplies the bit
    patterns (triton-lang/triton#11584; bf16 is unsupported there). Under the interpreter
    bf16 operands are therefore rounded exactly as on the GPU and then widened to fp32;
    compiled kernels always use the native bf16 tensor-core dot.
    """
    return _INTERPRETED and dtype == torch.bfloat16


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32: ``tf32x3`` (each operand split into two tf32 halves, three tensor-core dots:
    fp32-level accuracy without the register-hungry FMA dots of ``ieee``); 16-bit dtypes
    ignore it. The interpreter multiplies in fp32 whatever it is told."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _int32_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a contiguous copy if one (c, b, h) slice spans over 2**31 elements.

    The kernel offsets each slice's base in int64 but the tokens and channels inside it in
    int32; only exotic layouts (tokens as the outermost axis of a huge tensor) need the copy.
    """
    span = (t.shape[3] - 1) * abs(t.stride(3)) + (t.shape[4] - 1) * abs(t.stride(4))
    return t.contiguous() if span >= 2**31 else t


def _use_triton(device: torch.device, backend: str) -> bool:
    """This op's backend choice (a module attribute, so tests can watch the decision)."""
    return use_triton(device, backend, op="masked_attention")


# --------------------------------------------------------------------------- public API


def masked_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_keep: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Pure-PyTorch masked attention: the oracle of the kernel and the CPU path of the search.

    Args:
        q: ``[C, B, H, N, d]`` queries (any strides).
        k, v: ``[C, B, H, N_kv, d]`` keys and values.
        head_keep: bool ``[C, H]``; ``False`` pairs get exact zeros.
        scale: softmax scale, default ``1/sqrt(d)``.

    Returns:
        ``[C, B, H, N, d]`` contiguous, in q's dtype.

    On the CPU only the kept (c, h) pairs are gathered and attended (in fp32, with
    ``scaled_dot_product_attention``), so the cost falls with the masked fraction. With a
    ``head_keep`` on an accelerator the kept pairs are not known to the host without a
    sync (a ``.cpu()`` waits for every queued kernel), so there every pair is attended and
    the masked ones zeroed: the same numbers, no host sync, all the FLOPs (the Triton
    kernel is the path that saves them on CUDA).
    """
    _validate(q, k, v, head_keep, scale)
    C, B, H, N, d = q.shape
    if head_keep.device.type != "cpu":
        dense = [t.reshape(C * B, H, t.shape[3], d).float() for t in (q, k, v)]
        full = F.scaled_dot_product_attention(*dense, scale=_default_scale(d, scale)).view(C, B, H, N, d)
        return full.masked_fill(~head_keep.view(C, 1, H, 1, 1).to(full.device), 0).to(q.dtype)
    keep = head_keep.detach()
    pairs = keep.nonzero().tolist()  # [[c, h], ...] kept, in row-major order
    out = torch.empty((C, B, H, N, d), dtype=q.dtype, device=q.device)
    if not pairs or out.numel() == 0:
        return out.zero_()
    if len(pairs) == C * H:  # nothing masked: attend the dense [C*B, H, N, d] views, no gather
        dense = [t.reshape(C * B, H, t.shape[3], d).float() for t in (q, k, v)]
        kept = F.scaled_dot_product_attention(*dense, scale=_default_scale(d, scale))
        return out.copy_(kept.view(C, B, H, N, d))
    # Gather the kept pairs into [K, B, N_(kv), d]; SDPA treats K and B as batch axes.
    # torch.stack over [B, N, d] slices is one copy per tensor and, unlike advanced
    # indexing on the strided 5-D views, cheap on the CPU.
    sel = [torch.stack([t[c, :, h] for c, h in pairs]).float() for t in (q, k, v)]
    kept = F.scaled_dot_product_attention(*sel, scale=_default_scale(d, scale)).to(q.dtype)
    _scatter_pairs(out, kept, keep, pairs)
    return out


def _scatter_pairs(out: torch.Tensor, kept: torch.Tensor, keep: torch.Tensor, pairs: list[list[int]]) -> None:
    """Write kept[i] to out[c_i, :, h_i] and zeros to every masked (c, h)."""
    if out.device.type != "cpu":  # one index_put launch instead of C*H small kernels
        out.zero_()
        index = torch.tensor(pairs, device=out.device).T
        out[index[0], :, index[1]] = kept
        return
    # On the CPU, per-slice copies beat index_put, and writing each slice once beats
    # zero-filling the whole output first.
    by_pair = {(c, h): i for i, (c, h) in enumerate(pairs)}
    for c in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            i = by_pair.get((c, h))
            if i is None:
                out[c, :, h].zero_()
            else:
                out[c, :, h].copy_(kept[i])


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_keep: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over ``[C, B, H, N, d]`` with exact zeros for masked (candidate, head) pairs.

    Args:
        q: ``[C, B, H, N, d]`` queries; fp16, bf16 or fp32; any strides (e.g. a permuted
            view of a packed qkv tensor).
        k, v: ``[C, B, H, N_kv, d]`` keys and values, q's dtype and device.
        head_keep: bool ``[C, H]``; ``True`` keeps the head of that candidate.
        scale: softmax scale, default ``1/sqrt(d)``.
        backend: ``"auto"`` (CUDA -> Triton, CPU -> PyTorch reference, unless the env
            var ``ELASTIC_FX_FORCE_TRITON=1``), ``"triton"`` or ``"torch"``.

    Returns:
        ``[C, B, H, N, d]`` contiguous tensor in q's dtype: ``softmax(q k^T * scale) v``
        where kept, exactly zero where masked. Masked pairs cost no attention FLOPs.

    Raises:
        ValueError: on a wrong rank, mismatched C/B/H/d, a head_keep of the wrong shape or
            dtype, an unsupported d or dtype, or an unknown backend.
    """
    _validate(q, k, v, head_keep, scale)
    if not _use_triton(q.device, backend):
        return masked_attention_ref(q, k, v, head_keep, scale=scale)

    C, B, H, N, d = q.shape
    n_kv = k.shape[3]
    out = torch.empty((C, B, H, N, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k, v = (_int32_addressable(t) for t in (q, k, v))
    keep = head_keep.to(device=q.device, dtype=torch.uint8)
    qk_scale = _default_scale(d, scale) * math.log2(math.e)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(N, meta["BLOCK_M"]) * C * B * H,)

    _masked_attention_kernel[grid](
        q, k, v, keep, out,
        B, H, N, n_kv,
        *q.stride(), *k.stride(), *v.stride(),
        *keep.stride(),
        *out.stride(),
        qk_scale,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        DOT_PRECISION=_dot_precision(q.dtype),
        DOT_IN_FP32=_dot_in_fp32(q.dtype),
    )
    return out
