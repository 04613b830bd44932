"""The ``elastic-fx`` command. Thin: parses arguments, calls the public API, prints.

    elastic-fx inspect MODEL            heads, FFN neurons, params and GFLOPs per block
    elastic-fx score MODEL --images DIR --out FILE          local (diagonal-Hessian) scores
    elastic-fx prune MODEL --images DIR --out scores.efx     local scores + xNES search
    elastic-fx export MODEL --scores FILE --sparsity ... --out-dir DIR [--format onnx pt2 --precision fp32 int8]
    elastic-fx eval MODEL --scores FILE --sparsity ... [--onnx FILE ...] --train DIR --test DIR   (or --data FILE.npz)
    elastic-fx report SCORES_FILE                            Markdown report with plots
    elastic-fx import-scores FILE --model MODEL --out scores.efx   (reference code's score files)
    elastic-fx demo                                          the whole pipeline on a small ViT
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from .errors import ElasticFxError
from .models import SPEC_HELP, load_model
from .version import __version__


def _add_model(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", help=f"the model: {SPEC_HELP}")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights (needs network)")
    p.add_argument("--checkpoint", help="load a local state dict (.pt/.pth/.safetensors) into the model")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="build (or resize) the model for H x W inputs (timm, Hugging Face, torchvision)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="input normalisation mean (default: the model's own, else ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="input normalisation std (default: the model's own, else ImageNet's)")


def _pca_dim(text: str):
    if text in ("auto", "full"):
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, full or a positive number of components, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _device(text: str) -> str:
    """--device: a torch device name that exists on this machine."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device elastic-fx runs on; use cpu or cuda")
    return text


def _load(args):
    """The model of ``args.model`` (resized by --input-size) and its preprocessing (--mean/--std win)."""
    from .data import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, preprocess_config
    from .errors import DataError
    from .models import load_image_processor

    size = tuple(args.input_size) if args.input_size else None
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, input_size=size)
    processor, crop = load_image_processor(args.model), None
    if processor is None and args.model.startswith("hf:") and (args.mean is None or args.std is None):
        # no processor saved with the model: the Hugging Face ViT default, said once in CLI words
        print(f"note: {args.model} has no saved image processor; using the Hugging Face ViT default "
              "mean = std = (0.5, 0.5, 0.5) (pass --mean R G B --std R G B to override)", file=sys.stderr)
        processor, crop = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}, 1.0
    try:
        pre = preprocess_config(model, input_size=size, mean=args.mean, std=args.std, crop_pct=crop,
                                hf_processor=processor)
    except DataError:
        try:
            pre = preprocess_config(model, input_size=size, mean=args.mean or IMAGENET_MEAN,
                                    std=args.std or IMAGENET_STD)
        except DataError:
            raise DataError(f"cannot tell the input size of {args.model}; pass --input-size H W "
                            "(and --mean R G B --std R G B if it was not trained with ImageNet statistics)") from None
        if args.mean is None or args.std is None:
            print(f"note: {args.model} carries no normalisation; using ImageNet mean/std "
                  "(pass --mean R G B --std R G B to override)", file=sys.stderr)
    return model, PreprocessConfig.from_dict(pre.to_dict())


def torch_randn(size):
    import torch

    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))


def _model_and_graph(args):
    from .data import PREPROCESS_META
    from .tracing import trace

    model, pre = _load(args)
    gm = trace(model, (torch_randn(pre.input_size),))
    gm.meta[PREPROCESS_META] = pre
    return model, gm


def _output(path, flag: str, directory: bool = False) -> None:
    """Refuse an unsafe output path now, before any expensive work."""
    from ._io import check_output
    from .errors import ConfigError

    check_output(path, flag, ConfigError, directory=directory)


def cmd_inspect(args) -> int:
    from .passes.discover import discover

    _, gm = _model_and_graph(args)
    smap = discover(gm)
    print(f"{args.model}  (traced with torch.{gm.meta.get('elastic_fx.tracer', 'fx')})")
    print(smap.summary())
    return 0


def _sparsities(values: List[float]) -> List[float]:
    from .errors import BudgetError

    for v in values:
        if not 0 <= v < 1:
            raise BudgetError(f"sparsity {v} is outside [0, 1): it is the fraction of prunable parameters removed")
    return values


def _distributed(args):
    """Under torchrun (WORLD_SIZE/RANK/LOCAL_RANK set) join the process group; else a 1-process context."""
    import torch

    from .distributed import current, raise_on_sigterm

    ctx = current(device=args.device)
    if ctx.enabled:
        raise_on_sigterm()  # torchrun stops survivors with SIGTERM: say where the last good checkpoint is
    torch.manual_seed(args.seed)  # random-weight models get the same weights on every rank
    return ctx


def cmd_score(args) -> int:
    from .passes.discover import discover
    from .scoring.local import local_scores

    _output(args.out, "--out")
    ctx = _distributed(args)
    _, gm = _model_and_graph(args)
    smap = discover(gm)
    ls = local_scores(gm, args.images, method=args.method, batch_size=args.batch_size, mode=args.mode,
                      seed=args.seed, num_images=args.num_images, device=args.device, structures=smap)
    from .data import PREPROCESS_META

    ls.config.setdefault("preprocess", gm.meta[PREPROCESS_META].to_dict())  # what the images went through
    if ctx.is_main:
        path = ls.save(args.out)
        print(f"wrote {path}: {args.method} scores for {len(smap.blocks)} blocks")
    return 0


def _scores_for(args, gm, smap):
    """--scores FILE (an .efx from prune, or a LocalScores file from score) or a baseline name."""
    from pathlib import Path

    from .errors import ScoresError
    from .scores import ElasticScores, LocalScores
    from .scoring.local import local_scores

    spec = args.scores
    if spec in ("magnitude", "lamp", "random"):
        return ElasticScores.from_local(local_scores(gm, None, method=spec, seed=args.seed, structures=smap,
                                                     progress=False), smap)
    if not Path(spec).is_file():
        raise ScoresError(f"--scores {spec!r} is neither a score file nor one of magnitude, lamp, random")
    try:
        return ElasticScores.load(spec, smap)
    except ScoresError as first:
        try:
            local = LocalScores.load(spec)  # a file from elastic-fx score?
        except ScoresError:
            raise first from None
    local.check(smap)  # for another model: say that, not "no search result"
    return ElasticScores.from_local(local, smap)


def cmd_export(args) -> int:
    from .elastic import ElasticModel, budget_file_names, check_formats
    from .passes.discover import discover

    _output(args.out_dir, "--out-dir", directory=True)
    budget_file_names(_sparsities(args.sparsity))
    precisions = args.precision or (["fp16"] if args.fp16 else ["fp32"])
    if args.fp16 and args.precision and "fp16" not in args.precision:
        from .errors import ConfigError

        raise ConfigError("--fp16 and --precision disagree; give the precisions with --precision only")
    check_formats(args.format, precisions)  # a format or precision not offered fails before the model loads
    _, gm = _model_and_graph(args)
    smap = discover(gm)
    scores = _scores_for(args, gm, smap)
    em = ElasticModel(gm, scores)
    correction = None
    if args.correct:
        from .passes.correct import CorrectionConfig

        correction = CorrectionConfig(damping=args.damping, max_images=args.calibration_images or 1000)
    manifest = em.export(args.out_dir, _sparsities(args.sparsity), formats=args.format, precisions=precisions,
                         calibration=args.calibration, num_calibration=args.calibration_images or 128, source=args.model,
                         correct=args.correct, correction=correction, seed=args.seed,
                         latency_batches=args.latency_batches, latency_iters=args.latency_iters)
    batches = [str(b) for b in args.latency_batches]
    head = "".join(f" {'ms @' + b:>10}" for b in batches)
    print(f"{'file':<24} {'sparsity':>8} {'params (M)':>10} {'GFLOPs':>8} {'fidelity':>16}{head}")
    for e in manifest["budgets"]:
        fid = e["fidelity"]
        fidelity = (f"cos {fid['cosine_mean']:.4f}" if "cosine_mean" in fid else
                    f"|d| {fid['max_abs_diff']:.2e}" if fid.get("max_abs_diff") is not None else "-")
        times = "".join(f" {e['latency_ms'][b]:>10.2f}" if e["latency_ms"].get(b) is not None else f" {'-':>10}"
                        for b in batches)
        print(f"{e['file']:<24} {e['sparsity']:>8.3f} {e['params'] / 1e6:>10.2f} {e['gflops']:>8.3f} "
              f"{fidelity:>16}{times}")
        if e.get("int8_skipped"):
            print(f"  int8 not written: {e['int8_skipped']}")
    if manifest.get("skipped"):
        print(f"not offered, skipped: {', '.join(manifest['skipped'])}")
    print(f"manifest: {args.out_dir}/manifest.json")
    return 0


def cmd_import_scores(args) -> int:
    from .interop import from_reference, load_reference_scores
    from .passes.discover import discover

    _output(args.out, "--out")
    ref = load_reference_scores(args.file)
    print(f"reference scores: {ref.describe()}")
    if args.model is None:
        from .errors import ScoresError

        hint = f" (the file says it is for timm:{ref.timm_model})" if ref.timm_model else ""
        raise ScoresError(f"pass --model MODEL, the model these scores belong to{hint}")
    _, gm = _model_and_graph(args)
    smap = discover(gm)
    path = from_reference(ref, smap).save(args.out)
    print(f"wrote {path}")
    return 0


def cmd_prune(args) -> int:
    from .pipeline import SearchConfig, prune

    _output(args.out, "--out")
    if args.checkpoint_dir:
        from pathlib import Path

        from .errors import ConfigError
        from .search.search import CHECKPOINT_NAME

        _output(args.checkpoint_dir, "--checkpoint-dir", directory=True)
        if not args.resume and (Path(args.checkpoint_dir) / CHECKPOINT_NAME).exists():
            raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir} already holds a search checkpoint "
                              f"({CHECKPOINT_NAME}); pass --resume to continue it, or give another --checkpoint-dir "
                              "to start over (a new run would overwrite it)")
    _sparsities(args.sparsities)
    ctx = _distributed(args)
    model, pre = _load(args)
    pca = args.pca_dim
    cfg = SearchConfig(num_images=args.num_images, num_fitness_images=args.fitness_images,
                       batch_size=args.batch_size, popsize=args.popsize, pca_dim=None if pca == "full" else pca,
                       fitness=args.fitness,
                       ranking=args.ranking, space=args.space, sigma0=args.sigma0,
                       selection_fraction=args.selection_fraction)
    scores = prune(model, args.images, iterations=args.iterations, sparsities=_sparsities(args.sparsities),
                   fitness_images=args.fitness_folder,
                   seed=args.seed, checkpoint_dir=args.checkpoint_dir, resume=args.resume, config=cfg,
                   device=args.device, example_inputs=(torch_randn(pre.input_size),), preprocess=pre)
    scores.config.setdefault("example_input_shape", [2, 3, *pre.input_size])
    if ctx.is_main:
        path = scores.save(args.out)
        print(f"wrote {path} after {len(scores.history)} generations: {scores.selection.get('summary', '')}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from .passes.discover import discover
    from .report import write_report
    from .scores import ElasticScores

    out = Path(args.out_dir or Path(args.scores_file).with_suffix(""))
    _output(out, "--out-dir", directory=True)
    _, gm = _model_and_graph(args)
    smap = discover(gm)
    scores = ElasticScores.load(args.scores_file, smap)
    path = write_report(scores, smap, out, title=f"elastic_fx report: {args.model}")
    print(f"wrote {path}")
    return 0


def cmd_eval(args) -> int:
    from .data import load_labelled
    from .evaluate import LinearProbeConfig, evaluate_budgets, format_budget_table
    from .passes.discover import discover

    if not args.onnx and not args.sparsity:
        from .errors import ConfigError

        raise ConfigError("give --sparsity S ... (sub-networks of MODEL) or --onnx FILE ... (exported files) to evaluate")
    _, gm = _model_and_graph(args)
    size = gm.meta["elastic_fx.example_inputs"][0].shape[-1]
    if args.data:
        data = load_labelled(args.data, image_size=size)
    elif args.train and args.test:
        data = load_labelled(args.train, args.test, image_size=size)
    else:
        from .errors import DataError

        raise DataError("give labelled images: --data FILE.npz, or --train DIR --test DIR (class_name/image.jpg)")
    linear = LinearProbeConfig(epochs=args.linear_epochs) if args.linear_epochs else None
    if args.onnx:
        from .data import PREPROCESS_META
        from .evaluate import evaluate_onnx

        print(f"| file | k-NN top-1 (%) |{' linear top-1 (%) |' if linear else ''}")
        print(f"|---|---:|{'---:|' if linear else ''}")
        for path in args.onnx:
            acc = evaluate_onnx(path, data, gm.meta[PREPROCESS_META], k=args.k, linear=linear)
            probe = f" {100 * acc['linear_top1']:.1f} |" if linear else ""
            print(f"| {path} | {100 * acc['knn_top1']:.1f} |{probe}")
        if not args.sparsity:
            return 0
    smap = discover(gm)
    scores = _scores_for(args, gm, smap)
    results = evaluate_budgets(gm, scores, data, _sparsities([0.0] + [s for s in args.sparsity if s > 0]),
                               k=args.k, linear=linear, device=args.device or "cpu", mean=args.mean, std=args.std)
    print(format_budget_table(results, title=f"{args.model}: k-NN (k={args.k}) by budget"))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _output(args.out_dir, "--out-dir", directory=True)
    run_demo(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic-fx",
        description="Turn a pretrained Vision Transformer into an elastic one: label-free structured pruning "
        "to any compute budget, exported to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"elastic_fx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the discovered heads / FFN neurons / GFLOPs per block")
    _add_model(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("score", help="local (diagonal-Hessian) scores of every head and neuron")
    _add_model(p)
    p.add_argument("--images", help="image folder (default: procedural synthetic images)")
    p.add_argument("--out", required=True, help="score file to write (.safetensors)")
    p.add_argument("--method", default="dino", choices=["dino", "ce", "magnitude", "lamp", "snip", "random"])
    p.add_argument("--mode", default="per-batch", choices=["per-batch", "per-sample"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, type=_device, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="local scores + xNES search -> one elastic score file")
    _add_model(p)
    p.add_argument("--images", help="image folder (default: procedural synthetic images)")
    p.add_argument("--out", required=True, help="score file to write (.efx)")
    p.add_argument("--iterations", type=int, default=50, help="xNES generations (default 50)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.6])
    p.add_argument("--num-images", type=int, default=1000, help="images for the gradient pass")
    p.add_argument("--fitness-images", type=int, default=1000, help="images for the fitness")
    p.add_argument("--fitness-folder", default=None,
                   help="image folder for the fitness (default: --images); best: images the model did not train on")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--popsize", type=int, default=None, help="xNES population (default 4 + 3 ln d)")
    p.add_argument("--fitness", default="neighbours", choices=["neighbours", "pca-cosine"],
                   help="neighbours: how well each fitness image keeps its neighbours (default); pca-cosine: "
                        "PCA cosine to the dense embeddings (paper Eq. 6)")
    p.add_argument("--pca-dim", default="auto", type=_pca_dim,
                   help="with --fitness pca-cosine, PCA components: auto (the fewest holding 95%% of the pruning "
                        "error), full (no projection), or a number (the paper: 192)")
    p.add_argument("--ranking", default="global", choices=["global", "separate"],
                   help="heads and neurons in one ranking (global, paper Eq. 9) or each on its own (separate)")
    p.add_argument("--space", default="log", choices=["log", "linear"],
                   help="search space: log (c = exp(z) from the no-search ranking) or linear (the reference's)")
    p.add_argument("--sigma0", type=float, default=None, help="initial xNES spread (default: the space's)")
    p.add_argument("--selection-fraction", type=float, default=0.5,
                   help="share of the fitness images held out to choose the winner (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, type=_device, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint every generation here")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="validated files per budget (ONNX fp32/fp16/int8, .pt2) + manifest.json")
    _add_model(p)
    p.add_argument("--scores", default="magnitude",
                   help="score file (.efx from prune, or from score), or a baseline: magnitude, lamp, random")
    p.add_argument("--sparsity", type=float, nargs="+", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--format", nargs="+", default=["onnx"], metavar="FMT",
                   help="file formats: onnx and/or pt2 (torch.export ExportedProgram); default onnx")
    p.add_argument("--precision", nargs="+", default=None, metavar="P",
                   help="precisions: fp32, fp16, int8 (ONNX, static QDQ, needs --calibration); default fp32. "
                        ".pt2 files are fp32 only")
    p.add_argument("--fp16", action="store_true", help="export float16 weights (the same as --precision fp16)")
    p.add_argument("--latency-batches", type=_positive_int, nargs="*", default=[1, 16], metavar="B",
                   help="batch sizes timed for the manifest (default 1 16; none: no timing)")
    p.add_argument("--latency-iters", type=_positive_int, default=10, help="timed runs per file and batch size")
    p.add_argument("--correct", action="store_true",
                   help="SparseGPT-style weight correction of the out-projections before slicing")
    p.add_argument("--calibration", help="image folder for --correct and for int8 (calibration + a held-out check)")
    p.add_argument("--calibration-images", type=_positive_int, default=None,
                   help="images used from --calibration (default: 1000 for --correct, 128 for int8)")
    p.add_argument("--damping", default="mean", choices=["mean", "max"],
                   help="correction damping: mean (p=0.01) or max (p=0.1, for models with Hessian outliers)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-scores", help="convert a reference (SnapViT) score file to an .efx score file")
    p.add_argument("file", help="the reference code's score file (.pt; loaded without executing code)")
    p.add_argument("--model", dest="model", default=None, help=f"the model the scores belong to: {SPEC_HELP}")
    _add_model(p, positional=False)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_scores)

    p = sub.add_parser("eval", help="k-NN (and linear probe) accuracy of the sub-network at each sparsity")
    _add_model(p)
    p.add_argument("--scores", default="magnitude", help="score file (.efx) or a baseline: magnitude, lamp, random")
    p.add_argument("--sparsity", type=float, nargs="+", default=None)
    p.add_argument("--onnx", nargs="+", default=None, metavar="FILE",
                   help="also evaluate exported ONNX files (fp32, fp16 or int8) of MODEL, on their first output")
    p.add_argument("--train", help="labelled train folder (class_name/image.jpg)")
    p.add_argument("--test", help="labelled test folder")
    p.add_argument("--data", help="an .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--linear-epochs", type=int, default=0, help="also train a linear probe for this many epochs")
    p.add_argument("--device", default=None, type=_device, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="Markdown report with the allocation heatmap and fitness plot")
    p.add_argument("scores_file")
    _add_model(p)
    p.add_argument("--out-dir", default=None, help="default: next to the score file")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole pipeline on a small ViT, synthetic images, a few generations")
    p.add_argument("--model", default="timm:vit_tiny_patch16_224")
    p.add_argument("--img-size", type=_positive_int, default=96, help="input size for the demo model (speed)")
    p.add_argument("--images", default=None, help="image folder (default: synthetic images)")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--out-dir", default="elastic-fx-demo")
    p.add_argument("--offline", action="store_true", help="do not try to download pretrained weights")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="input normalisation mean")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="input normalisation std")
    p.set_defaults(func=cmd_demo)
    return parser


#: Advice written for Python callers, as a command-line user acts on it (the library's errors
#: name Python calls; the command names its own flags).
_CLI_WORDS = [
    (r"; ask for at most that, or pass floors=Floors\(\.\.\.\) with smaller fractions",
     "; ask for at most that with --sparsity"),
    (r"; lower it or pass floors=Floors\(\.\.\.\)", "; lower it"),
    (r"Recompute the scores for this model with efx\.local_scores\(model, images\)\.",
     "Recompute them for this model with elastic-fx score MODEL --out FILE."),
    (r"Score this model with elastic-fx prune \(efx\.prune\)\.", "Score this model with elastic-fx prune MODEL --out FILE."),
    (r"elastic-fx prune / ElasticScores\.save\(\)", "elastic-fx prune"),
    (r"LocalScores\.save\(\)", "elastic-fx score"),
    (r"run elastic-fx prune on it, or use ElasticScores\.from_local\(LocalScores\.load\(path\), smap\) for the "
     r"ranking without search\.", "run elastic-fx prune, or give it to --scores of export / eval (ranked without search)."),
]


#: torch's refusal to unpickle code runs to several lines and suggests weights_only=False: never repeat it.
_TORCH_REFUSAL = r"UnpicklingError: Weights only load failed\..*?(?=\); |\)$|$)"


def _for_cli(message: str) -> str:
    import re

    message = re.sub(_TORCH_REFUSAL, "it holds Python objects other than tensors, which could run code when "
                     "loaded; refused", message, flags=re.DOTALL)
    for pattern, words in _CLI_WORDS:
        message = re.sub(pattern, words, message)
    return message


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for the run
        logging.getLogger("elastic_fx").setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ElasticFxError as e:
        print(f"elastic-fx {args.command}: error: {_for_cli(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:  # the system refused a read or write (disk full, permissions, a vanished file)
        where = f" ({e.filename})" if e.filename else ""
        print(f"elastic-fx {args.command}: error: {e.strerror or e}{where}; check the paths and free space",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"elastic-fx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m elastic_fx.cli
    sys.exit(main())
