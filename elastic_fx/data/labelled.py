"""Labelled train/test splits for evaluation: an ``.npz`` or ``class_name/image.jpg`` folders.

Takes a path (and optionally a separate test folder); returns :class:`LabelledData`
holding uint8 ``[N, H, W, C]`` images (or float ``[N, D]`` features from an
``.npz``) with integer labels. Reads files; touches nothing else. Folder images are
found, decoded and resized by the same code as every other image of the package
(:data:`IMAGE_EXTENSIONS`, :func:`decode_image`, :func:`resize_crop`); unlike an
unlabelled folder, an unreadable file here is an error, since skipping it would
silently change the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import torch

from ..errors import DataError
from .load import resize_crop, to_uint8_chw
from .sources import IMAGE_EXTENSIONS, decode_image, list_images


@dataclass
class LabelledData:
    """A labelled train/test split: images (uint8 ``[N, H, W, C]``) or features (float ``[N, D]``)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes (the class-name list, or the largest label + 1)."""
        if self.class_names:
            return len(self.class_names)
        return int(max(self.y_train.max(initial=-1), self.y_test.max(initial=-1))) + 1


def load_labelled(path_or_train_dir: Union[str, Path], test_dir: Union[str, Path, None] = None, *,
                  image_size: int = 224) -> LabelledData:
    """Load a labelled split from an ``.npz`` or from ``class_name/image.jpg`` folders.

    * ``.npz``: arrays ``x_train, y_train, x_test, y_test`` (uint8 HWC images or float
      features), optional ``class_names`` / ``label_names``.
    * folders: ``path_or_train_dir`` holds one sub-folder per class; ``test_dir`` likewise.
      Without ``test_dir``, ``path_or_train_dir/train`` with ``test`` (or ``val``) is used.
      Class names are the train folder's sorted sub-folder names; a test class absent from
      train is an error. Images are resized (shorter side, bicubic, antialiased) and
      centre-cropped to ``image_size``.
    """
    root = Path(path_or_train_dir).expanduser()
    if root.is_file():
        if root.suffix.lower() != ".npz":
            raise DataError(f"{root} is a file but not an .npz; pass an .npz or a folder of class sub-folders.")
        return _load_npz(root)
    if not root.exists():
        raise DataError(f"{root} does not exist; pass an .npz file or a folder of class sub-folders.")
    if test_dir is None:
        test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        if not (root / "train").is_dir() or test_root is None:
            raise DataError(f"No test split for {root}: pass test_dir, or use {root}/train and {root}/test folders.")
        root = root / "train"
    else:
        test_root = Path(test_dir).expanduser()
    train_files, test_files = _class_files(root), _class_files(test_root)
    unknown = sorted(set(test_files) - set(train_files))
    if unknown:
        raise DataError(f"Test classes {unknown} do not exist in the train folder {root} (classes: "
                        f"{sorted(train_files)}); rename or remove them.")
    names = list(train_files)
    index = {c: i for i, c in enumerate(names)}
    x_train, y_train = _load_split(train_files, index, image_size, root)
    x_test, y_test = _load_split(test_files, index, image_size, test_root)
    return LabelledData(x_train, y_train, x_test, y_test, names)


def _load_npz(path: Path) -> LabelledData:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise DataError(f"Cannot read {path} as an .npz archive ({e}).") from e
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks {missing}; an .npz needs x_train, y_train, x_test, y_test "
                        f"(found {sorted(arrays)}).")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: x_{split} has {x.shape[0]} rows but y_{split} has shape {y.shape}.")
        if x.shape[0] == 0:
            raise DataError(f"{path}: the {split} split is empty.")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} has dtype {y.dtype}; expected integer class indices.")
    names_key = next((k for k in ("class_names", "label_names") if k in arrays), None)
    names = [str(n) for n in arrays[names_key]] if names_key else []
    y_max = int(max(arrays["y_train"].max(), arrays["y_test"].max()))
    if names and y_max >= len(names):
        raise DataError(f"{path}: label {y_max} but only {len(names)} class names.")
    return LabelledData(arrays["x_train"], arrays["y_train"].astype(np.int64), arrays["x_test"],
                        arrays["y_test"].astype(np.int64), names)


def _class_files(root: Path) -> Dict[str, List[Path]]:
    """Image files per class sub-folder of ``root`` (class names sorted)."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected class_name/image.jpg folders.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<class_name>/<image>.jpg.")
    return {c: list_images(root / c) for c in classes}


def _load_image(path: Path, size: int) -> np.ndarray:
    """One file as uint8 ``[size, size, 3]``; an unreadable file is a :class:`DataError` naming it."""
    image, why = decode_image(path)
    if image is None:
        raise DataError(f"Cannot read image {path} ({why}); remove or replace it.")
    x = resize_crop(to_uint8_chw(image), (size, size), "bicubic", crop_pct=1.0)[0]
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _load_split(files: Dict[str, List[Path]], class_index: Dict[str, int], size: int,
                root: Path) -> Tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for cls, paths in files.items():
        for p in paths:
            xs.append(_load_image(p, size))
            ys.append(class_index[cls])
    if not xs:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)
