"""``cp``: the weight tensorized into modes and stored as a CP (canonical polyadic) decomposition.

Layout as for ``tt`` (:mod:`structlayers.linalg.tt`): out = m_1..m_d, in = n_1..n_d, and W
seen as an order-d tensor whose mode k has size m_k n_k. A rank-R CP of that tensor is

    W = sum_{r < R} U_1[:, :, r] ⊗ U_2[:, :, r] ⊗ ... ⊗ U_d[:, :, r]

with factors U_k of shape (m_k, n_k, R): a sum of R Kronecker products of d small
matrices, stored folded as ``layer.factors[k]`` (F, m_k, n_k, R). A ⊗ B is rank 1 in the
modes (a1 a2), (b1 b2), so ``from_kronecker`` is exact.

Forward: the cheapest order at the batch size (see
:meth:`~structlayers.base.StructuredSumLayer.order`): a contraction order of x and the
factors found by opt_einsum (intermediates at most ``min(R, 16)`` times the input or
output, or W's size; ``kinds/_network.py``), or rebuilding W and one GEMM. ``flops`` reports the chosen one.

From a dense weight: tensorly's CP-ALS (PyTorch backend, SVD start, ``iterations``
sweeps, random columns from ``seed`` where a mode is smaller than R; see
:mod:`structlayers.linalg.decompose`). At the largest useful rank, prod(p) / max(p) for mode
sizes p, the exact construction (one term per entry of the other modes) is used instead,
so the layer is exact. For d = 2 the SVD start is already the Eckart–Young optimum of
the rearranged matrix, so ALS returns the best Kronecker sum (as ``kronecker`` does).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

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
from ..base import Order, owned_parameter, random_normal
from ..linalg.decompose import CP_ITERATIONS, cp_als, cp_exact, cp_network, mode_tensor
from ..linalg.tt import Modes
from ._network import NetworkLayer, network_layout

#: rank used when ``rank`` is not given to the constructor (capped at the largest useful rank).
DEFAULT_CP_RANK = 8



def max_cp_rank(out_modes: Modes, in_modes: Modes) -> int:
    """prod(p) / max(p) for the mode sizes p_k = m_k n_k: the rank of the exact construction."""
    dims = [m * n for m, n in zip(out_modes, in_modes)]
    return math.prod(dims) // max(dims)



class CP(NetworkLayer, kind="cp"):
    """CP layer; see the module docstring for the format.

    Args:
        out_modes, in_modes, num_cores: the mode layout, as for ``tt``.
        split_modes: separate out and in modes (order 2d: factors (F, m_k, 1, R) and
            (F, 1, n_k, R)), :func:`~structlayers.linalg.decompose.split_layout`.
        rank: R, the number of rank-one terms (default 8, capped at the largest useful rank).
        dtype, device, seed, generator: as for the other kinds.

    Random init: the factors' entries are normal with variance (1 / (3 in R))^(1/d), so
    Var(W_ij) = R * prod_k Var(U_k) = 1 / (3 in), like ``nn.Linear``.
    """

    exact_from_kronecker = True
    rank_meaning = "the CP rank: the number of terms, each a Kronecker product of one matrix per mode"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_folds: int = 1,
        *,
        out_modes: Optional[Sequence[int]] = None,
        in_modes: Optional[Sequence[int]] = None,
        num_cores: Optional[int] = None,
        split_modes: bool = False,
        rank: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        om, im = network_layout(self.out_features, self.in_features, out_modes, in_modes, num_cores, split_modes)
        largest = max_cp_rank(om, im)
        if rank is None:
            rank = min(DEFAULT_CP_RANK, largest)
        rank = check_positive_int(rank, "rank")
        check_rank_range(rank, largest, f"a CP layer with out_modes {om} x in_modes {im} (out_features="
                                        f"{self.out_features}, in_features={self.in_features})")
        gen = make_generator(seed, generator)
        std = (1.0 / (3.0 * self.in_features * rank)) ** (0.5 / len(om))
        self.factors = nn.ParameterList([
            nn.Parameter(random_normal((self.num_folds, m, n, rank), std, dtype=dtype, device=device, generator=gen))
            for m, n in zip(om, im)])

    @classmethod
    def _from_factors(cls, factors: Sequence[torch.Tensor]) -> "CP":
        """From folded factors (F, m_k, n_k, R) (copied, detached)."""
        f = factors[0].shape[0]
        layer = cls._bare(math.prod(u.shape[2] for u in factors), math.prod(u.shape[1] for u in factors), f)
        layer.factors = nn.ParameterList([owned_parameter(u) for u in factors])
        return layer

    # ------------------------------------------------------------ layout
    @property
    def rank(self) -> int:
        return int(self.factors[0].shape[-1])

    def config(self) -> dict:
        return {**super().config(), "out_modes": self.out_modes, "in_modes": self.in_modes, "rank": self.rank}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_modes={self.out_modes}, in_modes={self.in_modes}, rank={self.rank}"

    # ----------------------------------------------------------- compute
    def _scaling(self):
        # W is multilinear in the factors: each scaled by c ** (1/d) scales W by c
        return [(u, 1.0 / len(self.factors)) for u in self.factors]

    def _network_spec(self):
        return cp_network(self.out_modes, self.in_modes, self.rank)

    def _network_tensors(self) -> List[torch.Tensor]:
        return list(self.factors)

    def _describe(self) -> str:
        return f"cp layer with modes {self.out_modes} x {self.in_modes} and rank {self.rank}"

    def _structured_orders(self, batch_size: int):
        return (self._rank_bounded_order(batch_size, self.rank),)

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        return self._run_searched(order, x)

    def _frobenius_sq(self) -> torch.Tensor:
        gram = None
        for u in self.factors:
            g = torch.einsum("fmnr,fmns->frs", u.conj(), u)
            gram = g if gram is None else gram * g
        return gram.sum(dim=(1, 2)).real

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.num_cores != 2 or (self.out_modes[0], self.in_modes[0]) != tuple(a.shape[1:]):
            return super()._inner_kronecker(a, b)
        u1, u2 = self.factors
        return (torch.einsum("fij,fijr->fr", a.conj(), u1) * torch.einsum("fkl,fklr->fr", b.conj(), u2)).sum(dim=1)

    # ------------------------------------------------------ constructors
    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
        out_modes: Optional[Sequence[int]] = None,
        in_modes: Optional[Sequence[int]] = None,
        num_cores: Optional[int] = None,
        split_modes: bool = False,
        iterations: int = CP_ITERATIONS,
        seed: int = 0,
    ) -> "CP":
        """CP of W (F, out, in) or (out, in) in the tensorized layout.

        rank: R (at most the largest useful rank prod(p) / max(p), where the exact
            construction is used). tolerance: the smallest R found whose relative error over
            all folds is <= tolerance (ALS errors need not fall monotonically with R: ranks
            grow geometrically, then bisect; the largest rank is exact). params_share: the
            largest R whose parameters fit. No budget: the largest rank, exact.
        iterations, seed: ALS sweeps and the seed of its random start columns.
        """
        w = as_folded_weight(weight).detach()
        check_budget(rank, tolerance, params_share)
        iterations = check_positive_int(iterations, "iterations")
        make_generator(seed, None)  # validates the seed
        f, out, inp = w.shape
        om, im = network_layout(out, inp, out_modes, in_modes, num_cores, split_modes)
        t = mode_tensor(w, om, im)
        largest = max_cp_rank(om, im)

        def decompose(r: int) -> List[torch.Tensor]:
            if not bool(t.any()):  # W = 0: zero factors (ALS would solve singular systems)
                return [t.new_zeros(f, m, n, r) for m, n in zip(om, im)]
            factors = cp_exact(t) if r >= largest else cp_als(t, r, iterations=iterations, seed=seed)
            return [u.reshape(f, m, n, u.shape[-1]) for u, m, n in zip(factors, om, im)]

        if rank is not None:
            check_rank_range(rank, largest, f"a CP layer with out_modes {om} x in_modes {im} (out={out}, in={inp})")
            factors = decompose(rank)
        elif params_share is not None:
            per_rank = f * sum(m * n for m, n in zip(om, im))
            r = rank_for_params_share(params_share, f * out * inp, lambda k: k * per_rank, largest, "CP layer")
            factors = decompose(r)
        elif tolerance is not None:
            factors = _smallest_rank_meeting(decompose, w, float(tolerance), largest)
        else:
            factors = decompose(largest)
        return cls._from_factors(factors)._warn_if_costlier(out * inp, "a dense layer")

    @classmethod
    def from_kronecker(cls, a: torch.Tensor, b: torch.Tensor) -> "CP":
        """Exact: rank 1 with out_modes (a1, b1), in_modes (a2, b2) and factors A, B."""
        a, b = as_folded_factors(a, b)
        return cls._from_factors([a[..., None], b[..., None]])


def _relative_error(factors: Sequence[torch.Tensor], w: torch.Tensor) -> float:
    layer = CP._from_factors(factors)
    return layer.relative_error(w)


def _smallest_rank_meeting(decompose, w: torch.Tensor, tolerance: float, largest: int) -> List[torch.Tensor]:
    """Factors of the smallest rank on a geometric-then-bisection path whose error meets
    the tolerance (the largest rank is exact and always does)."""
    found = {}

    def ok(r: int) -> bool:
        if r not in found:
            factors = decompose(r)
            found[r] = (factors, r >= largest or _relative_error(factors, w) <= tolerance)
        return found[r][1]

    lo, hi = 0, 1
    while not ok(hi):
        lo, hi = hi, min(largest, 2 * hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return found[hi][0]


__all__ = ["CP", "DEFAULT_CP_RANK", "max_cp_rank"]
