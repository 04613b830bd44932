"""ONNX export: validated against onnxruntime, dynamic batch, metadata, atomic writes, fp16."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from elastic_fx.errors import ExportError
from elastic_fx.exporters import onnx as onnx_exporter
from elastic_fx.exporters.onnx import ExportReport, export_onnx, onnx_latency, read_metadata
from elastic_fx.version import __version__

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10).eval()


@pytest.fixture(scope="module")
def timm_fx(timm_vit):
    return torch.fx.symbolic_trace(timm_vit)


def _ort_run(path, x: np.ndarray):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _listing(folder):
    return sorted(os.listdir(folder))


class _Cheat(torch.nn.Module):
    """Adds 1 while being exported: every exporter's file disagrees with PyTorch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return y + 1 if torch.onnx.is_in_onnx_export() else y


class _DictHead(torch.nn.Module):
    """Returns a dict like a Hugging Face ModelOutput (with a None entry that is skipped)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = self.lin(x)
        return {"last_hidden_state": h, "attentions": None, "pooler_output": h.tanh().mean(1)}


# ----------------------------------------------------------------------------- real exports


def test_fx_graphmodule_exports_with_dynamic_batch(tmp_path, timm_vit, timm_fx):
    meta = {"sparsity": 0.4, "gflops": 0.012, "kept": {0: {"heads": [0, 2], "neurons": 500}},
            "source_model": "vit_tiny_patch16_224"}
    report = export_onnx(timm_fx, tmp_path / "sub" / "vit.onnx", torch.randn(2, 3, 32, 32), metadata=meta)
    assert isinstance(report, ExportReport)
    assert report.exporter == "dynamo" and report.dtype == "float32" and report.opset == 18
    assert report.batch_sizes_checked == (1, 5)
    assert 0 <= report.max_abs_diff <= report.tolerance
    assert report.file_bytes == (tmp_path / "sub" / "vit.onnx").stat().st_size
    model = onnx.load(report.path)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch axis
    # an unchecked batch size still matches the original (non-traced) model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = timm_vit(x).numpy()
    np.testing.assert_allclose(_ort_run(report.path, x.numpy())[0], ref, atol=1e-4, rtol=1e-4)
    stored = read_metadata(report.path)
    assert stored == report.metadata
    assert json.loads(stored["kept"]) == {"0": {"heads": [0, 2], "neurons": 500}}
    assert stored["sparsity"] == "0.4" and stored["source_model"] == "vit_tiny_patch16_224"
    assert stored["elastic_fx_version"] == __version__ and stored["exporter"] == "dynamo"
    assert stored["parameters"] == str(sum(p.numel() for p in timm_vit.parameters()))
    assert _listing(tmp_path / "sub") == ["vit.onnx"]  # no temporary files left


def test_torchvision_vit_exports(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    model.train()
    report = export_onnx(model, tmp_path / "tv.onnx", torch.randn(1, 3, 32, 32), check_batch_sizes=(2, 3))
    assert report.max_abs_diff <= report.tolerance and report.batch_sizes_checked == (2, 3)
    assert model.training  # the caller's mode is restored


def test_torch_export_module_exports(tmp_path, timm_vit):
    batch = torch.export.Dim("batch")
    gm = torch.export.export(timm_vit, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},)).module()
    report = export_onnx(gm, tmp_path / "ep.onnx", torch.randn(2, 3, 32, 32))
    assert report.exporter == "dynamo" and report.max_abs_diff <= report.tolerance


def test_static_batch_torch_export_module_explains_itself(tmp_path, timm_vit):
    gm = torch.export.export(timm_vit, (torch.randn(2, 3, 32, 32),)).module()
    with pytest.raises(ExportError, match="dynamic_batch=False"):
        export_onnx(gm, tmp_path / "static.onnx", torch.randn(2, 3, 32, 32))
    assert _listing(tmp_path) == []


def test_dict_outputs_are_flattened_and_all_compared(tmp_path):
    module = _DictHead()
    report = export_onnx(module, tmp_path / "d.onnx", torch.randn(2, 5, 6), exporter="torchscript")
    assert report.output_names == ("last_hidden_state", "pooler_output")
    x = torch.randn(4, 5, 6)
    hidden, pooled = _ort_run(report.path, x.numpy())
    with torch.no_grad():
        ref = module(x)
    np.testing.assert_allclose(hidden, ref["last_hidden_state"].numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, ref["pooler_output"].numpy(), atol=1e-5)
    only = export_onnx(module, tmp_path / "p.onnx", torch.randn(2, 5, 6), output_index=1, exporter="torchscript")
    assert only.output_names == ("pooler_output",)
    assert _ort_run(only.path, x.numpy())[0].shape == (4, 4)
    with pytest.raises(ExportError, match="output_index=2"):
        export_onnx(module, tmp_path / "q.onnx", torch.randn(2, 5, 6), output_index=2)


def test_static_batch_export(tmp_path, timm_fx):
    report = export_onnx(timm_fx, tmp_path / "s.onnx", torch.randn(2, 3, 32, 32), dynamic_batch=False,
                         exporter="torchscript")
    assert report.batch_sizes_checked == (2,)
    dim0 = onnx.load(report.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2
    assert json.loads(report.metadata["input_shape"]) == [2, 3, 32, 32]


def test_fp16_export_runs_on_onnxruntime_cpu(tmp_path, timm_fx, timm_vit):
    report = export_onnx(timm_fx, tmp_path / "h.onnx", torch.randn(2, 3, 32, 32), fp16=True, exporter="torchscript")
    assert report.dtype == "float16" and report.metadata["dtype"] == "float16"
    assert (report.atol, report.rtol) == (1e-2, 1e-2)
    assert report.max_abs_diff <= report.tolerance
    elem = onnx.load(report.path).graph.input[0].type.tensor_type.elem_type
    assert elem == onnx.TensorProto.FLOAT16
    assert next(timm_vit.parameters()).dtype == torch.float32  # the caller's model is not converted


def test_fp16_unsupported_by_runtime_says_so(tmp_path, monkeypatch, timm_fx):
    def no_fp16_kernels(path, threads=None, providers=None):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Gemm(13)")

    monkeypatch.setattr(onnx_exporter, "_session", no_fp16_kernels)
    with pytest.raises(ExportError, match="float16"):
        export_onnx(timm_fx, tmp_path / "h.onnx", torch.randn(2, 3, 32, 32), fp16=True, exporter="torchscript")
    assert _listing(tmp_path) == []


def test_requested_opset_is_honoured(tmp_path):
    # the dynamo exporter cannot go below 18 for LayerNorm and keeps 18: that counts as a failure
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    report = export_onnx(module, tmp_path / "o14.onnx", torch.randn(2, 8), opset=14)
    model = onnx.load(report.path)
    assert report.opset == 14 and report.metadata["opset"] == "14"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [14]


# ----------------------------------------------------------------------------- failures are clean


def test_mismatch_fails_and_leaves_existing_file_untouched(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError) as info:
        export_onnx(_Cheat(), target, torch.randn(2, 4))
    message = str(info.value)
    assert "differs from PyTorch by 1" in message and "tolerance" in message
    assert "dynamo" in message and "torchscript" in message  # both exporters were tried
    assert target.read_bytes() == b"previous export"
    assert _listing(tmp_path) == ["m.onnx"]


def test_falls_back_to_torchscript_when_dynamo_fails(tmp_path, monkeypatch):
    real = onnx_exporter._torch_export

    def broken_dynamo(module, x, raw, exporter, *args):
        if exporter == "dynamo":
            raise RuntimeError("simulated dynamo failure")
        return real(module, x, raw, exporter, *args)

    monkeypatch.setattr(onnx_exporter, "_torch_export", broken_dynamo)
    report = export_onnx(torch.nn.Linear(4, 3), tmp_path / "f.onnx", torch.randn(2, 4))
    assert report.exporter == "torchscript" and report.metadata["exporter"] == "torchscript"
    assert len(report.attempts) == 1 and "simulated dynamo failure" in report.attempts[0]
    assert _listing(tmp_path) == ["f.onnx"]


def test_bad_output_location_fails_before_any_work(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("export attempted")

    monkeypatch.setattr(onnx_exporter, "_torch_export", must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="Cannot create the output directory"):
        export_onnx(torch.nn.Linear(4, 3), blocker / "m.onnx", torch.randn(2, 4))
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(torch.nn.Linear(4, 3), tmp_path, torch.randn(2, 4))
    assert _listing(tmp_path) == ["a_file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_onnx(torch.nn.Linear(4, 3), locked / "m.onnx", torch.randn(2, 4))
    finally:
        locked.chmod(0o700)


def test_external_data_side_file_moves_with_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_THRESHOLD", 0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    report = export_onnx(module, tmp_path / "big.onnx", torch.randn(2, 64), exporter="torchscript")
    assert _listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert report.file_bytes == sum((tmp_path / n).stat().st_size for n in _listing(tmp_path))
    x = torch.randn(3, 64)
    with torch.no_grad():
        np.testing.assert_allclose(_ort_run(report.path, x.numpy())[0], module(x).numpy(), atol=1e-5)


def test_argument_errors(tmp_path):
    lin = torch.nn.Linear(4, 3)
    with pytest.raises(ExportError, match="torch.nn.Module"):
        export_onnx(lambda x: x, tmp_path / "a.onnx", torch.randn(2, 4))
    with pytest.raises(ExportError, match="opset"):
        export_onnx(lin, tmp_path / "a.onnx", torch.randn(2, 4), opset=7)
    with pytest.raises(ExportError, match="check_batch_sizes"):
        export_onnx(lin, tmp_path / "a.onnx", torch.randn(2, 4), check_batch_sizes=(0,))
    with pytest.raises(ExportError, match="example_input"):
        export_onnx(lin, tmp_path / "a.onnx", [1.0, 2.0])
    assert _listing(tmp_path) == []


# ----------------------------------------------------------------------------- helpers


def test_latency_and_metadata_helpers(tmp_path):
    report = export_onnx(torch.nn.Linear(16, 4), tmp_path / "l.onnx", torch.randn(2, 16), exporter="torchscript",
                         metadata={"note": "hello"})
    seconds = onnx_latency(report.path, 8, warmup=1, iters=3, threads=1)
    assert 0 < seconds < 5
    assert read_metadata(report.path)["note"] == "hello"
    with pytest.raises(ExportError, match="No ONNX file"):
        onnx_latency(tmp_path / "missing.onnx", 1)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ExportError, match="Cannot read"):
        read_metadata(tmp_path / "junk.onnx")
