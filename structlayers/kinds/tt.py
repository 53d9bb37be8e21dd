"""``tt``: tensor-train / matrix-product-operator (MPO) weights, never formed in the forward.

The format, the automatic mode layouts, TT-SVD and the sweep costs are in
:mod:`structlayers.linalg.tt`. Each core is stored folded as an ``nn.Parameter`` of
shape (F, r_{k-1}, m_k, n_k, r_k), in ``layer.cores``.

Forward. The cheapest of several orders at the batch size (see
:meth:`~structlayers.base.StructuredSumLayer.order`): the two sweeps over the cores, each
step a single batched GEMM of the running state with one core followed by one transpose
copy (right-to-left or left-to-right, :func:`~structlayers.linalg.tt.sweep_costs`); the
order an opt_einsum search finds over the network of x and the cores, which may contract
some cores with each other first (within the sweeps' memory); and rebuilding W from the
cores (itself in a searched order) followed by one GEMM, which wins for small weights
and large batches. ``flops`` reports the chosen order's count. Large batches are
processed in chunks that bound the intermediates' memory (``CHUNK_ELEMENTS``); chunking
changes no arithmetic. With two cores and bond rank 1 the sweep is the Kronecker fast
path; with two cores and bond rank r it is a sum of r Kronecker products.

From a dense weight: TT-SVD by tensorly (``tensor_train_matrix``, PyTorch backend, see
:mod:`structlayers.linalg.decompose`) at bond ranks chosen here; a ``tolerance`` is split
evenly, tol/sqrt(d-1) per step. From A ⊗ B: the two-core MPO [A, B] of bond dimension 1,
exact; optionally each factor is itself split by TT-SVD (``factor_cores``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence as _SequenceABC
from typing import Optional, Sequence, Tuple, Union

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
from ..linalg.contract import gemm_work
from ..linalg.decompose import tt_matrix
from ..linalg.kron import frobenius_sq
from ..linalg.tt import (
    bond_limits,
    chain_dense,
    core_views,
    interleave,
    mpo_network,
    mpo_frobenius_sq,
    resolve_modes,
    sweep_costs,
    tt_svd,
    unflatten_cores,
)
from ._network import CHUNK_ELEMENTS, NetworkLayer

RankSpec = Union[int, Sequence[int], None]

#: bond dimension used when ``tt_rank`` is not given (capped per bond, see
#: :func:`~structlayers.linalg.tt.bond_limits`).
DEFAULT_TT_RANK = 8


def resolve_ranks(tt_rank: RankSpec, limits: Sequence[int]) -> Tuple[int, ...]:
    """(1, r_1, ..., r_{d-1}, 1) from ``tt_rank`` (see :class:`TT`), validated against ``limits``."""
    d = len(limits) + 1
    if tt_rank is None:
        return (1,) + tuple(min(DEFAULT_TT_RANK, lim) for lim in limits) + (1,)
    if isinstance(tt_rank, numbers.Integral) and not isinstance(tt_rank, bool):
        r = check_positive_int(tt_rank, "tt_rank")
        largest = max(limits, default=1)
        if r > largest:
            raise ValueError(
                f"tt_rank {r} exceeds the largest useful bond rank {largest} of this mode layout "
                f"(bond limits {tuple(limits)}); a larger rank adds only redundant parameters")
        return (1,) + tuple(min(r, lim) for lim in limits) + (1,)
    if isinstance(tt_rank, (str, bytes)) or not isinstance(tt_rank, (_SequenceABC, torch.Size)):
        raise TypeError(f"tt_rank must be an int or a list of ints, got {type(tt_rank).__name__} {tt_rank!r}")
    ranks = [check_positive_int(r, f"tt_rank[{k}]") for k, r in enumerate(tt_rank)]
    if len(ranks) == d + 1:
        if ranks[0] != 1 or ranks[-1] != 1:
            raise ValueError(f"tt_rank with d+1 = {d + 1} entries must start and end with 1, got {tuple(ranks)}")
        ranks = ranks[1:-1]
    elif len(ranks) != d - 1:
        raise ValueError(
            f"tt_rank must be an int, {d - 1} bond ranks, or {d + 1} ranks with ones at the ends "
            f"for {d} cores; got {len(ranks)} entries {tuple(tt_rank)}")
    for k, (r, lim) in enumerate(zip(ranks, limits)):
        if r > lim:
            raise ValueError(
                f"bond rank {r} of bond {k + 1} exceeds its largest useful rank {lim} "
                f"(tt_rank entry {k}; bond limits {tuple(limits)})")
    return (1,) + tuple(ranks) + (1,)




# -------------------------------------------------------------------- layer
class TT(NetworkLayer, kind="tt"):
    """Tensor-train (MPO) layer; see the module docstring for the format.

    Args:
        out_modes, in_modes: mode sizes per core (products must be out_features and
            in_features; equal lengths). Missing ones are chosen by
            :func:`~structlayers.linalg.tt.balanced_modes`; ``num_cores`` fixes d when
            no modes are given.
        tt_rank: an int = the maximal bond dimension (each bond gets min(tt_rank,
            its limit), see :func:`~structlayers.linalg.tt.bond_limits`; it must fit
            at least one bond); or d-1 bond ranks; or d+1 ranks with ones at the ends.
            Default: 8, capped per bond.
        dtype, device, seed, generator: as for the other kinds.

    Random init: core k has i.i.d. normal entries of variance 3^(-1/d) / (n_k r_k), so every
    contraction step is variance preserving and Var(W_ij) = 1 / (3 in) exactly,
    the variance of ``nn.Linear``'s default init.
    """

    # unsplit, A ⊗ B is already exact at bond dimension 1: budgets act inside the factors
    kronecker_choose_options = ({"factor_cores": True},)
    budget_options = {"factor_cores": True}
    meets_tolerance = True  # the TT-SVD error is exactly the sum of the discarded tails
    rank_meaning = "the largest TT bond rank (maximal bond dimension)"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_folds: int = 1,
        *,
        out_modes: Optional[Sequence[int]] = None,
        in_modes: Optional[Sequence[int]] = None,
        tt_rank: RankSpec = None,
        num_cores: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        om, im = resolve_modes(self.out_features, self.in_features, out_modes, in_modes, num_cores)
        try:
            ranks = resolve_ranks(tt_rank, bond_limits(om, im))
        except ValueError as exc:  # the limits come from the layer's shape: say so
            raise ValueError(f"{exc} (out_modes {om} and in_modes {im} for out_features={self.out_features}, "
                             f"in_features={self.in_features}; num_cores={len(om)})") from None
        gen = make_generator(seed, generator)
        d = len(om)
        cores = []
        for k in range(d):
            std = (3.0 ** (-1.0 / d) / (im[k] * ranks[k + 1])) ** 0.5
            shape = (self.num_folds, ranks[k], om[k], im[k], ranks[k + 1])
            cores.append(nn.Parameter(random_normal(shape, std, dtype=dtype, device=device, generator=gen)))
        self.cores = nn.ParameterList(cores)

    @classmethod
    def _from_cores(cls, cores: Sequence[torch.Tensor]) -> "TT":
        """From folded cores (F, r_{k-1}, m_k, n_k, r_k) with r_0 = r_d = 1 (copied, detached)."""
        f = cores[0].shape[0]
        assert cores[0].shape[1] == 1 and cores[-1].shape[-1] == 1
        assert all(a.shape[-1] == b.shape[1] for a, b in zip(cores[:-1], cores[1:]))
        out = math.prod(g.shape[2] for g in cores)
        inp = math.prod(g.shape[3] for g in cores)
        layer = cls._bare(inp, out, f)
        layer.cores = nn.ParameterList([owned_parameter(g) for g in cores])
        return layer

    # ------------------------------------------------------------ layout
    _MODE_AXES = (2, 3)

    def _mode_tensors(self):
        return self.cores

    @property
    def rank(self) -> int:
        """The largest bond rank (the maximal bond dimension)."""
        return max(self.tt_ranks)

    @property
    def tt_ranks(self) -> Tuple[int, ...]:
        """(1, r_1, ..., r_{d-1}, 1)."""
        return (1,) + tuple(int(g.shape[-1]) for g in self.cores)

    def config(self) -> dict:
        return {**super().config(), "out_modes": self.out_modes, "in_modes": self.in_modes,
                "tt_rank": self.tt_ranks}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, out_modes={self.out_modes}, in_modes={self.in_modes}, "
                f"tt_ranks={self.tt_ranks}")

    # ----------------------------------------------------------- compute
    def _sweep_costs(self) -> Tuple[int, int]:
        """Multiply-adds per sample of the right-to-left and left-to-right sweeps."""
        return sweep_costs(self.out_modes, self.in_modes, self.tt_ranks)

    def _network_spec(self):
        return mpo_network(self.out_modes, self.in_modes, self.tt_ranks)

    def _network_tensors(self):
        return core_views(self.cores)

    def _describe(self) -> str:
        return f"tt layer with modes {self.out_modes} x {self.in_modes} and bond ranks {self.tt_ranks}"

    def _structured_orders(self, batch_size: int):
        """The two sweeps and the order a contraction-order search finds (within the sweeps'
        memory); ties go to the sweeps, whose GEMMs need no permuted copies of the cores."""
        bf = batch_size * self.num_folds
        rtl, ltr = self._sweep_costs()
        sweeps = tuple(
            Order(f"sweep {name}", bf * cost, bf * self._largest_intermediate(rtl_first),
                  2 * bf * self._sweep_traffic(rtl_first), 3 * self.num_cores,
                  work=self._sweep_work(rtl_first, bf))
            for name, cost, rtl_first in (("right-to-left", rtl, True), ("left-to-right", ltr, False)))
        return sweeps + (self._searched_order(batch_size, max(o.peak for o in sweeps)),)

    def _sweep_work(self, right_to_left: bool, batch: int) -> float:
        """The cost model's weight of a sweep's GEMMs (see linalg.contract.gemm_work)."""
        om, im, r = self.out_modes, self.in_modes, self.tt_ranks
        work = 0.0
        for k in range(len(om)):
            if right_to_left:  # (M_{>k} B N_{<k} r_{k-1}) x (n_k r_k) @ (n_k r_k) x (r_{k-1} m_k)
                rows, inner, cols = batch * math.prod(om[k + 1:]) * math.prod(im[:k]), im[k] * r[k + 1], r[k] * om[k]
            else:  # (r_k m_k) x (r_{k-1} n_k) @ (r_{k-1} n_k) x (N_{>k} B M_{<k})
                rows, inner, cols = r[k + 1] * om[k], r[k] * im[k], batch * math.prod(im[k + 1:]) * math.prod(om[:k])
            work += gemm_work(rows * inner * cols, rows, inner, cols)
        return work

    def _sweep_traffic(self, right_to_left: bool) -> int:
        """Elements per sample and fold of all GEMM outputs of a sweep."""
        om, im, r = self.out_modes, self.in_modes, self.tt_ranks
        d = len(om)
        if right_to_left:
            return sum(r[k] * math.prod(om[k:]) * math.prod(im[:k]) for k in range(d))
        return sum(r[k + 1] * math.prod(om[:k + 1]) * math.prod(im[k + 1:]) for k in range(d))

    def _largest_intermediate(self, right_to_left: bool) -> int:
        """Elements per sample and fold of the largest GEMM output of a sweep."""
        om, im, r = self.out_modes, self.in_modes, self.tt_ranks
        d = len(om)
        if right_to_left:
            return max(r[k] * math.prod(om[k:]) * math.prod(im[:k]) for k in range(d))
        return max(r[k + 1] * math.prod(om[:k + 1]) * math.prod(im[k + 1:]) for k in range(d))

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        if order.plan is not None:
            return self._run_searched(order, x)
        # The intermediates are up to ~r times larger than x; batch chunks of at most
        # CHUNK_ELEMENTS bound their memory (the same multiply-adds either way).
        b = x.shape[1]
        right_to_left = order.name == "sweep right-to-left"
        sweep = self._right_to_left if right_to_left else self._left_to_right
        per_sample = self.num_folds * self._largest_intermediate(right_to_left)
        chunk = max(1, CHUNK_ELEMENTS // per_sample)
        if b <= chunk:
            return sweep(x)
        return torch.cat([sweep(part) for part in torch.split(x, chunk, dim=1)], dim=1)

    def _right_to_left(self, x: torch.Tensor) -> torch.Tensor:
        # State before core k: (F, [m_{k+1}..m_d], B, [n_1..n_{k-1}], (n_k r_k)); one GEMM with the
        # core as an (n_k r_k) x (r_{k-1} m_k) matrix, then m_k moves to the front.
        f, b, _ = x.shape
        s = x
        for k in range(self.num_cores - 1, -1, -1):
            g = self.cores[k]
            _, rl, m, n, rr = g.shape
            gmat = g.permute(0, 3, 4, 1, 2).reshape(f, n * rr, rl * m)
            y = torch.matmul(s.reshape(f, -1, n * rr), gmat)  # (F, M_{>k} B N_{<k} rl, m)
            if k > 0:
                s = y.reshape(f, -1, m).transpose(1, 2)
            else:  # rl = 1: (F, M_{>1}, B, m_1) -> (F, B, m_1, M_{>1})
                return y.reshape(f, -1, b * m).transpose(1, 2).reshape(f, b, self.out_features)
        raise AssertionError("unreachable")

    def _left_to_right(self, x: torch.Tensor) -> torch.Tensor:
        # State before core k: (F, (r_{k-1} n_k), [n_{k+1}..n_d], B, [m_1..m_{k-1}]); one GEMM with the
        # core as an (r_k m_k) x (r_{k-1} n_k) matrix, then m_k moves to the back.
        f, b, _ = x.shape
        s = x.transpose(1, 2)
        d = self.num_cores
        for k in range(d):
            g = self.cores[k]
            _, rl, m, n, rr = g.shape
            gmat = g.permute(0, 4, 2, 1, 3).reshape(f, rr * m, rl * n)
            y = torch.matmul(gmat, s.reshape(f, rl * n, -1))  # (F, rr m, N_{>k} B M_{<k})
            if k < d - 1:
                s = y.reshape(f, rr, m, -1).transpose(2, 3)
            else:  # rr = 1: (F, m_d, B M_{<d}) -> (F, B, M_{<d}, m_d)
                return y.transpose(1, 2).reshape(f, b, self.out_features)
        raise AssertionError("unreachable")

    def _frobenius_sq(self) -> torch.Tensor:
        return mpo_frobenius_sq(list(self.cores))

    def _scaling(self):
        return [(g, 1.0 / self.num_cores) for g in self.cores]

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """<A ⊗ B, W> without forming W when a bond splits the modes as A's and B's shapes."""
        om, im = self.out_modes, self.in_modes
        for k in range(1, self.num_cores):
            if (math.prod(om[:k]), math.prod(im[:k])) == tuple(a.shape[1:]):
                left = chain_dense(list(self.cores[:k]))[:, 0]  # (F, a1, a2, r)
                right = chain_dense(list(self.cores[k:]))[..., 0]  # (F, r, b1, b2)
                return torch.einsum("fij,fijr->fr", a.conj(), left).mul(
                    torch.einsum("fkl,frkl->fr", b.conj(), right)).sum(dim=1)
        return super()._inner_kronecker(a, b)

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
    ) -> "TT":
        """TT-SVD of W (F, out, in) or (out, in), by tensorly's TT-matrix decomposition.

        rank: maximal bond dimension (bond k gets min(rank, bond limit k); rank must
            fit at least one bond). tolerance: relative Frobenius error over all folds
            <= tolerance, budget tol/sqrt(d-1) per SVD step, each bond the smallest rank
            shared by the folds that meets its step budget (found from the singular values
            of a TT-SVD sweep, then decomposed by tensorly at those ranks). params_share:
            the largest maximal bond dimension whose parameter count fits. No budget: full
            bond ranks, exact up to rounding.
        """
        w = as_folded_weight(weight).detach()
        check_budget(rank, tolerance, params_share)
        f, out, inp = w.shape
        om, im = resolve_modes(out, inp, out_modes, in_modes, num_cores)
        rank = _resolve_budget(rank, tolerance, params_share, [(om, im)], f * out * inp, f)
        d = len(om)
        limits = bond_limits(om, im)
        if tolerance is None:
            ranks = (1,) + tuple(lim if rank is None else min(rank, lim) for lim in limits) + (1,)
        else:
            # the bond ranks that meet the per-step budgets come from the singular values of a
            # TT-SVD sweep (shared by the folds); tensorly then decomposes at those ranks
            step_tol = tolerance / math.sqrt(d - 1)
            found, _ = tt_svd(interleave(w, om, im), [m * n for m, n in zip(om, im)],
                              step_tolerance=step_tol, total_sq=frobenius_sq(w))
            ranks = (1,) + tuple(int(g.shape[-1]) for g in found)
        layer = cls._from_cores(tt_matrix(w, om, im, ranks))
        return layer._warn_if_costlier(out * inp, "a dense layer")

    @classmethod
    def from_kronecker(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        factor_cores: Union[bool, int, Tuple[int, int], None] = None,
        factor_modes: Optional[Tuple[Tuple[Sequence[int], Sequence[int]], Tuple[Sequence[int], Sequence[int]]]] = None,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
    ) -> "TT":
        """W = A ⊗ B as an MPO, never forming W.

        Default: the exact two-core MPO [A, B] with bond dimension 1, out_modes
        (a1, b1) and in_modes (a2, b2).

        factor_cores: split each factor further by its own TT-SVD; True uses the
            default core count for each factor's shape, an int k that many cores per
            factor, (kA, kB) one count per factor (1 keeps a factor whole).
        factor_modes: ((A out_modes, A in_modes), (B out_modes, B in_modes)); any
            entry, or a whole side, may be None for automatic modes. Implies the split.
        rank / tolerance / params_share: apply inside the factors (the bond between
            A's and B's cores stays 1). The error of A~ ⊗ B~ is exactly
            ||A - A~||^2 ||B||^2 + ||A~||^2 ||B - B~||^2, so a tolerance is split over
            all SVD steps of both factors (tol/sqrt(steps) each), weighted accordingly.
        """
        a, b = as_folded_factors(a, b)
        a, b = a.detach(), b.detach()
        check_budget(rank, tolerance, params_share)
        f, a1, a2 = a.shape
        _, b1, b2 = b.shape
        if factor_cores is False and factor_modes is not None:
            raise ValueError("factor_modes splits the factors, but factor_cores=False asks not to")
        split = factor_modes is not None or (factor_cores is not None and factor_cores is not False)
        if not split:
            if rank is not None or tolerance is not None or params_share is not None:
                raise ValueError(
                    "from_kronecker without factor_cores is exact at bond dimension 1; rank, tolerance "
                    "and params_share apply only when the factors are split (factor_cores=...)")
            return cls._from_cores([a.reshape(f, 1, a1, a2, 1), b.reshape(f, 1, b1, b2, 1)])

        counts = _factor_core_counts(factor_cores)
        if factor_modes is None:
            pairs = ((None, None), (None, None))
        else:
            try:
                side_a, side_b = factor_modes
                (ao, ai), (bo, bi) = ((None, None) if side_a is None else side_a), ((None, None) if side_b is None else side_b)
            except (TypeError, ValueError) as exc:
                raise ValueError("factor_modes must be ((A out_modes, A in_modes), (B out_modes, B in_modes)), "
                                 f"got {factor_modes!r}") from exc
            pairs = ((ao, ai), (bo, bi))
        layouts = [resolve_modes(s1, s2, mo, mi, cnt, what=name)
                   for (s1, s2), (mo, mi), cnt, name in
                   zip(((a1, a2), (b1, b2)), pairs, counts, ("factor A", "factor B"))]
        rank = _resolve_budget(rank, tolerance, params_share, layouts, f * a1 * b1 * a2 * b2, f)

        na, nb = frobenius_sq(a), frobenius_sq(b)
        total = na.double() * nb.double()
        steps = sum(len(om) - 1 for om, _ in layouts)
        step_tol = None if tolerance is None else tolerance / math.sqrt(steps)
        (oa, ia), (ob, ib) = layouts
        cores_a, _ = tt_svd(interleave(a, oa, ia), [m * n for m, n in zip(oa, ia)], rank=rank,
                            step_tolerance=step_tol, total_sq=total, fold_weights=nb)
        cores_a = unflatten_cores(cores_a, oa, ia)
        # A~'s cores are left-orthonormal up to the last: ||A~||^2 = ||last core||^2.
        na_kept = (cores_a[-1].abs() ** 2).flatten(1).sum(dim=1)
        cores_b, _ = tt_svd(interleave(b, ob, ib), [m * n for m, n in zip(ob, ib)], rank=rank,
                            step_tolerance=step_tol, total_sq=total, fold_weights=na_kept)
        layer = cls._from_cores(cores_a + unflatten_cores(cores_b, ob, ib))
        exact = min(sweep_costs((a1, b1), (a2, b2), (1, 1, 1)))
        return layer._warn_if_costlier(exact, "the exact two-core MPO [A, B] (factor_cores=None)",
                                       "splitting the factors only pays at lower ranks")


def _factor_core_counts(factor_cores) -> Tuple[Optional[int], Optional[int]]:
    if factor_cores is None or factor_cores is True:
        return None, None
    if isinstance(factor_cores, numbers.Integral) and not isinstance(factor_cores, bool):
        k = check_positive_int(factor_cores, "factor_cores")
        return k, k
    if isinstance(factor_cores, (tuple, list)) and len(factor_cores) == 2:
        return tuple(check_positive_int(k, f"factor_cores[{i}]") for i, k in enumerate(factor_cores))  # type: ignore[return-value]
    raise ValueError(f"factor_cores must be True, a positive int, or a pair of positive ints, got {factor_cores!r}")


def _resolve_budget(rank, tolerance, params_share, layouts, dense_params: int, folds: int) -> Optional[int]:
    """Validate a budget against the bonds of one or more TT layouts; return the rank cap
    to use (None for tolerance or no budget)."""
    limits = [lim for om, im in layouts for lim in bond_limits(om, im)]
    if rank is None and tolerance is None and params_share is None:
        return None
    if not limits:
        raise ValueError("a single-core TT has no bonds to truncate; give num_cores >= 2 "
                         "(or factor cores >= 2) to use rank, tolerance or params_share")
    largest = max(limits)
    if rank is not None:
        check_rank_range(rank, largest, f"this TT layout (bond limits {tuple(limits)})")
        return rank
    if params_share is not None:
        def params_for(r: int) -> int:
            total = 0
            for om, im in layouts:
                ranks = (1,) + tuple(min(r, lim) for lim in bond_limits(om, im)) + (1,)
                total += sum(ranks[k] * om[k] * im[k] * ranks[k + 1] for k in range(len(om)))
            return folds * total

        return rank_for_params_share(params_share, dense_params, params_for, largest, "TT layout")
    return None


__all__ = ["TT"]
