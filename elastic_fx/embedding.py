"""Old import path of :mod:`elastic_fx.passes.embedding` (re-export shim; the lead removes it)."""

from .passes.embedding import EMBEDDING_META, embedding_module  # noqa: F401
