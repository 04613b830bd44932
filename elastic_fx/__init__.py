"""elastic_fx: any pretrained ViT -> an elastic one, as a torch.fx compiler pass.

The public API is re-exported here and nothing else lives in this file.
"""

from .errors import (
    BudgetError,
    DataError,
    DiscoveryError,
    ElasticFxError,
    ExportError,
    NumericalError,
    ScoresError,
    SliceError,
    TracingError,
)
from .passes.discover import discover
from .passes.slice import slice_graph as slice
from .structures import AttentionGroup, Block, MlpGroup, ParamSlice, StructureMap
from .tracing import register_leaf_module, register_no_trace_function, trace
from .version import __version__

__all__ = [
    "AttentionGroup",
    "Block",
    "BudgetError",
    "DataError",
    "DiscoveryError",
    "ElasticFxError",
    "ExportError",
    "MlpGroup",
    "NumericalError",
    "ParamSlice",
    "ScoresError",
    "SliceError",
    "StructureMap",
    "TracingError",
    "__version__",
    "discover",
    "register_leaf_module",
    "register_no_trace_function",
    "slice",
    "trace",
]
