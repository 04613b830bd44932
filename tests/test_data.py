"""The image pipeline: sources, preprocessing from the model's own config, labelled splits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elastic_fx.data import (
    PREPROCESS_META,
    ImageFolderSource,
    LabelledData,
    PreprocessConfig,
    SyntheticSource,
    TensorSource,
    as_source,
    load_labelled,
    load_tensor,
    preprocess_config,
    raw_images,
    resolve_preprocess,
    to_model_input,
)
from elastic_fx.errors import DataError

timm = pytest.importorskip("timm")


def _save(path, colour=(10, 200, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --------------------------------------------------------------------------- folder source


def test_folder_recursive_sorted_ignores_non_images(tmp_path):
    _save(tmp_path / "b.png")
    _save(tmp_path / "a.JPG")
    _save(tmp_path / "sub" / "deeper" / "c.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("a,1\n")
    _save(tmp_path / ".hidden" / "d.png")

    src = ImageFolderSource(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in src.files] == ["a.JPG", "b.png", "sub/deeper/c.webp"]
    flat = ImageFolderSource(tmp_path, recursive=False)
    assert len(flat) == 2
    images = list(src)
    assert len(images) == 3 and all(im.mode == "RGB" for im in images)


def test_corrupt_files_skipped_with_one_counting_warning(tmp_path, caplog):
    for k in range(3):
        _save(tmp_path / f"good{k}.png", colour=(50 * k, 0, 0))
    rng = np.random.default_rng(0)
    (tmp_path / "x.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (tmp_path / "y.png").write_bytes(b"")
    src = ImageFolderSource(tmp_path)
    assert len(src) == 5
    assert src.load(src.files.index(tmp_path / "x.jpg")) is None

    cfg = PreprocessConfig((16, 16), (0.5,) * 3, (0.5,) * 3)
    with caplog.at_level(logging.WARNING, logger="elastic_fx.data"):
        x = load_tensor(tmp_path, cfg)
    assert x.shape == (3, 3, 16, 16)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "skipped 2" in msg and "x.jpg" in msg and "y.png" in msg


def test_all_corrupt_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken|could be decoded") as e:
        load_tensor(tmp_path, PreprocessConfig((8, 8), (0.5,) * 3, (0.5,) * 3))
    assert str(tmp_path) in str(e.value)


def test_empty_or_missing_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        ImageFolderSource(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        as_source(tmp_path / "nope")


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_from_timm_pretrained_cfg():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    cfg = preprocess_config(m)
    assert cfg.input_size == (224, 224)
    assert cfg.mean == tuple(m.pretrained_cfg["mean"]) and cfg.std == tuple(m.pretrained_cfg["std"])
    assert cfg.crop_pct == m.pretrained_cfg["crop_pct"] and cfg.interpolation == "bicubic"

    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    m2 = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1,
                           pretrained_cfg_overlay=imagenet)
    cfg2 = preprocess_config(m2)
    assert cfg2.mean == imagenet["mean"] and cfg2.std == imagenet["std"]


def test_preprocess_siglip_like_and_model_size_beats_stale_cfg(caplog):
    half = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1,
                          img_size=32, pretrained_cfg_overlay=half)
    with caplog.at_level(logging.INFO, logger="elastic_fx.data"):
        cfg = preprocess_config(m)
    assert cfg.input_size == (32, 32) and cfg.mean == (0.5,) * 3 and cfg.std == (0.5,) * 3
    assert any("(32, 32)" in r.getMessage() for r in caplog.records)


def test_preprocess_explicit_wins_and_unknown_model_raises():
    from timm.models.vision_transformer import VisionTransformer

    bare = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(DataError, match="mean, std"):
        preprocess_config(bare)  # size is known from patch_embed, statistics are not
    cfg = preprocess_config(bare, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
    assert cfg.input_size == (32, 32) and cfg.mean == (0.4914, 0.4822, 0.4465)
    with pytest.raises(DataError, match="input_size"):
        preprocess_config(torch.nn.Linear(3, 3))


def test_preprocess_from_graph_module_meta():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity()))
    stored = PreprocessConfig((48, 64), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear", 0.9)
    gm.meta[PREPROCESS_META] = stored.to_dict()
    assert preprocess_config(gm) == stored
    assert preprocess_config(gm, input_size=96).input_size == (96, 96)


def test_preprocess_hugging_face_config_and_processor(caplog):
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(image_size=32))
    with caplog.at_level(logging.WARNING, logger="elastic_fx.data"):
        cfg = preprocess_config(model)
    assert cfg.input_size == (32, 32) and cfg.mean == (0.5,) * 3
    assert any("hf_processor" in r.getMessage() for r in caplog.records)

    processor = {  # as in a CLIP preprocessor_config.json
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 40},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    }
    cfg = preprocess_config(model, hf_processor=processor)
    assert cfg.mean == (0.48145466, 0.4578275, 0.40821073) and cfg.crop_pct == pytest.approx(0.8)
    assert cfg.interpolation == "bicubic" and cfg.input_size == (32, 32)


def test_preprocess_torchvision_uses_its_weights_statistics():
    tv = pytest.importorskip("torchvision")
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    cfg = preprocess_config(m)
    assert cfg.input_size == (32, 32) and cfg.mean == (0.485, 0.456, 0.406)


def test_load_tensor_normalises_with_the_config(tmp_path):
    colour = (255, 128, 0)
    _save(tmp_path / "a.png", colour=colour, size=(50, 37))
    for mean, std in [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]:
        cfg = PreprocessConfig((24, 24), mean, std)
        x = load_tensor(tmp_path, cfg)
        assert x.shape == (1, 3, 24, 24)
        expected = (torch.tensor(colour) / 255.0 - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(x[0].mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(x[0].amax(dim=(1, 2)), x[0].amin(dim=(1, 2)), atol=1e-4, rtol=0)


def test_load_tensor_resize_centre_crop_geometry():
    # A wide uint8 image: left third red, middle green, right third blue. The centre crop
    # of the resized image keeps only the green middle when crop_pct cuts the sides.
    img = torch.zeros(1, 3, 30, 90, dtype=torch.uint8)
    img[0, 0, :, :30] = 255
    img[0, 1, :, 30:60] = 255
    img[0, 2, :, 60:] = 255
    cfg = PreprocessConfig((20, 20), (0.0,) * 3, (1.0,) * 3, "bilinear", crop_pct=1.0)
    x = load_tensor(img, cfg)
    assert x.shape == (1, 3, 20, 20)
    inner = x[0, :, :, 1:-1]  # the outermost columns blend with the neighbours (antialiasing)
    assert inner[1].min() > 0.99 and inner[0].max() < 0.01 and inner[2].max() < 0.01


def test_tensor_source_preprocessed_passthrough_and_checks():
    x = torch.randn(5, 3, 16, 16)
    cfg = PreprocessConfig((16, 16), (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(load_tensor(x, cfg), x)  # never normalised again
    sub = load_tensor(x, cfg, n=2, seed=3)
    assert sub.shape[0] == 2 and all(any(torch.equal(s, r) for r in x) for s in sub)
    with pytest.raises(DataError, match="expects"):
        load_tensor(x, PreprocessConfig((32, 32), (0.5,) * 3, (0.5,) * 3))
    hwc = torch.randint(0, 256, (2, 10, 12, 3), dtype=torch.uint8)
    src = TensorSource(hwc)
    assert not src.preprocessed and src.images.shape == (2, 3, 10, 12)
    with pytest.raises(DataError):
        TensorSource(torch.zeros(2, 4, 8, 8))


def test_subsampling_is_seeded_and_deterministic(tmp_path):
    for k in range(8):
        _save(tmp_path / f"{k}.png", colour=(30 * k, 0, 0), size=(8, 8))
    cfg = PreprocessConfig((8, 8), (0.0,) * 3, (1.0,) * 3, crop_pct=1.0)
    a, b = load_tensor(tmp_path, cfg, n=3, seed=1), load_tensor(tmp_path, cfg, n=3, seed=1)
    assert torch.equal(a, b)
    reds = a[:, 0, 0, 0]
    assert torch.all(reds[1:] > reds[:-1])  # returned in sorted-file order
    others = [load_tensor(tmp_path, cfg, n=3, seed=s)[:, 0, 0, 0] for s in range(2, 8)]
    assert any(not torch.equal(o, reds) for o in others)


# --------------------------------------------------------------------------- synthetic and raw


def test_synthetic_source_deterministic_and_varied():
    a, b = SyntheticSource(6, size=48, seed=7), SyntheticSource(6, size=48, seed=7)
    ta, tb = a.tensor(), b.tensor()
    assert ta.dtype == torch.uint8 and ta.shape == (6, 3, 48, 48)
    assert torch.equal(ta, tb)
    assert not torch.equal(ta, SyntheticSource(6, size=48, seed=8).tensor())
    assert torch.equal(SyntheticSource(3, size=48, seed=7).tensor(), ta[:3])  # prefix property
    flat = ta.flatten(1).float()
    assert torch.cdist(flat, flat).add(torch.eye(6) * 1e9).min() > 100  # all images differ
    assert flat.std(dim=1).min() > 10  # textured, not flat colour
    assert a.load(0).size == (48, 48)


def test_none_gives_synthetic_images(caplog):
    cfg = PreprocessConfig((16, 16), (0.5,) * 3, (0.5,) * 3)
    with caplog.at_level(logging.INFO, logger="elastic_fx.data"):
        x = load_tensor(None, cfg, n=4)
    assert x.shape == (4, 3, 16, 16) and torch.isfinite(x).all()
    assert any("synthetic" in r.getMessage() for r in caplog.records)
    assert torch.equal(x, load_tensor(None, cfg, n=4))


def test_raw_images_shapes_and_downscale(tmp_path):
    _save(tmp_path / "a.png", size=(40, 30))
    _save(tmp_path / "b.png", size=(600, 400))
    raw = raw_images(tmp_path, max_short_side=100)
    assert isinstance(raw, list) and raw[0].shape == (3, 30, 40) and raw[1].shape == (3, 100, 150)
    assert raw[1].dtype == torch.uint8
    same = raw_images(SyntheticSource(3, size=32))
    assert isinstance(same, torch.Tensor) and same.shape == (3, 3, 32, 32)


def test_bad_config_values_are_data_errors():
    with pytest.raises(DataError, match="std"):
        PreprocessConfig((8, 8), (0.5,) * 3, (0.0, 1.0, 1.0))
    with pytest.raises(DataError, match="interpolation"):
        PreprocessConfig((8, 8), (0.5,) * 3, (0.5,) * 3, interpolation="lanczos")
    with pytest.raises(DataError, match="mean"):
        PreprocessConfig((8, 8), (0.5, 0.5), (0.5,) * 3)
    assert PreprocessConfig.from_dict(PreprocessConfig((8, 9), (0.5,) * 3, (0.5,) * 3).to_dict()).input_size == (8, 9)


# --------------------------------------------------------------------------- resolve_preprocess


def _bare_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)


def test_resolve_explicit_wins_over_graph_and_model():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity()))
    stored = PreprocessConfig((48, 64), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear", 0.9)
    gm.meta[PREPROCESS_META] = stored.to_dict()
    explicit = PreprocessConfig((8, 8), (0.5,) * 3, (0.5,) * 3)
    assert resolve_preprocess(gm, torch.randn(2, 3, 8, 8), explicit) is explicit
    assert resolve_preprocess(gm, None, explicit.to_dict()) == explicit
    assert resolve_preprocess(gm) == stored  # the graph's config, as a PreprocessConfig even when stored as a dict
    assert resolve_preprocess(gm, torch.randn(2, 3, 16, 16)) == stored  # a config beats the images' size
    assert resolve_preprocess(gm, mean=(0.0, 0.0, 0.0)).mean == (0.0, 0.0, 0.0)  # single fields replaced


def test_resolve_model_config_then_preprocessed_images_then_error():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    assert resolve_preprocess(m) == preprocess_config(m)
    bare = _bare_vit()  # size from patch_embed, no statistics
    assert resolve_preprocess(bare, mean=(0.4,) * 3, std=(0.2,) * 3) == PreprocessConfig((32, 32), (0.4,) * 3,
                                                                                         (0.2,) * 3)
    x = torch.randn(3, 3, 24, 20)
    ident = resolve_preprocess(bare, x)
    assert ident.input_size == (24, 20) and ident.mean == (0.0,) * 3 and ident.std == (1.0,) * 3
    assert torch.equal(load_tensor(x, ident), x)
    assert resolve_preprocess(bare, TensorSource(x)).input_size == (24, 20)
    assert resolve_preprocess(bare, TensorSource(x), traced_size=(16, 16)).input_size == (16, 16)
    with pytest.raises(DataError, match="mean=..., std=..."):
        resolve_preprocess(bare)
    with pytest.raises(DataError, match="already preprocessed"):
        resolve_preprocess(bare, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))  # raw pixels need statistics
    with pytest.raises(DataError, match="input_size"):
        resolve_preprocess(None)


def test_to_model_input_has_no_default_statistics():
    with pytest.raises(DataError, match="mean and std"):
        to_model_input(np.zeros((1, 4, 4, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- array input (from test_evaluate.py)


def test_to_model_input_normalises_uint8_hwc():
    img = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    img[..., 0] = 255
    x = to_model_input(img, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert x.shape == (2, 3, 4, 4)
    torch.testing.assert_close(x[:, 0], torch.ones(2, 4, 4))
    torch.testing.assert_close(x[:, 1], torch.full((2, 4, 4), -2.0))
    assert to_model_input(img, (0.5,) * 3, (0.5,) * 3, size=8).shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------- data loading


def test_load_labelled_npz(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x[:4], y_train=np.array([0, 1, 2, 1]), x_test=x[4:],
             y_test=np.array([2, 0]), label_names=np.array(["a", "b", "c"]))
    data = load_labelled(tmp_path / "d.npz")
    assert isinstance(data, LabelledData)
    assert data.class_names == ["a", "b", "c"] and data.num_classes == 3
    np.testing.assert_array_equal(data.x_test, x[4:])
    assert data.y_train.dtype == np.int64
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=np.zeros(6, dtype=np.int64))
    with pytest.raises(DataError, match="x_test"):
        load_labelled(tmp_path / "bad.npz")


def _write_images(root: Path, per_class: dict) -> None:
    from PIL import Image

    for cls, colours in per_class.items():
        (root / cls).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (12 + i, 10), colour).save(root / cls / f"{i}.png")


def test_load_labelled_folders(tmp_path):
    _write_images(tmp_path / "train", {"dog": [(0, 0, 255)] * 2, "cat": [(255, 0, 0)] * 3})
    _write_images(tmp_path / "test", {"dog": [(0, 0, 250)]})
    data = load_labelled(tmp_path, image_size=8)  # finds train/ and test/
    assert data.class_names == ["cat", "dog"]  # sorted folder names
    assert data.x_train.shape == (5, 8, 8, 3) and data.x_train.dtype == np.uint8
    assert sorted(data.y_train.tolist()) == [0, 0, 0, 1, 1]
    assert data.y_test.tolist() == [1]
    assert data.x_test[0, 4, 4].tolist() == [0, 0, 250]
    same = load_labelled(tmp_path / "train", tmp_path / "test", image_size=8)
    np.testing.assert_array_equal(same.x_train, data.x_train)


def test_load_labelled_folder_errors(tmp_path):
    _write_images(tmp_path / "tr", {"dog": [(0, 0, 0)]})
    _write_images(tmp_path / "te", {"bird": [(0, 0, 0)]})
    with pytest.raises(DataError, match="bird"):
        load_labelled(tmp_path / "tr", tmp_path / "te")
    with pytest.raises(DataError, match="test_dir"):
        load_labelled(tmp_path / "tr")
    (tmp_path / "tr" / "dog" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        load_labelled(tmp_path / "tr", tmp_path / "tr")


ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"


@pytest.mark.skipif(not (ASSETS / "photos").is_dir(), reason="shared assets (photos/) not available")
def test_real_photos_decode_and_normalise():
    cfg = PreprocessConfig((32, 32), (0.5,) * 3, (0.5,) * 3)
    x = load_tensor(ASSETS / "photos", cfg, n=3, seed=0)
    assert x.shape == (3, 3, 32, 32) and torch.isfinite(x).all()
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6 and x.std() > 0.1


# ----------------------------------------------------------------------------- issue 17: deep pixels, FIFOs
def test_16_bit_png_and_float_tiff_decode_to_their_real_brightness(tmp_path):
    import numpy as np
    from PIL import Image

    from elastic_fx.data import decode_image

    ramp16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    rampf = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(rampf, mode="F").save(tmp_path / "float.tif")
    for name in ("deep.png", "float.tif"):
        image, why = decode_image(tmp_path / name)
        assert why == "" and image.mode == "RGB"
        a = np.asarray(image)
        # a ramp from black to white, not all white (16-bit clipped) or all black (floats truncated)
        assert a.min() <= 2 and a.max() >= 253 and 100 < a.mean() < 155, (name, a.min(), a.max(), a.mean())


def test_a_fifo_named_like_an_image_is_skipped_not_read(tmp_path):
    import os

    from PIL import Image

    from elastic_fx.data import ImageFolderSource

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "x.png")
    src = ImageFolderSource(tmp_path)  # opening x.png would block forever
    assert [p.name for p in src.files] == ["a.png"]
