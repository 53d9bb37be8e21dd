"""The ``cp`` kind: layouts, exactness, ALS against SVD bounds, budgets, costs, warnings."""

from __future__ import annotations


import pytest
import torch

import structlayers as sl
from structlayers.kinds.cp import CP, max_cp_rank
from structlayers.linalg import kron_dense
from structlayers.linalg.decompose import mode_tensor

from ..helpers import (assert_flops_are_the_forwards, assert_warns_only_when_costlier, decaying_matrix,
                       generator, random_factors, rel)

EXACT = 1e-10
F64 = torch.float64


def _cp_weight(folds, out_modes, in_modes, rank, seed):
    """A weight of CP rank <= ``rank`` in the given layout."""
    g = generator(seed)
    factors = [torch.randn(folds, m, n, rank, generator=g, dtype=F64) for m, n in zip(out_modes, in_modes)]
    return CP._from_factors(factors).to_dense().detach()


def _unfolding_optimum(w, out_modes, in_modes, rank):
    """max over modes of the Eckart–Young error of that mode's unfolding at ``rank``: a CP of
    rank R has every unfolding of rank <= R, so no CP does better."""
    t = mode_tensor(w, out_modes, in_modes)
    total = float((t ** 2).sum())
    best = 0.0
    for k in range(t.dim() - 1):
        s = torch.linalg.svdvals(t.movedim(1 + k, 1).reshape(t.shape[0], t.shape[1 + k], -1))
        best = max(best, float((s[:, rank:] ** 2).sum() / total) ** 0.5)
    return best


def test_registered_layout_and_config():
    assert sl.get("cp") is CP
    layer = CP(64, 48, 2, rank=5, seed=0)
    assert layer.out_modes == (3, 4, 4) and layer.in_modes == (4, 4, 4) and layer.rank == 5
    assert [tuple(u.shape) for u in layer.factors] == [(2, 3, 4, 5), (2, 4, 4, 5), (2, 4, 4, 5)]
    assert layer.num_params == 2 * 5 * (12 + 16 + 16)
    assert max_cp_rank((3, 4, 4), (4, 4, 4)) == 12 * 16
    clone = CP(**layer.config())
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.to_dense(), layer.to_dense())


def test_from_kronecker_is_rank_one_with_the_factors():
    a, b = random_factors(3, (4, 3), (2, 5), seed=1)
    layer = CP.from_kronecker(a, b)
    assert layer.rank == 1 and layer.out_modes == (4, 2) and layer.in_modes == (3, 5)
    assert torch.equal(layer.factors[0].detach()[..., 0], a) and torch.equal(layer.factors[1].detach()[..., 0], b)
    assert rel(layer.to_dense(), kron_dense(a, b)) < EXACT
    # the searched order applies A and B as the kronecker kind does
    assert layer.flops(5) == sl.Kronecker.from_kronecker(a, b).flops(5)


def test_two_modes_reach_the_nearest_kronecker_sum():
    """With d = 2 the CP of the rearranged matrix is its truncated SVD: the error at rank R is
    the Eckart–Young optimum (Van Loan–Pitsianis), to 1e-10."""
    w = decaying_matrix(2, 12, 20, decay=0.8, seed=2)
    for r in (1, 2, 5, 9):
        layer = CP.from_dense(w, rank=r, out_modes=(3, 4), in_modes=(4, 5))
        optimum = sl.Kronecker.from_dense(w, factor_shapes=((3, 4), (4, 5)), rank=r).relative_error(w)
        assert abs(layer.relative_error(w) - optimum) < EXACT


def test_als_recovers_a_low_cp_rank_weight_and_respects_the_svd_bound():
    kw = {"out_modes": (2, 3, 4), "in_modes": (3, 2, 2)}
    w = _cp_weight(2, kw["out_modes"], kw["in_modes"], 3, seed=3)
    layer = CP.from_dense(w, rank=3, iterations=200, **kw)
    assert layer.relative_error(w) < 1e-6
    noisy = decaying_matrix(2, 24, 12, decay=0.8, seed=4)
    for r in (1, 2, 4, 8):
        err = CP.from_dense(noisy, rank=r, **kw).relative_error(noisy)
        assert _unfolding_optimum(noisy, kw["out_modes"], kw["in_modes"], r) - 1e-12 <= err < 1.0


def test_split_modes_is_the_order_2d_layout():
    w = torch.randn(1, 6, 4, generator=generator(12), dtype=F64)
    layer = CP.from_dense(w, num_cores=2, split_modes=True)  # the exact construction
    assert layer.out_modes == (2, 3, 1, 1) and layer.in_modes == (1, 1, 2, 2)
    assert layer.rank == 2 * 2 * 2 and rel(layer.to_dense(), w) < EXACT  # prod(p) / max(p), p = (2, 3, 2, 2)


def test_als_is_reproducible():
    w = decaying_matrix(1, 24, 12, decay=0.8, seed=5)
    one = CP.from_dense(w, rank=20, num_cores=3, seed=1)  # above the mode sizes: random start columns
    two = CP.from_dense(w, rank=20, num_cores=3, seed=1)
    assert torch.equal(one.to_dense(), two.to_dense())


def test_budgets():
    w = decaying_matrix(2, 24, 24, decay=0.8, seed=6)
    kw = {"out_modes": (2, 3, 4), "in_modes": (4, 3, 2)}
    for tol in (0.5, 0.2, 0.05):
        layer = CP.from_dense(w, tolerance=tol, **kw)
        assert layer.relative_error(w) <= tol
        # the search bisects between the last failing and the first passing power of two
        below = layer.rank - 1
        assert below == 0 or CP.from_dense(w, rank=below, **kw).relative_error(w) > tol
    exact = CP.from_dense(w, tolerance=0.0, **kw)
    assert exact.rank == max_cp_rank(kw["out_modes"], kw["in_modes"]) and exact.relative_error(w) < EXACT
    per_rank = 2 * (8 + 9 + 8)
    for share in (0.1, 0.3):
        layer = CP.from_dense(w, params_share=share, **kw)
        assert layer.num_params == per_rank * layer.rank <= share * w.numel() < per_rank * (layer.rank + 1)


@pytest.mark.parametrize("batch", [1, 64, 4096])
def test_flops_is_what_the_forward_does(batch):
    w = decaying_matrix(2, 24, 24, decay=0.8, seed=7)
    for options in ({"rank": 2}, {"rank": 30}, {}):
        assert_flops_are_the_forwards(CP.from_dense(w, num_cores=3, **options), batch, tol=EXACT)


def test_costlier_than_dense_warns():
    w = decaying_matrix(1, 24, 24, decay=0.8, seed=9)
    assert_warns_only_when_costlier(lambda: CP.from_dense(w, num_cores=3),  # the exact construction: rank 64 of 576
                                    lambda: CP.from_dense(w, rank=2, num_cores=3),
                                    r"cp layer with modes .* multiply-adds per sample and fold, [0-9.]+x the 576 of a dense layer", 576)


def test_frobenius_norm_without_materialising():
    layer = CP(24, 24, 2, rank=4, num_cores=3, seed=10, dtype=F64)
    assert float(layer._frobenius_sq().sum()) == pytest.approx(float((layer.to_dense() ** 2).sum()), rel=1e-12)


def test_bad_inputs():
    w = torch.randn(12, 10, dtype=F64)
    with pytest.raises(ValueError, match="rank 9 exceeds the largest possible rank 8"):
        CP.from_dense(w, rank=9)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        CP(10, 12, rank=0)
    with pytest.raises(ValueError, match="give at most one of rank, tolerance, params_share"):
        CP.from_dense(w, rank=2, tolerance=0.1)
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        CP.from_dense(w, rank=2, iterations=0)
    a, b = random_factors(1, (4, 3), (2, 5), seed=11)
    with pytest.raises(TypeError):
        CP.from_kronecker(a, b, rank=2)
