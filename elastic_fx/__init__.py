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
from .structures import AttentionGroup, Block, MlpGroup, ParamSlice, StructureMap
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
]
