"""Shared body of the low-rank family (``lowrank``, ``nystrom``).

Two storage structures, fixed at construction:

``flat``       W[f] = left[f] @ right[f]; left (F, out, r), right (F, r, in).
               Forward costs r * (in + out) multiply-adds per sample.
``kronecker``  W[f] = (left_a right_a)[f] ⊗ (left_b right_b)[f]: a Kronecker product of two
               low-rank factors with factor ranks (ka, kb), total rank ka*kb. Forward
               applies the four thin factors to the (a2, b2) view of x, roughly
               (ka + kb) * K^2 multiply-adds for K x K factors instead of ka*kb * 2K^2.
               With ``tied=True`` the B side is the complex conjugate of the A side
               (real: equal), so a squared circuit's A ⊗ conj(A) stays a square.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._checks import check_bool, check_positive_int, check_rank_range, make_generator
from ..base import Order, StructuredSumLayer, owned_parameter, random_normal
from ..linalg.contract import gemm_work
from ..linalg.kron import (
    FactorShapes,
    check_factor_shapes,
    inner,
    kron_apply,
    kron_chain_flops,
    kron_dense,
    kron_inner_lowrank,
    lowrank_frobenius_sq,
    with_terms_axis,
)

STRUCTURES = ("flat", "kronecker")


def rank_splits(rank: int, max_a: int, max_b: int) -> List[Tuple[int, int]]:
    """All (ka, kb) with ka * kb == rank, ka <= max_a, kb <= max_b."""
    return [(ka, rank // ka) for ka in range(1, min(rank, max_a) + 1)
            if rank % ka == 0 and rank // ka <= max_b]


def check_square_factors(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise unless B == conj(A) (for real factors: B == A), as in squared circuits."""
    if a.shape != b.shape:
        raise ValueError(f"square=True needs B == conj(A), but A is {tuple(a.shape)} and B is {tuple(b.shape)}")
    diff = float((b - a.conj()).abs().max())
    scale = float(a.abs().max())
    tol = 1e-5 if a.dtype in (torch.float32, torch.complex64) else 1e-12
    if diff > tol * max(scale, 1e-30):
        raise ValueError(f"square=True needs B == conj(A); they differ by up to {diff:.3g}")


class FactoredLayer(StructuredSumLayer):
    """Low-rank storage in ``flat`` or ``kronecker`` structure (see module docstring).

    Args:
        rank: total rank r (flat), or ka*kb (kronecker; used to pick a balanced
            split when ``factor_ranks`` is not given).
        factor_shapes: ((a1, a2), (b1, b2)) selects the kronecker structure.
        factor_ranks: (ka, kb) for the kronecker structure.
        tied: kronecker structure with B side = conj(A side); needs equal factor shapes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_folds: int = 1,
        *,
        rank: Optional[int] = None,
        factor_shapes: Optional[FactorShapes] = None,
        factor_ranks: Optional[Tuple[int, int]] = None,
        tied: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        gen = make_generator(seed, generator)
        f, out, inp = self.num_folds, self.out_features, self.in_features

        def normal(shape, std):
            return random_normal(shape, std, dtype=dtype, device=device, generator=gen)

        tied = check_bool(tied, "tied")
        if factor_shapes is None:
            if factor_ranks is not None or tied:
                raise ValueError("factor_ranks and tied need factor_shapes (the kronecker structure)")
            if rank is None:
                raise ValueError(f"{self.kind or 'this'} layer needs a rank")
            r = check_positive_int(rank, "rank")
            check_rank_range(r, min(out, inp), f"a {out} x {inp} matrix (out_features x in_features)")
            std = (1.0 / (3.0 * inp * r)) ** 0.25  # Var(W_ij) = r std^4 = 1 / (3 in)
            self._set_flat(normal((f, out, r), std), normal((f, r, inp), std))
            return
        (a1, a2), (b1, b2) = check_factor_shapes(factor_shapes, out, inp)
        if tied and (a1, a2) != (b1, b2):
            raise ValueError(f"tied=True needs equal factor shapes, got {(a1, a2)} and {(b1, b2)}")
        ka, kb = self._resolve_factor_ranks(rank, factor_ranks, min(a1, a2), min(b1, b2), tied)
        # Var(A~_ij) = Var(B~_kl) = 1/sqrt(3 in) so that Var(W_ij) = 1 / (3 in).
        var_factor = (1.0 / (3.0 * inp)) ** 0.5
        std_a, std_b = (var_factor / ka) ** 0.25, (var_factor / kb) ** 0.25
        left_a, right_a = normal((f, a1, ka), std_a), normal((f, ka, a2), std_a)
        if tied:
            self._set_kronecker(left_a, right_a, None, None)
        else:
            self._set_kronecker(left_a, right_a, normal((f, b1, kb), std_b), normal((f, kb, b2), std_b))

    @staticmethod
    def _resolve_factor_ranks(rank, factor_ranks, max_a, max_b, tied) -> Tuple[int, int]:
        if factor_ranks is not None:
            try:
                ka, kb = (check_positive_int(k, "factor_ranks entry") for k in factor_ranks)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"factor_ranks must be two positive ints, got {factor_ranks!r}") from exc
            if rank is not None and rank != ka * kb:
                raise ValueError(f"rank={rank} disagrees with factor_ranks={factor_ranks} (product {ka * kb})")
        elif rank is not None:
            rank = check_positive_int(rank, "rank")
            splits = [s for s in rank_splits(rank, max_a, max_b) if not tied or s[0] == s[1]]
            if not splits:
                raise ValueError(
                    f"rank {rank} cannot be split as ka*kb with ka <= {max_a}, kb <= {max_b}"
                    + (" and ka == kb (tied)" if tied else "") + "; pass factor_ranks")
            ka, kb = min(splits, key=lambda s: abs(s[0] - s[1]))
        else:
            raise ValueError("the kronecker structure needs rank or factor_ranks")
        check_rank_range(ka, max_a, "factor A (factor_ranks[0])")
        check_rank_range(kb, max_b, "factor B (factor_ranks[1])")
        if tied and ka != kb:
            raise ValueError(f"tied=True needs equal factor ranks, got {(ka, kb)}")
        return ka, kb

    # ----------------------------------------------------------- storage
    def _set_flat(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.structure = "flat"
        self.tied = False
        self.left = owned_parameter(left)
        self.right = owned_parameter(right)

    def _set_kronecker(self, left_a, right_a, left_b, right_b) -> None:
        self.structure = "kronecker"
        self.tied = left_b is None
        self.left_a = owned_parameter(left_a)
        self.right_a = owned_parameter(right_a)
        if not self.tied:
            self.left_b = owned_parameter(left_b)
            self.right_b = owned_parameter(right_b)

    @classmethod
    def _from_flat(cls, left: torch.Tensor, right: torch.Tensor):
        layer = cls._bare(right.shape[2], left.shape[1], left.shape[0])
        layer._set_flat(left, right)
        return layer

    @classmethod
    def _from_kronecker_factors(cls, left_a, right_a, left_b=None, right_b=None):
        """left_b/right_b None means tied (B side = conj of A side)."""
        b_out = (left_a if left_b is None else left_b).shape[1]
        b_in = (right_a if right_b is None else right_b).shape[2]
        layer = cls._bare(right_a.shape[2] * b_in, left_a.shape[1] * b_out, left_a.shape[0])
        layer._set_kronecker(left_a, right_a, left_b, right_b)
        return layer

    # ------------------------------------------------------------ views
    def _chains(self):
        if self.tied:
            return [self.left_a, self.right_a], [self.left_a.conj(), self.right_a.conj()]
        return [self.left_a, self.right_a], [self.left_b, self.right_b]

    @property
    def rank(self) -> int:
        if self.structure == "flat":
            return self.left.shape[2]
        ka, kb = self.factor_ranks
        return ka * kb

    @property
    def factor_ranks(self) -> Optional[Tuple[int, int]]:
        if self.structure == "flat":
            return None
        chain_a, chain_b = self._chains()
        return chain_a[0].shape[2], chain_b[0].shape[2]

    @property
    def factor_shapes(self) -> Optional[FactorShapes]:
        if self.structure == "flat":
            return None
        chain_a, chain_b = self._chains()
        return (chain_a[0].shape[1], chain_a[1].shape[2]), (chain_b[0].shape[1], chain_b[1].shape[2])

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kronecker structure only: the two factor approximations (A~, B~), each folded."""
        if self.structure != "kronecker":
            raise ValueError("factors() is only defined for the kronecker structure")
        (la, ra), (lb, rb) = self._chains()
        return la @ ra, lb @ rb

    def kronecker_terms(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Kronecker structure: the one term (A~, B~) of :meth:`factors`."""
        if self.structure != "kronecker":
            return None
        a, b = self.factors()
        return a.unsqueeze(1), b.unsqueeze(1)

    def kronecker_chains(self) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """Kronecker structure: the one term as its thin factors, ``([L_a, R_a], [L_b, R_b])``."""
        if self.structure != "kronecker":
            return None
        return with_terms_axis(*self._chains())  # tied and real: one list, so consumers see it is one

    def kronecker_chain(self) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """Kronecker structure: ``([L_a, R_a], [L_b, R_b])`` as stored (no terms' axis to add
        and take away: a deep chain reads these at every call)."""
        return self._chains() if self.structure == "kronecker" else None

    def thin_factors(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Flat structure: (left, right); the Kronecker structure has no single inner width."""
        return (self.left, self.right) if self.structure == "flat" else None

    def config(self) -> dict:
        if self.structure == "flat":
            return {**super().config(), "rank": self.rank}
        return {**super().config(), "factor_shapes": self.factor_shapes,
                "factor_ranks": self.factor_ranks, "tied": self.tied}

    # ---------------------------------------------------------- compute
    def _structured_orders(self, batch_size: int):
        batch = batch_size * self.num_folds
        if self.structure == "flat":
            return (Order("two GEMMs", batch * self.rank * (self.in_features + self.out_features),
                          batch * max(self.rank, self.out_features), batch * (self.rank + self.out_features), 2),)
        (a1, a2), (b1, b2) = self.factor_shapes
        hidden = max(a1, a2) * max(b1, b2)
        macs = batch * kron_chain_flops(*self._chains())
        # products of the thin factors: small matmuls (see linalg.contract.gemm_work)
        return (Order("Kronecker factors", macs, batch * hidden, batch * (2 * hidden + self.out_features), 6,
                      work=gemm_work(macs, min(a1, b1), min(self.factor_ranks), min(a2, b2))),)

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        if self.structure == "flat":
            return torch.matmul(torch.matmul(x, self.right.transpose(1, 2)), self.left.transpose(1, 2))
        chain_a, chain_b = self._chains()
        return kron_apply(chain_a, chain_b, x)

    def _rebuild_macs(self) -> int:
        f = self.num_folds
        if self.structure == "flat":
            return f * self.out_features * self.rank * self.in_features
        (a1, a2), (b1, b2) = self.factor_shapes
        ka, kb = self.factor_ranks
        return f * (a1 * ka * a2 + b1 * kb * b2) + f * self.out_features * self.in_features

    def to_dense(self) -> torch.Tensor:
        if self.structure == "flat":
            return self.left @ self.right
        return kron_dense(*self.factors())

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.structure == "flat":
            return kron_inner_lowrank(a, b, self.left, self.right)
        if self.factor_shapes != (tuple(a.shape[1:]), tuple(b.shape[1:])):
            return super()._inner_kronecker(a, b)
        fa, fb = self.factors()
        return inner(a, fa) * inner(b, fb)

    def _scaling(self):
        if self.structure == "flat":
            return [(self.left, 0.5), (self.right, 0.5)]
        if self.tied:  # W = (la ra) ⊗ conj(la ra): degree 2 in each
            return [(self.left_a, 0.25), (self.right_a, 0.25)]
        return [(self.left_a, 0.5), (self.left_b, 0.5)]

    def _frobenius_sq(self) -> torch.Tensor:
        if self.structure == "flat":
            return lowrank_frobenius_sq(self.left, self.right)
        (la, ra), (lb, rb) = self._chains()
        return lowrank_frobenius_sq(la, ra) * lowrank_frobenius_sq(lb, rb)

    def extra_repr(self) -> str:
        detail = f"rank={self.rank}, structure={self.structure}"
        if self.structure == "kronecker":
            detail += f", factor_ranks={self.factor_ranks}, tied={self.tied}"
        return f"{super().extra_repr()}, {detail}"


def choose_split(
    *,
    max_a: int,
    max_b: int,
    errors_for,
    total_sq: float,
    params_for,
    dense_params: int,
    rank: Optional[int],
    tolerance: Optional[float],
    params_share: Optional[float],
    factor_ranks: Optional[Tuple[int, int]],
    tied: bool,
) -> Tuple[int, int]:
    """Pick factor ranks (ka, kb) for the kronecker structure.

    ``errors_for(kas, kbs)`` returns the squared error summed over folds for every
    pair, shape (len(kas), len(kbs)); it is only asked about candidate pairs.
    ``params_for(ka, kb)`` is the parameter count of that split.

    rank: the split of exactly that rank with the smallest error.
    tolerance: the smallest total rank meeting it (fewest parameters on ties).
    params_share: the split with the smallest error within the parameter budget.
    """
    if factor_ranks is not None:
        return FactoredLayer._resolve_factor_ranks(rank, factor_ranks, max_a, max_b, tied)
    pairs = [(ka, kb) for ka in range(1, max_a + 1) for kb in range(1, max_b + 1) if not tied or ka == kb]
    if rank is not None:
        pairs = [p for p in pairs if p[0] * p[1] == rank]
        if not pairs:
            raise ValueError(
                f"rank {rank} cannot be split as ka*kb with ka <= {max_a}, kb <= {max_b}"
                + (" and ka == kb (square)" if tied else "") + "; pass factor_ranks or another rank")
    elif params_share is not None:
        budget = params_share * dense_params
        pairs = [p for p in pairs if params_for(*p) <= budget]
        if not pairs:
            raise ValueError(
                f"params_share={params_share} allows {int(budget)} parameters, but the smallest "
                f"Kronecker-structured split (1, 1) needs {params_for(1, 1)}")
    kas = sorted({p[0] for p in pairs})
    kbs = sorted({p[1] for p in pairs})
    table = errors_for(kas, kbs)
    err = {(ka, kb): float(table[i, j]) for i, ka in enumerate(kas) for j, kb in enumerate(kbs)}
    if tolerance is not None:
        ok = [p for p in pairs if err[p] <= tolerance**2 * total_sq * (1 + 1e-12)]
        if not ok:  # only reachable through round-off: take the most accurate split
            return min(pairs, key=lambda p: err[p])
        return min(ok, key=lambda p: (p[0] * p[1], params_for(*p), err[p]))
    return min(pairs, key=lambda p: (err[p], params_for(*p)))


def kronecker_split_params(num_folds: int, shapes: FactorShapes, tied: bool):
    """Parameter count of a kronecker-structured layer as a function of (ka, kb)."""
    (a1, a2), (b1, b2) = shapes
    if tied:
        return lambda ka, kb: num_folds * ka * (a1 + a2)
    return lambda ka, kb: num_folds * (ka * (a1 + a2) + kb * (b1 + b2))
