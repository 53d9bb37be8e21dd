"""CUR (skeleton / Nyström) factorisations with a stable, rank-truncated core.

W ≈ C Z R with C = W[:, J] (c columns) and R = W[I, :] (c rows). The core is
never the pseudo-inverse of the intersection W[I, J] (the classical skeleton
form, which amplifies errors through a badly conditioned intersection). Instead,
with orthonormal bases Q_C of range(C) and Q_R of range(R^H),

    W ≈ Q_C [Q_C^H W Q_R]_k Q_R^H,

the best rank-k approximation of W inside the chosen column and row spaces.
With c == k this is exactly C (C⁺ W R⁺) R = P_C W P_R; with ``oversampling``
> 1 more pivots than the rank are drawn and the core is truncated back to k,
which brings the error close to the SVD optimum at the same rank.

Results are returned in the two-factor form ``left`` (F, m, k) and ``right``
(F, k, n), which is what a layer multiplies by.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import check_real
from .kron import kron_apply, kron_columns, kron_rows
from .pivots import NEEDS_BASIS, select_pivots
from .svd import randomized_svd, svd, top_kronecker_pairs

# Above this size the singular basis that guides pivots is found by a randomized SVD.
EXACT_SVD_LIMIT = 1024


class CURFactors(NamedTuple):
    left: torch.Tensor  # (F, m, k)
    right: torch.Tensor  # (F, k, n)
    cols: torch.Tensor  # (F, k) chosen column indices (flat)
    rows: torch.Tensor  # (F, k) chosen row indices (flat)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Cores are small (k x k); solve them in double precision, whatever the input.
    return torch.complex128 if dtype.is_complex else torch.float64


def num_pivots(k: int, oversampling: float, limit: int) -> int:
    """How many pivots to draw for a rank-k CUR: ceil(oversampling * k), at most ``limit``."""
    oversampling = check_real(oversampling, "oversampling", minimum=1.0, what="pivots per unit of rank")
    return min(limit, math.ceil(oversampling * k))


def truncated_core(c: torch.Tensor, r: torch.Tensor, w_qr, k: int):
    """left, right of Q_C [Q_C^H W Q_R]_k Q_R^H (balanced split of the core's singular values).

    c: (F, m, p) chosen columns, r: (F, q, n) chosen rows, ``w_qr(q_r)`` returns W @ q_r.
    Computed in double precision (the cores are small), returned in c's dtype.
    """
    wd = _work_dtype(c.dtype)
    q_c, _ = torch.linalg.qr(c.to(wd))
    q_r, _ = torch.linalg.qr(r.to(wd).conj().transpose(1, 2))
    core = q_c.conj().transpose(1, 2) @ w_qr(q_r)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    root = s[:, :k].sqrt()
    left = (q_c @ u[:, :, :k]) * root[:, None, :]
    right = root[:, :, None] * (vh[:, :k, :] @ q_r.conj().transpose(1, 2))
    return left.to(c.dtype), right.to(c.dtype)


def singular_bases(w: torch.Tensor, k: int, generator: torch.Generator):
    """Top-k left and right singular bases of W (F, m, n): (F, m, k), (F, n, k)."""
    if min(w.shape[1:]) <= EXACT_SVD_LIMIT:
        u, _, vh = svd(w)
    else:
        u, _, vh = randomized_svd(w, k, generator=generator)
    return u[:, :, :k], vh[:, :k, :].conj().transpose(1, 2)


def cur_dense(
    w: torch.Tensor, k: int, strategy: str, generator: torch.Generator, oversampling: float = 1.0
) -> CURFactors:
    """Rank-k CUR of a dense folded W (F, m, n) from ceil(oversampling * k) columns and rows."""
    f, m, n = w.shape
    # More pivots than min(m, n) = the largest possible rank never help.
    n_cols = n_rows = num_pivots(k, oversampling, min(m, n))
    u = v = None
    if strategy in NEEDS_BASIS:
        u, v = singular_bases(w.detach(), max(n_cols, n_rows), generator)
    wa = w.detach().abs() ** 2
    cols = select_pivots(strategy, n_cols, n=n, num_folds=f, generator=generator, sq_norms=wa.sum(1), basis=v)
    rows = select_pivots(strategy, n_rows, n=m, num_folds=f, generator=generator, sq_norms=wa.sum(2), basis=u)
    cols_d, rows_d = cols.to(w.device), rows.to(w.device)
    c = torch.gather(w, 2, cols_d[:, None, :].expand(f, m, n_cols))
    r = torch.gather(w, 1, rows_d[:, :, None].expand(f, n_rows, n))
    wd = _work_dtype(w.dtype)
    left, right = truncated_core(c, r, lambda q_r: w.to(wd) @ q_r, k)
    return CURFactors(left, right, cols, rows)


def cur_kronecker_joint(
    a: torch.Tensor, b: torch.Tensor, k: int, strategy: str, generator: torch.Generator,
    oversampling: float = 1.0,
) -> CURFactors:
    """Rank-k CUR of W = A ⊗ B with pivots chosen jointly over the product's rows and columns.

    Column scores and singular bases of the product come from the factors, and
    W Q_R is formed with Kronecker applies: nothing of size (a1*b1) x (a2*b2) is built.
    """
    f, a1, a2 = a.shape
    _, b1, b2 = b.shape
    # The product's rank is at most min(a1, a2) * min(b1, b2); more pivots never help.
    n_cols = n_rows = num_pivots(k, oversampling, min(a1, a2) * min(b1, b2))
    v = u = None
    if strategy in NEEDS_BASIS:
        ua, sa, vha = svd(a.detach())
        ub, sb, vhb = svd(b.detach())
        ia, ib, _ = top_kronecker_pairs(sa, sb, n_cols)
        u = _kron_basis(ua, ub, ia, ib)
        v = _kron_basis(vha.conj().transpose(1, 2), vhb.conj().transpose(1, 2), ia, ib)
    aa, bb = a.detach().abs() ** 2, b.detach().abs() ** 2
    col_sq = (aa.sum(1)[:, :, None] * bb.sum(1)[:, None, :]).reshape(f, a2 * b2)
    row_sq = (aa.sum(2)[:, :, None] * bb.sum(2)[:, None, :]).reshape(f, a1 * b1)
    cols = select_pivots(strategy, n_cols, n=a2 * b2, num_folds=f, generator=generator, sq_norms=col_sq, basis=v)
    rows = select_pivots(strategy, n_rows, n=a1 * b1, num_folds=f, generator=generator, sq_norms=row_sq, basis=u)
    cols_d, rows_d = cols.to(a.device), rows.to(a.device)
    c = kron_columns(a, b, cols_d // b2, cols_d % b2)  # (F, out, n_cols)
    r = kron_rows(a, b, rows_d // b1, rows_d % b1)  # (F, n_rows, in)
    wd = _work_dtype(a.dtype)

    def w_qr(q_r: torch.Tensor) -> torch.Tensor:
        return kron_apply([a.to(wd)], [b.to(wd)], q_r.transpose(1, 2)).transpose(1, 2)

    left, right = truncated_core(c, r, w_qr, k)
    return CURFactors(left, right, cols, rows)


def _kron_basis(ba: torch.Tensor, bb: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """Columns ba[:, ia[t]] ⊗ bb[:, ib[t]]: (F, na*nb, k) from (F, na, pa), (F, nb, pb)."""
    return kron_columns(ba, bb, ia.to(ba.device), ib.to(ba.device))


def cur_error_sq(w: torch.Tensor, factors: CURFactors) -> torch.Tensor:
    """||W - left @ right||_F^2 per fold for dense W, shape (F,)."""
    diff = w - factors.left @ factors.right
    return (diff.abs() ** 2).sum(dim=(-2, -1))


__all__ = ["CURFactors", "cur_dense", "cur_kronecker_joint", "cur_error_sq", "num_pivots", "singular_bases"]
