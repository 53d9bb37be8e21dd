"""Linear algebra shared by several kinds: Kronecker products, SVDs, pivots, CUR."""

from .kron import (
    frobenius_sq,
    inner,
    kron_apply,
    kron_chain_flops,
    kron_columns,
    kron_dense,
    kron_frobenius_sq,
    kron_inner_lowrank,
    kron_rows,
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

__all__ = [name for name in dir() if not name.startswith("_")]
