"""Benchmark of the fused squared-gradient accumulator (elastic_fx.kernels.sqgrad).

Results go to benchmarks/results/kernels.md.

What is timed, side by side in one run:

* ``triton``  - ``sqgrad_accumulate_many``: every job of the workload in one batched call
* ``eager``   - the PyTorch formulation (``g.float().square()``, sum, gather, add) per job
* ``compile`` - ``torch.compile`` of that same eager function

Workloads use ViT-B/16 and ViT-L/16 shapes: the whole model (every block's fused qkv
weight + bias, out-projection, fc1 weight + bias, fc2: what one scoring step
accumulates), and each large weight alone. Bytes moved = gradient bytes (+ 8 bytes per
element with ``--fisher``: the fp32 buffer is read and written). GB/s is reported
against the device's copy bandwidth, measured here as ``dst.copy_(src)`` of 512 MiB.
Also timed: ``ghost_sqnorm`` (exact per-sample squared norms) against its PyTorch
reference and against one batch weight-gradient matmul of the same layer.

    python benchmarks/kernels/bench_sqgrad.py            # CUDA: full shapes, do_bench
    python benchmarks/kernels/bench_sqgrad.py --quick    # CPU: small shapes, eager vs compile

Prints a markdown table, then ONE JSON line with the headline figures. Never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from elastic_fx.kernels.ghost_sqnorm import ghost_sqnorm, ghost_sqnorm_ref
from elastic_fx.kernels.sqgrad import SqgradJob, sqgrad_accumulate_many
from elastic_fx.structures import ParamSlice


@dataclass(frozen=True)
class VitShape:
    name: str
    embed: int
    heads: int
    hidden: int
    depth: int
    tokens: int = 197

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads


VIT_B16 = VitShape("ViT-B/16", 768, 12, 3072, 12)
VIT_L16 = VitShape("ViT-L/16", 1024, 16, 4096, 24)
TINY = VitShape("tiny (quick)", 96, 3, 384, 2, tokens=17)
DEVICE = "cuda"  # the full run's device


def block_slices(v: VitShape) -> Dict[str, List[ParamSlice]]:
    """The structures of one block as discovery describes them (fused qkv, plain FFN)."""
    e, h, hd, f = v.embed, v.heads, v.head_dim, v.hidden
    rows = torch.stack([torch.cat([torch.arange(p * e + i * hd, p * e + (i + 1) * hd) for p in range(3)])
                        for i in range(h)])
    cols = torch.arange(e).view(h, hd)
    neurons = torch.arange(f)[:, None]
    return {
        "heads": [ParamSlice("attn.qkv.weight", (3 * e, e), 0, rows), ParamSlice("attn.qkv.bias", (3 * e,), 0, rows),
                  ParamSlice("attn.proj.weight", (e, e), 1, cols)],
        "neurons": [ParamSlice("mlp.fc1.weight", (f, e), 0, neurons), ParamSlice("mlp.fc1.bias", (f,), 0, neurons),
                    ParamSlice("mlp.fc2.weight", (e, f), 1, neurons)],
    }


def make_jobs(v: VitShape, dtype: torch.dtype, device: str, fisher: bool, only: Optional[str] = None,
              ) -> List[SqgradJob]:
    """Random gradients of every block (or of one parameter, ``only``) with fresh outputs."""
    slices = block_slices(v)
    jobs = []
    for _ in range(1 if only else v.depth):
        for group, sls in slices.items():
            out = torch.zeros(v.heads if group == "heads" else v.hidden, device=device)
            for s in sls:
                if only and s.name != only:
                    continue
                g = torch.randn(s.shape, device=device, dtype=dtype)
                f = torch.zeros(s.shape, device=device) if fisher else None
                jobs.append(SqgradJob(g, s.dim, s.index.to(device), out, f))
    return jobs


def eager(grads: List[torch.Tensor], dims: List[int], indices: List[torch.Tensor], outs: List[torch.Tensor],
          fishers: List[Optional[torch.Tensor]]) -> None:
    """The PyTorch formulation, without validation: square, sum, gather, add."""
    for g, dim, idx, out, f in zip(grads, dims, indices, outs, fishers):
        sq = g.float().square()
        if f is not None:
            f.add_(sq)
        others = [d for d in range(g.dim()) if d != dim]
        per_pos = sq.sum(dim=others) if others else sq
        out.add_(per_pos[idx].sum(dim=1))


def eager_args(jobs: List[SqgradJob]) -> tuple:
    return ([j.grad for j in jobs], [j.dim for j in jobs], [j.index for j in jobs], [j.out for j in jobs],
            [j.fisher for j in jobs])


def moved_bytes(jobs: List[SqgradJob]) -> int:
    total = 0
    for j in jobs:
        total += j.grad.numel() * j.grad.element_size()
        if j.fisher is not None:
            total += 8 * j.fisher.numel()
    return total


# ----------------------------------------------------------------------------- timing
def time_cuda(fn: Callable[[], None]) -> float:
    """Median milliseconds by triton.testing.do_bench."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_cpu(fn: Callable[[], None], reps: int = 30) -> float:
    """Best-of-``reps`` milliseconds: on a shared CPU the minimum is the stable statistic."""
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e3 * min(samples)


def timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Milliseconds per call: do_bench on CUDA, best of a few perf_counter runs elsewhere."""
    return time_cuda if torch.device(device).type == "cuda" else (lambda fn: time_cpu(fn, reps=3))


def copy_bandwidth_gbps(device: str, mib: int = 512) -> float:
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(device)(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def compiled_eager() -> Optional[Callable]:
    try:
        import torch._dynamo as dynamo

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, 256)
        return torch.compile(eager)
    except Exception as e:  # pragma: no cover - depends on the installation
        print(f"torch.compile unavailable: {e}", file=sys.stderr)
        return None


def check_same(jobs_a: List[SqgradJob], jobs_b: List[SqgradJob]) -> None:
    """The benchmark only means something if the timed implementations agree."""
    for a, b in zip(jobs_a, jobs_b):
        torch.testing.assert_close(a.out, b.out, rtol=1e-4, atol=1e-3)
        if a.fisher is not None:
            torch.testing.assert_close(a.fisher, b.fisher, rtol=1e-5, atol=1e-5)


def fresh(jobs: List[SqgradJob]) -> List[SqgradJob]:
    """Same gradients, zeroed outputs (outputs shared between jobs stay shared)."""
    outs: Dict[int, torch.Tensor] = {}
    new = []
    for j in jobs:
        out = outs.setdefault(id(j.out), torch.zeros_like(j.out))
        new.append(SqgradJob(j.grad, j.dim, j.index, out, None if j.fisher is None else torch.zeros_like(j.fisher)))
    return new


# ----------------------------------------------------------------------------- runs
def time_graph(fn: Callable[[], None], device: str = DEVICE) -> float:
    """Median GPU milliseconds with the host taken out (CUDA-graph replay); NaN if not capturable."""
    import triton.testing

    if torch.device(device).type != "cuda":
        return float("nan")
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # pragma: no cover - depends on the driver
        print(f"CUDA-graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
        return float("nan")


def measure(v: VitShape, dtype: torch.dtype, fisher: bool, only: Optional[str], comp: Optional[Callable],
            copy_bw: float, device: str = DEVICE, backend: str = "triton") -> dict:
    """Check, then time one workload with every implementation; one table row.

    ``device``/``backend`` other than CUDA/Triton only rehearse the steps on a CPU (the
    figures then time the PyTorch reference, not the kernel).
    """
    time_cuda = timer(device)  # noqa: F811  (shadows the module function: CPU timing off CUDA)
    jobs = make_jobs(v, dtype, device, fisher, only)
    # correctness first: one fresh run of each implementation must agree
    a, b, c = fresh(jobs), fresh(jobs), fresh(jobs)
    sqgrad_accumulate_many(a, backend=backend)
    eager(*eager_args(b))
    check_same(a, b)
    if comp is not None:
        comp(*eager_args(c))
        check_same(c, b)
    del a, b, c
    args = eager_args(jobs)
    nan = float("nan")
    t = {
        "triton": time_cuda(lambda: sqgrad_accumulate_many(jobs, backend=backend)),
        "triton_gpu": time_graph(lambda: sqgrad_accumulate_many(jobs, backend=backend), device),
        "eager": time_cuda(lambda: eager(*args)),
        "eager_gpu": time_graph(lambda: eager(*args), device),
        "compile": time_cuda(lambda: comp(*args)) if comp else nan,
        "compile_gpu": time_graph(lambda: comp(*args), device) if comp else nan,
    }
    if t["triton_gpu"] != t["triton_gpu"]:  # no CUDA graph (or not CUDA): the wall figure stands in
        t["triton_gpu"], t["eager_gpu"] = t["triton"], t["eager"]
    nbytes = moved_bytes(jobs)
    gbps = nbytes / (t["triton_gpu"] * 1e-3) / 1e9
    gbps_wall = nbytes / (t["triton"] * 1e-3) / 1e9
    return dict(model=v.name, workload=only or "whole model", dtype=str(dtype).replace("torch.", ""),
                fisher=fisher, mbytes=nbytes / 2**20, **{f"{k}_us": 1e3 * ms for k, ms in t.items()},
                gbps=gbps, pct_copy=100 * gbps / copy_bw, gbps_wall=gbps_wall, pct_copy_wall=100 * gbps_wall / copy_bw,
                x_eager=t["eager"] / t["triton"], x_compile=t["compile"] / t["triton"],
                x_eager_gpu=t["eager_gpu"] / t["triton_gpu"], x_compile_gpu=t["compile_gpu"] / t["triton_gpu"])


def run_cuda(args: argparse.Namespace) -> dict:
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbps(DEVICE)
    comp = compiled_eager()
    rows, headline = [], []
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    tensors = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    for v in (VIT_B16, VIT_L16):
        for dname in args.dtypes:
            for fisher in ((False, True) if args.fisher == "both" else (args.fisher == "yes",)):
                workloads = [None] + (list(tensors) if v is VIT_B16 or args.all_tensors else [])
                for only in workloads:
                    # torch.compile recompiles for every new set of shapes: whole-model rows only
                    row = measure(v, dtypes[dname], fisher, only, comp if only is None else None, copy_bw)
                    rows.append(row)
                    if only is None:
                        headline.append({k: row[k] for k in ("model", "dtype", "fisher", "gbps", "pct_copy",
                                                             "gbps_wall", "pct_copy_wall", "x_eager", "x_compile",
                                                             "x_eager_gpu", "x_compile_gpu")})
                    torch.cuda.empty_cache()
    ghost = []
    for v in (VIT_B16, VIT_L16):
        x = torch.randn(args.ghost_batch, v.tokens, v.embed, device=DEVICE, dtype=torch.bfloat16)
        g = torch.randn(args.ghost_batch, v.tokens, 3 * v.embed, device=DEVICE, dtype=torch.bfloat16)
        got, want = ghost_sqnorm(x, g, backend="triton"), ghost_sqnorm_ref(x, g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2 * b.abs().max().item())
        t_ghost = time_cuda(lambda: ghost_sqnorm(x, g, backend="triton"))
        t_ref = time_cuda(lambda: ghost_sqnorm_ref(x, g))
        t_mm = time_cuda(lambda: g.flatten(0, 1).t() @ x.flatten(0, 1))
        ghost.append(dict(model=v.name, layer=f"qkv {v.embed}->{3 * v.embed}", batch=args.ghost_batch,
                          tokens=v.tokens, ghost_us=1e3 * t_ghost, ref_us=1e3 * t_ref, batch_grad_us=1e3 * t_mm,
                          x_ref=t_ref / t_ghost, vs_batch_grad=t_ghost / t_mm))
    return dict(bench="sqgrad", mode="cuda", device=name, copy_gbps=copy_bw, rows=rows, headline=headline,
                ghost=ghost)


def run_quick(args: argparse.Namespace) -> dict:
    """CPU, small shapes: the PyTorch reference eager vs torch.compile (no Triton timing on CPU)."""
    torch.set_num_threads(1)  # steadier on a shared machine; the comparison is per core
    comp = compiled_eager()
    rows = []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        jobs = make_jobs(TINY, dtype, "cpu", fisher=False)
        t_eag = time_cpu(lambda: eager(*eager_args(jobs)))
        t_cmp = float("nan")
        if comp is not None:
            a, b = fresh(jobs), fresh(jobs)
            eager(*eager_args(a))
            try:
                comp(*eager_args(b))
                check_same(a, b)
                t_cmp = time_cpu(lambda: comp(*eager_args(jobs)))
            except Exception as e:  # pragma: no cover - a broken compiler toolchain
                print(f"torch.compile failed: {type(e).__name__}: {e}", file=sys.stderr)
        nbytes = moved_bytes(jobs)
        rows.append(dict(model=TINY.name, workload="whole model", dtype=dname, fisher=False, mbytes=nbytes / 2**20,
                         eager_us=1e3 * t_eag, compile_us=1e3 * t_cmp, x_compile_vs_eager=t_eag / t_cmp,
                         eager_gbps=nbytes / (t_eag * 1e-3) / 1e9))
    x = torch.randn(4, TINY.tokens, TINY.embed)
    g = torch.randn(4, TINY.tokens, 3 * TINY.embed)
    t_ghost_ref = time_cpu(lambda: ghost_sqnorm_ref(x, g))
    t_loop = time_cpu(lambda: [(gi.t() @ xi).square().sum(1) for xi, gi in zip(x, g)])
    return dict(bench="sqgrad", mode="quick", device="cpu", rows=rows,
                ghost=[dict(model=TINY.name, ghost_ref_us=1e3 * t_ghost_ref, per_sample_loop_rows_us=1e3 * t_loop)])


# ----------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    lines = []
    if result["mode"] == "cuda":
        lines.append(f"sqgrad on {result['device']}; copy bandwidth {result['copy_gbps']:.0f} GB/s. "
                     "wall = do_bench per call (host included); GPU = CUDA-graph replay (host excluded).")
        lines.append("")
        lines.append("| model | workload | dtype | fisher | MiB | triton wall µs | triton GPU µs | GB/s GPU "
                     "| % copy GPU | % copy wall | eager wall µs | compile wall µs | × eager "
                     "| × compile | × eager GPU | × compile GPU |")
        lines.append("|---|---|---|---|" + "---:|" * 12)
        for r in result["rows"]:
            lines.append(f"| {r['model']} | {r['workload']} | {r['dtype']} | {'yes' if r['fisher'] else 'no'} "
                         f"| {r['mbytes']:.1f} | {r['triton_us']:.1f} | {r['triton_gpu_us']:.1f} | {r['gbps']:.0f} "
                         f"| {r['pct_copy']:.0f} | {r['pct_copy_wall']:.0f} "
                         f"| {r['eager_us']:.1f} | {r['compile_us']:.1f} | {r['x_eager']:.2f} | {r['x_compile']:.2f} "
                         f"| {r['x_eager_gpu']:.2f} | {r['x_compile_gpu']:.2f} |")
        lines.append("")
        lines.append("Per-tensor rows fit in L2, so their GPU-time GB/s can exceed DRAM bandwidth.")
        lines.append("")
        lines.append("| ghost_sqnorm (bf16) | B | T | ghost µs | reference µs | × reference "
                     "| batch-grad matmul µs | ghost / matmul |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in result["ghost"]:
            lines.append(f"| {r['model']} {r['layer']} | {r['batch']} | {r['tokens']} | {r['ghost_us']:.1f} "
                         f"| {r['ref_us']:.1f} | {r['x_ref']:.2f} | {r['batch_grad_us']:.1f} "
                         f"| {r['vs_batch_grad']:.2f} |")
    else:
        lines.append("sqgrad --quick on the CPU (PyTorch reference only; Triton needs a GPU to be timed)")
        lines.append("")
        lines.append("| model | dtype | MiB | eager µs | compile µs | compile speedup | eager GB/s |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for r in result["rows"]:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['mbytes']:.2f} | {r['eager_us']:.0f} "
                         f"| {r['compile_us']:.0f} | {r['x_compile_vs_eager']:.2f} | {r['eager_gbps']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU, small shapes, < 2 minutes")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--fisher", default="both", choices=["no", "yes", "both"],
                    help="also accumulate the per-parameter diagonal Fisher")
    ap.add_argument("--all-tensors", action="store_true", help="per-tensor rows for ViT-L/16 too")
    ap.add_argument("--ghost-batch", type=int, default=16)
    args = ap.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: running --quick (the full benchmark needs a GPU)", file=sys.stderr)
        args.quick = True
    torch.manual_seed(0)
    result = run_quick(args) if args.quick else run_cuda(args)
    print(markdown(result))
    print(json.dumps(result if args.quick else {k: result[k] for k in ("bench", "mode", "device", "copy_gbps",
                                                                       "headline", "ghost")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
