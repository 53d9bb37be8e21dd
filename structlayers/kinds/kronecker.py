"""``kronecker``: W[f] = sum_t A_t[f] ⊗ B_t[f], applied as small products, never formed.

With one term (the default, and what ``from_kronecker`` builds) this is the exact
fast path for the Kronecker-weighted sum layers of squared circuits: per sample it
costs a1*a2*b2 + a1*b2*b1 multiply-adds (O(K^3) for K x K factors) instead of
(a1*b1)*(a2*b2) (O(K^4)). ``from_dense`` finds the nearest sum of ``rank`` Kronecker
products (Van Loan & Pitsianis: an SVD of the rearranged weight), exact when
``rank`` reaches the Kronecker rank of W.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .._checks import (
    as_folded_factors,
    as_folded_weight,
    check_budget,
    check_positive_int,
    check_rank_range,
    make_generator,
    rank_for_params_share,
)
from ..base import Order, StructuredSumLayer, owned_parameter, random_normal
from ..linalg.contract import contract_dense, gemm_work
from ..linalg.kron import (
    FactorShapes,
    balanced_factor_shapes,
    check_factor_shapes,
    frobenius_sq,
    inner,
    kron_apply,
    kron_chain_flops,
    kron_sum_apply,
)
from ..linalg.svd import smallest_rank_for_tolerance, svd, tail_error_sq

class Kronecker(StructuredSumLayer, kind="kronecker"):
    """Sum of ``rank`` Kronecker products per fold.

    Parameters ``a`` (F, rank, a1, a2) and ``b`` (F, rank, b1, b2); out = a1*b1,
    in = a2*b2. ``factor_shapes`` defaults to :func:`~structlayers.linalg.kron.balanced_factor_shapes`.
    """

    exact_from_kronecker = True
    optimal_rank_option = "rank"  # Van Loan–Pitsianis: the optimal sum of rank Kronecker products
    meets_tolerance = True
    rank_meaning = "the number of Kronecker terms A_t ⊗ B_t (Kronecker rank)"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_folds: int = 1,
        *,
        factor_shapes: Optional[FactorShapes] = None,
        rank: int = 1,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        (a1, a2), (b1, b2) = check_factor_shapes(
            balanced_factor_shapes(self.out_features, self.in_features) if factor_shapes is None else factor_shapes,
            self.out_features, self.in_features)
        rank = check_positive_int(rank, "rank")
        gen = make_generator(seed, generator)
        # Var(W_ij) = rank * Var(a) Var(b) = 1 / (3 in), like nn.Linear.
        std = (1.0 / (3.0 * self.in_features * rank)) ** 0.25
        f = self.num_folds
        self.a = nn.Parameter(random_normal((f, rank, a1, a2), std, dtype=dtype, device=device, generator=gen))
        self.b = nn.Parameter(random_normal((f, rank, b1, b2), std, dtype=dtype, device=device, generator=gen))

    @property
    def rank(self) -> int:
        """Number of Kronecker terms."""
        return self.a.shape[1]

    @property
    def factor_shapes(self) -> FactorShapes:
        return tuple(self.a.shape[2:]), tuple(self.b.shape[2:])  # type: ignore[return-value]

    def config(self) -> dict:
        return {**super().config(), "factor_shapes": self.factor_shapes, "rank": self.rank}

    def _structured_orders(self, batch_size: int):
        per_sample = kron_chain_flops([self.a[:, 0]], [self.b[:, 0]])
        (a1, a2), (b1, b2) = self.factor_shapes
        hidden = self.rank * max(a1 * b2, a2 * b1)
        batch = batch_size * self.num_folds
        macs = batch * self.rank * per_sample
        # one of the two products runs as many small matmuls of the factors' size
        return (Order("Kronecker factors", macs, batch * max(hidden, self.out_features),
                      batch * (2 * hidden + self.out_features), 4, work=gemm_work(macs, a1, min(a2, b2), b1)),)

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 1:
            return kron_apply([self.a[:, 0]], [self.b[:, 0]], x)
        return kron_sum_apply(self.a, self.b, x)

    def _rebuild_macs(self) -> int:
        return self.num_folds * self.rank * self.out_features * self.in_features

    def kronecker_terms(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.a, self.b

    def to_dense(self) -> torch.Tensor:
        """sum_t A_t ⊗ B_t: one GEMM over the term index per fold."""
        (a1, a2), (b1, b2) = self.factor_shapes
        w = contract_dense(("ftij", "ftkl"), "fikjl", (self.a, self.b))
        return w.reshape(self.num_folds, a1 * b1, a2 * b2)

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.factor_shapes != (tuple(a.shape[1:]), tuple(b.shape[1:])):
            return super()._inner_kronecker(a, b)
        return (inner(a[:, None], self.a) * inner(b[:, None], self.b)).sum(dim=1)

    def _scaling(self):
        return [(self.a, 0.5), (self.b, 0.5)]

    def _frobenius_sq(self) -> torch.Tensor:
        gram_a = torch.einsum("fsij,ftij->fst", self.a.conj(), self.a)
        gram_b = torch.einsum("fsij,ftij->fst", self.b.conj(), self.b)
        return (gram_a * gram_b).sum(dim=(1, 2)).real

    @classmethod
    def _from_terms(cls, a: torch.Tensor, b: torch.Tensor) -> "Kronecker":
        """From term factors a (F, R, a1, a2), b (F, R, b1, b2)."""
        f, _, a1, a2 = a.shape
        layer = cls._bare(a2 * b.shape[3], a1 * b.shape[2], f)
        layer.a = owned_parameter(a)
        layer.b = owned_parameter(b)
        return layer

    @classmethod
    def from_kronecker(cls, a: torch.Tensor, b: torch.Tensor) -> "Kronecker":
        """Exact: stores A and B (one term)."""
        a, b = as_folded_factors(a, b)
        return cls._from_terms(a[:, None], b[:, None])

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        factor_shapes: Optional[FactorShapes] = None,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
    ) -> "Kronecker":
        """Nearest sum of Kronecker products to W (F, out, in) in Frobenius norm.

        With no budget the full Kronecker rank min(a1*a2, b1*b2) is used: exact.
        """
        w = as_folded_weight(weight).detach()
        check_budget(rank, tolerance, params_share)
        f, out, inp = w.shape
        shapes = balanced_factor_shapes(out, inp) if factor_shapes is None else factor_shapes
        (a1, a2), (b1, b2) = check_factor_shapes(shapes, out, inp)
        # Rearranged so that W = sum_t A_t ⊗ B_t becomes sum_t vec(A_t) vec(B_t)^T.
        rearranged = w.reshape(f, a1, b1, a2, b2).permute(0, 1, 3, 2, 4).reshape(f, a1 * a2, b1 * b2)
        u, s, vh = svd(rearranged)
        max_rank = s.shape[1]
        total = frobenius_sq(w)
        if rank is not None:
            check_rank_range(rank, max_rank, f"a Kronecker sum with factor shapes {((a1, a2), (b1, b2))}")
        elif tolerance is not None:
            rank = smallest_rank_for_tolerance(tail_error_sq(s), total, tolerance) or max_rank
        elif params_share is not None:
            rank = rank_for_params_share(params_share, f * out * inp, lambda r: f * r * (a1 * a2 + b1 * b2),
                                         max_rank, "Kronecker sum")
        else:
            rank = max_rank
        root = s[:, :rank].sqrt().to(w.dtype)
        a = (u[:, :, :rank] * root[:, None, :]).transpose(1, 2).reshape(f, rank, a1, a2)
        b = (vh[:, :rank, :] * root[:, :, None]).reshape(f, rank, b1, b2)
        return cls._from_terms(a, b)
