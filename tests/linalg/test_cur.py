"""CUR with a projection core (structlayers.linalg.cur): exactness, the core, near-optimality.

Fixed seeds throughout, so the randomized strategies are deterministic here; each bound
is stated next to its test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from structlayers.linalg import PIVOT_STRATEGIES, kron_dense
from structlayers.linalg.cur import cur_dense, cur_error_sq, cur_kronecker_joint, num_pivots

from ..helpers import decaying_factors, decaying_matrix, generator, random_factors, rel

EXACT = 1e-10
F64 = torch.float64
DETERMINISTIC = ("deim", "qr")


def projection_reference(w: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """C (C⁺ W R⁺) R = P_C W P_R per fold, by numpy pseudo-inverses (independent of the library)."""
    out = []
    for f in range(w.shape[0]):
        wf = w[f].numpy()
        c, r = wf[:, cols[f].numpy()], wf[rows[f].numpy(), :]
        out.append(c @ (np.linalg.pinv(c) @ wf @ np.linalg.pinv(r)) @ r)
    return np.stack(out)


@pytest.mark.parametrize("strategy", PIVOT_STRATEGIES)
@pytest.mark.parametrize("m,n", [(12, 9), (7, 10)])
def test_full_rank_cur_is_exact(strategy, m, n):
    w = torch.randn(2, m, n, generator=generator(1), dtype=F64)
    factors = cur_dense(w, min(m, n), strategy, generator(2))
    assert rel(factors.left @ factors.right, w) < EXACT
    assert float(cur_error_sq(w, factors).max()) < EXACT ** 2 * float((w ** 2).sum())


@pytest.mark.parametrize("strategy", PIVOT_STRATEGIES)
def test_cur_of_a_rank_r_matrix_at_rank_r_is_exact(strategy):
    g = generator(3)
    w = torch.randn(2, 15, 4, generator=g, dtype=F64) @ torch.randn(2, 4, 11, generator=g, dtype=F64)
    factors = cur_dense(w, 4, strategy, generator(4), oversampling=2.0)
    assert factors.left.shape == (2, 15, 4) and factors.right.shape == (2, 4, 11)
    assert rel(factors.left @ factors.right, w) < EXACT


@pytest.mark.parametrize("strategy", PIVOT_STRATEGIES)
def test_the_core_is_the_projection_onto_the_chosen_columns_and_rows(strategy):
    """oversampling=1: exactly C (C⁺ W R⁺) R for the pivots it reports (not pinv(W[I, J]))."""
    w = decaying_matrix(2, 14, 10, decay=0.8, seed=5)
    factors = cur_dense(w, 4, strategy, generator(6))
    assert factors.cols.shape == factors.rows.shape == (2, 4)
    assert all(len(set(c.tolist())) == 4 for c in (*factors.cols, *factors.rows))  # distinct pivots
    expected = projection_reference(w, factors.cols, factors.rows)
    assert np.allclose((factors.left @ factors.right).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy,bound", [("qr", 1.3), ("deim", 1.3), ("uniform", 1.5), ("l2", 1.5),
                                            ("leverage", 1.5)])
def test_near_the_svd_optimum_on_a_decaying_spectrum(strategy, bound):
    """oversampling=2 (twice as many pivots as the rank, core truncated back to it): on singular
    values 0.9^i, 3 folds of 80 x 60, ranks 5..30 and seeds 0..2, every fold's error is within
    ``bound`` times the Eckart–Young optimum (observed: deterministic <= 1.13, random <= 1.36);
    with oversampling=1 it may be several times the optimum."""
    w = decaying_matrix(3, 80, 60, decay=0.9, seed=1)
    s = torch.linalg.svdvals(w)
    for k in (5, 10, 20, 30):
        optimum_sq = (s[:, k:] ** 2).sum(dim=1)
        for seed in range(3):
            factors = cur_dense(w, k, strategy, generator(seed), oversampling=2.0)
            ratio = (cur_error_sq(w, factors) / optimum_sq).sqrt()
            assert float(ratio.min()) >= 1 - 1e-12  # nothing beats the SVD
            assert float(ratio.max()) <= bound, (k, seed, ratio)


@pytest.mark.parametrize("strategy", PIVOT_STRATEGIES)
def test_joint_kronecker_cur_never_forms_the_product_and_is_its_projection(strategy):
    a, b = decaying_factors(2, 5, decay=0.7, seed=7)
    w = kron_dense(a, b)
    factors = cur_kronecker_joint(a, b, 6, strategy, generator(8))
    expected = projection_reference(w, factors.cols, factors.rows)
    assert np.allclose((factors.left @ factors.right).numpy(), expected, rtol=1e-10, atol=1e-12)
    full = cur_kronecker_joint(a, b, 25, strategy, generator(9))
    assert rel(full.left @ full.right, w) < EXACT


def test_joint_kronecker_cur_near_the_optimum():
    """Deterministic strategies with oversampling=2 on 0.7^i ⊗ 0.7^i spectra: within 1.3x of the
    optimum of A ⊗ B at ranks 4..16."""
    a, b = decaying_factors(2, 8, decay=0.7, seed=10)
    s = torch.linalg.svdvals(kron_dense(a, b))
    for strategy in DETERMINISTIC:
        for k in (4, 8, 16):
            factors = cur_kronecker_joint(a, b, k, strategy, generator(0), oversampling=2.0)
            ratio = (cur_error_sq(kron_dense(a, b), factors) / (s[:, k:] ** 2).sum(dim=1)).sqrt()
            assert 1 - 1e-12 <= float(ratio.min()) and float(ratio.max()) <= 1.3, (strategy, k, ratio)


def test_complex_and_float32_inputs():
    a, b = random_factors(2, (6, 5), (5, 6), seed=11, dtype=torch.complex128)
    w = kron_dense(a, b)
    factors = cur_dense(w, 30, "qr", generator(12))
    assert factors.left.dtype == torch.complex128 and rel(factors.left @ factors.right, w) < EXACT
    w32 = decaying_matrix(1, 20, 16, seed=13, dtype=torch.float32)
    factors = cur_dense(w32, 16, "qr", generator(14))
    assert factors.left.dtype == torch.float32 and rel(factors.left @ factors.right, w32) < 1e-5


def test_num_pivots():
    assert num_pivots(5, 1.0, 100) == 5
    assert num_pivots(5, 1.5, 100) == math.ceil(7.5)
    assert num_pivots(40, 2.0, 60) == 60  # never more than the largest possible rank
    with pytest.raises(ValueError, match="oversampling must be a finite number >= 1"):
        num_pivots(5, 0.5, 100)
