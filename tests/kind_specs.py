"""How the cross-kind tests drive each registered kind.

Every registered kind must have an entry here (a test checks that), so a new kind
is exercised by the whole interface suite as soon as it is registered.

full_dense(w):        option dicts that make ``from_dense`` exact for W.
full_kron(a, b):      option dicts that make ``from_kronecker`` exact for A ⊗ B.
init(in, out):        options for the random-init constructor (small layer).
budget(rank):         options asking from_kronecker for an approximation of that rank.
"""

from __future__ import annotations

from structlayers import PIVOT_STRATEGIES


def _min_dims(a, b):
    return min(a.shape[1:]), min(b.shape[1:])


SPECS = {
    "dense": dict(
        full_dense=lambda w: [{}],
        full_kron=lambda a, b: [{}],
        init=lambda i, o: {},
        budget=None,
    ),
    "kronecker": dict(
        full_dense=lambda w: [{}],
        full_kron=lambda a, b: [{}],
        init=lambda i, o: {"rank": 2},
        budget=None,  # A ⊗ B is already exact at Kronecker rank 1; budgets apply to from_dense
    ),
    "lowrank": dict(
        full_dense=lambda w: [{"rank": min(w.shape[-2:])}, {"rank": min(w.shape[-2:]), "method": "randomized", "seed": 0}],
        full_kron=lambda a, b: [
            {"rank": _min_dims(a, b)[0] * _min_dims(a, b)[1]},
            {"structure": "kronecker", "factor_ranks": _min_dims(a, b)},
        ],
        init=lambda i, o: {"rank": 3},
        budget=lambda r: {"rank": r},
    ),
    "nystrom": dict(
        full_dense=lambda w: [{"rank": min(w.shape[-2:]), "strategy": s, "seed": 0} for s in PIVOT_STRATEGIES]
        + [{"rank": min(w.shape[-2:]), "oversampling": 1.0}],
        full_kron=lambda a, b: [
            {"factor_ranks": _min_dims(a, b), "strategy": s, "seed": 0} for s in PIVOT_STRATEGIES
        ] + [
            # Joint pivots over the product: deterministic strategies span its range.
            {"structure": "flat", "rank": _min_dims(a, b)[0] * _min_dims(a, b)[1], "strategy": s}
            for s in ("deim", "qr")
        ],
        init=lambda i, o: {"rank": 3},
        budget=lambda r: {"rank": r},
    ),
    "tt": dict(
        full_dense=lambda w: [{}, {"num_cores": 3}, {"num_cores": 1}],
        full_kron=lambda a, b: [{}, {"factor_cores": True}],
        init=lambda i, o: {"tt_rank": 4},
        # bond rank inside each factor; the suite's 5x4 / 4x5 factors allow at most 2
        budget=lambda r: {"factor_cores": True, "rank": 1},
    ),
    "sketched": dict(
        # sketch="orthogonal" with low_rank >= max(out, in): U^T U = I exactly, so each term is
        # exact; fit="projection" is exact once num_terms * low_rank >= min(out, in).
        full_dense=lambda w: [
            {"sketch": "orthogonal", "low_rank": max(w.shape[-2:]), "allow_larger": True, "seed": 0},
            {"fit": "projection", "low_rank": min(w.shape[-2:]), "allow_larger": True, "seed": 0},
        ],
        full_kron=lambda a, b: [
            {"sketch": "orthogonal", "low_rank": max(a.shape[1] * b.shape[1], a.shape[2] * b.shape[2]),
             "allow_larger": True, "seed": 0},
            {"fit": "projection", "num_terms": 2, "allow_larger": True, "seed": 0,
             "low_rank": -(-min(a.shape[1] * b.shape[1], a.shape[2] * b.shape[2]) // 2)},
        ],
        # The largest single term that is not larger than dense.
        init=lambda i, o: {"num_terms": 1, "low_rank": max(1, i * o // (2 * (i + o)))},
        budget=lambda r: {"rank": r, "seed": 0},
    ),
    "cp": dict(
        # no budget: the largest useful rank, built exactly (not by ALS)
        full_dense=lambda w: [{}, {"num_cores": 3}, {"num_cores": 1}],
        full_kron=lambda a, b: [{}],
        init=lambda i, o: {"rank": 3},
        budget=None,  # A ⊗ B is exact at rank 1; budgets apply to from_dense
    ),
    "tucker": dict(
        full_dense=lambda w: [{}, {"num_cores": 3}, {"num_cores": 1}],
        full_kron=lambda a, b: [{}],
        init=lambda i, o: {"rank": 3},
        budget=None,  # A ⊗ B is exact at multilinear rank (1, 1); budgets apply to from_dense
    ),
    "monarch": dict(
        full_dense=lambda w: [{}, {"num_blocks": 1}],
        full_kron=lambda a, b: [{}, {"num_blocks": 1}],
        init=lambda i, o: {"block_rank": 2},
        # block rank is not matrix rank: a (2, 2) grid fits the suite's (5,4)x(4,5) factors
        budget=lambda r: {"num_blocks": 2, "block_rank": max(1, r // 2)},
    ),
}
