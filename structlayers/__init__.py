"""structlayers: structured linear ("sum") layers for PyTorch behind one interface.

>>> import structlayers
>>> structlayers.available()
['cp', 'dense', 'kronecker', 'lowrank', 'monarch', 'nystrom', 'sketched', 'tt', 'tucker']
>>> layer = structlayers.from_kronecker("lowrank", A, B, rank=16)   # doctest: +SKIP
"""

from .base import StructuredSumLayer
from .registry import available, create, from_dense, from_kronecker, get
from .kinds import CP, TT, Dense, Kronecker, LowRank, Monarch, Nystrom, Sketched, Tucker
from .linalg import PIVOT_STRATEGIES, optimal_relative_error, optimal_relative_error_kronecker
from .nn import Conv2d, Linear, ReplacementReport, convert_model, replace_linear
from .choose import Choice, choose

__version__ = "0.1.0"

__all__ = [
    "StructuredSumLayer",
    "available",
    "create",
    "from_dense",
    "from_kronecker",
    "get",
    "Dense",
    "Kronecker",
    "LowRank",
    "Nystrom",
    "TT",
    "Sketched",
    "Monarch",
    "CP",
    "Tucker",
    "PIVOT_STRATEGIES",
    "Linear",
    "Conv2d",
    "replace_linear",
    "convert_model",
    "ReplacementReport",
    "choose",
    "Choice",
    "optimal_relative_error",
    "optimal_relative_error_kronecker",
]
