"""Block grids of Monarch matrices: shapes, the blockwise view, blocks of A ⊗ B.

A weight W (out, in) is cut into a grid of Lb x K blocks W_{l,k} of shape (S, P),
S = out / Lb and P = in / K, with rows ``s*Lb + l`` (strided) and columns ``k*P + p``
(contiguous) -- the blocks a Monarch layer stores one low-rank factor pair for (see
:mod:`structlayers.kinds.monarch`). The Frobenius-optimal approximation with every
block of rank <= r is a truncated SVD of every block.

For W = A ⊗ B with A (a1, a2) and B (b1, b2), when (Lb divides b1 or b1 divides Lb)
and (P divides b2 or b2 divides P), every block is itself a Kronecker product
A_sub ⊗ B_sub of sub-matrices of the factors (:func:`kron_block_sets`), so the
blockwise SVD comes from the factors' small SVDs (:func:`kron_block_svd`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._checks import check_positive_int
from .kron import frobenius_sq, sqrt_divisor
from .svd import svd

Blocks = Tuple[int, int]

_SVD_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


# ------------------------------------------------------------------ block shapes
def balanced_num_blocks(out_features: int, in_features: int) -> Blocks:
    """Default (blocks_out, blocks_in): for each side the largest divisor <= sqrt(features)."""
    return sqrt_divisor(out_features), sqrt_divisor(in_features)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_num_blocks(num_blocks: object, out_features: int, in_features: int) -> Blocks:
    """Validate ``num_blocks`` (int: both sides; or (blocks_out, blocks_in)); None gives the default."""
    if num_blocks is None:
        return balanced_num_blocks(out_features, in_features)
    if isinstance(num_blocks, numbers.Integral) and not isinstance(num_blocks, bool):
        lo = ki = check_positive_int(num_blocks, "num_blocks")
    elif isinstance(num_blocks, (tuple, list)):
        if len(num_blocks) != 2:
            raise ValueError(f"num_blocks must be an int or a pair (blocks_out, blocks_in), got {num_blocks!r}")
        lo = check_positive_int(num_blocks[0], "num_blocks[0] (blocks_out)")
        ki = check_positive_int(num_blocks[1], "num_blocks[1] (blocks_in)")
    else:
        raise TypeError(f"num_blocks must be a positive int or a pair (blocks_out, blocks_in) of positive "
                        f"ints, got {type(num_blocks).__name__} {num_blocks!r}")
    if out_features % lo:
        raise ValueError(f"out_features={out_features} is not divisible by the number of output blocks {lo} "
                         f"(num_blocks={num_blocks!r}); divisors of {out_features}: {_divisors(out_features)}")
    if in_features % ki:
        raise ValueError(f"in_features={in_features} is not divisible by the number of input blocks {ki} "
                         f"(num_blocks={num_blocks!r}); divisors of {in_features}: {_divisors(in_features)}")
    return lo, ki


def check_block_rank(block_rank: object, out_block: int, in_block: int, blocks: Blocks) -> int:
    """``block_rank`` as an int if it is positive and at most min(out_block, in_block), else raise."""
    r = check_positive_int(block_rank, "block_rank")
    if r > min(out_block, in_block):
        raise ValueError(
            f"block_rank {r} exceeds min(output block size {out_block}, input block size {in_block}) = "
            f"{min(out_block, in_block)} for num_blocks={blocks} (blocks of out_features / blocks_out x "
            f"in_features / blocks_in): a {out_block} x {in_block} block has "
            f"no higher rank (at that block rank the layer already represents every matrix)")
    return r


def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if torch's SVD supports it, else float32 (for half precisions)."""
    return dtype if dtype in _SVD_DTYPES else torch.float32


def block_view(w: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """W (F, out, in) as its blocks (F, Lb, K, S, P): block (l, k) holds rows s*Lb + l and
    columns k*P + p. A view (no copy) when W is contiguous."""
    f, out, inp = w.shape
    lo, ki = blocks
    return w.reshape(f, out // lo, lo, ki, inp // ki).permute(0, 2, 3, 1, 4)


# ------------------------------------------------------------- Kronecker blocks
def kron_block_sets(a: torch.Tensor, b: torch.Tensor, blocks: Blocks):
    """Every Monarch block of A ⊗ B as A_set ⊗ B_set, or None when the block grid does not allow it.

    Needs (Lb divides b1 or b1 divides Lb) and (P divides b2 or b2 divides P).
    Returns ``a_sets`` (F, nar, nac, ar, ac), ``b_sets`` (F, nbr, nbc, br, bc) and index
    vectors so that block (l, k) is kron(a_sets[:, ra[l], ca[k]], b_sets[:, rb[l], cb[k]]),
    with ar*br = S and ac*bc = P; the distinct sub-matrices are views of A and B.
    """
    f, a1, a2 = a.shape
    _, b1, b2 = b.shape
    lo, ki = blocks
    p = a2 * b2 // ki

    def ar(n):
        return torch.arange(n, device=a.device)

    # Output row s*Lb + l = i*b1 + kb.
    if b1 % lo == 0:  # l = kb mod Lb; the block's rows are (i, kb // Lb), i-major
        a_rows = a.unsqueeze(1)  # (F, 1, a1, a2)
        b_rows = b.reshape(f, b1 // lo, lo, b2).transpose(1, 2)  # (F, Lb, b1/Lb, b2)
        ra, rb = torch.zeros(lo, dtype=torch.long, device=a.device), ar(lo)
    elif lo % b1 == 0:  # kb = l mod b1, i = s*q + l // b1
        q = lo // b1
        a_rows = a.reshape(f, a1 // q, q, a2).transpose(1, 2)  # (F, q, a1/q, a2)
        b_rows = b.unsqueeze(2)  # (F, b1, 1, b2)
        ra, rb = ar(lo) // b1, ar(lo) % b1
    else:
        return None
    nar, nr_a = a_rows.shape[1:3]
    nbr, nr_b = b_rows.shape[1:3]
    # Input column k*P + p = j*b2 + lb.
    if b2 % p == 0:  # j = k // q, lb = (k mod q)*P + p
        q = b2 // p
        a_sets = a_rows.transpose(2, 3).unsqueeze(-1)  # (F, nar, a2, ar, 1)
        b_sets = b_rows.reshape(f, nbr, nr_b, q, p).transpose(2, 3)  # (F, nbr, q, br, P)
        ca, cb = ar(ki) // q, ar(ki) % q
    elif p % b2 == 0:  # j = k*q + p // b2, lb = p mod b2
        q = p // b2
        a_sets = a_rows.reshape(f, nar, nr_a, ki, q).transpose(2, 3)  # (F, nar, K, ar, q)
        b_sets = b_rows.unsqueeze(2)  # (F, nbr, 1, br, b2)
        ca, cb = ar(ki), torch.zeros(ki, dtype=torch.long, device=a.device)
    else:
        return None
    return a_sets, b_sets, (ra, ca), (rb, cb)


def per_block(sets: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(F, nr, nc, ...) -> (F, Lb, K, ...) by the block's set indices."""
    return sets[:, rows[:, None], cols[None, :]]


@dataclass
class KroneckerBlockSVD:
    """Blockwise SVD of A ⊗ B on a block grid, from the SVDs of the factors' sub-matrices.

    ``spectrum`` (F, Lb, K, pa*pb): every block's singular values, sorted descending and
    complete (beyond them the block is exactly zero); ``total_sq`` (F,): ||A||^2 ||B||^2,
    both in ``dtype``, the SVD's working precision (see :func:`svd_dtype`).
    """

    spectrum: torch.Tensor
    total_sq: torch.Tensor
    dtype: torch.dtype
    _order: torch.Tensor
    _factor_svds: tuple
    _indices: tuple
    _shape: Tuple[int, int, int, int, int]

    def factors(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The top-k truncation of every block, split as u (F, Lb, K, k, S) and
        vh (F, Lb, K, k, P), both scaled by sqrt(sigma): block (l, k) = u^T vh."""
        f, lo, ki, s, p = self._shape
        (ua, vha), (ub, vhb) = self._factor_svds
        (ra, ca), (rb, cb) = self._indices
        pb = vhb.shape[-2]
        ia, ib = self._order[..., :k] // pb, self._order[..., :k] % pb  # (F, Lb, K, k)
        fi = torch.arange(f, device=ua.device)[:, None, None, None]
        la, ka_ = ra[None, :, None, None], ca[None, None, :, None]
        lb_, kb_ = rb[None, :, None, None], cb[None, None, :, None]
        # Selected singular vectors of every block, (F, Lb, K, k, .), then their Kronecker products.
        u_a, u_b = ua.transpose(-1, -2)[fi, la, ka_, ia], ub.transpose(-1, -2)[fi, lb_, kb_, ib]
        v_a, v_b = vha[fi, la, ka_, ia], vhb[fi, lb_, kb_, ib]
        root = self.spectrum[..., :k].sqrt().to(self.dtype)[..., None]
        u = (u_a[..., :, None] * u_b[..., None, :]).reshape(f, lo, ki, k, s) * root
        vh = (v_a[..., :, None] * v_b[..., None, :]).reshape(f, lo, ki, k, p) * root
        return u, vh


def kron_block_svd(a: torch.Tensor, b: torch.Tensor, blocks: Blocks) -> Optional[KroneckerBlockSVD]:
    """The blockwise SVD of A ⊗ B on the grid ``blocks`` without forming A ⊗ B; None when
    the grid does not cut A ⊗ B into Kronecker products (see :func:`kron_block_sets`)."""
    sets = kron_block_sets(a, b, blocks)
    if sets is None:
        return None
    f, a1, a2 = a.shape
    _, b1, b2 = b.shape
    lo, ki = blocks
    a_sets, b_sets, (ra, ca), (rb, cb) = sets
    wd = svd_dtype(a.dtype)
    ua, sa, vha = svd(a_sets.to(wd))
    ub, sb, vhb = svd(b_sets.to(wd))
    prods = (per_block(sa, ra, ca)[..., :, None] * per_block(sb, rb, cb)[..., None, :]).flatten(-2)
    spectrum, order = torch.sort(prods, dim=-1, descending=True)  # (F, Lb, K, pa*pb)
    total = frobenius_sq(a.to(wd)) * frobenius_sq(b.to(wd))
    return KroneckerBlockSVD(spectrum=spectrum, total_sq=total, dtype=wd, _order=order,
                             _factor_svds=((ua, vha), (ub, vhb)), _indices=((ra, ca), (rb, cb)),
                             _shape=(f, lo, ki, a1 * b1 // lo, a2 * b2 // ki))


__all__ = ["Blocks", "KroneckerBlockSVD", "balanced_num_blocks", "block_view", "check_block_rank",
           "check_num_blocks", "kron_block_sets", "kron_block_svd", "per_block", "svd_dtype"]
