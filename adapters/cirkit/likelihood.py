"""Log-likelihoods of squared circuits, evaluated without cirkit's -708 clamp."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit

from structlayers._checks import check_bool, check_positive_int

from .accelerate import cirkit_evaluation
from .checks import check_evidence
from .linear_space import evaluate_linear_space
from .semiring import unclamped


def _log_output(circuit: TorchCircuit, x: Optional[Tensor], linear_space: bool) -> Tensor:
    """The circuit's log-output, unclamped: real (lse-sum) or complex, whose real part is
    log|value| and whose imaginary part is pi (mod 2 pi) where the value is negative."""
    if linear_space:
        return evaluate_linear_space(circuit, x)
    with unclamped(circuit), cirkit_evaluation(circuit):
        y = circuit(x) if x is not None else circuit()
    if circuit.layers[0].semiring.__name__ == "SumProductSemiring":
        y = torch.log(y if y.is_complex() else y.to(torch.complex128 if y.dtype == torch.float64 else torch.complex64))
    return y


def split_log_sign(y: Tensor) -> Tuple[Tensor, Tensor]:
    """(log|value|, sign ±1) of a log-semiring output: real (lse-sum, positive values) or
    complex, whose imaginary part is pi (mod 2 pi) where the value is negative."""
    if not y.is_complex():
        return y, torch.ones_like(y)
    return y.real, torch.where(torch.cos(y.imag) < 0, -1.0, 1.0).to(y.real.dtype)


def nan_where_negative(value: Tensor, sign: Tensor, describe, stacklevel: int = 3) -> Tensor:
    """``value`` with NaN where ``sign < 0`` (a ratio that is no density), and one UserWarning
    ``describe(negative)`` (a message from the boolean mask) when there is any."""
    negative = sign < 0
    if not bool(negative.any()):
        return value
    warnings.warn(describe(negative), UserWarning, stacklevel=stacklevel + 1)
    return torch.where(negative, torch.full_like(value, float("nan")), value)


def log_value(circuit: TorchCircuit, x: Optional[Tensor] = None, *, linear_space: bool = False) -> Tensor:
    """Real part of the circuit's log-output, unclamped: (B, O, K) for data x, (O, K) without.

    Works for lse-sum and complex-lse-sum circuits; sum-product circuits return their log
    (of the absolute value). ``linear_space=True`` evaluates with
    :func:`evaluate_linear_space` (same values, faster; log semirings only); False with
    cirkit's own (clamp-free) evaluation, also for an accelerated circuit. ``x`` is checked
    first (shape (B, D), integer categories in range, see :func:`~adapters.cirkit.checks.check_evidence`).
    """
    _check_circuit(circuit, "circuit")
    check_evidence(circuit, x)
    return split_log_sign(_log_output(circuit, x, linear_space))[0]


def _check_circuit(circuit: object, name: str) -> TorchCircuit:
    if not isinstance(circuit, TorchCircuit):
        raise TypeError(f"{name} must be a compiled cirkit TorchCircuit, got {type(circuit).__name__}")
    return circuit


def _log_partition(partition: object, linear_space: bool) -> Tuple[Tensor, Tensor]:
    """(log|Z|, sign of Z) from the ∫c² circuit or a given log Z (one element, real or complex)."""
    if isinstance(partition, TorchCircuit):
        if partition.scope:
            raise ValueError(f"partition must be the compiled ∫c² circuit, which has no variables, or log Z as "
                             f"a tensor; got a circuit over {len(partition.scope)} variables (was c² passed "
                             f"as partition?)")
        log_z = _log_output(partition, None, linear_space)
    elif isinstance(partition, Tensor):
        log_z = partition
    else:
        raise TypeError(f"partition must be the compiled ∫c² circuit or log Z as a one-element tensor, got "
                        f"{type(partition).__name__}; pass torch.tensor(log_z) for a number")
    if log_z.numel() != 1:
        raise ValueError(f"partition must hold one log Z, got a tensor of shape {tuple(log_z.shape)}; pass the "
                         f"element that is log Z (e.g. log_z[0, 0])")
    log_abs, sign = split_log_sign(log_z.reshape(()))
    return log_abs, sign


def log_likelihood(squared: TorchCircuit, x: Tensor, partition: Union[TorchCircuit, Tensor],
                   *, base: Optional[TorchCircuit] = None, linear_space: bool = False,
                   signed: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """log p(x) = log c²(x) − log Z per sample, (B,), correct below -708.

    squared: the compiled c² (or |c|²) circuit; partition: the compiled ∫c² circuit
    or an already computed log Z (a one-element tensor). With ``base`` (the compiled c
    itself, over the same variables, sharing parameters), log c²(x) is computed as
    2 Re log c(x), which is cheaper (K instead of K² units per layer) and valid for
    complete evidence; marginal queries must go through ``squared``. ``linear_space``:
    see :func:`log_value`. ``x``: (B, D) integer categories in range, checked first.

    Not a density. After a swap that does not keep the square (the flat structures of
    :func:`~adapters.cirkit.swap.rank_policy`), c̃²(x) can be negative for some x, and
    Z̃ can be negative; log|c̃²(x)/Z̃| is then no log-density. Such samples get NaN, and
    a UserWarning says how many. ``signed=True`` instead returns the pair
    (log|c̃²(x)/Z̃|, sign), sign ±1 per sample, with no NaN and no warning, for callers
    that handle signed values (c̃²(x)/Z̃ = sign · exp(log|·|)).
    """
    _check_circuit(squared, "squared")
    signed = check_bool(signed, "signed")
    if not squared.scope:
        raise ValueError("squared has no variables: it must be the compiled c² circuit, and partition the "
                         "∫c² circuit (were they swapped?)")
    check_evidence(squared, x)
    log_z, sign_z = _log_partition(partition, linear_space)
    if base is not None:
        _check_circuit(base, "base")
        if set(base.scope) != set(squared.scope):
            raise ValueError(f"base must be the compiled c over the variables of squared ({len(squared.scope)}), "
                             f"got a circuit over {len(base.scope)}"
                             + (" (the partition circuit?)" if not base.scope else ""))
        values, sign = 2 * log_value(base, x, linear_space=linear_space), None
    else:
        values, sign = split_log_sign(_log_output(squared, x, linear_space))
    ll = values[:, 0, 0] - log_z
    sign = sign_z.expand_as(ll) if sign is None else sign[:, 0, 0] * sign_z
    if signed:
        return ll, sign

    def describe(negative: Tensor) -> str:
        what = "Z̃ < 0" if bool(sign_z < 0) else f"c̃²(x) < 0 for {int(negative.sum())} of {ll.numel()} samples"
        return (f"log_likelihood: {what}, so c̃²(x)/Z̃ is negative there and no density (the circuit is no longer "
                f"a square, e.g. after rank_policy's flat approximations; square_policy keeps it one); NaN is "
                f"returned for those samples; signed=True gives log|c̃²(x)/Z̃| and the sign")

    return nan_where_negative(ll, sign, describe, stacklevel=2)


def nll_to_bpd(nll: float, num_variables: int) -> float:
    """A mean negative log-likelihood in nats per example, as bits per variable:
    ``nll / (D ln 2)``."""
    num_variables = check_positive_int(num_variables, "num_variables")
    return nll / (num_variables * math.log(2.0))


def bits_per_dimension(log_likelihoods: Tensor, num_variables: int) -> float:
    """Mean negative log-likelihood of per-example ``log_likelihoods`` (B,) in bits per variable."""
    if not isinstance(log_likelihoods, Tensor):
        raise TypeError(f"log_likelihoods must be a torch.Tensor (B,), got {type(log_likelihoods).__name__}")
    num_variables = check_positive_int(num_variables, "num_variables")
    return nll_to_bpd(float(-log_likelihoods.detach().double().mean()), num_variables)
