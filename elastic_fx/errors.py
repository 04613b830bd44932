"""User-facing errors.

Every failure a user can cause (a model that is not a ViT, a bad sparsity, a score
file for another model, a corrupt image folder ...) raises a subclass of
``ElasticFxError`` whose message says what was found, what was expected and what to
do next. Internal invariants use plain exceptions; they are bugs, not user errors.
"""


class ElasticFxError(Exception):
    """Base class of every user-facing elastic_fx error."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty): for wrapping it."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__


class TracingError(ElasticFxError):
    """Neither torch.fx nor torch.export could capture the model."""


class DiscoveryError(ElasticFxError):
    """No attention heads or FFN neurons could be found in a traced graph."""


class SliceError(ElasticFxError):
    """A keep-mask is invalid, or the graph could not be rewritten for it."""


class BudgetError(ElasticFxError):
    """A sparsity / FLOPs budget is out of range or cannot be reached."""


class ScoresError(ElasticFxError):
    """A score file is corrupt, unsafe, or belongs to a different model."""


class DataError(ElasticFxError):
    """An image source is empty, unreadable or of the wrong shape."""


class NumericalError(ElasticFxError):
    """NaN or inf appeared where finite numbers are required (e.g. gradients)."""


class ExportError(ElasticFxError):
    """An export failed its checks; no output file was left behind."""


class ConfigError(ElasticFxError):
    """An option has a value outside what it accepts (a batch size, a temperature, a spread ...)."""


class DistributedError(ElasticFxError):
    """A rank stopped responding, disagrees with the others, or the distributed environment is unusable."""


class ModelError(ElasticFxError):
    """A model spec names no model, its file does not load, or its checkpoint does not fit."""


class QuantizationError(ExportError):
    """A model has no operator onnxruntime can quantize; its float file is the one to deploy."""
