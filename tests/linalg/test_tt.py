"""Tensor-train maths (structlayers.linalg.tt): layouts, bond limits, TT-SVD, contraction, costs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from structlayers.linalg import kron_dense
from structlayers.linalg.tt import (
    balanced_modes,
    bond_limits,
    chain_dense,
    default_num_cores,
    interleave,
    mpo_frobenius_sq,
    prime_factor_count,
    resolve_modes,
    sweep_costs,
    tt_svd,
    unflatten_cores,
)

from ..helpers import generator, random_factors, rel

EXACT = 1e-10
F64 = torch.float64


def _random_cores(folds, out_modes, in_modes, ranks, seed):
    g = generator(seed)
    return [torch.randn(folds, ranks[k], m, n, ranks[k + 1], generator=g, dtype=F64)
            for k, (m, n) in enumerate(zip(out_modes, in_modes))]


def test_balanced_modes_and_default_core_counts():
    assert balanced_modes(1024, 3) == (8, 8, 16)
    assert balanced_modes(48, 3) == (3, 4, 4)
    assert balanced_modes(12, 2) == (3, 4)
    assert balanced_modes(10, 3) == (1, 2, 5)  # fewer prime factors than cores: ones
    assert balanced_modes(7, 1) == (7,)
    assert default_num_cores(64, 48) == 3 and default_num_cores(12, 10) == 2 and default_num_cores(7, 11) == 2
    assert bond_limits((3, 4, 4), (4, 4, 4)) == (12, 16)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_balanced_modes_is_the_best_factorisation_by_brute_force(d):
    """Ascending, product n, and no other d-factorisation has a smaller largest factor (then
    next largest, ...): checked against every d-tuple of divisors."""
    for n in range(1, 97):
        modes = balanced_modes(n, d)
        assert len(modes) == d and math.prod(modes) == n and list(modes) == sorted(modes)
        divisors = [k for k in range(1, n + 1) if n % k == 0]
        best = min(sorted(c, reverse=True) for c in itertools.product(divisors, repeat=d) if math.prod(c) == n)
        assert sorted(modes, reverse=True) == best, (n, d)


def test_prime_factor_count_counts_with_multiplicity():
    def brute(n):
        count, p = 0, 2
        while n > 1:
            while n % p == 0:
                n //= p
                count += 1
            p += 1
        return count

    assert [prime_factor_count(n) for n in (1, 2, 4, 12, 97, 1024, 1001)] == [0, 1, 2, 3, 1, 10, 3]
    assert all(prime_factor_count(n) == brute(n) for n in range(1, 500))


def test_resolve_modes_fills_in_and_validates():
    assert resolve_modes(64, 48) == ((4, 4, 4), (4, 4, 3))
    assert resolve_modes(16, 24, in_modes=(2, 12)) == ((4, 4), (2, 12))
    assert resolve_modes(12, 10, num_cores=3) == ((2, 2, 3), (5, 2, 1))
    with pytest.raises(ValueError, match=r"factor A out_modes \(2, 3\) multiply to 6, but factor A out_features is 4"):
        resolve_modes(4, 3, out_modes=(2, 3), what="factor A")
    with pytest.raises(ValueError, match="num_cores=2 disagrees with the 3 given modes"):
        resolve_modes(12, 10, out_modes=(2, 2, 3), num_cores=2)


def test_bond_limits_are_the_smaller_side_of_each_cut():
    # sizes m_k n_k = 6, 20, 4: cuts 6 | 80 and 120 | 4
    assert bond_limits((2, 4, 1), (3, 5, 4)) == (6, 4)
    assert bond_limits((7,), (11,)) == ()


def test_interleave_matches_an_independent_numpy_reshape():
    w = torch.randn(2, 24, 12, generator=generator(1), dtype=F64)
    om, im = (2, 3, 4), (3, 2, 2)
    arr = w.numpy().reshape(2, *om, *im).transpose(0, 1, 4, 2, 5, 3, 6).reshape(2, -1)
    assert np.array_equal(interleave(w, om, im).numpy(), arr)


@pytest.mark.parametrize("om,im", [((2, 3), (3, 5)), ((2, 3, 4), (2, 4, 2)), ((1, 7), (11, 1))])
def test_tt_svd_at_full_rank_is_exact(om, im):
    w = torch.randn(3, math.prod(om), math.prod(im), generator=generator(2), dtype=F64)
    flat, step_errors = tt_svd(interleave(w, om, im), [m * n for m, n in zip(om, im)])
    cores = unflatten_cores(flat, om, im)
    assert tuple(g.shape[-1] for g in cores[:-1]) == bond_limits(om, im)
    assert rel(chain_dense(cores)[:, 0, :, :, 0], w) < EXACT
    assert all(float(e.abs().max()) < 1e-20 for e in step_errors)


def test_tt_svd_error_is_the_sum_of_the_step_tails():
    """Left-orthonormal cores: the squared error of the truncation is exactly the sum of the
    squared singular values discarded at each step."""
    om, im = (2, 3, 4), (4, 2, 3)
    w = torch.randn(2, 24, 24, generator=generator(3), dtype=F64)
    flat, step_errors = tt_svd(interleave(w, om, im), [m * n for m, n in zip(om, im)], rank=3)
    approx = chain_dense(unflatten_cores(flat, om, im))[:, 0, :, :, 0]
    err_sq = ((w - approx) ** 2).sum(dim=(1, 2))
    assert torch.allclose(err_sq, sum(step_errors), rtol=1e-10)
    for g in flat[:-1]:  # left-orthonormal
        mat = g.reshape(2, -1, g.shape[-1])
        eye = torch.eye(g.shape[-1], dtype=F64).expand(2, -1, -1)
        assert torch.allclose(mat.transpose(1, 2) @ mat, eye, atol=1e-12)


def test_chain_dense_of_two_bond_one_cores_is_the_kronecker_product():
    a, b = random_factors(2, (4, 3), (2, 5), seed=4)
    cores = [a.reshape(2, 1, 4, 3, 1), b.reshape(2, 1, 2, 5, 1)]
    assert torch.equal(chain_dense(cores)[:, 0, :, :, 0], kron_dense(a, b))


def test_mpo_frobenius_sq_matches_the_dense_norm():
    cores = _random_cores(3, (2, 3, 2), (3, 2, 4), (1, 3, 2, 1), seed=5)
    w = chain_dense(cores)[:, 0, :, :, 0]
    assert torch.allclose(mpo_frobenius_sq(cores), (w ** 2).sum(dim=(1, 2)), rtol=1e-12)
    complex_cores = [torch.complex(g, torch.randn(g.shape, generator=generator(6), dtype=F64)) for g in cores]
    wc = chain_dense(complex_cores)[:, 0, :, :, 0]
    assert torch.allclose(mpo_frobenius_sq(complex_cores), (wc.abs() ** 2).sum(dim=(1, 2)), rtol=1e-12)


def test_sweep_costs_hand_counts():
    # right-to-left: core 2: m2*(n1 n2)*r1 = 4*10*4 = 160; core 1: (m1 m2)*n1*r1 = 12*2*4 = 96
    # left-to-right: core 1: m1*(n1 n2)*r1 = 3*10*4 = 120; core 2: (m1 m2)*n2*r1 = 12*5*4 = 240
    assert sweep_costs((3, 4), (2, 5), (1, 4, 1)) == (256, 360)
    # rtl: k1: 12*2*1*3 = 72, k2: 6*4*3*2 = 144, k3: 2*16*2*1 = 64  -> 280
    # ltr: k1: 2*16*3 = 96,   k2: 6*8*3*2 = 288,  k3: 12*4*2 = 96  -> 480
    assert sweep_costs((2, 3, 2), (2, 2, 4), (1, 3, 2, 1)) == (280, 480)
    # two cores of bond 1: the Kronecker apply, a1*a2*b2 + a1*b2*b1 in the cheaper order
    assert min(sweep_costs((4, 2), (3, 5), (1, 1, 1))) == min(4 * 3 * 5 + 4 * 5 * 2, 3 * 5 * 2 + 4 * 3 * 2)
