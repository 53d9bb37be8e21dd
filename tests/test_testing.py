"""structlayers.testing: the decaying-spectrum inputs of the tests, demo, benchmarks and asv."""

from __future__ import annotations

import pytest
import torch

import structlayers.demo
from structlayers.testing import decaying_factors, decaying_matrix, decaying_spectrum


@pytest.mark.parametrize("folds,rows,cols", [(1, 6, 6), (3, 9, 5), (2, 4, 11)])
@pytest.mark.parametrize("polynomial", [False, True])
def test_decaying_matrix_has_exactly_the_stated_spectrum(folds, rows, cols, polynomial):
    w = decaying_matrix(folds, rows, cols, decay=0.7, polynomial=polynomial, seed=3)
    assert w.shape == (folds, rows, cols) and w.dtype == torch.float64
    expected = decaying_spectrum(min(rows, cols), 0.7, polynomial=polynomial)
    assert torch.allclose(torch.linalg.svdvals(w), expected.expand(folds, -1), rtol=1e-12, atol=1e-14)
    assert not torch.equal(w[0], w[-1]) or folds == 1  # folds are independent draws


def test_spectra():
    assert torch.equal(decaying_spectrum(4, 0.5), torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64))
    assert torch.allclose(decaying_spectrum(3, 2.0, polynomial=True),
                          torch.tensor([1.0, 1 / 4, 1 / 9], dtype=torch.float64), rtol=1e-15)


def test_seeds_generators_and_dtypes():
    assert torch.equal(decaying_matrix(2, 5, 4, seed=7), decaying_matrix(2, 5, 4, seed=7))
    assert not torch.equal(decaying_matrix(2, 5, 4, seed=7), decaying_matrix(2, 5, 4, seed=8))
    # a generator is advanced: two draws from one differ, and equal the seeded draws in sequence
    gen = torch.Generator().manual_seed(7)
    first, second = decaying_matrix(2, 5, 4, generator=gen), decaying_matrix(2, 5, 4, generator=gen)
    assert torch.equal(first, decaying_matrix(2, 5, 4, seed=7)) and not torch.equal(first, second)
    assert torch.equal(decaying_matrix(1, 5, 4, seed=1, dtype=torch.float32),
                       decaying_matrix(1, 5, 4, seed=1).float())  # drawn in float64, then cast
    # factors: from a generator one after the other; from a seed, A from seed and B from seed + 1
    gen = torch.Generator().manual_seed(2)
    a, b = decaying_factors(2, 4, decay=0.9, generator=gen)
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(a, decaying_matrix(2, 4, 4, decay=0.9, generator=gen))
    assert torch.equal(b, decaying_matrix(2, 4, 4, decay=0.9, generator=gen))
    a, b = decaying_factors(2, 4, decay=0.9, seed=5)
    assert torch.equal(a, decaying_matrix(2, 4, 4, decay=0.9, seed=5))
    assert torch.equal(b, decaying_matrix(2, 4, 4, decay=0.9, seed=6))


def test_the_draws_of_the_asv_history_are_unchanged():
    """The asv suites' inputs (and so their stored history) come from these draws: the
    float64 QR of two Gaussian matrices from one generator, U then V, s_i = decay^i."""
    gen = torch.Generator().manual_seed(32)
    u, _ = torch.linalg.qr(torch.randn(2, 8, 8, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(2, 8, 8, generator=gen, dtype=torch.float64))
    historical = ((u * 0.9 ** torch.arange(8, dtype=torch.float64)) @ v.transpose(1, 2)).to(torch.float32)
    drawn = decaying_matrix(2, 8, 8, decay=0.9, dtype=torch.float32, generator=torch.Generator().manual_seed(32))
    assert torch.equal(drawn, historical)
    demo = structlayers.demo.decaying_factor(2, 8, 0.9, torch.Generator().manual_seed(32), torch.float32)
    assert torch.equal(demo, historical)  # the demo's name, kept for benchmark files that use it


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="rows must be a positive int, got 0"):
        decaying_matrix(1, 0, 3)
