"""kronecker: the exact fast path, and nearest Kronecker sums from dense weights."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import structlayers as sl
from structlayers.linalg import kron_dense

from ..helpers import generator, random_factors, rel


def test_from_kronecker_stores_the_factors_and_matches_torch_kron():
    a, b = random_factors(3, (4, 7), (5, 2), seed=1)
    layer = sl.Kronecker.from_kronecker(a, b)
    assert layer.rank == 1 and layer.factor_shapes == ((4, 7), (5, 2))
    assert torch.equal(layer.a[:, 0], a) and torch.equal(layer.b[:, 0], b)
    for f in range(3):
        assert rel(layer.to_dense()[f], torch.kron(a[f], b[f])) < 1e-14


def test_from_dense_recovers_a_kronecker_product_with_one_term():
    a, b = random_factors(2, (3, 4), (5, 6), seed=2)
    w = kron_dense(a, b)
    layer = sl.Kronecker.from_dense(w, factor_shapes=((3, 4), (5, 6)), rank=1)
    assert layer.relative_error(w) < 1e-12


def test_nearest_kronecker_sum_error_equals_rearranged_spectrum_tail():
    """Van Loan–Pitsianis: the error of the best t-term sum is the tail of the rearranged SVD."""
    w = torch.randn(2, 12, 20, generator=generator(3), dtype=torch.float64)
    shapes = ((3, 4), (4, 5))
    rearranged = w.reshape(2, 3, 4, 4, 5).permute(0, 1, 3, 2, 4).reshape(2, 12, 20)
    s = torch.linalg.svdvals(rearranged)
    errors = []
    for terms in range(1, 13):
        layer = sl.Kronecker.from_dense(w, factor_shapes=shapes, rank=terms)
        expected = float(((s[:, terms:] ** 2).sum() / (w**2).sum()).sqrt())
        assert layer.relative_error(w) == pytest.approx(expected, rel=1e-9, abs=1e-13)
        errors.append(layer.relative_error(w))
    assert all(e2 <= e1 + 1e-12 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12


def test_tolerance_and_params_share():
    w = torch.randn(2, 12, 20, generator=generator(4), dtype=torch.float64)
    layer = sl.Kronecker.from_dense(w, tolerance=0.5)
    assert layer.relative_error(w) <= 0.5
    smaller = sl.Kronecker.from_dense(w, rank=layer.rank - 1) if layer.rank > 1 else None
    assert smaller is None or smaller.relative_error(w) > 0.5
    layer = sl.Kronecker.from_dense(w, params_share=0.3)
    assert layer.num_params <= 0.3 * w.numel()


def test_rectangular_factors_forward_ordering_is_exact():
    """Both application orders (A side first or B side first) give the same product."""
    for shape_a, shape_b in [((9, 2), (2, 9)), ((2, 9), (9, 2)), ((1, 8), (8, 1))]:
        a, b = random_factors(1, shape_a, shape_b, seed=5)
        x = torch.randn(1, 6, shape_a[1] * shape_b[1], generator=generator(6), dtype=torch.float64)
        layer = sl.Kronecker.from_kronecker(a, b)
        assert rel(layer(x), x @ kron_dense(a, b).transpose(1, 2)) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape_a,shape_b", [((3, 3), (3, 3)), ((2, 3), (4, 5)), ((7, 2), (2, 7)), ((1, 6), (7, 2))])
def test_several_terms_match_the_materialised_sum_in_either_order(shape_a, shape_b, dtype):
    """r terms in two GEMMs (B side first for the square and (7, 2) ⊗ (2, 7) shapes, A side
    first for the others): equal to x @ (Σ_t A_t ⊗ B_t)ᵀ, with the multiply-adds flops() states."""
    f, r, n = 2, 4, 5
    layer = sl.Kronecker(shape_a[1] * shape_b[1], shape_a[0] * shape_b[0], f, factor_shapes=(shape_a, shape_b),
                         rank=r, seed=7, dtype=dtype)
    x = torch.randn(f, n, layer.in_features, generator=generator(8), dtype=torch.float64).to(dtype)
    w = sum(kron_dense(layer.a[:, t], layer.b[:, t]) for t in range(r))
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            y = layer(x)
    assert rel(y, x @ w.transpose(1, 2)) < 1e-13
    assert counter.get_total_flops() == 2 * layer.flops(n)  # torch counts 2 flops per multiply-add, any dtype
