"""Quantize a validated fp32 ONNX file to INT8 (static QDQ), check it, write it atomically.

``quantize_onnx`` takes an fp32 ``.onnx`` (what :func:`~elastic_fx.exporters.onnx.export_onnx`
wrote), preprocessed calibration images and held-out images (float ``[N, C, H, W]``, already
through the model's own preprocessing), and:

1. runs onnxruntime's recommended pre-processing, ``quant_pre_process`` (symbolic shape
   inference + ORT's basic graph optimisations), into a private temporary folder next to
   the target;
2. picks the nodes to quantize: by default every ``MatMul`` / ``Gemm`` / ``Conv`` that
   multiplies by a constant weight (the linear layers: nearly all of a ViT's FLOPs).
   The attention products ``q @ kᵀ`` and ``softmax @ v`` multiply two activations and
   stay float, as do LayerNorm, Softmax, GELU and the residual adds: their int8 versions
   cost accuracy and, on the CPU, buy little (``QuantConfig.weighted_only=False`` quantizes
   every listed op);
3. ``quantize_static`` in the QDQ format: weights int8 per output channel (symmetric),
   activations uint8 per tensor (asymmetric) with ranges calibrated on the calibration images (MinMax
   by default). onnxruntime fuses each ``DequantizeLinear → MatMul`` into an integer
   kernel at load time (``MatMulIntegerToFloat`` / ``QLinearMatMul``);
4. validates the result on the HELD-OUT images: the cosine similarity of every image's
   output with the fp32 file's output (which equals the sliced fp32 model to 1e-4), and
   the max |diff|; a mean cosine below ``QuantConfig.min_cosine`` is an
   :class:`~elastic_fx.errors.ExportError`;
5. only then moves the file onto the target. Any failure removes the temporary folder:
   no file (and no half-written file) is left behind.

A model with no operator ORT can quantize raises
:class:`~elastic_fx.errors.QuantizationError` naming the operators it has; the caller
keeps the fp32 file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._io import check_output
from ..errors import ConfigError, ExportError, QuantizationError
from .onnx import _file_bytes, _metadata_value, _session, _short, read_metadata

logger = logging.getLogger(__name__)

#: Calibration methods of ``onnxruntime.quantization.CalibrationMethod`` by the names QuantConfig takes.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Nodes that only move quantized values; never counted as compute that "stays in float".
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class QuantConfig:
    """How ``quantize_onnx`` quantizes (defaults: static QDQ, per-channel int8 weights, MinMax).

    ``op_types``: the operators to quantize; ``weighted_only``: only those that multiply
    by a constant weight. ``activation_type``: ``"uint8"`` (U8S8: uint8 activations, int8
    weights) is onnxruntime's fast path on x86 (``benchmarks/results/deploy.md`` compares it
    with S8S8); on x86 CPUs without VNNI, ``reduce_range=True`` avoids the saturation of
    their u8 x s8 instruction. ``quantize_outputs=False`` leaves the quantized ops' outputs
    in float (onnxruntime then runs ``MatMulIntegerToFloat``, dequantization and bias fused). ``min_cosine``: the least mean cosine similarity (held-out
    images, int8 vs fp32 outputs) accepted. ``calibration_batch``: images per
    calibration run (memory: onnxruntime keeps every quantized tensor of a batch).
    """

    per_channel: bool = True
    op_types: Tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    weighted_only: bool = True
    calibrate_method: str = "minmax"
    activation_type: str = "uint8"  # or "int8"
    reduce_range: bool = False
    min_cosine: float = 0.9
    calibration_batch: int = 8
    quantize_outputs: bool = True

    def __post_init__(self) -> None:
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibrate_method={self.calibrate_method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
        if self.activation_type not in ("int8", "uint8"):
            raise ConfigError(f"activation_type={self.activation_type!r}; use 'int8' or 'uint8'")
        if not self.op_types:
            raise ConfigError("op_types is empty; name the operators to quantize, e.g. ('MatMul', 'Gemm', 'Conv')")
        if not 0.0 <= self.min_cosine <= 1.0 or self.calibration_batch < 1:
            raise ConfigError(f"min_cosine={self.min_cosine} must be in [0, 1] and calibration_batch="
                              f"{self.calibration_batch} >= 1")


@dataclass(frozen=True)
class QuantReport:
    """What ``quantize_onnx`` wrote and how close it stays to the fp32 file on held-out images.

    ``quantized_ops`` / ``float_ops``: node counts per operator type that run in int8 /
    stay in float (Q/DQ nodes themselves are not counted).
    """

    path: str
    cosine_mean: float
    cosine_min: float
    max_abs_diff: float
    calibration_images: int
    holdout_images: int
    quantized_ops: Dict[str, int]
    float_ops: Dict[str, int]
    file_bytes: int
    metadata: Dict[str, str] = field(default_factory=dict)


class _Reader:
    """``CalibrationDataReader``: the calibration tensor in batches, as onnxruntime feeds.

    ``set_range`` lets onnxruntime's MinMax calibrator take one batch per pass
    (``CalibStridedMinMax``) and merge the ranges, so memory holds one batch's
    activations, not every image's.
    """

    def __init__(self, name: str, images: np.ndarray, batch: int) -> None:
        self.feeds = [{name: images[i:i + batch]} for i in range(0, len(images), batch)]
        self.set_range(0, len(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches = iter(self.feeds[start_index:end_index])

    def get_next(self):
        return next(self.batches, None)


def _as_images(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.ndim < 2 or len(x) == 0 or not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{what} must be preprocessed float images [N, C, H, W] with N >= 1, got "
                          f"{x.dtype} {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{what} holds NaN or inf; check the images and their preprocessing")
    return np.ascontiguousarray(x, dtype=np.float32)


def _weighted_nodes(model, op_types: Sequence[str], weighted_only: bool) -> Tuple[List[str], Counter]:
    """Names of the nodes to quantize, and the operator types the graph has (for messages)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    picked, present = [], Counter(n.op_type for n in model.graph.node)
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        if weighted_only and not any(i in consts for i in node.input[1:2]):
            continue  # activation x activation (attention scores): stays float
        picked.append(node.name)
    return picked, present


def op_summary(model, op_types: Sequence[str] = ("MatMul", "Gemm", "Conv")) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(quantized, float) node counts per operator type of a QDQ model.

    A node of ``op_types`` runs in int8 when one of its inputs comes from a
    ``DequantizeLinear`` (onnxruntime fuses the pair into an integer kernel); every other
    compute node (those that merely pass a dequantized tensor on included) runs in float.
    """
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized, floating = Counter(), Counter()
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS or node.op_type == "Constant":
            continue
        int8 = node.op_type in op_types and any(i in dq_out for i in node.input)
        (quantized if int8 else floating)[node.op_type] += 1
    return dict(sorted(quantized.items())), dict(sorted(floating.items()))


def _run(session, name: str, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """The first output of ``session`` over ``images``, flattened per image: ``[N, -1]`` float64."""
    outs = [session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)]
    out = np.concatenate(outs).astype(np.float64)
    return out.reshape(len(out), -1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with the same row of ``b``."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-30)


def _pre_process(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
    except Exception as e:  # symbolic shape inference fails on some exporter outputs: ONNX's own still runs
        logger.info("quant_pre_process with symbolic shape inference failed (%s); retrying without it", _short(e))
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def quantize_onnx(fp32_path: "os.PathLike[str] | str", path: "os.PathLike[str] | str", calibration,
                  holdout, *, config: Optional[QuantConfig] = None,
                  metadata: Optional[Dict[str, object]] = None) -> QuantReport:
    """Static INT8 (QDQ) quantization of ``fp32_path`` into ``path``, validated on ``holdout``; atomic.

    Args:
        fp32_path: the fp32 ONNX file (its metadata is carried over).
        path: the INT8 ``.onnx`` to write.
        calibration: preprocessed float images ``[N, C, H, W]`` the activation ranges come from.
        holdout: other preprocessed images the result is checked on (never calibrated on).
        config: a :class:`QuantConfig`.
        metadata: extra ``metadata_props`` (``precision``, ``quantization`` and the op
            summary are added).

    Raises:
        QuantizationError: the graph has no operator ORT can quantize (the message names the
            operators it has); nothing is written.
        ExportError: quantization or validation failed; nothing is written.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise ConfigError(f"config must be an elastic_fx.QuantConfig, got {type(cfg).__name__}")
    src = Path(fp32_path)
    if not src.is_file():
        raise ExportError(f"no fp32 ONNX file at {src}; export one with export_onnx first")
    cal, held = _as_images(calibration, "calibration"), _as_images(holdout, "holdout")
    target = check_output(path, "the INT8 path", ExportError)
    target = target.parent.resolve() / target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(read_metadata(src))
    tmp = Path(tempfile.mkdtemp(prefix=".efx-", suffix=".tmp", dir=target.parent))
    try:
        pre = tmp / "pre.onnx"
        try:
            _pre_process(src, pre)
        except Exception as e:
            raise ExportError(f"onnxruntime's quant_pre_process failed on {src}: {_short(e)}") from e
        pre_model = onnx.load(str(pre))
        nodes, present = _weighted_nodes(pre_model, cfg.op_types, cfg.weighted_only)
        if not nodes:
            have = ", ".join(f"{k} x{v}" for k, v in sorted(present.items()))
            raise QuantizationError(
                f"{src.name} has no operator onnxruntime can quantize among {list(cfg.op_types)}"
                f"{' with a constant weight' if cfg.weighted_only else ''}; its operators: {have}. The fp32 file "
                "is the one to deploy (or quantize other op types with QuantConfig(op_types=...)).")
        session = _session(src)
        name = session.get_inputs()[0].name
        act = QuantType.QInt8 if cfg.activation_type == "int8" else QuantType.QUInt8
        out = tmp / "int8.onnx"
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if not cfg.quantize_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = list(cfg.op_types)
        if cfg.calibrate_method == "minmax":
            extra["CalibStridedMinMax"] = 1  # one batch per calibration pass, ranges merged
        try:
            quantize_static(str(pre), str(out), _Reader(name, cal, cfg.calibration_batch),
                            quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                            activation_type=act, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            op_types_to_quantize=list(cfg.op_types),
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "entropy": CalibrationMethod.Entropy,
                                              "percentile": CalibrationMethod.Percentile}[cfg.calibrate_method],
                            extra_options=extra)
        except Exception as e:
            raise ExportError(f"onnxruntime's quantize_static failed on {src.name}: {_short(e)}") from e
        qmodel = onnx.load(str(out))
        quantized, floating = op_summary(qmodel, cfg.op_types)
        meta.update({str(k): _metadata_value(v) for k, v in (metadata or {}).items()})
        meta.update({"precision": "int8", "dtype": "int8 weights (QDQ), float32 input/output",
                     "quantization": f"static QDQ, {'per-channel' if cfg.per_channel else 'per-tensor'} int8 weights, "
                                     f"{cfg.activation_type} activations, {cfg.calibrate_method} calibration on "
                                     f"{len(cal)} images",
                     "quantized_ops": json.dumps(quantized), "float_ops": json.dumps(floating)})
        del qmodel.metadata_props[:]
        for k, v in meta.items():
            entry = qmodel.metadata_props.add()
            entry.key, entry.value = k, v
        final = tmp / "final.onnx"
        onnx.save_model(qmodel, str(final))
        try:
            onnx.checker.check_model(str(final))
            ref = _run(session, name, held)
            q_session = _session(final)
            got = _run(q_session, q_session.get_inputs()[0].name, held)
        except Exception as e:
            raise ExportError(f"the INT8 file does not load or run in onnxruntime: {_short(e)}") from e
        cos = cosine_rows(got, ref)
        diff = float(np.max(np.abs(got - ref)))
        if not np.isfinite(cos).all() or not float(cos.mean()) >= cfg.min_cosine:
            raise ExportError(
                f"the INT8 model's outputs are too far from fp32 on {len(held)} held-out images: mean cosine "
                f"{float(np.nanmean(cos)):.4f} < {cfg.min_cosine}; nothing was written. Give more (or more "
                "representative) calibration images, try QuantConfig(calibrate_method='percentile'), or deploy fp32.")
        size = _file_bytes(final)
        os.replace(final, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s: cosine %.4f (min %.4f) on %d held-out images; float ops %s", target, cos.mean(),
                cos.min(), len(held), floating)
    return QuantReport(path=str(target), cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                       max_abs_diff=diff, calibration_images=len(cal), holdout_images=len(held),
                       quantized_ops=quantized, float_ops=floating, file_bytes=size, metadata=meta)
