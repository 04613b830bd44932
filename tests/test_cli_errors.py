"""The elastic-fx command's error paths, one table: every bad input ends in ONE ``error:`` line,
a non-zero exit, no traceback, no hang, and the files on disk exactly as they were.

Each case is (name, command, expected exit code, pattern of the ``error:`` line). Words in
the command are placeholders the fixtures fill in (SPEC: a tiny timm factory model, T: the
case's own folder, ...). Positive checks of the same machinery follow the table.
"""

import json
import os
import signal
import stat
import textwrap

import pytest
import torch

import elastic_fx as efx
from elastic_fx.cli import main

FACTORY = textwrap.dedent(
    """
    import sys
    import timm
    from timm.models.vision_transformer import VisionTransformer

    def tiny():
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                 embed_dim=48, num_heads=3, num_classes=5)

    def bare():  # a plain timm class built in a user's file: no pretrained_cfg statistics
        return VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=0)

    def other():  # another structure: 4 heads of 16
        return VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=0)

    def raises():
        raise RuntimeError("no weights here")

    def exits():
        sys.exit(3)

    def not_a_module():
        return 42
    """
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    (d / "models.py").write_text(FACTORY)
    (d / "syntax.py").write_text("def f(:\n    pass\n")
    (d / "imports.py").write_text("import package_that_is_not_there_xyz\n\ndef f():\n    pass\n")
    (d / "exits.py").write_text("import sys\nsys.exit(3)\n")
    # a good export to damage (or not)
    good = d / "good_export"
    assert main(["export", f"{d / 'models.py'}:tiny", "--scores", "magnitude", "--sparsity", "0.2",
                 "--out-dir", str(good)]) == 0
    # a score file, then copies of it with the metadata tampered
    scores = d / "s.efx"
    assert main(["score", f"{d / 'models.py'}:tiny", "--method", "magnitude", "--out", str(scores)]) == 0
    assert main(["score", f"{d / 'models.py'}:other", "--method", "magnitude", "--out", str(d / "other.efx")]) == 0
    return d


def _snapshot(root):
    """Every entry under ``root``: type, size, mtime, link target and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry = [stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns]
            if stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    entry.append(hash(f.read()))
            out[os.path.relpath(p, root)] = entry
    return out


def _setup(case_dir, env):
    """Files some cases need, made inside the case's own folder."""
    (case_dir / "a_dir").mkdir()
    (case_dir / "dir.py").mkdir()
    (case_dir / "mdir" / "manifest.json").mkdir(parents=True)
    (case_dir / "ckpt").mkdir()
    (case_dir / "listckpt").mkdir()
    (case_dir / "evilckpt").mkdir()
    torch.save({"x": _Payload()}, case_dir / "evilckpt" / "search_checkpoint.pt")
    torch.save([1, 2, 3], case_dir / "listckpt" / "search_checkpoint.pt")
    (case_dir / "ckpt" / "search_checkpoint.pt").write_bytes(b"a finished run")
    (case_dir / "a_file").write_text("x")
    (case_dir / "target.txt").write_text("precious")
    os.symlink(case_dir / "target.txt", case_dir / "link.efx")
    os.mkfifo(case_dir / "fifo.efx")
    if os.geteuid() == 0:  # a /dev/null twin: root could otherwise replace the real one
        os.mknod(case_dir / "null.efx", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    fifo_images = case_dir / "fifo_images"
    fifo_images.mkdir()
    os.mkfifo(fifo_images / "x.png")
    # an out-dir holding an earlier export plus a link planted where a budget would be written
    linked = case_dir / "linked_out"
    linked.mkdir()
    os.symlink(case_dir / "target.txt", linked / "sparsity_30.onnx")
    # tampered score files
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(env / "s.efx"), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(case_dir / "badjson.efx"), metadata={**meta, "elastic_fx": "{oops"})
    save_file(tensors, str(case_dir / "array.efx"), metadata={**meta, "elastic_fx": "[1, 2]"})
    # reference score files: one declaring a stride-0 [2, 150M] tensor, one carrying a pickled call
    torch.save({"mlp_scores": torch.zeros(1).expand(2, 150_000_000), "head_scores": torch.zeros(2, 3)},
               case_dir / "stride0.pt")
    torch.save({"weight": _Payload()}, case_dir / "payload.pt")
    return case_dir


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


NO_GPU = not torch.cuda.is_available()

#: (name, argv, exit code, pattern of the error line). argparse refusals exit 2, elastic_fx's own 1.
CASES = [
    # --- output paths, checked before any work
    ("out is a directory (prune)", "prune SPEC --out T/a_dir", 1, r"--out .*a_dir is a directory, not a file"),
    ("out is a directory (score)", "score SPEC --out T/a_dir", 1, r"--out .*is a directory, not a file"),
    ("out is a directory (import-scores)", "import-scores T/stride0.pt --model SPEC --out T/a_dir", 1,
     r"--out .*is a directory, not a file"),
    ("out is empty", "prune SPEC --out ''", 1, r"--out is empty"),
    ("out is a symlink", "prune SPEC --out T/link.efx", 1, r"symbolic link"),
    ("out is a FIFO", "score SPEC --out T/fifo.efx", 1, r"special file"),
    ("out is a device node", "prune SPEC --out T/null.efx", 1, r"special file"),
    ("out under /proc", "prune SPEC --out /proc/efx_test.efx", 1, r"inside /proc, a virtual file system"),
    ("out under /sys", "score SPEC --out /sys/efx_test.efx", 1, r"inside /sys, a virtual file system"),
    ("out under a file", "prune SPEC --out T/a_file/x.efx", 1, r"Cannot create the output directory .*a_file for --out .*: it is a file"),
    ("out name too long", "prune SPEC --out T/" + "n" * 300 + ".efx", 1, r"longer than the \d+ this file system"),
    ("checkpoint-dir is a file", "prune SPEC --out T/o.efx --checkpoint-dir T/a_file", 1, r"not a directory"),
    ("report out-dir is a file", "report SCORES SPEC --out-dir T/a_file", 1, r"--out-dir .* not a directory"),
    ("demo out-dir is a file", "demo --offline --out-dir T/a_file", 1, r"--out-dir .* not a directory"),
    ("a new run onto a complete checkpoint", "prune SPEC --out T/o.efx --checkpoint-dir T/ckpt", 1,
     r"already holds a search checkpoint .*pass --resume to continue it"),
    ("a list saved as the search checkpoint", "prune SPEC --out T/o.efx --checkpoint-dir T/listckpt --resume "
     "--iterations 1 --sparsities 0.3 --num-images 4 --fitness-images 8 --batch-size 2 --pca-dim 4", 1,
     r"checkpoint .*search_checkpoint.pt is unreadable .*holds a list, not a checkpoint"),
    ("a pickled call as the search checkpoint", "prune SPEC --out T/o.efx --checkpoint-dir T/evilckpt --resume "
     "--iterations 1 --sparsities 0.3 --num-images 4 --fitness-images 8 --batch-size 2 --pca-dim 4", 1,
     r"search_checkpoint.pt is unreadable .*could run code when loaded; refused"),
    # --- export
    ("manifest.json is a directory", "export SPEC --sparsity 0.3 --out-dir T/mdir", 1,
     r"already holds files that elastic-fx did not write"),
    ("export out-dir is a file", "export SPEC --sparsity 0.3 --out-dir T/a_file", 1, r"not a directory"),
    ("export through a planted link", "export SPEC --sparsity 0.3 --out-dir T/linked_out", 1,
     r"already holds files that elastic-fx did not write"),
    ("two budgets, one file name", "export SPEC --sparsity 0.301 0.304 --out-dir T/new", 1,
     r"0.301 and 0.304 both round to the file name sparsity_30.onnx"),
    ("dense and near-dense share a name", "export SPEC --sparsity 0.0 0.004 --out-dir T/new", 1,
     r"both round to the file name sparsity_00.onnx"),
    ("unreachable second budget leaves a good out-dir alone", "export SPEC --sparsity 0.2 0.99 --out-dir GOOD", 1,
     r"sparsity 0.99 cannot be reached: .*; ask for at most that with --sparsity$"),
    ("scores of another model", "export SPEC --scores OTHER --sparsity 0.2 --out-dir T/new", 1,
     r"different model: .*elastic-fx (score|prune) MODEL --out FILE"),
    ("export while another export holds the lock", "export SPEC --sparsity 0.2 --out-dir LOCKED", 1,
     r"another elastic-fx process is writing"),
    ("export with a corrupt score file", "export SPEC --scores T/badjson.efx --sparsity 0.2 --out-dir T/new", 1,
     r"not valid JSON"),
    ("report on a JSON array", "report T/array.efx SPEC --out-dir T/rep", 1, r"JSON list, not an object"),
    # --- --input-size
    ("input size not a patch multiple", "inspect SPEC --input-size 33 33", 1,
     r"--input-size 33 33 does not fit VisionTransformer: it accepts multiples of its patch size 8x8"),
    ("input size zero", "inspect SPEC --input-size 0 0", 1, r"--input-size 0 0: sides must be positive"),
    ("input size negative", "inspect SPEC --input-size -32 32", 1, r"sides must be positive"),
    ("timm input size not a patch multiple", "inspect timm:vit_tiny_patch16_224 --input-size 33 33", 1,
     r"--input-size 33 33 does not fit"),
    # --- model files
    ("factory raises", "inspect E/models.py:raises", 1, r"raises\(\) raised RuntimeError: no weights here"),
    ("factory calls sys.exit", "inspect E/models.py:exits", 1, r"called sys.exit\(3\)"),
    ("factory returns no module", "inspect E/models.py:not_a_module", 1, r"returned int, not an nn.Module"),
    ("model file has a syntax error", "inspect E/syntax.py:f", 1, r"syntax error at line 1"),
    ("model file imports a missing package", "inspect E/imports.py:f", 1, r"failed to import"),
    ("model file exits on import", "inspect E/exits.py:f", 1, r"called sys.exit\(3\) while loading"),
    ("model file is a directory", "inspect T/dir.py:f", 1, r"does not exist|is a directory"),
    ("checkpoint is a directory", "inspect SPEC --checkpoint T/a_dir", 1, r"--checkpoint .* is a directory"),
    ("checkpoint carries a pickled call", "inspect SPEC --checkpoint T/payload.pt", 1,
     r"could run code when loaded; refused"),
    # --- devices and numbers (argparse: exit 2)
    ("device banana", "score SPEC --out T/o.st --device banana", 2, r"'banana' is not a device"),
    ("device cuda without a GPU", "score SPEC --out T/o.st --device cuda", 2, r"no usable CUDA GPU"),
    ("demo img-size 0", "demo --img-size 0", 2, r"expected a positive whole number"),
    # --- inputs
    ("a FIFO named x.png among the images", "score SPEC --images T/fifo_images --out T/o.st", 1,
     r"no image files"),
    ("reference score file is a directory", "import-scores T/a_dir --model SPEC --out T/o.efx", 1,
     r"a_dir is a directory, not a score file"),
    ("reference score file carries a pickled call", "import-scores T/payload.pt --model SPEC --out T/o.efx", 1,
     r"refusing to load .*could execute code"),
    ("stride-0 reference tensor", "import-scores T/stride0.pt --model SPEC --out T/o.efx", 1,
     r"declares shape \[2, 150000000\] .* but the file stores 1"),
]


class _Hang(Exception):
    pass


def _run(argv, capsys, seconds=120):
    """(exit code, stderr) of ``main(argv)``; an argparse refusal's SystemExit counts as its code."""
    def alarm(signum, frame):
        raise _Hang(f"elastic-fx {' '.join(argv)} ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name, command, code, pattern", CASES, ids=[c[0] for c in CASES])
def test_cli_error_paths(name, command, code, pattern, env, tmp_path, capsys):
    import re
    import shlex

    from elastic_fx import _io

    if name == "device cuda without a GPU" and not NO_GPU:
        pytest.skip("this machine has a GPU")
    if name == "out is a device node" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    case = _setup(tmp_path, env)
    spec = f"{env / 'models.py'}:tiny"
    words = [w.replace("SPEC", spec).replace("T/", f"{case}/").replace("E/", f"{env}/").replace("SCORES", str(env / "s.efx")).replace("OTHER", str(env / "other.efx"))
             .replace("GOOD", str(env / "good_export")).replace("LOCKED", str(case / "locked"))
             for w in shlex.split(command)]
    before = _snapshot(case), _snapshot(env)
    if name.startswith("export while another"):
        with _io._lock(case / "locked", efx.ExportError):
            got, err = _run(words, capsys)
    else:
        got, err = _run(words, capsys)
    after = _snapshot(case), _snapshot(env)

    assert got == code, f"exit {got}, wanted {code}; stderr:\n{err}"
    assert "Traceback" not in err
    assert "weights_only" not in err  # never suggest unsafe loading
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, f"wanted one error line, got:\n{err}"
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    assert not re.search(r"\befx\.|Floors\(|\.save\(\)|\.load\(|from_local|example_inputs", lines[0]), \
        f"a command-line error names a Python call: {lines[0]!r}"
    if not name.startswith("export while another"):
        assert before == after, "the command changed files although it failed"
    else:
        assert before[1] == after[1]
    assert (case / "target.txt").read_text() == "precious"


# ----------------------------------------------------------------------------- the same machinery, working
def test_long_legal_name_and_umask_modes(env, tmp_path, capsys):
    name = "n" * 240 + ".safetensors"  # the temporary name must not push it past NAME_MAX
    old = os.umask(0o027)
    try:
        assert main(["score", f"{env / 'models.py'}:tiny", "--method", "magnitude", "--out", str(tmp_path / name)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    assert efx.LocalScores.load(tmp_path / name).config["preprocess"]["input_size"] == [32, 32]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_export_replaces_an_earlier_export_whole(env, tmp_path):
    spec = f"{env / 'models.py'}:tiny"
    out = tmp_path / "onnx"
    assert main(["export", spec, "--sparsity", "0.2", "0.5", "--out-dir", str(out)]) == 0
    assert main(["export", spec, "--sparsity", "0.3", "--out-dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "sparsity_30.onnx"]
    assert [e["file"] for e in manifest["budgets"]] == ["sparsity_30.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temporary folder, no lock left


def test_prune_a_bare_timm_class_then_python_api(env, tmp_path, capsys):
    """The issue's first flow: a VisionTransformer(img_size=32) from a user's file, pruned from the CLI,
    then ElasticModel(model, scores).at() on the bare model -- the size travels with the scores."""
    spec = f"{env / 'models.py'}:bare"
    out = tmp_path / "one.efx"
    argv = ["prune", spec, "--out", str(out), "--input-size", "32", "32", "--iterations", "1", "--sparsities",
            "0.3", "--num-images", "4", "--fitness-images", "8", "--batch-size", "2", "--pca-dim", "4"]
    assert main(argv) == 0
    assert "ImageNet mean/std" in capsys.readouterr().err  # the one-line notice
    scores = efx.ElasticScores.load(out)
    assert scores.preprocess["input_size"] == [32, 32]
    assert scores.preprocess["mean"] == pytest.approx([0.485, 0.456, 0.406])
    from elastic_fx.models import load_model

    small = efx.ElasticModel(load_model(spec), scores).at(sparsity=0.4)
    assert small(torch.randn(1, 3, 32, 32)).shape[0] == 1


def test_input_size_resizes_the_model(env, capsys):
    spec = f"{env / 'models.py'}:tiny"
    assert main(["inspect", spec, "--input-size", "64", "48"]) == 0
    from elastic_fx.models import load_model

    model = load_model(spec, input_size=(64, 48))
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 5)
    timm_model = load_model("timm:vit_tiny_patch16_224", input_size=(32, 32))
    assert timm_model(torch.randn(1, 3, 32, 32)).shape[0] == 1


def test_python_prune_then_elastic_model_on_the_bare_model():
    """The issue's second flow: efx.prune on a bare model with a tensor, then ElasticModel(model, scores)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=0)
    cfg = efx.SearchConfig(num_images=4, num_fitness_images=8, batch_size=2, pca_dim=4)
    scores = efx.prune(model, torch.rand(8, 3, 32, 32), iterations=1, sparsities=(0.3,), config=cfg)
    assert scores.preprocess["input_size"] == [32, 32]
    small = efx.ElasticModel(model, scores).at(sparsity=0.4)
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 48)


def test_mean_std_flags_reach_the_scores(env, tmp_path):
    spec = f"{env / 'models.py'}:bare"
    out = tmp_path / "s.efx"
    argv = ["prune", spec, "--out", str(out), "--mean", "0.1", "0.2", "0.3", "--std", "0.4", "0.5", "0.6",
            "--iterations", "1", "--sparsities", "0.3", "--num-images", "4", "--fitness-images", "8",
            "--batch-size", "2", "--pca-dim", "4"]
    assert main(argv) == 0
    pre = efx.ElasticScores.load(out).preprocess
    assert pre["mean"] == pytest.approx([0.1, 0.2, 0.3]) and pre["std"] == pytest.approx([0.4, 0.5, 0.6])


# ----------------------------------------------------------------------------- weak spots named in the issue
def test_nan_weights_are_a_numbers_error_not_a_tracing_one():
    from zoo import build

    model, inputs = build("timm_vit")
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(efx.NumericalError, match=r"NaN or inf in its weights \("):
        efx.trace(model, inputs)
    clean, inputs = build("timm_vit")
    with pytest.raises(efx.NumericalError, match="example input 0 holds NaN"):
        efx.trace(clean, (torch.full_like(inputs[0], float("inf")),))


def test_fractional_keep_indices_are_refused():
    from elastic_fx.keep import normalize_keep
    from zoo import build

    model, inputs = build("timm_vit")
    smap = efx.discover(efx.trace(model, inputs))
    heads = smap.blocks[0].attention.num_heads
    assert normalize_keep(smap, {0: {"heads": [0.0, 1.0]}})[0]["heads"] == [0, 1]
    with pytest.raises(efx.SliceError, match="not a whole number"):
        normalize_keep(smap, {0: {"heads": [0, 1.7][:heads]}})


# ----------------------------------------------------------------------------- Hugging Face and torchvision
@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf")
    small = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
                 patch_size=8)
    transformers.Dinov2Model(transformers.Dinov2Config(**small)).save_pretrained(d / "dino")
    transformers.BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                   crop_size={"height": 32, "width": 32},
                                   size={"shortest_edge": 36}).save_pretrained(d / "dino")
    transformers.ViTModel(transformers.ViTConfig(**small)).save_pretrained(d / "vit")
    return d


def test_hf_dir_uses_its_saved_image_processor(hf_dirs, tmp_path):
    out = tmp_path / "dino.efx"
    argv = ["prune", f"hf:{hf_dirs / 'dino'}", "--out", str(out), "--iterations", "1", "--sparsities", "0.3",
            "--num-images", "4", "--fitness-images", "8", "--batch-size", "2", "--pca-dim", "4"]
    assert main(argv) == 0
    pre = efx.ElasticScores.load(out).preprocess
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_hf_input_size_interpolates_the_position_table(hf_dirs, capsys):
    from elastic_fx.models import load_model

    spec = f"hf:{hf_dirs / 'vit'}"
    big, same = load_model(spec, input_size=(64, 64)), load_model(spec)
    assert big.embeddings.position_embeddings.shape[1] == 1 + 8 * 8
    # the class token's entry is kept, the grid is interpolated from the checkpoint's (not re-initialised)
    assert torch.equal(big.embeddings.position_embeddings[:, :1], same.embeddings.position_embeddings[:, :1])
    assert big(torch.randn(1, 3, 64, 64)).last_hidden_state.shape[1] == 65
    assert main(["inspect", spec, "--input-size", "60", "60"]) == 1
    assert "accepts multiples of its patch size 8" in capsys.readouterr().err
    assert main(["inspect", spec]) == 0  # no processor saved: one CLI note, no advice about Python calls
    err = capsys.readouterr().err
    assert "has no saved image processor" in err and "hf_processor=" not in err


def test_torchvision_input_size(capsys):
    pytest.importorskip("torchvision")
    from elastic_fx.models import load_model

    model = load_model("torchvision:vit_b_16", input_size=(32, 32))
    assert model.image_size == 32
    assert main(["inspect", "torchvision:vit_b_16", "--input-size", "60", "60"]) == 1
    err = capsys.readouterr().err
    assert "--input-size 60 60 does not fit torchvision:vit_b_16" in err and "Traceback" not in err
