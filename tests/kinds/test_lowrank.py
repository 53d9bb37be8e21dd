"""lowrank: Eckart–Young optimality from dense and Kronecker input, budgets, randomized SVD."""

from __future__ import annotations

import pytest
import torch

import structlayers as sl
from structlayers.linalg import kron_dense

from ..helpers import decaying_factors, decaying_matrix, random_factors, svd_optimal_error


@pytest.mark.parametrize("rank", [1, 3, 7, 15])
def test_from_dense_matches_numpy_svd_optimum(rank):
    w = decaying_matrix(3, 30, 20, decay=0.85, seed=1)
    layer = sl.LowRank.from_dense(w, rank=rank)
    assert layer.rank == rank
    assert layer.relative_error(w) == pytest.approx(svd_optimal_error(w, rank), rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("rank", [1, 4, 9, 20, 36])
def test_from_kronecker_is_the_optimum_of_the_product(rank):
    a, b = random_factors(2, (6, 7), (8, 6), seed=2)
    layer = sl.LowRank.from_kronecker(a, b, rank=rank)
    w = kron_dense(a, b)
    optimum = svd_optimal_error(w, rank)
    assert layer.relative_error(w) == pytest.approx(optimum, rel=1e-9, abs=1e-12)
    assert sl.optimal_relative_error_kronecker(a, b, rank) == pytest.approx(optimum, rel=1e-9, abs=1e-12)


def test_error_is_non_increasing_in_rank():
    a, b = decaying_factors(2, 8, decay=0.7, seed=3)
    w = kron_dense(a, b)
    errs_dense = [sl.LowRank.from_dense(w, rank=r).relative_error(w) for r in range(1, 65)]
    errs_kron = [sl.LowRank.from_kronecker(a, b, rank=r).relative_error_kronecker(a, b) for r in range(1, 65)]
    for errs in (errs_dense, errs_kron):
        assert all(e2 <= e1 + 1e-12 for e1, e2 in zip(errs, errs[1:]))
    assert errs_dense[-1] < 1e-10


def test_kronecker_structure_is_best_split_and_cheaper():
    a, b = decaying_factors(2, 16, decay=0.6, seed=4)
    w = kron_dense(a, b)
    flat = sl.LowRank.from_kronecker(a, b, rank=16)
    kron = sl.LowRank.from_kronecker(a, b, rank=16, structure="kronecker")
    assert kron.structure == "kronecker" and kron.rank == 16
    # trunc(A, ka) ⊗ trunc(B, kb) is a rank-16 approximation: never better than the optimum.
    assert kron.relative_error(w) >= flat.relative_error(w) - 1e-12
    # and its split is the best over every factorisation of 16 that fits.
    for ka, kb in [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]:
        other = sl.LowRank.from_kronecker(a, b, factor_ranks=(ka, kb))
        assert kron.relative_error(w) <= other.relative_error(w) + 1e-12
    assert kron.flops(64) < flat.flops(64) / 3


def test_tolerance_picks_the_smallest_sufficient_rank():
    w = decaying_matrix(2, 40, 30, decay=0.8, seed=5)
    a, b = decaying_factors(2, 8, decay=0.75, seed=6)
    wk = kron_dense(a, b)
    for tol in (0.3, 0.1, 0.01):
        layer = sl.LowRank.from_dense(w, tolerance=tol)
        assert layer.relative_error(w) <= tol
        assert svd_optimal_error(w, layer.rank - 1) > tol
        layer = sl.LowRank.from_kronecker(a, b, tolerance=tol)
        assert layer.relative_error(wk) <= tol
        assert svd_optimal_error(wk, layer.rank - 1) > tol
        structured = sl.LowRank.from_kronecker(a, b, tolerance=tol, structure="kronecker")
        assert structured.relative_error(wk) <= tol


def test_params_share_fits_the_budget():
    w = decaying_matrix(2, 40, 30, seed=7)
    for share in (0.1, 0.25, 0.5):
        layer = sl.LowRank.from_dense(w, params_share=share)
        assert layer.num_params <= share * w.numel()
        assert (layer.rank + 1) * 2 * 70 > share * w.numel()  # one more rank would not fit


def test_randomized_svd_is_near_optimal_for_decaying_spectra():
    """Fixed seeds; with 2 power iterations the error stays within 2% of optimal."""
    w = decaying_matrix(1, 600, 500, decay=0.98, dtype=torch.float64, seed=8)
    optimum = svd_optimal_error(w, 32)
    for seed in range(5):
        layer = sl.LowRank.from_dense(w, rank=32, method="randomized", seed=seed)
        assert optimum <= layer.relative_error(w) <= 1.02 * optimum
    tol_layer = sl.LowRank.from_dense(w, tolerance=0.2, method="randomized", seed=0)
    assert tol_layer.relative_error(w) <= 0.2


def test_square_keeps_a_square_and_squared_circuits_nonnegative():
    """A ⊗ A approximated as A~ ⊗ A~: (w⊗w)^T W~ (h⊗h) = (w^T A~ h)^2 >= 0 for every w, h."""
    a = torch.randn(1, 10, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    layer = sl.LowRank.from_kronecker(a, a, rank=9, square=True)
    assert layer.tied and layer.factor_ranks == (3, 3)
    fa, fb = layer.factors()
    assert torch.equal(fb, fa.conj())
    g = torch.Generator().manual_seed(10)
    w, h = torch.randn(2000, 10, generator=g, dtype=torch.float64), torch.rand(2000, 10, generator=g, dtype=torch.float64)
    ww = (w[:, :, None] * w[:, None, :]).reshape(1, 2000, 100)
    hh = (h[:, :, None] * h[:, None, :]).reshape(1, 2000, 100)
    values = (ww * layer(hh)).sum(-1)
    assert float(values.min()) >= 0.0
    # Partition-function analogue: Z = (w⊗w)^T W~ vec(G) for a PSD Gram matrix G is >= 0.
    feats = torch.rand(50, 10, generator=g, dtype=torch.float64)
    gram = (feats.T @ feats).reshape(1, 1, 100)
    z = (ww * layer(gram.expand(1, 2000, 100))).sum(-1)
    assert float(z.min()) >= 0.0
    # The unconstrained optimum of the same rank is not a square and goes negative here.
    plain = sl.LowRank.from_kronecker(a, a, rank=9)
    assert float((ww * plain(hh)).sum(-1).min()) < 0.0


def test_square_complex_conjugate_pair():
    a, _ = random_factors(1, (5, 5), (5, 5), dtype=torch.complex128, seed=11)
    layer = sl.LowRank.from_kronecker(a.conj(), a, rank=16, square=True)
    fa, fb = layer.factors()
    assert torch.allclose(fb, fa.conj())
    u = torch.randn(1, 300, 5, dtype=torch.complex128, generator=torch.Generator().manual_seed(12))
    # (conj(A~) ⊗ A~)(conj(u) ⊗ u) = conj(A~u) ⊗ (A~u): the "diagonal" entries are |.|^2 >= 0 and real.
    uu = (u.conj()[..., :, None] * u[..., None, :]).reshape(1, 300, 25)
    out = layer(uu).reshape(1, 300, 5, 5).diagonal(dim1=-2, dim2=-1)
    assert float(out.imag.abs().max()) < 1e-10 and float(out.real.min()) >= -1e-12
