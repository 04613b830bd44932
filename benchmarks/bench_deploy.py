"""Deployment benchmark: sliced + INT8 ONNX per budget, latency and k-NN cost.

Two parts, one run:

* **CIFAR ViT** (real, ``../shared/assets``): the no-search (DINO local, fisher-only)
  ranking computed on ``--grad-images`` CIFAR TRAIN images; for the dense model and the
  30 / 50 / 60 % budgets, the sliced model's pooled embedding (what k-NN uses) is exported
  to fp32 ONNX (``efx.export_onnx``) and quantized to INT8 (``efx.quantize_onnx``: static
  QDQ, per-channel weights). Calibration: a seeded subset of the images the ranking was
  computed on (the prune images); the cosine check uses other train images. k-NN (k = 20)
  of every file: train split as reference, test split as queries (the test split is only
  measured, never used to choose anything), with a paired-bootstrap 95 % interval of
  INT8 - fp32 per budget.
* **ViT-B/16 shapes** (timm ``vit_base_patch16_224``, random weights, seed 0; latency only):
  magnitude ranking; dense fp32, sliced fp32 at 30 / 50 / 60 %, static INT8 at the same
  budgets, and ``quantize_dynamic`` INT8 of the dense and the 50 % model for the static vs
  dynamic comparison. Static INT8 is calibrated on the real ImageNet sample photos of the
  assets (through the model's own preprocessing).

Latency: onnxruntime CPU EP, ``ORT_ENABLE_ALL``, idle threads sleep (``allow_spinning=0``).
Two settings: all cores (wall clock), and 1 intra-op thread timed by the calling thread's CPU
time (``time.thread_time``: counts the compute, not the waits for other jobs on a shared
machine). After one warm-up call per file, rounds call every file once in a shuffled order;
a cell is the median over rounds.

    python benchmarks/bench_deploy.py --quick      # < 2 min: CIFAR at 50 %, ViT-B widths with 2 blocks
    python benchmarks/bench_deploy.py              # the full run (benchmarks/results/deploy.md)

Writes ``deploy.md`` and ``deploy.json`` into ``--out-dir`` (default: a temporary folder
with ``--quick``, ``benchmarks/results`` otherwise) and ends by printing ONE JSON line with
the headline figures. Never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import elastic_fx as efx
from elastic_fx.data import PreprocessConfig, load_labelled, load_tensor, to_model_input
from elastic_fx.evaluate import knn_correct
from elastic_fx.passes.embedding import embedding_module
from elastic_fx.scoring.local import local_scores

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".." / "shared" / "assets"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.247, 0.243, 0.261)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def log(msg: str, t0=[time.perf_counter()]) -> None:  # noqa: B006 - a start time shared by all calls
    print(f"[{time.perf_counter() - t0[0]:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ============================================================================ timing
def _session(path: Path, threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = threads
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def time_files(files: Dict[str, Path], shape: Sequence[int], batches: Sequence[int], rounds: Dict[int, int],
               threads: int, cpu_clock: bool, seed: int = 0) -> Dict[str, Dict[int, float]]:
    """Median ms per (file, batch): interleaved shuffled rounds after one warm-up call each."""
    sessions = {k: _session(p, threads) for k, p in files.items()}
    clock = time.thread_time if cpu_clock else time.perf_counter
    out: Dict[str, Dict[int, List[float]]] = {k: {b: [] for b in batches} for k in files}
    rng = random.Random(seed)
    for b in batches:
        feed = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
        for k, s in sessions.items():
            s.run(None, {s.get_inputs()[0].name: feed})
        for _ in range(rounds[b]):
            order = list(sessions)
            rng.shuffle(order)
            for k in order:
                s = sessions[k]
                t = clock()
                s.run(None, {s.get_inputs()[0].name: feed})
                out[k][b].append(1e3 * (clock() - t))
    return {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in out.items()}


def optimized_ops(path: Path, tmp: Path) -> Dict[str, int]:
    """Operator counts of the graph onnxruntime actually runs (after its fusions)."""
    import onnx
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.optimized_model_filepath = str(tmp / f"opt_{path.name}")
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    counts: Dict[str, int] = {}
    for n in onnx.load(o.optimized_model_filepath).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic as qd
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name("pre_" + dst.name)
    quant_pre_process(str(src), str(pre))
    qd(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)


# ============================================================================ CIFAR ViT
def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0):
    """Mean of a - b (per-image correctness) and its paired-bootstrap 95 % interval."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    lo, hi = np.percentile(diff[idx].mean(1), [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def _features(path: Path, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    s = _session(path, 0)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, len(x), batch)])


def cifar_part(args, work: Path) -> Dict[str, Any]:
    import timm

    ckpt = torch.load(ASSETS / "vit-cifar" / "vit_cifar.pt", map_location="cpu", weights_only=True)
    model = timm.models.vision_transformer.VisionTransformer(**ckpt["config"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    data = load_labelled(ASSETS / "cifar10-subset" / "cifar10_subset.npz")
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(data.y_train))
    grad_idx, hold_idx = np.sort(perm[:args.grad_images]), np.sort(perm[args.grad_images:args.grad_images + 64])
    grad_x = to_model_input(data.x_train[grad_idx], CIFAR_MEAN, CIFAR_STD)
    hold_x = to_model_input(data.x_train[hold_idx], CIFAR_MEAN, CIFAR_STD)
    gm = efx.trace(model, (grad_x[:2],))
    smap = efx.discover(gm)
    t0 = time.perf_counter()
    local = local_scores(gm, grad_x, method="dino", batch_size=16, seed=args.seed, num_images=len(grad_x),
                         structures=smap, progress=False)
    scores = efx.ElasticScores.from_local(local, smap)
    log(f"CIFAR ViT: DINO local scores on {len(grad_x)} train images in {time.perf_counter() - t0:.0f}s")
    # calibration: a seeded subset of the prune images (what ElasticModel.export does by default)
    cal = grad_x[torch.randperm(len(grad_x), generator=torch.Generator().manual_seed(args.seed))[:args.calibration]]
    tr = np.arange(len(data.y_train)) if not args.knn_train else np.linspace(
        0, len(data.y_train) - 1, args.knn_train).round().astype(int)
    xtr = to_model_input(data.x_train[tr], CIFAR_MEAN, CIFAR_STD)
    xte = to_model_input(data.x_test, CIFAR_MEAN, CIFAR_STD)
    ytr, yte = data.y_train[tr], data.y_test
    em = efx.ElasticModel(gm, scores)
    rows, files = [], {}
    for s in (0.0, *args.sparsities):
        if s == 0.0 and args.quick:
            continue  # --quick: the 50 % budget only
        small = em.at(s) if s > 0 else gm
        emb = embedding_module(small, smap)
        stats = efx.achieved(smap, em.keep(s))
        fp32, int8 = work / f"cifar_{int(s * 100):02d}.onnx", work / f"cifar_{int(s * 100):02d}.int8.onnx"
        efx.export_onnx(emb, fp32, grad_x[:2])
        q = efx.quantize_onnx(fp32, int8, cal, hold_x)
        ok32 = knn_correct(_features(fp32, xtr), ytr, _features(fp32, xte), yte, k=20)
        ok8 = knn_correct(_features(int8, xtr), ytr, _features(int8, xte), yte, k=20)
        d, lo, hi = paired_interval(ok8, ok32, args.bootstrap, args.seed)
        files[f"fp32 {s:.0%}"], files[f"int8 {s:.0%}"] = fp32, int8
        rows.append({"sparsity": s, "achieved": float(stats["sparsity"]), "params": int(stats["params"]),
                     "knn_fp32": float(ok32.mean()), "knn_int8": float(ok8.mean()), "int8_minus_fp32": d,
                     "ci95": [lo, hi], "cosine_mean": q.cosine_mean, "cosine_min": q.cosine_min,
                     "bytes_fp32": fp32.stat().st_size, "bytes_int8": int8.stat().st_size,
                     "float_ops": q.float_ops, "quantized_ops": q.quantized_ops})
        log(f"CIFAR {s:.0%}: k-NN fp32 {ok32.mean():.4f} int8 {ok8.mean():.4f} ({100 * d:+.1f} "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}]), cosine {q.cosine_mean:.4f}")
    shape = tuple(grad_x.shape[1:])
    lat = {"all_cores_wall": time_files(files, shape, (1, 16), {1: args.rounds_b1, 16: args.rounds_b16}, 0, False),
           "one_thread_cpu": time_files(files, shape, (1, 16), {1: args.rounds_b1, 16: args.rounds_b16}, 1, True)}
    return {"model": (f"timm ViT (img 32, patch 4, dim 192, depth 6, 6 heads) trained on the CIFAR-10 subset; "
                      f"fisher-only (DINO local scores, no search) ranking on {len(grad_x)} train images"),
            "calibration_images": len(cal), "holdout_images": len(hold_x), "knn_train": len(ytr),
            "knn_test": len(yte), "rows": rows, "latency_ms": lat}


# ============================================================================ ViT-B/16 shapes
def vitb_part(args, work: Path) -> Dict[str, Any]:
    import timm

    torch.manual_seed(args.seed)
    depth = 2 if args.quick else 12
    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    gm = efx.trace(model, (x,))
    smap = efx.discover(gm)
    scores = efx.ElasticScores.from_local(local_scores(gm, None, method="magnitude", structures=smap,
                                                       progress=False), smap)
    em = efx.ElasticModel(gm, scores)
    photos = ASSETS / "imagenet-sample"
    pre = PreprocessConfig((224, 224), IMAGENET_MEAN, IMAGENET_STD)
    images = load_tensor(photos, pre, args.vitb_calibration + 8, seed=args.seed)
    cal, hold = images[8:], images[:8]
    files: Dict[str, Path] = {}
    gflops: Dict[str, float] = {}
    cos: Dict[str, float] = {}
    ops: Dict[str, Any] = {}
    for s in (0.0, *args.sparsities):
        t0 = time.perf_counter()
        small = em.at(s) if s > 0 else gm
        tag = f"{s:.0%}"
        fp32 = work / f"vitb_{int(s * 100):02d}.onnx"
        efx.export_onnx(small, fp32, x[:1], check_batch_sizes=(1, 2))
        files[f"fp32 {tag}"] = fp32
        gflops[tag] = float(efx.achieved(smap, em.keep(s))["gflops"])
        if s > 0 or not args.quick:  # static INT8 of every budget, the dense model too (not with --quick)
            q = efx.quantize_onnx(fp32, work / f"vitb_{int(s * 100):02d}.int8.onnx", cal, hold,
                                  config=efx.QuantConfig(min_cosine=0.0))
            files[f"int8 static {tag}"] = Path(q.path)
            cos[f"int8 static {tag}"] = q.cosine_mean
            ops[f"int8 static {tag}"] = {"quantized": q.quantized_ops, "float": q.float_ops}
        if s == 0.5 and not args.quick:  # activations int8 (S8S8) instead of the default uint8 (U8S8)
            q = efx.quantize_onnx(fp32, work / "vitb_50.s8s8.onnx", cal, hold,
                                  config=efx.QuantConfig(activation_type="int8", min_cosine=0.0))
            files["int8 static S8S8 50%"] = Path(q.path)
            cos["int8 static S8S8 50%"] = q.cosine_mean
        if s == 0.5 or (s == 0.0 and not args.quick):
            dyn = work / f"vitb_{int(s * 100):02d}.dyn.onnx"
            quantize_dynamic(fp32, dyn)
            files[f"int8 dynamic {tag}"] = dyn
        log(f"ViT-B {tag}: exported and quantized in {time.perf_counter() - t0:.0f}s")
    kernels = {k: optimized_ops(p, work) for k, p in files.items() if k in ("int8 static 50%", "int8 dynamic 50%")}
    shape = (3, 224, 224)
    rounds = {1: args.rounds_b1, 16: args.rounds_b16}
    lat = {"all_cores_wall": time_files(files, shape, (1, 16), rounds, 0, False),
           "one_thread_cpu": time_files(files, shape, (1, 16), rounds, 1, True)}
    log("ViT-B latency done")
    return {"model": f"timm vit_base_patch16_224{' (2 blocks: --quick)' if args.quick else ''}, random weights, "
                     "magnitude ranking", "depth": depth, "calibration_images": len(cal), "holdout_images": len(hold),
            "gflops": gflops, "cosine": cos, "ops": ops, "ort_kernels": kernels, "latency_ms": lat}


# ============================================================================ report
def _speedups(lat: Dict[str, Dict[int, float]], base: str) -> Dict[str, Dict[int, float]]:
    return {k: {b: lat[base][b] / v for b, v in d.items()} for k, d in lat.items()}


def headline(result: Dict[str, Any]) -> Dict[str, Any]:
    h: Dict[str, Any] = {"bench": "deploy", "quick": result["quick"]}
    vb = result.get("vitb")
    if vb:
        for setting, lat in vb["latency_ms"].items():
            sp = _speedups(lat, "fp32 0%")
            h[f"vitb_{setting}_b16_speedup_int8_static_50"] = round(sp.get("int8 static 50%", {}).get(16, float("nan")), 2)
            h[f"vitb_{setting}_b16_speedup_int8_dynamic_50"] = round(sp.get("int8 dynamic 50%", {}).get(16, float("nan")), 2)
            h[f"vitb_{setting}_b16_speedup_fp32_50"] = round(sp.get("fp32 50%", {}).get(16, float("nan")), 2)
    cf = result.get("cifar")
    if cf:
        for r in cf["rows"]:
            h[f"cifar_knn_int8_minus_fp32_{int(r['sparsity'] * 100)}"] = round(100 * r["int8_minus_fp32"], 2)
    return h


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(out: Path, result: Dict[str, Any]) -> None:
    import onnxruntime
    import timm

    env = result["env"]
    md = ["# Deployment: sliced + INT8 ONNX per budget", "",
          "`benchmarks/bench_deploy.py` (see its docstring for the protocol). Full figures: `deploy.json`.", "",
          "## Machine", "",
          f"- Date: {env['date']}; CPU: \"{env['cpu']}\" ({env['cpus']} logical CPUs, shared with other sessions' "
          f"jobs; load average {env['load_start']} at the start, {env['load_end']} at the end).",
          f"- Python {platform.python_version()}, torch {torch.__version__} (CPU), onnxruntime {onnxruntime.__version__} "
          f"(CPUExecutionProvider), timm {timm.__version__}, elastic_fx {efx.__version__}.",
          f"- Latency: median over rounds ({result['args']['rounds_b1']} at batch 1, {result['args']['rounds_b16']} at "
          "batch 16). `all cores` = wall clock with onnxruntime's default threads; `1 thread CPU` = one intra-op "
          "thread timed by the calling thread's CPU time (robust to other jobs on the cores).", ""]
    vb = result.get("vitb")
    if vb:
        md += [f"## ViT-B/16 shapes ({vb['model']}): onnxruntime CPU latency", ""]
        for setting, lat in vb["latency_ms"].items():
            sp = _speedups(lat, "fp32 0%")
            md += [f"**{setting.replace('_', ' ')}**", "", "| file | ms @ 1 | ms @ 16 | speedup @ 1 | speedup @ 16 |",
                   "|---|---:|---:|---:|---:|"]
            for k in lat:
                md.append(f"| {k} | {lat[k][1]:.1f} | {lat[k][16]:.1f} | {sp[k][1]:.2f}x | {sp[k][16]:.2f}x |")
            md.append("")
        md += ["Cosine similarity (int8 vs fp32 outputs, held-out photos): " + ", ".join(
            f"{k}: {v:.4f}" for k, v in vb["cosine"].items()), ""]
        if vb.get("ort_kernels"):
            md += ["Kernels onnxruntime runs after its graph fusions (50 % budget):", ""]
            for k, v in vb["ort_kernels"].items():
                md.append(f"- {k}: " + ", ".join(f"{op} x{n}" for op, n in v.items()))
            md.append("")
    cf = result.get("cifar")
    if cf:
        md += [f"## CIFAR ViT ({cf['model']}): k-NN of fp32 and INT8 files", "",
               f"k-NN k = 20 on the pooled embedding, {cf['knn_train']} train images as reference, {cf['knn_test']} "
               f"test images; INT8 calibrated on {cf['calibration_images']} of the prune images, cosine on "
               f"{cf['holdout_images']} other train images. Interval: paired bootstrap 95 % "
               f"({result['args']['bootstrap']} resamples of the test images).", "",
               "| budget | achieved | k-NN fp32 | k-NN int8 | int8 - fp32 (points) [95 %] | cosine mean / min | MB fp32 / int8 |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for r in cf["rows"]:
            lo, hi = r["ci95"]
            md.append(f"| {r['sparsity']:.0%} | {r['achieved']:.3f} | {100 * r['knn_fp32']:.1f} | "
                      f"{100 * r['knn_int8']:.1f} | {100 * r['int8_minus_fp32']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                      f"| {r['cosine_mean']:.4f} / {r['cosine_min']:.4f} | {r['bytes_fp32'] / 1e6:.2f} / "
                      f"{r['bytes_int8'] / 1e6:.2f} |")
        md += ["", "Operators that stay in float (50 % file): " + ", ".join(
            f"{k} x{v}" for k, v in next(r for r in cf["rows"] if r["sparsity"] == 0.5)["float_ops"].items())
            if any(r["sparsity"] == 0.5 for r in cf["rows"]) else "", ""]
        for setting, lat in cf["latency_ms"].items():
            sp = _speedups(lat, "fp32 0%" if "fp32 0%" in lat else next(iter(lat)))
            md += [f"CIFAR ViT latency, **{setting.replace('_', ' ')}**:", "",
                   "| file | ms @ 1 | ms @ 16 | speedup @ 16 |", "|---|---:|---:|---:|"]
            md += [f"| {k} | {lat[k][1]:.2f} | {lat[k][16]:.2f} | {sp[k][16]:.2f}x |" for k in lat] + [""]
    md += result.get("notes", [])
    (out / "deploy.md").write_text("\n".join(md) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    global ASSETS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="< 2 min: CIFAR at 50 %%, ViT-B widths with 2 blocks")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--sparsities", type=float, nargs="+", default=None)
    p.add_argument("--grad-images", type=int, default=None)
    p.add_argument("--calibration", type=int, default=128, help="CIFAR calibration images (of the prune images)")
    p.add_argument("--vitb-calibration", type=int, default=None, help="ViT-B calibration photos")
    p.add_argument("--knn-train", type=int, default=None, help="k-NN reference images (0: all)")
    p.add_argument("--rounds-b1", type=int, default=None)
    p.add_argument("--rounds-b16", type=int, default=None)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--skip-vitb", action="store_true")
    p.add_argument("--assets", default=None, help="the shared assets folder (default ../shared/assets)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ASSETS = Path(args.assets) if args.assets else ASSETS
    q = args.quick
    args.sparsities = args.sparsities or ([0.5] if q else [0.3, 0.5, 0.6])
    args.grad_images = args.grad_images or (32 if q else 256)
    args.calibration = min(args.calibration, args.grad_images)
    args.vitb_calibration = args.vitb_calibration or (8 if q else 32)
    args.knn_train = (500 if q else 0) if args.knn_train is None else args.knn_train
    args.rounds_b1 = args.rounds_b1 or (3 if q else 10)
    args.rounds_b16 = args.rounds_b16 or (2 if q else 4)
    if not (ASSETS / "vit-cifar" / "vit_cifar.pt").is_file():
        print(f"bench_deploy: the real assets are not at {ASSETS} (see benchmarks/README); nothing to measure",
              file=sys.stderr)
        return {}
    out = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp()) if q else REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu(), "cpus": os.cpu_count(),
           "load_start": " / ".join(f"{v:.2f}" for v in os.getloadavg())}
    result: Dict[str, Any] = {"quick": q, "args": vars(args), "env": env}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["cifar"] = cifar_part(args, work)
        if not args.skip_vitb:
            result["vitb"] = vitb_part(args, work)
    env["load_end"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    env["seconds"] = round(time.perf_counter() - t0, 1)
    result["headline"] = headline(result)
    (out / "deploy.json").write_text(json.dumps(result, indent=1, default=str))
    write_report(out, result)
    print(json.dumps(result["headline"]))
    return result


if __name__ == "__main__":
    main()
