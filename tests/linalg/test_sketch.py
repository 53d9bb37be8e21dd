"""Sketch maths (structlayers.linalg.sketch): the sketches, their variance, the fits, the
expected errors in closed form.

Statistical tests use fixed seeds, so they are deterministic; each states its bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from structlayers.linalg.sketch import (
    SKETCHES,
    draw_sketches,
    expected_relative_error,
    fit_sketches,
    half_variance,
    low_rank_for_tolerance,
)

from ..helpers import decaying_matrix, generator, rel


def test_orthogonal_sketch_below_full_size_has_orthonormal_scaled_rows():
    u = draw_sketches(2, 3, 4, 10, "orthogonal", generator(7))
    assert u.shape == (2, 3, 4, 10)
    assert torch.allclose(u @ u.transpose(-1, -2), 10 / 4 * torch.eye(4, dtype=torch.float64), atol=1e-13)


def test_sparse_sketch_has_one_signed_entry_per_column():
    u = draw_sketches(2, 2, 5, 9, "sparse", generator(26))
    assert torch.equal((u != 0).sum(2), torch.ones(2, 2, 9, dtype=torch.long))
    assert set(u.unique().tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("sketch", SKETCHES)
def test_sketches_are_isotropic_and_have_the_stated_variance(sketch):
    """E[U^T U] = I, and E||U^T U W - W||^2 / ||W||^2 = half_variance(n, k) for any W. Over
    N = 4000 independent draws (k=3, n=7) the mean of U^T U is within 6 standard errors of I
    entrywise, and the mean squared error within 5 standard errors (both estimated from the
    draws) of the formula; a wrong scale (e.g. 1/k instead of 1/sqrt(k)) misses by far more."""
    n, k, draws = 7, 3, 4000
    u = draw_sketches(draws, 1, k, n, sketch, generator(40))[:, 0]  # (N, k, n)
    utu = u.transpose(1, 2) @ u
    mean, se = utu.mean(0), utu.std(0) / math.sqrt(draws)
    assert bool(((mean - torch.eye(n, dtype=torch.float64)).abs() <= 6 * se + 1e-12).all())
    w = decaying_matrix(1, n, 5, decay=0.7, seed=41)[0]
    per_draw = ((utu @ w - w) ** 2).sum((1, 2)) / (w ** 2).sum()
    se_err = float(per_draw.std()) / math.sqrt(draws)
    assert abs(float(per_draw.mean()) - half_variance(n, k, sketch)) <= 5 * se_err + 1e-12


def test_expected_error_closed_forms():
    # unbiased gaussian: (c(out) + c(in)) / (4L) with c(n) = (n + 1) / k
    assert expected_relative_error(40, 30, num_terms=2, low_rank=3) == pytest.approx(
        math.sqrt((31 / 3 + 41 / 3) / 8), rel=1e-15)
    assert expected_relative_error(40, 30, num_terms=1, low_rank=3, sketch="sign") == pytest.approx(
        math.sqrt((29 / 3 + 39 / 3) / 4), rel=1e-15)
    # orthogonal at k >= max(in, out) and projection at Lk >= min(in, out): exact
    assert expected_relative_error(40, 30, num_terms=1, low_rank=40, sketch="orthogonal") == 0.0
    assert expected_relative_error(8, 10, num_terms=2, low_rank=2, fit="projection") == pytest.approx(
        math.sqrt((1 - 4 / 10) * (1 - 4 / 8)), rel=1e-15)
    assert expected_relative_error(8, 10, num_terms=2, low_rank=4, fit="projection") == 0.0


@pytest.mark.parametrize("sketch,fit", [("gaussian", "unbiased"), ("orthogonal", "unbiased"),
                                        ("sign", "projection"), ("orthogonal", "projection")])
def test_low_rank_for_tolerance_is_the_smallest_sufficient_size(sketch, fit):
    for tol in (0.95, 0.7, 0.3):
        k = low_rank_for_tolerance(30, 20, 2, tol, sketch, fit)
        assert expected_relative_error(30, 20, num_terms=2, low_rank=k, sketch=sketch, fit=fit) <= tol * (1 + 1e-12)
        if k > 1:
            assert expected_relative_error(30, 20, num_terms=2, low_rank=k - 1, sketch=sketch, fit=fit) > tol
    with pytest.raises(ValueError, match="tolerance=0 is unreachable with random 'gaussian' sketches"):
        low_rank_for_tolerance(30, 20, 2, 0.0, "gaussian", "unbiased")


@pytest.mark.parametrize("fit", ["unbiased", "projection"])
def test_fit_sketches_against_its_definition(fit):
    """unbiased: S1 = U1 W, S2^T rows = (W U2^T)^T; projection: the residual of the fitted W~
    is (I - P) W (I - Q) (numpy reference)."""
    w = decaying_matrix(1, 9, 7, decay=0.9, seed=42)
    num_terms, k = 2, 2
    g = generator(43)
    u1 = draw_sketches(1, num_terms, k, 9, "gaussian", g).reshape(1, -1, 9)
    u2 = draw_sketches(1, num_terms, k, 7, "gaussian", g).reshape(1, -1, 7)
    s1, s2t = fit_sketches(lambda m: m @ w, lambda n: n @ w.transpose(1, 2), u1, u2, num_terms, fit)
    approx = (u1.transpose(1, 2) @ s1 + s2t.transpose(1, 2) @ u2) / (2 * num_terms)
    if fit == "unbiased":
        assert rel(s1, u1 @ w) < 1e-15 and rel(s2t, u2 @ w.transpose(1, 2)) < 1e-15
        return
    a1, a2, wn = u1[0].numpy(), u2[0].numpy(), w[0].numpy()
    p = a1.T @ np.linalg.pinv(a1.T)
    q = np.linalg.pinv(a2) @ a2
    residual = (np.eye(9) - p) @ wn @ (np.eye(7) - q)
    assert np.allclose((w - approx)[0].numpy(), residual, rtol=1e-10, atol=1e-12)
