"""Dense vs physically sliced ViT: measured latency next to the theoretical FLOPs ratio.

One run builds the dense model (sparsity 0) and its sliced versions at 10..60 % sparsity
(``efx.budget_masks`` -> ``efx.slice`` -> ``efx.export_onnx``) and times all of them side
by side:

* ``ort``   - onnxruntime, CPUExecutionProvider, ``intra_op_num_threads`` = all cores,
              full graph optimisation, the same session options for every config;
* ``torch`` - PyTorch eager, fp32, ``torch.inference_mode()``, ``torch.set_num_threads``
              = all cores, the fx GraphModule itself (the dense one is the traced,
              unsliced GraphModule, so dense and sliced run the same kind of graph);
* ``ort-1t-cpu`` / ``torch-1t-cpu`` - the same with ONE thread, timed by the CPU time of
              the calling thread (``time.thread_time``; with one intra-op thread both
              runtimes compute on the caller's thread). On a machine shared with other jobs
              wall-clock latency at all cores swings by several x (a descheduled worker
              thread stalls every parallel op), while this clock counts only the compute:
              it is the contention-robust measure of the work slicing saves;
* on CUDA, when present: ``ort-cuda`` (CUDAExecutionProvider with I/O bound on the
  device, if the provider exists), ``torch-cuda`` (fp32) and ``torch-cuda-bf16``
  (bf16 autocast).

at batch 1 and batch 16, one thread setting after the other. After one untimed warm-up
call per (config, backend) pair, the pairs are timed in rounds: each round makes ONE timed
call of every pair, in a freshly shuffled order (seeded). Switching pair after every call
spreads slow drift and bursts of other jobs on a shared machine evenly over all configs
instead of biasing the ones that happened to run during a burst. The figure per pair is the
median of its calls over all rounds; the best-of (fastest call) is reported next to it.

Reported per config: parameters, GFLOPs (``efx.achieved``: the paper's Table-7 count),
``flops_ratio`` = dense FLOPs / config FLOPs, the median latencies, ``speedup`` = dense
latency / config latency, and ``efficiency`` = speedup / flops_ratio (the goal is >= 0.9).

Which heads and neurons go: the library's magnitude baseline
(``elastic_fx.scoring.baselines.magnitude_scores``, per-parameter means of squared
weights) on the seeded random-init model; ``--scores random`` uses seeded uniform scores
instead. Latency depends only on how many heads / neurons each block keeps, not on the
weights' values.

    python benchmarks/bench_sliced_inference.py --quick      # ViT-Ti/16, ~30 s on 2 cores
    python benchmarks/bench_sliced_inference.py              # ViT-B/16, ~10 min on 2 cores
    python benchmarks/bench_sliced_inference.py --json-out benchmarks/results/sliced_inference.json

Progress goes to stderr; stdout gets the machine description, markdown tables and, last,
ONE JSON line with the headline figures (plus every config's numbers). Never run by pytest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Idle worker threads sleep instead of busy-waiting (before torch loads libgomp): this
# benchmark alternates two runtimes in one process, and a spinning pool of one steals the
# cores the other is computing on (on a shared 2-core machine that made PyTorch calls 10-50x
# slower). onnxruntime's pools get the same setting (``allow_spinning`` 0). ``--spin`` keeps
# both runtimes' defaults.
if "--spin" not in sys.argv[1:]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 - after the environment is set
import torch  # noqa: E402

import elastic_fx as efx  # noqa: E402
from elastic_fx.scoring.baselines import magnitude_scores, random_scores  # noqa: E402

PAPER_FLOPS_RATIO_AT_40 = 1.58  # paper: DINO ViT-B/16 at 40 % sparsity, "speedups in GFLOPs"
GOAL_EFFICIENCY = 0.9  # measured speedup >= 90 % of the FLOPs ratio
HEADLINE_SPARSITY = 0.4


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BatchPlan:
    """How one batch size is timed: ``rounds`` timed calls per (config, backend), one per round."""

    batch: int
    rounds: int


@dataclass(frozen=True)
class BenchConfig:
    model: str
    img_size: int
    sparsities: Tuple[float, ...]
    plans: Tuple[BatchPlan, ...]
    scores: str = "magnitude"
    seed: int = 0


QUICK = BenchConfig(
    model="vit_tiny_patch16_224",
    img_size=224,
    sparsities=(0.0, 0.4, 0.6),
    plans=(BatchPlan(1, rounds=9), BatchPlan(16, rounds=2)),
)
FULL = BenchConfig(
    model="vit_base_patch16_224",
    img_size=224,
    sparsities=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    # batch 16 of ViT-B/16 is ~560 GFLOP per call: few rounds.
    plans=(BatchPlan(1, rounds=15), BatchPlan(16, rounds=4)),
)


@dataclass
class Variant:
    """One model size: the GraphModule, its ONNX file and what it amounts to."""

    sparsity_target: float
    module: torch.nn.Module
    stats: Dict[str, float]
    onnx_path: Path
    onnx_max_abs_diff: float
    onnx_exporter: str
    heads_kept: int
    neurons_kept: int

    @property
    def label(self) -> str:
        return "dense" if self.sparsity_target == 0 else f"{self.sparsity_target:.0%}"


@dataclass
class Samples:
    """Timed calls (seconds) per (variant label, backend, batch)."""

    times: Dict[Tuple[str, str, int], List[float]] = field(default_factory=dict)

    def add(self, key: Tuple[str, str, int], seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def median(self, key: Tuple[str, str, int]) -> Optional[float]:
        t = self.times.get(key)
        return statistics.median(t) if t else None

    def minimum(self, key: Tuple[str, str, int]) -> Optional[float]:
        t = self.times.get(key)
        return min(t) if t else None

    def spread(self, key: Tuple[str, str, int]) -> Optional[float]:
        """Interquartile range / median (a relative spread); None below 4 samples."""
        t = self.times.get(key)
        if not t or len(t) < 4:
            return None
        q = np.percentile(t, [25, 75])
        return float((q[1] - q[0]) / statistics.median(t))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, object]:
    import onnxruntime as ort
    import timm

    info: Dict[str, object] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "timm": timm.__version__,
        "elastic_fx": efx.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


# ----------------------------------------------------------------------------- building
def structure_scores(gm: torch.nn.Module, smap: efx.StructureMap, kind: str, seed: int):
    """Per-structure scores on one scale (per-parameter means), for the budget walk."""
    if kind == "magnitude":
        s = magnitude_scores(gm, structures=smap)
    elif kind == "random":
        s = random_scores(smap, seed)
    else:
        raise SystemExit(f"--scores {kind!r}: use 'magnitude' or 'random'")
    return s.head_means, s.neuron_means


def kept_counts(smap: efx.StructureMap, keep) -> Tuple[int, int]:
    heads = neurons = 0
    for b in smap.blocks:
        k = (keep or {}).get(b.index, {})
        if b.attention is not None:
            heads += len(k["heads"]) if "heads" in k else b.attention.num_heads
        if b.mlp is not None:
            neurons += len(k["neurons"]) if "neurons" in k else b.mlp.hidden_features
    return heads, neurons


def build_variants(cfg: BenchConfig, workdir: Path) -> Tuple[List[Variant], efx.StructureMap]:
    """Trace, discover, score once; then slice + export one model per sparsity."""
    import timm

    torch.manual_seed(cfg.seed)
    model = timm.create_model(cfg.model, pretrained=False, img_size=cfg.img_size).eval()
    example = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    t0 = time.perf_counter()
    gm = efx.trace(model, (example,))
    smap = efx.discover(gm)
    log(f"traced + discovered {cfg.model} in {time.perf_counter() - t0:.1f}s")
    head_scores, neuron_scores = structure_scores(gm, smap, cfg.scores, cfg.seed)

    variants = []
    for s in cfg.sparsities:
        t0 = time.perf_counter()
        keep = None if s == 0 else efx.budget_masks(smap, head_scores, neuron_scores, sparsity=s)
        module = gm if keep is None else efx.slice(gm, smap, keep)
        module.eval()
        t_slice = time.perf_counter() - t0
        path = workdir / f"{cfg.model}_s{round(100 * s):02d}.onnx"
        report = efx.export_onnx(module, path, example, check_batch_sizes=(1, 2))
        heads, neurons = kept_counts(smap, keep)
        v = Variant(s, module, efx.achieved(smap, keep), path, report.max_abs_diff, report.exporter, heads, neurons)
        variants.append(v)
        log(f"{v.label:>5}: slice {t_slice:.1f}s, export {time.perf_counter() - t0 - t_slice:.1f}s "
            f"({report.exporter}, max|diff| {report.max_abs_diff:.1e}), {v.stats['gflops']:.2f} GFLOPs, "
            f"{heads} heads / {neurons} neurons kept")
    return variants, smap


# ----------------------------------------------------------------------------- runners
@dataclass(frozen=True)
class Runner:
    """One forward pass of one (config, backend) pair, with the CPU threads it uses.

    ``clock`` "wall": ``time.perf_counter`` around the call. "cpu": ``time.thread_time`` of
    the calling thread, used for the 1-thread backends: with one intra-op thread both
    onnxruntime and PyTorch compute on the caller's thread, so its CPU time is the compute
    time without the waiting that other jobs on a shared machine cause.
    """

    run: Callable[[], object]
    threads: int
    clock: str = "wall"


def backend_name(kind: str, threads: int, all_cores: int) -> str:
    """``ort`` / ``torch`` at all cores (wall clock), ``ort-1t-cpu`` at one thread (CPU clock)."""
    if threads == all_cores:
        return kind
    return f"{kind}-1t-cpu" if threads == 1 else f"{kind}-{threads}t"


def ort_options(threads: int, spin: bool):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return o


def ort_cpu_call(session, x: np.ndarray) -> Callable[[], object]:
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def ort_cuda_call(session, x: np.ndarray) -> Callable[[], object]:
    """Input and outputs stay on the GPU (I/O binding), so no host copy is timed."""
    import onnxruntime as ort

    binding = session.io_binding()
    value = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    binding.bind_ortvalue_input(session.get_inputs()[0].name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def torch_call(module: torch.nn.Module, x: torch.Tensor, bf16: bool = False) -> Callable[[], object]:
    cuda = x.is_cuda

    def run() -> None:
        with torch.inference_mode():
            if bf16:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    module(x)
            else:
                module(x)
        if cuda:
            torch.cuda.synchronize()

    return run


def open_sessions(variants: Sequence[Variant], threads: int, spin: bool, cuda: bool
                  ) -> Dict[Tuple[str, str], object]:
    """(label, "cpu" | "cuda") -> onnxruntime session; every CPU one with the same options."""
    import onnxruntime as ort

    sessions: Dict[Tuple[str, str], object] = {}
    cuda = cuda and "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    for v in variants:
        sessions[(v.label, "cpu")] = ort.InferenceSession(
            str(v.onnx_path), ort_options(threads, spin), providers=["CPUExecutionProvider"])
        if cuda:
            sessions[(v.label, "cuda")] = ort.InferenceSession(
                str(v.onnx_path), ort_options(threads, spin),
                providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    return sessions


def make_runners(variants: Sequence[Variant], batch: int, img_size: int, threads: int, all_cores: int,
                 sessions: Dict[Tuple[str, str], object], cuda_modules: Dict[str, torch.nn.Module]
                 ) -> Dict[Tuple[str, str], Runner]:
    """(variant label, backend) -> a Runner doing one forward pass at ``batch``; same input for all."""
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(batch))
    x_np = x.numpy()
    clock = "cpu" if threads == 1 else "wall"
    runners: Dict[Tuple[str, str], Runner] = {}
    for v in variants:
        runners[(v.label, backend_name("ort", threads, all_cores))] = Runner(
            ort_cpu_call(sessions[(v.label, "cpu")], x_np), threads, clock)
        runners[(v.label, backend_name("torch", threads, all_cores))] = Runner(torch_call(v.module, x), threads, clock)
        if (v.label, "cuda") in sessions:
            runners[(v.label, "ort-cuda")] = Runner(ort_cuda_call(sessions[(v.label, "cuda")], x_np), threads)
        if v.label in cuda_modules:
            xc = x.cuda()
            runners[(v.label, "torch-cuda")] = Runner(torch_call(cuda_modules[v.label], xc), threads)
            runners[(v.label, "torch-cuda-bf16")] = Runner(torch_call(cuda_modules[v.label], xc, bf16=True), threads)
    return runners


def rss_gib() -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, ValueError):
        pass
    return None


# ----------------------------------------------------------------------------- timing
def timed(runner: Runner) -> float:
    torch.set_num_threads(runner.threads)  # outside the timed region; ORT ignores it
    clock = time.thread_time if runner.clock == "cpu" else time.perf_counter
    t0 = clock()
    runner.run()
    return clock() - t0


def measure(plan: BatchPlan, runners: Dict[Tuple[str, str], Runner], samples: Samples, seed: int) -> None:
    """One warm-up call per pair, then ``plan.rounds`` rounds of one call per pair, shuffled per round."""
    keys = sorted(runners)
    for key in keys:  # first-call allocations, ORT arena growth, lazy init
        timed(runners[key])
    rng = random.Random(seed * 1000 + plan.batch)
    every = max(1, plan.rounds // 5)
    for r in range(plan.rounds):
        order = keys[:]
        rng.shuffle(order)
        t_round = time.perf_counter()
        for key in order:
            samples.add((key[0], key[1], plan.batch), timed(runners[key]))
        if (r + 1) % every == 0 or r + 1 == plan.rounds:
            log(f"batch {plan.batch}, {runners[order[0]].threads} thread(s): round {r + 1}/{plan.rounds} "
                f"({time.perf_counter() - t_round:.1f}s), load {load_average()}, RSS {rss_gib()} GiB")


# ----------------------------------------------------------------------------- report
def results(variants: Sequence[Variant], samples: Samples, backends: Sequence[str],
            batches: Sequence[int]) -> List[Dict[str, object]]:
    dense = variants[0]
    rows = []
    for v in variants:
        flops_ratio = dense.stats["flops"] / v.stats["flops"]
        row: Dict[str, object] = {
            "config": v.label,
            "sparsity_target": v.sparsity_target,
            "sparsity": round(v.stats["sparsity"], 4),
            "params_m": round(v.stats["params"] / 1e6, 3),
            "gflops": round(v.stats["gflops"], 3),
            "flops_ratio": round(flops_ratio, 4),
            "heads_kept": v.heads_kept,
            "neurons_kept": v.neurons_kept,
            "onnx_max_abs_diff": v.onnx_max_abs_diff,
            "onnx_exporter": v.onnx_exporter,
        }
        for be in backends:
            for b in batches:
                key, ref = (v.label, be, b), (dense.label, be, b)
                med, dmed = samples.median(key), samples.median(ref)
                if med is None or dmed is None:
                    continue
                tag = f"{be}_b{b}"
                speedup = dmed / med
                row[f"{tag}_ms"] = round(1e3 * med, 3)
                spread = samples.spread(key)
                if spread is not None:
                    row[f"{tag}_iqr"] = round(spread, 3)
                row[f"{tag}_n"] = len(samples.times[key])
                row[f"{tag}_speedup"] = round(speedup, 4)
                row[f"{tag}_eff"] = round(speedup / flops_ratio, 4)
                # best-of: on a shared CPU the fastest call is the least disturbed one
                best, dbest = samples.minimum(key), samples.minimum(ref)
                row[f"{tag}_best_ms"] = round(1e3 * best, 3)
                row[f"{tag}_best_speedup"] = round(dbest / best, 4)
                row[f"{tag}_best_eff"] = round(dbest / best / flops_ratio, 4)
        rows.append(row)
    return rows


def markdown(rows: Sequence[Dict[str, object]], backends: Sequence[str], batch: int, stat: str = "median") -> str:
    """One table for one batch size: ``stat`` "median" (latency ± half IQR) or "best" (best-of)."""
    pre = "" if stat == "median" else "best_"
    head = ["config", "sparsity", "params (M)", "GFLOPs", "FLOPs ratio"]
    tags = [(be, f"{be}_b{batch}") for be in backends if f"{be}_b{batch}_ms" in rows[0]]
    for be, _ in tags:
        head += [f"{be} ms", f"{be} speedup (eff.)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["config"]), f"{r['sparsity']:.3f}", f"{r['params_m']:.1f}", f"{r['gflops']:.2f}",
                 f"{r['flops_ratio']:.3f}x"]
        for _, t in tags:
            iqr = r.get(f"{t}_iqr") if stat == "median" else None
            cells.append(f"{r[f'{t}_{pre}ms']:.1f}" + (f" (±{100 * iqr / 2:.0f}%)" if iqr is not None else ""))
            cells.append(f"{r[f'{t}_{pre}speedup']:.3f}x ({r[f'{t}_{pre}eff']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(rows: Sequence[Dict[str, object]], tags: Sequence[str]) -> Dict[str, object]:
    """Per backend: speedup and efficiency at 40 % (median and best-of) and the worst median efficiency."""
    at = min(rows[1:], key=lambda r: abs(float(r["sparsity_target"]) - HEADLINE_SPARSITY))
    out: Dict[str, object] = {
        "sparsity_target": at["sparsity_target"],
        "sparsity": at["sparsity"],
        "flops_ratio": at["flops_ratio"],
        "paper_flops_ratio_at_40": PAPER_FLOPS_RATIO_AT_40,
    }
    for t in tags:
        if f"{t}_speedup" not in at:
            continue
        effs = [float(r[f"{t}_eff"]) for r in rows[1:]]
        out[f"{t}_speedup"] = at[f"{t}_speedup"]
        out[f"{t}_eff"] = at[f"{t}_eff"]
        out[f"{t}_worst_eff"] = round(min(effs), 4)
        out[f"{t}_goal_met_at_40"] = bool(float(at[f"{t}_eff"]) >= GOAL_EFFICIENCY)
        out[f"{t}_best_speedup"] = at[f"{t}_best_speedup"]
        out[f"{t}_best_eff"] = at[f"{t}_best_eff"]
    return out


def write_json_atomic(path: str, payload: Dict[str, object]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ViT-Ti/16, 3 configs, few calls (< 2 min on 2 cores)")
    p.add_argument("--model", help="timm model name (default: vit_base_patch16_224; quick: vit_tiny_patch16_224)")
    p.add_argument("--sparsities", type=float, nargs="+", help="sliced configs (dense is always added)")
    p.add_argument("--scores", choices=("magnitude", "random"), default="magnitude")
    p.add_argument("--rounds-scale", type=float, default=1.0, help="multiply every plan's rounds by this")
    p.add_argument("--threads", type=int, nargs="+", default=[cores] + ([1] if cores > 1 else []),
                   help="CPU thread counts to time (ORT intra-op and torch); the first is the main one "
                        f"(default: {cores} = all cores, plus 1 thread timed by CPU clock)")
    p.add_argument("--spin", action="store_true",
                   help="let idle worker threads busy-wait (runtime defaults) instead of sleeping")
    p.add_argument("--keep-onnx", metavar="DIR", help="write the .onnx files here instead of a temp dir")
    p.add_argument("--json-out", metavar="PATH", help="also write the final JSON (indented) here, atomically")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    base = QUICK if args.quick else FULL
    sparsities = base.sparsities
    if args.sparsities:
        bad = [s for s in args.sparsities if not 0 < s < 1]
        if bad:
            raise SystemExit(f"--sparsities must lie in (0, 1), got {bad}")
        sparsities = (0.0,) + tuple(sorted(set(args.sparsities)))
    if any(n < 1 for n in args.threads) or len(set(args.threads)) != len(args.threads):
        raise SystemExit(f"--threads must be distinct counts >= 1, got {args.threads}")
    plans = tuple(BatchPlan(p.batch, max(1, round(p.rounds * args.rounds_scale))) for p in base.plans)
    return BenchConfig(args.model or base.model, base.img_size, sparsities, plans, args.scores, args.seed)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    cfg = config_from(args)
    threads = list(args.threads)
    torch.set_num_threads(threads[0])
    info = machine_info()
    info["threads"] = threads
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(default)")
    info["ort_allow_spinning"] = bool(args.spin)
    info["load_before"] = load_average()
    log(f"{cfg.model}: configs {cfg.sparsities}, threads {threads}, load {info['load_before']}")
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_sliced_") as tmp:
        workdir = Path(args.keep_onnx) if args.keep_onnx else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        variants, _ = build_variants(cfg, workdir)
        t_build = time.perf_counter() - t_start
        cuda_modules: Dict[str, torch.nn.Module] = {}
        if torch.cuda.is_available():
            import copy

            cuda_modules = {v.label: copy.deepcopy(v.module).cuda().eval() for v in variants}

        samples = Samples()
        t_measure = time.perf_counter()
        backends: List[str] = []
        # One thread setting after the other (its sessions closed before the next opens: each
        # ORT session keeps its own weights, prepacked copies and activation arena, and 14
        # ViT-B sessions at batch 16 exhaust 23 GiB); within a setting all configs interleave.
        for n in threads:
            main_setting = n == threads[0]
            sessions = open_sessions(variants, n, args.spin, cuda=main_setting)
            for plan in cfg.plans:
                runners = make_runners(variants, plan.batch, cfg.img_size, n, threads[0], sessions,
                                       cuda_modules if main_setting else {})
                backends += [be for be in dict.fromkeys(k[1] for k in sorted(runners)) if be not in backends]
                measure(plan, runners, samples, cfg.seed)
                del runners
            del sessions
            gc.collect()
        t_measure = time.perf_counter() - t_measure

    backends.sort(key=lambda be: ("cuda" in be, be.startswith("torch"), be))
    batches = [p.batch for p in cfg.plans]
    rows = results(variants, samples, backends, batches)
    tags = [f"{be}_b{b}" for be in backends for b in batches]
    info["load_after"] = load_average()
    payload: Dict[str, object] = {
        "bench": "sliced_inference",
        "model": cfg.model,
        "quick": bool(args.quick),
        "scores": cfg.scores,
        "plans": [vars(p) for p in cfg.plans],
        "backends": backends,
        "headline": headline(rows, tags),
        "machine": info,
        "seconds": {"build": round(t_build, 1), "measure": round(t_measure, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "configs": rows,
    }

    print(f"## {cfg.model}, {cfg.img_size}px, scores={cfg.scores}")
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, threads={threads}, "
          f"torch {info['torch']}, onnxruntime {info['onnxruntime']}, timm {info['timm']}, "
          f"cuda: {info['cuda'] or 'none'}; OMP_WAIT_POLICY={info['OMP_WAIT_POLICY']}, "
          f"ORT spinning {'on' if args.spin else 'off'}; load {info['load_before']} -> {info['load_after']}")
    print("speedup = dense latency / config latency; eff. = speedup / FLOPs ratio (goal >= 0.9); "
          "*-1t-cpu: one thread, CPU time of the calling thread")
    for stat, what in (("median", "median of all timed calls (± half the interquartile range)"),
                       ("best", "best-of (fastest call; least disturbed by other jobs on a shared CPU)")):
        for b in batches:
            print(f"\n### batch {b}, {what}\n")
            print(markdown(rows, backends, b, stat))
    print()
    if args.json_out:
        write_json_atomic(args.json_out, payload)
    print(json.dumps(payload, separators=(",", ":")))
    return payload


if __name__ == "__main__":
    main()
