"""``tucker``: the weight tensorized into modes and stored as a Tucker decomposition.

Layout as for ``tt`` and ``cp``: W as an order-d tensor with modes of size m_k n_k, and

    W = G ×_1 U_1 ×_2 U_2 ... ×_d U_d,   i.e.   W = sum_s G[s_1..s_d] U_1[:, :, s_1] ⊗ ... ⊗ U_d[:, :, s_d]

with a core G (R_1, ..., R_d) and factors U_k (m_k, n_k, R_k); (R_1, ..., R_d) is the
multilinear rank. Stored folded as ``layer.core`` (F, R_1..R_d) and ``layer.factors[k]``
(F, m_k, n_k, R_k). A ⊗ B has multilinear rank (1, 1) in the modes (a1 a2), (b1 b2), so
``from_kronecker`` is exact.

Forward: the cheapest order at the batch size (see
:meth:`~structlayers.base.StructuredSumLayer.order`): a contraction order of x, the core
and the factors found by opt_einsum (``kinds/_network.py``), or rebuilding W and one GEMM; ``flops`` reports it.

From a dense weight: tensorly's Tucker (HOOI from the HOSVD start, PyTorch backend; see
:mod:`structlayers.linalg.decompose`). Each mode's rank is at most min(p_k, prod of the
other modes); at those ranks the decomposition is exact. A ``tolerance`` picks per mode
the smallest rank whose unfolding tail (summed over folds) is within tol^2 ||W||^2 / d:
the HOSVD then has error <= tol, and HOOI, which starts there, never increases it.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

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
from ..linalg.decompose import (
    TUCKER_ITERATIONS,
    mode_tensor,
    multilinear_limits,
    tucker_hooi,
    tucker_network,
    unfolding_spectra,
)
from ..linalg.kron import frobenius_sq
from ..linalg.svd import smallest_rank_for_tolerance, tail_error_sq
from ._network import NetworkLayer, network_layout

#: multilinear rank per mode used when ``rank`` is not given (capped per mode).
DEFAULT_TUCKER_RANK = 8

RankSpec = Union[int, Sequence[int], None]


def resolve_ranks(rank: RankSpec, limits: Sequence[int], layout: str = "") -> Tuple[int, ...]:
    """Per-mode ranks from an int (a cap per mode; it must fit at least one mode) or d ints."""
    if rank is None:
        return tuple(min(DEFAULT_TUCKER_RANK, lim) for lim in limits)
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        r = check_positive_int(rank, "rank")
        check_rank_range(r, max(limits), f"a Tucker layout with rank limits {tuple(limits)}{layout}")
        return tuple(min(r, lim) for lim in limits)
    if not isinstance(rank, (list, tuple)):
        raise TypeError(f"rank must be a positive int or a sequence of one per mode, got {type(rank).__name__}")
    ranks = tuple(check_positive_int(r, f"rank[{k}]") for k, r in enumerate(rank))
    if len(ranks) != len(limits):
        raise ValueError(f"rank must be an int or {len(limits)} ints (one per mode), got {tuple(rank)}")
    for k, (r, lim) in enumerate(zip(ranks, limits)):
        if r > lim:
            raise ValueError(f"rank {r} of mode {k} exceeds its largest useful rank {lim} (limits {tuple(limits)})")
    return ranks



class Tucker(NetworkLayer, kind="tucker"):
    """Tucker layer; see the module docstring for the format.

    Args:
        out_modes, in_modes, num_cores: the mode layout, as for ``tt``.
        split_modes: separate out and in modes (order 2d,
            :func:`~structlayers.linalg.decompose.split_layout`): the forward applies small
            factors to x and the core in between, much cheaper than the merged layout's
            (whose intermediates are r times x), usually at a larger error for equal parameters.
        rank: an int (each mode gets min(rank, its limit min(p_k, prod of the others)))
            or one rank per mode. Default 8, capped per mode.
        dtype, device, seed, generator: as for the other kinds.

    Random init: core entries with variance 1 / (3 in) and factor entries with variance
    1 / R_k, so Var(W_ij) = prod R_k * (1 / (3 in)) * prod (1 / R_k) = 1 / (3 in), like
    ``nn.Linear``.
    """

    exact_from_kronecker = True
    rank_meaning = "the largest multilinear (Tucker) rank over the modes"

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
        rank: RankSpec = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        om, im = network_layout(self.out_features, self.in_features, out_modes, in_modes, num_cores, split_modes)
        ranks = resolve_ranks(rank, multilinear_limits([m * n for m, n in zip(om, im)]),
                              f" (out_modes={om}, in_modes={im}: out_features={self.out_features}, "
                              f"in_features={self.in_features})")
        gen = make_generator(seed, generator)
        f = self.num_folds
        self.core = nn.Parameter(random_normal((f, *ranks), (1.0 / (3.0 * self.in_features)) ** 0.5,
                                               dtype=dtype, device=device, generator=gen))
        self.factors = nn.ParameterList([
            nn.Parameter(random_normal((f, m, n, r), r ** -0.5, dtype=dtype, device=device, generator=gen))
            for m, n, r in zip(om, im, ranks)])

    @classmethod
    def _from_parts(cls, core: torch.Tensor, factors: Sequence[torch.Tensor]) -> "Tucker":
        """From a folded core (F, R_1..R_d) and factors (F, m_k, n_k, R_k) (copied, detached)."""
        f = core.shape[0]
        layer = cls._bare(math.prod(u.shape[2] for u in factors), math.prod(u.shape[1] for u in factors), f)
        layer.core = owned_parameter(core)
        layer.factors = nn.ParameterList([owned_parameter(u) for u in factors])
        return layer

    # ------------------------------------------------------------ layout
    @property
    def ranks(self) -> Tuple[int, ...]:
        """The multilinear rank (R_1, ..., R_d)."""
        return tuple(int(u.shape[-1]) for u in self.factors)

    @property
    def rank(self) -> int:
        return max(self.ranks)

    def config(self) -> dict:
        return {**super().config(), "out_modes": self.out_modes, "in_modes": self.in_modes, "rank": self.ranks}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_modes={self.out_modes}, in_modes={self.in_modes}, ranks={self.ranks}"

    # ----------------------------------------------------------- compute
    def _scaling(self):
        return [(self.core, 1.0)]  # W is linear in the core

    def _network_spec(self):
        return tucker_network(self.out_modes, self.in_modes, self.ranks)

    def _network_tensors(self) -> List[torch.Tensor]:
        return [self.core] + list(self.factors)

    def _describe(self) -> str:
        return f"tucker layer with modes {self.out_modes} x {self.in_modes} and ranks {self.ranks}"

    def _structured_orders(self, batch_size: int):
        return (self._rank_bounded_order(batch_size, self.rank),)

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        return self._run_searched(order, x)

    def _frobenius_sq(self) -> torch.Tensor:
        # ||G x_k U_k||^2 = <G, G x_k (U_k^H U_k)>, from R_k x R_k Gram matrices
        t = self.core
        for k, u in enumerate(self.factors):
            gram = torch.einsum("fmns,fmnr->frs", u.conj(), u)  # (F, R_k, R_k)
            moved = t.movedim(1 + k, -1)
            t = torch.matmul(moved.reshape(t.shape[0], -1, moved.shape[-1]), gram.transpose(1, 2))
            t = t.reshape(moved.shape).movedim(-1, 1 + k)
        return (self.core.conj() * t).flatten(1).sum(dim=1).real

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.num_cores != 2 or (self.out_modes[0], self.in_modes[0]) != tuple(a.shape[1:]):
            return super()._inner_kronecker(a, b)
        u1, u2 = self.factors
        ia = torch.einsum("fij,fijs->fs", a.conj(), u1)
        ib = torch.einsum("fkl,fklt->ft", b.conj(), u2)
        return torch.einsum("fs,fst,ft->f", ia, self.core, ib)

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
        iterations: int = TUCKER_ITERATIONS,
    ) -> "Tucker":
        """Tucker (HOOI) of W (F, out, in) or (out, in) in the tensorized layout.

        rank: a cap per mode (each mode min(rank, its limit)). tolerance: per mode the
            smallest rank whose unfolding tail fits tol^2 ||W||^2 / d (error <= tol
            guaranteed). params_share: the largest uniform cap whose parameters fit, then
            single modes raised by one (larger modes first) while they still fit. No budget:
            every mode at its limit, exact. iterations: HOOI sweeps.
        """
        w = as_folded_weight(weight).detach()
        check_budget(rank, tolerance, params_share)
        iterations = check_positive_int(iterations, "iterations")
        f, out, inp = w.shape
        om, im = network_layout(out, inp, out_modes, in_modes, num_cores, split_modes)
        dims = [m * n for m, n in zip(om, im)]
        limits = multilinear_limits(dims)
        t = mode_tensor(w, om, im)
        if rank is not None:
            ranks = resolve_ranks(rank, limits)
        elif params_share is not None:
            def params_of(rs: Sequence[int]) -> int:  # core + factors
                return f * (math.prod(rs) + sum(p * q for p, q in zip(dims, rs)))

            cap = rank_for_params_share(params_share, f * out * inp,
                                        lambda r: params_of([min(r, lim) for lim in limits]), max(limits),
                                        "Tucker layer")
            ranks = _grow_ranks([min(cap, lim) for lim in limits], limits, dims,
                                lambda rs: params_of(rs) <= params_share * f * out * inp)
        elif tolerance is not None:
            total = frobenius_sq(w)
            step = float(tolerance) / math.sqrt(len(dims))
            ranks = tuple(smallest_rank_for_tolerance(tail_error_sq(s), total, step) or lim
                          for s, lim in zip(unfolding_spectra(t), limits))
        else:
            ranks = limits
        if len(dims) == 1:  # one mode: W itself is the factor, exactly (its only rank is 1)
            core, factors = torch.ones(f, 1, dtype=w.dtype, device=w.device), [t[..., None]]
        else:
            core, factors = tucker_hooi(t, ranks, iterations=iterations)
        layer = cls._from_parts(core, [u.reshape(f, m, n, u.shape[-1]) for u, m, n in zip(factors, om, im)])
        return layer._warn_if_costlier(out * inp, "a dense layer")

    @classmethod
    def from_kronecker(cls, a: torch.Tensor, b: torch.Tensor) -> "Tucker":
        """Exact: multilinear rank (1, 1), out_modes (a1, b1), in_modes (a2, b2), core 1, factors A, B."""
        a, b = as_folded_factors(a, b)
        core = torch.ones(a.shape[0], 1, 1, dtype=a.dtype, device=a.device)
        return cls._from_parts(core, [a[..., None], b[..., None]])



def _grow_ranks(ranks, limits, dims, fits) -> Tuple[int, ...]:
    """From a uniform cap, raise single modes' ranks by one (larger modes first, round-robin)
    while the result still ``fits``: the budget is used up to the last rank that fits."""
    ranks = list(ranks)
    grown = True
    while grown:
        grown = False
        for k in sorted(range(len(ranks)), key=lambda k: -dims[k]):
            if ranks[k] < limits[k]:
                trial = ranks[:k] + [ranks[k] + 1] + ranks[k + 1:]
                if fits(trial):
                    ranks, grown = trial, True
    return tuple(ranks)

__all__ = ["DEFAULT_TUCKER_RANK", "Tucker"]
