"""The elastic-fx command: each subcommand on a tiny model from a factory file."""

import json
import subprocess
import sys
import textwrap

import pytest

import elastic_fx as efx

from elastic_fx.cli import main

FACTORY = textwrap.dedent(
    """
    import timm

    def tiny():
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                 embed_dim=48, num_heads=3, num_classes=5)
    """
)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("factory")
    (d / "models.py").write_text(FACTORY)
    return f"{d / 'models.py'}:tiny"


def test_inspect_prints_the_structure_table(spec, capsys):
    assert main(["inspect", spec]) == 0
    out = capsys.readouterr().out
    assert "2 blocks, 6 heads" in out and "GFLOPs" in out and "blocks.0.attn.proj" in out


def test_export_magnitude_budgets(spec, tmp_path, capsys):
    assert main(["export", spec, "--scores", "magnitude", "--sparsity", "0.2", "0.5", "--out-dir", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["file"] for e in manifest["budgets"]] == ["sparsity_20.onnx", "sparsity_50.onnx"]
    assert all((tmp_path / e["file"]).is_file() for e in manifest["budgets"])
    assert "sparsity_50.onnx" in capsys.readouterr().out


def test_prune_then_export_then_report(spec, tmp_path, capsys):
    scores = tmp_path / "s.efx"
    args = ["prune", spec, "--out", str(scores), "--iterations", "1", "--sparsities", "0.3",
            "--num-images", "4", "--fitness-images", "8", "--batch-size", "2", "--pca-dim", "4"]
    assert main(args) == 0
    assert scores.is_file()
    assert main(["export", spec, "--scores", str(scores), "--sparsity", "0.3", "--out-dir", str(tmp_path / "onnx")]) == 0
    assert main(["report", str(scores), spec, "--out-dir", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "allocation.png").is_file()
    md = (tmp_path / "rep" / "report.md").read_text()
    sel = efx.ElasticScores.load(scores).selection
    assert "| c = 1 (no search) |" in md and f"| winner: {sel['winner']['name']} |" in md
    assert f"{sel['c1']['selection']:.4g}" in md


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["inspect", "timm:not_a_model_xyz"], "timm has no model"),
        (["inspect", "nonsense"], "is not one of"),
        (["inspect", "missing.py:f"], "no such file"),
        (["export", "SPEC", "--sparsity", "1.2", "--out-dir", "OUT"], "outside [0, 1)"),
        (["export", "SPEC", "--scores", "nope.efx", "--sparsity", "0.2", "--out-dir", "OUT"], "neither a score file"),
    ],
)
def test_errors_are_one_clear_line(argv, needle, spec, tmp_path, capsys):
    argv = [spec if a == "SPEC" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "elastic_fx.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "elastic_fx" in out.stdout


def test_export_with_weight_correction(spec, tmp_path):
    """--correct collects out-projection inputs on calibration images and exports a corrected model."""
    from PIL import Image
    import numpy as np

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    out = tmp_path / "onnx"
    argv = ["export", spec, "--scores", "magnitude", "--sparsity", "0.5", "--out-dir", str(out),
            "--correct", "--calibration", str(calib), "--calibration-images", "6"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["budgets"][0]["ort_max_abs_diff"] < 1e-4
    from elastic_fx.exporters.onnx import read_metadata

    assert read_metadata(out / manifest["budgets"][0]["file"])["weight_correction"] == "true"


def test_eval_prints_accuracy_by_budget(spec, tmp_path, capsys):
    """elastic-fx eval on an .npz of two separable classes of images."""
    import numpy as np

    rng = np.random.default_rng(0)
    def split(n):
        y = rng.integers(0, 2, n)
        x = np.where(y[:, None, None, None] == 1, 200, 30) + rng.integers(0, 40, (n, 32, 32, 3))
        return x.astype(np.uint8), y
    xtr, ytr = split(40)
    xte, yte = split(20)
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    assert main(["eval", spec, "--scores", "magnitude", "--sparsity", "0.3", "--data", str(tmp_path / "d.npz"),
                 "--k", "5", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "k-NN" in out and "0.3" in out


def _photos(folder, n, seed):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_prune_takes_its_fitness_images_from_another_folder(spec, tmp_path):
    grads, photos = _photos(tmp_path / "grads", 4, 0), _photos(tmp_path / "photos", 8, 1)
    out = tmp_path / "s.efx"
    base = ["prune", spec, "--out", str(out), "--iterations", "1", "--sparsities", "0.3", "--images", str(grads),
            "--num-images", "4", "--fitness-images", "8", "--batch-size", "2"]
    assert main(base + ["--fitness-folder", str(photos)]) == 0
    cfg = efx.ElasticScores.load(out).config
    assert cfg["fitness_folder"] == str(photos.resolve()) and cfg["images"] == str(grads.resolve())
    assert cfg["fitness_images"] == 8  # 4 gradient images could not have given 8


def test_empty_fitness_folder_is_one_clear_line_before_the_gradient_pass(spec, tmp_path, capsys, monkeypatch):
    import elastic_fx.pipeline

    def gradient_pass(*args, **kwargs):
        raise AssertionError("the gradient pass ran before the fitness folder was checked")

    monkeypatch.setattr(elastic_fx.pipeline, "local_scores", gradient_pass)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "s.efx"
    argv = ["prune", spec, "--out", str(out), "--iterations", "1", "--num-images", "4", "--fitness-images", "8",
            "--batch-size", "2", "--fitness-folder", str(tmp_path / "empty")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "empty" in err and "Traceback" not in err and not out.exists()
