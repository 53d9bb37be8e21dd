"""``sketched``: sums of sketched low-rank terms with fixed random sketches.

Per fold the layer represents

    W~ = 1/(2L) * sum_{i=1..L} ( U1_i^T S1_i + S2_i U2_i )

with fixed random sketches U1_i (k x out) and U2_i (k x in), stored as buffers,
and learnable S1_i (k x in) and S2_i (out x k). L is ``num_terms``, k is
``low_rank``. The sketch types, the two fits of ``from_dense`` (``unbiased``, the
default, and ``projection``) and their expected errors in closed form are in
:mod:`structlayers.linalg.sketch`. In short: sketches know nothing about W, so a
layer no larger than dense fitted with ``fit="unbiased"`` is a trainable
parametrisation (train from scratch or fine-tune), not a compression of a given W;
``fit="projection"`` is never worse than W~ = 0 and exact once Lk >= min(in, out).
With ``sketch="orthogonal"`` and low_rank >= max(in, out) the layer reproduces W to
round-off (needs ``allow_larger=True``). ``sparse`` sketches are stored densely like
the others, so they bring no speed advantage here.

Storage (F folds): ``s1`` (F, L, k, in), ``s2`` (F, L, out, k) are parameters;
``u1`` (F, L, k, out), ``u2`` (F, L, k, in) are buffers (part of ``state_dict``,
counted by ``num_buffers``, not by ``num_params``). Sketches are real-valued and
cast to the layer dtype, so U^T is also U^H for complex layers.

Forward. The L terms are concatenated: with R = [S1_1; ..; S1_L; U2_1; ..; U2_L]
(2Lk x in) and C = [U1_1; ..; U1_L; S2_1^T; ..; S2_L^T] (2Lk x out),
W~ = C^T R / (2L), so the forward is two batched GEMMs through a 2Lk-wide
bottleneck, x -> x R^T -> (x R^T) C / (2L), costing 2Lk(in + out) multiply-adds
per sample (the 1/(2L) is the second GEMM's alpha). The products U1_i^T S1_i are
never formed: they are dense out x in. Only the small R and C are assembled by
``torch.cat`` per call (O(Lk(in + out)) copies, independent of the batch).

Size. A layer holds Lk(in + out) learnable numbers (``num_params``) and as many
fixed sketch entries (``num_buffers``): 2Lk(in + out) stored numbers per fold,
which is also its forward cost per sample. Budgets count these stored numbers:
when 2Lk(in + out) > in*out the layer is larger (and slower) than a dense one
and construction raises a ValueError naming the numbers, unless
``allow_larger=True`` (then a UserWarning). ``params_share=p`` in ``from_dense``
picks the largest k with 2Lk(in + out) <= p * in * out, so num_params is at most
p/2 of a dense layer's.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .._checks import (
    as_folded_factors,
    as_folded_weight,
    check_budget,
    check_choice,
    check_device,
    check_layer_dtype,
    check_positive_int,
    is_meta,
    make_generator,
)
from ..base import Order, StructuredSumLayer, random_normal
from ..linalg.kron import kron_apply, kron_inner_lowrank, lowrank_frobenius_sq
from ..linalg.sketch import (
    FITS,
    SKETCHES,
    draw_sketches,
    expected_relative_error,
    fit_sketches,
    low_rank_for_tolerance,
)

# Per-term size used by from_dense / from_kronecker when num_terms is not given.
DEFAULT_NUM_TERMS = 1

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ budgets
def _stored_per_fold(in_features: int, out_features: int, num_terms: int, low_rank: int) -> int:
    """2Lk(in + out): Lk(in + out) learnable S entries plus as many fixed sketch entries.

    It is also the forward's multiply-adds per sample.
    """
    return 2 * num_terms * low_rank * (in_features + out_features)


def _check_size(in_features: int, out_features: int, num_terms: int, low_rank: int,
                allow_larger: bool, context: str = "", stacklevel: int = 3) -> None:
    """Raise (or, with allow_larger, warn) when the layer stores more numbers than a dense one."""
    if not isinstance(allow_larger, bool):
        raise TypeError(f"allow_larger must be a bool, got {type(allow_larger).__name__}")
    stored = _stored_per_fold(in_features, out_features, num_terms, low_rank)
    dense = in_features * out_features
    if stored <= dense:
        return
    sizes = (f"2*L*k*(in+out) = 2*{num_terms}*{low_rank}*({in_features}+{out_features}) = {stored} "
             f"numbers per fold ({stored // 2} learnable + {stored // 2} fixed sketch entries)")
    if not allow_larger:
        raise ValueError(
            f"sketched layer with num_terms={num_terms}, low_rank={low_rank}{context} stores {sizes}, "
            f"more than the {dense} = {out_features}*{in_features} (out_features*in_features) of a dense "
            f"layer; lower num_terms "
            f"or low_rank, or pass allow_larger=True to build it anyway")
    warnings.warn(
        f"sketched layer stores more than a dense layer: {sizes} versus {dense} for a dense "
        f"{out_features}x{in_features} layer (allowed by allow_larger=True)",
        UserWarning, stacklevel=stacklevel)


def _resolve_size(out: int, inp: int, *, num_terms, low_rank, rank, tolerance, params_share,
                  sketch: str, fit: str) -> Tuple[int, int, str]:
    """(L, k, context) from the size options of from_dense / from_kronecker."""
    check_budget(rank, tolerance, params_share)
    L = DEFAULT_NUM_TERMS if num_terms is None else check_positive_int(num_terms, "num_terms")
    if low_rank is not None:
        k = check_positive_int(low_rank, "low_rank")
        if tolerance is not None or params_share is not None:
            raise ValueError("give low_rank or one of tolerance / params_share, not both")
        if rank is not None and rank != k:
            raise ValueError(f"rank is an alias of low_rank for sketched layers; got rank={rank} "
                             f"and low_rank={k}")
        return L, k, ""
    if rank is not None:
        return L, rank, ""
    if params_share is not None:
        # Largest k with 2Lk(in + out) <= p * in * out (stored numbers, learnable + sketches).
        budget = float(params_share) * inp * out
        k = int(budget // _stored_per_fold(inp, out, L, 1))
        if k == 0:
            raise ValueError(
                f"params_share={params_share} allows {budget:g} stored numbers per fold "
                f"(of a dense layer's {inp * out}), but the smallest sketched layer, num_terms={L} and "
                f"low_rank=1, stores 2*L*(in+out) = {_stored_per_fold(inp, out, L, 1)} "
                f"(half learnable, half fixed sketches)")
        return L, k, ""
    if tolerance is not None:
        k = low_rank_for_tolerance(inp, out, L, float(tolerance), sketch, fit)
        err = expected_relative_error(inp, out, num_terms=L, low_rank=k, sketch=sketch, fit=fit)
        return L, k, f" (chosen for tolerance={tolerance}: expected error {err:.3g} with fit={fit!r})"
    raise ValueError("sketched needs low_rank (or rank, tolerance or params_share)")


# ---------------------------------------------------------------------- layer
class Sketched(StructuredSumLayer, kind="sketched"):
    """Sum of L sketched terms, W~ = 1/(2L) sum_i (U1_i^T S1_i + S2_i U2_i); see the module docstring.

    Random init: ``Sketched(in, out, F, num_terms=L, low_rank=k)``. The sketches
    are drawn from ``seed`` / ``generator``; S1, S2 are i.i.d. normal with
    variance 2L / (3 in), which gives E[W~_ij^2] = 1/(3 in), the variance of
    ``nn.Linear``'s default init, so unit-variance inputs give outputs of
    variance about 1/3.

    Args:
        num_terms: L >= 1.  low_rank: k >= 1 (may exceed in/out; see allow_larger).
        sketch: one of ``gaussian``, ``sign``, ``sparse``, ``orthogonal``.
        allow_larger: when the 2Lk(in + out) stored numbers (half learnable, half
            sketches) exceed in*out the constructor raises a ValueError unless
            this is True, in which case it warns instead.
    """

    sketches = SKETCHES
    fits = FITS
    # the unbiased fit of a layer within a budget is worse than W~ = 0 (see linalg.sketch);
    # the seed makes the sketches, and so the result, reproducible
    budget_options = {"fit": "projection", "seed": 0}
    rank_meaning = "the per-term sketch size low_rank (rank is its alias); W~ has rank up to 2·num_terms·low_rank"
    expected_relative_error = staticmethod(expected_relative_error)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_folds: int = 1,
        *,
        num_terms: int,
        low_rank: int,
        sketch: str = "gaussian",
        allow_larger: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        L = check_positive_int(num_terms, "num_terms")
        k = check_positive_int(low_rank, "low_rank")
        check_choice(sketch, SKETCHES, "sketch")
        dtype, device = check_layer_dtype(dtype), check_device(device)
        f, out, inp = self.num_folds, self.out_features, self.in_features
        _check_size(inp, out, L, k, allow_larger)
        gen = make_generator(seed, generator)
        if is_meta(device):  # nothing to draw: shapes only, as nn.Linear on the meta device
            u1, u2 = torch.empty(f, L, k, out, device=device), torch.empty(f, L, k, inp, device=device)
        else:
            u1 = draw_sketches(f, L, k, out, sketch, gen)
            u2 = draw_sketches(f, L, k, inp, sketch, gen)
        std = math.sqrt(2 * L / (3 * inp))
        s1 = random_normal((f, L, k, inp), std, dtype=dtype, device=device, generator=gen)
        s2 = random_normal((f, L, out, k), std, dtype=dtype, device=device, generator=gen)
        self._store(u1.to(device=device, dtype=dtype), u2.to(device=device, dtype=dtype), s1, s2,
                    sketch, allow_larger)

    def _store(self, u1, u2, s1, s2, sketch: str, allow_larger: bool) -> None:
        self.sketch = sketch
        self.allow_larger = allow_larger
        self.register_buffer("u1", u1.contiguous())
        self.register_buffer("u2", u2.contiguous())
        self.s1 = nn.Parameter(s1.contiguous())
        self.s2 = nn.Parameter(s2.contiguous())

    # ------------------------------------------------------------ views
    @property
    def num_terms(self) -> int:
        return self.u1.shape[1]

    @property
    def low_rank(self) -> int:
        return self.u1.shape[2]

    def _stacked(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """R (F, 2Lk, in) = [S1_i..; U2_i..] and C (F, 2Lk, out) = [U1_i..; S2_i^T..]."""
        f, width = self.num_folds, 2 * self.num_terms * self.low_rank
        right = torch.cat([self.s1, self.u2], dim=1).reshape(f, width, self.in_features)
        left = torch.cat([self.u1, self.s2.transpose(-1, -2)], dim=1).reshape(f, width, self.out_features)
        return right, left

    def _factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """W~ = left @ right with left (F, out, 2Lk) (scale folded in), right (F, 2Lk, in)."""
        right, left = self._stacked()
        return left.transpose(1, 2) / (2 * self.num_terms), right

    def config(self) -> dict:
        return {**super().config(), "num_terms": self.num_terms, "low_rank": self.low_rank,
                "sketch": self.sketch, "allow_larger": self.allow_larger}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_terms={self.num_terms}, low_rank={self.low_rank}, "
                f"sketch={self.sketch}, buffers={self.num_buffers}")

    # ---------------------------------------------------------- compute
    def _structured_orders(self, batch_size: int):
        # Two GEMMs through the 2Lk-wide bottleneck: 2Lk * in + 2Lk * out per sample.
        batch = batch_size * self.num_folds
        width = 2 * self.num_terms * self.low_rank
        return (Order("two GEMMs", batch * _stored_per_fold(self.in_features, self.out_features, self.num_terms,
                                                           self.low_rank), batch * max(width, self.out_features),
                      batch * (width + self.out_features), 4),)

    def _rebuild_macs(self) -> int:
        return self.num_folds * self.out_features * 2 * self.num_terms * self.low_rank * self.in_features

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        right, left = self._stacked()
        hidden = torch.matmul(x, right.transpose(1, 2))  # (F, B, 2Lk)
        # beta=0: the first argument is ignored (only broadcast); alpha applies 1/(2L) inside the GEMM.
        return torch.baddbmm(hidden.new_zeros(()), hidden, left, beta=0, alpha=1.0 / (2 * self.num_terms))

    def to_dense(self) -> torch.Tensor:
        left, right = self._factors()
        return left @ right

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return kron_inner_lowrank(a, b, *self._factors())

    def _frobenius_sq(self) -> torch.Tensor:
        return lowrank_frobenius_sq(*self._factors())

    def _scaling(self):
        return [(self.s1, 1.0), (self.s2, 1.0)]  # W~ is linear in (S1, S2); the sketches stay

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        *,
        num_terms: Optional[int] = None,
        low_rank: Optional[int] = None,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
        sketch: str = "gaussian",
        fit: str = "unbiased",
        allow_larger: bool = False,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "Sketched":
        """Sketch W (F, out, in) or (out, in).

        Size: ``num_terms`` L (default 1) and exactly one of
          ``low_rank`` k, or ``rank`` (an alias of low_rank: the per-term size k;
          W~ itself has rank up to 2Lk),
          ``params_share`` p (the largest k with 2Lk(in + out) <= p in out: the
          stored numbers, learnable plus sketches, see the module docstring), or
          ``tolerance`` t (the smallest k whose *expected* relative error, a
          closed form independent of W, see :func:`expected_relative_error`, is
          <= t; a single draw can exceed it). Tolerances below about 1 with
          fit='unbiased' usually need a layer larger than dense, which raises
          unless allow_larger=True.
        fit: ``unbiased`` (S1_i = U1_i W, S2_i = W U2_i^T) or ``projection`` (the
          least-squares S's for the drawn sketches).
        """
        w = as_folded_weight(weight).detach()
        f, out, inp = w.shape
        work = w.to(torch.float32) if w.dtype in _LOW_PRECISION else w
        return cls._build(
            f, out, inp, w.dtype, w.device,
            apply_left=lambda m: torch.matmul(m, work),                   # M W
            apply_right=lambda n: torch.matmul(n, work.transpose(1, 2)),  # N W^T
            num_terms=num_terms, low_rank=low_rank, rank=rank, tolerance=tolerance,
            params_share=params_share, sketch=sketch, fit=fit, allow_larger=allow_larger,
            seed=seed, generator=generator)

    @classmethod
    def from_kronecker(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        num_terms: Optional[int] = None,
        low_rank: Optional[int] = None,
        rank: Optional[int] = None,
        tolerance: Optional[float] = None,
        params_share: Optional[float] = None,
        sketch: str = "gaussian",
        fit: str = "unbiased",
        allow_larger: bool = False,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "Sketched":
        """Like :meth:`from_dense` for W = A ⊗ B, never forming W.

        U1 W and W U2^T are Kronecker applies: the rows of M W are
        (A^T ⊗ B^T) applied to the rows of M, and (W N^T)^T = (A ⊗ B) applied to
        the rows of N, each O(Lk (a1 a2 b2 + a1 b1 b2)) or the cheaper order.
        The same seed gives the same sketches as ``from_dense`` on A ⊗ B.
        """
        a, b = as_folded_factors(a, b)
        a, b = a.detach(), b.detach()
        dtype = a.dtype
        if dtype in _LOW_PRECISION:
            a, b = a.to(torch.float32), b.to(torch.float32)
        f, a1, a2 = a.shape
        _, b1, b2 = b.shape
        at, bt = a.transpose(1, 2), b.transpose(1, 2)
        return cls._build(
            f, a1 * b1, a2 * b2, dtype, a.device,
            apply_left=lambda m: kron_apply([at], [bt], m),
            apply_right=lambda n: kron_apply([a], [b], n),
            num_terms=num_terms, low_rank=low_rank, rank=rank, tolerance=tolerance,
            params_share=params_share, sketch=sketch, fit=fit, allow_larger=allow_larger,
            seed=seed, generator=generator)

    @classmethod
    def _build(cls, f: int, out: int, inp: int, dtype: torch.dtype, device, *,
               apply_left: Callable[[torch.Tensor], torch.Tensor],
               apply_right: Callable[[torch.Tensor], torch.Tensor],
               num_terms, low_rank, rank, tolerance, params_share, sketch, fit, allow_larger,
               seed, generator) -> "Sketched":
        """Shared body: apply_left(M) = M W for M (F, m, out); apply_right(N) = N W^T for N (F, m, in)."""
        check_choice(sketch, SKETCHES, "sketch")
        check_choice(fit, FITS, "fit")
        L, k, context = _resolve_size(out, inp, num_terms=num_terms, low_rank=low_rank, rank=rank,
                                      tolerance=tolerance, params_share=params_share, sketch=sketch, fit=fit)
        _check_size(inp, out, L, k, allow_larger, context, stacklevel=5)  # past the constructor wrapper
        gen = make_generator(seed, generator)
        work_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
        u1 = draw_sketches(f, L, k, out, sketch, gen).to(device=device, dtype=work_dtype)
        u2 = draw_sketches(f, L, k, inp, sketch, gen).to(device=device, dtype=work_dtype)
        u1c, u2c = u1.reshape(f, L * k, out), u2.reshape(f, L * k, inp)
        s1, s2t = fit_sketches(apply_left, apply_right, u1c, u2c, L, fit)
        layer = cls._bare(inp, out, f)
        layer._store(u1.to(dtype), u2.to(dtype), s1.reshape(f, L, k, inp).to(dtype),
                     s2t.reshape(f, L, k, out).transpose(-1, -2).to(dtype), sketch, allow_larger)
        return layer
