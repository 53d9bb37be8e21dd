"""Inputs with known spectra, for tests, the demo, the benchmarks and the asv suites.

Trained weights (of circuits and of networks) have decaying singular values, and low
ranks only mean something on such inputs, so every generator here builds
W = U diag(s) V^T with Haar-random orthogonal U, V (the Q of the QR factorisation of
a Gaussian matrix, drawn in float64 on the CPU) and a decaying spectrum s. Each is
deterministic given its ``seed`` or ``generator``, on every device and dtype: the
draws are made in float64 and only the result is cast to ``dtype``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import check_positive_int


def decaying_spectrum(n: int, decay: float, *, polynomial: bool = False) -> torch.Tensor:
    """Singular values s_i = decay^i (geometric), or (i+1)^(-decay) with ``polynomial``,
    for i = 0..n-1; shape (n,), float64, s_0 = 1."""
    idx = torch.arange(check_positive_int(n, "n"), dtype=torch.float64)
    return (idx + 1) ** (-decay) if polynomial else decay**idx


def decaying_matrix(
    folds: int,
    rows: int,
    cols: int,
    *,
    decay: float = 0.8,
    polynomial: bool = False,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Folded matrices W[f] = U[f] diag(s) V[f]^T of shape (folds, rows, cols).

    s = :func:`decaying_spectrum` (min(rows, cols), decay, polynomial); U (rows x rows)
    and V (cols x cols) are drawn, in that order, from ``generator`` (which advances)
    or, without one, from a fresh generator seeded with ``seed``.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    f, m, n = (check_positive_int(v, name) for v, name in ((folds, "folds"), (rows, "rows"), (cols, "cols")))
    u, _ = torch.linalg.qr(torch.randn(f, m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(f, n, n, generator=gen, dtype=torch.float64))
    p = min(m, n)
    s = decaying_spectrum(p, decay, polynomial=polynomial)
    return ((u[:, :, :p] * s) @ v[:, :, :p].transpose(1, 2)).to(dtype)


def decaying_factors(
    folds: int,
    size: int,
    *,
    decay: float = 0.8,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kronecker factors A, B, each (folds, size, size) with singular values decay^i, so
    that W = A ⊗ B (size^2 x size^2) has the products decay^(i+j).

    From ``generator``: A, then B, drawn from it one after the other. Without one: A from
    ``seed`` and B from ``seed + 1`` (each :func:`decaying_matrix` with that seed).
    """
    if generator is not None:
        return (decaying_matrix(folds, size, size, decay=decay, dtype=dtype, generator=generator),
                decaying_matrix(folds, size, size, decay=decay, dtype=dtype, generator=generator))
    return (decaying_matrix(folds, size, size, decay=decay, dtype=dtype, seed=seed),
            decaying_matrix(folds, size, size, decay=decay, dtype=dtype, seed=seed + 1))


__all__ = ["decaying_factors", "decaying_matrix", "decaying_spectrum"]
