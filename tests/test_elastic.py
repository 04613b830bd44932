"""ElasticScores files and ElasticModel: any budget, nested, cached, exported."""

import json

import numpy as np
import pytest
import torch

import elastic_fx as efx
from elastic_fx.scoring.local import local_scores


@pytest.fixture(scope="module")
def model_scores(request):
    from zoo import build

    model, inputs = build("timm_deit3")
    gm = efx.trace(model, inputs)
    smap = efx.discover(gm)
    local = local_scores(gm, None, method="magnitude", structures=smap, progress=False)
    scores = efx.ElasticScores.from_local(local, smap)
    scores.c = np.random.default_rng(0).uniform(0.5, 1.5, scores.layout.dim)  # a non-trivial reweighting
    return gm, smap, scores


def test_score_file_round_trip(model_scores, tmp_path):
    gm, smap, scores = model_scores
    path = scores.save(tmp_path / "m.efx")
    back = efx.ElasticScores.load(path, smap)
    assert np.array_equal(back.c, scores.c)
    for b in scores.head_means:
        assert torch.equal(back.head_means[b], scores.head_means[b].double())
    assert back.keep(smap, 0.4) == scores.keep(smap, 0.4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.efx"]  # no temp files left


def test_score_file_for_another_model_is_refused(model_scores, tmp_path):
    from zoo import build

    _, _, scores = model_scores
    path = scores.save(tmp_path / "m.efx")
    other, inputs = build("timm_vit")
    smap2 = efx.discover(efx.trace(other, inputs))
    with pytest.raises(efx.ScoresError, match="block 0 has num_heads=4 in the scores but num_heads=3"):
        efx.ElasticScores.load(path, smap2)


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.efx"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(efx.ScoresError, match="not an elastic_fx score file"):
        efx.ElasticScores.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(efx.ScoresError, match="without elastic_fx metadata"):
        efx.ElasticScores.load(tmp_path / "plain.safetensors")
    with pytest.raises(efx.ScoresError, match="does not exist"):
        efx.ElasticScores.load(tmp_path / "missing.efx")


def test_unwritable_output_leaves_nothing(model_scores, tmp_path):
    _, _, scores = model_scores
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Exception):
        scores.save(blocker / "m.efx")  # parent is a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_elastic_model_is_nested_cached_and_physical(model_scores):
    gm, smap, scores = model_scores
    em = efx.ElasticModel(gm, scores)
    a, b = em.at(sparsity=0.3), em.at(sparsity=0.5)
    assert em.at(sparsity=0.3) is a  # cached
    ka, kb = em.keep(0.3), em.keep(0.5)
    for blk in ka:
        for kind in ka[blk]:
            assert set(kb[blk][kind]) <= set(ka[blk][kind])  # nested
    pa, pb = (sum(p.numel() for p in m.parameters()) for m in (a, b))
    assert pa == smap.params(ka) and pb == smap.params(kb) and pb < pa < smap.total_params
    f = em.at(flops=0.7)
    kf = em.keep(flops=0.7)
    assert efx.achieved(smap, kf)["flops"] <= 0.7 * smap.flops() + 1
    assert sum(p.numel() for p in f.parameters()) == smap.params(kf)


def test_elastic_model_budget_errors(model_scores):
    gm, _, scores = model_scores
    em = efx.ElasticModel(gm, scores)
    for bad in (1.0, -0.2, 1.5):
        with pytest.raises(efx.BudgetError):
            em.at(sparsity=bad)


def test_export_onnx_per_budget_with_manifest(model_scores, tmp_path):
    gm, smap, scores = model_scores
    manifest = efx.ElasticModel(gm, scores).export_onnx(tmp_path / "out", sparsities=[0.2, 0.5], source="zoo:deit3")
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert [e["target_sparsity"] for e in manifest["budgets"]] == [0.2, 0.5]
    for e in manifest["budgets"]:
        assert (tmp_path / "out" / e["file"]).is_file()
        assert e["ort_max_abs_diff"] < 1e-4
    assert manifest["budgets"][1]["params"] < manifest["budgets"][0]["params"]


def test_scores_from_another_input_size_warn(model_scores, caplog):
    gm, smap, scores = model_scores
    size = tuple(gm.meta["elastic_fx.example_inputs"][0].shape[-2:])
    other = dict(scores.__dict__)
    other["preprocess"] = {"input_size": [size[0] * 2, size[1] * 2], "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bicubic", "crop_pct": 0.875}
    with caplog.at_level("WARNING", logger="elastic_fx.elastic"):
        efx.ElasticModel(gm, efx.ElasticScores(**other))
    assert "the scores were computed at" in caplog.text


def test_save_onto_a_directory_or_a_link_is_refused(model_scores, tmp_path):
    _, _, scores = model_scores
    with pytest.raises(efx.ScoresError, match="is a directory, not a file"):
        scores.save(tmp_path)
    (tmp_path / "real.efx").write_text("keep me")
    (tmp_path / "link.efx").symlink_to(tmp_path / "real.efx")
    with pytest.raises(efx.ScoresError, match="symbolic link"):
        scores.save(tmp_path / "link.efx")
    assert (tmp_path / "real.efx").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.efx", "real.efx"]
