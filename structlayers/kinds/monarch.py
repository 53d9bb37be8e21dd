"""``monarch``: Monarch matrices (Dao et al., 2022), W = P_out · L · P_mid · R.

R and L are block-diagonal and the two permutations are fixed reshape-transposes,
so the forward is two batched block products and two transposes; no (out, in)
matrix is ever formed. Generalised to rectangular shapes, separate block counts
for the two factors, and a "block rank" r that widens the middle dimension:

* input  index ``k * P + p``  (k < K input blocks of size P = in / K),
* output index ``s * Lb + l`` (l < Lb output blocks of size S = out / Lb,
  strided: the final permutation interleaves them),
* ``right`` (F, K, Lb*r, P):  K diagonal blocks of R, rows ordered (l, t),
* ``left``  (F, Lb, S, K*r):  Lb diagonal blocks of L, columns ordered (k, t),

    W[s*Lb + l, k*P + p] = sum_{t < r} left[l, s, k*r + t] * right[k, l*r + t, p].

For square n = m^2 with Lb = K = m and r = 1 this is exactly Dao et al.'s
P L P^T R. Viewed as a grid of Lb x K blocks W_{l,k} (rows s*Lb + l, columns
k*P + p), each block is the product of one (S, r) slice of L and one (r, P) slice
of R, and the slices of different blocks are disjoint parameters. So

* the class is exactly {W : every block W_{l,k} has rank <= r}; it grows with r
  and at r = min(S, P) contains every (out, in) matrix;
* the Frobenius-optimal projection onto it is a truncated SVD of every block
  (Dao et al., Monarch paper, Theorem 1 / Algorithm 1): done batched over
  blocks and folds by :meth:`Monarch.from_dense`; the error of every r follows
  exactly from the blockwise singular values.

A Kronecker product is a Monarch matrix: with Lb = b1 blocks of size a1 and
K = a2 blocks of size b2, block (l, k) of A ⊗ B is A[:, k] B[l, :] (rank 1), and
A ⊗ B = P_out (I_{b1} ⊗ A) P_mid (I_{a2} ⊗ B): every block of L is A and every
block of R is B. For other block counts where (Lb, b1) and (P, b2) divide one
another, every block is itself a Kronecker product A_sub ⊗ B_sub of sub-matrices
of the factors, so the blockwise SVD comes from the factors' small SVDs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .._checks import (
    as_folded_factors,
    as_folded_weight,
    check_budget,
    make_generator,
    rank_for_params_share,
)
from ..base import Order, StructuredSumLayer, owned_parameter, random_normal
from ..linalg.blocks import (
    Blocks,
    block_view,
    check_block_rank,
    check_num_blocks,
    kron_block_sets,
    kron_block_svd,
    per_block,
    svd_dtype,
)
from ..linalg.contract import contract_dense, gemm_work
from ..linalg.kron import frobenius_sq
from ..linalg.svd import smallest_rank_for_tolerance, svd, tail_error_sq


def _params_for(num_folds: int, out: int, inp: int, blocks: Blocks):
    lo, ki = blocks
    return lambda r: num_folds * r * (lo * inp + ki * out)


def _choose_rank(spectrum: torch.Tensor, total_sq: torch.Tensor, max_rank: int, *, block_rank, tolerance,
                 params_share, params_for, dense_params: int, default: int, out_block: int, in_block: int,
                 blocks: Blocks) -> int:
    """The block rank for a budget. ``spectrum``: (F, Lb, K, p) blockwise singular values, each
    block's sorted descending and complete (p = the rank beyond which errors stay 0)."""
    if block_rank is not None:
        return check_block_rank(block_rank, out_block, in_block, blocks)
    if tolerance is not None:
        f, lo, ki, p = spectrum.shape
        errors = tail_error_sq(spectrum.reshape(f * lo * ki, p)).reshape(f, lo * ki, p + 1).sum(dim=1)
        return smallest_rank_for_tolerance(errors, total_sq, float(tolerance)) or p
    if params_share is not None:
        return rank_for_params_share(float(params_share), dense_params, params_for, max_rank,
                                     f"Monarch layer with num_blocks={blocks}")
    return default


# ------------------------------------------------------------------------ layer
class Monarch(StructuredSumLayer, kind="monarch"):
    """Monarch layer: W = P_out L P_mid R with block-diagonal L, R (see the module docstring).

    Args:
        num_blocks: ``(blocks_out, blocks_in)`` = (number of diagonal blocks of L,
            number of diagonal blocks of R), or one int for both; must divide
            out_features and in_features. Default: per side the largest divisor
            <= sqrt(features) (32 for 1024).
        block_rank: r, the rank of every (output block, input block) pair of W;
            at most min(out / blocks_out, in / blocks_in).

    Parameters ``right`` (F, blocks_in, blocks_out*r, in/blocks_in) and ``left``
    (F, blocks_out, out/blocks_out, blocks_in*r). Initialised with each factor
    at its own fan-in scale, Var(right) = 1/P and Var(left) = 1/(3 K r), so that
    Var(W_ij) = r * Var(left) * Var(right) = 1/(3 in), like ``nn.Linear``.
    """

    rank_meaning = "the block rank (block_rank): the rank of every block of W"
    optimal_rank_option = "block_rank"  # a truncated SVD of every block is the optimal projection
    meets_tolerance = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_folds: int = 1,
        *,
        num_blocks=None,
        block_rank: int = 1,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        f, out, inp = self.num_folds, self.out_features, self.in_features
        lo, ki = check_num_blocks(num_blocks, out, inp)
        s, p = out // lo, inp // ki
        r = check_block_rank(block_rank, s, p, (lo, ki))
        gen = make_generator(seed, generator)
        self.right = nn.Parameter(random_normal((f, ki, lo * r, p), 1.0 / math.sqrt(p),
                                                dtype=dtype, device=device, generator=gen))
        self.left = nn.Parameter(random_normal((f, lo, s, ki * r), 1.0 / math.sqrt(3.0 * ki * r),
                                               dtype=dtype, device=device, generator=gen))

    # ------------------------------------------------------------ shapes
    @property
    def num_blocks(self) -> Blocks:
        """(blocks_out, blocks_in): the number of diagonal blocks of L and of R."""
        return self.left.shape[1], self.right.shape[1]

    @property
    def block_shape(self) -> Tuple[int, int]:
        """(S, P) = (out / blocks_out, in / blocks_in), the shape of one block of W."""
        return self.left.shape[2], self.right.shape[3]

    @property
    def block_rank(self) -> int:
        return self.left.shape[3] // self.right.shape[1]

    @property
    def max_block_rank(self) -> int:
        """min(S, P): the block rank at which every matrix of this shape is representable."""
        return min(self.block_shape)

    def config(self) -> dict:
        return {**super().config(), "num_blocks": self.num_blocks, "block_rank": self.block_rank}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_blocks={self.num_blocks}, block_rank={self.block_rank}"

    def _views(self):
        """left as (F, Lb, S, K, r) and right as (F, K, Lb, r, P)."""
        f = self.num_folds
        (lo, ki), (s, p), r = self.num_blocks, self.block_shape, self.block_rank
        return self.left.reshape(f, lo, s, ki, r), self.right.reshape(f, ki, lo, r, p)

    # ----------------------------------------------------------- compute
    def _structured_orders(self, batch_size: int):
        """R then L: batch * F * r * (blocks_out * in + blocks_in * out) multiply-adds."""
        (lo, ki), r = self.num_blocks, self.block_rank
        per_sample = r * (lo * self.in_features + ki * self.out_features)
        batch = batch_size * self.num_folds
        middle = lo * ki * r
        (s, p) = self.block_shape
        # two batched GEMMs per (fold, block): (N x P) @ (P x Lb r), then (N x K r) @ (K r x S)
        work = (gemm_work(batch * r * lo * self.in_features, batch_size, p, lo * r)
                + gemm_work(batch * r * ki * self.out_features, batch_size, ki * r, s))
        return (Order("block products", batch * per_sample, batch * max(middle, self.out_features),
                      batch * 2 * (middle + self.out_features), 4, work=work),)

    def _rebuild_macs(self) -> int:
        return self.num_folds * self.block_rank * self.out_features * self.in_features

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        f, n, _ = x.shape
        (lo, ki), (s, p), r = self.num_blocks, self.block_shape, self.block_rank
        # R: one GEMM per (fold, input block): (F, K, N, P) @ (F, K, P, Lb*r).
        z = torch.matmul(x.reshape(f, n, ki, p).transpose(1, 2), self.right.transpose(2, 3))
        # P_mid: middle index (k, l, t) -> (l, k, t), stored sample-major (F, N, Lb, K*r): the
        # forward's one copy, N*Lb*K*r elements per fold; both GEMMs read strided views.
        z = z.reshape(f, ki, n, lo, r).permute(0, 2, 3, 1, 4).contiguous().reshape(f, n, lo, ki * r)
        # L: one GEMM per (fold, output block): (F, Lb, N, K*r) @ (F, Lb, K*r, S).
        y = torch.matmul(z.transpose(1, 2), self.left.transpose(2, 3))
        # P_out: (l, s) -> output index s*Lb + l.
        return y.permute(0, 2, 3, 1).reshape(f, n, s * lo)

    def to_dense(self) -> torch.Tensor:
        left, right = self._views()
        w = contract_dense(("flskt", "fkltp"), "fslkp", (left, right))
        return w.reshape(self.num_folds, self.out_features, self.in_features)

    def _scaling(self):
        return [(self.left, 0.5), (self.right, 0.5)]

    def _frobenius_sq(self) -> torch.Tensor:
        # ||W||^2 = sum over blocks of tr((L_b^H L_b)(R_b R_b^H)), from r x r Gram matrices.
        left, right = self._views()
        gram_left = torch.einsum("flskt,flsku->flktu", left.conj(), left)
        gram_right = torch.einsum("fkltp,fklup->flkut", right, right.conj())
        return (gram_left * gram_right).sum(dim=(1, 2, 3, 4)).real

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sets = kron_block_sets(a, b, self.num_blocks)
        if sets is None:
            return super()._inner_kronecker(a, b)
        a_sets, b_sets, (ra, ca), (rb, cb) = sets
        a_blk, b_blk = per_block(a_sets, ra, ca), per_block(b_sets, rb, cb)  # (F, Lb, K, ., .)
        f, lo, ki, nra, nca = a_blk.shape
        nrb, ncb = b_blk.shape[3:]
        left, right = self._views()
        r = self.block_rank
        lv = left.permute(0, 1, 3, 2, 4).reshape(f, lo, ki, nra, nrb, r)  # block rows (i, kb)
        rv = right.transpose(1, 2).reshape(f, lo, ki, r, nca, ncb)  # block columns (j, lb)
        x = torch.einsum("flkij,flkimt->flkjmt", a_blk.conj(), lv)
        x = torch.einsum("flkjmt,flkmn->flkjnt", x, b_blk.conj())
        return torch.einsum("flkjnt,flktjn->f", x, rv)

    # ------------------------------------------------------- constructors
    @classmethod
    def _from_block_factors(cls, u: torch.Tensor, vh: torch.Tensor) -> "Monarch":
        """From per-block factors u (F, Lb, K, S, r) and vh (F, Lb, K, r, P): W_{l,k} = u vh."""
        f, lo, ki, s, r = u.shape
        p = vh.shape[-1]
        layer = cls._bare(ki * p, lo * s, f)
        layer.left = owned_parameter(u.permute(0, 1, 3, 2, 4).reshape(f, lo, s, ki * r))  # contiguous: same rounding as a fresh layer
        layer.right = owned_parameter(vh.transpose(1, 2).reshape(f, ki, lo * r, p))
        return layer

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        num_blocks=None,
        block_rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
    ) -> "Monarch":
        """Frobenius-optimal Monarch approximation of W (F, out, in): a truncated SVD of every block.

        Budget (at most one): ``block_rank`` r; ``tolerance``: the smallest r whose
        relative error over all folds is <= tolerance; ``params_share``: the largest
        r whose parameters fit in that share of a dense layer's. None: r = min(S, P),
        which reproduces W exactly.
        """
        w = as_folded_weight(weight).detach()
        check_budget(block_rank, tolerance, params_share, rank_name="block_rank")
        f, out, inp = w.shape
        blocks = check_num_blocks(num_blocks, out, inp)
        s, p = out // blocks[0], inp // blocks[1]
        work = w.to(svd_dtype(w.dtype))
        u, sv, vh = svd(block_view(work, blocks))  # blocks (F, Lb, K, S, P)
        max_rank = min(s, p)
        r = _choose_rank(sv, frobenius_sq(work), max_rank, block_rank=block_rank, tolerance=tolerance,
                         params_share=params_share, params_for=_params_for(f, out, inp, blocks),
                         dense_params=f * out * inp, default=max_rank, out_block=s, in_block=p, blocks=blocks)
        root = sv[..., :r].sqrt().to(work.dtype)
        return cls._from_block_factors((u[..., :r] * root[..., None, :]).to(w.dtype),
                                       (root[..., None] * vh[..., :r, :]).to(w.dtype))

    @classmethod
    def from_kronecker(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        num_blocks=None,
        block_rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
    ) -> "Monarch":
        """Monarch layer for W = A ⊗ B (A (F, a1, a2), B (F, b1, b2)), never forming W.

        Default num_blocks = (b1, a2): exact at block rank 1, with every block of L
        equal to A and every block of R equal to B. Other block grids need
        (blocks_out divides b1 or b1 divides blocks_out) and (P = in / blocks_in
        divides b2 or b2 divides P); every block is then a Kronecker product of
        sub-matrices of A and B, and its truncated SVD (the optimal projection,
        as in :meth:`from_dense`) is built from the factors' SVDs. Budgets as in
        :meth:`from_dense`; with none, the smallest block rank that is exact.
        ``params_share`` never goes beyond that exact rank (higher ranks would only
        add zero columns). An explicit ``block_rank`` above it is padded with zeros.
        """
        a, b = as_folded_factors(a, b)
        a, b = a.detach(), b.detach()
        check_budget(block_rank, tolerance, params_share, rank_name="block_rank")
        f, a1, a2 = a.shape
        _, b1, b2 = b.shape
        out, inp = a1 * b1, a2 * b2
        blocks = check_num_blocks((b1, a2) if num_blocks is None else num_blocks, out, inp)
        (lo, ki), s, p = blocks, out // blocks[0], inp // blocks[1]
        params_for = _params_for(f, out, inp, blocks)
        choose = dict(block_rank=block_rank, tolerance=tolerance, params_share=params_share,
                      params_for=params_for, dense_params=f * out * inp, out_block=s, in_block=p, blocks=blocks)
        if blocks == (b1, a2):
            # Exact at rank 1: the error is 0 for every budget, so 1 unless block_rank says more.
            ones = torch.ones(f, lo, ki, 1, dtype=torch.float64)
            r = _choose_rank(ones, ones.sum(dim=(1, 2, 3)), 1, default=1, **choose)
            left = torch.zeros(f, b1, a1, a2, r, dtype=a.dtype, device=a.device)
            right = torch.zeros(f, a2, b1, r, b2, dtype=b.dtype, device=b.device)
            left[..., 0] = a[:, None]
            right[:, :, :, 0, :] = b[:, None]
            layer = cls._bare(inp, out, f)
            layer.left = owned_parameter(left.reshape(f, b1, a1, a2 * r))
            layer.right = owned_parameter(right.reshape(f, a2, b1 * r, b2))
            return layer
        blockwise = kron_block_svd(a, b, blocks)
        if blockwise is None:
            raise ValueError(
                f"from_kronecker with num_blocks={blocks} for factors A {(a1, a2)} and B {(b1, b2)}: the "
                f"blocks of A ⊗ B are only Kronecker products of factor sub-matrices when blocks_out "
                f"({lo}) and b1 ({b1}) divide one another and the input block size in/blocks_in ({p}) and "
                f"b2 ({b2}) divide one another; choose such num_blocks (default ({b1}, {a2}) is exact), "
                f"or call from_dense on the materialised product explicitly")
        exact_rank = blockwise.spectrum.shape[-1]
        r = _choose_rank(blockwise.spectrum, blockwise.total_sq, exact_rank, default=exact_rank, **choose)
        k = min(r, exact_rank)
        u, vh = blockwise.factors(k)
        if r > k:  # explicit block_rank beyond the exact one: zero padding
            u = torch.cat([u, u.new_zeros(f, lo, ki, r - k, s)], dim=3)
            vh = torch.cat([vh, vh.new_zeros(f, lo, ki, r - k, p)], dim=3)
        return cls._from_block_factors(u.transpose(-1, -2).to(a.dtype), vh.to(a.dtype))
