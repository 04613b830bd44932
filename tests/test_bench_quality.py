"""The quality benchmark runs end to end (``--smoke``: tiny random ViT, random images) so it cannot rot.

Also checks the Torch-Pruning baseline the benchmark builds: its head / neuron budget and
that the pruned timm model computes exactly what ``efx.slice`` gives for the same kept
structures (the comparison is only fair if the baseline is applied correctly).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import elastic_fx as efx

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(bq, tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    headline = bq.main(["--smoke", "--quiet", "--out-dir", str(out), "--work-dir", str(work)])
    return headline, out, work


def test_smoke_run_writes_report_json_and_plots(smoke_run, bq, capsys):
    headline, out, _ = smoke_run
    assert headline["bench"] == "quality" and headline["mode"] == "smoke"
    cfg = bq.smoke_config()
    assert set(headline["knn"]) == set(cfg.methods)
    for method, by_sparsity in headline["knn"].items():
        for value in by_sparsity.values():
            assert (value is None and method == "tp_taylor_ffn") or 0.0 <= value <= 1.0, (method, by_sparsity)
    assert 0.0 <= headline["dense_knn"] <= 1.0
    md = (out / "quality.md").read_text()
    assert "## k-NN top-1 (%) vs sparsity" in md and "## Ablations" in md and "ONNX Runtime latency" in md
    assert "paired-bootstrap 95 % intervals" in md and "## Does the proxy predict accuracy?" in md
    for label in (bq.LABELS[m] for m in cfg.methods):
        assert label in md
    for name in cfg.ablations:
        assert f"| {name} | {bq.ABLATIONS[name][0]} |" in md
    full = json.loads((out / "quality.json").read_text())
    assert full["headline"]["knn"] == json.loads(json.dumps(headline["knn"]))
    results = full["results"]
    for method in cfg.methods:
        for s in cfg.sparsities:
            row = results[f"eval/{method}/{s:.2f}"]
            if method == "tp_taylor_ffn" and "cannot reach" in row.get("error", ""):
                continue  # FFN neurons alone hold too few parameters for this budget: reported as n/a
            assert "error" not in row, row
            # every method removes at least the asked fraction of block parameters, and not much more
            assert s - 1e-9 <= row["sparsity"] <= s + 0.15, (method, s, row["sparsity"])
    # the main search's choice, the ablations (searched and derived) and the proxy study
    assert results["selection/main"]["chosen"] in ("c=1", "search")
    for name in list(cfg.ablations) + ["by_search", "no_c1"]:
        for s in cfg.ablation_sparsities:
            assert 0.0 <= results[f"eval/abl_{name}/{s:.2f}"]["knn"] <= 1.0
    proxy = results["proxy"]
    assert len(proxy["candidates"]) == cfg.proxy_candidates and proxy["candidates"][:2] == ["c=1", "winner"]
    lo, hi = headline["elastic_minus_fisher_knn_ci"][f"{cfg.sparsities[-1]:.2f}"][1:]
    assert -100 <= lo <= hi <= 100
    for name in headline["plots"]:
        assert (out / name).stat().st_size > 1000


def test_smoke_rerun_reuses_the_cache(smoke_run, bq):
    headline, out, work = smoke_run
    (folder,) = [p for p in work.iterdir() if p.is_dir()]  # one sub-folder per configuration
    cached = json.loads((folder / "results.json").read_text())
    assert {"search_main.efx", "search_abl_all_on.efx", "local_dino.safetensors"} <= {p.name for p in folder.iterdir()}
    again = bq.main(["--smoke", "--quiet", "--out-dir", str(out), "--work-dir", str(work)])
    assert again["knn"] == headline["knn"]  # same numbers, read back rather than recomputed
    after = json.loads((folder / "results.json").read_text())
    assert after["eval/elastic/0.30"] == cached["eval/elastic/0.30"]
    assert after["stages"] == cached["stages"]  # nothing was recomputed, so no stage took time


def test_missing_assets_are_reported_not_crashed(bq, tmp_path, capsys):
    headline = bq.main(["--quiet", "--assets", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)])
    assert "skipped" in headline and "assets not found" in headline["skipped"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == headline
    assert not (tmp_path / "quality.md").exists()


def test_tp_counts_meet_the_parameter_budget(bq):
    setup = bq.smoke_setup(bq.smoke_config())
    smap = setup.smap
    a, m = smap.blocks[0].attention, smap.blocks[0].mlp
    for s, heads in ((0.1, True), (0.3, True), (0.5, True), (0.7, True), (0.2, False), (0.4, False)):
        n_h, n_n = bq.tp_counts(smap, s, heads)
        assert heads or n_h == 0
        removed = n_h * a.params_per_head + n_n * m.params_per_neuron
        assert removed >= s * smap.prunable_params - 1e-6
        assert n_n == 0 or removed - m.params_per_neuron < s * smap.prunable_params  # one neuron fewer misses it
    with pytest.raises(ValueError, match="FFN neurons alone"):
        bq.tp_counts(smap, 0.6, heads=False)  # the tiny model's FFNs hold about half of the block parameters


@pytest.mark.parametrize("kind", ["taylor", "hessian"])
def test_torch_pruning_model_equals_efx_slice_of_the_same_structures(bq, kind):
    pytest.importorskip("torch_pruning")
    setup = bq.smoke_setup(bq.smoke_config())
    grads = bq.tp_gradients(setup.model, setup.grad_x, setup.grad_y, kind)
    pruned, info = bq.tp_prune(setup.model, grads, kind, 0.5, setup.smap, setup.grad_x[:2])
    assert info["sparsity"] == pytest.approx(0.5, abs=0.05)
    keep = {}
    for i, (dense, small) in enumerate(zip(setup.model.blocks, pruned.blocks)):
        fc1, fc1_small = dense.mlp.fc1.weight, small.mlp.fc1.weight
        neurons = sorted(int((fc1 - row).abs().sum(1).argmin()) for row in fc1_small)
        hd = dense.attn.head_dim
        proj, proj_small = dense.attn.proj.weight, small.attn.proj.weight
        heads = sorted({int((proj - proj_small[:, j:j + 1]).abs().sum(0).argmin()) // hd
                        for j in range(0, proj_small.shape[1], hd)})
        assert len(heads) == small.attn.num_heads and len(neurons) == fc1_small.shape[0]
        keep[i] = {"heads": heads, "neurons": neurons}
    sliced = efx.slice(setup.gm, setup.smap, keep)
    x = setup.grad_x[:3]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), sliced(x), atol=1e-5, rtol=1e-5)
    assert [len(k["heads"]) for k in keep.values()] == info["kept_heads"]
    assert np.sum(info["kept_neurons"]) < sum(b.mlp.hidden_features for b in setup.smap.blocks)


def test_paired_interval_resamples_both_models_together(bq):
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0] * 25, dtype=bool)
    assert bq.paired_interval(a, a, 500) == (0.0, 0.0, 0.0)  # identical models: no spread at all
    b = a.copy()
    b[:20] = ~b[:20]  # disagree on 20 of 200 images
    d, lo, hi = bq.paired_interval(a, b, 2000, seed=1)
    assert d == pytest.approx((a.astype(float) - b).mean()) and lo <= d <= hi
    assert hi - lo < 0.1  # paired: only the 20 disagreements vary
    assert np.array_equal(bq._unbits(bq._bits(a)), a)


def test_fitness_folder_replaces_only_the_fitness_images(bq, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(tmp_path / f"photo{i}.png")
    cfg = bq.smoke_config()
    setup = bq.smoke_setup(cfg)
    grad, name = setup.grad_x.clone(), setup.name
    bq.use_fitness_folder(setup, cfg, str(tmp_path))
    assert setup.fit_x.shape == (cfg.fitness_images,) + tuple(grad.shape[1:])
    assert torch.equal(setup.grad_x, grad)  # gradient images (every non-search method) unchanged
    assert setup.name != name and setup.fitness_source == str(tmp_path)  # another cache key
    assert "photos from" in bq._fitness_where(setup)
    with pytest.raises(efx.DataError, match="readable images"):
        bq.use_fitness_folder(bq.smoke_setup(cfg), bq.replace(cfg, fitness_images=11), str(tmp_path))


def test_other_runs_are_listed_with_their_intervals(bq, tmp_path):
    run = {"headline": {"model": "m", "main_choice": "search",
                        "elastic_minus_fisher_knn_ci": {"0.30": [0.5, 0.0, 1.0], "0.70": [1.29, -1.18, 3.58]}},
           "config": {"fitness_images": 1000, "generations": 20}}
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "quality.json").write_text(json.dumps(run))
    lines = bq._other_runs(tmp_path)
    assert lines[0] == "## Other runs of this benchmark"
    assert "[big/quality.md](big/quality.md)" in lines[2] and "1000 fitness images" in lines[2]
    assert "70% +1.3 [-1.2, +3.6]" in lines[2] and "30%" not in lines[2] and "its winner" in lines[2]
    assert bq._other_runs(tmp_path / "big") == []
