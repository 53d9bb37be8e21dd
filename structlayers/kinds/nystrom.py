"""``nystrom``: CUR / Nyström layers, W ≈ C (C⁺ W R⁺) R from k chosen columns and rows.

Pivot strategies: ``uniform``, ``l2``, ``leverage``, ``deim``, ``qr`` (default;
deterministic). ``oversampling`` (default 2) draws that many pivots per unit of
rank and truncates the core back to the rank; ``oversampling=1`` is classical
CUR with the projection core C⁺WR⁺. The pseudo-inverse of the intersection
W[I, J] is never used (see :mod:`structlayers.linalg.cur`).

For W = A ⊗ B the default ``kronecker`` structure picks a product grid of pivots,
columns J_A x J_B and rows I_A x I_B, for which CUR(A ⊗ B) = CUR(A) ⊗ CUR(B)
exactly; each factor gets its own CUR of rank ka / kb. ``structure='flat'``
instead pivots jointly over the product's rows and columns.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from .._checks import (
    as_folded_factors,
    as_folded_weight,
    check_bool,
    check_budget,
    check_choice,
    check_positive_int,
    check_rank_range,
    make_generator,
    rank_for_params_share,
)
from ..linalg.cur import CURFactors, cur_dense, cur_error_sq, cur_kronecker_joint, num_pivots
from ..linalg.kron import frobenius_sq, inner, kron_inner_lowrank, lowrank_frobenius_sq
from ..linalg.pivots import PIVOT_STRATEGIES
from ..linalg.svd import kronecker_singular_values, smallest_rank_for_tolerance, tail_error_sq
from ._factored import (
    STRUCTURES,
    FactoredLayer,
    check_square_factors,
    choose_split,
    kronecker_split_params,
)


def _search_rank(error_sq_at: Callable[[int], float], start: int, max_rank: int, target_sq: float) -> int:
    """A rank k >= start whose error meets target_sq: grow geometrically, then bisect.

    CUR errors need not fall monotonically with k, so this returns the smallest
    qualifying k on the bisection path, not necessarily the global smallest.
    """
    cache: Dict[int, bool] = {}

    def ok(k: int) -> bool:
        if k not in cache:
            cache[k] = error_sq_at(k) <= target_sq * (1 + 1e-12)
        return cache[k]

    lo, hi = start - 1, max(start, 1)
    while not ok(hi):
        if hi >= max_rank:
            return max_rank
        lo, hi = hi, min(max_rank, math.ceil(hi * 1.5))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


class Nystrom(FactoredLayer, kind="nystrom"):
    """CUR / Nyström layer. Random init: ``Nystrom(in, out, F, rank=r)`` (same storage as lowrank)."""

    pivot_strategies = PIVOT_STRATEGIES
    rank_is_matrix_rank = True
    meets_tolerance = True
    square_form = True
    kronecker_choose_options = ({}, {"structure": "flat"})
    rank_meaning = "the matrix rank of W, the CUR's kept rank (product grid: ka·kb)"

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
        strategy: str = "qr",
        oversampling: float = 2.0,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "Nystrom":
        """Rank-k CUR of W (F, out, in) from ceil(oversampling * k) columns and rows."""
        w = as_folded_weight(weight).detach()
        check_budget(rank, tolerance, params_share, required=cls.kind)
        check_choice(strategy, PIVOT_STRATEGIES, "pivot strategy")
        num_pivots(1, oversampling, 1)  # validates oversampling
        gen = make_generator(seed, generator)
        f, out, inp = w.shape
        max_rank = min(out, inp)
        if params_share is not None:
            rank = rank_for_params_share(params_share, f * out * inp, lambda r: f * r * (out + inp),
                                         max_rank, "Nyström layer")
        if rank is not None:
            check_rank_range(rank, max_rank, f"a {out} x {inp} matrix")
            factors = cur_dense(w, rank, strategy, gen, oversampling)
        else:
            total = frobenius_sq(w)
            s = torch.linalg.svdvals(w)
            start = smallest_rank_for_tolerance(tail_error_sq(s), total, tolerance) or max_rank
            found: Dict[int, CURFactors] = {}

            def error_sq_at(k: int) -> float:
                found[k] = cur_dense(w, k, strategy, gen, oversampling)
                return float(cur_error_sq(w, found[k]).sum())

            k = _search_rank(error_sq_at, start, max_rank, tolerance**2 * float(total.sum()))
            factors = found[k] if k in found else cur_dense(w, k, strategy, gen, oversampling)
        return cls._with_pivots(cls._from_flat(factors.left, factors.right), factors, strategy)

    @classmethod
    def from_kronecker(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
        strategy: str = "qr",
        oversampling: float = 2.0,
        structure: str = "kronecker",
        factor_ranks: Optional[Tuple[int, int]] = None,
        square: bool = False,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "Nystrom":
        """CUR of W = A ⊗ B without forming W.

        structure ``kronecker`` (default): product-grid pivots, CUR(A) ⊗ CUR(B);
        ``rank`` is ka*kb, split to minimise the error unless ``factor_ranks``
        is given. ``square=True`` (needs B == conj(A)) uses the same pivots on
        both sides and stores one factor, keeping A~ ⊗ conj(A~).
        structure ``flat``: k pivots chosen jointly over the product.
        """
        a, b = as_folded_factors(a, b)
        a, b = a.detach(), b.detach()
        # factor_ranks is a budget of its own: then rank, tolerance and params_share are optional
        check_budget(rank, tolerance, params_share, required=cls.kind if factor_ranks is None else None,
                     also=("factor_ranks",))
        check_choice(strategy, PIVOT_STRATEGIES, "pivot strategy")
        check_choice(structure, STRUCTURES, "structure")
        num_pivots(1, oversampling, 1)  # validates oversampling
        square = check_bool(square, "square")
        if square:
            check_square_factors(a, b)
            if structure != "kronecker":
                raise ValueError("square=True keeps A~ ⊗ conj(A~): it needs structure='kronecker'")
        if structure == "flat" and factor_ranks is not None:
            raise ValueError("factor_ranks only applies to structure='kronecker'")
        gen = make_generator(seed, generator)
        f, a1, a2 = a.shape
        _, b1, b2 = b.shape
        out, inp = a1 * b1, a2 * b2
        total = frobenius_sq(a) * frobenius_sq(b)
        if structure == "flat":
            return cls._joint(a, b, rank, tolerance, params_share, strategy, oversampling, gen, total)

        per_a: Dict[int, CURFactors] = {}
        per_b: Dict[int, CURFactors] = {}

        def factor_cur(cache, m, k):
            if k not in cache:
                cache[k] = cur_dense(m, k, strategy, gen, oversampling)
            return cache[k]

        def stats(cache, m, k):
            c = factor_cur(cache, m, k)
            return inner(m, c.left @ c.right), lowrank_frobenius_sq(c.left, c.right)

        def errors_for(kas, kbs):
            sa = [stats(per_a, a, k) for k in kas]
            sb = [stats(per_a, a, k) for k in kbs] if square else [stats(per_b, b, k) for k in kbs]
            if square:  # B side is conj(A side): <B, conj L> = conj <A, L>
                sb = [(ip.conj(), n) for ip, n in sb]
            ia = torch.stack([s[0] for s in sa], 1).to(torch.complex128)  # (F, |kas|)
            ib = torch.stack([s[0] for s in sb], 1).to(torch.complex128)
            nra = torch.stack([s[1] for s in sa], 1).double()
            nrb = torch.stack([s[1] for s in sb], 1).double()
            err = (total.double().sum() - 2 * torch.einsum("fa,fb->ab", ia, ib).real
                   + torch.einsum("fa,fb->ab", nra, nrb))
            return err.clamp_min(0)

        ka, kb = choose_split(
            max_a=min(a1, a2), max_b=min(b1, b2), errors_for=errors_for, total_sq=float(total.sum()),
            params_for=kronecker_split_params(f, ((a1, a2), (b1, b2)), square),
            dense_params=f * out * inp, rank=rank, tolerance=tolerance, params_share=params_share,
            factor_ranks=factor_ranks, tied=square)
        ca = factor_cur(per_a, a, ka)
        if square:
            layer = cls._from_kronecker_factors(ca.left, ca.right)
            return cls._with_pivots(layer, ca, strategy, ca)
        cb = factor_cur(per_b, b, kb)
        layer = cls._from_kronecker_factors(ca.left, ca.right, cb.left, cb.right)
        return cls._with_pivots(layer, ca, strategy, cb)

    @classmethod
    def _joint(cls, a, b, rank, tolerance, params_share, strategy, oversampling, gen, total) -> "Nystrom":
        f, a1, a2 = a.shape
        _, b1, b2 = b.shape
        out, inp = a1 * b1, a2 * b2
        max_rank = min(out, inp)
        if params_share is not None:
            rank = rank_for_params_share(params_share, f * out * inp, lambda r: f * r * (out + inp),
                                         max_rank, "Nyström layer")
        if rank is not None:
            check_rank_range(check_positive_int(rank, "rank"), max_rank, f"a {out} x {inp} matrix")
            factors = cur_kronecker_joint(a, b, rank, strategy, gen, oversampling)
        else:
            spectrum = kronecker_singular_values(a, b)
            start = smallest_rank_for_tolerance(tail_error_sq(spectrum), total, tolerance) or max_rank
            found: Dict[int, CURFactors] = {}

            def error_sq_at(k: int) -> float:
                c = found[k] = cur_kronecker_joint(a, b, k, strategy, gen, oversampling)
                err = total - 2 * kron_inner_lowrank(a, b, c.left, c.right).real + lowrank_frobenius_sq(c.left, c.right)
                return float(err.sum())

            k = _search_rank(error_sq_at, start, max_rank, tolerance**2 * float(total.sum()))
            factors = found[k] if k in found else cur_kronecker_joint(a, b, k, strategy, gen, oversampling)
        return cls._with_pivots(cls._from_flat(factors.left, factors.right), factors, strategy)

    @staticmethod
    def _with_pivots(layer: "Nystrom", factors: CURFactors, strategy: str,
                     factors_b: Optional[CURFactors] = None) -> "Nystrom":
        """Record which columns/rows were chosen (plain attributes, not state)."""
        layer.strategy = strategy
        layer.pivots = {"cols": factors.cols, "rows": factors.rows}
        if factors_b is not None:
            layer.pivots.update({"cols_b": factors_b.cols, "rows_b": factors_b.rows})
        return layer
