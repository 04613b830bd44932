"""Deployment files per budget: .pt2 round trips, static INT8 ONNX, the manifest, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import elastic_fx as efx
from elastic_fx import elastic as elastic_mod
from elastic_fx.exporters.onnx import read_metadata
from elastic_fx.exporters.pt2 import read_pt2_metadata
from elastic_fx.scoring.local import local_scores

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def em():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, num_classes=5).eval()
    gm = efx.trace(model, (torch.randn(2, 3, 32, 32),))
    smap = efx.discover(gm)
    scores = efx.ElasticScores.from_local(local_scores(gm, None, method="magnitude", structures=smap,
                                                       progress=False), smap)
    return efx.ElasticModel(gm, scores)


@pytest.fixture(scope="module")
def images():
    """Structured images (smooth colour fields) rather than white noise, already preprocessed."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(48, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.25


@pytest.fixture(scope="module")
def fp32_file(em, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "s50.onnx"
    efx.export_onnx(em.at(0.5), path, metadata={"sparsity": 0.5})
    return path


def _png_folder(folder, n, size=40):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# ----------------------------------------------------------------------------- .pt2


def test_pt2_round_trip_equals_the_sliced_module_at_another_batch_size(em, tmp_path):
    small = em.at(0.5)
    report = efx.export_pt2(small, tmp_path / "s50.pt2", metadata={"sparsity": 0.5})
    assert report.batch_sizes_checked == (1, 5) and report.max_abs_diff <= report.tolerance
    assert report.file_bytes == (tmp_path / "s50.pt2").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s50.pt2"]  # no temporary file left
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # a batch size never checked
    with torch.no_grad():
        want = small(x)
        got = efx.load_pt2(tmp_path / "s50.pt2")(x)
        documented = torch.export.load(str(tmp_path / "s50.pt2")).module()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(documented, want, atol=1e-5, rtol=1e-5)
    assert got.shape == (3, 5)
    assert json.loads(read_pt2_metadata(tmp_path / "s50.pt2")["sparsity"]) == 0.5


@pytest.mark.parametrize("name", ["hf_vit", "torchvision_vit"])
def test_pt2_of_other_families(name, traced, tmp_path):
    """A Hugging Face model (traced by torch.export, dict outputs) and torchvision's nn.MultiheadAttention."""
    from elastic_fx.exporters.onnx import _flatten_tensors

    _, inputs, gm, smap = traced(name)
    g = torch.Generator().manual_seed(0)
    heads = {b.index: torch.rand(b.attention.num_heads, generator=g) for b in smap.blocks if b.attention}
    neurons = {b.index: torch.rand(b.mlp.hidden_features, generator=g) for b in smap.blocks if b.mlp}
    small = efx.slice(gm, smap, efx.budget_masks(smap, heads, neurons, sparsity=0.5))
    efx.export_pt2(small, tmp_path / "m.pt2", inputs[0])
    x = torch.randn(3, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = _flatten_tensors(efx.load_pt2(tmp_path / "m.pt2")(x)), _flatten_tensors(small(x))
    assert len(got) == len(want) >= 1
    for (_, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _ExportsDifferently(torch.nn.Module):
    """Adds 1 while torch.export captures it: the exported program disagrees with the module."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return y + 1 if torch.compiler.is_exporting() else y


def test_pt2_that_fails_validation_writes_nothing(tmp_path):
    with pytest.raises(efx.ExportError, match="differs from the module.*nothing was written"):
        efx.export_pt2(_ExportsDifferently(), tmp_path / "bad.pt2", torch.randn(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_load_pt2_refuses_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(efx.ExportError, match="no .pt2 file"):
        efx.load_pt2(tmp_path / "none.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(efx.ExportError, match="not a loadable torch.export program"):
        efx.load_pt2(tmp_path / "junk.pt2")


# ----------------------------------------------------------------------------- INT8


def test_int8_file_is_quantized_and_close_to_fp32(fp32_file, images, tmp_path):
    target = tmp_path / "s50.int8.onnx"
    report = efx.quantize_onnx(fp32_file, target, images[:32], images[32:])
    assert report.calibration_images == 32 and report.holdout_images == 16
    assert 0.9 <= report.cosine_min <= report.cosine_mean <= 1.0 + 1e-9 and report.max_abs_diff > 0
    # the linear layers run in int8 (2 blocks x 4 + head), the attention products and the norms stay float
    assert report.quantized_ops.get("MatMul", 0) + report.quantized_ops.get("Gemm", 0) >= 9
    assert {"Softmax", "LayerNormalization"} <= set(report.float_ops) and report.float_ops.get("MatMul") == 4
    assert target.stat().st_size < 0.5 * fp32_file.stat().st_size
    model = onnx.load(str(target))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) > 0
    meta = read_metadata(target)
    assert meta["precision"] == "int8" and "static QDQ, per-channel" in meta["quantization"]
    assert "sparsity" in meta  # carried over from the fp32 file
    # independent check of the reported fidelity
    sess32 = ort.InferenceSession(str(fp32_file), providers=["CPUExecutionProvider"])
    sess8 = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = images[32:].numpy()
    a, b = sess32.run(None, {"input": x})[0], sess8.run(None, {sess8.get_inputs()[0].name: x})[0]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.mean() == pytest.approx(report.cosine_mean, abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s50.int8.onnx"]


def test_int8_with_float_outputs_quantizes_fewer_tensors(fp32_file, images, tmp_path):
    default = efx.quantize_onnx(fp32_file, tmp_path / "a.onnx", images[:32], images[32:])
    float_out = efx.quantize_onnx(fp32_file, tmp_path / "b.onnx", images[:32], images[32:],
                                  config=efx.QuantConfig(quantize_outputs=False))
    assert float_out.quantized_ops == default.quantized_ops and float_out.cosine_mean >= 0.9

    def q_nodes(path):
        return sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)

    assert q_nodes(tmp_path / "b.onnx") < q_nodes(tmp_path / "a.onnx")


def test_int8_below_the_cosine_bound_writes_nothing(fp32_file, images, tmp_path):
    with pytest.raises(efx.ExportError, match="too far from fp32.*nothing was written"):
        efx.quantize_onnx(fp32_file, tmp_path / "q.onnx", images[:32], images[32:],
                          config=efx.QuantConfig(min_cosine=1.0))
    assert list(tmp_path.iterdir()) == []


class _NoWeights(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.layer_norm(x * 2 + 1, x.shape[-1:]).softmax(-1)


def test_model_without_quantizable_ops_names_its_ops(tmp_path):
    fp32 = tmp_path / "f.onnx"
    efx.export_onnx(_NoWeights(), fp32, torch.randn(2, 6))
    with pytest.raises(efx.QuantizationError, match="no operator onnxruntime can quantize.*LayerNormalization"):
        efx.quantize_onnx(fp32, tmp_path / "q.onnx", torch.randn(8, 6), torch.randn(4, 6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx"]


def test_quant_config_refuses_unknown_settings():
    with pytest.raises(efx.ConfigError, match="calibrate_method"):
        efx.QuantConfig(calibrate_method="mse")
    with pytest.raises(efx.ConfigError, match="activation_type"):
        efx.QuantConfig(activation_type="int4")


# ----------------------------------------------------------------------------- ElasticModel.export


@pytest.mark.slow
def test_export_writes_every_pair_with_a_full_manifest(em, images, tmp_path):
    out = tmp_path / "deploy"
    manifest = em.export(out, [0.3, 0.5], formats=("onnx", "pt2"), precisions=("fp32", "int8"),
                         calibration=images, latency_batches=(1, 2), latency_iters=1)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    pairs = [(e["target_sparsity"], e["format"], e["precision"]) for e in manifest["budgets"]]
    assert pairs == [(s, f, p) for s in (0.3, 0.5) for f, p in (("onnx", "fp32"), ("onnx", "int8"), ("pt2", "fp32"))]
    assert manifest["skipped"] == ["pt2 int8"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"sparsity_{n}{x}" for n in ("30", "50") for x in (".onnx", ".int8.onnx", ".pt2")])
    for e in manifest["budgets"]:
        assert {"file", "sha256", "sparsity", "params", "gflops", "precision", "format", "fidelity",
                "latency_ms", "runtime"} <= set(e)
        assert e["sha256"] == hashlib.sha256((out / e["file"]).read_bytes()).hexdigest()
        assert set(e["latency_ms"]) == {"1", "2"} and all(v > 0 for v in e["latency_ms"].values())
        if e["precision"] == "int8":
            assert 0.9 <= e["fidelity"]["cosine_mean"] <= 1.0 + 1e-9 and e["fidelity"]["holdout_images"] >= 1
            assert e["runtime"].startswith("onnxruntime") and "Softmax" in e["float_ops"]
        else:
            assert e["fidelity"]["max_abs_diff"] < 1e-4
    by = {(e["target_sparsity"], e["format"], e["precision"]): e for e in manifest["budgets"]}
    assert by[(0.5, "onnx", "fp32")]["params"] < by[(0.3, "onnx", "fp32")]["params"]
    assert by[(0.5, "pt2", "fp32")]["runtime"].startswith("torch")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(efx.load_pt2(out / "sparsity_50.pt2")(x), em.at(0.5)(x), atol=1e-5, rtol=1e-5)
    assert json.loads(read_metadata(out / "sparsity_50.int8.onnx")["preprocess"])["input_size"] == [32, 32]


@pytest.mark.parametrize("kw, match", [
    ({"formats": ("onnx", "tflite")}, r"format \['tflite'\] is not offered; choose from onnx, pt2"),
    ({"precisions": ("int4",)}, r"precision \['int4'\] is not offered; choose from fp32, fp16, int8"),
    ({"formats": ("pt2",), "precisions": ("int8",)}, r"none of \['pt2 int8'\] is offered"),
    ({"precisions": ("int8",)}, "int8 needs calibration images"),
])
def test_export_refuses_what_is_not_offered_before_writing(em, tmp_path, kw, match):
    with pytest.raises(efx.ConfigError, match=match):
        em.export(tmp_path / "out", [0.5], latency_batches=(), **kw)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_empty_and_corrupt_calibration_folders(em, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(efx.DataError, match="no image files"):
        em.export(tmp_path / "out", [0.5], precisions=("int8",), calibration=tmp_path / "empty", latency_batches=())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(efx.DataError, match="could be decoded"):
        em.export(tmp_path / "out", [0.5], precisions=("int8",), calibration=corrupt, latency_batches=())
    one = _png_folder(tmp_path / "one", 1)
    with pytest.raises(efx.DataError, match="at least 2"):
        em.export(tmp_path / "out", [0.5], precisions=("int8",), calibration=one, latency_batches=())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unquantizable_model_keeps_the_float_file(em, images, tmp_path, monkeypatch):
    def refuse(src, *a, **k):
        raise efx.QuantizationError("s.onnx has no operator onnxruntime can quantize; its operators: Relu x1")

    monkeypatch.setattr(elastic_mod, "quantize_onnx", refuse)
    manifest = em.export(tmp_path / "out", [0.5], precisions=("int8",), calibration=images, latency_batches=())
    (entry,) = manifest["budgets"]
    assert entry["file"] == "sparsity_50.onnx" and entry["precision"] == "fp32"
    assert "Relu x1" in entry["int8_skipped"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "sparsity_50.onnx"]
    assert entry["fidelity"]["max_abs_diff"] < 1e-4
    # with fp32 asked for too, its entry says why there is no int8 file
    manifest = em.export(tmp_path / "both", [0.5], precisions=("int8", "fp32"), calibration=images,
                         latency_batches=())
    (entry,) = manifest["budgets"]
    assert entry["precision"] == "fp32" and "Relu x1" in entry["int8_skipped"]
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["manifest.json", "sparsity_50.onnx"]


def test_int8_calibration_defaults_to_the_recorded_prune_images(em, tmp_path, monkeypatch):
    folder = _png_folder(tmp_path / "prune", 8, size=32)
    monkeypatch.setitem(em.scores.config, "images", str(folder))
    cal, hold = em._calibration_split(None, 128, 32, seed=0)
    assert len(cal) + len(hold) == 8 and len(hold) == 2 and cal.shape[1:] == (3, 32, 32)


def test_prune_records_its_image_folder_for_int8_calibration(em, tmp_path):
    folder = _png_folder(tmp_path / "prune", 8, size=32)
    config = efx.SearchConfig(num_images=4, num_fitness_images=8, batch_size=2, pca_dim=4)
    scores = efx.prune(em.gm, folder, structures=em.smap, iterations=1, sparsities=(0.5,), config=config,
                       progress=False)
    back = efx.ElasticScores.load(scores.save(tmp_path / "s.efx"), em.smap)
    assert back.config["images"] == str(folder.resolve())
    cal, hold = efx.ElasticModel(em.gm, back)._calibration_split(None, 128, 32, seed=0)
    assert len(cal) + len(hold) == 8


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_export_formats_and_precisions(tmp_path, capsys):
    from elastic_fx.cli import main

    (tmp_path / "models.py").write_text(
        "import timm\n\ndef tiny():\n    return timm.create_model('vit_tiny_patch16_224', pretrained=False, "
        "img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=5)\n")
    calib = _png_folder(tmp_path / "calib", 24)
    out = tmp_path / "out"
    argv = ["export", f"{tmp_path / 'models.py'}:tiny", "--scores", "magnitude", "--sparsity", "0.5", "--out-dir",
            str(out), "--format", "onnx", "pt2", "--precision", "fp32", "int8", "--calibration", str(calib),
            "--latency-batches", "1", "--latency-iters", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sparsity_50.int8.onnx" in printed and "cos 0." in printed and "not offered, skipped: pt2 int8" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["format"], e["precision"]) for e in manifest["budgets"]] == [
        ("onnx", "fp32"), ("onnx", "int8"), ("pt2", "fp32")]
    # elastic-fx eval accepts the exported files, the INT8 one included: two separable classes
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, n)
        return (np.where(y[:, None, None, None] == 1, 200, 30) + rng.integers(0, 40, (n, 32, 32, 3))).astype(np.uint8), y

    (xtr, ytr), (xte, yte) = split(40), split(20)
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    files = [str(out / "sparsity_50.onnx"), str(out / "sparsity_50.int8.onnx")]
    assert main(["eval", f"{tmp_path / 'models.py'}:tiny", "--onnx", *files, "--data", str(tmp_path / "d.npz"),
                 "--k", "5"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| /")]
    assert [r.split("|")[1].strip() for r in rows] == files
    assert all(float(r.split("|")[2]) >= 90.0 for r in rows)  # separable classes, on the file's outputs

    bad = argv[:argv.index("--format")] + ["--format", "tflite"]
    bad[bad.index(str(out))] = str(tmp_path / "out2")
    assert main(bad) == 1
    assert "format ['tflite'] is not offered" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
