"""Search benchmark: batched candidate scoring (elastic_fx.passes.mask) against per-pair slicing.

The search scores P (candidate, sparsity) pairs by the pooled embeddings of each pair's
sub-network on the same images. Timed side by side in one run, on the same model,
images and keep-masks:

* ``reference`` - what the paper's code does, per pair and sequentially:
  ``copy.deepcopy(gm)`` + ``efx.slice`` + forward of the sliced embedding graph
  (the time is also split into copy+slice and forward);
* ``masked``    - ``masked_embeddings(build_masked(gm, smap), images, keeps)``: all pairs
  in batched forwards, only the kept work computed: each pair's projections on its kept
  heads and neurons (gathered weights, one GEMM per pair: ``gather=True``), attention on its
  kept heads (``use_kernel=True``: the Triton kernel on CUDA, the gathering PyTorch
  reference on the CPU);
* ``masked_no_gather`` - ``gather=False``: every projection at full width, removed heads
  and neurons masked at the out-projection input (the previous default);
* ``masked_dense_attn`` - ``use_kernel=False, gather=False``: attention for every head too.

Building the MaskedModel (once per search) is timed separately and not included in
the per-pair rate. Every result is checked against the reference embeddings.

Keep-masks: per pair a random fraction in [0.35, 0.9] of each block's heads and
neurons (random subsets), i.e. roughly the 10-60 % parameter sparsities of the search.

    python benchmarks/bench_search.py --quick    # CPU-sized: ViT-Ti/16 widths, depth 6, 112 px, 6 pairs, 64 images
    python benchmarks/bench_search.py            # ViT-B/16, 8 pairs, 64 images (bf16 on a GPU); the
                                                 # reference slices 2 of the pairs (its rate is per pair)
    python benchmarks/bench_search.py --paper    # GPU: the paper's whole configuration timed end to end
                                                 # (1000 images x 12 crops, 50 generations x lambda x 4
                                                 # sparsities, 1000 fitness images, ViT-B/16)

Also reported: the achieved FLOP/s of the useful work (each pair's sliced-model FLOPs x
images, paper Table 7 counting) as a fraction of the device's measured matmul peak, and
``executed_flops_ratio``: the FLOPs the masked forward executes over the FLOPs of the
sliced sub-networks it stands for, both counted by ``torch.utils.flop_counter`` on the CPU
path (matmuls, convolutions and attention; see :func:`executed_flops_ratio`).

Correctness: every variant is compared with the sliced reference; the tolerance follows
the dtype the masked forward ran in (:data:`MAX_REL_ERR`: bf16 weights on a GPU round
weights and activations to 8 bits of mantissa, so they cannot meet the fp32 bound).

Prints a small table, then ONE JSON line with the headline figures. Never run by pytest.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import elastic_fx as efx
from elastic_fx._precision import compute_dtype
from elastic_fx.passes.embedding import embedding_module
from elastic_fx.passes.mask import build_masked
from elastic_fx.search.evaluate import masked_embeddings


QUICK_SIZE = 112

#: Largest max-abs error relative to the reference's largest value, by the masked forward's dtype.
MAX_REL_ERR = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


#: flop_counter has formulas for the CUDA SDPA kernels but not for the CPU one.
_FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def count_flops(fn) -> int:
    """FLOPs ``fn()`` executes, by ``torch.utils.flop_counter`` (CPU SDPA included)."""
    with FlopCounterMode(display=False, custom_mapping=_FLOP_MAPPING) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def executed_flops_ratio(gm, smap, keeps: List[Dict], images: torch.Tensor, masked=None) -> Dict[str, float]:
    """FLOPs the masked forward executes for ``keeps`` over those of the sliced sub-networks.

    Both sides are counted the same way, on the CPU (fp32): the masked forward of all pairs
    on ``images`` once, and each pair's physically sliced embedding graph on ``images``.
    1.0 means the search computes only the kept work.
    """
    images = images.cpu()
    masked = masked if masked is not None else build_masked(gm, smap)
    executed = count_flops(lambda: masked_embeddings(masked, images, keeps, batch_size=len(images),
                                                     pair_chunk=len(keeps), device="cpu"))
    sliced = 0
    for keep in keeps:
        small = embedding_module(efx.slice(gm.cpu(), smap, keep), smap)
        sliced += count_flops(lambda: small(images))
    return {"executed_flops": executed, "sliced_flops": sliced, "ratio": executed / sliced}


#: model kind -> (image size, timm VisionTransformer kwargs)
MODELS = {
    "tiny": (32, dict(patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)),  # rehearsals only
    # ViT-Ti/16 widths, half the depth, 112 px (50 tokens): the reference's slicing dominates
    "quick": (QUICK_SIZE, dict(patch_size=16, embed_dim=192, depth=6, num_heads=3, num_classes=10)),
    "vitb": (224, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000)),
}
MODEL_NAMES = {"tiny": "ViT tiny (48 wide, depth 2)", "quick": "ViT-Ti/16 (depth 6)", "vitb": "ViT-B/16"}


def _model(quick: bool | str) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    kind = quick if isinstance(quick, str) else ("quick" if quick else "vitb")
    torch.manual_seed(0)
    size, kw = MODELS[kind]
    return VisionTransformer(img_size=size, **kw)


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


def _masked(gm, smap, images, keeps, batch_size, pair_chunk, repeats=2) -> Dict[str, Dict]:
    """Both masked variants, built once, then timed interleaved; the fastest run counts."""
    runs = {}
    for name, use_kernel, gather in (("masked", True, True), ("masked_no_gather", True, False),
                                     ("masked_dense_attn", False, False)):
        t0 = time.perf_counter()
        model = build_masked(gm, smap, use_kernel=use_kernel, gather=gather)
        runs[name] = {"model": model, "build_s": time.perf_counter() - t0, "seconds": float("inf")}
        masked_embeddings(model, images[:1], keeps[:1], batch_size=1)  # warm-up
    for _ in range(repeats):  # interleaved, fastest of a few: shared machines are noisy
        for r in runs.values():
            t0 = time.perf_counter()
            r["out"] = masked_embeddings(r["model"], images, keeps, batch_size=batch_size, pair_chunk=pair_chunk,
                                         device=images.device).float().cpu()
            r["seconds"] = min(r["seconds"], time.perf_counter() - t0)
    return runs


def run(quick: bool | str = False, pairs: Optional[int] = None, n_images: Optional[int] = None, batch_size: int = 8,
        pair_chunk: Optional[int] = None, ref_pairs: int = 2, flops_pairs: int = 2, repeats: int = 2,
        device: Optional[str] = None, log=print) -> Dict:
    """The whole benchmark; returns the JSON dict (``log`` gets the table lines).

    ``quick``: False (ViT-B/16), True (ViT-Ti widths, depth 6) or a key of :data:`MODELS`;
    ``"tiny"`` also counts FLOPs on the tiny model.
    """
    kind = quick if isinstance(quick, str) else ("quick" if quick else "vitb")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pairs = pairs or (8 if kind == "vitb" else 6)
    n_images = n_images or 64
    size = MODELS[kind][0]
    ref_pairs = max(1, min(ref_pairs, pairs))

    model = _model(kind).eval().to(dev)
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
    gm = efx.trace(model, (images[:2],))
    smap = efx.discover(gm)
    keeps = _keeps(smap, pairs)
    sparsity = sum(smap.sparsity(k) for k in keeps) / len(keeps)

    ref = _reference(gm, smap, images, keeps[:ref_pairs], batch_size)
    runs = _masked(gm, smap, images, keeps, batch_size, pair_chunk, repeats=repeats)
    dtype = compute_dtype(dev)  # what masked_embeddings computes in by default: bf16 weights on CUDA
    scale = ref["out"].abs().max().item()
    ref_pair_s = ref["seconds"] / ref_pairs
    rows = [("reference (deepcopy+slice+forward)", ref_pair_s, None)]
    for name, r in runs.items():
        err = (r["out"][:ref_pairs] - ref["out"]).abs().max().item() / scale
        if err > MAX_REL_ERR[dtype]:
            raise SystemExit(f"{name} disagrees with the sliced reference: max relative error {err:.2e} "
                             f"> {MAX_REL_ERR[dtype]:.0e} ({str(dtype).replace('torch.', '')})")
        r["max_rel_err"] = err
        rows.append((name, r["seconds"] / pairs, err))

    # FLOPs: always on the CPU, with the small model (slicing is what costs), a few pairs and images
    fkind = "tiny" if kind == "tiny" else "quick"
    fmodel = _model(fkind).eval()
    fimages = torch.randn(2, 3, MODELS[fkind][0], MODELS[fkind][0], generator=torch.Generator().manual_seed(2))
    fgm = efx.trace(fmodel, (fimages,))
    fsmap = efx.discover(fgm)
    flops = executed_flops_ratio(fgm, fsmap, _keeps(fsmap, flops_pairs, seed=3), fimages)

    useful = sum(smap.flops(k) for k in keeps) * n_images  # what the sliced models compute
    peak = _peak_flops(dev)
    achieved = useful / runs["masked"]["seconds"]
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    log(f"model: {MODEL_NAMES[kind]} random weights, {pairs} pairs "
        f"(reference: {ref_pairs}), {n_images} images {size}px, batch {batch_size}, mean sparsity {sparsity:.2f}, "
        f"device {device_name}, masked dtype {str(dtype).replace('torch.', '')}")
    log(f"{'variant':40s} {'s/pair':>8s} {'pairs/s':>8s} {'vs ref':>7s} {'max rel err':>12s}")
    for name, sec, err in rows:
        log(f"{name:40s} {sec:8.3f} {1 / sec:8.3f} {ref_pair_s / sec:6.1f}x "
            f"{'' if err is None else f'{err:.1e}':>12s}")
    log(f"reference split per pair: copy+slice {ref['slice_s'] / ref_pairs:.2f} s, forward "
        f"{ref['forward_s'] / ref_pairs:.2f} s; MaskedModel build (once per search) {runs['masked']['build_s']:.2f} s")
    log(f"useful work: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of the measured matmul peak "
        f"({peak / 1e9:.0f} GFLOP/s)")
    log(f"executed FLOPs / sliced FLOPs (flop_counter, CPU, {MODEL_NAMES[fkind]}, {flops_pairs} pairs): "
        f"{flops['ratio']:.3f}")
    masked_pair_s = runs["masked"]["seconds"] / pairs
    return {
        "benchmark": "search",
        "model": MODEL_NAMES[kind],
        "device": device_name,
        "masked_dtype": str(dtype).replace("torch.", ""),
        "pairs": pairs,
        "reference_pairs": ref_pairs,
        "images": n_images,
        "mean_sparsity": round(sparsity, 3),
        "reference_pairs_per_s": round(1 / ref_pair_s, 4),
        "reference_forward_only_pairs_per_s": round(ref_pairs / ref["forward_s"], 4),
        "masked_pairs_per_s": round(1 / masked_pair_s, 4),
        "masked_no_gather_pairs_per_s": round(pairs / runs["masked_no_gather"]["seconds"], 4),
        "masked_dense_attn_pairs_per_s": round(pairs / runs["masked_dense_attn"]["seconds"], 4),
        "speedup_vs_reference": round(ref_pair_s / masked_pair_s, 2),
        "speedup_vs_reference_forward_only": round(ref["forward_s"] / ref_pairs / masked_pair_s, 2),
        "masked_build_s": round(runs["masked"]["build_s"], 2),
        "max_rel_err": max(r["max_rel_err"] for r in runs.values()),
        "max_rel_err_bound": MAX_REL_ERR[dtype],
        "useful_gflops_per_s": round(achieved / 1e9, 2),
        "fraction_of_peak": round(achieved / peak, 4),
        "executed_flops_ratio": round(flops["ratio"], 4),
        "executed_flops_model": MODEL_NAMES[fkind],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (< 2 min)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs scored by the masked forward (default 8; quick 6)")
    ap.add_argument("--ref-pairs", type=int, default=2, help="of those, pairs the reference slices (default 2)")
    ap.add_argument("--images", type=int, default=None, help="images (default 64)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pair-chunk", type=int, default=None)
    ap.add_argument("--paper", action="store_true", help="also time the paper's whole configuration (GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run(args.quick, args.pairs, args.images, args.batch_size, args.pair_chunk, args.ref_pairs)
    if args.paper:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type != "cuda":
            raise SystemExit("--paper times the paper's configuration on a GPU; none is available here")
        result.update(_paper_run(dev))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
