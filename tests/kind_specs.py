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
}
