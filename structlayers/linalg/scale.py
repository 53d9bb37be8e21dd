"""Scale-free norms and errors, so that any finite weight works.

Squared Frobenius norms overflow in float32 once entries reach about 1e19 (and in
float64 about 1e154), and underflow to 0 for tiny entries; a ratio of two such sums
is then inf/inf or 0/0. Two remedies live here:

* :func:`conditioning_scale`: the power of two s by which to divide a weight so that
  squares and sums of it stay in range (1 when they already do); constructors factor
  W / s and multiply the result back by s, both exact in floating point.
* :func:`relative_error`: ||D||_F / ||W||_F computed from D / 2^a and W / 2^b, with
  the powers of two put back at the end; the relative error of a zero target is 0
  for an exact match and inf otherwise.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

Scale = Union[float, torch.Tensor]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factorisations run in: float32 for half precisions (torch's SVD and QR
    do not take them), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def safe_exponents(dtype: torch.dtype, degree: int = 1) -> Tuple[int, int]:
    """(lo, hi): a tensor whose largest |entry| lies in [2^lo, 2^hi] can be squared and summed,
    and ``degree`` such squared sums multiplied, in ``dtype`` without overflow, and its
    largest entries squared without underflow."""
    info = torch.finfo(working_dtype(dtype))
    lowest, highest = math.floor(math.log2(info.tiny)), math.floor(math.log2(info.max))
    return -(-lowest // (4 * degree)), highest // (4 * degree)


def conditioning_scale(t: torch.Tensor, degree: int = 1) -> float:
    """A power of two s such that t / s is safe to square and sum (see :func:`safe_exponents`):
    1.0 when t already is (then nothing changes), else the power of two nearest above max|t|.
    An all-zero t gives 1.0."""
    lo, hi = safe_exponents(t.dtype, degree)
    largest = float(t.detach().abs().max())
    if largest == 0.0:
        return 1.0
    _, exponent = torch.frexp(torch.tensor(largest, dtype=torch.float64))
    if lo <= int(exponent) - 1 <= hi:
        return 1.0
    return float(torch.ldexp(torch.tensor(1.0, dtype=torch.float64), exponent))


def _norm_and_exponent(t: torch.Tensor, per_fold: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n, e) with ||t||_F = n * 2^e, overall (scalars) or per fold ((F,) each); float64."""
    a = t.detach().abs().double()
    largest = a.amax(dim=(-2, -1)) if per_fold else a.amax()
    _, e = torch.frexp(largest)  # largest = m 2^e, m in [0.5, 1); 0 gives e = 0
    unit = torch.ldexp(torch.ones_like(largest), e)
    scaled = a / (unit[:, None, None] if per_fold else unit)
    n = (scaled * scaled).sum(dim=(-2, -1)) if per_fold else (scaled * scaled).sum()
    return n.sqrt(), e


def relative_error(diff: torch.Tensor, target: torch.Tensor, per_fold: bool = False):
    """||diff||_F / ||target||_F over all folds (a float) or per fold (a float64 tensor (F,)),
    for (F, m, n) tensors, without overflow or underflow at any scale.

    A zero target (fold) has relative error 0 when diff is zero there too, inf otherwise.
    """
    nd, ed = _norm_and_exponent(diff, per_fold)
    nt, et = _norm_and_exponent(target, per_fold)
    ratio = torch.ldexp(nd / torch.where(nt > 0, nt, torch.ones_like(nt)), ed - et)
    zero_target = torch.where(nd > 0, torch.full_like(nd, float("inf")), torch.zeros_like(nd))
    ratio = torch.where(nt > 0, ratio, zero_target)
    return ratio if per_fold else float(ratio)


def ratio_of_squares(err_sq: torch.Tensor, total_sq: torch.Tensor, per_fold: bool = False):
    """sqrt(err_sq / total_sq) overall (sums over folds; a float) or per fold (a tensor (F,)),
    with 0/0 = 0 (a zero target matched exactly) and x/0 = inf for x > 0."""
    if not per_fold:
        err_sq, total_sq = err_sq.sum(), total_sq.sum()
    err_sq, total_sq = err_sq.double(), total_sq.double()
    safe = torch.where(total_sq > 0, total_sq, torch.ones_like(total_sq))
    zero_total = torch.where(err_sq > 0, torch.full_like(err_sq, float("inf")), torch.zeros_like(err_sq))
    ratio = torch.where(total_sq > 0, (err_sq / safe).sqrt(), zero_total)
    return ratio if per_fold else float(ratio)


def fold_scales(t: torch.Tensor) -> torch.Tensor:
    """Per fold of t (F, ...), the power of two 2^e with max|t_f| = m 2^e, m in [0.5, 1)
    (1 for a zero fold), float64 (F,)."""
    largest = t.detach().abs().double().flatten(1).amax(dim=1)
    _, e = torch.frexp(largest)
    return torch.ldexp(torch.ones_like(largest), e)


__all__ = ["conditioning_scale", "fold_scales", "ratio_of_squares", "relative_error", "safe_exponents",
           "working_dtype"]
