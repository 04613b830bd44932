"""``elastic-fx demo``: the whole pipeline on a small timm ViT, in a few minutes on a CPU.

trace -> discover -> DINO local scores -> xNES search -> ElasticModel -> ONNX at three
budgets, then a table (sparsity, params, GFLOPs, fitness, ONNX Runtime latency) and two
plots (fitness per generation, per-block kept fraction). Pretrained weights are used
when the Hugging Face hub is reachable; otherwise random weights, with a one-line notice.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load(spec: str, img_size: int, offline: bool):
    from .models import load_model

    kind, _, name = spec.partition(":")
    want_pretrained = not offline and _hub_reachable()
    kwargs = {"img_size": img_size} if kind == "timm" else {}
    if want_pretrained:
        try:
            return load_model(spec, pretrained=True, **kwargs), True
        except Exception as e:  # a hub that answers but cannot serve the weights
            print(f"note: could not download pretrained weights for {spec} ({type(e).__name__}); using random weights")
            return load_model(spec, pretrained=False, **kwargs), False
    print(f"note: pretrained weights for {spec} are not reachable from here; the demo uses random weights "
          "(the pipeline is the same; the pruning decisions are only meaningful on a trained model)")
    return load_model(spec, pretrained=False, **kwargs), False


def run_demo(args) -> dict:
    from .data import SyntheticSource, as_source, load_tensor, resolve_preprocess
    from .elastic import ElasticModel
    from .exporters.onnx import export_onnx, onnx_latency
    from .passes.discover import discover
    from .passes.embedding import embedding_module
    from .pipeline import SearchConfig, prune
    from .report import budget_table, markdown_table, write_report
    from .search.fitness import NeighbourhoodFitness, PCACosineFitness
    from .tracing import trace

    t0 = time.time()
    out = Path(args.out_dir)
    torch.manual_seed(0)
    model, pretrained = _load(args.model, args.img_size, args.offline)
    gm = trace(model)
    if getattr(args, "mean", None) or getattr(args, "std", None):  # --mean / --std replace the model's own
        from .data import PREPROCESS_META

        gm.meta[PREPROCESS_META] = resolve_preprocess(gm, mean=args.mean, std=args.std)
    smap = discover(gm)
    print(f"\n{args.model} at {args.img_size}px ({'pretrained' if pretrained else 'random weights'}):")
    print(smap.summary())

    n = args.num_images
    images = as_source(args.images) if args.images else SyntheticSource(n=n, size=max(2 * args.img_size, 64), seed=0)
    cfg = SearchConfig(num_images=n, num_fitness_images=n, batch_size=8, eval_batch_size=n)
    print(f"\nscoring {n} images x 12 DINO crops, then {args.iterations} xNES generations "
          f"at sparsities {args.sparsities} ...")
    scores = prune(gm, images, iterations=args.iterations, sparsities=tuple(args.sparsities), config=cfg)
    scores_path = scores.save(out / "scores.efx")

    em = ElasticModel(gm, scores)
    manifest = em.export_onnx(out / "onnx", args.sparsities, source=args.model)

    # fitness of each exported budget on the fitness images, and ONNX Runtime latency
    pre = resolve_preprocess(gm)
    fit_x = load_tensor(images, pre, n, seed=1)
    with torch.no_grad():
        dense = embedding_module(gm, smap)(fit_x).float()
        # the search's fitness, on the demo's images
        fitness = (NeighbourhoodFitness(dense, cfg.temperature) if cfg.fitness == "neighbours"
                   else PCACosineFitness(dense, dim=min(192, n - 1)))
        extra = {}
        dense_onnx = out / "onnx" / "dense.onnx"
        export_onnx(gm, dense_onnx, fit_x[:2], metadata={"sparsity": 0.0, "source_model": args.model})
        extra[0.0] = {"fitness": 1.0, "ort_ms_b1": 1e3 * onnx_latency(dense_onnx, 1, iters=20)}
        for entry in manifest["budgets"]:
            s = entry["target_sparsity"]
            small = em.at(s)
            emb = embedding_module(small, discover(small))(fit_x).float()
            extra[s] = {"fitness": float(fitness(emb[None])[0]),
                        "ort_ms_b1": 1e3 * onnx_latency(out / "onnx" / entry["file"], 1, iters=20)}
    report = write_report(scores, smap, out, title=f"elastic_fx demo: {args.model}", sparsities=args.sparsities,
                          extra=extra)
    rows = budget_table(scores, smap, args.sparsities, extra)
    print("\n" + markdown_table(rows))
    elapsed = time.time() - t0
    print(f"\nwrote {scores_path}, {len(manifest['budgets'])} ONNX files in {out / 'onnx'}, "
          f"{report} with fitness.png and allocation.png ({elapsed:.0f} s)")
    return {"rows": rows, "seconds": elapsed, "out": str(out)}
