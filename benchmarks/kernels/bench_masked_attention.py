"""Benchmark masked_attention against dense SDPA followed by a mask multiply.

CUDA (default when a GPU is present): ViT-B/16 (H=12) and ViT-L/16 (H=16) shapes,
N=197, d=64, bf16, q/k/v as strided views of one packed qkv tensor (as the search makes
them), timed with triton.testing.do_bench at 0/25/50/75 % of (candidate, head) pairs
masked. Columns: the Triton kernel, SDPA (flash; memory-efficient for fp32) alone, SDPA + mask multiply, and the
gathered PyTorch reference. Goals: at 0 % the kernel within 10 % of SDPA; at 50 % at
least 1.8x faster than SDPA + mask.

--quick (or no GPU): the CPU path only, i.e. masked_attention_ref (attends the kept pairs
alone) vs dense SDPA + mask multiply, at small batch sizes, fp32, timed with perf_counter.

Either way the script prints a markdown table and ends with ONE JSON line.
Never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

from elastic_fx.kernels.masked_attention import masked_attention, masked_attention_ref

MODELS = {"vit_b16": 12, "vit_l16": 16}  # name -> heads; both N=197 tokens, d=64
N_TOKENS, HEAD_DIM = 197, 64
MASKED_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def make_inputs(C: int, B: int, H: int, dtype: torch.dtype, device: str, seed: int = 0):
    """q, k, v [C, B, H, N, d] as permuted views of a packed [C, B, N, 3*H*d] qkv tensor."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(C, B, N_TOKENS, 3 * H * HEAD_DIM, generator=g, device=device, dtype=dtype)
    return qkv.view(C, B, N_TOKENS, 3, H, HEAD_DIM).permute(3, 0, 1, 4, 2, 5)


def make_keep(C: int, H: int, masked_fraction: float, device: str, seed: int = 0) -> torch.Tensor:
    """A [C, H] bool mask with exactly round(fraction * C * H) pairs masked, at random."""
    n_masked = round(masked_fraction * C * H)
    order = torch.randperm(C * H, generator=torch.Generator().manual_seed(seed))
    keep = torch.ones(C * H, dtype=torch.bool)
    keep[order[:n_masked]] = False
    return keep.view(C, H).to(device)


def sdpa_backends(dtype: torch.dtype) -> list:
    """The SDPA backends to compare with: flash has no fp32 kernel, so fp32 gets the
    memory-efficient one (and the math fallback), fp16/bf16 flash alone."""
    from torch.nn.attention import SDPBackend

    if dtype == torch.float32:
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION]


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on the dense [C*B, H, N, d] views (no copy of the packed layout)."""
    C, B, H, N, d = q.shape
    out = F.scaled_dot_product_attention(*(t.reshape(C * B, H, t.shape[3], d) for t in (q, k, v)))
    return out.view(C, B, H, N, d)


def dense_sdpa_masked(q, k, v, keep):
    return dense_sdpa(q, k, v) * keep[:, None, :, None, None]


def cpu_time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_cpu(args) -> dict:
    """The search's CPU path: gathered reference vs dense SDPA + mask (fp32)."""
    torch.manual_seed(0)
    rows, headline = [], {}
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"C={args.candidates_cpu} B={args.batch_cpu} N={N_TOKENS} d={HEAD_DIM} fp32\n")
    print("| model | masked | ref (gathered) ms | SDPA+mask ms | speedup |")
    print("|---|---|---|---|---|")
    for model, H in MODELS.items():
        q, k, v = make_inputs(args.candidates_cpu, args.batch_cpu, H, torch.float32, "cpu")
        for frac in MASKED_FRACTIONS:
            keep = make_keep(args.candidates_cpu, H, frac, "cpu")
            torch.testing.assert_close(masked_attention_ref(q, k, v, keep), dense_sdpa_masked(q, k, v, keep),
                                       atol=1e-5, rtol=1e-5)
            t_ref = cpu_time_ms(lambda: masked_attention_ref(q, k, v, keep), args.repeats)
            t_dense = cpu_time_ms(lambda: dense_sdpa_masked(q, k, v, keep), args.repeats)
            speedup = t_dense / t_ref
            print(f"| {model} | {frac:.0%} | {t_ref:.2f} | {t_dense:.2f} | {speedup:.2f}x |")
            rows.append({"model": model, "masked": frac, "ref_ms": round(t_ref, 3),
                         "sdpa_mask_ms": round(t_dense, 3), "speedup_vs_sdpa_mask": round(speedup, 3)})
            headline[f"{model}_speedup_at_{int(frac * 100)}"] = round(speedup, 3)
    return {"mode": "cpu", "device": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "C": args.candidates_cpu, "B": args.batch_cpu,
            "dtype": "float32", "headline": headline, "rows": rows}


def run_cuda(args) -> dict:
    """Triton kernel vs SDPA (flash) and SDPA + mask, bf16, with do_bench."""
    import triton.testing
    from torch.nn.attention import sdpa_kernel

    dtype = getattr(torch, args.dtype)
    C, B = args.candidates, args.batch
    bench = lambda fn: triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,  # noqa: E731
                                               return_mode="median")
    name = torch.cuda.get_device_name()
    print(f"GPU: {name}, C={C} B={B} N={N_TOKENS} d={HEAD_DIM} {args.dtype}, q/k/v = packed-qkv views\n")
    print("| model | masked | triton ms | SDPA ms | SDPA+mask ms | ref ms | triton/SDPA | speedup vs SDPA+mask |")
    print("|---|---|---|---|---|---|---|---|")
    rows, headline = [], {}
    for model, H in MODELS.items():
        q, k, v = make_inputs(C, B, H, dtype, "cuda")
        for frac in MASKED_FRACTIONS:
            keep = make_keep(C, H, frac, "cuda")
            with sdpa_kernel(sdpa_backends(dtype)):
                expected = dense_sdpa_masked(q, k, v, keep)
                out = masked_attention(q, k, v, keep)
                tol = 2e-2 if dtype != torch.float32 else 1e-4
                torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
                t_triton = bench(lambda: masked_attention(q, k, v, keep))
                t_sdpa = bench(lambda: dense_sdpa(q, k, v))
                t_sdpa_mask = bench(lambda: dense_sdpa_masked(q, k, v, keep))
            t_ref = bench(lambda: masked_attention_ref(q, k, v, keep))
            ratio, speedup = t_triton / t_sdpa, t_sdpa_mask / t_triton
            print(f"| {model} | {frac:.0%} | {t_triton:.3f} | {t_sdpa:.3f} | {t_sdpa_mask:.3f} | {t_ref:.3f} "
                  f"| {ratio:.3f} | {speedup:.2f}x |")
            rows.append({"model": model, "masked": frac, "triton_ms": round(t_triton, 4),
                         "sdpa_ms": round(t_sdpa, 4), "sdpa_mask_ms": round(t_sdpa_mask, 4),
                         "ref_ms": round(t_ref, 4), "triton_over_sdpa": round(ratio, 4),
                         "speedup_vs_sdpa_mask": round(speedup, 4)})
            if frac == 0.0:
                headline[f"{model}_triton_over_sdpa_at_0"] = round(ratio, 3)
            if frac == 0.5:
                headline[f"{model}_speedup_vs_sdpa_mask_at_50"] = round(speedup, 3)
    goals = {
        "within_10pct_of_sdpa_at_0": all(v <= 1.10 for k, v in headline.items() if k.endswith("_at_0")),
        "speedup_ge_1.8_at_50": all(v >= 1.8 for k, v in headline.items() if k.endswith("_at_50")),
    }
    return {"mode": "cuda", "device": name, "C": C, "B": B, "dtype": args.dtype, "headline": headline,
            "goals": goals, "rows": rows}


def write_json_atomic(path: str, payload: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU path only, small shapes (< 2 min)")
    p.add_argument("--candidates", type=int, default=8, help="C on the GPU")
    p.add_argument("--batch", type=int, default=32, help="B (images per candidate) on the GPU")
    p.add_argument("--candidates-cpu", type=int, default=4, help="C on the CPU")
    p.add_argument("--batch-cpu", type=int, default=2, help="B on the CPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="GPU dtype")
    p.add_argument("--repeats", type=int, default=7, help="CPU timing repeats (median)")
    p.add_argument("--warmup-ms", type=int, default=50)
    p.add_argument("--rep-ms", type=int, default=300)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json-out", default=None, help="also write the full results to this file")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.quick or not torch.cuda.is_available():
        if not args.quick:
            print("no CUDA device: running the CPU comparison only (no GPU numbers)", file=sys.stderr)
        result = run_cpu(args)
    else:
        result = run_cuda(args)
    result = {"bench": "masked_attention", "torch": torch.__version__, **result}
    if args.json_out:
        write_json_atomic(args.json_out, result)
    keys = ("bench", "mode", "device", "threads", "C", "B", "dtype", "headline", "goals")
    headline = {k: result[k] for k in keys if k in result}
    print()
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
