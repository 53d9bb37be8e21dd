"""Test inputs shared across the suite: matrices with known spectra and Kronecker factors."""

from __future__ import annotations

from typing import Tuple

import torch


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


def decaying_matrix(folds: int, m: int, n: int, *, decay: float = 0.8, polynomial: bool = False,
                    dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """W = U diag(s) V^T with random orthonormal U, V and s_i = decay^i (or (i+1)^-decay)."""
    g = generator(seed)
    u, _ = torch.linalg.qr(torch.randn(folds, m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(folds, n, n, generator=g, dtype=torch.float64))
    p = min(m, n)
    idx = torch.arange(p, dtype=torch.float64)
    s = (idx + 1) ** (-decay) if polynomial else decay**idx
    return ((u[:, :, :p] * s) @ v[:, :, :p].transpose(1, 2)).to(dtype)


def decaying_factors(folds: int, k: int, *, decay: float = 0.8, dtype=torch.float64, seed: int = 0):
    """Square K x K factors A, B with geometrically decaying spectra."""
    return (decaying_matrix(folds, k, k, decay=decay, dtype=dtype, seed=seed),
            decaying_matrix(folds, k, k, decay=decay, dtype=dtype, seed=seed + 1))


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
