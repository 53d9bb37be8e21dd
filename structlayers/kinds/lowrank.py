"""``lowrank``: the Eckart–Young optimal rank-r truncation, W ≈ left @ right.

From a dense weight: a full SVD, or for large matrices a randomized range finder
(Gaussian sketch, oversampling, power iterations). From A ⊗ B: the singular
triplets of the product are products of the factors' triplets, so the optimal
rank-r approximation takes the r largest σ_i(A) σ_j(B) and builds each kept
singular vector u_i(A) ⊗ u_j(B) directly: O(K^3) for the factor SVDs plus
O(r K^2) for the vectors, never a K^2 x K^2 matrix.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import (
    as_folded_factors,
    as_folded_weight,
    check_budget,
    check_bool,
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_rank_range,
    make_generator,
    rank_for_params_share,
)
from ..linalg.kron import frobenius_sq, kron_columns, kron_rows
from ..linalg.svd import (
    randomized_svd,
    smallest_rank_for_tolerance,
    svd,
    tail_error_sq,
    top_kronecker_pairs,
)
from ._factored import (
    STRUCTURES,
    FactoredLayer,
    check_square_factors,
    choose_split,
    kronecker_split_params,
)

METHODS = ("auto", "exact", "randomized")
# "auto" switches to the randomized SVD above this size when the rank is small.
RANDOMIZED_MIN_SIZE = 1024


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split U S Vh as (U sqrt(S)) (sqrt(S) Vh) so both factors train at a similar scale."""
    root = s.sqrt().to(dtype)
    return u * root[:, None, :], root[:, :, None] * vh


class LowRank(FactoredLayer, kind="lowrank"):
    """Optimal low-rank layer. Random init: ``LowRank(in, out, F, rank=r)``."""

    rank_is_matrix_rank = True
    optimal_rank_option = "rank"
    meets_tolerance = True
    square_form = True
    kronecker_choose_options = ({}, {"structure": "kronecker"})
    rank_meaning = "the matrix rank of W (kronecker structure: ka·kb)"

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
        method: str = "auto",
        oversampling: int = 10,
        power_iterations: int = 2,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "LowRank":
        """Best rank-r approximation of W (F, out, in).

        method: ``exact`` (full SVD), ``randomized`` (range finder; with a
        tolerance the sketch doubles until the tolerance is met, the error of a
        projection being exact), or ``auto`` (randomized when min(out, in) >
        1024 and the rank is below a quarter of it).
        """
        w = as_folded_weight(weight).detach()
        check_budget(rank, tolerance, params_share, required=cls.kind)
        check_choice(method, METHODS, "method")
        oversampling = check_nonnegative_int(oversampling, "oversampling")
        power_iterations = check_nonnegative_int(power_iterations, "power_iterations")
        f, out, inp = w.shape
        max_rank = min(out, inp)
        if params_share is not None:
            rank = rank_for_params_share(params_share, f * out * inp, lambda r: f * r * (out + inp),
                                         max_rank, "low-rank layer")
        if rank is not None:
            check_rank_range(rank, max_rank, f"a {out} x {inp} matrix")
        gen = make_generator(seed, generator)
        if method == "auto":
            small = rank is not None and rank * 4 <= max_rank
            method = "randomized" if max_rank > RANDOMIZED_MIN_SIZE and small else "exact"
        total = frobenius_sq(w)
        if method == "exact":
            u, s, vh = svd(w)
            if rank is None:
                rank = smallest_rank_for_tolerance(tail_error_sq(s), total, tolerance) or max_rank
        elif rank is not None:
            u, s, vh = randomized_svd(w, rank, oversampling=oversampling,
                                      power_iterations=power_iterations, generator=gen)
        else:
            size = 16
            while True:
                size = min(size, max_rank)
                u, s, vh = randomized_svd(w, size, oversampling=oversampling,
                                          power_iterations=power_iterations, generator=gen)
                rank = smallest_rank_for_tolerance(tail_error_sq(s, total), total, tolerance)
                if rank is not None:
                    break
                if size == max_rank:  # cannot happen in exact arithmetic; keep everything
                    rank = max_rank
                    break
                size *= 2
        left, right = _balanced(u[:, :, :rank], s[:, :rank], vh[:, :rank, :], w.dtype)
        return cls._from_flat(left, right)

    @classmethod
    def from_kronecker(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
        structure: Optional[str] = None,
        factor_ranks: Optional[Tuple[int, int]] = None,
        square: bool = False,
    ) -> "LowRank":
        """Low-rank approximation of W = A ⊗ B from the factors' SVDs.

        structure ``flat`` (default): the exact Eckart–Young optimum of A ⊗ B.
        structure ``kronecker``: trunc(A, ka) ⊗ trunc(B, kb), the best approximation
        that is itself a Kronecker product of rank-(ka, kb) factors; cheaper to
        apply. ``square=True`` (needs B == conj(A)) keeps the result in the form
        A~ ⊗ conj(A~) with a single stored factor, so squared circuits stay squares.
        """
        a, b = as_folded_factors(a, b)
        a, b = a.detach(), b.detach()
        # factor_ranks is a budget of its own: then rank, tolerance and params_share are optional
        check_budget(rank, tolerance, params_share, required=cls.kind if factor_ranks is None else None,
                     also=("factor_ranks",))
        square = check_bool(square, "square")
        default = "kronecker" if square or factor_ranks is not None else "flat"
        structure = check_choice(default if structure is None else structure,
                                 STRUCTURES, "structure")
        if square:
            check_square_factors(a, b)
            if structure != "kronecker":
                raise ValueError("square=True keeps A~ ⊗ conj(A~): it needs structure='kronecker'")
        if structure == "flat" and factor_ranks is not None:
            raise ValueError("factor_ranks only applies to structure='kronecker'")
        f, a1, a2 = a.shape
        _, b1, b2 = b.shape
        out, inp = a1 * b1, a2 * b2
        ua, sa, vha = svd(a)
        ub, sb, vhb = svd(b)
        na, nb = frobenius_sq(a), frobenius_sq(b)
        total = na * nb
        if structure == "flat":
            max_rank = sa.shape[1] * sb.shape[1]
            if params_share is not None:
                rank = rank_for_params_share(params_share, f * out * inp, lambda r: f * r * (out + inp),
                                             max_rank, "low-rank layer")
            elif tolerance is not None:
                spectrum = torch.sort((sa[:, :, None] * sb[:, None, :]).reshape(f, -1), dim=1, descending=True).values
                rank = smallest_rank_for_tolerance(tail_error_sq(spectrum), total, tolerance) or max_rank
            check_rank_range(check_positive_int(rank, "rank"), max_rank,
                             f"A ⊗ B with factors {(a1, a2)} and {(b1, b2)} (at most "
                             f"{sa.shape[1]}*{sb.shape[1]} non-zero singular values)")
            ia, ib, values = top_kronecker_pairs(sa, sb, rank)
            root = values.sqrt().to(a.dtype)
            left = kron_columns(ua, ub, ia, ib) * root[:, None, :]
            right = kron_rows(vha, vhb, ia, ib) * root[:, :, None]
            return cls._from_flat(left, right)

        # Energy kept by / left out of the top-k truncation of each factor, k = 1..p.
        kept_a = torch.cumsum(sa.double() ** 2, 1)
        tail_a, tail_b = tail_error_sq(sa)[:, 1:], tail_error_sq(sb)[:, 1:]

        def errors_for(kas, kbs):
            ia, ib = torch.tensor(kas) - 1, torch.tensor(kbs) - 1
            # ||A||^2 ||B||^2 - kept_a kept_b = tail_a ||B||^2 + kept_a tail_b, without cancellation.
            return (torch.einsum("fa,f->a", tail_a[:, ia], nb.double())[:, None]
                    + torch.einsum("fa,fb->ab", kept_a[:, ia], tail_b[:, ib]))

        ka, kb = choose_split(
            max_a=sa.shape[1], max_b=sb.shape[1], errors_for=errors_for, total_sq=float(total.sum()),
            params_for=kronecker_split_params(f, ((a1, a2), (b1, b2)), square),
            dense_params=f * out * inp, rank=rank, tolerance=tolerance, params_share=params_share,
            factor_ranks=factor_ranks, tied=square)
        left_a, right_a = _balanced(ua[:, :, :ka], sa[:, :ka], vha[:, :ka, :], a.dtype)
        if square:
            return cls._from_kronecker_factors(left_a, right_a)
        left_b, right_b = _balanced(ub[:, :, :kb], sb[:, :kb], vhb[:, :kb, :], b.dtype)
        return cls._from_kronecker_factors(left_a, right_a, left_b, right_b)
