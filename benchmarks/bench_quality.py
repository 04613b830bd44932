"""Quality benchmark: k-NN / linear-probe accuracy of pruned ViTs, per method, per sparsity.

One model, one set of images, one run. Every method removes whole attention heads and
FFN hidden neurons until the same fraction of the blocks' prunable parameters is gone
(the paper's sparsity S); the sliced sub-network's pooled embedding is evaluated by
k-NN (k = 20, L2-normalised features, train split -> test split) and, where the run
asks for it, by a linear probe on the same frozen features.

Methods (side by side):

* ``elastic``    -- elastic_fx: DINO local scores + the xNES search (``efx.prune``);
* ``fisher``     -- the same DINO local scores without search (c = 1; "fisher-only");
* ``magnitude``, ``lamp``, ``random`` -- data-free baselines ranked by the same budget walk;
* ``snip``       -- SNIP-magnitude on the DINO loss;
* ``tp_taylor``, ``tp_hessian`` -- Torch-Pruning (``pip install torch-pruning``), the library
  a user would otherwise pick: its MetaPruner removes whole heads (``prune_num_heads``) and
  FFN neurons, ranked globally by its Taylor / Hessian (OBD) importance of the
  cross-entropy loss WITH LABELS (its documented setting; a stronger signal than ours).

Ablations: separate, smaller searches, each changing one setting of the default search (the
fitness, the search space, the PCA size, the ranking, CKA initialisation, the initial
spread), and other choice rules over the same evaluated pool (winner by search fitness, no
c = 1 among the choices, any gain over c = 1 without the interval test). A proxy study
scores candidates of the main search by several label-free fitnesses and by k-NN on
validation images of the TRAIN split (Spearman correlation).

Latency: the sliced models of a few methods are exported with ``efx.export_onnx`` and
timed with onnxruntime on the CPU (accuracy vs measured latency plot).

Data
----
Real assets (``../shared/assets``, see its README): a ViT (6 blocks x 6 heads, dim 192)
trained on a real CIFAR-10 subset, and that subset. Gradient images (DINO / SNIP, and
Torch-Pruning's labelled loss) and fitness images are drawn, disjoint, from the CIFAR
TRAIN split (used unlabelled by our methods), preprocessed with the model's mean/std.
When the assets are absent the script says so and exits (``--smoke`` needs none).

CPU sizing of the default run (the paper's value in brackets): 512 gradient images x
(2 global + 10 local crops) [1000]; 256 fitness images, half of them held out for selection
[1000]; xNES population 4 + floor(3 ln d) = 15 for this model's d = 42 [same]; 20
generations [50]; search sparsities 30/50/60/70 %, the budgets the method is judged at
[10/30/50/60 %]; k-NN reference set all 4660 train images, all 932 test images [ImageNet
train / val]; linear probe 100 epochs [same]. The cost is dominated by the search:
generations x population x search sparsities x fitness images masked image passes
(1.5 x 10^5 for the main search); ``--threads 1`` is faster when other jobs share the cores
(no OpenMP barrier stalls).

Full protocol (ImageNet-1k, a pretrained ViT-B/16) for users who have them::

    python benchmarks/bench_quality.py --model timm:vit_base_patch16_224 --pretrained \\
        --train /data/imagenet/train_subset --test /data/imagenet/val \\
        --grad-images 1000 --fitness-images 1000 --popsize 0 --knn-train 0 --linear-epochs 100 \\
        --sparsities 0.1 0.2 0.3 0.4 0.5 0.6 --device cuda

(``--popsize 0`` = the xNES default 4 + floor(3 ln d); ``--knn-train 0`` = every train image;
folders hold one sub-folder per class and are loaded into memory at the model's input
size, so give a per-class subset of the ImageNet train split for the k-NN reference set.)

Modes
-----
* default: the CPU-sized run on the real assets (documented in benchmarks/results/quality.md);
* ``--quick``: the same pipeline, smaller everywhere (< 2 min on 2 idle cores);
* ``--smoke``: a tiny random ViT and random images, seconds; what tests/test_bench_quality.py runs.

Results are cached in ``--work-dir`` (scores, search checkpoints, finished evaluations):
re-running continues where an interrupted run stopped. The script writes ``quality.md``,
``quality.json`` and ``quality_*.png`` into ``--out-dir`` and ends by printing ONE JSON
line with the headline figures. Never run by pytest (the test runs ``--smoke``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import elastic_fx as efx
from elastic_fx.data import LabelledData, load_labelled, to_model_input
from elastic_fx.evaluate import LinearProbeConfig, evaluate_budgets, evaluate_features, knn_top1
from elastic_fx.passes.embedding import embedding_module
from elastic_fx.pipeline import SearchConfig, prune
from elastic_fx.scores import Layout, LocalScores
from elastic_fx.scoring.local import local_scores

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".." / "shared" / "assets"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.247, 0.243, 0.261)
METHODS = ("elastic", "fisher", "fisher_sep", "magnitude", "lamp", "snip", "random", "tp_taylor", "tp_hessian")
LABELS = {
    "elastic": "elastic_fx (xNES)", "fisher": "fisher-only (no search)",
    "fisher_sep": "fisher-only, heads and neurons ranked apart", "magnitude": "magnitude", "lamp": "LAMP",
    "snip": "SNIP-magnitude", "random": "random", "tp_taylor": "Torch-Pruning Taylor",
    "tp_hessian": "Torch-Pruning Hessian", "tp_taylor_ffn": "Torch-Pruning Taylor, FFN only",
}
#: Torch-Pruning variants: method -> (importance, prune heads too)
TP_VARIANTS = {"tp_taylor": ("taylor", True), "tp_hessian": ("hessian", True), "tp_taylor_ffn": ("taylor", False)}
#: Ablation name -> (what it changes, SearchConfig overrides).
ABLATIONS = {
    "all_on": ("every change on (the default search, at ablation size)", {}),
    "linear_space": ("item 1 off: the linear space c = z from the 1.2 -> 0.8 ramp, spread 1, xNES step-size rate",
                     {"space": "linear", "eta_sigma": "xnes"}),
    "pca_cosine": ("fitness: PCA cosine to the dense embeddings (paper Eq. 6), PCA size 'auto' (95 % of the error)",
                   {"fitness": "pca-cosine"}),
    "pca_192": ("item 4 off: PCA cosine, PCA to 192 dims capped at the search images - 1 (the first default)",
                {"fitness": "pca-cosine", "pca_dim": 192}),
    "separate": ("item 5: heads and neurons ranked apart (reference split, head offset 0.15)", {"ranking": "separate"}),
    "cka": ("item 6 on: CKA initial covariance", {"cka_init": True}),
    "sigma_0.1": ("initial spread 0.1", {"sigma0": 0.1}),
    "sigma_0.5": ("initial spread 0.5", {"sigma0": 0.5}),
}
REPORT_DATE = "2026-12-06"
#: QualityConfig fields that change a cached result (the cache folder is keyed by them)
FINGERPRINT_FIELDS = ("grad_images", "batch_size", "fitness_images", "pca_dim", "popsize", "search_sparsities",
                      "generations", "ablation_generations", "ablation_popsize", "val_ref", "val_query", "knn_train",
                      "knn_test", "k", "linear_epochs", "seed")


# ============================================================================ configuration
@dataclass
class QualityConfig:
    """Everything that defines one benchmark run (written into the report)."""

    sparsities: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8)
    methods: Tuple[str, ...] = METHODS
    grad_images: int = 512  # DINO / SNIP / Torch-Pruning gradient images
    batch_size: int = 16  # gradient pass (16 images x 12 crops)
    fitness_images: int = 256  # the search's fitness images: it holds half out for selection
    pca_dim: Any = "auto"  # SearchConfig.pca_dim of the main search
    popsize: int = 0  # 0: the xNES default 4 + floor(3 ln d) (15 for 6 blocks x 6 heads)
    generations: int = 20  # the "elastic" method
    # the search sees the budgets it is judged at (the proxy study on train images: fitness at 60 % does
    # not predict k-NN at 70 %); the low end adds nothing (every method is within noise below 30 %)
    search_sparsities: Tuple[float, ...] = (0.3, 0.5, 0.6, 0.7)
    # ablations: separate, smaller searches (their own generations / population), each one setting changed
    ablations: Tuple[str, ...] = ("all_on", "pca_cosine", "pca_192", "linear_space", "separate", "cka", "sigma_0.1",
                                  "sigma_0.5")
    ablation_generations: int = 8
    ablation_popsize: int = 8
    ablation_sparsities: Tuple[float, ...] = (0.5, 0.6, 0.65, 0.7)
    # does the proxy predict accuracy? candidates of the main search vs k-NN on held-out TRAIN images
    proxy_candidates: int = 30
    proxy_sparsities: Tuple[float, ...] = (0.5, 0.6, 0.7)
    val_ref: int = 600  # validation k-NN reference images (train split, disjoint from gradient / fitness images)
    val_query: int = 300  # validation k-NN queries (train split)
    knn_train: int = 0  # train images in the k-NN reference set (0: all)
    knn_test: int = 0  # test images (0: all)
    k: int = 20
    linear_epochs: int = 100  # 0: no linear probe
    bootstrap: int = 2000  # paired bootstrap resamples of the test images
    latency_methods: Tuple[str, ...] = ()
    latency_batches: Tuple[int, ...] = (1, 64)
    latency_iters: int = 10
    latency_sparsities: Tuple[float, ...] = ()  # (): 0 and every sparsity
    threads: int = 0  # torch / onnxruntime threads (0: every core)
    onnx_exporter: str = "auto"  # efx.export_onnx(exporter=...): the smoke run uses the fast TorchScript one
    eval_batch_size: int = 256
    seed: int = 0


def quick_config() -> QualityConfig:
    """< 2 minutes on 2 idle cores: the same pipeline, smaller everywhere."""
    return QualityConfig(sparsities=(0.5, 0.7), methods=("elastic", "fisher", "magnitude"), grad_images=32,
                         fitness_images=32, popsize=6, generations=3, ablations=("all_on", "linear_space"),
                         ablation_generations=2, ablation_popsize=4, ablation_sparsities=(0.6,), proxy_candidates=6,
                         proxy_sparsities=(0.6,), val_ref=200, val_query=100, knn_train=500, knn_test=300,
                         linear_epochs=10, bootstrap=500)


def smoke_config() -> QualityConfig:
    """Seconds, on a tiny random ViT: exercises every stage (what the test runs)."""
    return QualityConfig(sparsities=(0.3, 0.6), grad_images=4, batch_size=4, fitness_images=8, popsize=4,
                         generations=2, search_sparsities=(0.3, 0.6), ablations=("all_on", "linear_space"),
                         ablation_generations=1, ablation_popsize=4, ablation_sparsities=(0.6,), proxy_candidates=4,
                         proxy_sparsities=(0.6,), val_ref=6, val_query=4, knn_train=0, knn_test=0, k=3,
                         linear_epochs=2, bootstrap=200, latency_methods=("elastic",), latency_batches=(2,),
                         latency_iters=2, latency_sparsities=(0.6,), eval_batch_size=64, threads=1,
                         onnx_exporter="torchscript")


# ============================================================================ setup
@dataclass
class Setup:
    """The model, its traced graph, the images and how they were chosen."""

    name: str
    model: torch.nn.Module  # with its classifier (Torch-Pruning's labelled loss needs logits)
    gm: Any
    smap: Any
    data: LabelledData  # evaluation split (k-NN reference = train, queries = test)
    grad_x: torch.Tensor  # preprocessed float [G, 3, H, W]
    grad_y: torch.Tensor
    fit_x: torch.Tensor
    val_x: torch.Tensor  # validation images (train split, disjoint from the above): reference, then queries
    val_y: torch.Tensor
    n_val_ref: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    image_size: Optional[int]
    notes: List[str] = field(default_factory=list)
    calibration: str = ""  # where grad_x / fit_x come from, when not the train split
    fitness_source: str = ""  # where fit_x comes from, when not the train split or the calibration folder
    tp_x: Optional[torch.Tensor] = None  # Torch-Pruning's labelled images (default: grad_x / grad_y)
    tp_y: Optional[torch.Tensor] = None

    def labelled(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images and labels for Torch-Pruning's cross-entropy importance."""
        return (self.grad_x, self.grad_y) if self.tp_x is None else (self.tp_x, self.tp_y)


def _subsample(n_total: int, n: int) -> np.ndarray:
    """``n`` evenly spread indices of ``n_total`` (all when ``n`` is 0 or too large)."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n).round().astype(int)


def _split(data: LabelledData, cfg: QualityConfig, mean, std, size) -> Tuple[Any, ...]:
    """Evaluation subset + disjoint gradient, fitness and validation images drawn from the train split."""
    perm = np.random.default_rng(cfg.seed).permutation(len(data.y_train))
    cuts = np.cumsum([cfg.grad_images, cfg.fitness_images, cfg.val_ref, cfg.val_query])
    g_idx, f_idx, v_idx = np.sort(perm[: cuts[0]]), np.sort(perm[cuts[0]: cuts[1]]), perm[cuts[1]: cuts[3]]
    grad_x = to_model_input(data.x_train[g_idx], mean, std, size)
    fit_x = to_model_input(data.x_train[f_idx], mean, std, size)
    val_x = to_model_input(data.x_train[v_idx], mean, std, size)
    tr, te = _subsample(len(data.y_train), cfg.knn_train), _subsample(len(data.y_test), cfg.knn_test)
    evald = LabelledData(data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], data.class_names)
    return (evald, grad_x, torch.as_tensor(data.y_train[g_idx]).long(), fit_x, val_x,
            torch.as_tensor(data.y_train[v_idx]).long(), min(cfg.val_ref, len(v_idx)))


def cifar_setup(cfg: QualityConfig, assets: Path) -> Setup:
    """The real CIFAR-10 ViT and subset from ``assets``."""
    import timm

    ckpt = torch.load(assets / "vit-cifar" / "vit_cifar.pt", map_location="cpu", weights_only=True)
    model = timm.models.vision_transformer.VisionTransformer(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    data = load_labelled(assets / "cifar10-subset" / "cifar10_subset.npz")
    parts = _split(data, cfg, CIFAR_MEAN, CIFAR_STD, None)
    gm = efx.trace(model, (parts[1][:2],))
    cfgd = ckpt["config"]
    name = (f"timm ViT (img {cfgd['img_size']}, patch {cfgd['patch_size']}, dim {cfgd['embed_dim']}, depth "
            f"{cfgd['depth']}, {cfgd['num_heads']} heads) trained on the CIFAR-10 subset")
    return Setup(name, model, gm, efx.discover(gm), *parts, CIFAR_MEAN, CIFAR_STD, None)


def smoke_setup(cfg: QualityConfig) -> Setup:
    """A tiny random ViT on random images of 4 classes (no assets, no downloads)."""
    import timm

    torch.manual_seed(cfg.seed)
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                             num_heads=4, mlp_ratio=2, num_classes=4).eval()
    rng = np.random.default_rng(cfg.seed)
    y_tr, y_te = np.arange(36) % 4, np.arange(12) % 4
    x_tr = (rng.integers(0, 256, (36, 16, 16, 3)) // 2 + (y_tr * 40)[:, None, None, None]).astype(np.uint8)
    x_te = (rng.integers(0, 256, (12, 16, 16, 3)) // 2 + (y_te * 40)[:, None, None, None]).astype(np.uint8)
    data = LabelledData(x_tr, y_tr, x_te, y_te, ["a", "b", "c", "d"])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    parts = _split(data, cfg, mean, std, None)
    gm = efx.trace(model, (parts[1][:2],))
    return Setup("tiny random timm ViT (smoke)", model, gm, efx.discover(gm), *parts, mean, std, None)


def user_setup(cfg: QualityConfig, args: argparse.Namespace) -> Setup:
    """``--model`` with ``--train/--test`` folders or ``--data file.npz`` (e.g. ImageNet-1k + ViT-B/16)."""
    from elastic_fx.data import resolve_preprocess
    from elastic_fx.models import load_model
    from elastic_fx.tracing import default_example_inputs

    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint).eval()
    gm = efx.trace(model, default_example_inputs(model))
    pre = resolve_preprocess(gm)
    size = pre.input_size[0]
    data = load_labelled(args.data) if args.data else load_labelled(args.train, args.test, image_size=size)
    parts = _split(data, cfg, pre.mean, pre.std, size)
    return Setup(args.model, model, gm, efx.discover(gm), *parts, tuple(pre.mean), tuple(pre.std), size)


def use_calibration_folder(setup: Setup, cfg: QualityConfig, folder: str) -> None:
    """Gradient + fitness images of the label-free methods from an unlabelled folder (disjoint halves).

    Images are resized / centre-cropped to the model's input and normalised with its statistics.
    Torch-Pruning's labelled loss keeps the train-split images (``setup.tp_x``).
    """
    from elastic_fx.data import PreprocessConfig, load_tensor

    h, w = setup.grad_x.shape[-2:]
    pre = PreprocessConfig((h, w), setup.mean, setup.std)
    x = load_tensor(folder, pre, cfg.grad_images + cfg.fitness_images, seed=cfg.seed)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    setup.tp_x, setup.tp_y = setup.grad_x, setup.grad_y
    setup.grad_x = x[perm[: cfg.grad_images]]
    setup.fit_x = x[perm[cfg.grad_images: cfg.grad_images + cfg.fitness_images]]
    setup.calibration = str(folder)
    setup.name += f"; label-free calibration images from {Path(folder).name}"
    setup.notes = [f"Calibration: the gradient and fitness images of the label-free methods ({len(setup.grad_x)} "
                   f"and {len(setup.fit_x)}) come from {folder}, resized to {h}x{w}; Torch-Pruning keeps "
                   f"{len(setup.tp_x)} labelled CIFAR train images.", ""]


def use_fitness_folder(setup: Setup, cfg: QualityConfig, folder: str) -> None:
    """The search's fitness images (search and selection parts) from an unlabelled folder.

    Why: the CIFAR ViT memorised its train split (the fisher-only ranking at 50 %: k-NN 76 %
    on held-out train images; the dense model: 56.8 % on the test split, per the assets
    README), so on train images the dense embeddings the search imitates are not the ones
    unseen images get. Photos the model never saw stand in for a user's own
    unlabelled images; the gradient images (and so every non-search method) are unchanged.
    """
    from elastic_fx.data import PreprocessConfig, load_tensor

    h, w = setup.grad_x.shape[-2:]
    pre = PreprocessConfig((h, w), setup.mean, setup.std)
    setup.fit_x = load_tensor(folder, pre, cfg.fitness_images, seed=cfg.seed)
    if len(setup.fit_x) < cfg.fitness_images:
        raise efx.DataError(f"{folder} holds {len(setup.fit_x)} readable images; the search needs "
                            f"{cfg.fitness_images} fitness images (--fitness-images, or another --fitness-folder)")
    setup.fitness_source = str(folder)
    setup.name += f"; fitness images from {Path(folder).name}"
    shown = os.path.relpath(folder, REPO) if Path(folder).is_absolute() else folder
    setup.notes += [f"Fitness images: the search's {len(setup.fit_x)} fitness images (search and selection halves) "
                    f"are photos from {shown} that the model never saw, resized to {h}x{w} and normalised with "
                    "the model's statistics. Chosen before this run "
                    "(nothing seen on the test split): the model memorised its train split (the fisher-only ranking "
                    "at 50 % scores 76 % k-NN on held-out train images; the dense model scores 56.8 % on the test "
                    "split, per the assets README), so on train images the dense embeddings "
                    "the search imitates are not the ones unseen images get.", ""]


# ============================================================================ cache
class Cache:
    """Finished results (JSON) and score files in ``work_dir``; a re-run skips what is there."""

    def __init__(self, work_dir: Path, fingerprint: str) -> None:
        import hashlib

        # one sub-folder per configuration: score files of another run are never picked up
        self.dir = Path(work_dir) / hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.json"
        self.data: Dict[str, Any] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") == fingerprint:
                self.data = saved
        self.data["fingerprint"] = fingerprint

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        _atomic_text(self.path, json.dumps(self.data, indent=1))


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_figure(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ============================================================================ scores
class Log:
    """Timestamped progress lines and per-stage seconds."""

    def __init__(self, quiet: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.stages: Dict[str, float] = {}
        self.quiet = quiet
        self.cache: Optional["Cache"] = None

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds
        if self.cache is not None:  # kept across runs: a resumed run reports the time of all its parts
            saved = self.cache.get("stages") or {}
            saved[name] = saved.get(name, 0.0) + seconds
            self.cache.put("stages", saved)


def _local(setup: Setup, cfg: QualityConfig, cache: Cache, method: str, log: Log) -> LocalScores:
    path = cache.dir / f"local_{method}.safetensors"
    if path.is_file():
        return LocalScores.load(path, setup.smap)
    t0 = time.perf_counter()
    images = setup.grad_x if method in ("dino", "snip") else None
    ls = local_scores(setup.gm, images, method=method, batch_size=cfg.batch_size, seed=cfg.seed,
                      num_images=cfg.grad_images, structures=setup.smap, progress=False)
    log.stage(f"scores: {method}", time.perf_counter() - t0)
    log(f"{method} local scores in {time.perf_counter() - t0:.1f}s")
    ls.save(path)
    return ls


def _search(setup: Setup, cfg: QualityConfig, local: LocalScores, name: str, cache: Cache, log: Log,
            iterations: int, popsize: int, **overrides: Any):
    """One ``efx.prune`` search, cached as ``search_{name}.efx``; ``overrides`` change SearchConfig fields.

    The factor vectors of its selection pool go to the cache (``pool/{name}``), and its whole
    trajectory (every candidate with its search fitness) to ``trajectory/{name}``.
    """
    path = cache.dir / f"search_{name}.efx"
    if path.is_file() and cache.get(f"pool/{name}") is not None:
        return efx.ElasticScores.load(path, setup.smap)
    sc = SearchConfig(**{"num_fitness_images": len(setup.fit_x), "pca_dim": cfg.pca_dim,
                         "popsize": popsize or None, "batch_size": cfg.batch_size, "seed": cfg.seed, **overrides})
    record: list = []
    t0 = time.perf_counter()
    scores = prune(setup.gm, setup.grad_x, iterations=iterations, sparsities=cfg.search_sparsities,
                   fitness_images=setup.fit_x, config=sc, local=local, progress=False, callback=record.append)
    log.stage(f"search: {name}", time.perf_counter() - t0)
    log(f"search {name} ({iterations} generations, {time.perf_counter() - t0:.0f}s): {scores.selection['summary']}")
    scores.save(path)
    sel = [r for r in record if r["phase"] == "selection"]
    cache.put(f"pool/{name}", sel[0]["factors"].tolist() if sel else [])
    cache.put(f"trajectory/{name}", [{"generation": r["generation"], "factors": r["factors"].tolist(),
                                      "fitness": r["fitness"].tolist()} for r in record if r["phase"] == "generation"])
    return scores


# ============================================================================ Torch-Pruning
def tp_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, batch_size: int = 32
                 ) -> Dict[str, torch.Tensor]:
    """What Torch-Pruning's importance reads from ``.grad``, by parameter name.

    ``taylor``: the gradient of the mean cross-entropy over all images. ``hessian``: the
    mean over images of each image's squared gradient (the diagonal Fisher that
    ``HessianImportance.accumulate_grad`` is meant to build; see the note in quality.md).
    """
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(True)
    n = len(x)
    if kind == "taylor":
        m.zero_grad(set_to_none=True)
        for i in range(0, n, batch_size):
            (F.cross_entropy(m(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum") / n).backward()
        return {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}
    acc: Dict[str, torch.Tensor] = {}
    for i in range(n):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in m.named_parameters():
            if p.grad is not None:
                acc[k] = acc[k] + p.grad.square() if k in acc else p.grad.square()
    return {k: v / n for k, v in acc.items()}


def tp_counts(smap, sparsity: float, heads: bool = True) -> Tuple[int, int]:
    """Heads and neurons to remove so the removed block parameters reach ``sparsity``.

    ``heads=True``: the same fraction of heads as of parameters (rounded), then neurons fill
    the rest. ``heads=False``: neurons only (a ValueError when they cannot reach it).
    """
    blocks = [b for b in smap.blocks if b.attention is not None and b.mlp is not None]
    total_h = sum(b.attention.num_heads for b in blocks)
    total_n = sum(b.mlp.hidden_features for b in blocks)
    pph = blocks[0].attention.params_per_head
    ppn = blocks[0].mlp.params_per_neuron
    n_h = int(round(sparsity * total_h)) if heads else 0
    need = sparsity * smap.prunable_params - n_h * pph
    n_n = max(0, int(math.ceil(need / ppn - 1e-9)))
    if n_n >= total_n:
        raise ValueError(f"cannot reach sparsity {sparsity} with FFN neurons alone (they hold "
                         f"{total_n * ppn / smap.prunable_params:.3f} of the block parameters)")
    return n_h, n_n


def tp_prune(model: torch.nn.Module, grads: Dict[str, torch.Tensor], kind: str, sparsity: float, smap,
             example: torch.Tensor, heads: bool = True) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A copy of the timm ViT pruned by Torch-Pruning's MetaPruner (global ranking, whole heads + FFN neurons)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    named = dict(m.named_parameters())
    for k, g in grads.items():
        named[k].grad = g.clone()
    imp = tp.importance.TaylorImportance() if kind == "taylor" else tp.importance.HessianImportance()
    n_h, n_n = tp_counts(smap, sparsity, heads)
    total_h = sum(b.attn.num_heads for b in m.blocks)
    total_n = sum(b.mlp.fc1.out_features for b in m.blocks)
    # residual-stream writers are ignored so the embedding width stays; only heads and FFN neurons go
    ignored = [m.head, m.patch_embed] + [b.attn.proj for b in m.blocks] + [b.mlp.fc2 for b in m.blocks]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # FFN neurons: one ranking scope of every fc1 (a tuple key), so exactly n_n of them go; the
        # attention groups stay in the default scope, where a positive ratio triggers the global head
        # ranking and prune_head_dims=False keeps whole heads (their widths are not cut)
        pruner = tp.pruner.MetaPruner(
            m, example_inputs=example, importance=imp, global_pruning=True, pruning_ratio=0.5,
            pruning_ratio_dict={tuple(b.mlp.fc1 for b in m.blocks): (n_n - 0.5) / total_n if n_n else 0.0},
            num_heads={b.attn.qkv: b.attn.num_heads for b in m.blocks}, prune_num_heads=n_h > 0,
            prune_head_dims=False, head_pruning_ratio=(n_h - 0.5) / total_h if n_h else 0.0,
            ignored_layers=ignored)
        pruner.step()
    for b in m.blocks:  # Torch-Pruning leaves the attention's head count to the user
        b.attn.num_heads = pruner.num_heads[b.attn.qkv]
        b.attn.attn_dim = b.attn.num_heads * b.attn.head_dim
    for p in m.parameters():
        p.grad = None
    heads = [b.attn.num_heads for b in m.blocks]
    neurons = [b.mlp.fc1.out_features for b in m.blocks]
    removed = sum((bs.attention.num_heads - h) * bs.attention.params_per_head
                  + (bs.mlp.hidden_features - n) * bs.mlp.params_per_neuron
                  for bs, h, n in zip(smap.blocks, heads, neurons))
    info = {"sparsity": removed / smap.prunable_params, "params": sum(p.numel() for p in m.parameters()),
            "kept_heads": heads, "kept_neurons": neurons}
    return m, info


# ============================================================================ evaluation
def _linear(cfg: QualityConfig) -> Optional[LinearProbeConfig]:
    return LinearProbeConfig(epochs=cfg.linear_epochs, seed=cfg.seed) if cfg.linear_epochs > 0 else None


def _row(acc: Dict[str, Any], sparsity: float, params: int, seconds: float, **extra: Any) -> Dict[str, Any]:
    return {"sparsity": sparsity, "params": params, "knn": acc["knn_top1"], "linear": acc.get("linear_top1"),
            "knn_correct": _bits(acc.get("knn_correct")), "linear_correct": _bits(acc.get("linear_correct")),
            "seconds": round(seconds, 2), **extra}


def eval_scores(setup: Setup, cfg: QualityConfig, cache: Cache, name: str, scores: Any, sparsities: Sequence[float],
                log: Log) -> None:
    """Evaluate the sub-networks of one ranking at the sparsities not yet in the cache."""
    todo = [s for s in sparsities if cache.get(f"eval/{name}/{s:.2f}") is None]
    if not todo:
        return
    t0 = time.perf_counter()
    results = evaluate_budgets(setup.gm, scores, setup.data, todo, mean=setup.mean, std=setup.std,
                               image_size=setup.image_size, k=cfg.k, linear=_linear(cfg),
                               batch_size=cfg.eval_batch_size)
    for r in results:
        keep = scores.keep(setup.smap, r.target_sparsity)
        row = {"sparsity": r.sparsity, "params": r.params, "gflops": r.gflops, "knn": r.knn_top1,
               "linear": r.linear_top1, "seconds": round(r.seconds, 2),
               "knn_correct": _bits(r.knn_correct), "linear_correct": _bits(r.linear_correct),
               "kept_heads": [len(keep[b.index].get("heads", [])) for b in setup.smap.blocks],
               "kept_neurons": [len(keep[b.index].get("neurons", [])) for b in setup.smap.blocks]}
        cache.put(f"eval/{name}/{r.target_sparsity:.2f}", row)
        log(f"{name:>11} @ {r.target_sparsity:.2f}: k-NN {100 * r.knn_top1:5.1f}"
            + ("" if r.linear_top1 is None else f"  linear {100 * r.linear_top1:5.1f}") + f"  ({r.seconds:.1f}s)")
    log.stage("evaluation", time.perf_counter() - t0)


def eval_module(setup: Setup, cfg: QualityConfig, module: torch.nn.Module) -> Dict[str, Any]:
    """k-NN (+ probe) of any nn.Module's pooled embedding (traced and cut like ours)."""
    gm = efx.trace(module, (setup.grad_x[:2],))
    emb = embedding_module(gm, efx.discover(gm))
    return evaluate_features(emb, setup.data, mean=setup.mean, std=setup.std, image_size=setup.image_size,
                             batch_size=cfg.eval_batch_size, k=cfg.k, linear=_linear(cfg))


def eval_dense(setup: Setup, cfg: QualityConfig, cache: Cache, log: Log) -> None:
    if cache.get("eval/dense") is not None:
        return
    t0 = time.perf_counter()
    acc = eval_module(setup, cfg, setup.model)
    cache.put("eval/dense", _row(acc, 0.0, sum(p.numel() for p in setup.model.parameters()), time.perf_counter() - t0))
    log.stage("evaluation", time.perf_counter() - t0)
    log(f"dense: k-NN {100 * acc['knn_top1']:.1f}")


def eval_torch_pruning(setup: Setup, cfg: QualityConfig, cache: Cache, log: Log) -> None:
    import importlib.util

    missing = None if importlib.util.find_spec("torch_pruning") else \
        "torch-pruning is not installed (pip install torch-pruning)"
    grads: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, (kind, heads) in TP_VARIANTS.items():
        if name not in cfg.methods:
            continue
        todo = [s for s in cfg.sparsities if cache.get(f"eval/{name}/{s:.2f}") is None]
        if not todo:
            continue
        if missing:
            log(f"{name}: skipped, {missing}")
            for s in todo:
                cache.put(f"eval/{name}/{s:.2f}", {"sparsity": s, "error": missing})
            continue
        if kind not in grads:  # the FFN-only variant reuses the Taylor gradients
            t0 = time.perf_counter()
            grads[kind] = tp_gradients(setup.model, *setup.labelled(), kind)
            log.stage(f"scores: tp_{kind}", time.perf_counter() - t0)
            log(f"tp_{kind} gradients in {time.perf_counter() - t0:.1f}s")
        for s in todo:
            t1 = time.perf_counter()
            try:
                pruned, info = tp_prune(setup.model, grads[kind], kind, s, setup.smap, setup.grad_x[:2], heads)
                acc = eval_module(setup, cfg, pruned)
                row = _row(acc, info["sparsity"], info["params"], time.perf_counter() - t1,
                           kept_heads=info["kept_heads"], kept_neurons=info["kept_neurons"])
                log(f"{name:>11} @ {s:.2f}: k-NN {100 * acc['knn_top1']:5.1f} (achieved {info['sparsity']:.3f})")
            except Exception as e:  # a baseline failing is a result to report, not a crash
                row = {"sparsity": s, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"{name:>11} @ {s:.2f}: FAILED {row['error']}")
            cache.put(f"eval/{name}/{s:.2f}", row)
            log.stage("evaluation", time.perf_counter() - t1)


# ============================================================================ latency
def measure_latency(setup: Setup, cfg: QualityConfig, cache: Cache, rankings: Dict[str, Any], log: Log) -> None:
    """Export every (method, sparsity) of ``cfg.latency_methods`` to ONNX; onnxruntime CPU latency."""
    from elastic_fx.exporters.onnx import onnx_latency

    grads: Dict[str, Dict[str, torch.Tensor]] = {}
    for name in cfg.latency_methods:
        for s in cfg.latency_sparsities or (0.0,) + tuple(cfg.sparsities):
            key = f"latency/{name}/{s:.2f}"
            if cache.get(key) is not None or (name.startswith("tp_") and s == 0.0):
                continue
            t0 = time.perf_counter()
            try:
                if name in TP_VARIANTS:
                    kind, heads = TP_VARIANTS[name]
                    if kind not in grads:
                        grads[kind] = tp_gradients(setup.model, *setup.labelled(), kind)
                    module = tp_prune(setup.model, grads[kind], kind, s, setup.smap, setup.grad_x[:2], heads)[0]
                else:
                    module = efx.ElasticModel(setup.gm, rankings[name]).at(s)
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "m.onnx"
                    efx.export_onnx(module, path, setup.grad_x[:1], exporter=cfg.onnx_exporter)
                    row = {f"b{b}_ms": 1e3 * onnx_latency(path, b, iters=cfg.latency_iters, threads=cfg.threads or None)
                           for b in cfg.latency_batches}
            except Exception as e:
                row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            cache.put(key, row)
            log.stage("onnx export + latency", time.perf_counter() - t0)
            log(f"latency {name} @ {s:.2f}: {row}")


# ============================================================================ report
def _table(cache: Cache, methods: Sequence[str], sparsities: Sequence[float], metric: str) -> Tuple[List[str], Dict]:
    dense = cache.get("eval/dense") or {}
    values: Dict[str, Dict[float, Optional[float]]] = {}
    head = "| method | 0 (dense) | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    lines = [head, "|---|" + "---:|" * (len(sparsities) + 1)]
    for m in methods:
        row = [LABELS.get(m, m), _pct(dense.get(metric))]
        values[m] = {}
        for s in sparsities:
            r = cache.get(f"eval/{m}/{s:.2f}") or {}
            v = r.get(metric)
            values[m][s] = v
            row.append(("n/a" if "cannot reach" in r["error"] else "fail") if "error" in r else _pct(v))
        lines.append("| " + " | ".join(row) + " |")
    return lines, values


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _plots(out: Path, cache: Cache, cfg: QualityConfig, variants: Dict[str, Any]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    dense = cache.get("eval/dense") or {}
    metrics = [("knn", "k-NN top-1 (%)")] + ([("linear", "linear probe top-1 (%)")] if cfg.linear_epochs else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        for m in cfg.methods:
            xs, ys = [0.0], [dense.get(metric)]
            for s in cfg.sparsities:
                r = cache.get(f"eval/{m}/{s:.2f}") or {}
                if r.get(metric) is not None:
                    xs.append(100 * r.get("sparsity", s))
                    ys.append(r[metric])
            if ys[0] is None:
                xs, ys = xs[1:], ys[1:]
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=LABELS.get(m, m),
                    lw=2.2 if m == "elastic" else 1.2, ls="--" if m.startswith("tp_") else "-")
        ax.set_xlabel("sparsity (% of block parameters removed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("accuracy vs sparsity")
    _atomic_figure(fig, out / "quality_sparsity.png")
    plt.close(fig)
    made.append("quality_sparsity.png")

    traj = cache.get("trajectory/main") or []
    if traj:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        g = [t["generation"] + 1 for t in traj]
        ax.plot(g, [max(t["fitness"]) for t in traj], label="best of generation")
        ax.plot(g, [float(np.mean(t["fitness"])) for t in traj], alpha=0.6, label="population mean")
        c1 = (cache.get("selection/main") or {}).get("c1", {}).get("search")
        if c1 is not None:
            ax.axhline(c1, color="k", ls="--", lw=1, label="c = 1 (no search)")
        ax.set_xlabel("generation")
        ax.set_ylabel("search fitness")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _atomic_figure(fig, out / "quality_search.png")
        plt.close(fig)
        made.append("quality_search.png")
    return made


def _fitness_where(setup: Setup) -> str:
    """Where the search's fitness (search and selection) images come from, for the report."""
    source = setup.fitness_source or setup.calibration
    return f"photos from {Path(source).name} the model never saw" if source else "TRAIN images"


def _headroom(cache: Cache, cfg: QualityConfig) -> List[str]:
    """dense - fisher-only k-NN with paired intervals: how far above the no-search ranking any ranking can be
    without beating the dense model."""
    dense = _unbits((cache.get("eval/dense") or {}).get("knn_correct"))
    cells = []
    for s in (s for s in cfg.sparsities if s >= 0.5):
        fisher = _unbits((cache.get(f"eval/fisher/{s:.2f}") or {}).get("knn_correct"))
        if dense is None or fisher is None or len(dense) != len(fisher):
            continue
        d, lo, hi = paired_interval(dense.astype(float), fisher.astype(float), cfg.bootstrap)
        cells.append(f"{s:.0%} {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    if not cells:
        return []
    return ["* headroom, dense - fisher-only (k-NN points, paired 95 % intervals): " + "; ".join(cells) + ". An "
            "interval of elastic - fisher-only above 0 where this headroom is within about a point needs a pruned "
            "model at or above the dense one."]


def _other_runs(out: Path) -> List[str]:
    """One line per other run of this benchmark kept in a sub-folder of ``out``: its fitness images,
    its search's choice and elastic - fisher-only (k-NN points, paired 95 % intervals)."""
    lines, choice = [], {"c=1": "c = 1 (the no-search ranking)", "search": "its winner"}
    for path in sorted(out.glob("*/quality.json")):
        run = json.loads(path.read_text())
        head, cfg = run.get("headline", {}), run.get("config", {})
        ci = head.get("elastic_minus_fisher_knn_ci") or {}
        cells = "; ".join(f"{float(s):.0%} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]"  # already in points
                          for s, (d, lo, hi) in ci.items() if float(s) >= 0.5)
        lines.append(f"* [{path.parent.name}/quality.md]({path.parent.name}/quality.md): {head.get('model', '?')}, "
                     f"{cfg.get('fitness_images', '?')} fitness images, {cfg.get('generations', '?')} generations; "
                     f"the search returned {choice.get(head.get('main_choice'), '?')}; elastic - fisher-only k-NN: {cells}.")
    return ["## Other runs of this benchmark", ""] + lines + [""] if lines else []


def _claims(ci: Dict[str, Dict[float, Any]], sparsities: Sequence[float]) -> List[str]:
    """The issue's goal, checked on the intervals of this run (k-NN points) at the issue's sparsities
    (10 ... 70 % and 65 %; higher ones are reported above, not part of the goal)."""
    lines = []
    ci = {m: {s: v for s, v in row.items() if s <= 0.7 + 1e-9} for m, row in ci.items()}
    fi = ci.get("fisher", {})
    if fi:
        ok_all = all(lo > -0.01 for _, lo, _ in fi.values())
        high = [s for s in (0.5, 0.6, 0.65, 0.7) if s in fi]
        strict = [s for s in high if fi[s][1] > 0]
        lines.append(f"* elastic >= fisher-only at every sparsity (lower end of the interval > -1 point): "
                     f"**{'yes' if ok_all else 'no'}** (lowest lower end {100 * min(lo for _, lo, _ in fi.values()):+.1f})")
        lines.append(f"* strictly better (interval above 0) at two or more of 50/60/65/70 %: "
                     f"**{'yes' if len(strict) >= 2 else 'no'}** (above 0 at: "
                     f"{', '.join(f'{s:.0%}' for s in strict) or 'none'})")
    for other in ("magnitude", "lamp", "snip", "tp_taylor", "tp_hessian"):
        ov = {s: v for s, v in ci.get(other, {}).items() if s >= 0.5}
        if ov:
            ok = all(d >= 0 for d, _, _ in ov.values())
            lines.append(f"* elastic >= {LABELS[other]} at every sparsity >= 50 %: **{'yes' if ok else 'no'}** ("
                         + ", ".join(f"{s:.0%} {100 * d:+.1f}" for s, (d, _, _) in ov.items()) + ")")
    return lines


def _protocol_notes(setup: Setup, cfg: QualityConfig) -> List[str]:
    """How every method was run, and where this run departs from the paper's protocol."""
    from importlib import metadata

    tp = [m for m in cfg.methods if m in TP_VARIANTS]
    try:
        tp_version = metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        tp_version = "not installed"
    heads = sum(b.attention.num_heads for b in setup.smap.blocks if b.attention is not None)
    d = len(Layout.of(setup.smap).ones())
    n_test = max(1, len(setup.data.y_test))
    lines = ["## How the methods were run", "",
             f"* **elastic_fx (xNES)**: `efx.prune(gm, images, iterations={cfg.generations}, "
             f"sparsities={list(cfg.search_sparsities)}, local=<the DINO local scores>)` with the default "
             f"SearchConfig: {cfg.fitness_images} fitness images ({_fitness_where(setup)}), split (seeded) into a search half and a selection "
             f"half; log-space factors c = exp(z) started at c = 1; fitness: neighbourhood overlap (T = 0.07); global "
             f"ranking; population {cfg.popsize or 'default (4 + floor(3 ln d))'}; the best on the selection half "
             "among c = 1, the final mean and the 8 best candidates by search fitness replaces c = 1 only when its "
             "per-image gain has a 95 % paired-bootstrap interval above 0. One ranking for every sparsity.",
             "* **fisher-only, heads and neurons ranked apart**: the same local scores, c = 1, `ranking=\"separate\"` "
             "(the reference code's split: head removal trails neuron removal by 0.15).",
             f"* **fisher-only**: the same DINO local scores (squared gradients of the DINO multi-crop loss, "
             f"2 global + 10 local crops, {cfg.grad_images} images in batches of {cfg.batch_size}), ranked without "
             "search (`ElasticScores.from_local`, c = 1). The DINO scores are computed once and reused by every "
             "search variant.",
             "* **magnitude / LAMP / random / SNIP-magnitude**: `local_scores(method=...)` (SNIP on the same DINO "
             "loss and images), ranked by the same budget walk and per-block floors (20 % of heads, 5 % of neurons).",
             ]
    if tp:
        lines += [
            f"* **Torch-Pruning** (torch-pruning {tp_version}, `tp.pruner.MetaPruner`, `global_pruning=True`): "
            "the timm model "
            "with its classifier; importance from the cross-entropy loss WITH the labels of the same gradient "
            "images (its documented use: a labelled loss, which the label-free methods do not get). The residual-"
            "stream writers (patch embedding, every `attn.proj` and `mlp.fc2`, the head) are ignored so that only "
            "whole heads (`num_heads`, `prune_num_heads=True`, `prune_head_dims=False`) and FFN neurons (all `fc1` in "
            "one ranking scope) are removed; each block's `attn.num_heads` is patched afterwards (Torch-Pruning "
            "leaves that to the user). Budget: Torch-Pruning takes a head ratio and a channel ratio, not a "
            f"parameter budget, so the benchmark removes `round(s x {heads})` heads (the same fraction of heads as of "
            "parameters) and as many neurons as complete the parameter budget (achieved sparsity = target within "
            "one neuron). `Taylor, FFN only` removes neurons only (head ratio 0), which cannot reach more than the "
            "FFNs' share of the block parameters (n/a above it). Torch-Pruning has no per-block floor: at 80 % its "
            "global head ranking empties a block's attention and the model no longer runs (`fail`).",
            f"* Torch-Pruning {tp_version}'s `HessianImportance.accumulate_grad` tests `name in self._accu_grad` "
            "but stores "
            "under the parameter object, so every call overwrites the sum: as shipped it keeps only the LAST "
            "sample's squared gradient. The benchmark computes the intended per-sample mean of squared gradients "
            "itself and hands it to the importance (a stronger baseline than the library as shipped).",
            "* Torch-Pruning's pruned models compute exactly what `efx.slice` gives for the same kept heads and "
            "neurons (checked in tests/test_bench_quality.py), so all methods differ only in what they keep.",
        ]
    lines += ["", "Departures from the paper's protocol (CPU budget): "
              f"{cfg.grad_images} gradient images [paper: 1000]; {cfg.fitness_images} fitness images [1000]; "
              f"{cfg.generations} generations [50]; {len(setup.smap.blocks)} blocks, d = {d} search dimensions "
              f"[ImageNet ViT-B/16: d = 156]; population {cfg.popsize or 4 + int(3 * math.log(d))}. The k-NN "
              f"reference set has {len(setup.data.y_train)} images and the test set {n_test}: one accuracy has a "
              f"standard error of up to {100 * math.sqrt(0.25 / n_test):.1f} points, which is why every difference "
              "below comes with a paired interval.", ""]
    return lines


def write_report(out: Path, setup: Setup, cfg: QualityConfig, cache: Cache, variants: Dict[str, Any], log: Log,
                 mode: str, wall: float) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    knn_lines, knn = _table(cache, cfg.methods, cfg.sparsities, "knn")
    lin_lines, _ = _table(cache, cfg.methods, cfg.sparsities, "linear") if cfg.linear_epochs else ([], {})
    ci_lines, ci = _interval_table(cache, cfg, "knn")
    lci_lines, _ = _interval_table(cache, cfg, "linear") if cfg.linear_epochs else ([], {})
    plots = _plots(out, cache, cfg, variants)
    dense = cache.get("eval/dense") or {}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    stages = cache.get("stages") or log.stages
    main = cache.get("selection/main") or {}
    md = [f"# Quality benchmark ({mode} run)", "",
          f"Date: {REPORT_DATE}. Machine: {platform.machine()} CPU, {os.cpu_count()} cores "
          f"({_cpu_name()}), torch {torch.__version__}, Python {platform.python_version()}; "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. "
          f"Compute time {max(wall or 0.0, sum(stages.values())) / 60:.1f} min (the stages below, summed over "
          "resumed runs; other jobs shared the cores, so stage times are upper bounds). No GPU. Produced by "
          f"`python benchmarks/bench_quality.py {' '.join(sys.argv[1:])}`.".replace(" `.", "`."), "",
          f"Model: {setup.name}. Evaluation: k-NN (k={cfg.k}, L2-normalised pooled embeddings) with "
          f"{len(setup.data.y_train)} train images as the reference set and {len(setup.data.y_test)} test images"
          + (f"; linear probe: the DINO recipe (SGD, momentum 0.9, lr 1e-3, batch 256, cosine) for "
             f"{cfg.linear_epochs} epochs on the same frozen features, best-of-10%-held-out-train epoch"
             if cfg.linear_epochs else "")
          + f". Nothing was chosen on the test split: the search picks its winner on held-out "
            f"{_fitness_where(setup)}, every default was set before this run or from train-split measurements.", ""]
    md += setup.notes + _protocol_notes(setup, cfg)
    md += ["## k-NN top-1 (%) vs sparsity", "",
           "Sparsity = fraction of the blocks' prunable parameters (heads + FFN neurons) removed; "
           "every method removes whole heads and whole neurons.", ""] + knn_lines + [""]
    md += ["## elastic - each method: k-NN points with paired-bootstrap 95 % intervals", "",
           f"{cfg.bootstrap} resamples of the {len(setup.data.y_test)} test images (both models scored on the same "
           "resample); **bold**: the interval lies above 0.", ""] + ci_lines + [""]
    if lin_lines:
        md += ["## Linear probe top-1 (%) vs sparsity", ""] + lin_lines + ["", "Linear probe: elastic - each method "
               "(points, paired-bootstrap 95 % intervals)", ""] + lci_lines + [""]
    md += ["![accuracy vs sparsity](quality_sparsity.png)", "", "## The goal (issue 13) on this model", ""]
    md += _claims(ci, cfg.sparsities) + _headroom(cache, cfg) + [""] + _other_runs(out)
    if main:
        md += ["## The main search's choice", "", f"* {main.get('summary', '')}",
               f"* fitness: {main.get('fitness_space', '')}", "", "![search trajectory](quality_search.png)", ""]
    md += [] if not variants else ["## Ablations", "",
           f"Separate searches of {cfg.ablation_generations} generations, population {cfg.ablation_popsize}, search "
           f"sparsities {list(cfg.search_sparsities)}, each changing one setting of the default search; k-NN "
           "on the test split at the ablation sparsities. Search fitness: on the search half of the fitness images; "
           "selection fitness: on the held-out half (what chooses the winner).", ""]
    md += _ablation_rows(cache, cfg, variants) + [""] if variants else []
    md += _validation_search_rows(cache, cfg)
    val = cache.get("validation/ranking")
    if val:
        md += ["## How the defaults were chosen (train-split validation only)", "",
               f"k-NN of the no-search ranking on validation images of the train split ({cfg.val_ref} reference, "
               f"{cfg.val_query} queries, disjoint from the gradient and fitness images; the model was trained on "
               "these images, so the numbers sit above the test ones):", "",
               "| ranking | " + " | ".join(f"{float(s):.0%}" for s in val["fisher"]) + " |",
               "|---|" + "---:|" * len(val["fisher"])]
        for name, label in (("fisher", "global (default)"), ("fisher_sep", "separate (head offset 0.15)")):
            md.append(f"| {label} | " + " | ".join(_pct(v) for v in val[name].values()) + " |")
        if {"sigma_0.1", "sigma_0.5"} <= set(variants):
            md += ["", "Initial spread: the selection fitness of the winners of `sigma_0.1`, `all_on` (0.25, the "
                   f"default) and `sigma_0.5` above is the spread curve (the selection images are {_fitness_where(setup)}). The "
                   "default was set before the run and is kept while that curve stays flat within its noise.", ""]
        else:
            md += ["", "Initial spread: not part of this run (`--ablations sigma_0.1 sigma_0.5` measures the curve). "
                   "With the PCA-cosine fitness the curve was flat (selection fitness 0.922 / 0.925 / 0.926 for "
                   "0.1 / 0.25 / 0.5, the run of commit f67e72d), so the default 0.25 was kept.", ""]
    proxy = cache.get("proxy")
    if proxy:
        md += ["## Does the proxy predict accuracy?", "",
               f"{len(proxy['candidates'])} candidates of the main search (c = 1, the winner, and candidates spread "
               "over its generations), each scored by the fitness on the selection images and by k-NN on "
               f"VALIDATION images of the train split ({cfg.val_ref} reference, {cfg.val_query} queries; never the "
               "test split). Spearman rank correlation per sparsity:", "",
               "| proxy | " + " | ".join(f"{float(s):.0%}" for s in proxy["val_knn"]) + " |",
               "|---|" + "---:|" * len(proxy["val_knn"])]
        for name, row in proxy["spearman"].items():
            md.append(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in row.values()) + " |")
        md += ["", "With 300 validation queries, and candidates whose k-NN differs by one or two points, one "
               "correlation over 30 candidates is a noisy read (its standard error is about 0.18). The default "
               "fitness moved from the PCA cosine to the neighbourhood overlap on an exploratory study of the "
               "previous run's candidates (16: c = 1, its winner, its trajectory and pool, random perturbations; "
               "scored on the same selection images, k-NN on 1000 + 1000 validation images of the train split: "
               "Spearman +0.56 / +0.39 / -0.24 for the neighbourhood overlap against +0.00 / +0.07 / -0.47 for the "
               f"PCA cosine at 50 / 60 / 70 %). {_proxy_verdict(proxy['spearman'])} These correlations are "
               "with k-NN on TRAIN images, which the model memorised: the table 'Held-out train images vs the test "
               "split' shows how far gains there carry to the test split.", ""]
    if cfg.latency_methods:
        md += ["## Accuracy vs measured ONNX Runtime latency", ""]
        lat_cols = [f"b{b}_ms" for b in cfg.latency_batches]
        md += ["| method | sparsity | " + " | ".join(f"batch {b} (ms)" for b in cfg.latency_batches) + " | k-NN (%) |",
               "|---|---:|" + "---:|" * (len(lat_cols) + 1)]
        for m in cfg.latency_methods:
            for s in (0.0,) + tuple(cfg.sparsities):
                lat = cache.get(f"latency/{m}/{s:.2f}")
                if lat is None:
                    continue
                acc = dense if s == 0.0 else cache.get(f"eval/{m}/{s:.2f}") or {}
                cells = ["fail" if c not in lat else f"{lat[c]:.2f}" for c in lat_cols]
                md.append(f"| {LABELS.get(m, m)} | {s:.0%} | " + " | ".join(cells) + f" | {_pct(acc.get('knn'))} |")
        md += [""]
    md += ["## Settings and time per stage", "", "```", json.dumps(_jsonable(asdict(cfg))), "```", "",
           "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in sorted(stages.items())]
    errors = [f"* {k}: {v['error']}" for k, v in sorted(cache.data.items()) if isinstance(v, dict) and "error" in v]
    if errors:
        md += ["", "## Failures", ""] + errors
    _atomic_text(out / "quality.md", "\n".join(md) + "\n")
    headline = {
        "bench": "quality", "mode": mode, "model": setup.name, "dense_knn": dense.get("knn"),
        "knn": {m: {f"{s:.2f}": knn.get(m, {}).get(s) for s in cfg.sparsities if s >= 0.5} for m in cfg.methods},
        "elastic_minus_fisher_knn_ci": {f"{s:.2f}": [round(100 * v, 2) for v in ci.get("fisher", {}).get(s, ())]
                                        for s in cfg.sparsities},
        "main_choice": main.get("chosen"), "wall_s": round(wall, 1), "plots": plots,
    }
    slim = {k: ({kk: vv for kk, vv in v.items() if not kk.endswith("_correct")} if isinstance(v, dict) else v)
            for k, v in cache.data.items() if not k.startswith(("trajectory/", "pool/"))}
    full = {"headline": headline, "config": _jsonable(asdict(cfg)), "results": slim, "stages_s": stages,
            "date": REPORT_DATE, "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                                             "torch": torch.__version__, "load_avg_end": list(load)}}
    _atomic_text(out / "quality.json", json.dumps(full, indent=1))
    return headline


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _derived(scores: Any, choose: str) -> Optional[Dict[str, Any]]:
    """The pool entry another choice rule picks among the same evaluated candidates (items 2 and 3 off)."""
    pool = scores.selection.get("pool") or []
    if not pool:
        return None
    if choose == "by_search":  # item 3 off: the best search fitness wins, nothing held out
        best = max(pool, key=lambda e: e["search"])
    elif choose == "any_gain":  # the best selection fitness wins, however small its gain over c = 1
        best = max(pool, key=lambda e: e["selection"])
    else:  # item 2 off: no c = 1 and no final mean among the choices
        rest = [e for e in pool if e["name"] not in ("c=1", "final mean")]
        if not rest:
            return None
        best = max(rest, key=lambda e: e["selection"])
    return best


def _bits(x: Optional[np.ndarray]) -> Optional[str]:
    """A bool vector as a compact string of 0/1 (for the JSON cache)."""
    return None if x is None else "".join("1" if v else "0" for v in np.asarray(x).ravel())


def _unbits(s: Optional[str]) -> Optional[np.ndarray]:
    return None if s is None else np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")


def paired_interval(a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0) -> Tuple[float, float, float]:
    """Mean of ``a - b`` (per-image correctness of two models on the same images) and its
    paired-bootstrap 95 % interval: the test images are resampled, both models together."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    boots = diff[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def _validation_knn(setup: Setup, cfg: QualityConfig, masked: Any, scores: Any) -> Dict[str, float]:
    """k-NN of ``scores``' sub-networks on the train-split validation images, per ablation sparsity."""
    from elastic_fx.search.evaluate import masked_embeddings

    nr = setup.n_val_ref
    keeps = [scores.keep(setup.smap, s) for s in cfg.ablation_sparsities]
    emb = masked_embeddings(masked, setup.val_x, keeps, batch_size=128)
    return {f"{s:.2f}": knn_top1(e[:nr], setup.val_y[:nr], e[nr:], setup.val_y[nr:], k=min(cfg.k, nr))
            for s, e in zip(cfg.ablation_sparsities, emb)}


def validation_defaults(setup: Setup, cfg: QualityConfig, cache: Cache, rankings: Dict[str, Any], log: Log) -> None:
    """The ranking default, measured where choosing is allowed: k-NN of the no-search rankings
    (global vs separate) on VALIDATION images of the train split (never the test split)."""
    if cache.get("validation/ranking") is not None:
        return
    from elastic_fx.passes.mask import build_masked

    t0 = time.perf_counter()
    masked = build_masked(setup.gm, setup.smap)
    out = {name: _validation_knn(setup, cfg, masked, rankings[name]) for name in ("fisher", "fisher_sep")}
    cache.put("validation/ranking", out)
    log.stage("validation of defaults", time.perf_counter() - t0)
    log(f"validation k-NN, global vs separate ranking (c = 1): {out}")


def validation_search(setup: Setup, cfg: QualityConfig, cache: Cache, rankings: Dict[str, Any],
                      variants: Dict[str, Any], log: Log) -> None:
    """k-NN of the no-search ranking, the main search and every ablation search on VALIDATION images
    of the train split, at the ablation sparsities: does a search that wins on held-out train images
    also win on the test split? (Reported only; nothing is chosen on it.)"""
    if cache.get("validation/search") is not None:
        return
    from elastic_fx.passes.mask import build_masked

    t0 = time.perf_counter()
    masked = build_masked(setup.gm, setup.smap)
    runs = {"fisher": rankings["fisher"], "elastic": rankings["elastic"],
            **{f"abl_{k}": v for k, v in variants.items()}}
    out = {name: _validation_knn(setup, cfg, masked, sc) for name, sc in runs.items()}
    cache.put("validation/search", out)
    log.stage("validation of the searches", time.perf_counter() - t0)


def _validation_search_rows(cache: Cache, cfg: QualityConfig) -> List[str]:
    val = cache.get("validation/search")
    if not val or "fisher" not in val:
        return []
    abl = [f"{s:.2f}" for s in cfg.ablation_sparsities]

    def test(name: str, s: str) -> Optional[float]:
        return (cache.get(f"eval/{name}/{s}") or {}).get("knn")

    rows = ["## Held-out train images vs the test split", "",
            f"k-NN minus the no-search ranking's, in points, on validation images of the TRAIN split ({cfg.val_ref} "
            f"reference, {cfg.val_query} queries; what a user without labelled test data could check) and on the "
            "test split, at the ablation sparsities. The model was trained on the train split.", "",
            "| search | " + " | ".join(f"train-val {float(s):.0%}" for s in abl) + " | "
            + " | ".join(f"test {float(s):.0%}" for s in abl) + " |",
            "|---|" + "---:|" * (2 * len(abl))]
    for name, row in val.items():
        if name == "fisher":
            continue
        tv = [_pts(row.get(s), val["fisher"].get(s)) for s in abl]
        te = [_pts(test(name, s), test("fisher", s)) for s in abl]
        rows.append(f"| {name} | " + " | ".join(tv) + " | " + " | ".join(te) + " |")
    return rows + [""]


def _proxy_verdict(spearman: Dict[str, Dict[str, float]]) -> str:
    """One sentence: at how many sparsities the search's fitness correlates better than the PCA cosine."""
    ours = spearman.get("neighbourhood overlap (the search's)") or {}
    pca = spearman.get("PCA cosine, full space") or {}
    common = [s for s in ours if s in pca]
    if not common:
        return ""
    wins = sum(ours[s] > pca[s] for s in common)
    return (f"In this run the neighbourhood overlap correlates better than the full-space PCA cosine at {wins} of "
            f"{len(common)} sparsities.")


def _pts(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or b is None else f"{100 * (a - b):+.1f}"


def proxy_study(setup: Setup, cfg: QualityConfig, cache: Cache, local: LocalScores, main: Any, record: list,
                log: Log) -> None:
    """Does the selection fitness predict accuracy? ``proxy_candidates`` candidates of the main search
    (c = 1, the winner, the final mean, and candidates spread over the generations) are scored by the
    selection fitness and by k-NN on VALIDATION images of the train split (never the test split);
    Spearman correlation per sparsity. Alternative proxies from the same embeddings: the fitness
    in the full embedding space and with PCA to 192 (capped) dims."""
    if cache.get("proxy") is not None or not record:
        return
    from scipy.stats import spearmanr

    from elastic_fx.passes.mask import build_masked
    from elastic_fx.search.evaluate import masked_embeddings
    from elastic_fx.search.fitness import NeighbourhoodFitness, PCACosineFitness
    from elastic_fx.search.search import split_fitness_images

    t0 = time.perf_counter()
    gens = record
    cands = [("c=1", np.ones(main.layout.dim)), ("winner", np.asarray(main.c))]
    want = max(0, cfg.proxy_candidates - 2)
    picks = np.linspace(0, len(gens) * len(gens[0]["factors"]) - 1, want).round().astype(int) if gens else []
    flat = [(g["generation"], np.asarray(f)) for g in gens for f in g["factors"]]
    cands += [(f"gen {flat[i][0]}", flat[i][1]) for i in picks]
    sps = cfg.search_sparsities
    si, qi = split_fitness_images(len(setup.fit_x), main.config.get("selection_fraction", 0.5), cfg.seed)
    masked = build_masked(setup.gm, setup.smap)
    embed = embedding_module(setup.gm, setup.smap).eval()
    with torch.no_grad():
        dense = embed(setup.fit_x).float()
    fits = {"neighbourhood overlap (the search's)": NeighbourhoodFitness(dense[si]),
            "PCA cosine, full space": PCACosineFitness(dense[si], dim=None),
            "PCA cosine, 192 dims (capped)": PCACosineFitness(dense[si], dim=192)}
    proxies = {k: [] for k in fits}
    knn = {s: [] for s in cfg.proxy_sparsities}
    nr = setup.n_val_ref
    for _, c in cands:
        sc = efx.ElasticScores(local=local, c=c, layout=main.layout, floors=main.floors, ranking=main.ranking)
        emb = masked_embeddings(masked, setup.fit_x[qi], [sc.keep(setup.smap, s) for s in sps], batch_size=128)
        for k, f in fits.items():
            proxies[k].append(float(f(emb, dense=dense[qi]).mean()))
        vemb = masked_embeddings(masked, setup.val_x, [sc.keep(setup.smap, s) for s in cfg.proxy_sparsities],
                                 batch_size=128)
        for s, e in zip(cfg.proxy_sparsities, vemb):
            knn[s].append(knn_top1(e[:nr], setup.val_y[:nr], e[nr:], setup.val_y[nr:], k=min(cfg.k, nr)))
    table = {k: {f"{s:.2f}": float(spearmanr(v, knn[s]).statistic) for s in cfg.proxy_sparsities}
             for k, v in proxies.items()}
    cache.put("proxy", {"candidates": [n for n, _ in cands], "proxies": proxies,
                        "val_knn": {f"{s:.2f}": v for s, v in knn.items()}, "spearman": table})
    log.stage("proxy study", time.perf_counter() - t0)
    log(f"proxy study ({len(cands)} candidates): Spearman {table}")


def _interval_table(cache: Cache, cfg: QualityConfig, metric: str) -> Tuple[List[str], Dict[str, Dict[float, Any]]]:
    """elastic - every other method, per sparsity: difference and paired-bootstrap 95 % interval (points)."""
    others = [m for m in cfg.methods if m != "elastic"]
    out: Dict[str, Dict[float, Any]] = {}
    lines = ["| elastic - ... | " + " | ".join(f"{s:.0%}" for s in cfg.sparsities) + " |",
             "|---|" + "---:|" * len(cfg.sparsities)]
    for m in others:
        out[m] = {}
        cells = []
        for s in cfg.sparsities:
            a = _unbits((cache.get(f"eval/elastic/{s:.2f}") or {}).get(f"{metric}_correct"))
            b = _unbits((cache.get(f"eval/{m}/{s:.2f}") or {}).get(f"{metric}_correct"))
            if a is None or b is None or len(a) != len(b):
                cells.append("-")
                continue
            d, lo, hi = paired_interval(a, b, cfg.bootstrap, seed=cfg.seed)
            out[m][s] = (d, lo, hi)
            mark = "**" if lo > 0 else ""
            cells.append(f"{mark}{100 * d:+.1f}{mark} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines, out


def _ablation_rows(cache: Cache, cfg: QualityConfig, variants: Dict[str, Any]) -> List[str]:
    abl = cfg.ablation_sparsities
    rows = ["| variant | what changes | winner | search fitness c=1 / winner | selection fitness c=1 / winner | "
            + " | ".join(f"k-NN {s:.0%}" for s in abl) + " |", "|---|---|---|---:|---:|" + "---:|" * len(abl)]

    def knn(name: str) -> str:
        return " | ".join(_pct((cache.get(f"eval/{name}/{s:.2f}") or {}).get("knn")) for s in abl)

    rows.append("| fisher-only (no search) | c = 1 | - | - | - | " + knn("fisher") + " |")
    for name, sc in variants.items():
        sel = sc.selection
        c1, win = sel.get("c1", {}), sel.get("winner", {})
        rows.append(f"| {name} | {ABLATIONS[name][0]} | {win.get('name', '-')} | "
                    f"{c1.get('search', 0):.4f} / {win.get('search', 0):.4f} | "
                    f"{_f4(c1.get('selection'))} / {_f4(win.get('selection'))} | {knn('abl_' + name)} |")
    for choose, what in (("by_search", "item 3 off: winner by search fitness (nothing held out)"),
                         ("no_c1", "item 2 off: c = 1 and the final mean not among the choices"),
                         ("any_gain", "the best selection fitness wins, without the 95 % interval test against c = 1")):
        entry = cache.get(f"derived/{choose}")
        if entry is not None:
            rows.append(f"| {choose} | {what} | {entry['name']} | - / {entry['search']:.4f} | - / "
                        f"{entry['selection']:.4f} | {knn('abl_' + choose)} |")
    return rows


def _f4(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


# ============================================================================ main
def run(cfg: QualityConfig, setup: Setup, work_dir: Path, out_dir: Path, mode: str, log: Log) -> Dict[str, Any]:
    """Every stage in order of importance (the main table first, then ablations, the proxy study, latency)."""
    t_start = time.perf_counter()
    unknown = set(cfg.methods) - set(METHODS) - set(TP_VARIANTS)
    if unknown:
        raise efx.ElasticFxError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    keyed = {k: v for k, v in asdict(cfg).items() if k in FINGERPRINT_FIELDS}
    fingerprint = json.dumps([setup.name, setup.smap.fingerprint(), _jsonable(keyed)])
    cache = Cache(work_dir, fingerprint)
    log.cache = cache
    log(f"{setup.name}: {len(setup.data.y_train)} k-NN train / {len(setup.data.y_test)} test images, "
        f"{len(setup.grad_x)} gradient images, {len(setup.fit_x)} fitness images; max sparsity "
        f"{efx.max_sparsity(setup.smap):.3f}; work dir {work_dir}")
    torch.manual_seed(cfg.seed)
    eval_dense(setup, cfg, cache, log)
    dino = _local(setup, cfg, cache, "dino", log)
    rankings: Dict[str, Any] = {"fisher": efx.ElasticScores.from_local(dino, setup.smap),
                                "fisher_sep": efx.ElasticScores.from_local(dino, setup.smap, ranking="separate")}
    for m in ("magnitude", "lamp", "random", "snip"):
        if m in cfg.methods:
            rankings[m] = efx.ElasticScores.from_local(_local(setup, cfg, cache, m, log), setup.smap)
    main = rankings["elastic"] = _search(setup, cfg, dino, "main", cache, log, cfg.generations, cfg.popsize)
    dim, share = main.config.get("pca_dim"), main.config.get("pca_error_share")
    cache.put("selection/main", {**main.selection, "fitness_space": (
        (main.config.get("fitness_used") or ("the full embedding space" if dim is None else f"PCA to {dim} dims"))
        + ("" if share is None or share != share else f", holding {100 * share:.1f} % of the pruning error of c = 1")
        + f"; {main.config.get('search_images')} search / {main.config.get('selection_images')} selection images")})
    for m in ("elastic", "fisher", "fisher_sep", "magnitude", "lamp", "snip", "random"):
        if m in cfg.methods:
            eval_scores(setup, cfg, cache, m, rankings[m], cfg.sparsities, log)
    eval_torch_pruning(setup, cfg, cache, log)

    variants: Dict[str, Any] = {}
    for name in cfg.ablations:
        what, overrides = ABLATIONS[name]
        variants[name] = _search(setup, cfg, dino, f"abl_{name}", cache, log, cfg.ablation_generations,
                                 cfg.ablation_popsize, **overrides)
        eval_scores(setup, cfg, cache, f"abl_{name}", variants[name], cfg.ablation_sparsities, log)
    base = variants.get("all_on")
    if base is not None:  # items 2 and 3 off: other choices among the same evaluated pool
        pool = base.selection.get("pool") or []
        factors = cache.get("pool/abl_all_on") or []
        for choose in ("by_search", "no_c1", "any_gain"):
            entry = _derived(base, choose)
            if entry is None or len(factors) != len(pool):
                continue
            cache.put(f"derived/{choose}", entry)
            sc = efx.ElasticScores(local=dino, c=np.asarray(factors[pool.index(entry)]), layout=base.layout,
                                   floors=base.floors, ranking=base.ranking)
            eval_scores(setup, cfg, cache, f"abl_{choose}", sc, cfg.ablation_sparsities, log)
    validation_defaults(setup, cfg, cache, rankings, log)
    validation_search(setup, cfg, cache, rankings, variants, log)
    proxy_study(setup, cfg, cache, dino, rankings["elastic"], cache.get("trajectory/main") or [], log)
    measure_latency(setup, cfg, cache, rankings, log)
    cache.put("wall_s", (cache.get("wall_s") or 0.0) + time.perf_counter() - t_start)  # summed over resumed runs
    return write_report(out_dir, setup, cfg, cache, variants, log, mode, cache.get("wall_s"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU-sized run (< 2 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny random model, seconds (the test)")
    p.add_argument("--assets", default=str(ASSETS), help="the shared assets folder (default ../shared/assets)")
    p.add_argument("--model", help="instead of the CIFAR assets: a model spec, e.g. timm:vit_base_patch16_224")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--checkpoint", help="state dict for --model")
    p.add_argument("--train", help="labelled train folder (class sub-folders) for --model")
    p.add_argument("--test", help="labelled test folder for --model")
    p.add_argument("--data", help="labelled .npz (x_train, y_train, x_test, y_test) for --model")
    p.add_argument("--calib", help="unlabelled image folder for the gradient and fitness images of the label-free "
                   "methods (e.g. ../shared/assets/imagenet-sample, resized to the model's input); Torch-Pruning "
                   "keeps its labelled train images")
    p.add_argument("--fitness-folder", default="auto",
                   help="unlabelled image folder for the search's fitness images only ('train': the train split; "
                   "default 'auto': <assets>/imagenet-sample with the CIFAR assets when it is there, else the train "
                   "split)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work-dir", default=None, help="cache (default: a folder under the system temp dir)")
    p.add_argument("--sparsities", type=float, nargs="+")
    p.add_argument("--methods", nargs="+", choices=METHODS + ("tp_taylor_ffn",))
    p.add_argument("--grad-images", type=int)
    p.add_argument("--fitness-images", type=int)
    p.add_argument("--popsize", type=int, help="0: the xNES default")
    p.add_argument("--generations", type=int, help="generations of the 'elastic' method")
    p.add_argument("--ablations", nargs="*", choices=sorted(ABLATIONS),
                   help="ablation searches to run (default: all; none given: no ablations)")
    p.add_argument("--ablation-generations", type=int)
    p.add_argument("--knn-train", type=int, help="k-NN reference images (0: all)")
    p.add_argument("--linear-epochs", type=int, help="0: no linear probe")
    p.add_argument("--latency-methods", nargs="*", choices=METHODS + ("tp_taylor_ffn",))
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch / onnxruntime threads (0: every core; 1 is faster on a "
                   "machine whose cores other jobs share)")
    p.add_argument("--quiet", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> Tuple[QualityConfig, str]:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = {"smoke": smoke_config, "quick": quick_config, "full": QualityConfig}[mode]()
    overrides = {"sparsities": args.sparsities, "methods": args.methods, "grad_images": args.grad_images,
                 "fitness_images": args.fitness_images, "popsize": args.popsize, "generations": args.generations,
                 "ablations": args.ablations, "ablation_generations": args.ablation_generations,
                 "knn_train": args.knn_train, "linear_epochs": args.linear_epochs,
                 "latency_methods": args.latency_methods, "seed": args.seed, "threads": args.threads}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    return replace(cfg, **overrides), mode


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns the headline dict (also printed as the last line, JSON)."""
    args = build_parser().parse_args(argv)
    cfg, mode = config_from(args)
    torch.set_num_threads(cfg.threads or max(1, os.cpu_count() or 1))
    log = Log(quiet=args.quiet)
    assets = Path(args.assets)
    fitness = args.fitness_folder  # "train", a folder, or "auto": the assets' photos with the CIFAR model
    if fitness == "auto":
        cifar = not (args.smoke or args.model)
        fitness = str(assets / "imagenet-sample") if cifar and (assets / "imagenet-sample").is_dir() else "train"
    if args.smoke:
        setup = smoke_setup(cfg)
    elif args.model:
        if not (args.data or (args.train and args.test)):
            raise SystemExit("--model needs --data FILE.npz or --train DIR --test DIR")
        setup = user_setup(cfg, args)
    elif all((assets / f).is_file() for f in ("vit-cifar/vit_cifar.pt", "cifar10-subset/cifar10_subset.npz")):
        setup = cifar_setup(cfg, assets)
        images = (f"Gradient images (DINO local scores, SNIP, Torch-Pruning's labelled loss) are a random subset "
                  f"({cfg.grad_images} images) of the CIFAR TRAIN split" if fitness != "train" else
                  "Gradient images (DINO local scores, SNIP, Torch-Pruning's labelled loss) and the search's fitness "
                  f"images are disjoint random subsets ({cfg.grad_images} and {cfg.fitness_images} images) of the "
                  "CIFAR TRAIN split")
        setup.notes += [
            images + ", preprocessed with the model's mean/std (our methods use them without labels). The k-NN "
            "reference set is an evenly spaced subset of the same train split; the test split is never used for "
            "scoring.", ""]
    else:
        msg = (f"real assets not found under {assets.resolve()} (need vit-cifar/vit_cifar.pt and "
               "cifar10-subset/cifar10_subset.npz): nothing to benchmark. Use --smoke for the tiny random model, "
               "or --model/--train/--test for your own model and data.")
        print(msg, file=sys.stderr)
        headline = {"bench": "quality", "mode": mode, "skipped": msg}
        print(json.dumps(headline))
        return headline
    if args.calib:
        use_calibration_folder(setup, cfg, args.calib)
    if fitness != "train":
        use_fitness_folder(setup, cfg, fitness)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / f"elastic_fx_bench_quality_{mode}"
    headline = run(cfg, setup, work, Path(args.out_dir), mode, log)
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
