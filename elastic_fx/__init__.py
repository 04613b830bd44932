"""elastic_fx: any pretrained ViT -> an elastic one, as a torch.fx compiler pass.

The public API is re-exported here and nothing else lives in this file.
"""

from .budget import Floors, achieved, budget_masks, max_sparsity, nested_masks, structure_order
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
from .elastic import ElasticModel, ElasticScores
from .embedding import embedding_module
from .exporters.onnx import ExportReport, export_onnx
from .passes.discover import discover
from .scoring.local import LocalScores, local_scores
from .search.run import SearchConfig, prune
from .passes.slice import slice_graph as slice
from .structures import AttentionGroup, Block, MlpGroup, ParamSlice, StructureMap
from .tracing import register_leaf_module, register_no_trace_function, trace
from .version import __version__

__all__ = [
    "ElasticModel",
    "ElasticScores",
    "ExportReport",
    "LocalScores",
    "SearchConfig",
    "local_scores",
    "prune",
    "Floors",
    "achieved",
    "budget_masks",
    "embedding_module",
    "export_onnx",
    "max_sparsity",
    "nested_masks",
    "structure_order",
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
