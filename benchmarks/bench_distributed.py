"""Benchmark inputs for the multi-process scaling estimate of elastic_fx (gradient pass + xNES search).

Measures, side by side in one run:

* serial work per generation that does NOT shrink with more processes, for the search
  dimensions of ViT-B/16, ViT-L/16, ViT-H/14 and ViT-g/14: xNES ask + tell (numpy, float64),
  the atomic checkpoint write (local scores + xNES state), and the PCA fit (once per run);
* the collectives of one generation and the ordered score sum, on 2 forked gloo ranks
  (localhost): broadcast of the candidates, status + fitness gathers, the tell broadcast;
* end to end: ``prune`` on a small ViT with 1 process and with 2 processes (1 thread each),
  checking that both give the same result, and the time of each phase.

    python benchmarks/bench_distributed.py --quick     # CPU, < 2 min

Prints a table, then ONE JSON line with the headline figures. Never run by pytest.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

# name: (blocks, heads per block, embed dim, FFN hidden) -- timm configurations
MODELS = {
    "ViT-B/16": (12, 12, 768, 3072),
    "ViT-L/16": (24, 16, 1024, 4096),
    "ViT-H/14": (32, 16, 1280, 5120),
    "ViT-g/14": (40, 16, 1408, 6144),
}


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def serial_parts(repeats: int) -> Dict[str, Dict[str, float]]:
    from elastic_fx._io import atomic_write as _atomic_write
    from elastic_fx.search.fitness import PCACosineFitness
    from elastic_fx.search.xnes import XNES, XNESConfig

    out = {}
    tmp = Path(tempfile.mkdtemp())
    for name, (blocks, heads, dim, hidden) in MODELS.items():
        d = blocks + blocks * heads
        es = XNES(np.ones(d), XNESConfig(seed=0))
        rng = np.random.default_rng(0)

        def generation() -> None:
            x = es.ask()
            es.tell(x, rng.standard_normal(len(x)))

        t_xnes = median_time(generation, repeats)
        scores = {k: {b: torch.rand(hidden if "neuron" in k else heads) for b in range(blocks)}
                  for k in ("head_scores", "neuron_scores", "head_means", "neuron_means")}
        payload = {"local": scores, "xnes": es.state_dict(), "history": [{"g": i} for i in range(50)]}
        t_ckpt = median_time(lambda: _atomic_write(tmp / "ckpt.pt", lambda p: torch.save(payload, p)), repeats)
        dense = torch.randn(1000, dim)
        t_pca = median_time(lambda: PCACosineFitness(dense, dim=192), max(1, repeats // 3))
        out[name] = {"d": d, "popsize": es.popsize, "xnes_s": t_xnes, "checkpoint_s": t_ckpt, "pca_fit_s": t_pca,
                     "score_floats": blocks * (heads + hidden)}
    return out


# ----------------------------------------------------------------------------- 2 ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(rank: int, world: int, port: int, tmp: Path, job: Callable[[int], Any]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from elastic_fx import distributed as efd

    try:
        torch.save({"ok": job(rank)}, tmp / f"{rank}.pt")
    except BaseException as e:  # noqa: BLE001
        torch.save({"error": repr(e)}, tmp / f"{rank}.pt")
    efd.shutdown()
    os._exit(0)


def _forked(world: int, job: Callable[[int], Any]) -> List[Any]:
    """Run job(rank) on ``world`` ranks started by a fork server (autograd forbids plain fork after use)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "elastic_fx.pipeline"])
    port, tmp = _free_port(), Path(tempfile.mkdtemp())
    procs = [ctx.Process(target=_body, args=(r, world, port, tmp, job)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    res = [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(world)]
    for r in res:
        if "error" in r:
            raise RuntimeError(r["error"])
    return [r["ok"] for r in res]


def _comm_job(rank: int, repeats: int = 30) -> Dict[str, float]:
    from elastic_fx import distributed as efd

    ctx = efd.current(device="cpu")
    out = {}
    for name, (blocks, heads, _, hidden) in MODELS.items():
        d = blocks + blocks * heads
        pop = 4 + int(math.floor(3 * math.log(d)))
        cands = np.random.default_rng(0).standard_normal((pop, d))
        pairs = torch.rand(pop * 4 // 2)

        def generation() -> None:  # the 4 collectives prune runs per generation
            c = ctx.main_then_share(lambda: cands)
            mine = ctx.all_or_nothing(lambda: pairs)
            ctx.gather_cat(mine)
            ctx.main_then_share(lambda: None)
            del c

        ctx.barrier()
        t_gen = median_time(generation, repeats)
        steps = [torch.rand(blocks * (heads + hidden)) for _ in range(32)]  # 63 batches of 16 over 2 ranks

        def chain() -> None:
            ctx.ordered_sum(steps, torch.zeros(blocks * (heads + hidden)))

        ctx.barrier()
        t_sum = median_time(chain, max(3, repeats // 5))
        out[name] = {"collectives_per_generation_s": t_gen, "ordered_sum_s": t_sum}
    return out


def _prune_job(rank: Optional[int], *, size: int, n_images: int, iterations: int) -> Dict[str, Any]:
    import timm

    from elastic_fx.pipeline import SearchConfig, prune

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, depth=6, num_classes=0)
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    cfg = SearchConfig(num_images=n_images, num_fitness_images=n_images, batch_size=4, pca_dim=16, eval_batch_size=8)
    t0 = time.perf_counter()
    s = prune(model, images, iterations=iterations, sparsities=(0.2, 0.4, 0.5, 0.6), config=cfg, device="cpu",
              progress=False, distributed=None if rank is not None else False)
    total = time.perf_counter() - t0
    return {"c": s.c, "best": s.best_fitness, "total_s": total, "local_s": s.config["local_seconds"],
            "search_s": s.config["search_seconds"], "popsize": s.config["popsize"],
            "gen_s": statistics.median(h["seconds"] for h in s.history)}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (< 2 min)")
    ap.add_argument("--size", type=int, default=None, help="image size of the end-to-end model (quick: 64)")
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else 20
    size, n_images, iters = (args.size or 64, 16, 2) if args.quick else (args.size or 224, 64, 3)

    torch.set_num_threads(1)
    serial = serial_parts(repeats)
    comm = _forked(2, _comm_job)[0]
    one = _prune_job(None, size=size, n_images=n_images, iterations=iters)
    two = _forked(2, functools.partial(_prune_job, size=size, n_images=n_images, iterations=iters))
    same = all(np.array_equal(t["c"], one["c"]) and t["best"] == one["best"] for t in two)

    print(f"{'model':<9} {'d':>4} {'pop':>4} {'xNES s':>8} {'ckpt s':>8} {'PCA s':>7} {'coll/gen s':>10} "
          f"{'ord.sum s':>9}")
    for name in MODELS:
        s, c = serial[name], comm[name]
        print(f"{name:<9} {s['d']:>4} {s['popsize']:>4} {s['xnes_s']:>8.4f} {s['checkpoint_s']:>8.4f} "
              f"{s['pca_fit_s']:>7.3f} {c['collectives_per_generation_s']:>10.4f} {c['ordered_sum_s']:>9.4f}")
    print(f"prune ViT-Ti(6 blocks)@{size}px, {n_images} images, {iters} gens: 1 rank {one['total_s']:.1f} s "
          f"(local {one['local_s']:.1f}, gen {one['gen_s']:.2f}); 2 ranks {two[0]['total_s']:.1f} s "
          f"(local {two[0]['local_s']:.1f}, gen {two[0]['gen_s']:.2f}); same result: {same}")
    headline = {
        "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "serial": {k: {kk: round(vv, 5) if isinstance(vv, float) else vv for kk, vv in v.items()}
                   for k, v in serial.items()},
        "comm_2rank_localhost": {k: {kk: round(vv, 5) for kk, vv in v.items()} for k, v in comm.items()},
        "e2e": {"model": f"vit_tiny depth6 @{size}", "images": n_images, "iterations": iters,
                "one_rank_s": round(one["total_s"], 2), "two_ranks_s": round(two[0]["total_s"], 2),
                "one_rank_gen_s": round(one["gen_s"], 3), "two_ranks_gen_s": round(two[0]["gen_s"], 3),
                "one_rank_local_s": one["local_s"], "two_ranks_local_s": two[0]["local_s"],
                "identical_result": bool(same)},
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
