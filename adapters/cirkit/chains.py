"""Deep chains of one-fold layers evaluated as one autograd node.

A deep, narrow circuit (a linear tree: one fold per layer, tens of layers) spends most of
its time in ``Z`` around its products, not in them: per layer a Hadamard product, a sum
layer's two (or, through a low-rank factor, four) matrix products on one ``K x K`` block,
one measurement of its largest entry -- each a separate autograd node and several Python
calls, while the products themselves take microseconds at K = 128. Where such layers
follow each other -- a product of one fold whose only consumer is a sum layer of one
fold, whose only consumer is the next such product -- the evaluator
(:meth:`~adapters.cirkit.linear_space.CircuitPlan.run`) applies the whole run of them
here: one forward that computes exactly what the layer rules compute, in the same order
(so the values are the same to the last bit), and one hand-written backward that replays
the links in reverse on the saved blocks without the autograd engine between them.

A link is ``X_{k+1} = normalise(A_k (O_k1 ∘ … ∘ X_k ∘ …) B_kᵀ)``: the product of the
chain's value ``X_k`` with operands ``O_kj`` read from outside the chain (the first link
has outside operands only), then the sum layer's map as one Kronecker product of chains
of matrices (``kronecker_chain()`` of the layer), then the rescaling of
:func:`~adapters.cirkit.scaling.normalise` (the product is measured at the sum's output).
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from structlayers.linalg.kron import block_chain_backward, block_chain_forward, kron_steps, symmetric_square

from .scaling import Scaled, rescale, undivided

__all__ = ["ChainLink", "run_chain", "CHAIN_MIN_LINKS"]

#: Runs shorter than this are left to the layer rules (a chain saves per-layer overhead).
CHAIN_MIN_LINKS = 2


class ChainLink(NamedTuple):
    """One product -> sum pair of a chain, as the plan finds it: the step numbers, where the
    previous link's output enters the product (its position among the product's operands;
    None for the first link), and the (source step, row) of each other operand."""

    product: int
    total: int
    carried: Optional[int]
    outside: Tuple[Tuple[int, int], ...]


class _Link(NamedTuple):
    """A link's tensors at run time: the outside operands (1, 1, Ki) and their scales (1, 1),
    the sum layer's matrices in the order applied and the side of each (:func:`kron_steps`),
    the shapes of its input and output blocks (Ki = p·q, Ko = a1·b1), where the chain's
    value enters the product, and whether the backward may take the map as symmetric."""

    operands: List[Tensor]
    scales: List[Tensor]
    sides: Tuple[str, ...]
    mats: List[Tensor]
    shape: Tuple[int, int]
    out_shape: Tuple[int, int, int]
    carried: Optional[int]
    symmetric: bool  # the product is a symmetric block and the map A P Aᵀ (one real square A)


def run_chain(links: Sequence[Tuple[ChainLink, List[Scaled], object, bool]]) -> Optional[Scaled]:
    """The last sum's output ``(v (1, 1, Ko), s (1, 1))`` of a chain, from each link's plan
    entry, its outside operands ``(v, s)`` (in the product's order, the carried one left
    out), its sum layer, and whether those operands are symmetric blocks (then, where the
    chain's value is too and the layer applies one real square matrix on both sides, the
    link's backward spares a product: :func:`~structlayers.linalg.kron.block_chain_backward`).
    None where the chain does not apply to these tensors (a layer with no single Kronecker
    term, mixed dtypes, more than one fold or sample, scales that carry gradients): the
    caller then evaluates the layers one by one."""
    prepared: List[_Link] = []
    dtype = None
    carried_symmetric = True  # the first link has no carried value
    for link, operands, layer, operands_symmetric in links:
        chain = layer.kronecker_chain()
        if chain is None:
            return None
        sides, mats = kron_steps(*chain)
        values = [v for v, _ in operands]
        scales = [s for _, s in operands]
        for t in (*values, *mats):
            dtype = t.dtype if dtype is None else dtype
            if t.dtype != dtype:
                return None
        if any(v.shape[:2] != (1, 1) for v in values) or any(m.shape[0] != 1 for m in mats) \
                or any(s.requires_grad for s in scales):
            return None
        shape = (chain[0][-1].shape[-1], chain[1][-1].shape[-1])
        if any(v.shape[-1] != shape[0] * shape[1] for v in values):
            return None
        out_shape = (1, chain[0][0].shape[-2], chain[1][0].shape[-2])
        symmetric = operands_symmetric and carried_symmetric and symmetric_square(sides, mats)
        carried_symmetric = symmetric  # A P Aᵀ of a symmetric P
        prepared.append(_Link(values, scales, sides, mats, shape, out_shape, link.carried, symmetric))
    tensors = [t for link in prepared for t in (*link.operands, *link.mats)]
    v, s = _DeepChain.apply(prepared, *tensors)
    return v, s


def _with_carried(operands: List[Tensor], carried: Optional[int], value: Optional[Tensor]) -> List[Tensor]:
    """The product's operands in its own order: the chain's value at position ``carried``."""
    if carried is None:
        return list(operands)
    return [*operands[:carried], value, *operands[carried:]]


class _DeepChain(torch.autograd.Function):
    """The links of a chain (:func:`run_chain`) in one node. Forward: per link the same
    operations as the layer rules (``_hadamard`` unmeasured, then ``_structured`` with
    :func:`~adapters.cirkit.scaling.normalise` after an unmeasured product), raising
    :class:`~adapters.cirkit.scaling._Unmeasured` where they would. Backward: per link in
    reverse, the rescaling's factor, the matrix chain's backward
    (:func:`~structlayers.linalg.kron.block_chain_backward`) and the product's (each
    operand's gradient the others' product, conjugated for complex values)."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, links: List[_Link], *tensors: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        value: Optional[Tensor] = None
        scale: Optional[Tensor] = None
        saved: List[Tensor] = []
        divisors: List[object] = []
        for link in links:
            operands = _with_carried(link.operands, link.carried, value)
            scales = _with_carried(link.scales, link.carried, scale)
            product = functools.reduce(torch.mul, operands)
            scale = functools.reduce(torch.add, scales)
            block, inputs = block_chain_forward(product.reshape(1, *link.shape), link.sides, link.mats)
            # normalise after an unmeasured product, keeping the divisor for the backward
            value, scale, divisor = rescale(block.reshape(1, 1, -1), scale, after_unmeasured=True)
            divisors.append(divisor)
            saved.extend(operands)  # with the chain's value: the product's backward reads it
            saved.extend(inputs)
        ctx.links, ctx.divisors = links, divisors
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(scale)
        return value, scale

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_scale: Optional[Tensor]):  # type: ignore[override]
        links: List[_Link] = ctx.links
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]  # per tensor given to apply, after the links
        grads: List[Optional[Tensor]] = [None] * len(needs)
        # each link's saved tensors (its product's operands, then its blocks) and inputs
        saved_at, input_at = [0], [0]
        for link in links:
            saved_at.append(saved_at[-1] + len(link.operands) + (link.carried is not None) + len(link.mats))
            input_at.append(input_at[-1] + len(link.operands) + len(link.mats))
        g: Optional[Tensor] = grad
        for k in reversed(range(len(links))):
            link, divisor = links[k], ctx.divisors[k]
            if g is None:  # nothing earlier needs a gradient
                break
            g = undivided(g, divisor)
            arity = len(link.operands) + (link.carried is not None)
            operands = saved[saved_at[k]:saved_at[k] + arity]
            inputs = saved[saved_at[k] + arity:saved_at[k + 1]]
            first, mats_first = input_at[k], input_at[k] + len(link.operands)
            # the chain's value leads back to earlier links (their operands and matrices)
            operand_needs = _with_carried(list(needs[first:mats_first]), link.carried, k > 0)
            g_block, g_mats = block_chain_backward(g.reshape(link.out_shape), link.sides, link.mats, inputs,
                                                   any(operand_needs), needs[mats_first:input_at[k + 1]],
                                                   link.symmetric)
            grads[mats_first:input_at[k + 1]] = g_mats
            g = None
            if g_block is None:
                continue
            g_product = g_block.reshape(1, 1, -1)
            outside = first
            for h, operand in enumerate(operands):
                if operand_needs[h]:
                    other = functools.reduce(torch.mul, [o for i, o in enumerate(operands) if i != h])
                    g_h = g_product * (other.conj() if other.is_complex() else other)
                    if h == link.carried:
                        g = g_h
                    else:
                        grads[outside] = g_h
                if h != link.carried:
                    outside += 1
        return (None, *grads)
