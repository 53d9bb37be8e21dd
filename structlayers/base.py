"""The one interface every structured sum layer implements.

A structured sum layer holds F independent linear maps ("folds") of shape
(out_features, in_features) and applies them to folded inputs:
``forward(x)`` maps x of shape (F, B, in_features) to (F, B, out_features),
``y[f, b] = W[f] @ x[f, b]``. Subclasses differ only in how W[f] is stored.

A subclass declares its registry name in the class statement::

    class LowRank(StructuredSumLayer, kind="lowrank"):
        ...

and is then reachable by name through :func:`structlayers.get` and friends
(the registry lives in :mod:`structlayers.registry`; its functions are re-exported
here for code that imported them from this module).
"""

from __future__ import annotations

import abc
import copy
import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._checks import (
    as_folded_factors,
    as_folded_weight,
    check_device,
    check_input,
    check_layer_dtype,
    check_positive_int,
    is_meta,
)
from .linalg.contract import gemm_work
from .linalg.kron import frobenius_sq
from .linalg.scale import conditioning_scale, fold_scales, ratio_of_squares, relative_error, working_dtype
from .registry import available, create, from_dense, from_kronecker, get, register  # noqa: F401  (re-exported)

#: name of the order that rebuilds the dense weight (``to_dense``) and applies it in one GEMM.
REBUILD = "rebuild + GEMM"
#: the rebuild order is only considered while the dense weight of all folds has at most this
#: many elements (256 MiB in float32): beyond, forming W is the memory problem a structured
#: layer exists to avoid (e.g. A ⊗ B with 1024 x 1024 factors).
REBUILD_MAX_ELEMENTS = 1 << 26
#: the cost model's price of one element written to memory (an intermediate or a permuted
#: copy), in multiply-adds. On CPUs a GEMM retires a multiply-add far faster than memory
#: takes an element (here about 25 G multiply-adds/s against 1-2 G elements/s on 2 cores),
#: so an order that is cheaper in multiply-adds but streams larger intermediates can be
#: slower; the weight makes the choice see that.
MEMORY_WEIGHT = 16
#: the cost model's price of one operator call (a GEMM, a permuted copy), in multiply-adds:
#: a few microseconds of dispatch, which decide between orders on small weights and batches.
CALL_WEIGHT = 50_000
#: orders remembered per layer (one per batch size seen); the oldest is dropped beyond.
ORDER_CACHE_SIZE = 64
#: where one of a kind's own orders does exactly the multiply-adds of rebuild + GEMM, the
#: rebuild is chosen only if the model prices it cheaper by more than this factor.
REBUILD_MARGIN = 1.2
#: ... for weights of at least this many entries per fold; on smaller ones the rebuild's few
#: calls beat the contraction's per-step dispatch as modelled (measured below 256 x 256).
REBUILD_MARGIN_MIN_ELEMENTS = 1 << 16
_NO_ORDERS: dict = {}


@dataclass(frozen=True)
class Order:
    """One way of evaluating a layer's forward for a given batch size.

    name: what it does (e.g. ``"sweep right-to-left"``, :data:`REBUILD`).
    macs: multiply-adds of one forward over the batch, all folds.
    peak: elements of the largest tensor it creates (all folds, whole batch).
    traffic: elements it writes to memory (intermediates and their permuted copies, the
        output), for the cost model (:data:`MEMORY_WEIGHT`).
    calls: operator calls it makes (GEMMs, copies), for the cost model (:data:`CALL_WEIGHT`).
    plan: whatever the kind needs to run it (e.g. a contraction order).
    work: the multiply-adds as the cost model weighs them (GEMMs with a small dimension run
        slower, :func:`~structlayers.linalg.contract.gemm_work`); None: ``macs``.
    """

    name: str
    macs: int
    peak: int
    traffic: int = 0
    calls: int = 1
    plan: object = field(default=None, compare=False, repr=False)
    work: Optional[float] = None

    @property
    def weighted_macs(self) -> float:
        """The multiply-adds as the cost model weighs them: ``work``, else ``macs``."""
        return self.macs if self.work is None else self.work

    @property
    def cost(self) -> float:
        """The cost model: multiply-adds (``work``: weighted for small GEMMs where the kind
        says so) + MEMORY_WEIGHT * elements written + CALL_WEIGHT * calls."""
        return self.weighted_macs + MEMORY_WEIGHT * self.traffic + CALL_WEIGHT * self.calls


class StructuredSumLayer(nn.Module, abc.ABC):
    """Abstract folded linear layer: (F, B, in_features) -> (F, B, out_features).

    Attributes:
        num_folds: F, the number of independent weight matrices.
        in_features, out_features: the shape of each W[f] is (out_features, in_features).
        kind: the registry name of the concrete class.

    Capabilities. Each kind declares what it can do as class attributes, and every
    consumer (``choose``, the demo, the benchmarks, adapters) reads them instead of
    keeping lists of kind names, so a new kind is one file plus its test spec entry:

        exact_from_kronecker: ``from_kronecker(A, B)`` with no options represents
            A ⊗ B exactly and takes no budget options (rank, tolerance, params_share).
        exact_from_dense: the same for ``from_dense(W)``.
        rank_is_matrix_rank: the ``rank`` option (and the ``rank`` property) bounds
            the matrix rank of W, so the Eckart–Young optimum at that rank is the
            reference for its error.
        square_form: ``from_kronecker(A, conj(A), square=True, factor_ranks=(r, r))``
            keeps the result in the form Ã ⊗ conj(Ã) with one stored factor (the
            weights of squared circuits stay squares).
        kronecker_choose_options: the option sets :func:`structlayers.choose` tries
            on Kronecker input, each combined with the requested budget.
        budget_options: options that make a budget (rank, tolerance, params_share)
            meaningful on Kronecker input; consumers add them to a budget request.
            Read-only: copy before changing.
        rank_meaning: one line saying what "rank" means for the kind.
        optimal_rank_option: the ``from_dense`` option (``"rank"``, monarch's
            ``"block_rank"``) at which the result is the Frobenius-optimal member of the
            kind's class, so its error does not increase with the option; None when no
            option promises that.
        meets_tolerance: ``from_dense(W, tolerance=t)`` guarantees a relative error <= t
            (False where the tolerance is an expectation over random draws).

    Evaluation orders. A kind lists the ways it can evaluate its forward for a batch size
    (``_structured_orders``: e.g. a tensor train's sweeps and a searched contraction
    order) and how many multiply-adds rebuilding W costs (``_rebuild_macs``); the base
    class adds the order :data:`REBUILD` (``to_dense`` then one GEMM) when W is small
    enough, picks the cheapest by multiply-adds and memory traffic (:attr:`Order.cost`)
    once per batch size, and
    ``forward`` runs it. :meth:`flops` reports the chosen order's count, so it is what the
    forward does. Every order is differentiable.
    """

    kind: ClassVar[str] = ""
    exact_from_kronecker: ClassVar[bool] = False
    exact_from_dense: ClassVar[bool] = False
    rank_is_matrix_rank: ClassVar[bool] = False
    square_form: ClassVar[bool] = False
    kronecker_choose_options: ClassVar[Tuple[dict, ...]] = ({},)
    budget_options: ClassVar[dict] = {}
    rank_meaning: ClassVar[str] = ""
    optimal_rank_option: ClassVar[Optional[str]] = None
    meets_tolerance: ClassVar[bool] = False

    def __init_subclass__(cls, kind: Optional[str] = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            register(kind, cls)
            cls.kind = kind
        # Every kind's constructors get the same conditioning (see _conditioned_dense).
        for name, wrap in (("from_dense", _conditioned_dense), ("from_kronecker", _conditioned_kronecker)):
            method = cls.__dict__.get(name)
            if isinstance(method, classmethod) and not getattr(method.__func__, "_conditioned", False):
                setattr(cls, name, classmethod(wrap(method.__func__)))

    def __init__(self, in_features: int, out_features: int, num_folds: int = 1) -> None:
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.num_folds = check_positive_int(num_folds, "num_folds")

    # ----------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (F, B, in_features) -> (F, B, out_features), in the order :meth:`order` picks."""
        # The common case tested in one expression: on a small layer the checks are a
        # noticeable share of a call of a few microseconds.
        if type(x) is torch.Tensor:
            shape = x.shape
            if (len(shape) == 3 and shape[0] == self.num_folds and shape[2] == self.in_features and shape[1]
                    and x.dtype is self.dtype):
                order = self.__dict__.get("_order_cache", _NO_ORDERS).get(shape[1])
                return self.forward_in(order if order is not None else self.order(shape[1]), x)
        self.check_input(x)
        if x.shape[1] == 0:
            return self._empty_output(x)
        return self.forward_in(self.order(x.shape[1]), x)

    def forward_in(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        """The forward evaluated in ``order`` (one of :meth:`orders`), whatever is cheapest."""
        if order.name == REBUILD:
            w = self.to_dense()
            if self.num_folds == 1:  # one GEMM whose weight gradient comes out in W's own layout
                return torch.nn.functional.linear(x[0], w[0])[None]
            return torch.matmul(x, w.transpose(1, 2))
        return self._forward_structured(order, x)

    def flops(self, batch_size: int) -> int:
        """Multiply-adds (MACs) of one forward over a batch of ``batch_size`` per fold, all folds.

        Counted from the structure, not measured: the count of the order the forward uses at
        that batch size (:meth:`order`). The name is kept for compatibility: one
        multiply-add counts 1, so FLOP counters that count multiplications and additions
        apart (``torch.utils.flop_counter``) report twice this number.
        """
        return self.order(batch_size).macs

    def orders(self, batch_size: int) -> Tuple[Order, ...]:
        """Every order the forward can use at this batch size: the kind's own, then
        :data:`REBUILD` when the kind can rebuild W and W has at most
        :data:`REBUILD_MAX_ELEMENTS` elements."""
        batch = check_positive_int(batch_size, "batch_size")
        found = tuple(self._structured_orders(batch))
        rebuild = self._rebuild_macs()
        dense = self.num_folds * self.out_features * self.in_features
        if rebuild is not None and dense <= REBUILD_MAX_ELEMENTS:
            traffic = self._rebuild_traffic() + batch * self.num_folds * self.out_features
            gemm = gemm_work(batch * dense, batch, self.in_features, self.out_features)
            found += (Order(REBUILD, rebuild + batch * dense, dense, traffic, self._rebuild_calls() + 1,
                            work=self._rebuild_work() + gemm),)
        return found

    def order(self, batch_size: int) -> Order:
        """The order the forward uses at this batch size: the lowest :attr:`Order.cost`
        (multiply-adds and memory traffic), then the smallest peak memory, then the first
        listed; computed once per batch size. Where one of the kind's own orders does exactly
        the multiply-adds of :data:`REBUILD` (and weighs no more), the kind's orders are
        preferred to it unless it is cheaper by more than :data:`REBUILD_MARGIN` (on weights
        of at least :data:`REBUILD_MARGIN_MIN_ELEMENTS` entries)."""
        cache = self.__dict__.setdefault("_order_cache", {})
        chosen = cache.get(batch_size)
        if chosen is None:
            chosen = min(self._eligible(self.orders(batch_size)), key=lambda o: (o.cost, o.peak))
            if len(cache) >= ORDER_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[batch_size] = chosen
        return chosen

    def _eligible(self, orders: Tuple[Order, ...]) -> Tuple[Order, ...]:
        """The orders :meth:`order` chooses among: all of ``orders``, except :data:`REBUILD`
        where one of the kind's own does exactly its multiply-adds, weighs no more and costs
        at most :data:`REBUILD_MARGIN` times as much, on a weight of at least
        :data:`REBUILD_MARGIN_MIN_ELEMENTS` entries per fold.

        Such an order is the rebuild's products (W first, then the batch) found by the
        contraction search and run as one contraction; on weights of that size the two differ
        by less than the model's traffic and call terms can resolve (measured: the rebuild up
        to 1.4x slower where it was modelled cheaper)."""
        *own, last = orders
        if (own and last.name == REBUILD and self.out_features * self.in_features >= REBUILD_MARGIN_MIN_ELEMENTS
                and any(o.macs == last.macs and o.weighted_macs <= last.weighted_macs
                        and o.cost <= REBUILD_MARGIN * last.cost for o in own)):
            return tuple(own)
        return orders

    def _structured_orders(self, batch_size: int) -> Sequence[Order]:
        """The kind's own evaluation orders at this batch size (at least one).

        A kind implements this and :meth:`_forward_structured`, or else overrides
        ``forward`` and ``flops`` itself (then it has one order, its own).
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither _structured_orders nor flops")

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        """Evaluate one of the kind's own orders; x is checked and has a non-empty batch."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _forward_structured nor forward")

    def _rebuild_macs(self) -> Optional[int]:
        """Multiply-adds of :meth:`to_dense` (all folds), or None when the kind offers no
        rebuild order. A kind returning a number must override ``to_dense`` (the default
        one calls the forward) and count exactly what it does."""
        return None

    def _rebuild_work(self) -> float:
        """The cost model's weight of :meth:`to_dense`'s multiply-adds (default: as counted)."""
        return self._rebuild_macs()

    def _rebuild_calls(self) -> int:
        """Operator calls :meth:`to_dense` makes (default: one product and one copy)."""
        return 2

    def _rebuild_traffic(self) -> int:
        """Elements :meth:`to_dense` writes (default: W and one permuted copy of it)."""
        return 2 * self.num_folds * self.out_features * self.in_features

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """(F, 0, out) for an empty batch, attached to x and the parameters so that a
        backward runs (every gradient is zero)."""
        dtype = torch.promote_types(x.dtype, self.dtype)
        anchor = x.sum() * 0
        for p in self.parameters():
            anchor = anchor + p.sum() * 0
        return x.new_zeros((self.num_folds, 0, self.out_features), dtype=dtype) + anchor

    def thin_factors(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(left (F, out, r), right (F, r, in))`` with ``W = left @ right``, differentiable,
        when the kind stores W as a product through ``r`` inner units; None otherwise.

        Lets a consumer that applies W on both sides of a block (``W X Wᵀ``, as a squared
        circuit does) shrink the block to ``r x r`` before expanding it again, instead of
        applying the whole forward twice.
        """
        return None

    def kronecker_terms(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(A (F, T, a1, a2), B (F, T, b1, b2))`` with ``W = Σ_t A_t ⊗ B_t`` (out = a1·b1,
        in = a2·b2), differentiable, when the kind stores W as a sum of Kronecker products;
        None otherwise.

        Lets a consumer whose input is a low-rank block ``X = L Rᵀ`` (a2 x b2) compute the
        output block ``Σ_t (A_t L)(B_t R)ᵀ`` from the factors, never forming X.
        """
        return None

    def kronecker_chains(self) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """``(chain_a, chain_b)``: lists of (F, T, ·, ·) matrices whose products, left to right,
        are the terms of :meth:`kronecker_terms` (``A_t = chain_a[0][:, t] @ chain_a[1][:, t] @ …``),
        in the form the kind stores them; None where there are no terms.

        A consumer applying ``A_t`` to a few columns goes through the stored thin factors (a
        low-rank term: ``L (R x)``) instead of multiplying them out. Default: one-matrix chains.
        """
        terms = self.kronecker_terms()
        return None if terms is None else ([terms[0]], [terms[1]])

    def kronecker_chain(self) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """``(chain_a, chain_b)`` of (F, ·, ·) matrices with ``W = A ⊗ B`` (``A`` the product
        of ``chain_a``, left to right), where the kind stores W as a single Kronecker term;
        None otherwise. :meth:`kronecker_chains` without the terms' axis."""
        chains = self.kronecker_chains()
        if chains is None or chains[0][0].shape[1] != 1:
            return None
        return [m.squeeze(1) for m in chains[0]], [m.squeeze(1) for m in chains[1]]

    def to_dense(self) -> torch.Tensor:
        """The represented weight, (F, out_features, in_features); differentiable.

        Derived from the forward applied to the identity, so it is right for any
        kind whose forward is; kinds override it only to be cheaper.
        """
        eye = torch.eye(self.in_features, dtype=self.dtype, device=self.device)
        return self.forward(eye.expand(self.num_folds, -1, -1)).transpose(1, 2)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError unless x has shape (F, B, in_features) for this layer, a TypeError
        unless it is a tensor of the layer's dtype."""
        check_input(x, "x", self.dtype, f"this {self.kind} layer")
        if x.dim() != 3 or x.shape[0] != self.num_folds or x.shape[2] != self.in_features:
            raise ValueError(
                f"{self.kind} layer expects input of shape (F={self.num_folds}, B, "
                f"in_features={self.in_features}), got {tuple(x.shape)}"
            )

    # ------------------------------------------------------------ bookkeeping
    @property
    def dtype(self) -> torch.dtype:
        return self._first_tensor().dtype

    @property
    def device(self) -> torch.device:
        return self._first_tensor().device

    def _first_tensor(self) -> torch.Tensor:
        # The forward asks for the dtype at every call: read the module's own parameters
        # directly (parameters() walks the module tree, microseconds a call); the same first
        # tensor as the walk, which a kind without parameters of its own still takes.
        for tensor in self._parameters.values():
            if tensor is not None:
                return tensor
        return next(self._tensors())

    def _tensors(self):
        yield from self.parameters()
        yield from self.buffers()

    @property
    def num_params(self) -> int:
        """Trainable numbers stored (a complex entry counts as one)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def num_buffers(self) -> int:
        """Fixed (non-trainable) numbers stored: buffers and frozen parameters."""
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return frozen + sum(b.numel() for b in self.buffers())

    @property
    def dense_params(self) -> int:
        """Numbers a dense layer of the same shape stores: F * out * in."""
        return self.num_folds * self.out_features * self.in_features

    def config(self) -> dict:
        """Constructor keyword arguments that rebuild a layer of this exact shape.

        ``type(layer)(**layer.config())`` has the same parameter and buffer
        shapes, so a saved ``state_dict`` loads into it.
        """
        return {"in_features": self.in_features, "out_features": self.out_features,
                "num_folds": self.num_folds, "dtype": self.dtype}

    def extra_repr(self) -> str:
        return (f"folds={self.num_folds}, in_features={self.in_features}, "
                f"out_features={self.out_features}, params={self.num_params}")

    # ----------------------------------------------------------- constructors
    @classmethod
    @abc.abstractmethod
    def from_dense(cls, weight: torch.Tensor, **options) -> "StructuredSumLayer":
        """Build from W of shape (F, out, in) or (out, in)."""

    @classmethod
    @abc.abstractmethod
    def from_kronecker(cls, a: torch.Tensor, b: torch.Tensor, **options) -> "StructuredSumLayer":
        """Build for W[f] = A[f] ⊗ B[f] from A (F, a1, a2), B (F, b1, b2), never forming W."""

    @classmethod
    def _bare(cls, in_features: int, out_features: int, num_folds: int):
        """An instance with only the base attributes set, for constructors that
        assign computed tensors instead of a random initialisation."""
        layer = cls.__new__(cls)
        StructuredSumLayer.__init__(layer, in_features, out_features, num_folds)
        return layer

    # ------------------------------------------------------------------ errors
    def relative_error(self, weight: torch.Tensor, per_fold: bool = False):
        """||W - self||_F / ||W||_F over all folds (a float), or per fold (a tensor (F,))."""
        w = self._check_target(as_folded_weight(weight))
        with torch.no_grad():
            work = self._in_double_precision()
            w = w.to(work.dtype)
            return relative_error(w - work.to_dense(), w, per_fold)

    def relative_error_kronecker(self, a: torch.Tensor, b: torch.Tensor, per_fold: bool = False):
        """Like :meth:`relative_error` for W = A ⊗ B, computed without forming W.

        Computed as ||W||^2 - 2 Re<W, L> + ||L||^2 from inner products, so errors
        below about sqrt(machine epsilon) (1e-8 in float64) are not resolved. The
        factors (and a copy of this layer) are scaled per fold by powers of two first,
        so any finite factors work; a zero A ⊗ B gives 0 for a zero layer, else inf.
        """
        a, b = as_folded_factors(a, b)
        self._check_target_shape(a.shape[0], a.shape[1] * b.shape[1], a.shape[2] * b.shape[2])
        with torch.no_grad():
            work = self._in_double_precision(copy_always=True)
            a, b = a.to(work.dtype), b.to(work.dtype)
            if per_fold:
                sa, sb = fold_scales(a), fold_scales(b)
            else:
                sa, sb = (fold_scales(t.reshape(1, -1)).expand(t.shape[0]) for t in (a, b))
            work._rescale(1 / sa)._rescale(1 / sb)
            a, b = a / sa.to(a.real.dtype)[:, None, None], b / sb.to(b.real.dtype)[:, None, None]
            total = frobenius_sq(a) * frobenius_sq(b)
            err = total - 2 * work._inner_kronecker(a, b).real + work._frobenius_sq()
            return ratio_of_squares(err.clamp_min(0), total, per_fold)

    def _in_double_precision(self, copy_always: bool = False) -> "StructuredSumLayer":
        """This layer, or a float64 / complex128 copy of it: error reports sum many
        products, and single precision would blur them at the 1e-4 level."""
        target = torch.complex128 if self.dtype.is_complex else torch.float64
        if self.dtype == target and not copy_always:
            return self
        return copy.deepcopy(self).to(target)

    # --------------------------------------------------------------- scaling
    def _scaling(self) -> List[Tuple[torch.Tensor, float]]:
        """(tensor, exponent) pairs: multiplying each tensor by c ** exponent, for a real c > 0
        (per fold), multiplies the represented W by c. Every kind implements it; the
        constructors use it to factor extreme weights at a safe scale."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its weight scales (_scaling)")

    def _rescale(self, factor) -> "StructuredSumLayer":
        """Multiply the represented W by ``factor`` in place: a positive float, or a float64
        tensor (F,) of one factor per fold. Exact for powers of two (exponents 1/2, 1/4 of
        odd powers round). Returns self."""
        f = torch.as_tensor(factor, dtype=torch.float64).reshape(-1)
        with torch.no_grad():
            for t, power in self._scaling():
                c = (f ** power).to(device=t.device, dtype=t.real.dtype if t.is_complex() else t.dtype)
                t.mul_(c.reshape(-1, *([1] * (t.dim() - 1))))
        return self

    def _inner_kronecker(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """<A ⊗ B, W_self> per fold, (F,). Default materialises this layer (not A ⊗ B)."""
        f, a1, a2 = a.shape
        _, b1, b2 = b.shape
        w = self.to_dense().reshape(f, a1, b1, a2, b2)
        return torch.einsum("fij,fkl,fikjl->f", a.conj(), b.conj(), w)

    def _frobenius_sq(self) -> torch.Tensor:
        """||W_self||_F^2 per fold, (F,). Default materialises this layer."""
        return frobenius_sq(self.to_dense())

    def _check_target(self, w: torch.Tensor) -> torch.Tensor:
        self._check_target_shape(*w.shape)
        return w

    def _check_target_shape(self, folds: int, out: int, inp: int) -> None:
        if (folds, out, inp) != (self.num_folds, self.out_features, self.in_features):
            raise ValueError(
                f"target weight has shape (F={folds}, out={out}, in={inp}) but this "
                f"{self.kind} layer is (F={self.num_folds}, out={self.out_features}, "
                f"in={self.in_features})"
            )


def _conditioned_dense(build):
    """``from_dense`` of every kind: validates W, factors half precisions in float32 (the layer
    comes back in W's dtype), and factors a W whose entries are too large or too small to
    square safely as W / s for a power of two s, multiplying the layer by s afterwards (both
    exact), so errors and tolerances hold for any finite weight."""

    @functools.wraps(build)
    def conditioned(cls, weight, *args, **options):
        w = as_folded_weight(weight).detach()
        work = w.to(working_dtype(w.dtype))
        scale = conditioning_scale(work)
        layer = build(cls, work / scale if scale != 1.0 else work, *args, **options)
        if scale != 1.0:
            layer._rescale(scale)
        return layer.to(w.dtype) if work.dtype != w.dtype else layer

    conditioned._conditioned = True
    return conditioned


def _conditioned_kronecker(build):
    """``from_kronecker`` of every kind: as :func:`_conditioned_dense`, each factor scaled on its
    own (errors multiply ||A||^2 ||B||^2, so the safe range is narrower)."""

    @functools.wraps(build)
    def conditioned(cls, a, b, *args, **options):
        a, b = as_folded_factors(a, b)
        a, b = a.detach(), b.detach()
        wd = working_dtype(a.dtype)
        a, b, dtype = a.to(wd), b.to(wd), a.dtype
        sa, sb = conditioning_scale(a, degree=2), conditioning_scale(b, degree=2)
        layer = build(cls, a / sa if sa != 1.0 else a, b / sb if sb != 1.0 else b, *args, **options)
        if sa != 1.0 or sb != 1.0:
            layer._rescale(sa)._rescale(sb)
        return layer.to(dtype) if wd != dtype else layer

    conditioned._conditioned = True
    return conditioned


# ------------------------------------------------------ helpers for kinds
def random_normal(
    shape: Tuple[int, ...],
    std: float,
    *,
    dtype: Optional[torch.dtype],
    device,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """N(0, std^2) entries drawn on the CPU (reproducible across devices); complex
    dtypes split the variance evenly between real and imaginary parts. On the meta
    device nothing is drawn or allocated (an empty meta tensor), as ``nn.Linear`` does."""
    dtype = check_layer_dtype(dtype)
    device = check_device(device)
    if is_meta(device):
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if dtype.is_complex:
        real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
        parts = torch.randn((2,) + tuple(shape), generator=generator, dtype=real_dtype)
        out = torch.complex(parts[0], parts[1]) * (std / math.sqrt(2))
    else:
        out = torch.randn(tuple(shape), generator=generator, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * std
    return out.to(device=device, dtype=dtype)


def owned_parameter(t: torch.Tensor) -> nn.Parameter:
    """A parameter holding its own contiguous copy of ``t`` (detached): a construction from
    given weights or factors never shares their storage or keeps their strides. Autograd
    writes each gradient in its parameter's layout, so a transposed parameter (as
    decompositions give them) would cost a copy of its gradient at every backward."""
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format))
