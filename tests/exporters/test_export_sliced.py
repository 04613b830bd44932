"""Sliced models of three families export to ONNX that runs in onnxruntime and matches PyTorch."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import elastic_fx as efx
from elastic_fx.exporters.onnx import read_metadata


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "torchvision_vit"])
@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_sliced_model_exports_and_matches(name, sparsity, traced, tmp_path):
    _, inputs, gm, smap = traced(name)
    g = torch.Generator().manual_seed(0)
    heads = {b.index: torch.rand(b.attention.num_heads, generator=g) for b in smap.blocks if b.attention}
    neurons = {b.index: torch.rand(b.mlp.hidden_features, generator=g) for b in smap.blocks if b.mlp}
    keep = efx.budget_masks(smap, heads, neurons, sparsity=sparsity)
    small = efx.slice(gm, smap, keep)
    stats = efx.achieved(smap, keep)
    path = tmp_path / f"{name}.onnx"
    report = efx.export_onnx(small, path, inputs[0], metadata={"sparsity": stats["sparsity"], "gflops": stats["gflops"]})
    assert report.max_abs_diff < 1e-4 and set(report.batch_sizes_checked) == {1, 5}
    meta = read_metadata(path)
    assert float(meta["sparsity"]) == pytest.approx(stats["sparsity"]) and "elastic_fx_version" in meta

    # an independent check: a fresh session on a new batch size
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *inputs[0].shape[1:], generator=torch.Generator().manual_seed(3))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out = small(x)
    want = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) else next(iter(out.values())))
    np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-4, atol=1e-4)
    # the ONNX file really holds fewer weights than the dense model
    import onnx

    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    assert stored < smap.total_params
