"""SVD helpers: Kronecker spectra, top pairs, tails, randomized SVD."""

import torch

from structlayers.linalg import (
    kronecker_singular_values,
    kron_dense,
    randomized_svd,
    tail_error_sq,
    top_kronecker_pairs,
)

from ..helpers import decaying_matrix, generator, random_factors


def test_kronecker_spectrum_and_top_pairs():
    a, b = random_factors(2, (5, 4), (3, 6), seed=1)
    s = kronecker_singular_values(a, b)
    assert torch.allclose(s, torch.linalg.svdvals(kron_dense(a, b))[:, : s.shape[1]], rtol=1e-12)
    sa, sb = torch.linalg.svdvals(a), torch.linalg.svdvals(b)
    ia, ib, values = top_kronecker_pairs(sa, sb, 7)
    assert torch.allclose(values, s[:, :7], rtol=1e-14)
    assert torch.allclose(sa.gather(1, ia) * sb.gather(1, ib), values)


def test_tail_modes_agree():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.5]], dtype=torch.float64)
    total = (s**2).sum(1)
    direct = tail_error_sq(s)
    assert torch.allclose(direct, torch.tensor([[14.25, 5.25, 1.25, 0.25, 0.0]], dtype=torch.float64))
    assert torch.allclose(tail_error_sq(s, total), direct)


def test_randomized_svd_recovers_an_exactly_low_rank_matrix():
    g = generator(2)
    w = torch.randn(2, 300, 10, generator=g, dtype=torch.float64) @ torch.randn(2, 10, 200, generator=g, dtype=torch.float64)
    u, s, vh = randomized_svd(w, 10, generator=generator(3))
    assert torch.allclose((u * s[:, None, :]) @ vh, w, atol=1e-9 * float(w.abs().max()))


def test_randomized_svd_error_is_exact_projection_error():
    w = decaying_matrix(1, 200, 150, decay=0.97, seed=4)
    u, s, vh = randomized_svd(w, 20, oversampling=5, power_iterations=1, generator=generator(5))
    approx = (u * s[:, None, :]) @ vh
    err_sq = float(((w - approx) ** 2).sum())
    total = (w**2).sum(dim=(1, 2))
    assert abs(err_sq - float(tail_error_sq(s, total)[0, 20])) < 1e-9
