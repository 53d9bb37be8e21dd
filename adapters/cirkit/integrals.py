"""Integrals of products of Gaussian input units, straight into linear space.

In ``Z`` of a squared circuit with Gaussian inputs, each input layer becomes a constant:
for every pair of units (i, j) of a fold, ``∫ N(x; μ1_i, σ1_i²) N(x; μ2_j, σ2_j²) dx
= N(μ1_i; μ2_j, σ1_i² + σ2_j²)``. cirkit computes their logs with a chain of K²-sized
elementwise operations and lets autograd differentiate each of them; the evaluator then
exponentiates the logs again. :func:`gaussian_product_integrals` computes the linear
values relative to each fold's largest one in one function with a hand-written backward:
about nine passes over the ``K1 x K2`` block forward and eleven backward, where the
composed version makes about three times as many and keeps their temporaries alive.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["gaussian_product_integrals"]

_LOG_TWO_PI = math.log(2.0 * math.pi)


class _GaussianProductIntegrals(torch.autograd.Function):
    """(μ1 (F, K1), σ1 (F, K1), μ2 (F, K2), σ2 (F, K2)) -> (v (F, K1, K2), s (F,)) with
    ``v · e^s`` the integrals; ``s`` is a constant to autograd."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, mean1: Tensor, std1: Tensor, mean2: Tensor, std2: Tensor):  # type: ignore[override]
        total_var = std1.square().unsqueeze(2) + std2.square().unsqueeze(1)  # S (F, K1, K2)
        diff = mean1.unsqueeze(2) - mean2.unsqueeze(1)  # D
        # L = log S + D²/S, so that the log-integral is -(log 2π + L) / 2
        logs = diff.square().div_(total_var).add_(torch.log(total_var))
        least = logs.detach().flatten(start_dim=1).amin(dim=1)  # (F,): the largest integral
        least = torch.where(torch.isfinite(least), least, torch.zeros_like(least))
        values = torch.add(least.view(-1, 1, 1) * 0.5, logs, alpha=-0.5).exp_()
        scale = -0.5 * (least + _LOG_TWO_PI)
        ctx.mark_non_differentiable(scale)
        # D and S again in the backward (two passes) rather than two more saved blocks
        ctx.save_for_backward(mean1, std1, mean2, std2, values)
        return values, scale

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_scale: Tensor):  # type: ignore[override]
        mean1, std1, mean2, std2, values = ctx.saved_tensors
        need = ctx.needs_input_grad
        # dlog/dμ1 = -D/S, dlog/dμ2 = D/S, dlog/dσ1 = σ1 (D²/S - 1)/S (and σ2 alike)
        weighted = grad * values  # the gradient w.r.t. each log-integral
        inv_var = (std1.square().unsqueeze(2) + std2.square().unsqueeze(1)).reciprocal_()
        diff = mean1.unsqueeze(2) - mean2.unsqueeze(1)
        per_mean = (weighted * diff).mul_(inv_var)  # W D / S
        g_mean1 = per_mean.sum(dim=2).neg_() if need[0] else None
        g_mean2 = per_mean.sum(dim=1) if need[2] else None
        g_std1 = g_std2 = None
        if need[1] or need[3]:
            per_var = per_mean.mul_(diff).sub_(weighted).mul_(inv_var)  # W (D²/S - 1) / S
            g_std1 = std1 * per_var.sum(dim=2) if need[1] else None
            g_std2 = std2 * per_var.sum(dim=1) if need[3] else None
        return g_mean1, g_std1, g_mean2, g_std2


def gaussian_product_integrals(mean1: Tensor, std1: Tensor, mean2: Tensor, std2: Tensor) -> Tuple[Tensor, Tensor]:
    """``∫ N(x; μ1_i, σ1_i²) N(x; μ2_j, σ2_j²) dx`` for every fold and pair of units, as
    ``v[f, i, j] · e^s[f]``.

    Args:
        mean1, std1: (F, K1) means and standard deviations of the first layer's units.
        mean2, std2: (F, K2) those of the second layer.

    Returns:
        ``v`` (F, K1, K2), entries in (0, 1] (the largest integral of each fold is 1), and
        ``s`` (F,) the log of that largest integral, a constant to autograd (gradients of
        ``v · e^s`` are exact, as the evaluator's scales are).
    """
    shapes = [tuple(t.shape) for t in (mean1, std1, mean2, std2)]
    if any(len(shape) != 2 for shape in shapes) or shapes[0] != shapes[1] or shapes[2] != shapes[3] \
            or shapes[0][0] != shapes[2][0]:
        raise ValueError(f"the means and standard deviations must be (F, K1), (F, K1), (F, K2), (F, K2); got {shapes}")
    return _GaussianProductIntegrals.apply(mean1, std1, mean2, std2)
