"""Evaluators: how good are the features of a (possibly sliced) backbone?

Takes a model (or its embedding module) and labelled data or features; returns
accuracies. Touches nothing (a module runs in eval mode and its mode is restored).
Images and their preprocessing come from :mod:`elastic_fx.data` (the one image
pipeline): :func:`~elastic_fx.data.load_labelled` reads the split,
:func:`~elastic_fx.data.resolve_preprocess` picks the normalisation,
:func:`~elastic_fx.data.to_model_input` applies it.

The paper's two protocols (Appendix B.6), on frozen features:

* **k-NN top-1** -- scikit-learn ``KNeighborsClassifier``, k = 20, majority vote
  (uniform weights) on L2-normalised features: :func:`knn_top1`.
* **Linear probe** -- the DINO recipe: one linear layer trained with SGD (momentum 0.9,
  lr 0.001, batch 256, no weight decay) for 100 epochs with a cosine schedule down to 0,
  no augmentation; the epoch with the best validation accuracy is the one whose test
  accuracy is reported: :func:`linear_probe` with :class:`LinearProbeConfig` (epochs are
  configurable so CPU runs stay short).

:func:`extract_features` runs a model over preprocessed images in batches;
:func:`evaluate_features` chains preprocessing, extraction and both protocols;
:func:`evaluate_budgets` does so for the sliced sub-network at every sparsity.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data import LabelledData, iter_batches, resolve_preprocess, to_model_input
from .errors import DataError, ElasticFxError

logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------- features


def _embedding(out: Any) -> torch.Tensor:
    """One ``[B, D]`` embedding from a model output (see :func:`extract_features`)."""
    if isinstance(out, dict) or hasattr(out, "keys"):  # dict or transformers ModelOutput
        pooled = out.get("pooler_output") if hasattr(out, "get") else None
        if pooled is None:
            tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
            if not tensors:
                raise DataError("The model returned a mapping without tensors; pass an embedding module.")
            pooled = tensors[0]
        out = pooled
    elif isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        if not tensors:
            raise DataError("The model returned a sequence without tensors; pass an embedding module.")
        out = tensors[0]
    if not isinstance(out, torch.Tensor):
        raise DataError(f"The model returned {type(out).__name__}; expected a tensor [B, D] or [B, N, D].")
    if out.dim() == 3:
        return out[:, 0]  # token sequence: the class token
    if out.dim() == 2:
        return out
    raise DataError(f"The model returned shape {tuple(out.shape)}; expected [B, D] (an embedding) or [B, N, D] "
                    "(tokens, the first one is used). Pass a module that ends in a pooled embedding.")


def extract_features(
    model: Union[torch.nn.Module, Callable[[torch.Tensor], Any]],
    images: Union[ArrayLike, Iterable[Any]],
    *,
    batch_size: int = 64,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """Embeddings ``[N, D]`` (float32, CPU) of ``images`` under ``model``.

    ``images`` is a float tensor ``[N, C, H, W]`` already normalised for the model, or an
    iterable of such batches (or of ``(batch, labels)`` pairs, as a DataLoader yields).
    ``model`` maps a batch to ``[B, D]``; a ``[B, N, D]`` token output gives its first
    (class) token; a dict / ``ModelOutput`` gives ``pooler_output`` when present, else its
    first tensor. A module runs in eval mode under ``torch.no_grad`` and its mode is
    restored afterwards.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}; expected a positive int.")
    device = torch.device(device)
    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        try:
            model.eval()
        except NotImplementedError:  # torch.export modules are already inference graphs
            was_training = None
    feats: List[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in iter_batches(images, batch_size):
                feats.append(_embedding(model(batch.to(device))).float().cpu())
    finally:
        if was_training and isinstance(model, torch.nn.Module):
            model.train(True)
    if not feats:
        raise DataError("No images were given to extract_features; the source is empty.")
    return torch.cat(feats)


# ----------------------------------------------------------------------------- checks


def _as_features(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().float().cpu()
    if t.dim() != 2:
        raise DataError(f"{name} has shape {tuple(t.shape)}; expected features [N, D].")
    if not torch.isfinite(t).all():
        raise DataError(f"{name} contains NaN or inf; check the model that produced the features.")
    return t


def _as_labels(y: ArrayLike, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(y).detach().cpu()
    if t.dim() != 1 or t.shape[0] != n:
        raise DataError(f"{name} has shape {tuple(t.shape)}; expected [{n}] (one label per feature row).")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise DataError(f"{name} holds non-integer values; expected class indices.")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        raise DataError(f"{name} has negative labels; expected class indices 0..C-1.")
    return t


def _check_pair(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike):
    xtr, xte = _as_features(train_x, "train_x"), _as_features(test_x, "test_x")
    if xtr.shape[1] != xte.shape[1]:
        raise DataError(f"train_x has {xtr.shape[1]} feature dims but test_x has {xte.shape[1]}; extract both with "
                        "the same model.")
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        raise DataError("Empty train or test features; give at least one sample of each.")
    return xtr, _as_labels(train_y, xtr.shape[0], "train_y"), xte, _as_labels(test_y, xte.shape[0], "test_y")


# ----------------------------------------------------------------------------- k-NN


def knn_top1(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike, k: int = 20) -> float:
    """Top-1 accuracy in [0, 1] of a k-NN majority vote on L2-normalised features.

    The paper's protocol: scikit-learn ``KNeighborsClassifier(n_neighbors=k,
    weights='uniform')``; Euclidean distance on unit vectors ranks like cosine similarity.
    ``k`` larger than the training set is clamped to its size (logged).
    """
    return float(knn_correct(train_x, train_y, test_x, test_y, k).mean())


def knn_correct(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike,
                k: int = 20) -> np.ndarray:
    """Per test image, whether the k-NN vote of :func:`knn_top1` is right (bool ``[N_test]``).

    Paired comparisons of two models on the same test images (bootstrap intervals of an
    accuracy difference) resample these.
    """
    try:
        from sklearn.neighbors import KNeighborsClassifier
    except ImportError as e:
        raise ElasticFxError("knn_top1 needs scikit-learn (the paper's k-NN); pip install scikit-learn.") from e

    if not isinstance(k, int) or k < 1:
        raise DataError(f"k={k!r}; expected a positive int (the paper uses 20).")
    xtr, ytr, xte, yte = _check_pair(train_x, train_y, test_x, test_y)
    if k > xtr.shape[0]:
        logger.warning("k=%d exceeds the %d training samples; using k=%d", k, xtr.shape[0], xtr.shape[0])
        k = xtr.shape[0]
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    clf = KNeighborsClassifier(n_neighbors=k, weights="uniform", algorithm="brute", metric="euclidean")
    clf.fit(xtr.numpy(), ytr.numpy())
    pred = clf.predict(xte.numpy())
    return pred == yte.numpy()


# ----------------------------------------------------------------------------- linear probe


@dataclass(frozen=True)
class LinearProbeConfig:
    """The DINO linear-evaluation recipe the paper uses; ``epochs`` is the knob for CPU runs.

    ``val_fraction`` of the training features is held out for model selection when no
    validation split is given (0 disables selection: the last epoch is reported).
    """

    epochs: int = 100
    lr: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 256
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ElasticFxError(f"LinearProbeConfig needs epochs >= 1 and batch_size >= 1; got {self.epochs}, "
                                 f"{self.batch_size}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ElasticFxError(f"val_fraction={self.val_fraction}; expected a value in [0, 1).")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ElasticFxError(f"LinearProbeConfig lr={self.lr}, weight_decay={self.weight_decay}, "
                                 f"momentum={self.momentum}; expected lr > 0, weight_decay >= 0, 0 <= momentum < 1.")


def _accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(_correct(head, x, y).float().mean())


def _correct(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head(x).argmax(1) == y


def _split_val(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    """Random hold-out of ``fraction`` of (x, y); returns train_x, train_y, val_x, val_y."""
    n_val = int(round(fraction * x.shape[0]))
    if fraction == 0 or n_val == 0:
        return x, y, None, None
    if n_val >= x.shape[0]:
        raise DataError(f"val_fraction={fraction} leaves no training samples out of {x.shape[0]}.")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    config: Optional[LinearProbeConfig] = None,
    val: Optional[Tuple[ArrayLike, ArrayLike]] = None,
    per_image: bool = False,
) -> Union[float, np.ndarray]:
    """Test top-1 accuracy in [0, 1] of a linear head trained on frozen features.

    SGD with momentum and ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per
    epoch; no augmentation; the head with the best validation accuracy (``val`` if given,
    else a ``config.val_fraction`` hold-out of the training set; the earliest epoch wins
    ties) is evaluated on the test set. Head init as in DINO: weights N(0, 0.01), bias 0.
    ``per_image=True`` returns whether each test image is classified right (bool ``[N_test]``).
    """
    cfg = config or LinearProbeConfig()
    xtr, ytr, xte, yte = _check_pair(train_x, train_y, test_x, test_y)
    if val is not None:
        xva = _as_features(val[0], "val_x")
        yva = _as_labels(val[1], xva.shape[0], "val_y")
        if xva.shape[1] != xtr.shape[1]:
            raise DataError(f"val features have {xva.shape[1]} dims, train features {xtr.shape[1]}.")
    else:
        xtr, ytr, xva, yva = _split_val(xtr, ytr, cfg.val_fraction, cfg.seed)
    labels = [ytr, yte] + ([yva] if yva is not None else [])
    num_classes = int(max(int(t.max()) for t in labels if t.numel())) + 1

    device = torch.device(cfg.device)
    torch_gen = torch.Generator().manual_seed(cfg.seed)
    head = torch.nn.Linear(xtr.shape[1], num_classes).to(device)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=torch_gen)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=0.0)
    xtr, ytr, xte, yte = xtr.to(device), ytr.to(device), xte.to(device), yte.to(device)
    if xva is not None:
        xva, yva = xva.to(device), yva.to(device)

    best_acc, best_epoch, best_state = -1.0, -1, None
    for epoch in range(cfg.epochs):
        perm = torch.randperm(xtr.shape[0], generator=torch_gen).to(device)
        for start in range(0, xtr.shape[0], cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if xva is not None:
            acc = _accuracy(head, xva, yva)
            if acc > best_acc:
                best_acc, best_epoch, best_state = acc, epoch, copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
        logger.info("linear probe: best validation accuracy %.4f at epoch %d of %d", best_acc, best_epoch + 1,
                    cfg.epochs)
    if per_image:
        return _correct(head, xte, yte).cpu().numpy()
    return _accuracy(head, xte, yte)


# ----------------------------------------------------------------------------- one call


def evaluate_features(
    model: Union[torch.nn.Module, Callable[[torch.Tensor], Any], None],
    data: LabelledData,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    image_size: Optional[int] = None,
    batch_size: int = 64,
    device: Union[str, torch.device] = "cpu",
    k: int = 20,
    linear: Optional[LinearProbeConfig] = None,
) -> dict:
    """k-NN (and, with ``linear``, linear-probe) top-1 of ``model``'s features on ``data``.

    Images (uint8 ``[N, H, W, C]``) are normalised with ``mean``/``std`` (resized to
    ``image_size`` if given) and embedded by ``model``; without ``mean``/``std`` the
    model's own preprocessing is used (:func:`_normalisation`; a :class:`DataError` when
    it has none). ``data`` holding features already (float ``[N, D]``) is used as is, and
    ``model`` may then be None.
    Returns ``{"knn_top1": ..., "linear_top1": ...}`` (the latter only with ``linear``) and the
    per-test-image correctness behind each (``"knn_correct"``, ``"linear_correct"``: bool arrays).
    """

    def features(x: np.ndarray) -> torch.Tensor:
        if x.ndim == 2:
            return torch.as_tensor(x).float()
        if model is None:
            raise DataError(f"data holds images of shape {x.shape[1:]} but model is None; "
                            "pass the model to embed them.")
        m, s, size = _normalisation(model, mean, std, image_size)
        chunks = (to_model_input(x[i:i + batch_size], m, s, size) for i in range(0, len(x), batch_size))
        return extract_features(model, chunks, device=device)  # converted chunk by chunk: uint8 stays compact

    f_train, f_test = features(data.x_train), features(data.x_test)
    ok = knn_correct(f_train, data.y_train, f_test, data.y_test, k=k)
    result = {"knn_top1": float(ok.mean()), "knn_correct": ok}
    if linear is not None:
        lin = linear_probe(f_train, data.y_train, f_test, data.y_test, linear, per_image=True)
        result.update(linear_top1=float(lin.mean()), linear_correct=lin)
    return result


# ----------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class BudgetResult:
    """Quality of the sub-network an :class:`~elastic_fx.ElasticScores` gives at one sparsity.

    ``target_sparsity`` is what was asked; ``sparsity`` what the structure granularity
    achieved (fraction of prunable parameters removed); ``params`` and ``gflops`` count
    the whole sliced model; accuracies are in [0, 1] (``linear_top1`` only with a probe).
    """

    target_sparsity: float
    sparsity: float
    params: int
    gflops: float
    knn_top1: float
    linear_top1: Optional[float] = None
    seconds: float = 0.0
    knn_correct: Optional[np.ndarray] = None  # per test image (for paired comparisons)
    linear_correct: Optional[np.ndarray] = None

    def as_dict(self) -> dict:
        """JSON-ready dict of every field."""
        return {"target_sparsity": self.target_sparsity, "sparsity": self.sparsity, "params": self.params,
                "gflops": self.gflops, "knn_top1": self.knn_top1, "linear_top1": self.linear_top1,
                "seconds": self.seconds}


def _normalisation(model: Any, mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                   image_size: Optional[int]) -> Tuple[Sequence[float], Sequence[float], Optional[int]]:
    """``mean``/``std``/``image_size`` to normalise evaluation images with: the caller's, else the model's.

    Both statistics given: used as they are, and images keep their size unless
    ``image_size`` is given. Otherwise :func:`elastic_fx.data.resolve_preprocess` (the
    graph's stored config, then the model's own) fills what is missing, and square
    models resize the images to their input side.
    """
    if mean is not None and std is not None:
        return mean, std, image_size
    cfg = resolve_preprocess(model, mean=mean, std=std)
    side = cfg.input_size[0] if cfg.input_size[0] == cfg.input_size[1] else None
    return cfg.mean, cfg.std, (image_size or side)


def _check_sparsities(sparsities: Sequence[float]) -> List[float]:
    from .errors import BudgetError

    values = list(sparsities) if not isinstance(sparsities, (int, float)) else [sparsities]
    if not values:
        raise BudgetError("give at least one sparsity to evaluate, e.g. [0.0, 0.3, 0.5].")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise BudgetError(f"sparsity {v!r} is outside [0, 1); it is the fraction of prunable parameters removed.")
    return [float(v) for v in values]


def evaluate_budgets(
    model: torch.nn.Module,
    scores: Any,
    data: LabelledData,
    sparsities: Sequence[float],
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    image_size: Optional[int] = None,
    k: int = 20,
    linear: Optional[LinearProbeConfig] = None,
    batch_size: int = 64,
    device: Union[str, torch.device] = "cpu",
    example_inputs: Any = None,
) -> List[BudgetResult]:
    """k-NN (and, with ``linear``, linear-probe) top-1 of the sliced sub-network at every sparsity.

    Args:
        model: an ``nn.Module`` (traced here) or a GraphModule from :func:`elastic_fx.trace`.
        scores: an :class:`~elastic_fx.ElasticScores` or the path of an ``.efx`` file.
        data: a labelled split of uint8 images (:func:`load_labelled`).
        sparsities: fractions of prunable parameters to remove, each in [0, 1); 0 is the dense model.
        mean, std, image_size: normalisation of the images; default: the model's own
            preprocessing config (a :class:`DataError` when it has none).
        k, linear: k-NN neighbours; linear-probe recipe (None: no probe).
        example_inputs: for tracing an ``nn.Module``; default: two of ``data``'s train images.

    Every sub-network is physically sliced (:meth:`ElasticModel.at`) and cut at its pooled
    embedding (:func:`elastic_fx.passes.embedding.embedding_module`); features of the train split
    are the k-NN reference set, the test split is classified.
    """
    import time

    from .budget import achieved
    from .elastic import ElasticModel
    from .passes.embedding import embedding_module

    values = _check_sparsities(sparsities)
    if data.x_train.ndim != 4:
        raise DataError(f"data holds features of shape {data.x_train.shape}; evaluate_budgets needs uint8 images "
                        "[N, H, W, C] to run the sliced models on (use knn_top1 for precomputed features).")
    if example_inputs is None and mean is not None and std is not None and not hasattr(model, "graph"):
        example_inputs = (to_model_input(data.x_train[:2], mean, std, image_size),)
    em = ElasticModel(model, scores, example_inputs)  # no example: traced at the model's own input size
    pre_mean, pre_std, pre_size = _normalisation(em.gm, mean, std, image_size)
    results = []
    for s in values:
        t0 = time.perf_counter()
        keep = em.keep(s)
        stats = achieved(em.smap, keep)
        small = em.at(s)
        emb = embedding_module(small, em.smap)
        acc = evaluate_features(emb, data, mean=pre_mean, std=pre_std, image_size=pre_size, batch_size=batch_size,
                                device=device, k=k, linear=linear)
        results.append(BudgetResult(target_sparsity=s, sparsity=float(stats["sparsity"]), params=int(stats["params"]),
                                    gflops=float(stats["gflops"]), knn_top1=acc["knn_top1"],
                                    linear_top1=acc.get("linear_top1"), seconds=time.perf_counter() - t0,
                                    knn_correct=acc["knn_correct"], linear_correct=acc.get("linear_correct")))
        logger.info("sparsity %.2f: k-NN %.4f (%d params) in %.1fs", s, acc["knn_top1"], stats["params"],
                    results[-1].seconds)
    return results


class OnnxEmbedder:
    """An ONNX file (fp32, fp16 or INT8) as a callable for :func:`extract_features`: float
    ``[B, C, H, W]`` in, its first output as a tensor out (onnxruntime, CPU)."""

    def __init__(self, path: Any) -> None:
        import onnxruntime as ort

        from .errors import ExportError

        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot load {path} ({' '.join(str(e).split())[:300]}); pass an .onnx "
                              "file written by elastic-fx export") from e
        spec = self.session.get_inputs()[0]
        self.name = spec.name
        self.dtype = np.float16 if spec.type == "tensor(float16)" else np.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.name: x.detach().cpu().numpy().astype(self.dtype)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def evaluate_onnx(path: Any, data: LabelledData, preprocess: Any, *, k: int = 20,
                  linear: Optional[LinearProbeConfig] = None, batch_size: int = 64) -> dict:
    """k-NN (and linear-probe) top-1 of an exported ONNX file's outputs on ``data``.

    ``preprocess`` is the model's :class:`~elastic_fx.data.PreprocessConfig` (mean, std,
    input size). The file's first output is the feature: ``[B, D]`` as is, ``[B, N, D]``
    its first token. A file exported with its classifier gives logits: k-NN on them is
    what that file can do, not the paper's protocol on the pooled embedding.
    """
    side = preprocess.input_size[0] if preprocess.input_size[0] == preprocess.input_size[1] else None
    return evaluate_features(OnnxEmbedder(path), data, mean=preprocess.mean, std=preprocess.std, image_size=side,
                             batch_size=batch_size, k=k, linear=linear)


def format_budget_table(results: Sequence[BudgetResult], title: Optional[str] = None) -> str:
    """A Markdown table of :func:`evaluate_budgets` results (accuracies in %)."""
    probe = any(r.linear_top1 is not None for r in results)
    head = "| target | achieved | params (M) | GFLOPs | k-NN top-1 (%) |" + (" linear top-1 (%) |" if probe else "")
    rule = "|---:|---:|---:|---:|---:|" + ("---:|" if probe else "")
    rows = [head, rule]
    for r in results:
        row = (f"| {r.target_sparsity:.2f} | {r.sparsity:.3f} | {r.params / 1e6:.3f} | {r.gflops:.3f} "
               f"| {100 * r.knn_top1:.1f} |")
        if probe:
            row += " - |" if r.linear_top1 is None else f" {100 * r.linear_top1:.1f} |"
        rows.append(row)
    return "\n".join(([title, ""] if title else []) + rows)
