"""Bad input gets a clear error naming the problem, for every entry point."""

import pytest
import torch

import structlayers as sl
from structlayers._checks import check_budget, rank_for_params_share

from .helpers import random_factors

W = torch.randn(2, 6, 5, dtype=torch.float64)
A, B = random_factors(2, (3, 2), (2, 3), seed=1)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: sl.get("fourier"), ValueError, "unknown structured layer kind 'fourier'; available: cp, dense"),
        (lambda: sl.get(3), TypeError, "kind name must be a str"),
        (lambda: sl.from_dense("lowrank", W.numpy(), rank=2), TypeError, "W must be a torch.Tensor"),
        (lambda: sl.from_dense("lowrank", W[0, 0], rank=2), ValueError, r"W must have shape \(F, out, in\) or \(out, in\), got \(5,\)"),
        (lambda: sl.from_dense("lowrank", W.int(), rank=2), TypeError, "W must have a floating-point or complex dtype, got torch.int32"),
        (lambda: sl.from_dense("lowrank", W.clone().fill_(float("nan")), rank=2), ValueError, r"W contains 60 non-finite value\(s\)"),
        (lambda: sl.from_dense("lowrank", torch.zeros(2, 0, 3), rank=1), ValueError, "W must not be empty"),
        (lambda: sl.from_dense("lowrank", W, rank=0), ValueError, "rank must be a positive int, got 0"),
        (lambda: sl.from_dense("lowrank", W, rank=2.5), TypeError, "rank must be a positive int, got float"),
        (lambda: sl.from_dense("lowrank", W, rank=6), ValueError, "rank 6 exceeds the largest possible rank 5 of a 6 x 5 matrix"),
        (lambda: sl.from_dense("nystrom", W, rank=6), ValueError, "rank 6 exceeds the largest possible rank 5"),
        (lambda: sl.from_dense("lowrank", W, rank=2, tolerance=0.1), ValueError, "give at most one of rank, tolerance, params_share; got rank, tolerance"),
        (lambda: sl.from_dense("nystrom", W, tolerance=0.1, params_share=0.5), ValueError, "got tolerance, params_share"),
        (lambda: sl.from_dense("lowrank", W), ValueError, "lowrank needs one of rank, tolerance or params_share"),
        (lambda: sl.from_dense("lowrank", W, tolerance=1.5), ValueError, r"tolerance must be in \[0, 1\), got 1.5"),
        (lambda: sl.from_dense("lowrank", W, params_share=0.0), ValueError, r"params_share must be in \(0, 1\], got 0.0"),
        (lambda: sl.from_dense("lowrank", W, params_share=0.01), ValueError, "params_share=0.01 allows 0 parameters, but the smallest low-rank layer"),
        (lambda: sl.from_dense("lowrank", W, rank=2, method="qr"), ValueError, "unknown method 'qr'"),
        (lambda: sl.from_dense("nystrom", W, rank=2, strategy="volume"), ValueError, "unknown pivot strategy 'volume'; choose one of 'uniform', 'l2', 'leverage', 'deim', 'qr'"),
        (lambda: sl.from_dense("nystrom", W, rank=2, oversampling=0.5), ValueError, "oversampling must be >= 1"),
        (lambda: sl.from_dense("nystrom", W, rank=2, seed=1, generator=torch.Generator()), ValueError, "give seed or generator, not both"),
        (lambda: sl.from_kronecker("lowrank", A, B[:1], rank=2), ValueError, "A and B must have the same number of folds"),
        (lambda: sl.from_kronecker("lowrank", A, B.float(), rank=2), TypeError, "A and B must share a dtype"),
        (lambda: sl.from_kronecker("lowrank", A, B, rank=5), ValueError, r"rank 5 exceeds the largest possible rank 4 of A ⊗ B"),
        (lambda: sl.from_kronecker("lowrank", A, B, rank=2, structure="tree"), ValueError, "unknown structure 'tree'"),
        (lambda: sl.from_kronecker("lowrank", A, B, rank=3, structure="kronecker"), ValueError, r"rank 3 cannot be split as ka\*kb with ka <= 2, kb <= 2"),
        (lambda: sl.from_kronecker("nystrom", A, B, factor_ranks=(3, 1)), ValueError, "rank 3 exceeds the largest possible rank 2 of factor A"),
        (lambda: sl.from_kronecker("nystrom", A, B, rank=2, factor_ranks=(2, 2)), ValueError, r"rank=2 disagrees with factor_ranks=\(2, 2\)"),
        (lambda: sl.from_kronecker("lowrank", A, B, rank=4, square=True), ValueError, r"square=True needs B == conj\(A\), but A is \(2, 3, 2\) and B is \(2, 2, 3\)"),
        (lambda: sl.from_kronecker("nystrom", A, A + 1, rank=4, square=True), ValueError, r"square=True needs B == conj\(A\); they differ by up to"),
        (lambda: sl.from_kronecker("lowrank", A, A, rank=4, square=True, structure="flat"), ValueError, "it needs structure='kronecker'"),
        (lambda: sl.from_kronecker("lowrank", A, A, rank=2, square=True), ValueError, r"and ka == kb \(square\)"),
        (lambda: sl.from_kronecker("kronecker", A.clone().fill_(float("inf")), B), ValueError, "A contains 12 non-finite"),
        (lambda: sl.Kronecker.from_dense(W, factor_shapes=((2, 2), (3, 3))), ValueError, r"give a 6 x 6 product, but the layer is 6 x 5"),
        (lambda: sl.create("lowrank", 5, 6, 2, rank=0), ValueError, "rank must be a positive int, got 0"),
        (lambda: sl.create("lowrank", 5, 6, 2), ValueError, "lowrank layer needs a rank"),
        (lambda: sl.create("lowrank", 0, 6), ValueError, "in_features must be a positive int, got 0"),
        (lambda: sl.create("nystrom", 6, 6, factor_ranks=(2, 2)), ValueError, "factor_ranks and tied need factor_shapes"),
        (lambda: sl.create("nystrom", 4, 6, factor_shapes=((2, 2), (3, 2)), tied=True, factor_ranks=(1, 1)), ValueError, "tied=True needs equal factor shapes"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kind", ["dense", "kronecker", "lowrank", "nystrom"])
def test_forward_rejects_wrong_shapes(kind):
    layer = sl.from_kronecker(kind, A, B, **({"rank": 2} if kind in ("lowrank", "nystrom") else {}))
    with pytest.raises(ValueError, match=r"expects input of shape \(F=2, B, in_features=6\), got \(3, 4, 6\)"):
        layer(torch.randn(3, 4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got \(4, 6\)"):
        layer(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"target weight has shape \(F=2, out=5, in=6\)"):
        layer.relative_error(torch.randn(2, 5, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rank=2, tolerance=0.1), ValueError, "give at most one of rank, tolerance, params_share; got rank, tolerance"),
        (dict(rank=2, params_share=0.5, rank_name="block_rank"), ValueError,
         "give at most one of block_rank, tolerance, params_share; got block_rank, params_share"),
        (dict(rank=0, rank_name="block_rank"), ValueError, "block_rank must be a positive int, got 0"),
        (dict(rank=1.5), TypeError, "rank must be a positive int, got float"),
        (dict(required="lowrank"), ValueError, "lowrank needs one of rank, tolerance or params_share"),
        (dict(required="monarch", rank_name="block_rank"), ValueError, "monarch needs one of block_rank, tolerance"),
        (dict(tolerance=1.0), ValueError, r"tolerance must be in \[0, 1\), got 1.0"),
        (dict(tolerance="0.1"), TypeError, "tolerance must be a float, got str"),
        (dict(params_share=True), TypeError, "params_share must be a float, got bool"),
        (dict(params_share=1.01), ValueError, r"params_share must be in \(0, 1\], got 1.01"),
    ],
)
def test_one_budget_check_for_every_kind(kwargs, error, match):
    with pytest.raises(error, match=match):
        check_budget(**kwargs)


def test_valid_budgets_pass_and_params_share_picks_the_largest_fitting_rank():
    for kwargs in (dict(), dict(rank=3), dict(tolerance=0.0), dict(params_share=1.0), dict(rank=1, required="lowrank")):
        check_budget(**kwargs)
    # 10 parameters per unit of rank against a budget of 0.5 * 100: rank 5 fits, 6 does not
    assert rank_for_params_share(0.5, 100, lambda r: 10 * r, max_rank=8, what="layer") == 5
    assert rank_for_params_share(1.0, 100, lambda r: 10 * r, max_rank=8, what="layer") == 8
    with pytest.raises(ValueError, match="params_share=0.05 allows 5 parameters, but the smallest layer"):
        rank_for_params_share(0.05, 100, lambda r: 10 * r, max_rank=8, what="layer")
