"""The scaled values of the linear-space evaluation (:mod:`~adapters.cirkit.linear_space`):
a layer's output is a pair ``(v, s)``, ``v`` (F, B, K) in linear space and ``s`` (F, B) a
real log-scale, standing for ``v · exp(s)``; ``v`` is rescaled only when its largest entry
per fold and sample leaves ``[2^-16, 2^16]``. Also the conversions from and to the log
semirings' encodings."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .semiring import log

__all__ = ["Scaled", "normalise", "rescale", "undivided", "from_logs", "to_logs"]

Scaled = Tuple[Tensor, Tensor]  # (v (F, [H,] B, K), s (F, [H,] B))


# ------------------------------------------------------------------ scales
def _max_abs(v: Tensor, gram: bool = False) -> Tensor:
    """Largest |entry| over the last axis (the ∞-norm of the real and imaginary parts
    for complex v, within √2 of the modulus and without a square root).

    ``gram``: the last axis holds K x K blocks that are Gram matrices (positive
    semi-definite, Hermitian), whose largest |entry| is on the diagonal (|X_ij|² ≤ X_ii X_jj):
    K entries are read instead of K²."""
    if gram:
        k = math.isqrt(v.shape[-1])
        diagonal = v.unflatten(-1, (k, k)).diagonal(dim1=-2, dim2=-1)
        return (diagonal.real if diagonal.is_complex() else diagonal).amax(dim=-1)
    if v.is_complex():
        v = torch.view_as_real(v).flatten(start_dim=-2)
    # two vectorised reductions and no |v| temporary: torch's fused aminmax over the last
    # axis is far slower on the CPU than amax and amin apart
    return torch.maximum(v.amax(dim=-1), v.amin(dim=-1).neg())


# Values are rescaled only when their largest entry leaves [2^-16, 2^16]: products of
# such values keep far from both ends of float32's range, and a sum layer overflows
# only with weights near 2^100. Layers inside the range cost one max and no division.
_LOW, _HIGH = 2.0**-16, 2.0**16


def _flush_limit(dtype: torch.dtype) -> float:
    """Below this largest entry a product may have flushed entries to zero."""
    real = dtype.to_real() if dtype.is_complex else dtype
    return torch.finfo(real).tiny ** 0.5


class _Unmeasured(Exception):
    """A sum layer after an unmeasured product came out tiny: evaluate again, measuring."""


def _peaks(v: Tensor, gram: bool = False) -> Tuple[Optional[Tensor], float, float]:
    """The largest |entry| of v per (fold, sample), detached, and the smallest and largest of
    those as Python floats (reading floats costs less dispatch than comparing tensors and
    ``all``). A single vector (one fold and sample, as in a deep chain) is read with one
    ``aminmax`` and gives no tensor (None) -- also a Gram block (``gram``, :func:`_max_abs`:
    its diagonal's two views cost more there than one pass). NaN entries give NaN, which
    fails every test (``gram``: NaN on the diagonal)."""
    if v.numel() == v.shape[-1]:
        lo, hi = torch.aminmax((torch.view_as_real(v) if v.is_complex() else v).detach())
        top = max(float(hi), -float(lo))  # NaN: max keeps its first argument, hi is NaN too
        return None, top, top
    m = _max_abs(v, gram).detach()
    if not m.numel():  # no samples (an empty batch): nothing to rescale
        return m, 1.0, 1.0
    lo, hi = torch.aminmax(m)
    return m, float(lo), float(hi)


def _divisor(v: Tensor, m: Optional[Tensor], top: float) -> Union[float, Tensor]:
    """What :func:`_rescaled` divides v by: its peaks ``m`` (:func:`_peaks`) with zeros
    replaced by 1 (an all-zero vector stays zero), or for a single vector (m None) its peak
    ``top`` as a Python number -- unless that is 0, inf or NaN, which take the tensor path
    as every other vector does."""
    if m is None:
        if top > 0 and math.isfinite(top):
            return top
        m = _max_abs(v).detach()
    return torch.where(m > 0, m, torch.ones_like(m))


def _divided(v: Tensor, s: Tensor, divisor: Union[float, Tensor]) -> Scaled:
    """v divided by :func:`_divisor`'s ``divisor``, its log moved into s."""
    if isinstance(divisor, float):
        return v * (1.0 / divisor), s + math.log(divisor)
    return v / divisor.unsqueeze(-1), s + torch.log(divisor)


def undivided(grad: Tensor, divisor: Union[float, Tensor, None]) -> Tensor:
    """The gradient w.r.t. v before :func:`_divided` divided it by ``divisor`` (None: it was
    not), as autograd would propagate it."""
    if divisor is None:
        return grad
    return grad * (1.0 / divisor) if isinstance(divisor, float) else grad / divisor.unsqueeze(-1)


def _rescaled(v: Tensor, s: Tensor, m: Optional[Tensor], top: float) -> Scaled:
    """v divided by its peaks ``m`` (:func:`_peaks`), their logs moved into s."""
    return _divided(v, s, _divisor(v, m, top))


def rescale(v: Tensor, s: Tensor, *, after_unmeasured: bool = False, gram: bool = False
            ) -> Tuple[Tensor, Tensor, Union[float, Tensor, None]]:
    """:func:`normalise`, also giving what v was divided by (None where nothing was): for
    a caller that writes its own backward (:func:`undivided`)."""
    m, lo, hi = _peaks(v, gram)
    if _LOW <= lo and hi <= _HIGH:
        return v, s, None
    if after_unmeasured and lo < _flush_limit(v.dtype):
        raise _Unmeasured
    divisor = _divisor(v, m, hi)
    return (*_divided(v, s, divisor), divisor)


def normalise(v: Tensor, s: Tensor, *, after_unmeasured: bool = False, gram: bool = False) -> Scaled:
    """Keep v's entries in range: divide by the largest entry per (fold, sample) and move
    its log into s when some (fold, sample) has left [2^-16, 2^16]. ``after_unmeasured``:
    v is a sum over a product that was not measured; a tiny result raises
    :class:`_Unmeasured` (the product may have flushed entries). ``gram``: v's units are
    K x K Gram blocks, measured on their diagonals (:func:`_max_abs`)."""
    v, s, _ = rescale(v, s, after_unmeasured=after_unmeasured, gram=gram)
    return v, s


#: ``exp(d)`` of a float32 argument below about -87.3 (a subnormal or zero result) takes torch's
#: CPU kernel about 30x as long as one in the normal range (2M entries: 0.9 ms in the normal
#: range, 31 ms between -103 and -87, 10 ms below; flushing subnormals in the CPU changes
#: nothing). Seen in a Gaussian input's values at data, where 1.3 % of the entries made the
#: exp take 3 ms instead of 0.9. :class:`_ShiftedExp` computes ``exp(d) = exp(d/2)²`` with
#: ``d/2`` clamped at this value, whose square is zero in float32 like any ``exp(d)`` below -104.
_HALF_LOG_CLAMP = -55.0


class _ShiftedExp(torch.autograd.Function):
    """``exp(y - s)`` for real float32 y (..., K) and s (...,), a constant to autograd, as
    ``exp((y - s)/2)²``: every exp argument in the kernel's fast range (see
    :data:`_HALF_LOG_CLAMP`), subnormal results kept, within about two ulps of ``exp``.
    Three in-place passes after the one that makes the output; the backward is ``grad · v``."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, y: Tensor, s: Tensor) -> Tensor:  # type: ignore[override]
        v = shifted_exp_values(y, s)
        ctx.save_for_backward(v)
        return v

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        return grad * v, None


def shifted_exp_values(y: Tensor, s: Tensor, overwrite: bool = False) -> Tensor:
    """``exp(y - s[..., None])``, no autograd: for real float32, ``exp((y - s)/2)²`` with the half
    clamped (:class:`_ShiftedExp`); else ``torch.exp``. A new tensor, or (``overwrite``, for a
    caller done with y) y's own, which spares a tensor of y's size on fresh pages."""
    if y.dtype == torch.float32 and s.dtype == torch.float32:
        if overwrite:
            v = y.sub_(s.unsqueeze(-1)).mul_(0.5)
        else:
            v = torch.add(s.unsqueeze(-1) * -0.5, y, alpha=0.5)  # (y - s)/2 in one pass
        return v.clamp_(min=_HALF_LOG_CLAMP).exp_().square_()
    if overwrite:
        return y.sub_(s.unsqueeze(-1)).exp_()
    return torch.exp(y - s.unsqueeze(-1))


def shifted_exp(y: Tensor, s: Tensor) -> Tensor:
    """``exp(y - s[..., None])`` for y (..., K) and s (...,) (no gradient through s); float32
    real values through :class:`_ShiftedExp`, anything else through ``torch.exp``."""
    if y.dtype == torch.float32 and s.dtype == torch.float32:
        return _ShiftedExp.apply(y, s.detach())
    return shifted_exp_values(y, s)


def log_peaks(part: Tensor) -> Tensor:
    """The scale :func:`from_logs` takes out of real logs (..., K): their largest value over K,
    detached, 0 where that is not finite (no unit can take a value, or a NaN)."""
    s = part.detach().amax(dim=-1)
    return torch.where(torch.isfinite(s), s, torch.zeros_like(s))


def from_logs(y: Tensor) -> Scaled:
    """Semiring-encoded logs y (..., K) -> (v, s) with s the largest real part over K.

    v is real when y is (or when y is complex with zero imaginary parts: positive values).
    """
    if y.is_complex() and not bool(y.imag.any()):
        y = y.real
    s = log_peaks(y.real if y.is_complex() else y)
    return shifted_exp(y, s), s


def to_logs(v: Tensor, s: Tensor, complex_values: bool) -> Tensor:
    """(v, s) -> logs in the encoding of cirkit's log semirings.

    For complex-lse-sum the log is complex: a signed real v gets ``iπ`` where negative.
    """
    if complex_values and not v.is_complex():
        v = v.to(v.dtype.to_complex())
    return log(v) + s.unsqueeze(-1)
