"""from_kronecker never forms A ⊗ B: 1024 x 1024 factors give a 2^20 x 2^20 product
(4 TiB in float32), which cannot be allocated on any test machine."""

import resource

import pytest
import torch

import structlayers as sl
from structlayers.testing import decaying_factors

K = 1024


@pytest.fixture(scope="module")
def big_factors():
    # Decaying spectra so low ranks are meaningful.
    return decaying_factors(1, K, decay=0.9, dtype=torch.float32, seed=0)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.mark.parametrize(
    "kind,options",
    [
        ("lowrank", {"rank": 8}),
        ("lowrank", {"rank": 16, "structure": "kronecker"}),
        ("nystrom", {"rank": 16}),
        ("nystrom", {"rank": 8, "structure": "flat", "strategy": "qr"}),
        ("kronecker", {}),
    ],
)
def test_large_kronecker_input(big_factors, kind, options):
    a, b = big_factors
    before = peak_rss_gib()
    layer = sl.from_kronecker(kind, a, b, **options)
    x = torch.randn(1, 4, K * K, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    err = layer.relative_error_kronecker(a, b)
    assert y.shape == (1, 4, K * K) and torch.isfinite(y).all()
    # Every path stays within ~1 GiB of extra peak memory (the product would need 4096 GiB).
    assert peak_rss_gib() - before < 1.0
    if kind == "kronecker":
        assert err < 1e-3  # exact up to float32 round-off in the inner products
    else:
        optimum = sl.optimal_relative_error_kronecker(a, b, layer.rank)
        assert optimum - 1e-4 <= err <= 3.0 * optimum + 1e-4
