"""Singular value decompositions shared by the kinds: exact, randomized, and of A ⊗ B.

All functions are folded: matrices carry a leading fold axis F.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .scale import conditioning_scale, ratio_of_squares, working_dtype


def svd(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD per fold: W (F, m, n) -> U (F, m, p), S (F, p) real, Vh (F, p, n), p = min(m, n)."""
    return torch.linalg.svd(w, full_matrices=False)


def randomized_range(
    w: torch.Tensor,
    size: int,
    *,
    power_iterations: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Orthonormal basis Q (F, m, size) approximately spanning the top range of W (F, m, n).

    Gaussian test matrix drawn on the CPU (reproducible on any device), then
    ``power_iterations`` rounds of re-orthonormalised subspace iteration, which
    sharpen the basis when the spectrum decays slowly (Halko, Martinsson, Tropp 2011).
    """
    f, m, n = w.shape
    real_dtype = w.real.dtype if w.is_complex() else w.dtype
    omega = torch.randn(f, n, size, generator=generator, dtype=real_dtype)
    if w.is_complex():
        omega = torch.complex(omega, torch.randn(f, n, size, generator=generator, dtype=real_dtype))
    omega = omega.to(device=w.device, dtype=w.dtype)
    q, _ = torch.linalg.qr(w @ omega)
    wh = w.conj().transpose(1, 2)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(wh @ q)
        q, _ = torch.linalg.qr(w @ z)
    return q


def randomized_svd(
    w: torch.Tensor,
    rank: int,
    *,
    oversampling: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` SVD per fold; same output layout as :func:`svd` with p = rank.

    The returned truncation U S Vh equals P W for an orthogonal projector P, so
    its error is exactly ``sqrt(||W||^2 - sum(S^2))`` (see :func:`projection_error_sq`).
    """
    f, m, n = w.shape
    size = min(rank + oversampling, m, n)
    q = randomized_range(w, size, power_iterations=power_iterations, generator=generator)
    small = q.conj().transpose(1, 2) @ w  # (F, size, n)
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ u_small)[:, :, :rank], s[:, :rank], vh[:, :rank, :]


def tail_error_sq(singular_values: torch.Tensor, total_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared truncation error for every rank 0..p, per fold: (F, p) -> (F, p+1).

    Without ``total_sq`` the singular values must be the complete spectrum and the
    tail is summed directly (no cancellation). With it (a partial spectrum, e.g.
    from a randomized SVD) the error is total minus the kept energy, clamped at 0.
    """
    sq = singular_values.double() ** 2
    if total_sq is None:
        tail = torch.flip(torch.cumsum(torch.flip(sq, [1]), dim=1), [1])
        return torch.cat([tail, torch.zeros_like(tail[:, :1])], dim=1)
    kept = torch.cumsum(sq, dim=1)
    kept = torch.cat([torch.zeros_like(kept[:, :1]), kept], dim=1)
    return (total_sq.double()[:, None] - kept).clamp_min(0.0)


def smallest_rank_for_tolerance(errors_sq: torch.Tensor, total_sq: torch.Tensor, tolerance: float) -> Optional[int]:
    """Smallest r with overall relative error sqrt(sum_f err_f(r)^2 / sum_f ||W_f||^2) <= tolerance.

    errors_sq: (F, R+1) squared error for ranks 0..R. Returns None when no rank
    up to R qualifies. Rank 0 is never returned.
    """
    # multiplied out, not divided: a zero W (total 0, errors 0) meets every tolerance at rank 1
    overall = errors_sq.sum(dim=0)
    ok = torch.nonzero(overall[1:] <= tolerance**2 * total_sq.double().sum() * (1 + 1e-12)).flatten()
    return int(ok[0]) + 1 if ok.numel() else None


def optimal_relative_error(w: torch.Tensor, rank: int) -> float:
    """Eckart–Young optimum: relative Frobenius error of the best rank-``rank`` approximation.

    W: (F, out, in) or (out, in); the error is taken over all folds together.
    """
    from .._checks import as_folded_weight

    w = as_folded_weight(w)
    w = w.to(working_dtype(w.dtype))
    s = torch.linalg.svdvals(w / conditioning_scale(w))
    return ratio_of_squares(tail_error_sq(s)[:, min(rank, s.shape[1])], tail_error_sq(s)[:, 0])


def kronecker_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All singular values of A ⊗ B per fold, sorted descending: (F, pA*pB)."""
    sa = torch.linalg.svdvals(a)
    sb = torch.linalg.svdvals(b)
    prods = (sa[:, :, None] * sb[:, None, :]).reshape(sa.shape[0], -1)
    return torch.sort(prods, dim=1, descending=True).values


def optimal_relative_error_kronecker(a: torch.Tensor, b: torch.Tensor, rank: int) -> float:
    """Eckart–Young optimum for W = A ⊗ B from the factors' spectra, without forming W."""
    from .._checks import as_folded_factors

    a, b = as_folded_factors(a, b)
    a, b = a.to(working_dtype(a.dtype)), b.to(working_dtype(b.dtype))
    s = kronecker_singular_values(a / conditioning_scale(a, 2), b / conditioning_scale(b, 2))
    return ratio_of_squares(tail_error_sq(s)[:, min(rank, s.shape[1])], tail_error_sq(s)[:, 0])


def top_kronecker_pairs(sa: torch.Tensor, sb: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (i, j) of the ``rank`` largest products sa[i] * sb[j] per fold.

    sa: (F, pA), sb: (F, pB), both sorted descending. Returns (idx_a, idx_b, values),
    each (F, rank). Because both spectra are sorted, the winners lie in the leading
    rank x rank block, so only that block is searched.
    """
    f = sa.shape[0]
    ka, kb = min(rank, sa.shape[1]), min(rank, sb.shape[1])
    prods = (sa[:, :ka, None] * sb[:, None, :kb]).reshape(f, ka * kb)
    # A stable sort breaks exact ties (e.g. s_i s_j = s_j s_i when A = B) by index, so the
    # same factors always give the same pairs, whatever else is in the batch.
    values, flat = torch.sort(prods, dim=1, descending=True, stable=True)
    values, flat = values[:, :rank], flat[:, :rank]
    return flat // kb, flat % kb, values
