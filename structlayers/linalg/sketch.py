"""Random sketches and the sketched estimate of a matrix, with their error in closed form.

The estimate of W (out x in) from L independent pairs of k x out sketches U1_i and
k x in sketches U2_i is

    W~ = 1/(2L) * sum_{i=1..L} ( U1_i^T S1_i + S2_i U2_i ).

Every sketch is scaled so that E[U^T U] = I; hence with S1_i = U1_i W and
S2_i = W U2_i^T (``fit="unbiased"``) every term, and so the average, is an unbiased
estimate of W. Sketches are real-valued (float64 on the CPU when drawn), so U^T is
also U^H for complex W.

Sketches (``sketch=``):

``gaussian``    i.i.d. N(0, 1/k) entries.
``sign``        i.i.d. +-1/sqrt(k) entries.
``sparse``      CountSketch: each column has one +-1 in a uniformly random row.
                Its variance equals ``sign``'s.
``orthogonal``  sqrt(max(n, k)/k) Q with Q k x n Haar-random with orthonormal rows
                (k < n) or orthonormal columns (k >= n). For k >= n, U^T U = I
                exactly, so every term is exact.

An SRHT is not offered: its point is a fast transform, which a dense stored
sketch and GEMM apply would not use.

Accuracy of ``fit="unbiased"``. For each half, E||U^T U W - W||^2 = c(n, k) ||W||^2
with c = (n + 1)/k (gaussian), (n - 1)/k (sign, sparse), max(n - k, 0)/k
(orthogonal), n being out for U1 and in for U2 (:func:`half_variance`); the halves
and terms are independent, so E||W~ - W||^2 / ||W||^2 = (c(out, k) + c(in, k)) / (4L),
whatever W's spectrum. The sketches know nothing about W, so an estimate storing no
more numbers than W (2Lk(in + out) <= in*out) has an expected relative error of at
least sqrt((in + out)^2 / (2 in out) - 1/(2L)) >= sqrt(1.5) (about sqrt(2) for
gaussian, sign and sparse sketches), worse than W~ = 0.

``fit="projection"`` instead picks the S's that minimise ||W - W~||_F for the drawn
sketches: W~ = P W + (I - P) W Q, with P, Q the orthogonal projectors on the row
spaces of the stacked U1 (in R^out) and U2 (in R^in). Its error is
||(I - P) W (I - Q)||_F, in expectation sqrt((1 - Lk/out)_+ (1 - Lk/in)_+) ||W||_F
(exact for gaussian and orthogonal sketches, whose row spaces are uniformly random;
approximate for sign/sparse). It is biased but never worse than W~ = 0, and exact
once Lk >= min(in, out).

For gaussian and sign sketches the L terms of size k have the same distribution
as one term of size Lk with S scaled by 1/sqrt(L): L changes neither the cost, the
number of stored entries nor the expected error at fixed L*k, only the scale of the
S's. For orthogonal sketches larger k is strictly better.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from .._checks import check_choice, check_positive_int

SKETCHES = ("gaussian", "sign", "sparse", "orthogonal")
#: the largest per-term sketch size a tolerance may ask for (beyond it the layer would not fit in memory)
MAX_LOW_RANK = 2**20
FITS = ("unbiased", "projection")


def draw_sketches(folds: int, num_terms: int, low_rank: int, n: int, sketch: str,
                  generator: torch.Generator) -> torch.Tensor:
    """Independent sketches U (k x n) with E[U^T U] = I, shape (F, L, k, n), float64 on the CPU."""
    check_choice(sketch, SKETCHES, "sketch")
    f, L, k = folds, num_terms, low_rank
    if sketch == "gaussian":
        return torch.randn(f, L, k, n, generator=generator, dtype=torch.float64) / math.sqrt(k)
    if sketch == "sign":
        signs = torch.randint(0, 2, (f, L, k, n), generator=generator).to(torch.float64) * 2 - 1
        return signs / math.sqrt(k)
    if sketch == "sparse":
        rows = torch.randint(0, k, (f, L, 1, n), generator=generator)
        signs = torch.randint(0, 2, (f, L, 1, n), generator=generator).to(torch.float64) * 2 - 1
        return torch.zeros(f, L, k, n, dtype=torch.float64).scatter_(2, rows, signs)
    # orthogonal: Haar-random orthonormal columns of a tall Gaussian, sign-fixed.
    tall, short = max(k, n), min(k, n)
    q, r = torch.linalg.qr(torch.randn(f, L, tall, short, generator=generator, dtype=torch.float64))
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    q = q * torch.where(diag < 0, -1.0, 1.0).unsqueeze(-2)
    if k >= n:
        return q  # (k, n), U^T U = I exactly
    return q.transpose(-1, -2) * math.sqrt(n / k)  # (k, n) orthonormal rows, E[U^T U] = I


def half_variance(n: int, k: int, sketch: str) -> float:
    """E||U^T U W - W||_F^2 / ||W||_F^2 for a k x n sketch U of the given type."""
    if sketch == "gaussian":
        return (n + 1) / k
    if sketch in ("sign", "sparse"):
        return (n - 1) / k
    return max(n - k, 0) / k


def expected_relative_error(in_features: int, out_features: int, *, num_terms: int, low_rank: int,
                            sketch: str = "gaussian", fit: str = "unbiased") -> float:
    """RMS over sketch draws of ||W - W~||_F / ||W||_F for ``from_dense``; independent of W.

    ``unbiased``: sqrt((c(out, k) + c(in, k)) / (4L)) (exact, see the module docstring).
    ``projection``: sqrt((1 - Lk/out)_+ (1 - Lk/in)_+) (exact for gaussian and
    orthogonal sketches, approximate for sign and sparse).
    """
    inp = check_positive_int(in_features, "in_features")
    out = check_positive_int(out_features, "out_features")
    L = check_positive_int(num_terms, "num_terms")
    k = check_positive_int(low_rank, "low_rank")
    check_choice(sketch, SKETCHES, "sketch")
    check_choice(fit, FITS, "fit")
    if fit == "unbiased":
        return math.sqrt((half_variance(out, k, sketch) + half_variance(inp, k, sketch)) / (4 * L))
    r = L * k
    return math.sqrt(max(0.0, 1 - r / out) * max(0.0, 1 - r / inp))


def low_rank_for_tolerance(inp: int, out: int, L: int, tolerance: float, sketch: str, fit: str) -> int:
    """Smallest k whose expected relative error (see :func:`expected_relative_error`) is <= tolerance."""
    def err(k: int) -> float:
        return expected_relative_error(inp, out, num_terms=L, low_rank=k, sketch=sketch, fit=fit)

    if fit == "projection":
        k_max = -(-min(inp, out) // L)  # Lk >= min(in, out): exact
    elif sketch == "orthogonal":
        k_max = max(inp, out)  # U^T U = I on both sides: exact
    else:
        numer = err(1) ** 2 * 4 * L  # c(out, 1) + c(in, 1) = (numerator of the variance)
        if numer == 0:
            return 1
        if tolerance == 0:
            raise ValueError(
                f"tolerance=0 is unreachable with random {sketch!r} sketches and fit='unbiased' "
                f"(expected error sqrt({numer:g} / (4*L*k)) > 0 for every k); use sketch='orthogonal' "
                f"or fit='projection'")
        needed = numer / (4 * L) / tolerance / tolerance  # inf when tolerance**2 underflows
        if not needed <= MAX_LOW_RANK:
            raise ValueError(
                f"tolerance={tolerance} needs low_rank of about {needed:.3g} with random {sketch!r} sketches "
                f"and fit='unbiased' (expected error sqrt({numer:g} / (4*L*k))), more than the "
                f"{MAX_LOW_RANK} accepted; loosen the tolerance, or use sketch='orthogonal' or fit='projection'")
        k_max = math.ceil(needed) + 1
    lo, hi = 0, k_max  # err(hi) <= tolerance; find the smallest such k by bisection (err falls with k)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if err(mid) <= tolerance * (1 + 1e-12):
            hi = mid
        else:
            lo = mid
    return hi


def fit_sketches(apply_left: Callable[[torch.Tensor], torch.Tensor],
                 apply_right: Callable[[torch.Tensor], torch.Tensor],
                 u1: torch.Tensor, u2: torch.Tensor, num_terms: int, fit: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The S's of W~ for stacked sketches u1 (F, Lk, out) and u2 (F, Lk, in).

    W enters only through apply_left(M) = M W for M (F, m, out) and apply_right(N) = N W^T
    for N (F, m, in), so W need not be formed. Returns S1 stacked (F, Lk, in) and S2^T
    stacked (F, Lk, out), S2_i^T being rows i*k .. (i+1)*k of the second.
    """
    check_choice(fit, FITS, "fit")
    if fit == "unbiased":
        return apply_left(u1), apply_right(u2)                 # S1_i = U1_i W; rows of (W U2_i^T)^T
    # W~ = P W + (I - P) W Q with P = U1^T pinv(U1^T), Q = pinv(U2) U2.
    scale = 2 * num_terms
    p1 = torch.linalg.pinv(u1.transpose(1, 2))                 # (F, Lk, out)
    s1 = apply_left(p1) * scale                                # U1^T S1 / (2L) = P W
    t = apply_right(torch.linalg.pinv(u2).transpose(1, 2))     # (F, Lk, out) = (W pinv(U2))^T
    s2t = (t - (t @ p1.transpose(1, 2)) @ u1) * scale          # ((I - P) W pinv(U2))^T
    return s1, s2t


__all__ = ["FITS", "SKETCHES", "draw_sketches", "expected_relative_error", "fit_sketches", "half_variance",
           "low_rank_for_tolerance"]
