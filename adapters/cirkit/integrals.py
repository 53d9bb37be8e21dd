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

import functools
import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["gaussian_product_integrals"]

_LOG_TWO_PI = math.log(2.0 * math.pi)


#: Folds per pass: the ``K1 x K2`` blocks are computed a few folds at a time, so that each
#: pass's temporaries (about this many bytes) stay in the core's cache. Measured here (64
#: folds, forward+backward, 2 threads): at K=256 all folds at once 27-37 ms, 8 folds at a
#: time (2 MiB) 14 ms; at K=128 (2 chunks of 32 folds) 5.2 -> 4.3 ms.
CHUNK_BYTES = 2 * 2**20


def _fold_chunks(folds: int, block_entries: int, item_bytes: int) -> range:
    """Starts of the fold chunks whose blocks take about :data:`CHUNK_BYTES` (at least one fold)."""
    return range(0, folds, max(1, CHUNK_BYTES // max(1, block_entries * item_bytes)))


class _GaussianProductIntegrals(torch.autograd.Function):
    """(μ1 (F, K1), σ1 (F, K1), μ2 (F, K2), σ2 (F, K2)) -> (v (F, K1, K2), s (F,)) with
    ``v · e^s`` the integrals; ``s`` is a constant to autograd. Both directions run over
    chunks of folds (:func:`_fold_chunks`), writing into one output."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, mean1: Tensor, std1: Tensor, mean2: Tensor, std2: Tensor):  # type: ignore[override]
        f, k1, k2 = mean1.shape[0], mean1.shape[1], mean2.shape[1]
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in (std1, mean2, std2)), mean1.dtype)
        values = mean1.new_empty((f, k1, k2), dtype=dtype)
        least = mean1.new_empty((f,), dtype=dtype)
        step = _fold_chunks(f, k1 * k2, values.element_size()).step
        for a in range(0, f, step):
            b = min(f, a + step)
            total_var = std1[a:b].square().unsqueeze(2) + std2[a:b].square().unsqueeze(1)  # S
            diff = mean1[a:b].unsqueeze(2) - mean2[a:b].unsqueeze(1)  # D
            # L = log S + D²/S, so that the log-integral is -(log 2π + L) / 2
            logs = diff.square_().div_(total_var).add_(total_var.log_())
            low = logs.flatten(start_dim=1).amin(dim=1)  # the largest integral of each fold
            low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
            least[a:b] = low
            torch.add(low.view(-1, 1, 1) * 0.5, logs, alpha=-0.5, out=values[a:b]).exp_()
        scale = -0.5 * (least + _LOG_TWO_PI)
        ctx.mark_non_differentiable(scale)
        # D and S again in the backward (two passes) rather than two more saved blocks
        ctx.save_for_backward(mean1, std1, mean2, std2, values)
        return values, scale

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_scale: Tensor):  # type: ignore[override]
        mean1, std1, mean2, std2, values = ctx.saved_tensors
        need = ctx.needs_input_grad
        f = values.shape[0]
        # dlog/dμ1 = -D/S, dlog/dμ2 = D/S, dlog/dσ1 = σ1 (D²/S - 1)/S (and σ2 alike)
        sums = {name: torch.zeros_like(t) for name, t, needed in
                (("mean1", mean1, need[0]), ("mean2", mean2, need[2]), ("std1", std1, need[1]), ("std2", std2, need[3]))
                if needed}
        step = _fold_chunks(f, values.shape[1] * values.shape[2], values.element_size()).step
        for a in range(0, f, step):
            b = min(f, a + step)
            weighted = grad[a:b] * values[a:b]  # the gradient w.r.t. each log-integral
            inv_var = (std1[a:b].square().unsqueeze(2) + std2[a:b].square().unsqueeze(1)).reciprocal_()
            diff = mean1[a:b].unsqueeze(2) - mean2[a:b].unsqueeze(1)
            per_mean = (weighted * diff).mul_(inv_var)  # W D / S
            if "mean1" in sums:
                torch.sum(per_mean, dim=2, out=sums["mean1"][a:b])
            if "mean2" in sums:
                torch.sum(per_mean, dim=1, out=sums["mean2"][a:b])
            if "std1" in sums or "std2" in sums:
                per_var = per_mean.mul_(diff).sub_(weighted).mul_(inv_var)  # W (D²/S - 1) / S
                if "std1" in sums:
                    torch.sum(per_var, dim=2, out=sums["std1"][a:b])
                if "std2" in sums:
                    torch.sum(per_var, dim=1, out=sums["std2"][a:b])
        g_mean1 = sums["mean1"].neg_() if "mean1" in sums else None
        g_mean2 = sums.get("mean2")
        g_std1 = std1 * sums["std1"] if "std1" in sums else None
        g_std2 = std2 * sums["std2"] if "std2" in sums else None
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
