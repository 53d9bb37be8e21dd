"""Log-likelihoods of squared circuits, evaluated without cirkit's -708 clamp."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit

from .accelerate import cirkit_evaluation
from .linear_space import evaluate_linear_space
from .semiring import unclamped


def log_value(circuit: TorchCircuit, x: Optional[Tensor] = None, *, linear_space: bool = False) -> Tensor:
    """Real part of the circuit's log-output, unclamped: (B, O, K) for data x, (O, K) without.

    Works for lse-sum and complex-lse-sum circuits; sum-product circuits return their log.
    ``linear_space=True`` evaluates with :func:`evaluate_linear_space` (same values,
    faster; log semirings only); False with cirkit's own (clamp-free) evaluation, also for
    an accelerated circuit.
    """
    if linear_space:
        y = evaluate_linear_space(circuit, x)
        return y.real if y.is_complex() else y
    with unclamped(circuit), cirkit_evaluation(circuit):
        y = circuit(x) if x is not None else circuit()
    if circuit.layers[0].semiring.__name__ == "SumProductSemiring":
        y = torch.log(y)
    return y.real if y.is_complex() else y


def log_likelihood(squared: TorchCircuit, x: Tensor, partition: Union[TorchCircuit, Tensor],
                   *, base: Optional[TorchCircuit] = None, linear_space: bool = False) -> Tensor:
    """log p(x) = log c²(x) − log Z per sample, (B,), correct below -708.

    squared: the compiled c² (or |c|²) circuit; partition: the compiled ∫c² circuit
    or an already computed log Z. With ``base`` (the compiled c itself, sharing
    parameters), log c²(x) is computed as 2 Re log c(x), which is cheaper (K
    instead of K² units per layer) and valid for complete evidence; marginal
    queries must go through ``squared``. ``linear_space``: see :func:`log_value`.
    """
    log_z = partition if isinstance(partition, Tensor) else log_value(partition, linear_space=linear_space)
    log_z = log_z.reshape(-1)[0]
    if base is not None:
        values = 2 * log_value(base, x, linear_space=linear_space)
    else:
        values = log_value(squared, x, linear_space=linear_space)
    return values[:, 0, 0] - log_z


def nll_to_bpd(nll: float, num_variables: int) -> float:
    """A mean negative log-likelihood in nats per example, as bits per variable:
    ``nll / (D ln 2)``."""
    return nll / (num_variables * math.log(2.0))


def bits_per_dimension(log_likelihoods: Tensor, num_variables: int) -> float:
    """Mean negative log-likelihood of per-example ``log_likelihoods`` (B,) in bits per variable."""
    return nll_to_bpd(float(-log_likelihoods.detach().double().mean()), num_variables)
