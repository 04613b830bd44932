"""The one image pipeline: sources, the model's own preprocessing, model-ready tensors.

Takes what the user passes as images (a folder, a tensor, a list, a labelled ``.npz``
or class folders, or nothing) and a model; returns tensors preprocessed the way the
model expects. Reads image files; touches nothing else. Imports only
:mod:`elastic_fx.errors` from the package (it sits in the bottom layer).

* :mod:`.preprocess` -- :class:`PreprocessConfig`, :func:`preprocess_config` (timm /
  Hugging Face / torchvision / traced configs), :func:`resolve_preprocess` (the one
  rule every caller uses), :func:`resize`, :func:`normalize`, :data:`PREPROCESS_META`.
* :mod:`.sources` -- :class:`ImageFolderSource`, :class:`TensorSource`,
  :class:`ImageListSource`, :class:`SyntheticSource`, :func:`as_source`,
  :data:`IMAGE_EXTENSIONS` and :func:`decode_image` (the one decoder).
* :mod:`.load` -- :func:`load_tensor`, :func:`raw_images`, :func:`to_model_input`,
  :func:`iter_batches`.
* :mod:`.labelled` -- :class:`LabelledData`, :func:`load_labelled` for evaluation.
"""

from .labelled import LabelledData, load_labelled
from .load import iter_batches, load_tensor, raw_images, resize_crop, to_model_input, to_uint8_chw
from .preprocess import (
    HF_VIT_DEFAULT_MEAN,
    HF_VIT_DEFAULT_STD,
    IDENTITY_MEAN,
    IDENTITY_STD,
    PREPROCESS_META,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    PreprocessConfig,
    normalize,
    preprocess_config,
    resize,
    resolve_preprocess,
)
from .sources import (
    DEFAULT_SYNTHETIC_IMAGES,
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    ImageLike,
    ImageListSource,
    ImageSource,
    SyntheticSource,
    TensorSource,
    as_source,
    decode_image,
    list_images,
)

__all__ = [
    "DEFAULT_SYNTHETIC_IMAGES",
    "HF_VIT_DEFAULT_MEAN",
    "HF_VIT_DEFAULT_STD",
    "IDENTITY_MEAN",
    "IDENTITY_STD",
    "IMAGE_EXTENSIONS",
    "PREPROCESS_META",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_MEAN",
    "TORCHVISION_STD",
    "ImageFolderSource",
    "ImageLike",
    "ImageListSource",
    "ImageSource",
    "LabelledData",
    "PreprocessConfig",
    "SyntheticSource",
    "TensorSource",
    "as_source",
    "decode_image",
    "iter_batches",
    "list_images",
    "load_labelled",
    "load_tensor",
    "normalize",
    "preprocess_config",
    "raw_images",
    "resize",
    "resize_crop",
    "resolve_preprocess",
    "to_model_input",
    "to_uint8_chw",
]
