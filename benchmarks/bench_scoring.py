"""Benchmark of the local-score gradient pass (elastic_fx.scoring.local.local_scores).

What is timed, side by side in one run, on one traced model:

* the whole pass (multi-crop sampling, forward, backward, squared-gradient accumulation,
  the per-batch NaN check) in images/s, for each variant:
    - ``fp32 / kernel``  : float32, ``backend="auto"`` (Triton on CUDA, PyTorch on CPU)
    - ``fp32 / torch``   : float32, ``backend="torch"`` (the PyTorch per-slice formulation)
    - ``bf16 / kernel``, ``bf16 / torch``: forward and backward under ``torch.autocast(bfloat16)``
      (what ``local_scores`` does by default on CUDA; the fp32 variants ask for ``torch.float32``)
  (on the CPU, ``--quick``: fp32 only, and the two backends are the same PyTorch code);
* the accumulation alone, on one batch's real gradients of every head and neuron:
    - ``kernel``: one ``sqgrad_accumulate_many`` call (what the pass does)
    - ``plain loop``: per ParamSlice, ``(g.float() ** 2)`` summed over the other dims,
      gathered by the slice's index and added (how one writes it without the kernel).

Defaults follow the paper: DINO loss with 2 global + 10 local crops (12 per image),
batches of 16 images, 1000 images; ViT-B/16 (random weights: speed does not depend on
them; nothing is downloaded). The goal from the issue: <= 30 s for 1000 images x 12 crops
on a GPU.

    python benchmarks/bench_scoring.py            # CUDA: ViT-B/16, 1000 images
    python benchmarks/bench_scoring.py --quick    # CPU: a ViT-Ti-like model at 96 px, 8 images
    ... --per-sample                              # also mode="per-sample": ghost norms vs a loop

Prints a table, then ONE JSON line with the headline figures. Never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Callable, Dict, List, Optional

import torch

import elastic_fx as efx
from elastic_fx.data import SyntheticSource
from elastic_fx.kernels.sqgrad import SqgradJob, sqgrad_accumulate_many
from elastic_fx.scoring.dino import DinoConfig
from elastic_fx.scoring._groups import scored_groups, scored_parameters
from elastic_fx.scoring.local import local_scores


def build_model(quick: bool) -> torch.nn.Module:
    import timm

    if quick:  # ViT-Ti width and heads, fewer blocks, small images: CPU-sized
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, depth=6, num_classes=0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def accumulation_timings(gm, smap, device: torch.device, batch_crops: int, size: int, repeats: int,
                         backends: List[str]) -> Dict[str, float]:
    """Seconds per accumulation of one batch's gradients: the kernel vs a plain per-slice loop."""
    groups = scored_groups(smap)
    params = scored_parameters(gm, groups)
    names = list(params)
    x = torch.randn(batch_crops, 3, size, size, device=device)
    loss = gm(x).float().square().mean()
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
    outs = [torch.zeros(g.size, dtype=torch.float32, device=device) for g in groups]
    index = {id(s): s.index.to(device) for g in groups for s in g.slices}
    jobs = [SqgradJob(grads[s.name], s.dim, index[id(s)], out) for g, out in zip(groups, outs) for s in g.slices]

    def plain() -> None:
        for g, out in zip(groups, outs):
            for s in g.slices:
                sq = grads[s.name].float() ** 2
                others = [d for d in range(sq.dim()) if d != s.dim]
                per = sq.sum(dim=others) if others else sq
                out += per[index[id(s)]].sum(dim=1)

    result = {"plain loop": time_call(plain, device, repeats)}
    for backend in backends:
        result[f"kernel ({backend})"] = time_call(lambda: sqgrad_accumulate_many(jobs, backend=backend), device,
                                                  repeats)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (< 2 min)")
    ap.add_argument("--images", type=int, default=None, help="images per pass (default 1000; quick 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per batch (default 16; quick 4)")
    ap.add_argument("--device", default=None, help="default: cuda if available (quick: cpu)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variants")
    ap.add_argument("--per-sample", action="store_true",
                    help="also time mode='per-sample' (fp32): ghost norms vs a loop over images")
    args = ap.parse_args(argv)

    quick = args.quick
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not quick else "cpu"))
    n_images = args.images or (8 if quick else 1000)
    batch = args.batch_size or (4 if quick else 16)
    dino = DinoConfig()  # 2 global + 10 local crops
    crops = dino.n_views

    model = build_model(quick).to(device).eval()
    gm = efx.trace(model)
    smap = efx.discover(gm)
    size = gm.meta["elastic_fx.preprocess"].input_size[0]
    images = SyntheticSource(n_images, size=max(size, 128) if quick else 256, seed=0).tensor()

    variants = [("fp32", torch.float32)]
    if device.type == "cuda" and not args.no_bf16:
        variants.append(("bf16", torch.bfloat16))
    backends = ["auto", "torch"] if device.type == "cuda" else ["auto"]

    # warm-up: Triton compilation, cuDNN / cuBLAS heuristics, allocator
    for _, amp in variants:
        for backend in backends:
            local_scores(gm, images[: 2 * batch], batch_size=batch, num_images=2 * batch, dino=dino,
                         progress=False, amp_dtype=amp, backend=backend)

    rows = []
    for label, amp in variants:
        for backend in backends:
            ls = local_scores(gm, images, batch_size=batch, num_images=n_images, dino=dino, progress=False,
                              amp_dtype=amp, backend=backend)
            ips = ls.config["images_per_s"]
            name = f"{label} / {'kernel' if backend == 'auto' else 'torch'}"
            rows.append({"variant": name, "images_per_s": ips, "crops_per_s": ips * crops,
                         "seconds_per_1000": 1000.0 / ips, "seconds": ls.config["seconds"]})

    if args.per_sample:
        for how in ("ghost", "loop"):
            ls = local_scores(gm, images, batch_size=batch, num_images=n_images, dino=dino, progress=False,
                              mode="per-sample", per_sample=how, amp_dtype=torch.float32)
            ips = ls.config["images_per_s"]
            rows.append({"variant": f"fp32 / per-sample {how}", "images_per_s": ips, "crops_per_s": ips * crops,
                         "seconds_per_1000": 1000.0 / ips, "seconds": ls.config["seconds"]})

    acc_backends = ["triton", "torch"] if device.type == "cuda" else ["auto"]
    acc = accumulation_timings(gm, smap, device, batch * crops, size, repeats=20,
                               backends=acc_backends)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nlocal-score gradient pass: {'ViT-Ti-like (6 blocks, 96 px)' if quick else 'ViT-B/16'} on {dev_name}, "
          f"{n_images} images x {crops} crops, batches of {batch} images, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<24} {'images/s':>9} {'crops/s':>9} {'s / 1000 img':>13}")
    for r in rows:
        print(f"{r['variant']:<24} {r['images_per_s']:>9.2f} {r['crops_per_s']:>9.1f} {r['seconds_per_1000']:>13.1f}")
    print(f"\naccumulation of one batch's squared gradients ({len(scored_groups(smap))} groups, "
          f"{sum(p.numel() for p in scored_parameters(gm, scored_groups(smap)).values()) / 1e6:.2f} M entries):")
    for k, v in acc.items():
        print(f"  {k:<16} {v * 1e3:9.3f} ms")
    ratio = acc["plain loop"] / acc[f"kernel ({acc_backends[0]})"]
    print(f"  plain loop / kernel = {ratio:.2f}x"
          + ("  (on the CPU both are the same PyTorch code)" if device.type == "cpu" else ""))

    by = {r["variant"]: r for r in rows}
    best = min(r["seconds_per_1000"] for r in rows if "per-sample" not in r["variant"])
    headline = {
        "bench": "scoring",
        "quick": quick,
        "device": dev_name,
        "model": "vit_tiny-like/6 blocks/96px" if quick else "vit_base_patch16_224",
        "images": n_images,
        "crops_per_image": crops,
        "batch_size": batch,
        "images_per_s": {k: round(v["images_per_s"], 3) for k, v in by.items()},
        "seconds_per_1000_images": {k: round(v["seconds_per_1000"], 2) for k, v in by.items()},
        "accumulate_ms": {k: round(v * 1e3, 3) for k, v in acc.items()},
        "accumulate_plain_over_kernel": round(ratio, 3),
        "pass_torch_over_kernel_time": (
            round(by["fp32 / torch"]["seconds_per_1000"] / by["fp32 / kernel"]["seconds_per_1000"], 3)
            if "fp32 / torch" in by else None
        ),
        "goal_30s_per_1000_met": None if device.type == "cpu" else bool(best <= 30.0),
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
