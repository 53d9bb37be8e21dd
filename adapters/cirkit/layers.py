"""cirkit inner layers whose sum weight is structured.

Both classes subclass ``TorchInnerLayer``, not ``TorchSumLayer``: cirkit's
optimizer matches sum layers by ``isinstance``, and would otherwise fold these
layers back into dense products when a circuit is re-optimised.

Semiring outside, algebra inside: the wrapped maps are plain linear maps, and
:func:`semiring_linear` lifts one into the circuit's semiring once, with the
log-sum-exp stabilisation (a max over the whole contracted axis) that cirkit's
own sum layers use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from cirkit.backend.torch.layers import TorchInnerLayer
from cirkit.backend.torch.parameters.parameter import TorchParameter
from cirkit.backend.torch.semiring import Semiring

from structlayers import StructuredSumLayer
from structlayers.linalg import kron_apply, kron_chain_flops, kron_sum_apply, same_matrices, with_terms_axis
from structlayers.linalg.cur import cur_dense

from .plan import (
    _Permute,
    evaluate_parameter,
    is_kronecker_weight,
    kronecker_inputs,
    kronecker_permuted_inputs,
    kronecker_reads,
)


def semiring_linear(semiring: Semiring, linear: Callable[[Tensor], Tensor], x: Tensor,
                    dtype: torch.dtype) -> Tensor:
    """Evaluate a linear map y = W z on semiring-encoded inputs, like a cirkit sum layer.

    x: (F, H, B, Ki) in the semiring's encoding (probabilities, or complex/real logs);
    the H inputs are concatenated unit-wise as ``TorchSumLayer`` does, giving z of
    shape (F, B, H*Ki). ``linear`` has weights of ``dtype``; a real map acts on
    complex z part by part. Returns (F, B, Ko) in the same encoding.
    """
    x = x.permute(0, 2, 1, 3).flatten(start_dim=2)
    return semiring.apply_reduce(lambda z: apply_linear(linear, z, dtype), x, dim=-1, keepdim=True)


def apply_linear(linear: Callable[[Tensor], Tensor], z: Tensor, dtype: torch.dtype) -> Tensor:
    """``linear(z)`` for a map with weights of ``dtype``; z: (..., N, in) -> (..., N, out).

    A real map acts on complex z part by part: two real products instead of one
    complex product costing four.
    """
    if z.is_complex() and not dtype.is_complex:
        # real and imaginary parts stacked along the batch: one contiguous call
        n = z.shape[-2]
        y = linear(torch.cat([z.real, z.imag], dim=-2).to(dtype))
        return torch.complex(y[..., :n, :], y[..., n:, :])
    return linear(z.to(dtype) if z.dtype != dtype else z)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``: ``bmm`` for two batches of matrices of one batch size (matmul's reshapes around
    it cost a third of a small product's time, and four autograd nodes), else ``matmul``."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return torch.matmul(a, b)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` where one side may be real and the other complex: the real side multiplies
    the complex one part by part (two real products instead of a complex one costing four)."""
    if a.is_complex() == b.is_complex():
        return _product(a, b)
    if a.is_complex():
        return torch.complex(_product(a.real, b), _product(a.imag, b))
    return torch.complex(_product(a, b.real), _product(a, b.imag))


def _terms_on_factors(chain_a: List[Tensor], chain_b: List[Tensor], left: Tensor,
                      right: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``Σ_t A_t X B_tᵀ`` for ``X = left @ rightᵀ``, as factors ``(left', right')`` with
    ``T·V`` columns: ``[A_1 left, ..., A_T left]`` and ``[B_1 right, ..., B_T right]``.
    ``A_t`` is the product of ``chain_a``'s matrices (each (F, T, ·, ·)), applied last one
    first, so a low-rank term costs ``r·(a1 + a2)·V``, not ``a1·a2·V``; likewise ``B_t``.
    left (F, a2, V), right (F, b2, V); None when the shapes do not fit."""
    if chain_a[-1].shape[-1] != left.shape[1] or chain_b[-1].shape[-1] != right.shape[1]:
        return None
    f, t, v = left.shape[0], chain_a[0].shape[1], left.shape[2]

    def side(chain: List[Tensor], x: Tensor) -> Tensor:  # (F, i, V) -> (F, o, T·V)
        # as (xᵀ mᵀ)ᵀ: torch's batched GEMM is several times faster with the thin side first
        y = x.transpose(1, 2)
        if t == 1:  # batched GEMMs over the folds, the result a transposed view
            for m in reversed(chain):
                # squeeze, not m[:, 0]: a select's backward fills a zero tensor of m's shape first
                y = _matmul(y, m.squeeze(1).transpose(1, 2))
            return y.transpose(1, 2)
        y = y.unsqueeze(1)
        for m in reversed(chain):
            y = _matmul(y, m.transpose(-1, -2))  # (F, T, V, ·)
        return y.permute(0, 3, 1, 2).reshape(f, y.shape[-1], t * v)

    out = side(chain_a, left)
    # one map and one block factor on both sides (a real circuit's conj(c)·c): one product
    return out, (out if right is left and same_matrices(chain_a, chain_b) else side(chain_b, right))


def _kronecker_terms_apply(chain_a: List[Tensor], chain_b: List[Tensor], z: Tensor, folds: Tensor) -> Tensor:
    """``Σ_t (A_t ⊗ B_t) z`` with the terms of the folds ``folds`` (F',): chains of (F, T, ·, ·)
    matrices as in :func:`_terms_on_factors`, z (F', B, a2·b2) -> (F', B, a1·b1)."""
    chain_a, chain_b = ([m.index_select(0, folds) for m in chain] for chain in (chain_a, chain_b))
    if len(chain_a) == 1 and len(chain_b) == 1:  # one matrix per term: all terms in two GEMMs
        return kron_sum_apply(chain_a[0], chain_b[0], z)
    y = None
    for t in range(chain_a[0].shape[1]):
        part = kron_apply([m[:, t] for m in chain_a], [m[:, t] for m in chain_b], z)
        y = part if y is None else y + part
    return y


def _thin(a: Tensor, left: Tensor, right: Tensor) -> bool:
    """The factors (F, Ki, C) hold fewer entries, in and out, than the weight A (F, Ko, Ki): in
    ``Z`` (C = V categories, K large) moving or copying them costs less than moving A; at data
    (a column per sample) it does not."""
    return (left.shape[-1] + right.shape[-1]) * (a.shape[-1] + a.shape[-2]) < a.shape[-1] * a.shape[-2]


def _kronecker_on_factors(a: Tensor, b: Tensor, left: Tensor, right: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``(A left, B right)`` for A (F, a1, a2), B (F, b1, b2), left (F, a2, V), right (F, b2, V);
    where A and B are one tensor and the factors two thin ones (:func:`_thin`), one product over
    both side by side; where they are one factor too, one product and one result. None where
    the shapes do not fit."""
    if a is b and right is not left and left.shape == right.shape and a.shape[-1] == left.shape[1] \
            and _thin(a, left, right):
        # as (xᵀ Aᵀ)ᵀ, the thin side first (see _terms_on_factors)
        both = _matmul(torch.cat([left, right], dim=-1).transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
        v = left.shape[-1]
        return both[:, :, :v], both[:, :, v:]
    return _terms_on_factors(*with_terms_axis([a], [b]), left, right)  # one factor: one product


def kronecker_factors(weight: TorchParameter) -> Optional[Tuple[Tensor, Tensor]]:
    """(A, B) with W = A ⊗ B per fold for a weight graph ending in a Kronecker node, else None.

    The factors are read from the parameter tensors where they are rows of them, else the
    graph is evaluated up to the Kronecker node, whose inputs are captured
    (:func:`~adapters.cirkit.plan.kronecker_inputs`); the product itself is never computed.
    A: (F, Ko1, Ki1), B: (F, Ko2, Ki2). Gradients flow to the circuit's parameters.
    """
    return kronecker_inputs(weight)


class _SumLayerConfig(TorchInnerLayer):
    """``config`` mirrors ``__init__``'s unit arguments, as cirkit needs to fold a layer."""

    @property
    def config(self) -> Mapping[str, Any]:
        return {"num_input_units": self.num_input_units, "num_output_units": self.num_output_units,
                "arity": self.arity}


class TorchKroneckerSumLayer(_SumLayerConfig):
    """Exact sum layer whose weight graph ends in a Kronecker node, applied factor-wise.

    ``weight`` is the layer's usual cirkit parameter graph (W = A ⊗ B); the factors
    are read from it at every forward (so they are always the live parameters) and
    applied as two small products instead of a (Ko1 Ko2) x (Ki1 Ki2) matrix.
    ``config`` and ``params`` mirror ``__init__``, so cirkit can fold this layer:
    it is what the compile-time rule emits.
    """

    def __init__(self, num_input_units: int, num_output_units: int, arity: int = 1, *,
                 weight: TorchParameter, semiring: Optional[Semiring] = None, num_folds: int = 1) -> None:
        super().__init__(num_input_units, num_output_units, arity=arity, semiring=semiring, num_folds=num_folds)
        if not is_kronecker_weight(weight):
            raise ValueError("TorchKroneckerSumLayer needs a weight graph whose output is a Kronecker node")
        if tuple(weight.shape) != (num_output_units, num_input_units * arity):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected "
                             f"{(num_output_units, num_input_units * arity)}")
        self.weight = weight


    @property
    def params(self) -> Mapping[str, TorchParameter]:
        return {"weight": self.weight}

    def factors(self) -> Tuple[Tensor, Tensor]:
        """The live factors A (F, Ko1, Ki1) and B (F, Ko2, Ki2)."""
        return kronecker_factors(self.weight)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.factors()
        return semiring_linear(self.semiring, lambda t: kron_apply([a], [b], t), x, a.dtype)

    #: :meth:`linear` applies to a subset of the folds
    fold_subsets = True

    def linear(self, z: Tensor, folds: Optional[Tensor] = None, *, symmetric: bool = False) -> Tensor:
        """The layer's map on linear-space inputs: z (F, B, H*Ki) -> (F, B, Ko); with
        ``folds`` (F',), the map of those folds only on z (F', B, H*Ki). ``symmetric``: every
        block of z is symmetric (the caller knows it; see :meth:`maps_symmetric`), which
        spares a product in the backward where A is B (:func:`structlayers.linalg.kron_apply`)."""
        a, b = self.factors()
        if folds is not None:
            a, b = a.index_select(0, folds), b.index_select(0, folds)
        return apply_linear(lambda t: kron_apply([a], [b], t, symmetric=symmetric), z, a.dtype)

    def maps_symmetric(self) -> bool:
        """``A X Bᵀ`` keeps symmetric blocks symmetric: one input, and A and B the same rows of
        one real parameter tensor, square (a real circuit's layer in ``Z`` of ``|c|²``, where every
        block is a Gram matrix). A property of the weight graph: a plan asks it once."""
        reads = kronecker_reads(self.weight)
        if self.arity != 1 or reads is None or not reads.same_rows:
            return False
        with torch.no_grad():
            a, _ = self.factors()
        return not a.is_complex() and a.shape[-1] == a.shape[-2]

    def kronecker_chain(self) -> Optional[Tuple[List[Tensor], List[Tensor]]]:
        """The map as one Kronecker product of chains, ``([A], [B])`` (see
        :func:`structlayers.linalg.kron_apply`): what a deep chain of one-fold layers applies
        in one autograd node (:mod:`~adapters.cirkit.chains`)."""
        a, b = self.factors()
        return [a], [b]

    def flops(self, batch_size: int) -> int:
        """Multiply-adds of one forward (the linear map only)."""
        a, b = self.factors()
        return batch_size * self.num_folds * kron_chain_flops([a], [b])

    @property
    def takes_factors(self) -> bool:
        """:meth:`linear_on_factors` applies (one input)."""
        return self.arity == 1

    def linear_on_factors(self, left: Tensor, right: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The map on one input block given by factors: units ``vec(left @ rightᵀ)`` (first
        index first; left (F, Ki1, V), right (F, Ki2, V)) -> ``(A left, B right)``, the
        factors of the output block ``A X Bᵀ``: ``(Ko1 + Ko2)·Ki·V`` multiply-adds per fold
        where the block costs ``Ki·Ko·(Ki + Ko)``. None where the factors do not fit A and B.

        Where A and B are the parameter tensors permuted (a squared circuit reading ``c``'s
        folds in its own order), the thin factors are permuted instead (``V`` columns where
        the weights have ``K``); where A and B are one tensor, it multiplies both factors in
        one product (one read of A, one gradient for it)."""
        permuted = kronecker_permuted_inputs(self.weight)
        if permuted is None or not _thin(permuted[0], left, right):
            a, b = self.factors()
            return _kronecker_on_factors(a, b, left, right)
        a, b, index, inverse = permuted
        if a.shape[0] != left.shape[0]:
            return None
        # fold f applies A'[index[f]]: the factors in A's own fold order, and back
        moved = _Permute.apply(left, inverse, index)
        out = _kronecker_on_factors(a, b, moved, moved if right is left else _Permute.apply(right, inverse, index))
        if out is None:
            return None
        back = _Permute.apply(out[0], index, inverse)
        return back, (back if out[1] is out[0] else _Permute.apply(out[1], index, inverse))


class TorchStructuredSumLayer(_SumLayerConfig):
    """A cirkit inner layer computing a :class:`structlayers.StructuredSumLayer`.

    ``structured`` holds F folds of an (Ko, H*Ki) map. It is a submodule, so its
    parameters train with the circuit (``frozen`` mode: a fixed factorisation that
    fine-tunes on its own). Built after compilation and folding, so cirkit never
    needs to fold it.
    """

    def __init__(self, num_input_units: int, num_output_units: int, arity: int = 1, *,
                 structured: StructuredSumLayer, semiring: Optional[Semiring] = None,
                 num_folds: int = 1) -> None:
        super().__init__(num_input_units, num_output_units, arity=arity, semiring=semiring, num_folds=num_folds)
        expected = (num_folds, num_output_units, num_input_units * arity)
        got = (structured.num_folds, structured.out_features, structured.in_features)
        if got != expected:
            raise ValueError(f"structured layer has (folds, out, in) = {got}, expected {expected}")
        self.structured = structured


    @property
    def params(self) -> Mapping[str, TorchParameter]:
        return {}

    def forward(self, x: Tensor) -> Tensor:
        return semiring_linear(self.semiring, self.structured, x, self.structured.dtype)

    @property
    def takes_factors(self) -> bool:
        """:meth:`linear_on_factors` applies: one input, and a kind storing W as a sum of
        Kronecker products (``kronecker_chains``, applied in the stored thin form)."""
        return self.arity == 1 and self.structured.kronecker_chains() is not None

    def linear_on_factors(self, left: Tensor, right: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The map on one input block ``X = left @ rightᵀ`` (left (F, a2, V), right (F, b2, V))
        for ``W = Σ_t A_t ⊗ B_t``: the factors of ``Σ_t A_t X B_tᵀ``, (F, a1, T·V) and
        (F, b1, T·V); None where the kind has no Kronecker terms or they do not fit."""
        chains = self.structured.kronecker_chains()
        return None if chains is None else _terms_on_factors(chains[0], chains[1], left, right)

    @property
    def fold_subsets(self) -> bool:
        """:meth:`linear` applies to a subset of the folds: one input, and a kind storing its
        weight as Kronecker terms (applied through them there)."""
        return self.arity == 1 and self.structured.kronecker_chains() is not None

    def linear(self, z: Tensor, folds: Optional[Tensor] = None, *, symmetric: bool = False) -> Tensor:
        """The layer's map on linear-space inputs: z (F, B, H*Ki) -> (F, B, Ko); with ``folds``
        (F',), the map of those folds on z (F', B, Ki) (:attr:`fold_subsets`). ``symmetric``:
        every block of z is symmetric (see :meth:`maps_symmetric`), which spares products in
        the backward of a thin chain on both sides (:func:`structlayers.linalg.kron_apply`)."""
        chains = self.kronecker_chain() if folds is None and symmetric else None
        if chains is not None:  # the caller's claim; kron_apply takes it only where one real chain is on both sides
            return apply_linear(lambda t: kron_apply(*chains, t, symmetric=True), z, chains[0][0].dtype)
        if folds is None:
            return apply_linear(self.structured, z, self.structured.dtype)
        chain_a, chain_b = self.structured.kronecker_chains()
        return apply_linear(lambda t: _kronecker_terms_apply(chain_a, chain_b, t, folds), z, chain_a[0].dtype)

    def kronecker_chain(self) -> Optional[Tuple[List[Tensor], List[Tensor]]]:
        """The map as one Kronecker product of chains (one input, a kind storing a single
        Kronecker term), else None; see :meth:`TorchKroneckerSumLayer.kronecker_chain`."""
        return self.structured.kronecker_chain() if self.arity == 1 else None

    def maps_symmetric(self) -> bool:
        """``A X Aᵀ`` keeps symmetric blocks symmetric: one input and one real chain of matrices on
        both sides, the same tensors (a tied Kronecker term of a real kind, as a squared circuit's
        ``Z`` holds). A property of the stored factors: a plan asks it once."""
        with torch.no_grad():
            chains = self.kronecker_chain()
        return chains is not None and same_matrices(*chains) and not any(m.is_complex() for m in chains[0])

    def flops(self, batch_size: int) -> int:
        return self.structured.flops(batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.structured.kind}"


def approximation_chain(a: Tensor, kind: str, rank: int, strategy: str = "qr", oversampling: float = 2.0,
                        seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``left`` (F, Ko, r), ``right`` (F, r, Ki) with ``left @ right`` the rank-r ``kind``
    approximation of ``a`` (F, Ko, Ki): ``lowrank`` ``U_r U_rᴴ a`` (the truncated SVD), or
    ``nystrom`` CUR with a projection core. The structure (singular subspace, pivots) is
    chosen without gradient; the values are differentiable in ``a``. It commutes with
    conjugation (for the deterministic pivot strategies), so ``conj(Ã)`` of a squared
    circuit's first factor ``conj(A)`` is the same ``Ã`` a layer of ``c`` computes from ``A``."""
    if kind == "lowrank":
        with torch.no_grad():
            u = torch.linalg.svd(a, full_matrices=False)[0][:, :, :rank]
        return u, u.conj().transpose(1, 2) @ a
    gen = torch.Generator().manual_seed(seed)
    factors = cur_dense(a, rank, strategy, gen, oversampling)
    return factors.left, factors.right


class _LiveApproximation(_SumLayerConfig):
    """What the live approximation layers share: the circuit's weight graph they read at
    every forward, and how they approximate it (see :func:`approximation_chain`)."""

    KINDS = ("lowrank", "nystrom")

    def __init__(self, num_input_units: int, num_output_units: int, arity: int = 1, *,
                 weight: TorchParameter, kind: str, factor_rank: int, strategy: str = "qr",
                 oversampling: float = 2.0, seed: int = 0, semiring: Optional[Semiring] = None,
                 num_folds: int = 1) -> None:
        super().__init__(num_input_units, num_output_units, arity=arity, semiring=semiring, num_folds=num_folds)
        if kind not in self.KINDS:
            raise ValueError(f"live approximations support {', '.join(self.KINDS)}, got {kind!r}")
        self.weight = weight
        self.kind, self.factor_rank = kind, factor_rank
        self.strategy, self.oversampling, self.seed = strategy, oversampling, seed

    @property
    def config(self) -> Mapping[str, Any]:
        return {**super().config, "kind": self.kind, "factor_rank": self.factor_rank,
                "strategy": self.strategy, "oversampling": self.oversampling, "seed": self.seed}

    @property
    def params(self) -> Mapping[str, TorchParameter]:
        return {"weight": self.weight}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind}, rank(Ã)={self.factor_rank}, live"


class TorchLiveApproxSumLayer(_LiveApproximation):
    """A sum layer of ``c`` applying ``Ã``, the live approximation of its own weight ``W``
    (:func:`approximation_chain`, recomputed at every forward), as ``left @ (right @ x)``:
    the partner of :class:`TorchLiveSquareSumLayer` in ``|c|²`` and ``Z``, so that ``c̃``,
    ``|c̃|²`` and ``Z̃`` are one normalised model that trains ``W`` through the approximation."""

    def factor_chain(self) -> Tuple[Tensor, Tensor]:
        return approximation_chain(evaluate_parameter(self.weight), self.kind, self.factor_rank, self.strategy,
                                   self.oversampling, self.seed)

    fold_subsets = True  # linear applies to a subset of the folds

    def linear(self, z: Tensor, folds: Optional[Tensor] = None) -> Tensor:
        """z (F, B, Ki) -> (F, B, Ko): ``(z @ rightᵀ) @ leftᵀ``; with ``folds`` (F',), the map of
        those folds on z (F', B, Ki)."""
        left, right = self.factor_chain()
        if folds is not None:
            left, right = left.index_select(0, folds), right.index_select(0, folds)
        return apply_linear(lambda t: torch.bmm(torch.bmm(t, right.transpose(1, 2)), left.transpose(1, 2)),
                            z, left.dtype)

    def forward(self, x: Tensor) -> Tensor:
        left, right = self.factor_chain()
        return semiring_linear(self.semiring, lambda t: torch.bmm(torch.bmm(t, right.transpose(1, 2)),
                                                                  left.transpose(1, 2)), x, left.dtype)

    def flops(self, batch_size: int) -> int:
        ko, ki = self.num_output_units, self.num_input_units * self.arity
        return batch_size * self.num_folds * self.factor_rank * (ki + ko)


class TorchLiveSquareSumLayer(_LiveApproximation):
    """``Ã ⊗ conj(Ã)`` recomputed from the circuit's live ``A ⊗ conj(A)`` at every forward.

    ``live`` mode for the square approximations: training the original circuit's
    parameters goes on while every evaluation uses the approximation of the current
    weights. ``kind`` is ``lowrank`` (Ã = U_r U_r^H A, the truncated SVD) or ``nystrom``
    (Ã the CUR of A with a projection core, pivots by ``strategy``, drawn with a fixed
    ``seed`` so equal weights give equal pivots). The structure -- singular subspace or
    pivots -- is chosen without gradient; the values are differentiable, so gradients
    reach the circuit's parameters as the derivative of the approximation with that
    structure held fixed. At build time the output equals the ``frozen`` layer's.
    """

    def __init__(self, num_input_units: int, num_output_units: int, arity: int = 1, *,
                 weight: TorchParameter, **options) -> None:
        if not is_kronecker_weight(weight):
            raise ValueError("TorchLiveSquareSumLayer needs a weight graph whose output is a Kronecker node")
        super().__init__(num_input_units, num_output_units, arity, weight=weight, **options)

    def factor_chain(self) -> Tuple[Tensor, Tensor]:
        """``left`` (F, Ko1, r), ``right`` (F, r, Ki1) with Ã = left @ right, from the live A."""
        a, _ = kronecker_factors(self.weight)  # type: ignore[misc]
        return approximation_chain(a, self.kind, self.factor_rank, self.strategy, self.oversampling, self.seed)

    fold_subsets = True  # linear applies to a subset of the folds

    def kronecker_chain(self, folds: Optional[Tensor] = None) -> Tuple[List[Tensor], List[Tensor]]:
        """``Ã ⊗ conj(Ã)`` as chains ``([left, right], [conj(left), conj(right)])``, of the
        folds ``folds`` if given; see :meth:`TorchKroneckerSumLayer.kronecker_chain`."""
        left, right = self.factor_chain()
        if folds is not None:
            left, right = left.index_select(0, folds), right.index_select(0, folds)
        return [left, right], [left.conj(), right.conj()]

    takes_factors = True  # see linear_on_factors

    def linear_on_factors(self, left: Tensor, right: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The map on one input block given by factors (left (F, Ki1, V), right (F, Ki1, V)) ->
        the factors ``(Ã left, conj(Ã) right)`` of the output block, through Ã's thin factors
        (``2·r·Ki·V`` multiply-adds per side); None where they do not fit. Lets ``Z`` start from
        the integrals' factors, as the exact layer does."""
        return _terms_on_factors(*with_terms_axis(*self.kronecker_chain()), left, right)  # a real Ã: one side

    def _map(self, folds: Optional[Tensor] = None) -> Tuple[Callable[[Tensor], Tensor], torch.dtype]:
        chain_a, chain_b = self.kronecker_chain(folds)
        return (lambda t: kron_apply(chain_a, chain_b, t)), chain_a[0].dtype

    def forward(self, x: Tensor) -> Tensor:
        linear, dtype = self._map()
        return semiring_linear(self.semiring, linear, x, dtype)

    def linear(self, z: Tensor, folds: Optional[Tensor] = None) -> Tensor:
        """The layer's map on linear-space inputs: z (F, B, H*Ki) -> (F, B, Ko); with ``folds``
        (F',), the map of those folds on z (F', B, H*Ki)."""
        linear, dtype = self._map(folds)
        return apply_linear(linear, z, dtype)

    def flops(self, batch_size: int) -> int:
        """Multiply-adds of one forward: the chain ``left @ right`` applied on both sides."""
        with torch.no_grad():
            a, _ = kronecker_factors(self.weight)  # type: ignore[misc]
        f, ko, ki = a.shape
        left = torch.empty(f, ko, self.factor_rank, device="meta")
        right = torch.empty(f, self.factor_rank, ki, device="meta")
        return batch_size * self.num_folds * kron_chain_flops([left, right], [left, right])


def _conjugated_chains(left: Tensor, right: Tensor, on_left: bool, on_right: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """``S_l ⊗ S_r`` for ``S = left @ right`` as Kronecker chains, each side's ``S``
    conjugated where flagged (a real ``S`` is its own conjugate)."""
    def side(conjugate: bool) -> List[Tensor]:
        return [w.conj() if conjugate and w.is_complex() else w for w in (left, right)]

    return side(on_left), side(on_right)


class TorchStructuredSquareSumLayer(_SumLayerConfig):
    """The squared counterpart of a structured sum layer of ``c``: ``conj(S) ⊗ S`` in ``|c|²``
    and ``∫|c|²``, applied through ``S``'s own forward.

    On a ``Ki x Ki`` block ``X`` (the two copies' inputs), ``(conj(S) ⊗ S) vec(X)`` is
    ``conj(S) X Sᵀ``: ``S`` applied to the ``Ki`` rows of ``X``, then ``conj(S)`` to the
    ``Ko`` columns of the result -- about ``2·Ki·flops(S)`` per sample where the dense
    square costs ``2·Ki·Ko·Ki``. ``structured`` is the very module ``c``'s layer holds (the
    parameters are shared); ``fold_rows[f]`` is the fold of ``S`` this layer's fold ``f``
    squares (a permutation of S's folds: cirkit orders the folds of ``|c|²`` its own way).
    ``conjugate_left``: the first Kronecker factor is ``conj(S)`` (``multiply(conjugate(c), c)``).
    """

    def __init__(self, num_input_units: int, num_output_units: int, arity: int = 1, *,
                 structured: StructuredSumLayer, fold_rows: Tensor, conjugate_left: bool = True,
                 semiring: Optional[Semiring] = None, num_folds: int = 1) -> None:
        super().__init__(num_input_units, num_output_units, arity=arity, semiring=semiring, num_folds=num_folds)
        ki, ko = structured.in_features, structured.out_features
        if arity != 1 or (num_input_units, num_output_units) != (ki * ki, ko * ko):
            raise ValueError(f"a squared structured layer maps {ki}² -> {ko}² units with arity 1; got "
                             f"{num_input_units} -> {num_output_units} units, arity {arity}")
        rows = torch.as_tensor(fold_rows, dtype=torch.long).reshape(-1)
        if rows.numel() != num_folds or structured.num_folds != num_folds or not torch.equal(
                rows.sort().values, torch.arange(num_folds)):
            raise ValueError(f"fold_rows must be a permutation of the structured layer's {structured.num_folds} "
                             f"folds for this layer's {num_folds}, got {rows.tolist()}")
        self.structured = structured
        self.conjugate_left = bool(conjugate_left)
        identity = torch.equal(rows, torch.arange(num_folds))
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(num_folds)
        self.register_buffer("fold_rows", rows, persistent=False)
        self.register_buffer("fold_inverse", inverse, persistent=False)
        self._identity = identity
        # The order is a matter of shapes: decided once. S = L R through r inner units is
        # squared as R on both sides, then L, where that costs fewer multiply-adds.
        factors = structured.thin_factors()
        self._inner = None if factors is None else int(factors[1].shape[1])
        if self._inner is not None and num_folds * self._factored_macs(ki, ko, self._inner) >= self._generic_macs(1):
            self._inner = None

    @property
    def params(self) -> Mapping[str, TorchParameter]:
        return {}

    def _apply(self, t: Tensor, conjugate: bool) -> Tensor:
        s = self.structured
        if conjugate and s.dtype.is_complex:
            return apply_linear(s, t.conj(), s.dtype).conj()
        return apply_linear(s, t, s.dtype)

    def _factors(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(L, R)`` with ``S = L R`` when this layer squares through them (see ``__init__``)."""
        return None if self._inner is None else self.structured.thin_factors()

    @staticmethod
    def _factored_macs(ki: int, ko: int, r: int) -> int:
        # X Rᵀ, R (.) on the other side, then L on each side: Ki·Ki·r + r·Ki·r + r·r·Ko + Ko·r·Ko
        return ki * ki * r + r * ki * r + r * r * ko + ko * r * ko

    def _generic_macs(self, batch_size: int) -> int:
        ki, ko = self.structured.in_features, self.structured.out_features
        return self.structured.flops(batch_size * ki) + self.structured.flops(batch_size * ko)

    def _sandwich(self, x: Tensor, right: Callable[[Tensor], Tensor], left: Callable[[Tensor], Tensor],
                  n_in: int, n_mid: int) -> Tensor:
        """x (F, B, n_in·n_in), a block X (n_in x n_in) per fold and sample -> ``left`` applied
        to X's first index and ``right`` to its last, (F, B, n_mid·n_mid), first index first."""
        f, b, _ = x.shape
        rows = right(x.reshape(f, b * n_in, n_in))  # (F, B·n_in, n_mid): (i1, j2)
        cols = rows.view(f, b, n_in, n_mid).transpose(2, 3).reshape(f, b * n_mid, n_in)  # (j2, i1)
        y = left(cols)  # (F, B·n_mid, n_mid): (j2, j1)
        return y.view(f, b, n_mid, n_mid).transpose(2, 3).reshape(f, b, n_mid * n_mid)

    @property
    def fold_subsets(self) -> bool:
        """:meth:`linear` applies to a subset of the folds where it squares through ``S``'s
        thin factors (the general path runs ``S``'s own forward over all of its folds)."""
        return self._inner is not None

    def maps_symmetric(self) -> bool:
        """``S X Sᵀ`` keeps symmetric blocks symmetric: a real S (its own conjugate)."""
        return not self.structured.dtype.is_complex

    def linear(self, z: Tensor, folds: Optional[Tensor] = None, *, symmetric: bool = False) -> Tensor:
        """z (F, B, Ki²) -> (F, B, Ko²): ``conj(S) X Sᵀ`` per fold and sample; with ``folds``
        (F',), those folds' map on z (F', B, Ki²) (:attr:`fold_subsets`). ``symmetric``: every
        block of z is symmetric (:meth:`maps_symmetric`); squared through ``L R``, the backward
        then spares products (:func:`structlayers.linalg.kron_apply`).

        In general ``S``'s own forward on X's rows, then on the columns of the result. A kind
        whose ``S = L R`` passes through ``r`` inner units (``thin_factors``, e.g. low rank)
        goes ``R`` on both sides first (an ``r x r`` block), then ``L`` on both sides:
        ``2·K²·r + 2·K·r²`` per sample instead of ``4·K²·r``.
        """
        ki, ko = self.structured.in_features, self.structured.out_features
        on_left, on_right = self.conjugate_left, not self.conjugate_left  # which side applies conj(S)
        factors = self._factors()
        if folds is not None and factors is None:
            raise ValueError("this squared structured layer computes all of its folds (fold_subsets is False)")
        if factors is None:
            if not self._identity:  # into the structured layer's fold order
                z = _Permute.apply(z, self.fold_inverse, self.fold_rows)
            y = self._sandwich(z, lambda t: self._apply(t, conjugate=on_right),
                               lambda t: self._apply(t, conjugate=on_left), ki, ko)
            if not self._identity:
                y = _Permute.apply(y, self.fold_rows, self.fold_inverse)
        else:
            left, right = factors
            if not self._identity:  # the thin factors into this layer's fold order, not the K² activations
                left, right = left.index_select(0, self.fold_rows), right.index_select(0, self.fold_rows)
            if folds is not None:
                left, right = left.index_select(0, folds), right.index_select(0, folds)
            y = self._square_factored(z, left, right, on_left, on_right, symmetric)
        return y

    def kronecker_chain(self) -> Optional[Tuple[List[Tensor], List[Tensor]]]:
        """Where this layer squares through ``S = L R`` (:meth:`linear`): ``S_l ⊗ S_r`` as the
        chains ``([L_l, R_l], [L_r, R_r])`` (conjugated on the side :meth:`linear` conjugates),
        in this layer's fold order; else None. See :meth:`TorchKroneckerSumLayer.kronecker_chain`."""
        factors = self._factors()
        if factors is None:
            return None
        left, right = factors
        if not self._identity:
            left, right = left.index_select(0, self.fold_rows), right.index_select(0, self.fold_rows)
        return _conjugated_chains(left, right, self.conjugate_left, not self.conjugate_left)

    takes_factors = True  # see linear_on_factors

    def linear_on_factors(self, left: Tensor, right: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The map on one input block given by factors: units ``vec(left @ rightᵀ)`` (first
        index first; left (F, Ki, V), right (F, Ki, V)) -> the factors ``(S₁ left, S₂ right)``
        of the output block ``S₁ X S₂ᵀ`` (S₁, S₂: ``S`` or ``conj(S)`` as in :meth:`linear`),
        through ``S``'s forward on V rows per side."""
        ki = self.structured.in_features
        if left.shape[1] != ki or right.shape[1] != ki:
            return None
        if not self._identity:  # into the structured layer's fold order, and back
            left, right = left.index_select(0, self.fold_inverse), right.index_select(0, self.fold_inverse)

        def side(t: Tensor, conjugate: bool) -> Tensor:
            out = self._apply(t.transpose(1, 2), conjugate=conjugate).transpose(1, 2)  # (F, Ko, V)
            return out if self._identity else out.index_select(0, self.fold_rows)

        out = side(left, self.conjugate_left)
        if right is left and not self.structured.dtype.is_complex:  # one real map of one factor: once
            return out, out
        return out, side(right, not self.conjugate_left)

    @staticmethod
    def _square_factored(z: Tensor, left: Tensor, right: Tensor, on_left: bool, on_right: bool,
                         symmetric: bool = False) -> Tensor:
        """z (F, B, Ki²) -> (F, B, Ko²): ``S_l X S_rᵀ`` with ``S = L R`` (left (F, Ko, r), right
        (F, r, Ki)), conjugated on the sides flagged, as four batched GEMMs over the folds:
        ``X R_rᵀ``, then ``R_l (.)`` and ``L_l (.)`` with the samples beside the columns, then
        ``(.) L_rᵀ``. Only the samples' axis moves (twice), so for ``B = 1`` (``Z``) nothing is copied.
        ``symmetric``: see :meth:`linear` (one block per fold only)."""
        f, b, _ = z.shape
        ko, r, ki = left.shape[1], left.shape[2], right.shape[2]
        # z in the factors' precision, as apply_linear does (a real map keeps complex z complex)
        if z.is_complex() and not right.is_complex():
            z = z.to(torch.complex128 if right.dtype == torch.float64 else torch.complex64)
        else:
            z = z.to(right.dtype)

        def side(w: Tensor, conjugate: bool) -> Tensor:
            return w.conj() if conjugate and w.is_complex() else w

        if b == 1 and z.dtype == right.dtype:  # one block per fold (Z): one autograd node
            return kron_apply(*_conjugated_chains(left, right, on_left, on_right), z, symmetric=symmetric)
        t = _matmul(z.reshape(f, b * ki, ki), side(right, on_right).transpose(1, 2))  # (F, B·Ki, r): (b, i1, j2)
        t = t.view(f, b, ki, r).transpose(1, 2).reshape(f, ki, b * r)  # (i1, b, j2)
        t = _matmul(side(left, on_left), _matmul(side(right, on_left), t))  # (F, Ko, B·r): (o1, b, j2)
        y = _matmul(t.reshape(f, ko * b, r), side(left, on_right).transpose(1, 2))  # (F, Ko·B, Ko): (o1, b, o2)
        return y.view(f, ko, b, ko).transpose(1, 2).reshape(f, b, ko * ko)

    def forward(self, x: Tensor) -> Tensor:
        return semiring_linear(self.semiring, self.linear, x,
                               self.structured.dtype)

    def flops(self, batch_size: int) -> int:
        if self._inner is None:
            return self._generic_macs(batch_size)
        s = self.structured
        return batch_size * s.num_folds * self._factored_macs(s.in_features, s.out_features, self._inner)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.structured.kind}, squared"
