"""Search benchmark: batched candidate scoring (elastic_fx.passes.mask) against per-pair slicing.

The search scores P (candidate, sparsity) pairs by the pooled embeddings of each pair's
sub-network on the same images. Timed side by side in one run, on the same model,
images and keep-masks:

* ``reference`` - what the paper's code does, per pair and sequentially:
  ``copy.deepcopy(gm)`` + ``efx.slice`` + forward of the sliced embedding graph
  (the time is also split into copy+slice and forward);
* ``masked``    - ``masked_embeddings(build_masked(gm, smap), images, keeps)``: all pairs
  in batched forwards; masked attention heads are skipped (``use_kernel=True``: the
  Triton kernel on CUDA, the gathering PyTorch reference on the CPU);
* ``masked_dense_attn`` - the same with ``use_kernel=False``: attention computed for
  every head, heads masked at the out-projection only (shows what skipping heads buys).

Building the MaskedModel (once per search) is timed separately and not included in
the per-pair rate. Every result is checked against the reference embeddings.

Keep-masks: per pair a random fraction in [0.35, 0.9] of each block's heads and
neurons (random subsets), i.e. roughly the 10-60 % parameter sparsities of the search.

    python benchmarks/bench_search.py --quick    # CPU-sized: ViT-Ti/16 widths, depth 6, 112 px, 6 pairs, 64 images
    python benchmarks/bench_search.py            # ViT-B/16, 16 pairs, 256 images (bf16 on a GPU)
    python benchmarks/bench_search.py --paper    # GPU: the paper's whole configuration timed end to end
                                                 # (1000 images x 12 crops, 50 generations x lambda x 4
                                                 # sparsities, 1000 fitness images, ViT-B/16)

Also reported: the achieved FLOP/s of the useful work (each pair's sliced-model FLOPs x
images, paper Table 7 counting) as a fraction of the device's measured matmul peak.

Notes on FFN gathering (computing only the kept neurons with per-pair gathered weights):
not implemented in the pass; see the pass's module docstring for what was measured.

Prints a small table, then ONE JSON line with the headline figures. Never run by pytest.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from typing import Dict, List

import torch

import elastic_fx as efx
from elastic_fx.passes.embedding import embedding_module
from elastic_fx.passes.mask import build_masked
from elastic_fx.search.evaluate import masked_embeddings


QUICK_SIZE = 112


def _model(quick: bool) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    if quick:  # ViT-Ti/16 widths, half the depth, 112 px (50 tokens): the reference's slicing dominates
        return VisionTransformer(img_size=QUICK_SIZE, patch_size=16, embed_dim=192, depth=6, num_heads=3, num_classes=10)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000)


def _peak_flops(device: torch.device) -> float:
    """Measured dense matmul throughput (bf16 on a GPU, fp32 on a CPU): the 'peak' we compare to."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _paper_run(device: torch.device) -> Dict:
    """The paper's configuration end to end (GPU only): local scores + 50 generations."""
    import timm

    from elastic_fx.pipeline import SearchConfig, prune

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(device)
    images = torch.randint(0, 255, (1000, 3, 256, 256), dtype=torch.uint8)
    t0 = time.perf_counter()
    scores = prune(model, images, iterations=50, sparsities=(0.1, 0.3, 0.5, 0.6),
                   config=SearchConfig(num_images=1000, num_fitness_images=1000), device=str(device))
    return {"paper_config_seconds": round(time.perf_counter() - t0, 1),
            "local_seconds": scores.config["local_seconds"], "search_seconds": scores.config["search_seconds"]}


def _keeps(smap, pairs: int, seed: int = 0) -> List[Dict]:
    g = torch.Generator().manual_seed(seed)
    keeps = []
    for _ in range(pairs):
        keep = {}
        for b in smap.blocks:
            entry = {}
            for kind, size in (("heads", b.attention.num_heads if b.attention else 0),
                               ("neurons", b.mlp.hidden_features if b.mlp and b.mlp.prunable else 0)):
                if size:
                    frac = 0.35 + 0.55 * torch.rand((), generator=g).item()
                    n = max(1, round(frac * size))
                    entry[kind] = torch.randperm(size, generator=g)[:n].tolist()
            keep[b.index] = entry
        keeps.append(keep)
    return keeps


def _reference(gm, smap, images, keeps, batch_size) -> Dict:
    """Per pair: deepcopy + slice + forward, sequentially."""
    t_slice = t_fwd = 0.0
    outs = []
    for keep in keeps:
        t0 = time.perf_counter()
        small = efx.slice(copy.deepcopy(gm), smap, keep)
        emb = embedding_module(small, smap)
        t1 = time.perf_counter()
        with torch.inference_mode():
            outs.append(torch.cat([emb(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).float().cpu())
        t_fwd += time.perf_counter() - t1
        t_slice += t1 - t0
    return {"seconds": t_slice + t_fwd, "slice_s": t_slice, "forward_s": t_fwd, "out": torch.stack(outs)}


def _masked(gm, smap, images, keeps, batch_size, pair_chunk, repeats=3) -> Dict[str, Dict]:
    """Both masked variants, built once, then timed interleaved; the fastest run counts."""
    runs = {}
    for name, use_kernel in (("masked", True), ("masked_dense_attn", False)):
        t0 = time.perf_counter()
        model = build_masked(gm, smap, use_kernel=use_kernel)
        runs[name] = {"model": model, "build_s": time.perf_counter() - t0, "seconds": float("inf")}
        masked_embeddings(model, images[:1], keeps[:1], batch_size=1)  # warm-up
    for _ in range(repeats):  # interleaved, fastest of a few: shared machines are noisy
        for r in runs.values():
            t0 = time.perf_counter()
            r["out"] = masked_embeddings(r["model"], images, keeps, batch_size=batch_size, pair_chunk=pair_chunk,
                                         device=images.device).float().cpu()
            r["seconds"] = min(r["seconds"], time.perf_counter() - t0)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (< 2 min)")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pair-chunk", type=int, default=None)
    ap.add_argument("--paper", action="store_true", help="also time the paper's whole configuration (GPU)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs = args.pairs or (6 if args.quick else 16)
    n_images = args.images or (64 if args.quick else 256)
    size = QUICK_SIZE if args.quick else 224

    model = _model(args.quick).eval().to(dev)
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
    gm = efx.trace(model, (images[:2],))
    smap = efx.discover(gm)
    keeps = _keeps(smap, pairs)
    sparsity = sum(smap.sparsity(k) for k in keeps) / len(keeps)

    ref = _reference(gm, smap, images, keeps, args.batch_size)
    runs = _masked(gm, smap, images, keeps, args.batch_size, args.pair_chunk)
    scale = ref["out"].abs().max().item()
    rows = [("reference (deepcopy+slice+forward)", ref["seconds"], None)]
    for name, r in runs.items():
        err = (r["out"] - ref["out"]).abs().max().item() / scale
        if err > 1e-4:
            raise SystemExit(f"{name} disagrees with the sliced reference: max relative error {err:.2e}")
        r["max_rel_err"] = err
        rows.append((name, r["seconds"], err))

    useful = sum(smap.flops(k) for k in keeps) * n_images  # what the sliced models compute
    peak = _peak_flops(dev)
    achieved = useful / runs["masked"]["seconds"]
    device = (torch.cuda.get_device_name() if dev.type == "cuda"
              else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"model: {'ViT-Ti/16 (depth 6)' if args.quick else 'ViT-S/16'} random weights, {pairs} pairs, {n_images} images "
          f"{size}px, batch {args.batch_size}, mean sparsity {sparsity:.2f}, device {device}")
    print(f"{'variant':40s} {'seconds':>8s} {'pairs/s':>8s} {'vs ref':>7s} {'max rel err':>12s}")
    for name, sec, err in rows:
        print(f"{name:40s} {sec:8.2f} {pairs / sec:8.3f} {ref['seconds'] / sec:6.1f}x "
              f"{'' if err is None else f'{err:.1e}':>12s}")
    print(f"reference split: copy+slice {ref['slice_s']:.2f} s, forward {ref['forward_s']:.2f} s; "
          f"MaskedModel build (once per search) {runs['masked']['build_s']:.2f} s")
    print(f"useful work: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of the measured matmul peak "
          f"({peak / 1e9:.0f} GFLOP/s)")
    result = {
        "benchmark": "search",
        "quick": args.quick,
        "device": device,
        "pairs": pairs,
        "images": n_images,
        "mean_sparsity": round(sparsity, 3),
        "reference_pairs_per_s": round(pairs / ref["seconds"], 4),
        "reference_forward_only_pairs_per_s": round(pairs / ref["forward_s"], 4),
        "masked_pairs_per_s": round(pairs / runs["masked"]["seconds"], 4),
        "masked_dense_attn_pairs_per_s": round(pairs / runs["masked_dense_attn"]["seconds"], 4),
        "speedup_vs_reference": round(ref["seconds"] / runs["masked"]["seconds"], 2),
        "speedup_vs_reference_forward_only": round(ref["forward_s"] / runs["masked"]["seconds"], 2),
        "masked_build_s": round(runs["masked"]["build_s"], 2),
        "max_rel_err": max(r["max_rel_err"] for r in runs.values()),
        "useful_gflops_per_s": round(achieved / 1e9, 2),
        "fraction_of_peak": round(achieved / peak, 4),
    }
    if args.paper:
        if dev.type != "cuda":
            raise SystemExit("--paper times the paper's configuration on a GPU; none is available here")
        result.update(_paper_run(dev))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
