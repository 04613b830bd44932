"""The GPU suite: every kernel check and benchmark in one call, time-boxed, into two files.

    pip install --no-deps -e .                      # on the bare GPU machine (nothing else to install)
    python benchmarks/gpu_suite.py --out DIR        # <= 8 minutes on one GPU
    python benchmarks/gpu_suite.py --out DIR --rehearse   # the same steps at toy sizes on a CPU (~1 min)

Writes ``DIR/gpu_suite.json`` (every figure, hardware, versions, each step's status and
seconds) and ``DIR/gpu_suite.md`` (the same as tables, with the goals checked). Nothing else.

The steps, in order, each with its own deadline (``BUDGET_S``; the total is capped at
``--budget``, default 480 s): a step that overruns is stopped (SIGALRM), recorded as
``timeout`` and the suite goes on; a step that fails is recorded with its error. Figures
a step measured before it stopped are kept.

1. ``env``: GPU, driver, CUDA, CPU, Python / torch / triton / timm / ... versions, commit.
2. ``kernels``: the kernel checks natively at full size: masked attention (fp32, fp16,
   bf16, ViT-B/16 shapes, strided packed-qkv views) against its reference, the sqgrad
   accumulator against the PyTorch formulation, ghost_sqnorm against its reference
   (every dtype); then, when pytest is installed, the kernel tests and the tests that only
   mean something on a GPU (the masked forward's Triton path, prune() in bf16, passes
   on a model off the CPU) in a subprocess.
3. ``sqgrad``: squared-gradient accumulation on ViT-B/16 shapes vs eager PyTorch and the
   copy bandwidth (goal: >= 80 % of copy bandwidth, >= 2x eager).
4. ``masked_attention``: the Triton kernel vs SDPA and SDPA + mask at 0-75 % masked heads,
   ViT-B/16 shapes, bf16 (goals: 50 % masked >= 1.8x SDPA + mask; 0 % within 10 % of SDPA).
5. ``search``: candidate scoring, batched masked forward vs per-pair slicing on ViT-B/16
   (goal: >= 10x), the executed/sliced FLOPs ratio, and the fitness (neighbourhood, the
   default, and PCA cosine) in bf16 vs fp32 on the same pairs (goal: within 1e-3).
6. ``scoring``: the local-score gradient pass (DINO, 12 crops) on ViT-B/16, fp32 with the
   kernel and without, bf16 with the kernel.
7. ``paper``: ``prune()`` end to end on ViT-B/16 at a reduced size, and the paper
   configuration (1000 images x 12 crops, 50 generations, 1000 fitness images) projected
   from its measured rates (goal: < 5 minutes).

``--rehearse`` runs every step with toy sizes on whatever device there is (the CPU here:
Triton under its interpreter where a step forces it, otherwise the PyTorch reference),
so the whole suite is exercised without a GPU; tests/test_gpu_suite.py does that.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "benchmarks" / "kernels")]

import torch  # noqa: E402

#: Seconds per step on a GPU (the total stays under 480).
BUDGET_S = {"env": 10, "kernels": 150, "sqgrad": 45, "masked_attention": 40, "search": 110, "scoring": 50,
            "paper": 75}
#: Seconds per step in a rehearsal on the CPU.
REHEARSE_BUDGET_S = {"env": 10, "kernels": 60, "sqgrad": 20, "masked_attention": 20, "search": 60, "scoring": 40,
                     "paper": 60}
TOTAL_BUDGET_S = 480

GOALS = {
    "sqgrad_pct_copy_ge_80": "sqgrad (ViT-B/16, bf16) >= 80 % of copy bandwidth",
    "sqgrad_x_eager_ge_2": "sqgrad >= 2x eager PyTorch",
    "masked_attention_50pct_ge_1.8x": "masked attention at 50 % masked heads >= 1.8x SDPA with a mask",
    "masked_attention_0pct_within_10pct": "masked attention at 0 % within 10 % of SDPA",
    "search_speedup_ge_10x": "candidate scoring >= 10x the reference (ViT-B/16)",
    "paper_lt_300s": "paper configuration < 5 minutes (projected)",
    "fitness_bf16_within_1e-3": "fitness in bf16 within 1e-3 of fp32",
}


def _toy_sqgrad_shape():
    import bench_sqgrad as bs

    return bs.VitShape("toy (rehearsal)", 32, 2, 64, 1, tokens=5)  # interpreted kernels: < 1 s a call


class StepTimeout(Exception):
    pass


@dataclass
class Ctx:
    rehearse: bool
    device: torch.device
    deadline: float  # time.monotonic() by which the current step must end
    log: Callable[[str], None]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ============================================================================ timing
def bench_ms(ctx: Ctx, fn: Callable[[], Any]) -> float:
    """Median milliseconds per call: do_bench on CUDA, best of 3 perf_counter runs on the CPU."""
    if ctx.cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=60 if not ctx.rehearse else 10, return_mode="median")
    fn()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


# ============================================================================ steps
def step_env(ctx: Ctx, out: Dict[str, Any]) -> None:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("torch", "triton", "timm", "transformers", "onnx", "onnxruntime", "numpy", "safetensors",
                 "scikit-learn", "pytest", "elastic_fx"):
        try:
            versions[dist] = metadata.version(dist)  # no import: the heavy packages stay unloaded
        except metadata.PackageNotFoundError:
            versions[dist] = None
    import elastic_fx

    versions["elastic_fx"] = elastic_fx.__version__
    out["versions"] = versions
    out["torch_cuda"] = torch.version.cuda
    hw: Dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "platform": platform.platform()}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        hw.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                  capability=f"{p.major}.{p.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            hw["nvidia_smi"] = smi.stdout.strip()
        except Exception:  # noqa: BLE001
            hw["nvidia_smi"] = None
    out["hardware"] = hw
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["commit"] = None
    out["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")


def step_kernels(ctx: Ctx, out: Dict[str, Any]) -> None:
    """Kernels vs their references at full size (toy sizes in a rehearsal), then pytest."""
    from elastic_fx.kernels import _dispatch
    from elastic_fx.kernels.ghost_sqnorm import ghost_sqnorm, ghost_sqnorm_ref
    from elastic_fx.kernels.masked_attention import masked_attention, masked_attention_ref
    from elastic_fx.kernels.sqgrad import sqgrad_accumulate_many
    import bench_sqgrad as bs

    TOY_SQGRAD = _toy_sqgrad_shape()
    dev = ctx.device
    can_triton = ctx.cuda or _dispatch._INTERPRETED
    backend = "triton" if can_triton else "torch"
    out["backend"] = backend
    checks: List[Dict[str, Any]] = []
    out["checks"] = checks
    # masked attention, ViT-B/16 shapes (toy under the interpreter)
    C, B, H, N, d = (4, 4, 12, 197, 64) if not ctx.rehearse else (2, 1, 3, 17, 16)
    tols = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    g = torch.Generator().manual_seed(0)
    for dtype, tol in tols.items():
        qkv = torch.randn(C, B, N, 3, H, d, generator=g).to(dev, dtype)
        q, k, v = (qkv[:, :, :, i].permute(0, 1, 3, 2, 4) for i in range(3))
        keep = torch.rand(C, H, generator=g) < 0.5
        keep[0, 0] = True
        keep = keep.to(dev)
        got = masked_attention(q, k, v, keep, backend=backend).float()
        want = masked_attention_ref(q, k, v, keep.cpu()).float()
        err = (got - want).abs().max().item()
        zero = got.transpose(1, 2)[~keep].abs().max().item() if (~keep).any() else 0.0
        checks.append({"op": "masked_attention", "dtype": str(dtype)[6:], "shape": [C, B, H, N, d],
                       "max_abs_err": err, "tol": tol, "masked_max": zero, "ok": err <= tol * 4 and zero == 0})
    # sqgrad: ViT-B/16 block gradients (toy in a rehearsal) vs the eager formulation
    shape = bs.VIT_B16 if not ctx.rehearse else TOY_SQGRAD
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fisher in (False, True):
            jobs = bs.make_jobs(shape, dtype, str(dev), fisher)
            a, b = bs.fresh(jobs), bs.fresh(jobs)
            sqgrad_accumulate_many(a, backend=backend)
            bs.eager(*bs.eager_args(b))
            try:
                bs.check_same(a, b)
                ok, err = True, ""
            except AssertionError as e:
                ok, err = False, str(e)[:300]
            checks.append({"op": "sqgrad", "dtype": str(dtype)[6:], "fisher": fisher, "model": shape.name,
                           "ok": ok, "error": err})
    # ghost_sqnorm: ViT-B/16 qkv
    Bg, T, n_in, n_out = (16, 197, 768, 2304) if not ctx.rehearse else (2, 5, 16, 24)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(Bg, T, n_in, generator=g).to(dev, dtype)
        gr = torch.randn(Bg, T, n_out, generator=g).to(dev, dtype)
        got, want = ghost_sqnorm(x, gr, backend=backend), ghost_sqnorm_ref(x, gr)
        rel = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, want))
        checks.append({"op": "ghost_sqnorm", "dtype": str(dtype)[6:], "shape": [Bg, T, n_in, n_out],
                       "max_rel_err": rel, "ok": rel <= 2e-2})
    _sync(ctx)
    out["checks_ok"] = all(c["ok"] for c in checks)
    out["pytest"] = _pytest(ctx)


#: What pytest runs natively on the GPU: the kernel tests (test_compile only compiles for other
#: arches: the CPU machines run it) and the tests that a GPU changes.
PYTEST_GPU = ["tests/kernels/test_masked_attention.py", "tests/kernels/test_sqgrad.py",
              "tests/kernels/test_ghost_sqnorm.py", "tests/kernels/test_dispatch.py", "tests/passes/test_device.py",
              "tests/passes/test_mask.py::test_triton_kernel_path_matches_slicing",
              "tests/search/test_run.py::test_best_candidate_fitness_is_reproducible_from_sliced_models"]
PYTEST_REHEARSE = ["tests/kernels/test_dispatch.py"]


def _pytest(ctx: Ctx) -> Dict[str, Any]:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "pytest not installed: the native checks above stand in"}
    args = PYTEST_REHEARSE if ctx.rehearse else PYTEST_GPU
    timeout = max(5.0, ctx.left() - 5)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:]
        return {"status": "timeout", "seconds": round(time.monotonic() - t0, 1),
                "tail": tail.decode() if isinstance(tail, bytes) else tail}
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    counts = {}
    for word in ("passed", "failed", "skipped", "error", "errors"):
        for part in summary.replace(",", " ,").split(","):
            bits = part.split()
            if len(bits) >= 2 and bits[1] == word and bits[0].isdigit():
                counts[word] = int(bits[0])
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {"status": "ok" if p.returncode == 0 else f"exit {p.returncode}", "args": args, "summary": summary,
            "counts": counts, "failed": failed[:20], "seconds": round(time.monotonic() - t0, 1),
            "tail": "" if p.returncode == 0 else p.stdout[-3000:] + p.stderr[-1000:]}


def step_sqgrad(ctx: Ctx, out: Dict[str, Any]) -> None:
    import bench_sqgrad as bs

    TOY_SQGRAD = _toy_sqgrad_shape()
    dev = str(ctx.device)
    shape = bs.VIT_B16 if not ctx.rehearse else TOY_SQGRAD
    backend = "triton" if ctx.cuda else "torch"
    out["copy_gbps"] = bs.copy_bandwidth_gbps(dev, mib=512 if not ctx.rehearse else 8)
    rows = out.setdefault("rows", [])
    for dtype, fisher in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
        row = bs.measure(shape, dtype, fisher, None, None, out["copy_gbps"], device=dev, backend=backend)
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    head = rows[0]
    out["headline"] = {"pct_copy_gpu": head["pct_copy"], "pct_copy_wall": head["pct_copy_wall"],
                       "x_eager": head["x_eager"], "x_eager_gpu": head["x_eager_gpu"]}


def step_masked_attention(ctx: Ctx, out: Dict[str, Any]) -> None:
    import bench_masked_attention as bm
    from torch.nn.attention import sdpa_kernel

    from elastic_fx.kernels.masked_attention import masked_attention

    C, B, H = (8, 32, 12) if not ctx.rehearse else (2, 1, 12)
    rows = out.setdefault("rows", [])
    out["shape"] = {"C": C, "B": B, "H": H, "N": bm.N_TOKENS, "d": bm.HEAD_DIM}
    cases = [(torch.bfloat16, f) for f in bm.MASKED_FRACTIONS] + [(torch.float32, 0.0), (torch.float32, 0.5)]
    for dtype, frac in cases:
        q, k, v = bm.make_inputs(C, B, H, dtype, str(ctx.device))
        keep = bm.make_keep(C, H, frac, str(ctx.device))
        backends = bm.sdpa_backends(dtype) if ctx.cuda else []
        with (sdpa_kernel(backends) if backends else contextlib.nullcontext()):
            t_kernel = bench_ms(ctx, lambda: masked_attention(q, k, v, keep))
            t_sdpa = bench_ms(ctx, lambda: bm.dense_sdpa(q, k, v))
            t_mask = bench_ms(ctx, lambda: bm.dense_sdpa_masked(q, k, v, keep))
        rows.append({"dtype": str(dtype)[6:], "masked": frac, "kernel_ms": round(t_kernel, 4),
                     "sdpa_ms": round(t_sdpa, 4), "sdpa_mask_ms": round(t_mask, 4),
                     "kernel_over_sdpa": round(t_kernel / t_sdpa, 3),
                     "speedup_vs_sdpa_mask": round(t_mask / t_kernel, 3)})
        del q, k, v
    bf = {r["masked"]: r for r in rows if r["dtype"] == "bfloat16"}
    out["headline"] = {"kernel_over_sdpa_at_0": bf[0.0]["kernel_over_sdpa"],
                       "speedup_vs_sdpa_mask_at_50": bf[0.5]["speedup_vs_sdpa_mask"]}


def step_search(ctx: Ctx, out: Dict[str, Any]) -> None:
    import bench_search as bsr

    kind = "tiny" if ctx.rehearse else "vitb"
    lines: List[str] = []
    out["lines"] = lines
    res = bsr.run(kind, pairs=8 if not ctx.rehearse else 3, n_images=64 if not ctx.rehearse else 4,
                  batch_size=16 if not ctx.rehearse else 4, ref_pairs=1,  # slicing ViT-B: ~10-20 s of CPU
                  flops_pairs=2 if not ctx.rehearse else 1, repeats=2 if not ctx.rehearse else 1,
                  device=str(ctx.device), log=lines.append)
    out.update(res)
    out["fitness_bf16_vs_fp32"] = _fitness_bf16(ctx, kind)


def _fitness_bf16(ctx: Ctx, kind: str) -> Dict[str, Any]:
    """Fitness (PCA cosine to the dense model) of a few pairs, masked forward in bf16 vs fp32."""
    import bench_search as bsr

    import elastic_fx as efx
    from elastic_fx.passes.embedding import embedding_module
    from elastic_fx.passes.mask import build_masked
    from elastic_fx.search.evaluate import masked_embeddings
    from elastic_fx.search.fitness import NeighbourhoodFitness, PCACosineFitness

    size = bsr.MODELS[kind][0]
    n = 64 if not ctx.rehearse else 8
    model = bsr._model(kind).eval().to(ctx.device)
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5)).to(ctx.device)
    gm = efx.trace(model, (images[:2],))
    smap = efx.discover(gm)
    keeps = bsr._keeps(smap, 4, seed=7)
    with torch.inference_mode():
        dense = embedding_module(gm, smap)(images).float().cpu()
    fits = {"neighbours": NeighbourhoodFitness(dense), "pca-cosine": PCACosineFitness(dense, dim=min(16, n - 1))}
    masked = build_masked(gm, smap)
    emb = {name: masked_embeddings(masked, images, keeps, batch_size=16, device=ctx.device,
                                   dtype=dtype).float().cpu()
           for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    out: Dict[str, Any] = {"pairs": len(keeps), "images": n}
    for kind, fit in fits.items():
        per = {name: [float(fit(e[None])[0]) for e in e_all] for name, e_all in emb.items()}
        out[kind] = {**per, "max_abs_diff": max(abs(a - b) for a, b in zip(per["fp32"], per["bf16"]))}
    out["max_abs_diff"] = out["neighbours"]["max_abs_diff"]  # the search's default fitness
    return out


def step_scoring(ctx: Ctx, out: Dict[str, Any]) -> None:
    """The local-score gradient pass (DINO, 2 global + 10 local crops), as bench_scoring times it."""
    import timm

    import elastic_fx as efx
    from elastic_fx.data import SyntheticSource
    from elastic_fx.scoring.dino import DinoConfig
    from elastic_fx.scoring.local import local_scores

    if ctx.rehearse:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                                  depth=2, num_heads=3, num_classes=0)
        n, batch, size = 4, 2, 64
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        n, batch, size = 64, 16, 256
    gm = efx.trace(model.eval().to(ctx.device))
    images = SyntheticSource(n, size=size, seed=0).tensor()
    dino = DinoConfig()
    rows = out.setdefault("rows", [])
    for name, amp, backend in (("fp32 / kernel", torch.float32, "auto"), ("fp32 / torch", torch.float32, "torch"),
                               ("bf16 / kernel", torch.bfloat16, "auto")):
        if not ctx.cuda and (amp != torch.float32 or backend == "torch"):
            continue  # off CUDA both backends are the same PyTorch code, and bf16 is not the point
        kw = dict(batch_size=batch, dino=dino, progress=False, amp_dtype=amp, backend=backend)
        local_scores(gm, images[: 2 * batch], num_images=2 * batch, **kw)  # warm-up: compilation, heuristics
        ls = local_scores(gm, images, num_images=n, **kw)
        ips = ls.config["images_per_s"]
        rows.append({"variant": name, "images": n, "crops_per_image": dino.n_views, "images_per_s": round(ips, 3),
                     "seconds_per_1000_images": round(1000 / ips, 2)})
    out["best_seconds_per_1000_images"] = min(r["seconds_per_1000_images"] for r in rows)


def step_paper(ctx: Ctx, out: Dict[str, Any]) -> None:
    """prune() end to end at a reduced size; the paper configuration projected from its rates."""
    import timm

    from elastic_fx.pipeline import SearchConfig, prune

    if ctx.rehearse:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                                  depth=2, num_heads=3, num_classes=10)
        n_img, n_fit, gens, size = 8, 10, 2, 32
        cfg = SearchConfig(num_images=n_img, num_fitness_images=n_fit, batch_size=4, pca_dim=6)
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        n_img, n_fit, gens, size = 64, 64, 2, 256
        cfg = SearchConfig(num_images=n_img, num_fitness_images=n_fit)
    model = model.eval().to(ctx.device)
    images = torch.randint(0, 255, (max(n_img, n_fit), 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    scores = prune(model, images, iterations=gens, sparsities=(0.1, 0.3, 0.5, 0.6), config=cfg,
                   device=str(ctx.device), progress=False)
    total = time.perf_counter() - t0
    local_s = float(scores.config.get("local_seconds") or 0.0)
    search_s = float(scores.config.get("search_seconds") or 0.0)
    per_gen = search_s / gens
    # paper: 1000 images x 12 crops for the local scores; 50 generations on 1000 fitness images.
    # Local time scales with images; search time per generation with fitness images.
    projected = local_s * 1000 / n_img + per_gen * 50 * 1000 / n_fit
    out.update({"images": n_img, "fitness_images": n_fit, "generations": gens, "seconds": round(total, 2),
                "local_seconds": round(local_s, 2), "search_seconds": round(search_s, 2),
                "search_seconds_per_generation": round(per_gen, 3),
                "other_seconds": round(total - local_s - search_s, 2),
                "paper_projected_seconds": round(projected, 1),
                "projection": "local_seconds * 1000 / images + search_seconds_per_generation * 50 * 1000 / "
                              "fitness_images (fixed costs are counted in both: an upper bound)"})


STEPS: Dict[str, Callable[[Ctx, Dict[str, Any]], None]] = {
    "env": step_env,
    "kernels": step_kernels,
    "sqgrad": step_sqgrad,
    "masked_attention": step_masked_attention,
    "search": step_search,
    "scoring": step_scoring,
    "paper": step_paper,
}


# ============================================================================ driver
@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise StepTimeout in the main thread after ``seconds`` (a no-op where SIGALRM is missing)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise StepTimeout(f"over its {seconds:.0f} s deadline")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_suite(out_dir: Path, rehearse: bool, budget: float = TOTAL_BUDGET_S, steps: Optional[List[str]] = None,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budgets = REHEARSE_BUDGET_S if rehearse else BUDGET_S
    start = time.monotonic()
    end = start + budget
    result: Dict[str, Any] = {"suite": "gpu", "rehearse": rehearse, "device": str(device),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget, "steps": {}}
    for name in steps or list(STEPS):
        left = end - time.monotonic()
        entry: Dict[str, Any] = {"budget_s": budgets[name]}
        result["steps"][name] = entry
        if left < 1:
            entry["status"] = "skipped: the suite's total budget is spent"
            continue
        allowed = min(budgets[name], left)
        ctx = Ctx(rehearse, device, time.monotonic() + allowed, log)
        data: Dict[str, Any] = {}
        t0 = time.monotonic()
        log(f"[gpu_suite] {name}: up to {allowed:.0f} s")
        try:
            with _alarm(allowed):
                STEPS[name](ctx, data)
            entry["status"] = "ok"
        except StepTimeout as e:
            entry["status"] = f"timeout: {e}"
        except Exception as e:  # noqa: BLE001  a failing step is a result; the suite goes on
            entry["status"] = f"error: {type(e).__name__}: {str(e)[:500]}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        entry["seconds"] = round(time.monotonic() - t0, 2)
        entry["data"] = data
        log(f"[gpu_suite] {name}: {entry['status']} in {entry['seconds']} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = round(time.monotonic() - start, 2)
    result["goals"] = goals(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "gpu_suite.md").write_text(markdown(result))
    return result


def _get(result: Dict[str, Any], step: str, *keys: str) -> Any:
    d: Any = result["steps"].get(step, {}).get("data", {})
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def goals(result: Dict[str, Any]) -> Dict[str, Any]:
    """Each goal: the measured figure and whether it is met (None: not measured)."""
    def check(value, ok):
        return {"value": value, "met": None if value is None else bool(ok(value))}

    real = not result["rehearse"]  # figures of a rehearsal on a CPU are not GPU figures
    g = {
        "sqgrad_pct_copy_ge_80": check(_get(result, "sqgrad", "headline", "pct_copy_gpu"), lambda v: v >= 80),
        "sqgrad_x_eager_ge_2": check(_get(result, "sqgrad", "headline", "x_eager"), lambda v: v >= 2),
        "masked_attention_50pct_ge_1.8x": check(
            _get(result, "masked_attention", "headline", "speedup_vs_sdpa_mask_at_50"), lambda v: v >= 1.8),
        "masked_attention_0pct_within_10pct": check(
            _get(result, "masked_attention", "headline", "kernel_over_sdpa_at_0"), lambda v: v <= 1.10),
        "search_speedup_ge_10x": check(_get(result, "search", "speedup_vs_reference"), lambda v: v >= 10),
        "paper_lt_300s": check(_get(result, "paper", "paper_projected_seconds"), lambda v: v < 300),
        "fitness_bf16_within_1e-3": check(_get(result, "search", "fitness_bf16_vs_fp32", "max_abs_diff"),
                                          lambda v: v <= 1e-3),
    }
    if not real:
        for v in g.values():
            v["met"] = None
    return g


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(result: Dict[str, Any]) -> str:
    env = _get(result, "env") or {}
    hw = env.get("hardware", {})
    lines = [f"# GPU suite{' (rehearsal: toy sizes, not GPU figures)' if result['rehearse'] else ''}", "",
             f"- device: {hw.get('gpu') or result['device']} ({hw.get('capability', '-')}, "
             f"{hw.get('gpu_memory_gib', '-')} GiB, {hw.get('sm_count', '-')} SMs); CPU {hw.get('cpu')} x "
             f"{hw.get('cpu_count')}; {hw.get('nvidia_smi') or ''}",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()),
             f"- CUDA (torch) {env.get('torch_cuda')}; commit {env.get('commit')}; started {result['started']}; "
             f"total {result['seconds']} s of {result['budget_s']} s", "",
             "## Steps", "", "| step | status | seconds | budget s |", "|---|---|---:|---:|"]
    for name, e in result["steps"].items():
        lines.append(f"| {name} | {e.get('status')} | {e.get('seconds', '-')} | {e['budget_s']} |")
    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---:|---|"]
    for key, g in result["goals"].items():
        lines.append(f"| {GOALS[key]} | {_fmt(g['value'])} | {g['met']} |")
    k = _get(result, "kernels")
    if k:
        lines += ["", f"## Kernels (backend {k.get('backend')})", "", "| op | dtype | detail | ok |", "|---|---|---|---|"]
        for c in k.get("checks", []):
            detail = ", ".join(f"{n}={_fmt(c[n])}" for n in ("shape", "fisher", "max_abs_err", "max_rel_err", "tol")
                               if n in c)
            lines.append(f"| {c['op']} | {c['dtype']} | {detail} | {c['ok']} |")
        p = k.get("pytest") or {}
        lines += ["", f"pytest: {p.get('status')} — {p.get('summary', '')}"]
        lines += [f"- {f}" for f in p.get("failed", [])]
    s = _get(result, "sqgrad")
    if s and s.get("rows"):
        lines += ["", f"## sqgrad (copy bandwidth {_fmt(s.get('copy_gbps'))} GB/s)", "",
                  "| model | dtype | fisher | MiB | µs wall | µs GPU | % copy GPU | × eager | × eager GPU |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['fisher']} | {_fmt(r['mbytes'])} | {_fmt(r['triton_us'])} "
                         f"| {_fmt(r['triton_gpu_us'])} | {_fmt(r['pct_copy'])} | {_fmt(r['x_eager'])} "
                         f"| {_fmt(r['x_eager_gpu'])} |")
    m = _get(result, "masked_attention")
    if m and m.get("rows"):
        lines += ["", f"## Masked attention ({m.get('shape')})", "",
                  "| dtype | masked | kernel ms | SDPA ms | SDPA+mask ms | kernel/SDPA | × SDPA+mask |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['dtype']} | {r['masked']:.0%} | {_fmt(r['kernel_ms'])} | {_fmt(r['sdpa_ms'])} "
                         f"| {_fmt(r['sdpa_mask_ms'])} | {_fmt(r['kernel_over_sdpa'])} "
                         f"| {_fmt(r['speedup_vs_sdpa_mask'])} |")
    for name in ("search", "scoring", "paper"):
        d = _get(result, name)
        if d:
            lines += ["", f"## {name}", ""]
            lines += [f"    {ln}" for ln in d.get("lines", [])]
            lines += [f"- {k}: {_fmt(v)}" for k, v in d.items() if k != "lines" and not isinstance(v, (dict, list))]
            for k, v in d.items():
                if isinstance(v, dict):
                    lines.append(f"- {k}: {json.dumps(v, default=str)}")
    for name, e in result["steps"].items():
        if e.get("traceback"):
            lines += ["", f"## {name}: traceback", "", "```", e["traceback"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--rehearse", action="store_true", help="toy sizes on any device (a CPU run of every step)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole suite")
    ap.add_argument("--steps", nargs="+", choices=list(STEPS), help="only these steps (default: all)")
    args = ap.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        print("no CUDA device: use --rehearse for a CPU run of the steps at toy sizes", file=sys.stderr)
        return 2
    result = run_suite(args.out, args.rehearse, args.budget, args.steps)
    bad = [n for n, e in result["steps"].items() if e.get("status") != "ok"]
    print(f"[gpu_suite] wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}; "
          f"{len(result['steps']) - len(bad)} steps ok" + (f", not ok: {', '.join(bad)}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
