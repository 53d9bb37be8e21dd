"""Test inputs shared across the suite: matrices with known spectra and Kronecker factors.

The decaying-spectrum generators are :mod:`structlayers.testing`'s (re-exported here).
"""

from __future__ import annotations

from typing import Tuple

import torch

from structlayers.testing import decaying_factors, decaying_matrix  # noqa: F401  (re-exported)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_factors(folds: int, shape_a: Tuple[int, int], shape_b: Tuple[int, int], *,
                   dtype=torch.float64, seed: int = 0):
    g = generator(seed)
    a = torch.randn(folds, *shape_a, generator=g, dtype=torch.float64)
    b = torch.randn(folds, *shape_b, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        a = torch.complex(a, torch.randn(folds, *shape_a, generator=g, dtype=torch.float64))
        b = torch.complex(b, torch.randn(folds, *shape_b, generator=g, dtype=torch.float64))
    return a.to(dtype), b.to(dtype)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative Frobenius distance ||x - y|| / ||y||."""
    return float((x - y).detach().norm() / y.detach().norm())


def svd_optimal_error(w: torch.Tensor, rank: int) -> float:
    """Eckart–Young error via numpy's SVD, independent of the library's own code."""
    import numpy as np

    arr = w.detach().cpu().numpy()
    arr = arr[None] if arr.ndim == 2 else arr
    s = np.linalg.svd(arr, compute_uv=False)
    return float(np.sqrt((s[:, rank:] ** 2).sum() / (np.abs(arr) ** 2).sum()))


def assert_flops_are_the_forwards(layer, batch: int, *, seed: int = 8, tol: float = 1e-10) -> None:
    """``layer.flops(batch)`` equals the multiply-adds torch counts in its forward, and the
    forward equals x Wᵀ with W = ``layer.to_dense()``."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(layer.num_folds, batch, layer.in_features, generator=generator(seed), dtype=layer.dtype)
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
    assert counter.get_total_flops() == 2 * layer.flops(batch)
    assert rel(y, x @ layer.to_dense().transpose(1, 2)) < tol


def assert_warns_only_when_costlier(costly, cheap, match: str, dense_macs: int) -> None:
    """``costly()`` warns (``match``) that it costs more than dense; ``cheap()`` warns nothing
    and costs at most ``dense_macs`` per sample and fold."""
    import warnings

    import pytest

    with pytest.warns(UserWarning, match=match):
        costly()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = cheap()
    assert layer._per_sample_cost() <= dense_macs  # noqa: SLF001
