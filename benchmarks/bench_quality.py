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

Ablations (paper Table 2 / Fig. 9): xNES generations (0, 10, 50, 200; one trajectory,
continued from its checkpoint, so the first generations are shared) and the number of
search sparsities (1, 2, 4), evaluated at a few sparsities.

Latency: the sliced models of a few methods are exported with ``efx.export_onnx`` and
timed with onnxruntime on the CPU (accuracy vs measured latency plot).

Data
----
Real assets (``../shared/assets``, see its README): a ViT (6 blocks x 6 heads, dim 192)
trained on a real CIFAR-10 subset, and that subset. Gradient images (DINO / SNIP, and
Torch-Pruning's labelled loss) and fitness images are drawn, disjoint, from the CIFAR
TRAIN split (used unlabelled by our methods), preprocessed with the model's mean/std.
When the assets are absent the script says so and exits (``--smoke`` needs none).

CPU sizing of the default run (the paper's value in brackets): 256 gradient images x
(2 global + 10 local crops) [1000]; 32 fitness images, PCA to 31 dimensions [1000, 192];
xNES population 8 [4 + floor(3 ln d) = 15 for this model's d = 42]; 50 generations and
search sparsities 10/30/50/60 % [same]; k-NN reference set 2000 of the 4660 train images,
all 932 test images [ImageNet train / val]; linear probe 100 epochs [same]. The cost is
dominated by the search: generations x population x search sparsities x fitness images
masked image passes (5 x 10^4 for 50 generations, 2 x 10^5 for the 200 of the ablation); ``--threads 1`` is
faster when other jobs share the cores (no OpenMP barrier stalls).

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
from elastic_fx.evaluate import LinearProbeConfig, evaluate_budgets, evaluate_features
from elastic_fx.passes.embedding import embedding_module
from elastic_fx.pipeline import SearchConfig, prune
from elastic_fx.scores import Layout, LocalScores
from elastic_fx.scoring.local import local_scores

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".." / "shared" / "assets"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.247, 0.243, 0.261)
METHODS = ("elastic", "fisher", "magnitude", "lamp", "snip", "random", "tp_taylor", "tp_hessian", "tp_taylor_ffn")
LABELS = {
    "elastic": "elastic_fx (xNES)", "fisher": "fisher-only (no search)", "magnitude": "magnitude", "lamp": "LAMP",
    "snip": "SNIP-magnitude", "random": "random", "tp_taylor": "Torch-Pruning Taylor",
    "tp_hessian": "Torch-Pruning Hessian", "tp_taylor_ffn": "Torch-Pruning Taylor, FFN only",
}
#: Torch-Pruning variants: method -> (importance, prune heads too)
TP_VARIANTS = {"tp_taylor": ("taylor", True), "tp_hessian": ("hessian", True), "tp_taylor_ffn": ("taylor", False)}
REPORT_DATE = "2026-11-23"
#: QualityConfig fields that change a cached result (the cache folder is keyed by them)
FINGERPRINT_FIELDS = ("grad_images", "batch_size", "fitness_images", "heldout_images", "pca_dim", "popsize",
                      "search_sparsities", "nsp_ablation", "generations", "knn_train", "knn_test", "k", "linear_epochs",
                      "seed")


# ============================================================================ configuration
@dataclass
class QualityConfig:
    """Everything that defines one benchmark run (recorded in quality.json)."""

    sparsities: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    methods: Tuple[str, ...] = METHODS
    grad_images: int = 256  # DINO / SNIP / Torch-Pruning gradient images
    batch_size: int = 16  # gradient pass (16 images x 12 crops)
    fitness_images: int = 32
    heldout_images: int = 256  # fitness of every search variant on images the search never saw
    pca_dim: int = 192  # clamped to fitness_images - 1
    popsize: int = 8  # 0: the xNES default 4 + floor(3 ln d) (15 for 6 blocks x 6 heads)
    generations: int = 50  # the "elastic" method
    search_sparsities: Tuple[float, ...] = (0.1, 0.3, 0.5, 0.6)
    gen_ablation: Tuple[int, ...] = (0, 10, 50, 200)
    nsp_ablation: Tuple[Tuple[float, ...], ...] = ((0.5,), (0.3, 0.6), (0.1, 0.3, 0.5, 0.6))
    ablation_sparsities: Tuple[float, ...] = (0.3, 0.5, 0.6, 0.7)
    knn_train: int = 2000  # train images in the k-NN reference set (0: all)
    knn_test: int = 0  # test images (0: all)
    k: int = 20
    linear_epochs: int = 100  # 0: no linear probe
    latency_methods: Tuple[str, ...] = ("elastic", "magnitude", "tp_taylor")
    latency_batches: Tuple[int, ...] = (1, 64)
    latency_iters: int = 10
    latency_sparsities: Tuple[float, ...] = ()  # (): 0 and every sparsity
    threads: int = 0  # torch / onnxruntime threads (0: every core)
    onnx_exporter: str = "auto"  # efx.export_onnx(exporter=...): the smoke run uses the fast TorchScript one
    eval_batch_size: int = 256
    seed: int = 0


def quick_config() -> QualityConfig:
    """< 2 minutes on 2 idle cores: the same pipeline, smaller everywhere."""
    return QualityConfig(sparsities=(0.3, 0.5, 0.7), grad_images=16, fitness_images=16, heldout_images=32, popsize=6,
                         generations=3,
                         gen_ablation=(0, 1, 3), nsp_ablation=((0.5,), (0.3, 0.6), (0.1, 0.3, 0.5, 0.6)),
                         ablation_sparsities=(0.5,), knn_train=500, knn_test=300, linear_epochs=30,
                         latency_methods=("elastic",), latency_batches=(1, 64), latency_iters=5,
                         latency_sparsities=(0.0, 0.5))


def smoke_config() -> QualityConfig:
    """Seconds, on a tiny random ViT: exercises every stage (what the test runs)."""
    return QualityConfig(sparsities=(0.3, 0.6), grad_images=4, batch_size=4, fitness_images=6, heldout_images=6,
                         popsize=4,
                         generations=2, search_sparsities=(0.3, 0.6), gen_ablation=(0, 1, 2),
                         nsp_ablation=((0.5,), (0.3, 0.6)), ablation_sparsities=(0.6,), knn_train=0, knn_test=0,
                         k=3, linear_epochs=2, latency_methods=("elastic",), latency_batches=(2,), latency_iters=2,
                         latency_sparsities=(0.6,), eval_batch_size=64, threads=1,
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
    held_x: torch.Tensor  # held-out fitness images (never seen by the search)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    image_size: Optional[int]
    notes: List[str] = field(default_factory=list)
    calibration: str = ""  # where grad_x / fit_x come from, when not the train split
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


def _split(data: LabelledData, cfg: QualityConfig, mean, std, size) -> Tuple[LabelledData, torch.Tensor, ...]:
    """Evaluation subset + disjoint gradient, fitness and held-out images drawn from the train split."""
    perm = np.random.default_rng(cfg.seed).permutation(len(data.y_train))
    g_idx = np.sort(perm[: cfg.grad_images])
    f_idx = np.sort(perm[cfg.grad_images: cfg.grad_images + cfg.fitness_images])
    n_used = cfg.grad_images + cfg.fitness_images
    h_idx = np.sort(perm[n_used: n_used + cfg.heldout_images])
    grad_x = to_model_input(data.x_train[g_idx], mean, std, size)
    fit_x = to_model_input(data.x_train[f_idx], mean, std, size)
    held_x = to_model_input(data.x_train[h_idx], mean, std, size)
    tr, te = _subsample(len(data.y_train), cfg.knn_train), _subsample(len(data.y_test), cfg.knn_test)
    evald = LabelledData(data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], data.class_names)
    return evald, grad_x, torch.as_tensor(data.y_train[g_idx]).long(), fit_x, held_x


def cifar_setup(cfg: QualityConfig, assets: Path) -> Setup:
    """The real CIFAR-10 ViT and subset from ``assets``."""
    import timm

    ckpt = torch.load(assets / "vit-cifar" / "vit_cifar.pt", map_location="cpu", weights_only=True)
    model = timm.models.vision_transformer.VisionTransformer(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    data = load_labelled(assets / "cifar10-subset" / "cifar10_subset.npz")
    evald, gx, gy, fx, hx = _split(data, cfg, CIFAR_MEAN, CIFAR_STD, None)
    gm = efx.trace(model, (gx[:2],))
    cfgd = ckpt["config"]
    name = (f"timm ViT (img {cfgd['img_size']}, patch {cfgd['patch_size']}, dim {cfgd['embed_dim']}, depth "
            f"{cfgd['depth']}, {cfgd['num_heads']} heads) trained on the CIFAR-10 subset")
    return Setup(name, model, gm, efx.discover(gm), evald, gx, gy, fx, hx, CIFAR_MEAN, CIFAR_STD, None)


def smoke_setup(cfg: QualityConfig) -> Setup:
    """A tiny random ViT on random images of 4 classes (no assets, no downloads)."""
    import timm

    torch.manual_seed(cfg.seed)
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                             num_heads=4, mlp_ratio=2, num_classes=4).eval()
    rng = np.random.default_rng(cfg.seed)
    y_tr, y_te = np.arange(24) % 4, np.arange(12) % 4
    x_tr = (rng.integers(0, 256, (24, 16, 16, 3)) // 2 + (y_tr * 40)[:, None, None, None]).astype(np.uint8)
    x_te = (rng.integers(0, 256, (12, 16, 16, 3)) // 2 + (y_te * 40)[:, None, None, None]).astype(np.uint8)
    data = LabelledData(x_tr, y_tr, x_te, y_te, ["a", "b", "c", "d"])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    evald, gx, gy, fx, hx = _split(data, cfg, mean, std, None)
    gm = efx.trace(model, (gx[:2],))
    return Setup("tiny random timm ViT (smoke)", model, gm, efx.discover(gm), evald, gx, gy, fx, hx, mean, std, None)


def user_setup(cfg: QualityConfig, args: argparse.Namespace) -> Setup:
    """``--model`` with ``--train/--test`` folders or ``--data file.npz`` (e.g. ImageNet-1k + ViT-B/16)."""
    from elastic_fx.data import PREPROCESS_META
    from elastic_fx.models import load_model
    from elastic_fx.tracing import default_example_inputs

    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint).eval()
    gm = efx.trace(model, default_example_inputs(model))
    pre = gm.meta.get(PREPROCESS_META)
    if pre is None:
        raise efx.DataError(f"{args.model} carries no preprocessing config; this benchmark needs one "
                            "(a timm / Hugging Face / torchvision model).")
    size = pre.input_size[0]
    data = load_labelled(args.data) if args.data else load_labelled(args.train, args.test, image_size=size)
    evald, gx, gy, fx, hx = _split(data, cfg, pre.mean, pre.std, size)
    return Setup(args.model, model, gm, efx.discover(gm), evald, gx, gy, fx, hx, tuple(pre.mean), tuple(pre.std),
                 size)


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


def _search(setup: Setup, cfg: QualityConfig, local: LocalScores, iterations: int, sparsities: Sequence[float],
            ckpt: Path, log: Log, stage: str):
    """``efx.prune`` continued from ``ckpt`` (the same trajectory gives every generation count)."""
    resume = (ckpt / "search_checkpoint.pt").is_file()
    sc = SearchConfig(num_fitness_images=len(setup.fit_x), pca_dim=min(cfg.pca_dim, len(setup.fit_x) - 1),
                      popsize=cfg.popsize or None, batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    scores = prune(setup.gm, setup.grad_x, iterations=iterations, sparsities=sparsities,
                   fitness_images=setup.fit_x, seed=cfg.seed, checkpoint_dir=str(ckpt), resume=resume, config=sc,
                   local=local, progress=False)
    log.stage(stage, time.perf_counter() - t0)
    log(f"search {list(sparsities)} to {iterations} generations: best fitness {scores.best_fitness:.4f} "
        f"({time.perf_counter() - t0:.1f}s)")
    return scores


def search_generations(setup: Setup, cfg: QualityConfig, cache: Cache, dino: LocalScores, g: int, log: Log):
    """The main trajectory (search sparsities ``cfg.search_sparsities``) after ``g`` generations.

    Call with increasing ``g``: each run continues the previous one from its checkpoint,
    so the first generations are shared and cost nothing twice.
    """
    path = cache.dir / f"elastic_gen{g}.efx"
    if not path.is_file():
        ckpt = cache.dir / ("search_main" if g > 0 else "search_gen0")  # 0: the local ranking and its fitness
        scores = _search(setup, cfg, dino, g, cfg.search_sparsities, ckpt, log, "search: main trajectory")
        scores.save(path)
    return efx.ElasticScores.load(path, setup.smap)


def search_sparsity_set(setup: Setup, cfg: QualityConfig, cache: Cache, dino: LocalScores, sps: Sequence[float],
                        log: Log):
    """A separate search of ``cfg.generations`` generations over the search sparsities ``sps``."""
    path = cache.dir / f"elastic_nsp{len(sps)}.efx"
    if not path.is_file():
        scores = _search(setup, cfg, dino, cfg.generations, sps, cache.dir / f"search_nsp{len(sps)}", log,
                         "search: sparsity-set ablation")
        scores.save(path)
    return efx.ElasticScores.load(path, setup.smap)


def heldout_fitness(setup: Setup, cfg: QualityConfig, cache: Cache, key: str, scores: Any, log: Log) -> None:
    """The search's own objective (PCA cosine to the dense embeddings, averaged over the search
    sparsities) of one ranking, on held-out train images the search never saw."""
    name = f"heldout/{key.replace(':', '')}"
    if cache.get(name) is not None or len(setup.held_x) < 3:
        return
    from elastic_fx.passes.mask import build_masked
    from elastic_fx.search.evaluate import masked_embeddings
    from elastic_fx.search.fitness import PCACosineFitness

    t0 = time.perf_counter()
    with torch.no_grad():
        dense = embedding_module(setup.gm, setup.smap)(setup.held_x).float()
    fitness = PCACosineFitness(dense, dim=min(cfg.pca_dim, cfg.fitness_images - 1))
    keeps = [scores.keep(setup.smap, s) for s in cfg.search_sparsities]
    emb = masked_embeddings(build_masked(setup.gm, setup.smap), setup.held_x, keeps, batch_size=64)
    value = float(fitness(emb.float()).mean())
    cache.put(name, value)
    log.stage("held-out fitness", time.perf_counter() - t0)
    log(f"held-out fitness of {key}: {value:.4f}")


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
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=LABELS[m],
                    lw=2.2 if m == "elastic" else 1.2, ls="--" if m.startswith("tp_") else "-")
        ax.set_xlabel("sparsity (% of block parameters removed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("accuracy vs sparsity")
    _atomic_figure(fig, out / "quality_sparsity.png")
    plt.close(fig)
    made.append("quality_sparsity.png")

    batch = max(cfg.latency_batches)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in cfg.latency_methods:
        pts = []
        for s in (0.0,) + tuple(cfg.sparsities):
            lat = cache.get(f"latency/{m}/{s:.2f}") or {}
            acc = dense if s == 0.0 else cache.get(f"eval/{m}/{s:.2f}") or {}
            if lat.get(f"b{batch}_ms") is not None and acc.get("knn") is not None:
                pts.append((lat[f"b{batch}_ms"], 100 * acc["knn"]))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=LABELS.get(m, m))
    ax.set_xlabel(f"ONNX Runtime CPU latency, batch {batch} (ms)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _atomic_figure(fig, out / "quality_latency.png")
    plt.close(fig)
    made.append("quality_latency.png")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    gens = sorted({int(k.split(":")[1]) for k in variants if k.startswith("gen:")})
    for s in cfg.ablation_sparsities:
        ys = [(cache.get(f"eval/gen{g}/{s:.2f}") or {}).get("knn") for g in gens]
        if all(y is not None for y in ys):
            axes[0].plot(range(len(gens)), [100 * y for y in ys], marker="o", label=f"{s:.0%}")
    axes[0].set_xticks(range(len(gens)), [str(g) for g in gens])
    axes[0].set_xlabel("xNES generations")
    axes[0].set_ylabel("k-NN top-1 (%)")
    axes[0].legend(title="sparsity", fontsize=8)
    nsps = sorted({int(k.split(":")[1]) for k in variants if k.startswith("nsp:")})
    for s in cfg.ablation_sparsities:
        ys = [(cache.get(f"eval/nsp{n}/{s:.2f}") or {}).get("knn") for n in nsps]
        if all(y is not None for y in ys):
            axes[1].plot(range(len(nsps)), [100 * y for y in ys], marker="o", label=f"{s:.0%}")
    axes[1].set_xticks(range(len(nsps)), [str(n) for n in nsps])
    axes[1].set_xlabel("number of search sparsities")
    axes[1].legend(title="sparsity", fontsize=8)
    last = variants.get(f"gen:{max(gens)}") if gens else None
    if last is not None and last.history:
        h = last.history
        axes[2].plot([r["generation"] + 1 for r in h], [r["best_so_far"] for r in h], label="best so far")
        axes[2].plot([r["generation"] + 1 for r in h], [r["mean"] for r in h], alpha=0.6, label="population mean")
        base = variants.get("gen:0")
        if base is not None and base.best_fitness is not None:
            axes[2].axhline(base.best_fitness, color="k", ls="--", lw=1, label="fisher-only ranking (c = 1)")
        axes[2].set_xlabel("generation")
        axes[2].set_ylabel("fitness (PCA cosine)")
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("ablations")
    _atomic_figure(fig, out / "quality_ablations.png")
    plt.close(fig)
    made.append("quality_ablations.png")
    return made


def _claims(values: Dict[str, Dict[float, Optional[float]]], sparsities: Sequence[float]) -> List[str]:
    """The paper's claims, checked on the numbers of this run."""
    lines = []
    el = values.get("elastic", {})
    fi = values.get("fisher", {})
    if el and fi:
        diffs = {s: el[s] - fi[s] for s in sparsities if el.get(s) is not None and fi.get(s) is not None}
        worse = {s: d for s, d in diffs.items() if d < 0}
        hi = [d for s, d in diffs.items() if 0.4 <= s <= 0.6]
        lines.append(f"* elastic (xNES) >= fisher-only at every sparsity: **{'yes' if not worse else 'no'}** "
                     f"(elastic - fisher, k-NN points: "
                     + ", ".join(f"{s:.0%} {100 * d:+.1f}" for s, d in diffs.items()) + ")")
        if hi:
            lines.append(f"* clearly better at 40-60 %: mean difference {100 * np.mean(hi):+.1f} points "
                         "(paper: +6.9 at 50 % for DINO ViT-B/16)")
    for other in ("magnitude", "lamp", "snip", "tp_taylor", "tp_hessian", "tp_taylor_ffn", "random"):
        ov = values.get(other, {})
        if not el or not ov:
            continue
        diffs = {s: el[s] - ov[s] for s in sparsities if s >= 0.3 and el.get(s) is not None and ov.get(s) is not None}
        if diffs:
            beats = all(d > 0 for d in diffs.values())
            lines.append(f"* elastic beats {LABELS[other]} at every sparsity >= 30 %: **{'yes' if beats else 'no'}** ("
                         + ", ".join(f"{s:.0%} {100 * d:+.1f}" for s, d in diffs.items()) + ")")
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
             f"sparsities={list(cfg.search_sparsities)}, local=<the DINO local scores>)` with "
             f"{cfg.fitness_images} fitness images, PCA to {min(cfg.pca_dim, cfg.fitness_images - 1)} dimensions, "
             f"population {cfg.popsize or 'default (4 + floor(3 ln d))'}; one ranking for every sparsity.",
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
              f"{cfg.grad_images} gradient images [paper: 1000]; {cfg.fitness_images} fitness images [1000] and PCA "
              f"to {min(cfg.pca_dim, cfg.fitness_images - 1)} dims [192]; xNES population {cfg.popsize or 'default'} "
              f"[4 + floor(3 ln d) = {4 + int(3 * math.log(d))} here]; {len(setup.smap.blocks)} blocks, d = {d} search "
              f"dimensions [ImageNet ViT-B/16: d = 156]; the k-NN reference set has {len(setup.data.y_train)} "
              "images and "
              f"the test set {n_test}, so one accuracy has a standard error of up to "
              f"{100 * math.sqrt(0.25 / n_test):.1f} points (two prunings of the same model scored on the same images "
              "differ by less noise, but differences of about one point are not significant).", ""]
    return lines


def write_report(out: Path, setup: Setup, cfg: QualityConfig, cache: Cache, variants: Dict[str, Any], log: Log,
                 mode: str, wall: float) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    knn_lines, knn = _table(cache, cfg.methods, cfg.sparsities, "knn")
    lin_lines, _ = _table(cache, cfg.methods, cfg.sparsities, "linear") if cfg.linear_epochs else ([], {})
    plots = _plots(out, cache, cfg, variants)
    dense = cache.get("eval/dense") or {}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    stages = cache.get("stages") or log.stages
    md = [f"# Quality benchmark ({mode} run)", "",
          f"Date: {REPORT_DATE}. Machine: {platform.machine()} CPU, {os.cpu_count()} cores "
          f"({_cpu_name()}), torch {torch.__version__}, Python {platform.python_version()}; "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs shared the cores). "
          f"Compute time {wall / 60:.1f} min (summed over resumed runs). Produced by "
          f"`python benchmarks/bench_quality.py {' '.join(sys.argv[1:])}`.".replace(" `.", "`."), "",
          f"Model: {setup.name}. Evaluation: k-NN (k={cfg.k}, L2-normalised pooled embeddings) with "
          f"{len(setup.data.y_train)} train images as the reference set and {len(setup.data.y_test)} test images"
          + (f"; linear probe: the DINO recipe (SGD, momentum 0.9, lr 1e-3, batch 256, cosine) for "
             f"{cfg.linear_epochs} epochs on the same frozen features, best-of-10%-held-out-train epoch"
             if cfg.linear_epochs else "")
          + ".", ""]
    md += setup.notes + _protocol_notes(setup, cfg)
    md += ["## k-NN top-1 (%) vs sparsity", "",
           "Sparsity = fraction of the blocks' prunable parameters (heads + FFN neurons) removed; "
           "every method removes whole heads and whole neurons.", ""] + knn_lines + [""]
    if lin_lines:
        md += ["## Linear probe top-1 (%) vs sparsity", ""] + lin_lines + [""]
    md += ["![accuracy vs sparsity](quality_sparsity.png)", "", "## The paper's claims on this model", ""]
    md += _claims(knn, cfg.sparsities) + [""]
    md += ["## Ablations", "", f"k-NN top-1 (%) at the ablation sparsities. Generations: one xNES trajectory "
           f"(popsize {cfg.popsize or 'default'}, search sparsities {list(cfg.search_sparsities)}); 0 generations is "
           "the fisher-only ranking. Search sparsities: separate runs of "
           f"{cfg.generations} generations. Search fitness: the best candidate's PCA cosine on the "
           f"{cfg.fitness_images} fitness images, averaged over that run's search sparsities; held-out fitness: the "
           f"same objective (search sparsities {list(cfg.search_sparsities)}) on {cfg.heldout_images} other train "
           "images the search never saw.", ""]
    abl = cfg.ablation_sparsities
    md += ["| variant | search fitness (best) | held-out fitness | " + " | ".join(f"{s:.0%}" for s in abl) + " |",
           "|---|---:|---:|" + "---:|" * len(abl)]
    for key in sorted(variants, key=lambda k: (k.split(":")[0], int(k.split(":")[1]))):
        kind, n = key.split(":")
        name = f"gen{n}" if kind == "gen" else f"nsp{n}"
        label = f"{n} generations" if kind == "gen" else f"{n} search sparsit{'y' if n == '1' else 'ies'} " \
                f"{list(variants[key].sparsities) if variants[key].sparsities else ''}"
        fit = variants[key].best_fitness
        held = cache.get(f"heldout/{kind}{n}")
        md.append(f"| {label} | {'-' if fit is None else f'{fit:.4f}'} | {'-' if held is None else f'{held:.4f}'} | "
                  + " | ".join(_pct((cache.get(f"eval/{name}/{s:.2f}") or {}).get("knn")) for s in abl) + " |")
    md += ["", "![ablations](quality_ablations.png)", "", "## Accuracy vs measured ONNX Runtime latency", "",
           "Sliced models exported with `efx.export_onnx` (checked against PyTorch) and timed with onnxruntime "
           f"on this CPU (median of {cfg.latency_iters} runs; the cores were shared, so treat small differences "
           "as noise).", ""]
    lat_cols = [f"b{b}_ms" for b in cfg.latency_batches]
    md += ["| method | sparsity | " + " | ".join(f"batch {b} (ms)" for b in cfg.latency_batches) + " | k-NN (%) |",
           "|---|---:|" + "---:|" * (len(lat_cols) + 1)]
    for m in cfg.latency_methods:
        for s in (0.0,) + tuple(cfg.sparsities):
            lat = cache.get(f"latency/{m}/{s:.2f}")
            if lat is None:
                continue
            acc = dense if s == 0.0 else cache.get(f"eval/{m}/{s:.2f}") or {}
            cells = ["fail" if c not in lat else f"{lat[c]:.2f}" for c in lat_cols]  # reasons: see Failures
            md.append(f"| {LABELS.get(m, m)} | {s:.0%} | " + " | ".join(cells) + f" | {_pct(acc.get('knn'))} |")
    md += ["", "![accuracy vs latency](quality_latency.png)", "", "## Settings and time per stage", "",
           "```", json.dumps(_jsonable(asdict(cfg))), "```", "",
           "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in sorted(stages.items())]
    errors = [f"* {k}: {v['error']}" for k, v in sorted(cache.data.items()) if isinstance(v, dict) and "error" in v]
    if errors:
        md += ["", "## Failures", ""] + errors
    _atomic_text(out / "quality.md", "\n".join(md) + "\n")
    headline = {
        "bench": "quality", "mode": mode, "model": setup.name, "dense_knn": dense.get("knn"),
        "knn": {m: {f"{s:.2f}": knn.get(m, {}).get(s) for s in cfg.sparsities if s >= 0.5} for m in cfg.methods},
        f"gen_ablation_knn_{abl[-1]:.2f}": {k: (cache.get(f"eval/gen{k.split(':')[1]}/{abl[-1]:.2f}") or {}).get("knn")
                                             for k in variants if k.startswith("gen:")},
        "wall_s": round(wall, 1), "plots": plots,
    }
    full = {"headline": headline, "config": _jsonable(asdict(cfg)), "results": cache.data, "stages_s": stages,
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


# ============================================================================ main
def run(cfg: QualityConfig, setup: Setup, work_dir: Path, out_dir: Path, mode: str, log: Log) -> Dict[str, Any]:
    """Every stage in order of importance (the main table first, then ablations, then latency)."""
    t_start = time.perf_counter()
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise efx.ElasticFxError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    # only what changes a cached score or evaluation; methods, sparsities, ablation lists and latency
    # settings may change between runs (their results are cached under their own keys)
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
    rankings: Dict[str, Any] = {"fisher": efx.ElasticScores.from_local(dino, setup.smap)}
    for m in ("magnitude", "lamp", "random", "snip"):
        if m in cfg.methods:
            rankings[m] = efx.ElasticScores.from_local(_local(setup, cfg, cache, m, log), setup.smap)
    for m in ("fisher", "magnitude", "lamp", "snip", "random"):
        if m in cfg.methods:
            eval_scores(setup, cfg, cache, m, rankings[m], cfg.sparsities, log)
    eval_torch_pruning(setup, cfg, cache, log)

    variants: Dict[str, Any] = {"gen:0": search_generations(setup, cfg, cache, dino, 0, log)}  # = fisher + its fitness
    chain = sorted({g for g in cfg.gen_ablation if g > 0} | {cfg.generations})

    def ablate(key: str) -> None:  # evaluate one variant at the ablation sparsities (reusing equal rankings)
        name = key.replace(":", "")
        src = "elastic" if variants[key] is rankings.get("elastic") else "fisher" if key == "gen:0" else None
        if key == "gen:0":  # zero generations keep c = 1: the fisher-only ranking itself
            assert np.all(np.asarray(variants[key].c) == 1.0)
        for s in cfg.ablation_sparsities:
            done = cache.get(f"eval/{src}/{s:.2f}") if src else None
            if done is not None and cache.get(f"eval/{name}/{s:.2f}") is None:
                cache.put(f"eval/{name}/{s:.2f}", done)
        eval_scores(setup, cfg, cache, name, variants[key], cfg.ablation_sparsities, log)
        heldout_fitness(setup, cfg, cache, key, variants[key], log)

    for g in (g for g in chain if g <= cfg.generations):
        variants[f"gen:{g}"] = search_generations(setup, cfg, cache, dino, g, log)
    rankings["elastic"] = variants[f"gen:{cfg.generations}"]
    if "elastic" in cfg.methods:
        eval_scores(setup, cfg, cache, "elastic", rankings["elastic"], cfg.sparsities, log)
    for key in list(variants):
        ablate(key)
    for sps in cfg.nsp_ablation:
        key = f"nsp:{len(sps)}"
        same = tuple(sps) == tuple(cfg.search_sparsities)
        variants[key] = rankings["elastic"] if same else search_sparsity_set(setup, cfg, cache, dino, sps, log)
        ablate(key)
    for g in (g for g in chain if g > cfg.generations):
        variants[f"gen:{g}"] = search_generations(setup, cfg, cache, dino, g, log)
        ablate(f"gen:{g}")
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
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work-dir", default=None, help="cache (default: a folder under the system temp dir)")
    p.add_argument("--sparsities", type=float, nargs="+")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--grad-images", type=int)
    p.add_argument("--fitness-images", type=int)
    p.add_argument("--popsize", type=int, help="0: the xNES default")
    p.add_argument("--generations", type=int, help="generations of the 'elastic' method")
    p.add_argument("--gen-ablation", type=int, nargs="+")
    p.add_argument("--no-ablations", action="store_true", help="only the main search (no generation / "
                   "search-sparsity ablation runs)")
    p.add_argument("--knn-train", type=int, help="k-NN reference images (0: all)")
    p.add_argument("--linear-epochs", type=int, help="0: no linear probe")
    p.add_argument("--latency-methods", nargs="*", choices=METHODS)
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
                 "gen_ablation": args.gen_ablation, "knn_train": args.knn_train, "linear_epochs": args.linear_epochs,
                 "latency_methods": args.latency_methods, "seed": args.seed, "threads": args.threads}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    cfg = replace(cfg, **overrides)
    if args.no_ablations:
        cfg = replace(cfg, gen_ablation=(0, cfg.generations), nsp_ablation=(tuple(cfg.search_sparsities),))
    return cfg, mode


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns the headline dict (also printed as the last line, JSON)."""
    args = build_parser().parse_args(argv)
    cfg, mode = config_from(args)
    torch.set_num_threads(cfg.threads or max(1, os.cpu_count() or 1))
    log = Log(quiet=args.quiet)
    assets = Path(args.assets)
    if args.smoke:
        setup = smoke_setup(cfg)
    elif args.model:
        if not (args.data or (args.train and args.test)):
            raise SystemExit("--model needs --data FILE.npz or --train DIR --test DIR")
        setup = user_setup(cfg, args)
    elif all((assets / f).is_file() for f in ("vit-cifar/vit_cifar.pt", "cifar10-subset/cifar10_subset.npz")):
        setup = cifar_setup(cfg, assets)
        setup.notes += [
            "Gradient images (DINO local scores, SNIP, Torch-Pruning's labelled loss) and the search's fitness images "
            f"are disjoint random subsets ({cfg.grad_images} and {cfg.fitness_images} images) of the CIFAR TRAIN "
            "split, preprocessed with the model's mean/std (our methods use them without labels). The k-NN reference "
            "set is an evenly spaced subset of the same train split; the test split is never used for scoring.", ""]
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
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / f"elastic_fx_bench_quality_{mode}"
    headline = run(cfg, setup, work, Path(args.out_dir), mode, log)
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
