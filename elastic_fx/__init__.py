"""elastic_fx: any pretrained ViT -> an elastic one, as a torch.fx compiler pass.

The public API is re-exported here and nothing else lives in this file. ``efx.slice`` is
the slicing pass; it is left out of ``__all__`` so that ``from elastic_fx import *`` does
not shadow the builtin ``slice`` (``efx.slice_graph`` is the same function).
"""

from .budget import Floors, achieved, budget_masks, max_sparsity, nested_masks, structure_order
from .elastic import ElasticModel
from .errors import (
    BudgetError,
    ConfigError,
    DataError,
    DiscoveryError,
    DistributedError,
    ElasticFxError,
    ExportError,
    ModelError,
    NumericalError,
    QuantizationError,
    ScoresError,
    SliceError,
    TracingError,
)
from .exporters.onnx import ExportReport, export_onnx
from .exporters.pt2 import Pt2Report, export_pt2, load_pt2
from .exporters.quantize import QuantConfig, QuantReport, quantize_onnx
from .keep import KeepMask
from .passes.discover import discover
from .passes.embedding import embedding_module
from .passes.slice import SliceResult, slice_graph, slice_pass
from .pipeline import SearchConfig, prune
from .scores import ElasticScores, LocalScores
from .scoring.local import local_scores
from .structures import AttentionGroup, Block, MlpGroup, ParamSlice, StructureMap
from .tracing import register_leaf_module, register_no_trace_function, trace
from .version import __version__

slice = slice_graph  # efx.slice(gm, smap, keep) -> GraphModule (the public contract)

__all__ = [
    "AttentionGroup",
    "Block",
    "BudgetError",
    "ConfigError",
    "DataError",
    "DiscoveryError",
    "DistributedError",
    "ElasticFxError",
    "ElasticModel",
    "ElasticScores",
    "ExportError",
    "ModelError",
    "ExportReport",
    "Pt2Report",
    "QuantConfig",
    "QuantReport",
    "Floors",
    "KeepMask",
    "LocalScores",
    "MlpGroup",
    "NumericalError",
    "QuantizationError",
    "ParamSlice",
    "ScoresError",
    "SearchConfig",
    "SliceError",
    "SliceResult",
    "StructureMap",
    "TracingError",
    "__version__",
    "achieved",
    "budget_masks",
    "discover",
    "embedding_module",
    "export_onnx",
    "export_pt2",
    "load_pt2",
    "quantize_onnx",
    "local_scores",
    "max_sparsity",
    "nested_masks",
    "prune",
    "register_leaf_module",
    "register_no_trace_function",
    "slice_graph",
    "slice_pass",
    "structure_order",
    "trace",
]
