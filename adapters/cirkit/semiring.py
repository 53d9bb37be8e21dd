"""Log semirings without cirkit's clamp at log(tiny) ≈ -708.4.

cirkit 0.3.1 clamps every log-space sum, product and log at ``LOG_CLAMP_MIN``
(the log of the smallest normal double), so any log-likelihood below it comes
out wrong: products of many small factors are common in circuits over hundreds
of variables. These semirings compute the same quantities without the clamp;
:func:`unclamped` evaluates a compiled circuit with them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import Tensor, autograd

from cirkit.backend.torch.circuits import TorchCircuit
from cirkit.backend.torch.semiring import (
    ComplexLSESumSemiring,
    LSESumSemiring,
    SemiringImpl,
    SumProductSemiring,
)


class _Log(autograd.Function):
    """log(x) without a clamp. Its backward is cirkit's: at exact zeros the gradient
    ``grad / x`` is made finite (``nan_to_num``: 0/0 -> 0, ±inf -> the largest finite value)."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.log(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.nan_to_num(grad / (x.conj() if x.is_complex() else x))


log = _Log.apply


def _apply_reduce(func, xs, dim: int, keepdim: bool, complex_values: bool) -> Tensor:
    """Shift by the max (of the real part) along ``dim``, apply func in linear space, log back."""
    maxes = []
    for x in xs:
        part = x.real if complex_values else x
        maxes.append(torch.clamp(torch.amax(part, dim=dim, keepdim=True),
                                 min=torch.finfo(part.dtype).min, max=torch.finfo(part.dtype).max))
    out = func(*[torch.exp(x - m) for x, m in zip(xs, maxes)])
    shift = functools.reduce(torch.add, maxes)
    if not keepdim:
        shift = shift.squeeze(dim)
    return log(out) + shift


class _ExactLogSemiring(SemiringImpl):
    """Shared body of the two clamp-free log semirings (values are logs, real or complex)."""

    complex_values = False

    @classmethod
    def sum(cls, x: Tensor, dim: int, *, keepdim: bool = False) -> Tensor:
        return x.logsumexp(dim=dim, keepdim=keepdim)

    @classmethod
    def add(cls, *xs: Tensor) -> Tensor:
        return functools.reduce(torch.logaddexp, xs)

    @classmethod
    def prod(cls, x: Tensor, dim: int, *, keepdim: bool = False) -> Tensor:
        return x.sum(dim=dim, keepdim=keepdim)

    @classmethod
    def mul(cls, *xs: Tensor) -> Tensor:
        return functools.reduce(torch.add, xs)

    @classmethod
    def apply_reduce(cls, func, *xs: Tensor, dim: int, keepdim: bool) -> Tensor:
        return _apply_reduce(func, xs, dim, keepdim, complex_values=cls.complex_values)


class ExactLSESumSemiring(_ExactLogSemiring):
    """``lse-sum`` without clamping."""

    @classmethod
    def cast(cls, x: Tensor) -> Tensor:
        return LSESumSemiring.cast(x)


class ExactComplexLSESumSemiring(_ExactLogSemiring):
    """``complex-lse-sum`` without clamping (real or imaginary part)."""

    complex_values = True

    @classmethod
    def cast(cls, x: Tensor) -> Tensor:
        return ComplexLSESumSemiring.cast(x)


# Input layers map their values from the semiring they were written for.
def _register_maps() -> None:
    maps = {
        (SumProductSemiring, ExactLSESumSemiring): log,
        (LSESumSemiring, ExactLSESumSemiring): lambda x: x,
        (ExactLSESumSemiring, ExactLSESumSemiring): lambda x: x,
        (SumProductSemiring, ExactComplexLSESumSemiring): lambda x: log(ComplexLSESumSemiring.cast(x)),
        (LSESumSemiring, ExactComplexLSESumSemiring): ComplexLSESumSemiring.cast,
        (ComplexLSESumSemiring, ExactComplexLSESumSemiring): lambda x: x,
        (ExactLSESumSemiring, ExactComplexLSESumSemiring): ComplexLSESumSemiring.cast,
    }
    for (source, target), fn in maps.items():
        target.register_map_from(source)(fn)


_register_maps()

CLAMP_FREE = {LSESumSemiring: ExactLSESumSemiring, ComplexLSESumSemiring: ExactComplexLSESumSemiring,
         SumProductSemiring: SumProductSemiring}


@contextlib.contextmanager
def unclamped(circuit: TorchCircuit) -> Iterator[TorchCircuit]:
    """Evaluate ``circuit`` inside the block with clamp-free log semirings.

    Every layer's semiring is swapped for its exact twin and restored afterwards,
    even if the block raises. Values and gradients equal cirkit's wherever cirkit
    does not clamp.
    """
    saved = [(layer, layer.semiring) for layer in circuit.layers]
    try:
        for layer, semiring in saved:
            if semiring not in CLAMP_FREE:
                raise ValueError(f"{type(layer).__name__} uses semiring {semiring.__name__}; "
                                 "unclamped evaluation supports sum-product, lse-sum and complex-lse-sum")
            layer.semiring = CLAMP_FREE[semiring]
        yield circuit
    finally:
        for layer, semiring in saved:
            layer.semiring = semiring
