"""The ``tucker`` kind: layouts, exactness, HOOI against SVD bounds, budgets, costs, warnings."""

from __future__ import annotations

import math

import pytest
import torch

import structlayers as sl
from structlayers.kinds.tucker import Tucker
from structlayers.linalg import kron_dense
from structlayers.linalg.decompose import mode_tensor

from ..helpers import (assert_flops_are_the_forwards, assert_warns_only_when_costlier, decaying_matrix,
                       generator, random_factors, rel)

EXACT = 1e-10
F64 = torch.float64


def _unfolding_tails(w, out_modes, in_modes, ranks):
    """Relative squared tails of each mode unfolding at its rank (numpy-free, float64)."""
    t = mode_tensor(w, out_modes, in_modes)
    total = float((t ** 2).sum())
    tails = []
    for k, r in enumerate(ranks):
        s = torch.linalg.svdvals(t.movedim(1 + k, 1).reshape(t.shape[0], t.shape[1 + k], -1))
        tails.append(float((s[:, r:] ** 2).sum()) / total)
    return tails


def test_registered_layout_and_config():
    assert sl.get("tucker") is Tucker
    layer = Tucker(64, 48, 2, rank=5, seed=0)
    assert layer.out_modes == (3, 4, 4) and layer.in_modes == (4, 4, 4) and layer.ranks == (5, 5, 5)
    assert tuple(layer.core.shape) == (2, 5, 5, 5)
    assert layer.num_params == 2 * (125 + 5 * (12 + 16 + 16))
    assert Tucker(16, 16, num_cores=2, rank=[3, 16], seed=0).ranks == (3, 16)
    clone = Tucker(**layer.config())
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.to_dense(), layer.to_dense())


def test_from_kronecker_is_multilinear_rank_one():
    a, b = random_factors(3, (4, 3), (2, 5), seed=1)
    layer = Tucker.from_kronecker(a, b)
    assert layer.ranks == (1, 1) and layer.out_modes == (4, 2) and layer.in_modes == (3, 5)
    assert rel(layer.to_dense(), kron_dense(a, b)) < EXACT
    assert layer.flops(5) <= sl.Kronecker.from_kronecker(a, b).flops(5) + 5 * 3 * 1 * 8


def test_two_modes_give_the_truncated_svd_of_the_rearranged_matrix():
    w = decaying_matrix(2, 12, 20, decay=0.8, seed=2)
    for r in (1, 2, 5, 9):
        layer = Tucker.from_dense(w, rank=r, out_modes=(3, 4), in_modes=(4, 5))
        optimum = sl.Kronecker.from_dense(w, factor_shapes=((3, 4), (4, 5)), rank=r).relative_error(w)
        assert abs(layer.relative_error(w) - optimum) < EXACT


def test_hooi_within_the_hosvd_bounds():
    """Every unfolding of a multilinear-rank-R tensor has rank <= R_k, so the error is at least
    each unfolding's Eckart–Young tail; HOOI starts at the HOSVD, whose squared error is at most
    the sum of those tails, and never increases it."""
    w = decaying_matrix(2, 24, 24, decay=0.85, seed=3)
    kw = {"out_modes": (2, 3, 4), "in_modes": (4, 3, 2)}
    for r in (1, 2, 4, 6):
        layer = Tucker.from_dense(w, rank=r, **kw)
        tails = _unfolding_tails(w, kw["out_modes"], kw["in_modes"], layer.ranks)
        err = layer.relative_error(w)
        assert max(tails) ** 0.5 - 1e-12 <= err <= sum(tails) ** 0.5 + 1e-12


def test_recovers_a_low_multilinear_rank_weight():
    g = generator(4)
    om, im, ranks = (2, 3, 4), (3, 2, 2), (2, 3, 2)
    truth = Tucker._from_parts(torch.randn(2, *ranks, generator=g, dtype=F64),
                               [torch.randn(2, m, n, r, generator=g, dtype=F64) for m, n, r in zip(om, im, ranks)])
    w = truth.to_dense().detach()
    noisy = w + 1e-9 * torch.randn(w.shape, generator=g, dtype=F64)
    layer = Tucker.from_dense(noisy, tolerance=1e-6, out_modes=om, in_modes=im)
    assert layer.ranks == ranks and layer.relative_error(w) < 1e-8


@pytest.mark.parametrize("tol", [0.5, 0.2, 0.05, 1e-3])
def test_tolerance_is_met_with_per_mode_ranks_no_larger_than_needed(tol):
    w = decaying_matrix(3, 24, 24, decay=0.85, seed=5)
    kw = {"out_modes": (2, 3, 4), "in_modes": (4, 3, 2)}
    layer = Tucker.from_dense(w, tolerance=tol, **kw)
    assert layer.relative_error(w) <= tol
    budget = tol ** 2 / 3
    tails = _unfolding_tails(w, kw["out_modes"], kw["in_modes"], layer.ranks)
    fewer = _unfolding_tails(w, kw["out_modes"], kw["in_modes"], [max(r - 1, 0) for r in layer.ranks])
    for k, r in enumerate(layer.ranks):
        assert tails[k] <= budget * (1 + 1e-10)
        assert r == 1 or fewer[k] > budget


def test_params_share_uses_the_budget_up_to_the_last_rank():
    """No mode's rank can grow by one within the budget."""
    w = decaying_matrix(2, 24, 24, decay=0.85, seed=6)
    kw = {"out_modes": (2, 3, 4), "in_modes": (4, 3, 2)}
    dims = (8, 9, 8)

    def params(ranks):
        return 2 * (math.prod(ranks) + sum(p * r for p, r in zip(dims, ranks)))

    for share in (0.05, 0.2, 0.6):
        layer = Tucker.from_dense(w, params_share=share, **kw)
        assert layer.num_params == params(layer.ranks) <= share * w.numel()
        for k in range(3):
            grown = list(layer.ranks)
            grown[k] += 1
            assert grown[k] > dims[k] or params(grown) > share * w.numel()


def test_split_modes_is_the_order_2d_layout():
    w = torch.randn(2, 24, 12, generator=generator(14), dtype=F64)
    split = Tucker.from_dense(w, num_cores=2, split_modes=True)
    assert split.out_modes == (4, 6, 1, 1) and split.in_modes == (1, 1, 4, 3)
    assert rel(split.to_dense(), w) < EXACT  # full multilinear rank: exact
    explicit = Tucker.from_dense(w, rank=3, out_modes=(4, 6, 1, 1), in_modes=(1, 1, 4, 3))
    assert torch.equal(Tucker.from_dense(w, rank=3, num_cores=2, split_modes=True).to_dense(), explicit.to_dense())
    assert Tucker(24, 12, num_cores=2, split_modes=True, rank=2, seed=0).ranks == (2, 2, 2, 2)
    with pytest.raises(TypeError, match="split_modes must be a bool"):
        Tucker(24, 12, split_modes="yes")


@pytest.mark.parametrize("batch", [1, 64, 4096])
def test_flops_is_what_the_forward_does(batch):
    w = decaying_matrix(2, 24, 24, decay=0.8, seed=7)
    for options in ({"rank": 2}, {"rank": 6}, {}):
        assert_flops_are_the_forwards(Tucker.from_dense(w, num_cores=3, **options), batch, tol=EXACT)


def test_costlier_than_dense_warns():
    w = decaying_matrix(1, 24, 24, decay=0.8, seed=9)
    assert_warns_only_when_costlier(lambda: Tucker.from_dense(w, num_cores=3),  # full multilinear rank
                                    lambda: Tucker.from_dense(w, rank=2, num_cores=3),
                                    r"tucker layer with modes .* [0-9.]+x the 576 of a dense layer", 576)


def test_frobenius_norm_and_kronecker_inner_product_without_materialising():
    layer = Tucker(24, 24, 2, rank=3, num_cores=3, seed=10, dtype=F64)
    assert float(layer._frobenius_sq().sum()) == pytest.approx(float((layer.to_dense() ** 2).sum()), rel=1e-12)
    two = Tucker(20, 12, 2, rank=3, out_modes=(3, 4), in_modes=(4, 5), seed=11, dtype=F64)
    a, b = random_factors(2, (3, 4), (4, 5), seed=12)
    direct = (kron_dense(a, b) * two.to_dense()).sum(dim=(1, 2))
    assert rel(two._inner_kronecker(a, b), direct) < 1e-12


def test_bad_inputs():
    w = torch.randn(12, 10, dtype=F64)
    with pytest.raises(ValueError, match="rank 16 exceeds the largest possible rank"):
        Tucker.from_dense(w, rank=16)
    with pytest.raises(ValueError, match="rank 17 of mode 0 exceeds its largest useful rank 16"):
        Tucker(16, 16, num_cores=2, rank=[17, 2])
    with pytest.raises(ValueError, match="one per mode"):
        Tucker(16, 16, num_cores=2, rank=[2, 2, 2])
    with pytest.raises(ValueError, match="give at most one of rank, tolerance, params_share"):
        Tucker.from_dense(w, rank=2, params_share=0.5)
    a, b = random_factors(1, (4, 3), (2, 5), seed=13)
    with pytest.raises(TypeError):
        Tucker.from_kronecker(a, b, tolerance=0.1)
