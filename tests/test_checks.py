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
        (lambda: sl.from_dense("nystrom", W, rank=2, oversampling=0.5), ValueError, "oversampling must be a finite number >= 1"),
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


# Options that used to bend silently or crash deep inside (issue #11): each is refused with
# a ValueError / TypeError naming the argument and what would be right.
M = torch.randn(8, 8, dtype=torch.float64)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: sl.from_dense("lowrank", M, rank=2, method="randomized", oversampling=-3), ValueError, r"oversampling must be a non-negative int below 2\*\*63, got -3"),
        (lambda: sl.from_dense("lowrank", M, rank=2, method="randomized", oversampling=2.5), TypeError, "oversampling must be a non-negative int, got float 2.5"),
        (lambda: sl.from_dense("lowrank", M, rank=2, method="randomized", oversampling=float("inf")), TypeError, "oversampling must be a non-negative int"),
        (lambda: sl.from_dense("lowrank", M, rank=2, method="randomized", oversampling="2"), TypeError, "oversampling must be a non-negative int, got str"),
        (lambda: sl.from_dense("lowrank", M, rank=2, method="randomized", oversampling=None), TypeError, "oversampling must be a non-negative int, got NoneType"),
        (lambda: sl.from_dense("lowrank", M, rank=2, method="randomized", power_iterations=-1), ValueError, r"power_iterations must be a non-negative int below 2\*\*63, got -1"),
        (lambda: sl.from_dense("lowrank", M, rank=2, method="randomized", power_iterations=1.5), TypeError, "power_iterations must be a non-negative int, got float"),
        (lambda: sl.from_dense("nystrom", M, rank=2, oversampling=float("inf")), ValueError, "oversampling must be a finite number >= 1"),
        (lambda: sl.from_dense("nystrom", M, rank=2, oversampling="2"), TypeError, "oversampling must be a real number >= 1"),
        (lambda: sl.from_dense("nystrom", M, rank=2, oversampling=None), TypeError, "oversampling must be a real number >= 1"),
        (lambda: sl.from_kronecker("nystrom", A, A, factor_ranks=(1, 1), oversampling=float("nan")), ValueError, "oversampling must be a finite number"),
        (lambda: sl.from_kronecker("lowrank", A, A, factor_ranks=(1, 1), square="False"), TypeError, "square must be True or False, got str 'False'"),
        (lambda: sl.from_kronecker("nystrom", A, A, factor_ranks=(1, 1), square=1), TypeError, "square must be True or False, got int"),
        (lambda: sl.create("lowrank", 6, 6, factor_shapes=((2, 3), (3, 2)), rank=1, tied="yes"), TypeError, "tied must be True or False"),
        (lambda: sl.create("dense", 4, 4, dtype="float32"), TypeError, "dtype must be a floating-point or complex torch.dtype"),
        (lambda: sl.create("tt", 4, 4, dtype=torch.int64), TypeError, "dtype must be a floating-point or complex torch.dtype"),
        (lambda: sl.create("sketched", 4, 4, num_terms=1, low_rank=1, dtype=torch.bool), TypeError, "dtype must be a floating-point"),
        (lambda: sl.create("monarch", 4, 4, device="gpu"), ValueError, "device='gpu' is not a device torch knows"),
        (lambda: sl.create("kronecker", 4, 4, device=3.5), TypeError, "device must be a torch.device"),
        (lambda: sl.create("lowrank", 4, 4, rank=1, device="xla"), ValueError, "device='xla' is not available on this machine"),
        (lambda: sl.create("lowrank", 4, 4, rank=1, device="hpu"), ValueError, "device='hpu' is not available on this machine"),
        (lambda: sl.create("dense", 2**70, 4), ValueError, r"in_features must be a positive int below 2\*\*63"),
        (lambda: sl.create("dense", 4, 4, seed=2**70), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
        (lambda: sl.create("dense", 4, 4, seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
        (lambda: sl.create("dense", 4, 4, seed="1"), TypeError, "seed must be an int, got str"),
        (lambda: sl.create("dense", 4, 4, generator=1), TypeError, "generator must be a torch.Generator"),
        (lambda: sl.from_dense("sketched", M, tolerance=1e-300, allow_larger=True), ValueError, "tolerance=1e-300 needs low_rank of about inf"),
        (lambda: sl.from_dense("sketched", M, tolerance=1e-6, allow_larger=True), ValueError, "tolerance=1e-06 needs low_rank of about"),
        (lambda: sl.from_dense("lowrank", torch.empty(4, 4, device="meta"), rank=1), ValueError, "W is on the meta device"),
        (lambda: sl.Linear("dense", 4, 4)(torch.tensor(1.0)), ValueError, r"Linear expects inputs of shape \(\.\.\., 4\), got \(\)"),
        (lambda: sl.Linear("dense", 4, 4)([1.0] * 4), TypeError, "Linear expects a torch.Tensor x"),
        (lambda: sl.Linear("dense", 4, 4)(torch.ones(4, dtype=torch.float64)), TypeError, "x has dtype torch.float64"),
        (lambda: sl.Linear("dense", 4, 4, bias="no"), TypeError, "bias must be True or False"),
        # found by tests/property: values of the wrong type reached truthiness tests, and
        # messages of conflicting options named only one side
        (lambda: sl.create("kronecker", 6, 6, factor_shapes=torch.zeros(2)), ValueError, "factor_shapes must be"),
        (lambda: sl.from_kronecker("lowrank", A, B, rank=1, structure=torch.zeros(2)), ValueError, "unknown structure"),
        (lambda: sl.from_kronecker("nystrom", A, A, factor_ranks=None), ValueError, "nystrom needs one of rank, tolerance, params_share or factor_ranks"),
        (lambda: sl.from_kronecker("nystrom", A, A, factor_ranks=(1, 3)), ValueError, r"of factor B \(factor_ranks\[1\]\)"),
        (lambda: sl.create("lowrank", 1, 6, rank=3), ValueError, r"of a 6 x 1 matrix \(out_features x in_features\)"),
        (lambda: sl.create("monarch", 1, 6, block_rank=2), ValueError, "blocks of out_features / blocks_out x in_features / blocks_in"),
        (lambda: sl.create("sketched", 1, 6, num_terms=1, low_rank=3), ValueError, r"\(out_features\*in_features\) of a dense layer"),
        (lambda: sl.create("tt", 2, 2, tt_rank=9), ValueError, r"out_features=2, in_features=2"),
    ],
)
def test_bad_options_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
