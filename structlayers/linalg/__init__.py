"""Linear algebra the kinds are built from, independent of any layer class.

``kron``: Kronecker products applied, inspected and compared without forming them,
row-wise (Khatri-Rao) products, and factor shapes. ``svd``: exact, randomized and Kronecker-product SVDs and error
tails. ``pivots`` and ``cur``: pivot strategies and CUR with a stable core.
``tt``: tensor-train layouts, TT-SVD and costs. ``blocks``: Monarch block grids and
blockwise SVDs (also of A ⊗ B). ``sketch``: random sketches, sketched fits and their
expected errors. The names below are the most used ones; the modules hold the rest.
"""

from .kron import (
    FactorShapes,
    balanced_factor_shapes,
    check_factor_shapes,
    frobenius_sq,
    inner,
    kron_apply,
    kron_chain_flops,
    kron_columns,
    kron_dense,
    kron_frobenius_sq,
    kron_inner_lowrank,
    kron_rows,
    kron_sum_apply,
    same_matrices,
    with_terms_axis,
    lowrank_frobenius_sq,
)
from .pivots import PIVOT_STRATEGIES, RANDOM_STRATEGIES, select_pivots
from .svd import (
    kronecker_singular_values,
    optimal_relative_error,
    optimal_relative_error_kronecker,
    randomized_range,
    randomized_svd,
    smallest_rank_for_tolerance,
    svd,
    tail_error_sq,
    top_kronecker_pairs,
)

__all__ = [
    "FactorShapes",
    "PIVOT_STRATEGIES",
    "RANDOM_STRATEGIES",
    "balanced_factor_shapes",
    "check_factor_shapes",
    "frobenius_sq",
    "inner",
    "kron_apply",
    "kron_chain_flops",
    "kron_columns",
    "kron_dense",
    "kron_frobenius_sq",
    "kron_inner_lowrank",
    "kron_rows",
    "kron_sum_apply",
    "same_matrices",
    "with_terms_axis",
    "kronecker_singular_values",
    "lowrank_frobenius_sq",
    "optimal_relative_error",
    "optimal_relative_error_kronecker",
    "randomized_range",
    "randomized_svd",
    "select_pivots",
    "smallest_rank_for_tolerance",
    "svd",
    "tail_error_sq",
    "top_kronecker_pairs",
]
