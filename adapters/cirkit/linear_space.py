"""Evaluate a log-semiring circuit in linear space, with one log-scale per fold and sample.

cirkit evaluates ``lse-sum`` and ``complex-lse-sum`` circuits on logarithms: every sum
layer exponentiates its K inputs, applies its weights and takes the log of its outputs.
In a squared circuit a layer has K² units, so each sum layer spends 2·K² (complex)
exp/log per sample and fold next to its O(K³) factor-wise product, and at small and
moderate K the transcendentals, not the products, dominate. This module computes the
same outputs without them:

* every layer output is a pair ``(v, s)``: ``v`` (F, B, K) in linear space (real or
  complex) and ``s`` (F, B) a real log-scale, standing for the values ``v · exp(s)``;
* sum layers apply their linear map to ``v`` (no exp, no log), product layers multiply
  the ``v`` and add the ``s``; when a layer's largest entry (per fold and sample) leaves
  ``[2^-16, 2^16]``, ``v`` is divided by it and ``s`` grows by its log, so ``v`` never over-
  or underflows while ``s`` carries the range (values far below cirkit's -708 clamp stay
  exact);
* signed real values stay real: a complex-lse-sum circuit with real weights (``c²``
  of a real circuit) runs on real numbers and gets its ``iπ`` only in the final log;
* the logs come back once, at the outputs: ``log v + s`` in the circuit's encoding.

The scales are constants to autograd (they are detached): the represented value is
the same for any scale, so gradients are exact.

**Cost.** A plan (:class:`CircuitPlan`) is built once per circuit: every input is read
through a :class:`~adapters.cirkit.plan.Fetch` (a view wherever cirkit's fold index moves
nothing), and a product whose only consumer is a sum layer (a CP block, a Hadamard layer
before a Kronecker sum layer) is not measured: the sum layer's output is. So a block
costs its product, its matrix products and one max per fold and sample; a division
only when the range is left. A run of one-fold layers (a deep, narrow circuit's ``Z``) is
evaluated as one autograd node with a hand-written backward (:mod:`~adapters.cirkit.chains`),
where the per-layer Python and autograd work would cost as much as the products.

**Low-rank blocks.** In ``Z`` of a squared circuit the inputs of the sum layers just above
the input layers are integrals of input products: per fold a ``Ki x Kj`` block
``X = L Rᵀ`` of rank at most V (the categories, :func:`_integrated_factors`). A sum layer
whose weight is a Kronecker product (or a sum of them, ``linear_on_factors``; or cirkit's
tensor-dot layer, one factor of such a product: :func:`_factor_map`) applies it
to the factors, ``(A L)(B R)ᵀ``, and multiplies out only its output: about ``3·K²·V``
multiply-adds per fold instead of ``2·K³``, and X is never formed. At data (``|c|²(x)``,
marginals, samples) a squared categorical or Gaussian input is, per sample, the outer
product ``u ⊗ w`` of its two layers' values: a rank-1 block, and the layer above computes
``(A u)(B w)ᵀ`` per sample (a categorical input's integrated samples take the integral's
rank-V block). With nothing integrated out that output is rank 1 again, and so is the
Hadamard product of two such blocks, ``(u₁ ∘ u₂) ⊗ (w₁ ∘ w₂)``: the blocks stay factored
through every such sum and product layer (each factor rescaled to largest entry 1), so
``|c|²(x)`` costs about what ``c(x)`` costs twice, and only what another layer reads is
multiplied out (:func:`_hadamard_on_blocks`). In ``Z`` the products' ranks multiply
(``V²`` and up), so there the sum layers' outputs are multiplied out. (Cost counts such
as :mod:`~adapters.cirkit.costs` still count those layers as they are defined.)

**Flushed products.** A product whose entries are all tiny (largest below ``sqrt(tiny)``
of the dtype, where entries far below the largest may have been flushed to zero) is
recomputed on logarithms for that layer, so the evaluation is never less accurate than
cirkit's, whose sum layers also exponentiate relative to the largest input. A sum
layer after an unmeasured product that comes out that small sends the whole
evaluation once more through the measured path.

**Marginals.** ``integrate`` (a boolean mask, per variable or per sample) replaces the
value of every input layer whose variable is integrated out by its integral, per
sample, as cirkit's ``IntegrateQuery`` does, in the same pass. The conditional
distribution of one categorical variable over all its values
(:func:`categorical_conditionals`, what sampling needs) comes from one forward and one
backward pass: the derivative of ``log f`` w.r.t. the values over that variable.
With one mask for all samples (a sampler's steps, a shared ``(D,)`` mask), a fold over
integrated variables alone has one value for every sample and a fold over observed ones
alone its value at x: only folds over both are computed per sample
(:meth:`CircuitPlan.run_shared_mask`), the others read from an evaluation with everything
integrated (one sample) and one with nothing integrated (rank-1 blocks).

Layers the evaluator does not know are evaluated in their semiring (logs in, logs
out) and the result converted back, so any circuit evaluates correctly; only the
known layers are faster. Known: input layers (categorical inputs by a table lookup of
exponentiated logits, also when the logits are the outer sum of a squared circuit's
two factors; univariate Gaussian inputs, and a squared circuit's products of two Gaussian
layers as the outer product of their values), integrals of products of categorical inputs
(as matrix products) and of Gaussian inputs (:mod:`~adapters.cirkit.integrals`),
Hadamard and Kronecker products, cirkit's sum, tensor-dot, CP-T and Tucker layers, and
this package's structured sum layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit
from cirkit.backend.torch.layers import (
    TorchCategoricalLayer,
    TorchGaussianLayer,
    TorchHadamardLayer,
    TorchInputLayer,
    TorchKroneckerLayer,
    TorchLayer,
    TorchSumLayer,
)
from cirkit.backend.torch.layers.input import TorchConstantValueLayer
from cirkit.backend.torch.layers.optimized import TorchCPTLayer, TorchTensorDotLayer, TorchTuckerLayer
from cirkit.backend.torch.parameters.nodes import (
    TorchGaussianProductLogPartition,
    TorchGaussianProductMean,
    TorchGaussianProductStddev,
    TorchLogParameter,
    TorchOuterSumParameter,
    TorchReduceLSEParameter,
    TorchSoftmaxParameter,
)
from cirkit.backend.torch.semiring import ComplexLSESumSemiring, LSESumSemiring

from structlayers.gradients import wanted_gradients
from structlayers.linalg.kron import khatri_rao, kron_apply

from .chains import CHAIN_MIN_LINKS, ChainLink, OperandFactors, inner_map, may_run_inner, run_chain
from .checks import check_evidence
from .costs import layer_macs
from .integrals import gaussian_product_integrals
from .internals import address_book, module_ids, tensordot_units, tucker_subscripts
from .layers import (
    TorchKroneckerSumLayer,
    TorchLiveApproxSumLayer,
    TorchLiveSquareSumLayer,
    TorchStructuredSquareSumLayer,
    TorchStructuredSumLayer,
    apply_linear,
)
from .plan import (
    Fetch,
    cached_plan,
    capture_inputs,
    evaluate_node,
    evaluate_parameter,
    fetched_rows,
    operand_row,
    parameter_plan,
    plan_fetch,
)
from .scaling import (
    _HIGH,
    _LOW,
    Scaled,
    _flush_limit,
    _peaks,
    _rescaled,
    _Unmeasured,
    log_peaks,
    shifted_exp_values,
    from_logs,
    normalise,
    to_logs,
)
from .semiring import ExactComplexLSESumSemiring, ExactLSESumSemiring

__all__ = ["evaluate_linear_space", "evaluate_graph", "categorical_conditionals", "check_log_semiring", "circuit_plan", "CircuitPlan", "from_logs", "to_logs"]

LOG_SEMIRINGS = (LSESumSemiring, ComplexLSESumSemiring, ExactLSESumSemiring, ExactComplexLSESumSemiring)

# ------------------------------------------------------------------- the layers
@dataclass
class _Context:
    """What the layer rules of one evaluation share."""

    complex_values: bool
    measure_products: bool  # False: products feeding one sum layer are measured there
    folds: Optional[Tensor] = None  # the layer's folds computed (those of the value given), None: all
    symmetric: bool = False  # every block of the value given is symmetric (SYMMETRIC_BLOCKS)


def _weights(layer, ctx: _Context) -> Tensor:
    """A cirkit layer's evaluated weight (F, ...), only the folds ``ctx.folds`` if given."""
    w = evaluate_parameter(layer.weight)
    return w if ctx.folds is None else w.index_select(0, ctx.folds)


def _align(v: Tensor, s: Tensor) -> Scaled:
    """Bring the H inputs (F, H, B, K) / (F, H, B) to one common scale (F, B)."""
    if v.shape[1] == 1:  # squeeze, not v[:, 0]: a select's backward fills zeros first
        return v.squeeze(1), s.squeeze(1)
    top = s.amax(dim=1)
    return v * torch.exp(s - top.unsqueeze(1)).unsqueeze(-1), top


def _product(out: Tensor, scale: Tensor, inputs: Callable[[], Scaled],
             log_combine: Callable[[Tensor], Tensor], measure: bool) -> Scaled:
    """A product layer's output ``(out, scale)``: the H inputs multiplied, the scales added.

    Measured (``measure``): if a product's entries are all tiny (largest below
    sqrt(tiny)) the entries far below its largest may have been flushed to zero: that
    layer is recomputed on logs, ``log_combine`` of the ``inputs()`` (v (F, H, B, K),
    s (F, H, B)). Unmeasured: the consuming sum layer checks its output.
    """
    if not measure:
        return out, scale
    m, lo, hi = _peaks(out)
    if lo < _flush_limit(out.dtype):  # includes products flushed to 0
        v, s = inputs()
        logs = log_combine(to_logs(v, s, complex_values=True))  # complex: v may be signed
        return from_logs(logs)
    if _LOW <= lo and hi <= _HIGH:
        return out, scale
    return _rescaled(out, scale, m, hi)


class _PairProduct(torch.autograd.Function):
    """``v[:, 0] * v[:, 1]`` for v (F, 2, ...): one pass forward; the backward writes both
    input gradients into one tensor of v's shape (two passes), where indexing's backward
    would fill zeros and add, or stack."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v)
        return v[:, 0] * v[:, 1]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (v,) = ctx.saved_tensors
        out = torch.empty(v.shape, dtype=torch.promote_types(grad.dtype, v.dtype), device=v.device)
        a, b = v[:, 0], v[:, 1]
        if v.is_complex():  # the gradient of a holomorphic product: conj of the other factor
            a, b = a.conj(), b.conj()
        torch.mul(grad, b, out=out[:, 0])
        torch.mul(grad, a, out=out[:, 1])
        return out


def _hadamard(layer, v: Union[Tensor, List[Tensor]], s: Union[Tensor, List[Tensor]], ctx: _Context,
              measure: bool = True) -> Scaled:
    """v (F, H, B, K), s (F, H, B) -- or the H inputs apart (lists of (F, B, K) and (F, B)):
    multiplied one by one, never stacked."""
    if isinstance(v, list):
        out, scale = functools.reduce(torch.mul, v), functools.reduce(torch.add, s)
        return _product(out, scale, lambda: (torch.stack(v, dim=1), torch.stack(s, dim=1)),
                        lambda t: t.sum(dim=1), measure)
    out = _PairProduct.apply(v) if v.shape[1] == 2 else v.prod(dim=1)
    return _product(out, s.sum(dim=1), lambda: (v, s), lambda t: t.sum(dim=1), measure)


def _outer(t: Tensor, mul: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    first, *rest = t.unbind(dim=1)  # one stack in the backward, no zero fill per input
    y = first
    for factor in rest:
        y = mul(y.unsqueeze(-1), factor.unsqueeze(-2)).flatten(start_dim=-2)
    return y


def _kronecker(layer, v: Tensor, s: Tensor, ctx: _Context, measure: bool = True) -> Scaled:
    return _product(_outer(v, torch.mul), s.sum(dim=1), lambda: (v, s), lambda t: _outer(t, torch.add), measure)


class _TransposedWeightProduct(torch.autograd.Function):
    """``z @ wᵀ`` for z (F, B, Ki), w (F, Ko, Ki) (one dtype). The backward writes w's gradient
    as ``gᵀ z``, in w's own layout: autograd's product with the transposed view gives
    ``(zᵀ g)ᵀ``, which is copied into place once more (a pass over every weight per call)."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, z: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, w)
        return torch.bmm(z, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, w = ctx.saved_tensors
        need_z, need_w = wanted_gradients(ctx, (0, 1))  # a query's pass wants z's only
        # complex: gradients through the conjugates (torch's convention)
        grad_z = torch.bmm(grad, w.conj()) if need_z else None
        grad_w = torch.bmm(grad.transpose(1, 2), z.conj()) if need_w else None
        return grad_z, grad_w


#: Weights of at least this many entries take :class:`_TransposedWeightProduct` where their
#: gradient is needed: below, copying the gradient costs less than the node's own overhead
#: (about 6 µs forward and 10 µs backward; a 128 x 128 weight's copy takes about 5 µs).
TRANSPOSED_WEIGHT_MIN_ENTRIES = 1 << 16


def _dense_map(w: Tensor) -> Callable[[Tensor], Tensor]:
    """z (F, B, Ki) -> z @ w^T for w (F, Ko, Ki) (:class:`_TransposedWeightProduct` where w's
    gradient is needed and w is large)."""
    if torch.is_grad_enabled() and w.requires_grad and w.numel() >= TRANSPOSED_WEIGHT_MIN_ENTRIES:
        return lambda z: _TransposedWeightProduct.apply(z, w)
    wt = w.transpose(1, 2)
    return lambda z: torch.bmm(z, wt)


def _weighted(v: Tensor, s: Tensor, linear: Callable[[Tensor], Tensor], ctx: _Context,
              after_unmeasured: bool) -> Scaled:
    """A sum layer: concatenate the H inputs unit-wise (as cirkit does) and apply ``linear``."""
    v, s = _align(v, s)  # v (F, B, Ki) for one input; (F, H, B, Ki) for several
    z = v if v.dim() == 3 else v.permute(0, 2, 1, 3).flatten(start_dim=2)
    # a symmetric map of Gram blocks gives Gram blocks (SYMMETRIC_BLOCKS): their peaks are on the diagonals
    return normalise(linear(z), s, after_unmeasured=after_unmeasured, gram=ctx.symmetric)


def _sum(layer: TorchSumLayer, v: Tensor, s: Tensor, ctx: _Context, after_unmeasured: bool = False) -> Scaled:
    w = _weights(layer, ctx)  # (F, Ko, H*Ki)
    h = v.shape[1]
    if h > 1:  # one product per input, accumulated: no copy of the inputs side by side
        v, s = _align(v, s)
        ki = v.shape[-1]
        y = None
        for i, operand in enumerate(v.unbind(dim=1)):
            part = apply_linear(_dense_map(w[:, :, i * ki:(i + 1) * ki]), operand, w.dtype)
            y = part if y is None else y + part
        return normalise(y, s, after_unmeasured=after_unmeasured)
    return _weighted(v, s, lambda z: apply_linear(_dense_map(w), z, w.dtype), ctx, after_unmeasured)


def _structured(layer, v: Tensor, s: Tensor, ctx: _Context, after_unmeasured: bool = False) -> Scaled:
    if ctx.folds is not None:
        linear = functools.partial(layer.linear, folds=ctx.folds)
    elif ctx.symmetric:  # only for layers with maps_symmetric (their linear takes it)
        linear = functools.partial(layer.linear, symmetric=True)
    else:
        linear = layer.linear
    return _weighted(v, s, linear, ctx, after_unmeasured)


def _tensor_dot(layer: TorchTensorDotLayer, v: Tensor, s: Tensor, ctx: _Context,
                after_unmeasured: bool = False) -> Scaled:
    w = _weights(layer, ctx)  # (F, Kk, Kj)
    kj, kq = tensordot_units(layer)

    def linear(z: Tensor) -> Tensor:  # (F, B, Kj*Kq) -> (F, B, Kq*Kk), as cirkit orders it
        z = z.view(z.shape[0], z.shape[1], kj, kq)
        return torch.einsum("fbjq,fkj->fbqk", z, w).flatten(start_dim=2)

    return _weighted(v, s, lambda z: apply_linear(linear, z, w.dtype), ctx, after_unmeasured)


def _cpt(layer: TorchCPTLayer, v: Tensor, s: Tensor, ctx: _Context, after_unmeasured: bool = False) -> Scaled:
    v, s = _hadamard(layer, v, s, ctx, measure=ctx.measure_products)
    w = _weights(layer, ctx)  # (F, Ko, Ki)
    y = apply_linear(_dense_map(w), v, w.dtype)
    return normalise(y, s, after_unmeasured=not ctx.measure_products)


def _tucker(layer: TorchTuckerLayer, v: Tensor, s: Tensor, ctx: _Context, after_unmeasured: bool = False) -> Scaled:
    arity, ki, ko = layer.arity, layer.num_input_units, layer.num_output_units
    w = _weights(layer, ctx).view(-1, ko, *([ki] * arity))
    in_subs, w_sub, out_sub = tucker_subscripts(layer)

    def linear(t: Tensor) -> Tensor:
        args: list = []
        for operand, sub in zip(t.unbind(dim=1), in_subs):
            args += [operand, sub]
        return torch.einsum(*args, w, w_sub, out_sub)

    if v.is_complex() and not w.dtype.is_complex:  # multilinear: complex inputs need a complex weight
        w = w.to(v.dtype)
    return normalise(linear(v), s.sum(dim=1), after_unmeasured=after_unmeasured)


# ------------------------------------------------------------------- input layers
def _probability_table(layer: TorchCategoricalLayer) -> Tuple[Tensor, Tensor]:
    """``(table, top)``: the layer's categorical values as ``table[f, n, k] · e^top[f, n]``,
    table (F, N, K) at most 1 per category, top (F, N). A softmax parameterisation is
    read as probabilities (top 0); logits are exponentiated relative to their largest
    value per category."""
    if layer.logits is None:
        probs = evaluate_parameter(layer.probs)  # (F, K, N)
        return probs.transpose(1, 2), torch.zeros(probs.shape[0], probs.shape[2], dtype=probs.real.dtype,
                                                  device=probs.device)
    logits = evaluate_parameter(layer.logits)  # (F, K, N)
    return _exp_table(logits)


def _exp_table(values: Tensor, probabilities: bool = False) -> Tuple[Tensor, Tensor]:
    """``(table, top)`` of :func:`_probability_table` from ``values`` (F, K, N): logits, or
    (``probabilities``) the probabilities themselves, which are divided by their largest
    value per category rather than taken through log and exp."""
    top = _finite(_column_tops(values, probabilities))
    if probabilities:
        return (values * torch.exp(-top).unsqueeze(1)).transpose(1, 2), top
    return torch.exp(values - top.unsqueeze(1)).transpose(1, 2), top


def _finite(t: Tensor) -> Tensor:
    """t with its infinite (and NaN) entries replaced by 0: a shift that is not needed."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _column_tops(values: Tensor, probabilities: bool) -> Tensor:
    """The log of the largest value per fold and category over the units (dim 1) of logits
    (the real parts) or of ``probabilities`` (F, K, N) -> (F, N), detached; -inf for a
    category no unit can take."""
    values = (values.real if values.is_complex() else values).detach()
    # max over a middle axis runs 2.5x faster than amax there (64 x 128 x 17: 65 against 163 us)
    top = values.max(dim=1).values
    return torch.log(top) if probabilities else top


def _logs_of_probabilities(graph, outers: Sequence) -> Tuple[Callable[..., Tensor], Dict[int, Tuple[bool, bool]]]:
    """Where ``outers`` (outer-sum nodes of a parameter graph) read logs of probabilities that
    the graph has computed -- a log of a softmax, read by nothing else -- the probabilities can
    be taken instead and exponentiated never. Returns a node function for
    :func:`evaluate_parameter` that passes those logs' inputs on, and per outer sum (by id)
    whether each of its two sides then reads probabilities; decided once per plan. (A
    log-softmax stays: its logs are finite where the probabilities would flush to 0.)"""
    def find() -> Tuple[List, Dict[int, Tuple[bool, bool]]]:
        nodes: List = []
        for outer in outers:
            for node in graph.node_inputs(outer):
                if (type(node) is TorchLogParameter and not any(node is n for n in nodes)
                        and all(type(n) is TorchSoftmaxParameter for n in graph.node_inputs(node))
                        and all(any(reader is o for o in outers) for reader in graph.node_outputs(node))):
                    nodes.append(node)
        sides = {}
        for outer in outers:
            flags = tuple(any(n is m for m in nodes) for n in graph.node_inputs(outer))
            sides[id(outer)] = (flags[0], flags[0]) if len(flags) == 1 else flags  # one node read on both sides
        return nodes, sides

    nodes, sides = parameter_plan(graph).decided(("logs of probabilities", *map(id, outers)), find)
    if not nodes:
        return evaluate_node, sides

    def fn(node, *inputs: Tensor) -> Tensor:
        return inputs[0] if any(node is n for n in nodes) else evaluate_node(node, *inputs)

    return fn, sides


def _lookup(table: Tensor, top: Tensor, x: Tensor) -> Scaled:
    """Rows ``table[f, x[f, b]]``: v (F, B, K), s (F, B); one ``index_select`` (its backward
    is a scatter-add) instead of advanced indexing."""
    f, n, k = table.shape
    rows = x + torch.arange(f, device=x.device).unsqueeze(1) * n  # (F, B)
    flat = rows.reshape(-1)
    v = table.reshape(f * n, k).index_select(0, flat).view(f, -1, k)
    s = top.reshape(-1).index_select(0, flat).view(f, -1)
    return v, s


def _integral(table: Tensor, top: Tensor) -> Scaled:
    """Σ_n table[f, n] e^top[f, n]: v (F, 1, K), s (F, 1)."""
    m = top.amax(dim=1, keepdim=True)  # (F, 1)
    v = torch.einsum("fnk,fn->fk", table, torch.exp(top - m).to(table.dtype))
    return v.unsqueeze(1), m


class _Blocks(NamedTuple):
    """A value given as low-rank factors: an input layer's (:func:`_input_blocks`), or the
    output of a sum or product layer over such values (:func:`_sum_on_blocks`,
    :func:`_hadamard_on_blocks`).

    ``batch`` an int: one block per fold, the same for the ``batch`` samples, ``left @ rightᵀ
    · e^s`` with left (F, Ki, V), right (F, Kj, V), s (F, 1) (a constant's integrals).
    ``batch`` None: one rank-1 block per sample, left (F, B, Ki), right (F, B, Kj), s (F, B)
    (a squared input at data, and the layers above it); where ``mask`` (F, B) is True the
    sample takes instead the block of ``integrated`` = (left (F, Ki, V), right (F, Kj, V),
    s (F, 1)), the integral.
    """

    left: Tensor
    right: Tensor
    s: Tensor
    batch: Optional[int]
    integrated: Optional[Tuple[Tensor, Tensor, Tensor]] = None
    mask: Optional[Tensor] = None


def _is_squared_categorical(layer) -> bool:
    """A squared circuit's categorical input: logits ``a[i, n] + b[j, n]`` (an outer sum)."""
    if not isinstance(layer, TorchCategoricalLayer) or layer.logits is None or not layer.logits.outputs:
        return False
    outer = layer.logits.outputs[0]
    return isinstance(outer, TorchOuterSumParameter) and outer.dim == 0 and len(outer.in_shape1) == 2


def _squared_categorical_rows(layer: TorchCategoricalLayer) -> Tuple[_Blocks, tuple]:
    """A squared categorical input as one rank-1 block per category: its value at category n
    and unit (i, j) is ``left[f, n, i] right[f, n, j] e^s[f, n]`` (left (F, V, Ki), right
    (F, V, Kj) at most 1, s (F, V)); one tensor on both sides where they are one function.
    Also ``(a, b, probabilities)``, the outer sum's two sides, for the integral's factors."""
    graph, outer = layer.logits, layer.logits.outputs[0]
    node_fn, sides = _logs_of_probabilities(graph, [outer])
    a, b = capture_inputs(graph, TorchOuterSumParameter, node_fn)
    probabilities = sides[id(outer)]
    # one function on both sides (a real c's c·c), read through two fetches: computed once, one tensor
    if b is not a and parameter_plan(graph).same_inputs(outer, real=not (a.is_complex() or b.is_complex())):
        b = a
    ta, sa = _exp_table(a, probabilities[0])
    tb, sb = (ta, sa) if b is a else _exp_table(b, probabilities[1])
    return _Blocks(ta, tb, sa + sb, None), (a, b, probabilities)


def _rows_of(rows: _Blocks, x: Tensor) -> _Blocks:
    """Per-category rank-1 blocks (:func:`_squared_categorical_rows`, or a layer's output over
    them) at x (F, B): each sample's row of both factors and of the scale."""
    left, s = _lookup(rows.left, rows.s, x)
    right = left if rows.right is rows.left else _lookup(rows.right, rows.s, x)[0]
    return _Blocks(left, right, s, None)


def _squared_categorical_blocks(layer: TorchCategoricalLayer, x: Tensor, mask: Optional[Tensor]) -> _Blocks:
    """A squared categorical input at x (F, B) as one rank-1 block per sample (the rows of
    :func:`_squared_categorical_rows`); where ``mask`` (F, B) is True, the integral's rank-V
    block (:func:`_outer_lse_factors`)."""
    rows, (a, b, probabilities) = _squared_categorical_rows(layer)
    found = _rows_of(rows, x)
    if mask is None:
        return found
    return found._replace(integrated=_outer_lse_factors(a, b, probabilities), mask=mask)


def _sample_outer(left: Tensor, right: Tensor) -> Tensor:
    """Per (fold, sample) outer products: left (F, B, Ki), right (F, B, Kj) -> (F, B, Ki·Kj)."""
    return (left.unsqueeze(-1) * right.unsqueeze(-2)).flatten(start_dim=-2)


def _categorical(layer: TorchCategoricalLayer, x: Tensor, mask: Optional[Tensor]) -> Scaled:
    """Values at x (F, B) -- or the integral where ``mask`` (F, B) is True."""
    if _is_squared_categorical(layer):  # values are outer products
        return _dense_blocks(_squared_categorical_blocks(layer, x, mask))
    table, top = _probability_table(layer)
    v, s = _lookup(table, top, x)
    if mask is not None:
        v, s = _select(mask, _integral(table, top), (v, s))
    return v, s


def _gaussian_product_factors(layer: TorchGaussianLayer) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(μ1, σ1, μ2, σ2)``, each (F, K), when the layer is the product of two Gaussian layers
    (a squared circuit's input: units (i, j) with cirkit's product mean, standard deviation
    and log-normaliser of units i and j), else None. Its value at x is then
    ``N(x; μ1_i, σ1_i²) · N(x; μ2_j, σ2_j²)``: an outer product of two K-unit layers, where
    cirkit evaluates K1·K2 Gaussians."""
    if layer.log_partition is None:
        return None
    means = capture_inputs(layer.mean, TorchGaussianProductMean)
    stds = capture_inputs(layer.stddev, TorchGaussianProductStddev)
    logz = capture_inputs(layer.log_partition, TorchGaussianProductLogPartition)
    if means is None or stds is None or logz is None or any(t.dim() != 2 for t in means):
        return None
    # the three graphs must read the same two layers (always so for cirkit's product rule)
    same = [(means[1], stds[0]), (means[3], stds[1])] + list(zip(means, logz))
    if not all(a.shape == b.shape and torch.equal(a.detach(), b.detach()) for a, b in same):
        return None
    if parameter_plan(layer.mean).same_inputs(layer.mean.outputs[0], ((0, 2), (1, 3)),
                                                 real=not any(t.is_complex() for t in means)):
        return means[0], means[1], means[0], means[1]  # one layer on both sides (a real c's c·c)
    return means


def _standardised_logs(mean: Tensor, std: Tensor, x: Tensor, shift: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(z, log N(x; μ_k, σ_k²) + shift_k)`` with ``z = (x - μ_k)/σ_k``: mean, std, shift (F, K),
    x (F, B) -> two (F, B, K) tensors, in two passes."""
    inv = std.reciprocal()
    z = torch.addcmul((-mean * inv).unsqueeze(1), x.unsqueeze(-1), inv.unsqueeze(1))
    constant = -torch.log(std) - 0.5 * math.log(2.0 * math.pi)
    if shift is not None:
        constant = constant + shift
    return z, torch.addcmul(constant.unsqueeze(1), z, z, value=-0.5)


class _GaussianValues(torch.autograd.Function):
    """A Gaussian layer's values at x as ``(v, s)``: ``v = N(x; μ_k, σ_k²) e^shift_k / e^s``
    (F, B, K), s (F, B) the largest log per (fold, sample) (no gradient), from mean, std,
    shift (F, K) and x (F, B). The backward makes one (F, B, K) tensor and works in place on
    it: with ``g = grad · v`` and ``z = (x - μ)/σ``, μ's gradient is ``Σ_b g z / σ``, σ's
    ``Σ_b g (z² - 1) / σ``, the shift's ``Σ_b g`` (autograd's chain through the logs made about
    seven tensors of that size, each on fresh pages)."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, mean: Tensor, std: Tensor, x: Tensor, shift: Optional[Tensor]):  # type: ignore[override]
        z, logs = _standardised_logs(mean, std, x, shift)
        s = log_peaks(logs)  # as from_logs takes it
        v = shifted_exp_values(logs, s, overwrite=True)  # the logs are not kept
        ctx.save_for_backward(v, z, std)
        ctx.has_shift = shift is not None
        ctx.mark_non_differentiable(s)
        return v, s

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_s: Optional[Tensor]):  # type: ignore[override]
        v, z, std = ctx.saved_tensors
        need_mean, need_std, need_x, need_shift = ctx.needs_input_grad
        inv = std.reciprocal()
        g = grad * v  # the logs' gradient, (F, B, K): the one tensor of that size made here
        total = g.sum(dim=1)  # Σ_b g
        g.mul_(z)  # g z
        grad_x = -(g * inv.unsqueeze(1)).sum(dim=-1) if need_x else None  # ∂ log N / ∂x = -z/σ
        first = g.sum(dim=1) if need_mean else None
        second = g.mul_(z).sum(dim=1) if need_std else None  # Σ_b g z²
        return (first * inv if need_mean else None, (second - total) * inv if need_std else None,
                grad_x, total if need_shift and ctx.has_shift else None)


def _gaussian_values(mean: Tensor, std: Tensor, x: Tensor, shift: Optional[Tensor] = None) -> Scaled:
    """``(v, s)`` of a univariate Gaussian layer at x (F, B) (:class:`_GaussianValues`): v (F, B, K)
    at most 1, s (F, B)."""
    return _GaussianValues.apply(mean, std, x.to(mean.dtype), shift)


def _gaussian(layer: TorchGaussianLayer, x: Tensor) -> Scaled:
    """A univariate Gaussian layer's ``(v, s)`` at x (F, B) (:func:`_gaussian_values`; cirkit's
    ``Normal.log_prob`` makes about six passes, and its semiring a complex copy)."""
    shift = evaluate_parameter(layer.log_partition) if layer.log_partition is not None else None
    return _gaussian_values(evaluate_parameter(layer.mean), evaluate_parameter(layer.stddev), x, shift)


def _gaussian_product_values(layer: TorchGaussianLayer, x: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor, tuple]]:
    """A product of two Gaussian layers at x (F, B): ``(left, right, s, factors)`` with its
    value at unit (i, j) ``left[f, b, i] right[f, b, j] e^s[f, b]``
    (:func:`_gaussian_product_factors`); None for any other Gaussian layer."""
    factors = _gaussian_product_factors(layer)
    if factors is None:
        return None
    mean1, std1, mean2, std2 = factors
    va, sa = _gaussian_values(mean1, std1, x)
    one = mean2 is mean1 and std2 is std1  # one layer on both sides: one tensor
    vb, sb = (va, sa) if one else _gaussian_values(mean2, std2, x)
    return va, vb, sa + sb, factors


def _gaussian_product(layer: TorchGaussianLayer, x: Tensor, mask: Optional[Tensor]) -> Optional[Scaled]:
    """A product of two Gaussian layers at x (F, B) as the outer product of their values
    (:func:`_gaussian_product_factors`); its integral where ``mask`` (F, B) is True; None for
    any other Gaussian layer."""
    found = _gaussian_product_values(layer, x)
    if found is None:
        return None
    va, vb, s, (mean1, std1, mean2, std2) = found
    v = _sample_outer(va, vb)
    if mask is not None:
        vi, si = gaussian_product_integrals(mean1, std1, mean2, std2)
        v, s = _select(mask, (vi.flatten(start_dim=1).unsqueeze(1), si.unsqueeze(1)), (v, s))
    return v, s


def _select(mask: Tensor, integrated: Scaled, observed: Scaled) -> Scaled:
    """Per (fold, sample): the integral where ``mask`` (F, B) is True, else the value."""
    vi, si = integrated
    vo, so = observed
    if vi.dtype != vo.dtype:
        dtype = torch.promote_types(vi.dtype, vo.dtype)
        vi, vo = vi.to(dtype), vo.to(dtype)
    return torch.where(mask.unsqueeze(-1), vi, vo), torch.where(mask, si.to(so.dtype), so)


def _integrated_products(value, symmetric: Optional[List[bool]] = None) -> Optional[Scaled]:
    """``(v, s)`` of a value graph ``logsumexp_v (a[i, v] + b[j, v])``, else None: the blocks
    of :func:`_integrated_factors` multiplied out. v (F, 1, Ki·Kj), s (F, 1). ``symmetric``:
    receives whether every block is symmetric (a = b: equal factors, compared exactly)."""
    found = _integrated_pieces(value)
    if found is None:
        return None
    pieces, folds = found
    if symmetric is not None:
        symmetric.append(all(left is right or torch.equal(left, right) for left, right, _ in pieces))
    v, s = _folds_of([(_materialise(left, right), s) for left, right, s in pieces], folds)
    return normalise(v, s)


def _integrated_factors(value) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """``(left, right, s)`` with the integrals ``(left @ rightᵀ) · e^s`` of a value graph
    ``logsumexp_v (a[i, v] + b[j, v])`` (:func:`_integrated_pieces`), else None (also when
    the pieces' factors differ in shape). left (F, Ki, V), right (F, Kj, V), s (F, 1)."""
    found = _integrated_pieces(value)
    if found is None:
        return None
    pieces, folds = found
    if any(p[0].shape[1:] != pieces[0][0].shape[1:] or p[1].shape[1:] != pieces[0][1].shape[1:] for p in pieces):
        return None
    left, right, s = _folds_of(pieces, folds)
    return left, right, s


def _folds_of(pieces: List[tuple], folds: Optional[Tensor]) -> tuple:
    """The pieces' tensors, each concatenated over the pieces' folds, then gathered by ``folds``
    (None: all of them in order)."""
    columns = [torch.cat(column) if len(pieces) > 1 else column[0] for column in zip(*pieces)]
    if folds is not None:
        columns = [t.index_select(0, folds) for t in columns]
    if len(columns) > 1 and all(piece[1] is piece[0] for piece in pieces):
        columns[1] = columns[0]  # one tensor of factors for both sides stays one
    return tuple(columns)


def _integrated_pieces(value) -> Optional[Tuple[List[Tuple[Tensor, Tensor, Tensor]], Optional[Tensor]]]:
    """The pieces of a value graph ``logsumexp_v (a[i, v] + b[j, v])``, else None.

    That is the graph cirkit builds for the integral of a product of two categorical
    (or other finite-support) layers: outer sums of their log-probabilities over the
    units (a: (F, Ki, V), b: (F, Kj, V), one node per pair of unit counts), folded into
    one log-sum-exp over the categories. Each outer sum is replaced by the two factors of
    :func:`_outer_lse_factors`; the outer sums' folds are tracked through the graph's
    gathers by a placeholder carrying fold numbers. Any other graph gives None. Returns
    the pieces ``(left, right, s)`` of :func:`_outer_lse_factors` and the folds (an index
    into the pieces concatenated; None for all of them in order).
    """
    if not _ends_in_reduce(value):
        return None
    reduce = value.outputs[0]
    outers = list(value.node_inputs(reduce))
    for outer in outers:
        if (not isinstance(outer, TorchOuterSumParameter) or len(outer.in_shape1) != 2 or outer.dim != 0
                or list(value.node_outputs(outer)) != [reduce]):
            return None
    if reduce.dim != 1 or not outers:
        return None
    pieces: List[Tuple[Tensor, Tensor, Tensor]] = []
    plan = parameter_plan(value)
    node_fn, sides = _logs_of_probabilities(value, outers)

    def fn(node, *inputs):
        if node is reduce:
            return inputs[0]  # the fold numbers, gathered as the outer sums would be
        if any(node is outer for outer in outers):
            # one function on both sides (a real c's conj(c)·c): one tensor
            if inputs[0] is not inputs[1] and plan.same_inputs(node, real=not any(t.is_complex() for t in inputs)):
                inputs = (inputs[0], inputs[0])
            piece = _outer_lse_factors(*inputs, sides[id(node)])
            start = sum(p[0].shape[0] for p in pieces)
            pieces.append(piece)
            # placeholder: fold numbers, never the K_i·K_j·V outer sum
            return torch.arange(start, start + piece[0].shape[0], dtype=torch.float64).unsqueeze(-1)
        return node_fn(node, *inputs)

    folds = evaluate_parameter(value, fn).flatten().long()  # (F,) into the pieces' folds
    total = sum(p[0].shape[0] for p in pieces)
    if folds.numel() == total and torch.equal(folds, torch.arange(total)):
        return pieces, None
    return pieces, folds


def _gaussian_integrals(value, symmetric: Optional[List[bool]] = None) -> Optional[Scaled]:
    """``(v, s)`` of a value graph ending in cirkit's log-integrals of products of Gaussian
    units, computed in linear space (:func:`~adapters.cirkit.integrals.gaussian_product_integrals`),
    else None. v (F, 1, K1·K2), s (F, 1). ``symmetric``: receives whether every block is
    symmetric (equal means and deviations on both sides, compared exactly)."""
    if not value.outputs or not isinstance(value.outputs[0], TorchGaussianProductLogPartition) \
            or any(len(shape) != 1 for shape in value.outputs[0].in_shapes):  # univariate units only
        return None
    mean1, std1, mean2, std2 = capture_inputs(value, TorchGaussianProductLogPartition)
    if symmetric is not None:
        symmetric.append(torch.equal(mean1, mean2) and torch.equal(std1, std2))
    v, s = gaussian_product_integrals(mean1, std1, mean2, std2)
    return v.flatten(start_dim=1).unsqueeze(1), s.unsqueeze(1)


def _materialise(left: Tensor, right: Tensor) -> Tensor:
    """Factors (F, Ki, V), (F, Kj, V) -> the block ``left @ rightᵀ`` as units (F, 1, Ki·Kj)."""
    return _ThinOuter.apply(left, right).flatten(start_dim=1).unsqueeze(1)


class _ThinOuter(torch.autograd.Function):
    """``left @ rightᵀ`` for thin factors (F, Ki, V), (F, Kj, V), V small. The gradients
    ``G R̄`` and ``Gᵀ L̄`` are products of the (F, Ki, Kj) gradient with a V-column matrix,
    which torch's batched GEMM runs several times faster as the transposed product with the
    thin side first (measured 0.42 + 0.50 ms against 0.29 + 0.10 ms at 40 x 128 x 128, V=2)."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, left: Tensor, right: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(left, right)
        return left @ right.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        left, right = ctx.saved_tensors
        need_left, need_right = ctx.needs_input_grad
        g_left = (right.mH @ grad.transpose(-1, -2)).transpose(-1, -2) if need_left else None  # G R̄
        g_right = (left.mH @ grad).transpose(-1, -2) if need_right else None  # Gᵀ L̄
        return g_left, g_right


def _outer_lse_factors(a: Tensor, b: Tensor, probabilities: Tuple[bool, bool] = (False, False)
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """``logsumexp_v (a[i, v] + b[j, v])`` as ``(left @ rightᵀ)[i, j] · e^s``: a block of rank
    at most V (the categories), kept as its two factors.

    With ``ma_v``, ``mb_v`` the largest (real parts of) a and b in category v and
    ``s = max_v (ma_v + mb_v)``, the entry is ``Σ_v e^(a_iv - ma_v) e^(ma_v + mb_v - s)
    e^(b_jv - mb_v)`` times ``e^s``: three factors at most 1, each at least the term, so
    a term underflows only when it is below ``tiny`` relative to ``e^s``, which is within
    a factor V of the fold's largest entry -- where a sum layer exponentiating cirkit's
    logs relative to their maximum would flush it too. The middle factor goes half to each
    side. ``probabilities``: per side, the tensor given is ``e^a`` itself (probabilities
    whose logs the graph would take, :func:`_logs_of_probabilities`); it is divided by its
    largest value per category, with no log or exp over it. Returns left (F, Ki, V), right
    (F, Kj, V), entries at most 1, and s (F, 1).
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    same = b is a
    a = a.to(dtype)
    b = a if same else b.to(dtype)
    ma = _column_tops(a, probabilities[0])  # (F, V); -inf for a category no unit can take
    mb = ma if same else _column_tops(b, probabilities[1])
    top = ma + mb
    s = _finite(top.amax(dim=-1, keepdim=True))  # (F, 1)
    # the middle factor split evenly between the sides, so that a = b (an integral of a
    # squared layer) gives left = right: a block seen to be symmetric (SYMMETRIC_BLOCKS)
    half = (top - s) / 2  # (F, V), its log; -inf for impossible categories

    def factor(t: Tensor, column_top: Tensor, given_probabilities: bool) -> Tensor:
        shift = (_finite(column_top) - half).unsqueeze(1)  # (F, 1, V)
        return t * torch.exp(-shift) if given_probabilities else torch.exp(t - shift)

    left = factor(a, ma, probabilities[0])
    # one tensor for both sides where a is b: its consumers may compute with it once
    return left, (left if same else factor(b, mb, probabilities[1])), s


def _input(layer: TorchInputLayer, inputs: tuple, mask: Optional[Tensor],
           symmetric: Optional[List[bool]] = None) -> Scaled:
    """An input layer's (v, s); ``mask`` (F, B): integrate those (fold, sample) pairs out.
    ``symmetric``: receives whether a constant's blocks (integrals of products of two
    layers) are symmetric (see :data:`SYMMETRIC_BLOCKS`); nothing for other inputs."""
    if isinstance(layer, TorchCategoricalLayer) and inputs:
        (x,) = inputs  # (F, B, 1)
        return _categorical(layer, x.squeeze(dim=2).long(), mask)
    if isinstance(layer, TorchGaussianLayer) and inputs and inputs[0].shape[2] == 1:
        x = inputs[0].squeeze(dim=2)
        found = _gaussian_product(layer, x, mask)  # a squared circuit's Gaussian input
        if found is not None:
            return found
        observed = _gaussian(layer, x)
    else:
        if isinstance(layer, TorchConstantValueLayer) and layer.log_space:
            integrated = _integrated_products(layer.value, symmetric) or _gaussian_integrals(layer.value, symmetric)
            if integrated is not None:  # the integral of a squared categorical or Gaussian layer
                (batch,) = inputs
                return _over_batch(*integrated, batch)
        observed = from_logs(layer(*inputs))
    if mask is None:
        return observed
    total = layer.integrate()
    total = total.unsqueeze(1) if total.dim() == 2 else total  # (F, 1, K)
    return _select(mask, from_logs(total), observed)


# ------------------------------------------------------------------ the plan
LayerRule = Callable[..., Scaled]
RULES: Dict[Type[TorchLayer], LayerRule] = {
    TorchHadamardLayer: _hadamard,
    TorchKroneckerLayer: _kronecker,
    TorchSumLayer: _sum,
    TorchTensorDotLayer: _tensor_dot,
    TorchCPTLayer: _cpt,
    TorchTuckerLayer: _tucker,
    TorchKroneckerSumLayer: _structured,
    TorchStructuredSumLayer: _structured,
    TorchLiveSquareSumLayer: _structured,
    TorchLiveApproxSumLayer: _structured,
    TorchStructuredSquareSumLayer: _structured,
}
#: Rules that take a sum over their (single) input: a product feeding only such a layer
#: is measured at the sum's output.
SUM_RULES = (_sum, _structured, _tensor_dot)
PRODUCT_RULES = (_hadamard, _kronecker)


def _in_semiring(layer: TorchLayer, v: Tensor, s: Tensor, ctx: _Context, *_) -> Scaled:
    """Fallback for a layer without a rule: evaluate it on logs, in its own semiring."""
    return from_logs(layer(to_logs(v, s, ctx.complex_values)))


@dataclass
class _Step:
    layer: Optional[TorchLayer]
    rule: Optional[LayerRule]
    fetch: Optional[Fetch]
    measure: bool = True  # a product measured at its own output (else at its consumer's)
    after_unmeasured: bool = False  # a sum over an unmeasured product
    # low-rank blocks (_Blocks): the step's value may be kept as factors because some consumer
    # takes them so, and whether another consumer needs it multiplied out; a sum layer that
    # can take all of its inputs as factors (_on_factors); a Hadamard product of rank-1 blocks
    blocks: bool = False
    dense_needed: bool = True
    on_factors: bool = False
    product_on_factors: bool = False
    operands: bool = False  # a product (or CPT layer) of one fold reading rows of other layers: inputs apart
    keeps_symmetry: bool = False  # symmetric input blocks give symmetric output blocks (SYMMETRIC_BLOCKS)
    # a Hadamard product of one block per fold on factors (_khatri_rao_products), and its
    # consumer, a sum layer taking them through its inner units
    khatri_rao: bool = False
    through_inner: bool = False
    # a sum on factors reading one input layer, one input fold per fold: (that layer, the input
    # fold of each of its folds (F,)); what categorical_conditionals differentiates there
    reads_input: Optional[Tuple[TorchInputLayer, Tensor]] = None
    # a sum layer over a categorical input (plain, or squared where the layer takes factors), one
    # input fold per fold: that input's step; at data its map is applied to the input's table
    # (:func:`_sum_over_table`). ``tabled_only``: an input read by such layers alone, never looked
    # up itself then
    over_table: Optional[int] = None
    tabled_only: bool = False


def _takes_factors(layer) -> bool:
    """The layer maps a block given by factors to its output's factors (:func:`_factor_map`)."""
    if isinstance(layer, TorchTensorDotLayer):
        return layer.arity == 1
    return bool(getattr(layer, "takes_factors", False))


FactorMap = Callable[[Tensor, Tensor], Optional[Tuple[Tensor, Tensor]]]


def _factor_map(layer) -> FactorMap:
    """A layer's map on one input block ``X = left @ rightᵀ`` (left (F, Ki, C), right (F, Kj, C):
    C columns, a block's rank or one column per sample) -> the factors of its output block,
    or None where they do not fit. This package's sum layers: ``linear_on_factors``. cirkit's
    tensor-dot layer contracts X's first index with its weight W (F, Kk, Kj) and puts the
    new index last (as ``_tensor_dot`` orders it): ``Y = right (W left)ᵀ``, so its factors are
    ``(right, W left)``; W is evaluated once here, for every block the map is applied to."""
    if not isinstance(layer, TorchTensorDotLayer):
        return layer.linear_on_factors
    kj, kq = tensordot_units(layer)
    w = evaluate_parameter(layer.weight)  # (F, Kk, Kj)

    def tensor_dot(left: Tensor, right: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        if left.shape[1] != kj or right.shape[1] != kq:
            return None
        return right, apply_linear(_dense_map(w), left.transpose(1, 2), w.dtype).transpose(1, 2)

    return tensor_dot


def _block_input(layer) -> bool:
    """An input whose value per fold may come as low-rank factors: a constant whose value
    graph may be integrals of categorical products (:func:`_integrated_pieces` decides; not
    e.g. full-rank Gaussian integrals), or a squared circuit's categorical or Gaussian input
    at data (one rank-1 block per sample)."""
    if isinstance(layer, TorchConstantValueLayer):
        return layer.log_space and _ends_in_reduce(layer.value)
    if isinstance(layer, TorchGaussianLayer):
        with torch.no_grad():
            return _gaussian_product_factors(layer) is not None
    return _is_squared_categorical(layer)


def _ends_in_reduce(value) -> bool:
    return len(value.outputs) == 1 and isinstance(value.outputs[0], TorchReduceLSEParameter)


def _input_blocks(layer: TorchInputLayer, inputs: tuple, mask: Optional[Tensor]) -> Optional[_Blocks]:
    """An input's value as low-rank factors (:class:`_Blocks`), or None (then it is evaluated
    whole): a constant's integrals (:func:`_integrated_factors`), or a squared categorical or
    Gaussian input at data, one rank-1 block per sample (a categorical one also with
    variables integrated out: their integrals have rank V; a Gaussian one's are full rank)."""
    if isinstance(layer, TorchConstantValueLayer):
        found = _integrated_factors(layer.value)
        return None if found is None else _Blocks(*found, inputs[0])
    if not inputs or inputs[0].shape[2] != 1:
        return None
    x = inputs[0].squeeze(dim=2)
    if isinstance(layer, TorchGaussianLayer):
        found = _gaussian_product_values(layer, x) if mask is None else None
        return None if found is None else _Blocks(*found[:3], None)
    return _squared_categorical_blocks(layer, x.long(), mask)


def _over_batch(v: Tensor, s: Tensor, batch: int) -> Scaled:
    """A value the same for every sample, v (F, 1, K), s (F, 1), as (F, B, K), (F, B): views."""
    return v.expand(-1, batch, -1), s.expand(-1, batch)


def _dense_blocks(blocks: _Blocks) -> Scaled:
    """Factored inputs (:func:`_input_blocks`) multiplied out as the input layer's
    (v (F, B, Ki·Kj), s (F, B))."""
    if blocks.batch is not None:
        return _over_batch(*normalise(_materialise(blocks.left, blocks.right), blocks.s), blocks.batch)
    observed = _sample_outer(blocks.left, blocks.right), blocks.s  # rank-1 blocks, entries at most 1
    if blocks.mask is None:
        return observed
    return _select(blocks.mask, normalise(_materialise(*blocks.integrated[:2]), blocks.integrated[2]), observed)


def _unit_factors(left: Tensor, right: Tensor, s: Tensor) -> _Blocks:
    """One rank-1 block per sample, ``left[f, b] ⊗ right[f, b] · e^s[f, b]`` (left (F, B, Ki),
    right (F, B, Kj), s (F, B)), as :class:`_Blocks` with each factor kept in range as
    :func:`normalise` keeps a value: where some (fold, sample)'s largest entry has left
    [2^-16, 2^16], the factor is divided by its largest entries (their logs moved into s);
    else it is left as it is (the multiplied-out block then peaks within [2^-32, 2^32]). One
    tensor on both sides (one function) is scaled once and stays one."""
    factors = []
    for t in ((left,) if right is left else (left, right)):
        t = t.resolve_conj() if t.is_conj() else t  # a conjugate view has no real view (the peaks read one)
        peaks, lo, top = _peaks(t)
        given = s
        if not (_LOW <= lo and top <= _HIGH):
            t, s = _rescaled(t, s, peaks, top)
        factors.append(t)
    if right is left:  # the other side divided by the same peaks
        factors.append(factors[0])
        s = s + (s - given)
    return _Blocks(*factors, s, None)


def _sum_on_blocks(layer, fetch: Fetch, blocks: Dict[int, _Blocks], keep: bool = False,
                   after_unmeasured: bool = False, inner: bool = False) -> Union[_Blocks, Scaled, None]:
    """A sum layer over low-rank blocks, its inputs' ``blocks`` (:func:`_input_blocks`, or the
    factored output of a sum or product over them) read through its ``fetch``: its output
    from the factors; None where the layer cannot take these factors. One block per fold
    (left (F, 1, Ki1, V)): its V columns go through the layer, the output block is multiplied
    out once. One rank-1 block per sample (left (F, 1, B, Ki1)): the samples are the columns,
    ``(A u_b)(B w_b)ᵀ`` for each, where the block would cost ``A X Bᵀ``; the output stays
    factored (:class:`_Blocks`) where it has rank 1 (a single Kronecker term, no variable
    integrated out). ``keep``: one block per fold stays factored too (a deep chain may take
    its factors, :func:`.chains.run_chain`). ``inner``: a block of more columns than the layer
    has inner units goes through them (:func:`_through_inner_units`; ``after_unmeasured``: a
    Hadamard product of factors feeds it, as :func:`normalise` takes it)."""
    first = blocks[fetch.sources[0]]
    if any((blocks[j].batch is None) != (first.batch is None) or (blocks[j].mask is None) != (first.mask is None)
           for j in fetch.sources):
        return None  # blocks of different kinds in one layer: multiplied out

    def fetched(part: Callable[[_Blocks], Tensor]) -> Tensor:  # arity 1: the one input of each fold
        return fetch({j: part(blocks[j]) for j in fetch.sources}, {}).squeeze(1)

    left, s = fetched(lambda b: b.left), fetched(lambda b: b.s)
    # one tensor of factors for both sides (a real circuit's conj(c)·c) stays one
    right = left if all(blocks[j].right is blocks[j].left for j in fetch.sources) else fetched(lambda b: b.right)
    on_factors = _factor_map(layer)
    if first.batch is not None:
        if inner and not keep:
            through = _through_inner_units(layer, left, right, s, after_unmeasured)
            if through is not None:
                return _over_batch(*through, first.batch)
        factors = on_factors(left, right)
        if factors is None or keep:
            return None if factors is None else _Blocks(*factors, s, first.batch)
        return _over_batch(*normalise(_materialise(*factors), s), first.batch)
    columns = left.transpose(1, 2)
    factors = on_factors(columns, columns if right is left else right.transpose(1, 2))
    if factors is None:
        return None
    f, b = s.shape
    terms = factors[0].shape[-1] // b if b else 1  # no samples: any number of terms; one keeps it simple
    out_left = factors[0].reshape(f, factors[0].shape[1], terms, b)  # (F, Ko, T, B): T terms
    out_right = out_left if factors[1] is factors[0] else factors[1].reshape(f, factors[1].shape[1], terms, b)
    if out_left.shape[2] == 1:
        u = out_left.squeeze(2).transpose(1, 2)  # (F, B, Ko)
        w = u if out_right is out_left else out_right.squeeze(2).transpose(1, 2)
        if first.mask is None:
            return _unit_factors(u, w, s)
        v = _sample_outer(u, w)
    else:
        v = torch.einsum("fitb,fjtb->fbij", out_left, out_right).flatten(start_dim=2)
    observed = normalise(v, s)
    if first.mask is None:
        return observed
    # samples with this fold's variables integrated out: the integral's block, shared
    integrated = fetched(lambda b: b.integrated[0])
    integral = on_factors(integrated, integrated if all(blocks[j].integrated[1] is blocks[j].integrated[0]
                                                        for j in fetch.sources) else fetched(lambda b: b.integrated[1]))
    if integral is None:
        return None
    shared = normalise(_materialise(*integral), fetched(lambda b: b.integrated[2]))
    return _select(fetched(lambda b: b.mask), shared, observed)


def _through_inner_units(layer, left: Tensor, right: Tensor, s: Tensor, after_unmeasured: bool) -> Optional[Scaled]:
    """``A X Bᵀ`` for one block per fold ``X = left @ rightᵀ`` (left (F, Ki, C), right (F, Kj, C)),
    through the layer's inner units where its map is ``A = L_a R_a``, ``B = L_b R_b``:
    ``M = (R_a left)(R_b right)ᵀ`` (r_a x r_b), then ``L_a M L_bᵀ``, where mapping the columns
    through A and B would give K x C factors to multiply out (the plan takes this where C
    exceeds r: :func:`_khatri_rao_products`). v (F, 1, Ko_a·Ko_b), s (F, 1); None where the
    layer has no such map."""
    chain = inner_map(layer)
    if chain is None or chain[0][0].shape[0] != left.shape[0]:
        return None
    (l_a, r_a), (l_b, r_b) = chain
    if r_a.shape[-1] != left.shape[1] or r_b.shape[-1] != right.shape[1]:
        return None
    dtype = functools.reduce(torch.promote_types, (left.dtype, right.dtype, r_a.dtype, r_b.dtype))
    # R on the C columns as they are: the thin-side-first order of the layers' factor maps costs
    # more where C exceeds r (digits K=256, rank 32: 26.7 against 25.6 ms a log Z)
    inner_a = torch.bmm(r_a.to(dtype), left.to(dtype))  # (F, r_a, C)
    inner_b = inner_a if right is left and r_b is r_a else torch.bmm(r_b.to(dtype), right.to(dtype))
    m = torch.bmm(inner_a, inner_b.transpose(1, 2))  # (F, r_a, r_b)
    y = apply_linear(lambda t: kron_apply([l_a], [l_b], t), m.flatten(start_dim=1).unsqueeze(1), l_a.dtype)
    return normalise(y, s, after_unmeasured=after_unmeasured)  # L_a M L_bᵀ: (F, 1, Ko_a·Ko_b)


def _hadamard_on_blocks(fetch: Fetch, operands: bool, blocks: Dict[int, _Blocks],
                        split: Dict[int, Dict[int, tuple]]) -> Optional[_Blocks]:
    """A Hadamard product of rank-1 blocks per sample, ``(u_1 ⊗ w_1) ∘ (u_2 ⊗ w_2) =
    (u_1 ∘ u_2) ⊗ (w_1 ∘ w_2)``: rank 1 again, from two products of the K-unit factors instead
    of one of the K²-unit blocks. ``operands``: a product of one fold, reading rows of its
    sources (each split once per run: ``split``, per factor and source). None for other
    blocks (one per fold, or with variables integrated out): those are multiplied out."""
    batch = blocks[fetch.sources[0]].batch
    if any(blocks[j].batch != batch or blocks[j].mask is not None for j in fetch.sources):
        return None

    def fetched(part: int) -> List[Tensor]:  # the H inputs, each (F, B, K) or (F, B)
        parts = {j: blocks[j][part] for j in fetch.sources}
        if operands:  # rows of the sources, each split once per run
            return fetch.operands(parts, split.setdefault(part, {}))
        return list(fetch(parts, {}).unbind(1))

    shared = all(blocks[j].right is blocks[j].left for j in fetch.sources)  # one function on both sides
    lefts = fetched(0)
    factors = list(zip(lefts, lefts if shared else fetched(1), fetched(2)))
    left, right, s = factors[0]
    if batch is not None:  # one block per fold: the row-wise (Khatri-Rao) products of the factors
        if any(u.shape[:-1] != left.shape[:-1] or w.shape[:-1] != right.shape[:-1] for u, w, _ in factors):
            return None
        left = khatri_rao([u for u, _, _ in factors])
        right = left if shared else khatri_rao([w for _, w, _ in factors])
        return _Blocks(left, right, functools.reduce(torch.add, [scale for _, _, scale in factors]), batch)
    if any(u.shape != left.shape or w.shape != right.shape for u, w, _ in factors):
        return None
    for u, w, scale in factors[1:]:
        left, s = left * u, s + scale
        right = left if shared else right * w
    return _unit_factors(left, right, s)


#: Track which values are symmetric blocks (in ``Z`` of a real ``|c|²`` every block is a Gram
#: matrix) and let ``A X Aᵀ`` layers on them spare a product in the backward
#: (:meth:`TorchKroneckerSumLayer.maps_symmetric`, :func:`structlayers.linalg.kron_apply`).
#: False: never claim symmetry (the tests compare both).
SYMMETRIC_BLOCKS = True


def _chain_link(steps: List[_Step], consumers: Dict[int, List[int]], p: int) -> Optional[Tuple[Tuple[int, int], ...]]:
    """Steps ``p`` and ``p + 1`` form a link of a chain (:mod:`.chains`): a product of one fold
    whose inputs are rows of other steps (multiplied out: not rank-1 blocks per sample, which
    stay factored), measured at its only consumer, a sum layer of one
    fold and one input whose map is a Kronecker product (``kronecker_chain``), reading it
    whole. Returns the product's (source, row) per operand; None for anything else."""
    if p + 1 >= len(steps):
        return None
    product, total = steps[p], steps[p + 1]
    if product.rule is not _hadamard or not product.operands or product.measure or product.product_on_factors \
            or consumers.get(p) != [p + 1]:
        return None
    layer = total.layer
    if total.rule is not _structured or not total.after_unmeasured or total.on_factors \
            or getattr(layer, "num_folds", 0) != 1 or getattr(layer, "arity", 0) != 1 \
            or not hasattr(layer, "kronecker_chain") or total.fetch.sources != (p,):
        return None
    rows = fetched_rows(total.fetch, 1)
    pieces = product.fetch.operand_pieces
    if rows is None or rows.tolist() != [0] or len(pieces) < 2:
        return None
    return pieces


def _find_chains(steps: List[_Step], consumers: Dict[int, List[int]]) -> Dict[int, List[ChainLink]]:
    """Chains of at least ``CHAIN_MIN_LINKS`` consecutive links (:func:`_chain_link`), by first
    step: each link's product reads the previous link's sum (its only consumer) and
    otherwise only steps before the chain."""
    chains: Dict[int, List[ChainLink]] = {}
    p = 0
    while p < len(steps):
        pieces = _chain_link(steps, consumers, p)
        if pieces is None:
            p += 1
            continue
        links = [ChainLink(p, p + 1, None, pieces)]
        while True:
            previous = links[-1].total
            following = previous + 1
            pieces = _chain_link(steps, consumers, following) if consumers.get(previous) == [following] else None
            if pieces is None:
                break
            carried = [h for h, (source, _) in enumerate(pieces) if source == previous]
            outside = tuple(piece for h, piece in enumerate(pieces) if h not in carried)
            if len(carried) != 1 or any(source >= p for source, _ in outside):
                break
            links.append(ChainLink(following, following + 1, carried[0], outside))
        if len(links) >= CHAIN_MIN_LINKS:
            chains[p] = links
        p = links[-1].total + 1
    return chains


def _run_chain(links: List[ChainLink], steps: List[_Step], values: List[Optional[Tensor]],
               scales: List[Optional[Tensor]], split_values: Dict[int, tuple],
               split_scales: Dict[int, tuple], symmetric: List[bool],
               blocks: Optional[Dict[int, _Blocks]]) -> Optional[Scaled]:
    """A chain's last value (:func:`.chains.run_chain`), its outside operands read as the
    products would read them, and, given ``blocks`` (a chain that may run through its layers'
    inner units, :attr:`CircuitPlan.inner_chains`), as thin factors where they are a
    constant's integrals kept as such; None where it does not apply (the steps then run one
    by one)."""
    def operands() -> List[Tuple[ChainLink, List[Scaled], object, bool]]:
        return [(link, [(None, None) if values[source] is None else  # kept as factors only
                        (operand_row(values, split_values, source, row), operand_row(scales, split_scales, source, row))
                        for source, row in link.outside], steps[link.total].layer,
                 all(symmetric[source] for source, _ in link.outside)) for link in links]

    def factors(source: int, row: int) -> Optional[OperandFactors]:
        found = blocks.get(source)
        return None if found is None or found.batch is None else OperandFactors(found.left, found.right, found.s, row)

    if blocks is None:
        return run_chain(operands())
    out = run_chain(operands(), [[factors(source, row) for source, row in link.outside] for link in links])
    missing = {source for link in links for source, _ in link.outside if values[source] is None}
    if out is not None or not missing:
        return out
    for source in missing:  # the chain multiplies its operands out after all
        values[source], scales[source] = _dense_blocks(blocks[source])
    return run_chain(operands())


class CircuitPlan:
    """How a compiled circuit is evaluated: one step per address-book entry, with its
    rule and the fetch of its inputs. Built once per circuit (see :func:`circuit_plan`)."""

    def __init__(self, circuit: TorchCircuit) -> None:
        entries = list(address_book(circuit))
        self.signature = module_ids(circuit)
        folds: List[int] = []
        steps: List[_Step] = []
        consumers: Dict[int, List[int]] = {}
        for i, entry in enumerate(entries):
            layer = entry.module
            if entry.in_module_ids:
                ids = entry.in_module_ids[0]
                commutative = isinstance(layer, TorchHadamardLayer)
                fetch = plan_fetch(ids, entry.in_fold_idx[0], [folds[j] for j in ids], commutative)
                for j in ids:
                    consumers.setdefault(int(j), []).append(i)
                rule = None if layer is None else RULES.get(type(layer), _in_semiring)
                # a product of one fold (or a fused product-sum, cirkit's CPT layer) reads its inputs apart
                operands = rule in (_hadamard, _cpt) and fetch.takes_operands
                steps.append(_Step(layer, rule, fetch, operands=operands))
            else:
                if not isinstance(layer, TorchInputLayer):
                    raise TypeError(f"{type(layer).__name__} has no inputs but is not an input layer")
                steps.append(_Step(layer, None, None))
            folds.append(layer.num_folds if layer is not None else 0)
        # factored values: inputs that may come as low-rank blocks -- in Z the integrals of input
        # products (one block per fold), at data squared inputs (one rank-1 block per sample) --
        # and the sum layers that can take them as factors. At data the blocks stay rank 1
        # through such sums and through Hadamard products of their outputs (per call: where
        # some variable is integrated out they are multiplied out).
        block_input = [step.fetch is None and _block_input(step.layer) for step in steps]
        per_sample: List[bool] = []  # the value may come as rank-1 blocks per sample
        for i, step in enumerate(steps):
            sources = step.fetch.sources if step.fetch is not None else ()
            if step.fetch is None:
                per_sample.append(block_input[i] and not isinstance(step.layer, TorchConstantValueLayer))
            elif sources and step.rule in (_structured, _tensor_dot) and _takes_factors(step.layer) and all(
                    per_sample[j] or block_input[j] for j in sources):
                step.on_factors = True
                step.reads_input = _read_input(steps, step)
                per_sample.append(all(per_sample[j] for j in sources))
            elif sources and step.rule is _hadamard and all(per_sample[j] for j in sources):
                step.product_on_factors = True
                per_sample.append(True)
            else:
                per_sample.append(False)
        _khatri_rao_products(steps, consumers, block_input, per_sample)
        for step in steps:
            step.over_table = _over_table(steps, step)
        for j, step in enumerate(steps):
            users = consumers.get(j, [])
            step.tabled_only = bool(users) and all(steps[u].over_table is not None for u in users)
        # products whose only consumer is a sum layer are measured at the sum's output
        for i, step in enumerate(steps):
            users = consumers.get(i, [])
            if step.rule in PRODUCT_RULES and len(users) == 1 and steps[users[0]].rule in SUM_RULES \
                    and steps[users[0]].fetch.kind in ("view", "slices", "narrow"):
                step.measure = False
                steps[users[0]].after_unmeasured = True
        self.steps = steps
        # runs of one-fold product -> sum layers, each evaluated as one node (:mod:`.chains`);
        # a later link may take the factors of a constant input's integrals or of a sum layer
        # over them (through its layers' inner units), else they are multiplied out when read
        self.chains = _find_chains(steps, consumers)
        # the chains that may run through their layers' inner units, reading factors
        self.inner_chains = {start for start, links in self.chains.items()
                             if may_run_inner([steps[link.total].layer for link in links])}
        chain_takers = {link.product for start in self.inner_chains for link in self.chains[start]}
        for i, step in enumerate(steps):
            users = consumers.get(i, [])
            takers = [u for u in users if steps[u].on_factors or steps[u].product_on_factors
                      or ((block_input[i] or step.on_factors) and u in chain_takers)]
            if takers:
                step.blocks = True
                step.dense_needed = len(takers) < len(users)
        for step in steps:  # Hadamard products, and layers applying one real square matrix on both sides
            step.keeps_symmetry = step.rule is _hadamard or (hasattr(step.layer, "maps_symmetric")
                                                            and step.layer.maps_symmetric())
        self.origins, self.inputs_axis = _fold_origins(steps, folds)
        self._scopes: Dict[int, List[np.ndarray]] = {}  # by number of variables
        self._layouts: Dict[Tuple[bytes, bytes], "_SharedLayout"] = {}
        self._fold_macs: Optional[List[int]] = None
        self._all_macs = 0

    def run(self, circuit: TorchCircuit, x: Optional[Tensor], mask: Optional[Tensor], *,
            measure_all: bool, input_values: Optional[Dict[TorchLayer, tuple]] = None,
            keep: bool = False):
        """The circuit's output logs (O, B, K). ``input_values`` (:func:`evaluate_graph`): each
        value that depends on the input layers with variables only through one such layer, and
        that the rest of the circuit reads, is made a tensor of its own that requires grad and
        recorded there: an input layer's multiplied-out value ``(v, s)``, and the output of a
        sum layer that took an input's factors, ``(v, s, (input layer, input fold of each of
        its folds))`` (that input is then never multiplied out for it). No factored value
        passes such a value (a sum layer's rank-1 output is multiplied out, products never
        take factors), so every path from the inputs to the output goes through one.
        ``keep``: return every step's value instead (:class:`_Pass`)."""
        complex_values = check_log_semiring(circuit)
        probing = input_values is not None
        ctx = _Context(complex_values, measure_products=measure_all)
        values: List[Optional[Tensor]] = []
        scales: List[Optional[Tensor]] = []
        split_values: Dict[int, tuple] = {}  # sources read row by row ('pieces'), split once
        split_scales: Dict[int, tuple] = {}
        blocks: Dict[int, _Blocks] = {}  # values given as low-rank factors
        split_blocks: Dict[int, Dict[int, tuple]] = {}  # their factors read row by row, split once
        # deep chains in one node: not where every product is measured, nor where the values
        # inside a chain are asked for (probes, every step's value)
        chains = {} if probing or keep or measure_all else self.chains
        # sums over categorical inputs map their tables where the tables have fewer rows than the
        # batch; not where values are probed, kept, or integrated out (masks)
        tabled = x is not None and mask is None and not probing and not keep
        tables: Dict[int, Union[_Blocks, Scaled]] = {}  # the inputs' tables, by input step, read once

        def table_pays(j: int) -> bool:  # input step j is read through its table in this call
            return tabled and self.steps[j].layer.num_categories < x.shape[0]

        symmetric: List[bool] = []  # per step: every block of its value is symmetric (SYMMETRIC_BLOCKS)
        resume = 0  # the first step not yet evaluated by a chain
        for i, step in enumerate(self.steps):
            if i < resume:
                continue
            if i in chains:
                out = _run_chain(chains[i], self.steps, values, scales, split_values, split_scales, symmetric,
                                 blocks if i in self.inner_chains else None)
                if out is not None:  # its inner values are read by nothing else
                    last = chains[i][-1].total
                    values.extend([None] * (last - i) + [out[0]])
                    scales.extend([None] * (last - i) + [out[1]])
                    symmetric.extend([False] * (last + 1 - i))
                    resume = last + 1
                    continue
            layer = step.layer
            factored = step.fetch is not None and all(j in blocks for j in step.fetch.sources)
            # the step's input blocks are symmetric, and its map keeps them so
            inputs_symmetric = SYMMETRIC_BLOCKS and step.fetch is not None and all(
                symmetric[j] for j in step.fetch.sources)
            keeps_symmetric = inputs_symmetric and step.keeps_symmetry
            symmetric.append(keeps_symmetric)
            if step.tabled_only and table_pays(i):  # only read through its table
                values.append(None)
                scales.append(None)
                continue
            out: Union[_Blocks, Scaled, None] = None
            if step.over_table is not None and table_pays(step.over_table):
                source = self.steps[step.over_table].layer
                out = _sum_over_table(step, source, x, ctx, tables)
                if out is None and step.over_table not in blocks:  # its squared input, looked up after all
                    blocks[step.over_table] = _input_blocks(source, *_input_arguments(source, x, mask))
                    factored = True
            if out is None and step.on_factors and factored and (not probing or step.reads_input is not None):
                out = _sum_on_blocks(layer, step.fetch, blocks, step.blocks,
                                     after_unmeasured=step.after_unmeasured and not measure_all, inner=step.through_inner)
                if probing and out is not None:  # rank-1 blocks (nothing integrated) multiplied out too:
                    v, s = _dense_blocks(out) if isinstance(out, _Blocks) else out  # no factors pass a probe
                    out = (_probe(v), s)
                    input_values[layer] = (*out, step.reads_input)
            elif step.product_on_factors and factored and not probing and not (measure_all and step.khatri_rao):
                out = _hadamard_on_blocks(step.fetch, step.operands, blocks, split_blocks)
            if isinstance(out, _Blocks):  # kept for the consumers that take factors
                blocks[len(values)] = out
                out = _dense_blocks(out) if step.dense_needed else (None, None)
            if out is not None:
                values.append(out[0])
                scales.append(out[1])
                continue
            if step.fetch is not None:
                for j in step.fetch.sources:
                    if values[j] is None:  # factored, and needed multiplied out after all
                        values[j], scales[j] = _dense_blocks(blocks[j])
                        if probing and self.steps[j].fetch is None:
                            values[j] = _probed_input(input_values, self.steps[j].layer, values[j], scales[j])
                if step.operands:
                    v, s = step.fetch.operands(values, split_values), step.fetch.operands(scales, split_scales)
                else:
                    v, s = step.fetch(values, split_values), step.fetch(scales, split_scales)
                if layer is None:  # the output entry: (O, B, K)
                    logs = to_logs(v, s, complex_values)
                    return _Pass(values, scales, blocks) if keep else logs
                if step.rule in PRODUCT_RULES:
                    v, s = step.rule(layer, v, s, ctx, measure_all or step.measure)
                elif step.rule in SUM_RULES:
                    ctx.symmetric = keeps_symmetric  # a layer that maps symmetric blocks, given some
                    v, s = step.rule(layer, v, s, ctx, step.after_unmeasured and not measure_all)
                    ctx.symmetric = False
                else:
                    v, s = step.rule(layer, v, s, ctx)
            else:
                arguments = _input_arguments(layer, x, mask)
                found = _input_blocks(layer, *arguments) if step.blocks else None
                if found is not None:
                    blocks[len(values)] = found
                    v, s = _dense_blocks(found) if step.dense_needed else (None, None)
                    # integrals of a squared categorical layer: equal factors, compared exactly
                    equal = found.batch is not None and (found.left is found.right or torch.equal(found.left, found.right))
                    symmetric[-1] = SYMMETRIC_BLOCKS and equal
                else:
                    flags: List[bool] = []
                    v, s = _input(layer, *arguments, symmetric=flags)
                    symmetric[-1] = SYMMETRIC_BLOCKS and flags == [True]
                if probing and v is not None:
                    v = _probed_input(input_values, layer, v, s)
            values.append(v)
            scales.append(s)
        raise RuntimeError("the circuit's address book has no output entry")

    # ------------------------------------------------------------ one mask for every sample
    def scopes(self, num_variables: int) -> List[Optional[np.ndarray]]:
        """Each step's variables per fold, (F, D) booleans (None for the output entry)."""
        if num_variables not in self._scopes:
            scopes: List[Optional[np.ndarray]] = []
            for i, step in enumerate(self.steps):
                if step.fetch is None:
                    scope = np.zeros((step.layer.num_folds, num_variables), dtype=bool)
                    if step.layer.num_variables:
                        np.put_along_axis(scope, step.layer.scope_idx.cpu().numpy(), True, axis=1)
                    scopes.append(scope)
                elif step.layer is None:
                    scopes.append(None)
                else:
                    source, row = self.origins[i]
                    scope = np.zeros((source.shape[0], num_variables), dtype=bool)
                    for h in range(source.shape[1]):
                        scope |= np.stack([scopes[j][r] for j, r in zip(source[:, h], row[:, h])])
                    scopes.append(scope)
            self._scopes[num_variables] = scopes
        return self._scopes[num_variables]

    def fold_classes(self, integrated: np.ndarray, probed: np.ndarray) -> List[np.ndarray]:
        """Each step's folds (F,) by what their value depends on when the variables
        ``integrated`` (D,) are integrated out of every sample: :data:`_SHARED` (no observed
        variable: one value for every sample), :data:`_OBSERVED` (no integrated variable),
        else :data:`_MIXED`. Also mixed: folds over a ``probed`` variable (D,) (their
        derivative is asked per sample), and every fold of a layer with mixed folds that
        computes only all of them (:func:`_takes_fold_subsets`)."""
        return self._layout(integrated, probed).classes

    def _layout(self, integrated: np.ndarray, probed: np.ndarray) -> "_SharedLayout":
        """The fold classes of a mask and how :meth:`run_shared_mask` reads the inputs of each
        step's mixed folds under them: built once per mask (a sampler's masks recur)."""
        key = (integrated.tobytes(), probed.tobytes())
        if key not in self._layouts:
            scopes = self.scopes(integrated.size)
            classes: List[np.ndarray] = []
            positions: List[np.ndarray] = []  # each fold's place among its step's mixed folds (-1: not mixed)
            mixed: List[Tensor] = []  # each step's mixed folds (the output entry: all of its inputs)
            gathers: List[Optional[_Gather]] = []
            for i, step in enumerate(self.steps):
                if step.fetch is None:
                    scope = scopes[i]
                    kinds = np.where(~(scope & ~integrated).any(axis=1), _SHARED,
                                     np.where((scope & integrated).any(axis=1), _MIXED, _OBSERVED))
                    c = np.where((scope & probed).any(axis=1), _MIXED, kinds)
                    wanted = np.nonzero(c == _MIXED)[0]
                    # a probed fold reads its own value from the evaluation of its kind; a fold over
                    # integrated and observed variables needs the layer per sample (no gather)
                    gather = None if (kinds[wanted] == _MIXED).any() else \
                        _gather(np.full(wanted.size, i), wanted, kinds[wanted], (wanted.size,))
                else:
                    source, row = self.origins[i]
                    inputs = np.array([classes[j][r] for j, r in zip(source.reshape(-1), row.reshape(-1))]
                                      ).reshape(source.shape)
                    c = np.where((inputs == _SHARED).all(axis=1), _SHARED,
                                 np.where((inputs == _OBSERVED).all(axis=1), _OBSERVED, _MIXED))
                    if step.layer is not None and (c == _MIXED).any() and not _takes_fold_subsets(step):
                        c = np.full_like(c, _MIXED)
                    wanted = np.nonzero(c == _MIXED)[0] if step.layer is not None else np.arange(source.shape[0])
                    read_source, read_row = source[wanted].reshape(-1), row[wanted].reshape(-1)
                    read_kinds = np.array([classes[j][r] for j, r in zip(read_source, read_row)], dtype=np.int64)
                    at = np.array([positions[j][r] if k == _MIXED else r
                                   for j, r, k in zip(read_source, read_row, read_kinds)], dtype=np.int64)
                    gather = _gather(read_source, at, read_kinds,
                                     (wanted.size, source.shape[1]) if self.inputs_axis[i] else (wanted.size,))
                    if step.layer is not None and wanted.size < c.size:
                        gather = gather._replace(folds=torch.as_tensor(wanted))
                classes.append(c.astype(np.int8))
                position = np.full(c.size, -1, dtype=np.int64)
                position[wanted] = np.arange(wanted.size)
                positions.append(position)
                gathers.append(gather)
                mixed.append(torch.as_tensor(wanted))
            if len(self._layouts) >= 1024:  # the masks of a long sampling run: start again
                self._layouts.clear()
            self._layouts[key] = _SharedLayout(classes, mixed, gathers, self._saved_macs(classes))
        return self._layouts[key]

    def _saved_macs(self, classes: Optional[List[np.ndarray]]) -> int:
        """Multiply-adds per sample of the sum layers' folds that need no computing per sample
        (``classes`` None: of all folds)."""
        if self._fold_macs is None:  # per fold and sample, of each step (a layer's own count may evaluate it)
            self._fold_macs = [layer_macs(step.layer, 1) // max(1, step.layer.num_folds)
                               if step.layer is not None and step.fetch is not None else 0 for step in self.steps]
            self._all_macs = sum(macs * step.layer.num_folds for macs, step in zip(self._fold_macs, self.steps) if macs)
        if classes is None:
            return self._all_macs
        return sum(int((c != _MIXED).sum()) * macs for c, macs in zip(classes, self._fold_macs) if macs)

    def _everything_integrated(self, circuit: TorchCircuit, x: Tensor, num_variables: int, measure_all: bool,
                               reuse: Optional[dict]) -> "_Pass":
        """Every step's value with every variable integrated out (one sample). ``reuse``: a dict
        its caller keeps while the parameters cannot change (a sampler's run), holding the
        evaluation (made without autograd) for the next call."""
        key = (id(self), x.dtype, x.device, num_variables, measure_all)
        if reuse is not None and key in reuse:
            return reuse[key]
        everything = torch.ones((1, num_variables), dtype=torch.bool, device=x.device)
        evaluated = self.run(circuit, x[:1], everything, measure_all=measure_all, keep=True)
        if reuse is not None:
            reuse[key] = evaluated
        return evaluated

    def run_shared_mask(self, circuit: TorchCircuit, x: Tensor, integrated: Tensor, *, measure_all: bool,
                        probed: Optional[Tensor] = None,
                        input_values: Optional[Dict[TorchLayer, tuple]] = None,
                        reuse: Optional[dict] = None) -> Optional[Tensor]:
        """:meth:`run` for x (B, D) with the variables ``integrated`` (D,) integrated out of every
        sample, computing per sample only the folds that need it (:meth:`fold_classes`): folds
        over integrated variables alone come from one evaluation with everything integrated
        (of one sample), folds over observed variables alone from the evaluation at x with
        nothing integrated (rank-1 blocks, as for ``c²(x)``), and only folds over both are
        computed per sample, from their inputs. ``probed`` (D,): variables whose input folds
        are probed (``input_values[layer] = (v, s, (None, folds))``, the layer's folds
        given); then ``reuse`` (a dict the caller keeps while the parameters cannot change)
        keeps the evaluation with everything integrated for the next call. None where every
        fold would be computed per sample (:meth:`run` is cheaper)."""
        if self._saved_macs(None) * x.shape[0] < SHARED_MASK_MIN_MACS:  # even sparing every fold would not pay
            return None
        integrated_np = integrated.cpu().numpy().astype(bool)
        probed_np = np.zeros_like(integrated_np) if probed is None else probed.cpu().numpy().astype(bool)
        layout = self._layout(integrated_np, probed_np)
        if layout.saved_macs * x.shape[0] < SHARED_MASK_MIN_MACS:
            return None
        complex_values = check_log_semiring(circuit)
        batch, device = x.shape[0], x.device
        passes: Dict[int, _Pass] = {}
        mixed: Dict[int, Scaled] = {}  # step -> its mixed folds' values per sample

        # probing: derivatives are asked w.r.t. the probes alone, which are made from these
        # evaluations' values but never lead into them
        probing = input_values is not None

        def evaluated(kind: int) -> "_Pass":  # the evaluation the folds of this kind come from
            if kind not in passes:
                with torch.no_grad() if probing else contextlib.nullcontext():
                    if kind == _SHARED:
                        passes[kind] = self._everything_integrated(circuit, x, integrated.numel(), measure_all,
                                                                   reuse if probing else None)
                    else:
                        passes[kind] = self.run(circuit, x, None, measure_all=measure_all, keep=True)
            return passes[kind]

        def read(gather: _Gather) -> Scaled:
            """The inputs ``gather`` names, per sample, shaped as the step's fetch gives them."""
            values, scales = [], []
            for j, kind, rows in gather.parts:
                rows = rows if isinstance(rows, slice) else rows.to(device)
                if kind == _MIXED:
                    v, s = (_take_rows(t, rows) for t in mixed[j])
                else:
                    v, s = evaluated(kind).rows(j, rows)
                    if kind == _SHARED:
                        v, s = v.expand(-1, batch, -1), s.expand(-1, batch)
                values.append(v)
                scales.append(s)
            if len(values) == 1 and not gather.places:
                v, s = values[0], scales[0]
            else:
                dtype = functools.reduce(torch.promote_types, [t.dtype for t in values])
                v, s = _assembled([t.to(dtype) for t in values], gather), _assembled(scales, gather)
            return v.view(*gather.shape, *v.shape[1:]), s.view(*gather.shape, *s.shape[1:])

        ctx = _Context(complex_values, measure_products=measure_all)
        for i, step in enumerate(self.steps):
            layer, wanted, gather = step.layer, layout.mixed[i].to(device), layout.gathers[i]
            if layer is not None and not wanted.numel():
                continue
            if step.fetch is None:  # an input layer: mixed folds over probed or several variables
                if gather is None:  # over integrated and observed variables: the layer per sample
                    whole = _input(layer, *_input_arguments(layer, x, integrated.unsqueeze(0)))
                    v, s = (t.index_select(0, wanted) for t in whole)
                else:
                    v, s = read(gather)
                if input_values is not None and layer.num_variables:
                    v = _probe(v.contiguous())
                    input_values[layer] = (v, s, (None, wanted))
            else:
                v, s = read(gather)
                if layer is None:  # the output entry: (O, B, K)
                    return to_logs(v, s, complex_values)
                ctx.folds = None if gather.folds is None else gather.folds.to(device)
                if step.rule in PRODUCT_RULES:
                    v, s = step.rule(layer, v, s, ctx, True)
                elif step.rule in SUM_RULES:
                    v, s = step.rule(layer, v, s, ctx, False)
                else:
                    v, s = step.rule(layer, v, s, ctx)
                ctx.folds = None
            mixed[i] = (v, s)
        raise RuntimeError("the circuit's address book has no output entry")


# ------------------------------------------------------------------ one mask for every sample
#: Fold classes under one mask for every sample (:meth:`CircuitPlan.fold_classes`).
_SHARED, _OBSERVED, _MIXED = 0, 1, 2

#: :meth:`CircuitPlan.run_shared_mask` is taken where the folds it need not compute per sample
#: hold at least this many multiply-adds (over the batch): below, the two extra evaluations
#: it runs cost more than they save. Measured (16 samples of the digits circuit, exact
#: layers): K=16 (22 M saved per step) 0.55 -> 0.70 s, K=32 (about 180 M) 0.99 -> 0.70 s.
SHARED_MASK_MIN_MACS = 100_000_000


class _Pass(NamedTuple):
    """Every step's value in one evaluation (:meth:`CircuitPlan.run` with ``keep``): dense
    values (None where only factors were formed) and the factored ones (:class:`_Blocks`)."""

    values: List[Optional[Tensor]]
    scales: List[Optional[Tensor]]
    blocks: Dict[int, "_Blocks"]

    def rows(self, j: int, folds: Union[Tensor, slice]) -> Scaled:
        """Folds ``folds`` of step j (indices, or a range: :func:`_take_rows`), dense: (n, B, K), (n, B)."""
        if self.values[j] is not None:
            return _take_rows(self.values[j], folds), _take_rows(self.scales[j], folds)
        b = self.blocks[j]
        pick = (lambda t: None if t is None else _take_rows(t, folds))
        integrated = None if b.integrated is None else tuple(pick(t) for t in b.integrated)
        return _dense_blocks(_Blocks(pick(b.left), pick(b.right), pick(b.s), b.batch, integrated, pick(b.mask)))


def _take_rows(t: Tensor, rows: Union[Tensor, slice]) -> Tensor:
    """Rows of t (first axis): ``index_select`` for indices; a range (a ``slice``, as
    :func:`_gather` gives contiguous rows) is a view, and all of t is t itself -- no copy, and no
    zero-fill and scatter-add in the backward."""
    if not isinstance(rows, slice):
        return t.index_select(0, rows)
    if rows.start == 0 and rows.stop == t.shape[0]:
        return t
    return t[rows]


class _Gather(NamedTuple):
    """How :meth:`CircuitPlan.run_shared_mask` reads the inputs of a step's mixed folds:
    ``parts`` (source step, kind, rows) -- the source's folds in the evaluation of that kind,
    or their places among its mixed folds; a ``slice`` where they are a range --, the shape the fetch gives the inputs, (n,) or
    (n, H), the folds the layer computes (None: all of them), and where the parts' rows go in
    the (fold, input) order (:class:`_Assemble`; empty where the parts are in order)."""

    parts: Tuple[Tuple[int, int, Union[Tensor, slice]], ...]
    shape: Tuple[int, ...]
    folds: Optional[Tensor] = None
    places: Tuple[Tensor, ...] = ()  # each part's rows in the (fold, input) order; () where in order


class _Assemble(torch.autograd.Function):
    """Rows from several tensors put in one order: ``out[places[p]] = parts[p]`` (places
    together a permutation of the output's rows), one write per row; the backward reads each
    part's rows of the gradient. Concatenating and then reordering wrote every row twice, and
    the reordering's backward zero-filled and scatter-added all of them."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, places: Tuple[Tensor, ...], *parts: Tensor) -> Tensor:  # type: ignore[override]
        rows = sum(t.shape[0] for t in parts)
        out = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, device=parts[0].device)
        for where, part in zip(places, parts):
            out.index_copy_(0, where, part)
        ctx.places = places
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (None, *(grad.index_select(0, where) if needed else None
                        for where, needed in zip(ctx.places, ctx.needs_input_grad[1:])))


def _assembled(parts: List[Tensor], gather: "_Gather") -> Tensor:
    """The parts of ``gather`` (one tensor each, rows first, one dtype) in the (fold, input)
    order (:class:`_Assemble`); concatenated where they are in order already."""
    if not gather.places:
        return torch.cat(parts)
    device = parts[0].device
    return _Assemble.apply(tuple(t.to(device) for t in gather.places), *parts)


def _gather(sources: np.ndarray, rows: np.ndarray, kinds: np.ndarray, shape: Tuple[int, ...]) -> _Gather:
    """A :class:`_Gather` of the (fold, input) pairs read from step ``sources[k]``, row ``rows[k]``
    in the evaluation of kind ``kinds[k]``: one part per source and kind."""
    parts, order = [], []
    for j in np.unique(sources):
        for kind in (_SHARED, _OBSERVED, _MIXED):
            picked = np.nonzero((sources == j) & (kinds == kind))[0]
            if picked.size:
                taken = rows[picked]
                in_range = bool(np.array_equal(taken, np.arange(taken[0], taken[0] + taken.size)))
                parts.append((int(j), kind, slice(int(taken[0]), int(taken[0]) + taken.size) if in_range
                              else torch.as_tensor(taken)))
                order.append(picked)
    flat = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    in_order = bool(np.array_equal(flat, np.arange(flat.size)))
    places = () if in_order else tuple(torch.as_tensor(picked) for picked in order)
    return _Gather(tuple(parts), shape, places=places)


class _SharedLayout(NamedTuple):
    """One mask's fold classes (:meth:`CircuitPlan.fold_classes`), each step's mixed folds, how
    their inputs are read (:class:`_Gather`; None for input folds computed by the layer per
    sample), and the sum layers' multiply-adds per sample in folds that are not mixed."""

    classes: List[np.ndarray]
    mixed: List[Tensor]
    gathers: List[Optional[_Gather]]
    saved_macs: int


def _takes_fold_subsets(step: "_Step") -> bool:
    """The step's rule can compute some of its layer's folds only (``_Context.folds``)."""
    if step.rule in (_hadamard, _kronecker, _sum, _tensor_dot, _cpt, _tucker):
        return True
    return step.rule is _structured and bool(getattr(step.layer, "fold_subsets", False))


def _fold_origins(steps: List["_Step"], folds: List[int]) -> Tuple[list, List[bool]]:
    """For each step with inputs, the step and fold that each (fold, input) reads, two (F, H)
    arrays (its fetch applied to fold numbers), and whether the fetch gives the inputs an
    H axis ((F, H, B, K) rather than (F, B, K))."""
    width = max(folds, default=0) + 1
    codes = [torch.arange(n, dtype=torch.long).unsqueeze(1) + j * width for j, n in enumerate(folds)]
    origins: list = []
    axis: List[bool] = []
    with torch.no_grad():
        for step in steps:
            if step.fetch is None:
                origins.append(None)
                axis.append(False)
                continue
            t = step.fetch(codes)
            axis.append(t.dim() == 3)
            t = t.reshape(t.shape[0], -1).numpy()
            origins.append((t // width, t % width))
    return origins, axis


def _probe(v: Tensor) -> Tensor:
    """v as a tensor of its own whose derivative is asked for (:func:`categorical_conditionals`)."""
    return v.detach().requires_grad_()


def _probed_input(record: Dict[TorchLayer, tuple], layer: TorchInputLayer, v: Tensor, s: Tensor) -> Tensor:
    """An input layer's multiplied-out value, probed and recorded if the layer has variables."""
    if not layer.num_variables:
        return v
    v = _probe(v)
    record[layer] = (v, s)
    return v


#: In Z, a Hadamard product of blocks of ranks V_h given as factors (integrals of categorical
#: products, through sum layers) is kept as the row-wise products of the factors, C = Π V_h
#: columns, where its consumer maps through r < C inner units (a low-rank square): per fold
#: ``r·C·(K + r)`` multiply-adds over K x C factors instead of multiplying out every operand
#: (``K²·V_h`` each), their product and ``R X Rᵀ`` (``K²·r``) over K x K blocks. Taken while C is
#: at most KHATRI_RAO_COLUMNS x K and the multiply-adds at most KHATRI_RAO_WORK of the blocks'.
#: Measured on the level alone (32 folds, V=17, forward+backward, rank K/8): 12.6 -> 7.0 ms at
#: K=256, 7.2 -> 5.5 at K=192, 106 -> 28 at K=512, but 2.2 -> 4.2 ms at K=128 (C = 2.3 K; work
#: 0.81) and mixed around 1.6-1.8 K; in the whole of digits' log Z at K=256, rank 32 (work
#: 0.61) 32.7 -> 28.7 ms, rank 64 (work 0.92) 45.3 -> 45.7 ms.
KHATRI_RAO_COLUMNS = 1.5
KHATRI_RAO_WORK = 0.75


def _integral_rank(layer) -> Optional[int]:
    """The rank of a constant input's integral blocks given as factors (the categories of the
    outer sums of :func:`_integrated_pieces`), else None."""
    if not isinstance(layer, TorchConstantValueLayer) or not layer.log_space or not _ends_in_reduce(layer.value):
        return None
    outers = list(layer.value.node_inputs(layer.value.outputs[0]))
    if not outers or not all(isinstance(o, TorchOuterSumParameter) and len(o.in_shape1) == 2 for o in outers):
        return None
    return max(max(o.in_shape1[-1], o.in_shape2[-1]) for o in outers)


def _khatri_rao_pays(columns: int, operand_columns: int, inner: int, units: int) -> bool:
    """:data:`KHATRI_RAO_COLUMNS` and :data:`KHATRI_RAO_WORK` for a product of ``columns`` factor
    columns (its operands' ``operand_columns`` in all) into a square of ``inner`` units on
    ``units`` x ``units`` blocks."""
    blocks_work = units * units * (operand_columns + inner)
    return inner < columns <= KHATRI_RAO_COLUMNS * units \
        and columns * inner * (units + inner) <= KHATRI_RAO_WORK * blocks_work


def _khatri_rao_products(steps: List[_Step], consumers: Dict[int, List[int]], block_input: List[bool],
                         per_sample: List[bool]) -> None:
    """Mark the products of :data:`KHATRI_RAO_COLUMNS` (``khatri_rao``) and their consumers
    (``on_factors``, ``through_inner``): one block per fold, never per sample."""
    ranks: List[Optional[int]] = []  # columns of the step's value as factors, one block per fold
    for i, step in enumerate(steps):
        sources = step.fetch.sources if step.fetch is not None else ()
        rank = None
        if step.fetch is None:
            rank = _integral_rank(step.layer) if block_input[i] else None
        elif step.on_factors and not step.through_inner and not per_sample[i] and all(ranks[j] for j in sources):
            with torch.no_grad():  # one Kronecker term: the factors keep their columns
                single = getattr(step.layer, "kronecker_chain", lambda: None)() is not None
            rank = max(ranks[j] for j in sources) if single else None
        elif step.rule is _hadamard and sources and not step.product_on_factors and not step.operands \
                and all(ranks[j] for j in sources):  # (a product of one fold reading rows may start a deep chain)
            users = consumers.get(i, [])
            columns = max(ranks[j] for j in sources) ** step.layer.arity
            user = steps[users[0]] if len(users) == 1 else None
            if user is not None and user.rule is _structured and user.fetch.sources == (i,) \
                    and user.fetch.kind in ("view", "slices", "narrow") and getattr(user.layer, "arity", 0) == 1:
                with torch.no_grad():
                    chain = inner_map(user.layer)
                if chain is not None and _khatri_rao_pays(columns, step.layer.arity * max(ranks[j] for j in sources),
                                                          *chain[0][1].shape[-2:]):
                    step.product_on_factors = step.khatri_rao = True
                    user.on_factors = user.through_inner = True
                    rank = columns
        ranks.append(rank)


def _read_input(steps: List[_Step], step: _Step) -> Optional[Tuple[TorchInputLayer, Tensor]]:
    """For a sum layer over one input layer's factors, one input per fold: (that input layer, the
    input fold each of its folds reads (F,)); None for any other step."""
    fetch = step.fetch
    if len(fetch.sources) != 1 or steps[fetch.sources[0]].fetch is not None:
        return None
    source = steps[fetch.sources[0]].layer
    rows = fetched_rows(fetch, source.num_folds)
    if rows is None or rows.size != step.layer.num_folds:  # several inputs per fold
        return None
    return source, torch.as_tensor(rows, dtype=torch.long)


def _over_table(steps: List[_Step], step: _Step) -> Optional[int]:
    """:attr:`_Step.over_table` of a step: the source of a sum layer reading one categorical
    input layer, one input fold per fold -- a plain one, or a squared one whose factors the
    layer takes; else None."""
    if step.rule not in SUM_RULES:
        return None
    found = _read_input(steps, step)
    if found is None or not isinstance(found[0], TorchCategoricalLayer) \
            or _is_squared_categorical(found[0]) != step.on_factors:
        return None
    return step.fetch.sources[0]


def _sum_over_table(step: _Step, source: TorchCategoricalLayer, x: Tensor, ctx: _Context,
                    tables: Dict[int, Union[_Blocks, Scaled]]) -> Union[_Blocks, Scaled, None]:
    """A sum layer over a categorical input at x (B, D): the layer applied to the input's
    table, one row per category -- ``(F, V, K) -> (F, V, Ko)``; for a squared input, its rank-1
    blocks per category through the layer's factor map (:func:`_sum_on_blocks`) -- then each
    sample's row looked up: V rows mapped where the samples would be B. Each row is mapped
    and normalised on its own either way, so the values are those of the layer on the
    looked-up rows; the gradient reaches the table through the look-up's scatter-add. The
    input's folds are read through the layer's own fetch (one per fold). None where the
    layer cannot take the squared input's factors. ``tables``: each input's table, computed
    once per evaluation for all the layers that read it."""
    (j,) = step.fetch.sources
    (inputs,), _ = _input_arguments(source, x, None)  # (F_in, B, 1)
    rows = step.fetch({j: inputs.squeeze(dim=2).long()}, {}).squeeze(1)  # (F, B)
    if step.on_factors:
        if j not in tables:
            tables[j] = _squared_categorical_rows(source)[0]
        out = _sum_on_blocks(step.layer, step.fetch, {j: tables[j]})
        if out is None:
            return None
        return _rows_of(out, rows) if isinstance(out, _Blocks) else _lookup(*out, rows)
    if j not in tables:
        tables[j] = _probability_table(source)  # (F_in, V, K), (F_in, V)
    table, top = tables[j]
    return _lookup(*step.rule(step.layer, step.fetch({j: table}, {}), step.fetch({j: top}, {}), ctx, False), rows)


def _input_arguments(layer: TorchInputLayer, x: Optional[Tensor], mask: Optional[Tensor]):
    if layer.num_variables and x is not None:
        inputs: tuple = (x[..., layer.scope_idx].permute(1, 0, 2),)  # (F, B, D')
        fold_mask = None
        if mask is not None:
            scope = layer.scope_idx[:, 0].to(mask.device)
            fold_mask = mask.index_select(1, scope).transpose(0, 1)  # (F, B)
            if fold_mask.shape[1] != x.shape[0]:
                fold_mask = fold_mask.expand(-1, x.shape[0])
            if not bool(fold_mask.any()):
                fold_mask = None
        return inputs, fold_mask
    if layer.num_variables:
        return (), None
    return (1 if x is None else x.shape[0],), None


_PLANS: "weakref.WeakKeyDictionary[TorchCircuit, CircuitPlan]" = weakref.WeakKeyDictionary()


def circuit_plan(circuit: TorchCircuit) -> CircuitPlan:
    """The cached plan of ``circuit``, rebuilt when its layers changed (e.g. a swap)."""
    return cached_plan(_PLANS, circuit, CircuitPlan)


# ------------------------------------------------------------------ evaluation
def check_log_semiring(circuit: TorchCircuit) -> bool:
    """True for complex-lse-sum circuits, False for lse-sum; a clear error otherwise."""
    if not isinstance(circuit, TorchCircuit):
        raise TypeError(f"expected a compiled cirkit TorchCircuit, got {type(circuit).__name__}")
    kinds = set()
    for layer in circuit.layers:
        if layer.semiring not in LOG_SEMIRINGS:
            raise ValueError(
                f"{type(layer).__name__} uses semiring {layer.semiring.__name__}: linear-space "
                "evaluation is for 'lse-sum' and 'complex-lse-sum' circuits ('sum-product' "
                "circuits already evaluate in linear space)")
        kinds.add(layer.semiring in (ComplexLSESumSemiring, ExactComplexLSESumSemiring))
    if len(kinds) > 1:
        raise ValueError("the circuit mixes real and complex log semirings")
    return kinds.pop() if kinds else False


def _check_mask(integrate, x: Optional[Tensor], num_variables: int) -> Optional[Tensor]:
    if integrate is None:
        return None
    if x is None:
        raise ValueError("integrate needs the data x it marginalises")
    if not isinstance(integrate, Tensor) or integrate.dtype != torch.bool:
        raise TypeError(f"integrate must be a boolean tensor of shape (D,) or (B, D), got "
                        f"{type(integrate).__name__}{'' if not isinstance(integrate, Tensor) else ' ' + str(integrate.dtype)}")
    mask = integrate.unsqueeze(0) if integrate.dim() == 1 else integrate
    if mask.dim() != 2 or mask.shape[1] != x.shape[1] or mask.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"integrate must have shape (D,) = ({x.shape[1]},) or (B, D) = {tuple(x.shape)}, "
                         f"got {tuple(integrate.shape)}")
    return mask.to(x.device)


def evaluate_graph(circuit: TorchCircuit, x: Optional[Tensor] = None, *,
                   integrate: Optional[Tensor] = None,
                   input_values: Optional[Dict[TorchLayer, tuple]] = None,
                   probed: Optional[Tensor] = None, reuse: Optional[dict] = None) -> Tensor:
    """``circuit.evaluate(x)`` of an lse-sum / complex-lse-sum circuit, in linear space:
    (O, B, K) logs, without cirkit's clamp at -708 (see :func:`evaluate_linear_space`).
    ``input_values``: a dict that receives, by layer, the values the output depends on the
    inputs with variables through (v (F, B, K) requiring grad, s (F, B); see
    :meth:`CircuitPlan.run`), for derivatives w.r.t. them (:func:`categorical_conditionals`).
    With one mask for every sample (``integrate`` (D,)) and several samples, only the folds over
    both observed and integrated variables are computed per sample
    (:meth:`CircuitPlan.run_shared_mask`); there ``probed`` (D,) names the variables whose
    inputs ``input_values`` needs (None: all of them, computed as without the shared mask),
    and ``reuse`` a dict that keeps work for the next call while the parameters cannot change.
    Entries of x that are integrated out are never read (they may be NaN)."""
    check_evidence(circuit, x, integrate)
    check_log_semiring(circuit)
    if circuit.scope and x is None:
        raise ValueError("the circuit has variables: pass x of shape (B, D)")
    if x is not None and x.dim() != 2:
        raise ValueError(f"x must have shape (B, D), got {tuple(x.shape)}")
    mask = _check_mask(integrate, x, len(circuit.scope))
    if mask is not None:  # integrated entries are never read: not even a discarded branch sees a NaN there
        x = torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), x)
    plan = circuit_plan(circuit)
    shared = mask is not None and mask.shape[0] == 1 and x.shape[0] > 1 and (input_values is None or probed is not None)

    def evaluate(measure_all: bool) -> Tensor:
        if shared:
            out = plan.run_shared_mask(circuit, x, mask[0], measure_all=measure_all, probed=probed,
                                       input_values=input_values, reuse=reuse)
            if out is not None:
                return out
        return plan.run(circuit, x, mask, measure_all=measure_all, input_values=input_values)

    try:
        return evaluate(False)
    except _Unmeasured:  # an unmeasured product flushed: measure every product this time
        return evaluate(True)


def evaluate_linear_space(circuit: TorchCircuit, x: Optional[Tensor] = None, *,
                          integrate: Optional[Tensor] = None) -> Tensor:
    """``circuit(x)`` of an lse-sum / complex-lse-sum circuit, evaluated in linear space.

    Args:
        circuit: a compiled circuit (folded or not) in 'lse-sum' or 'complex-lse-sum'.
        x: (B, D) inputs, or None for a circuit without inputs (e.g. a partition function).
        integrate: optional boolean mask, (D,) or (B, D): True marks the variables to
            integrate out (per sample for (B, D)), as cirkit's ``IntegrateQuery`` does.

    Returns:
        What ``circuit(x)`` returns, without cirkit's clamp at -708: (B, O, K) logs
        (complex for complex-lse-sum), or (O, K) for a circuit with empty scope.
        Imaginary parts (signs and phases) agree modulo 2π.
    """
    y = evaluate_graph(circuit, x, integrate=integrate).transpose(0, 1)
    return y if circuit.scope else y.squeeze(dim=0)


# ------------------------------------------------------------------ conditionals of single variables
class _Probe(NamedTuple):
    """A value :func:`categorical_conditionals` differentiates: ``value`` (F, B, K) and its scale
    (F, B), of ``layer`` (an input, ``source`` None, or a sum layer over input ``source``'s
    factors, fold f reading input fold ``rows[f]``); ``folds`` over the variables asked for,
    which are ``over``."""

    layer: TorchLayer
    source: Optional[TorchCategoricalLayer]
    rows: Tensor
    folds: Tensor
    over: Tensor
    value: Tensor
    scale: Tensor


def _category_terms(layer, source: Optional[TorchCategoricalLayer], rows: Tensor, folds: Tensor,
                    categories: int) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """The value a probe of :func:`categorical_conditionals` takes at each category of its
    input, fold f reading input fold ``rows[f]``, in the probe's ``folds`` (F' of them; a sum
    layer maps all of its folds, the rest are dropped after): ``(parts, s (F', V))``, ``parts``
    either ``(v,)``, v (F', V, K) (a plain categorical input's values), or ``(left, right)``,
    (F', Ki, T, V) and (F', Kj, T, V): the sum of T outer products per
    category (a squared input's rank-1 blocks, or the output of the sum layer ``layer`` that
    takes them; ``source`` its input, None when ``layer`` is the input itself)."""
    categorical = layer if source is None else source
    if source is None:  # the input layer itself: only the probed folds
        rows, folds = rows.index_select(0, folds), torch.arange(folds.numel(), device=folds.device)
    if not _is_squared_categorical(categorical):
        table, top = _probability_table(categorical)  # (F, N, K), (F, N)
        return (table.index_select(0, rows)[:, :categories],), top.index_select(0, rows)[:, :categories]
    x = torch.arange(categories, device=rows.device).expand(categorical.num_folds, -1)
    blocks = _squared_categorical_blocks(categorical, x, None)  # the categories in place of samples
    left, right, s = (t.index_select(0, rows) for t in blocks[:3])  # (F, V, Ki), (F, V, Kj), (F, V)
    left, right = left.transpose(1, 2), right.transpose(1, 2)
    if source is not None:  # through the sum layer, as _sum_on_blocks applies it to samples
        left, right = _factor_map(layer)(left, right)
    left, right, s = (t.index_select(0, folds) for t in (left, right, s))
    f = s.shape[0]
    return tuple(t.reshape(f, t.shape[1], -1, categories) for t in (left, right)), s


def _with_categories(g: Tensor, parts: Tuple[Tensor, ...]) -> Tensor:
    """``Σ_k g[f, b, k] · value_c[f, k]`` (F, B, V) for the values of :func:`_category_terms`."""
    if len(parts) == 1:
        return torch.einsum("fbk,fck->fbc", g, parts[0].to(g.dtype))
    left, right = (t.to(g.dtype) for t in parts)
    f, b = g.shape[:2]
    ki, t, v = left.shape[1:]
    # g read once, in place, by one product: einsum copied it into a 6-D layout first (the
    # largest tensor of a conditionals query, (F, B, Ki·Kj)); the (F, B, Ki·T, V) result is small
    grid_right = torch.bmm(g.reshape(f, b * ki, right.shape[1]), right.reshape(f, right.shape[1], t * v))
    return torch.einsum("fbkc,fkc->fbc", grid_right.view(f, b, ki * t, v), left.reshape(f, ki * t, v))


def categorical_conditionals(circuit: TorchCircuit, x: Tensor, integrate: Optional[Tensor],
                             variables: Sequence[int], output: int, categories: int,
                             reuse: Optional[dict] = None) -> Tensor:
    """``f_b(x_u = c) / f_b(x)`` for every sample b, variable u of ``variables`` and category c,
    (B, U, V) real, from one forward and one backward pass over the B samples.

    ``f_b`` is output ``output`` (an index into the flattened (O·K) outputs) of ``circuit`` at
    ``x`` (B, D) with the variables of ``integrate`` ((D,) or (B, D), or None) integrated out.
    For a variable integrated out in sample b, entry (b, u, c) is ``p(x_u = c | b's evidence)``
    (they sum to 1); for an observed one, the ratio to its observed value (1 there; normalised
    over c, ``p(x_u = c | b's other evidence)``). A smooth and decomposable circuit is linear in
    the values of the input units over one variable, jointly, and so in any value that
    depends on them linearly and on nothing else: ``f(x_u = c) = Σ_i ∂f/∂y_i · y_i(c)``, the
    derivative taken anywhere -- here at x. The ``y`` are the input layers' values, or where
    a sum layer takes an input's factors that layer's output (:func:`evaluate_graph`'s
    ``input_values``): every variable's V values come from one derivative of ``log f``
    instead of V more evaluations each. Entries may come out slightly negative where the
    circuit cancels (a square's values never are). Raises ValueError if an input layer over
    one of ``variables`` is not categorical over that variable alone.
    """
    wanted = torch.as_tensor(list(variables), dtype=torch.long, device=x.device)
    if wanted.dim() != 1 or not wanted.numel() or not (0 <= int(wanted.min()) and int(wanted.max()) < x.shape[1]) \
            or len(set(wanted.tolist())) != wanted.numel():
        raise ValueError(f"variables must be one or more distinct indices in 0..{x.shape[1] - 1}, "
                         f"got {list(variables)}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("categorical_conditionals differentiates the evaluation: call it outside "
                           "torch.inference_mode() (torch.no_grad() is fine)")
    position = torch.full((x.shape[1],), -1, dtype=torch.long, device=x.device)
    position[wanted] = torch.arange(wanted.numel(), device=x.device)
    record: Dict[TorchLayer, tuple] = {}
    with torch.enable_grad():
        probed = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        probed[wanted] = True
        y = evaluate_graph(circuit, x, integrate=integrate, input_values=record, probed=probed,
                           reuse=reuse)  # (O, B, K) logs
        log_f = y.transpose(0, 1).flatten(start_dim=1)[:, output]  # (B,)
        probes: List[_Probe] = []
        for layer, (v, s, *through) in record.items():
            # an input layer's folds (all, or those given), or a sum layer's over an input's factors
            source, rows = through[0] if through else (None, torch.arange(layer.num_folds))
            through = source is not None
            source, rows = source if through else layer, rows.to(x.device)
            scope = source.scope_idx.to(x.device)[rows]  # (F, D'): each fold's input's scope
            folds = (position[scope] >= 0).any(dim=1).nonzero().squeeze(1)
            if folds.numel() == 0:
                continue
            if not isinstance(source, TorchCategoricalLayer) or scope.shape[1] != 1:
                raise ValueError(f"categorical_conditionals needs categorical inputs over one variable each; "
                                 f"{type(source).__name__} has scope size {scope.shape[1]}")
            if source.num_categories != categories:
                raise ValueError(f"categories is {categories}, but the circuit's categorical inputs have "
                                 f"{source.num_categories}")
            probes.append(_Probe(layer, source if through else None, rows, folds, scope[folds, 0], v, s))
        missing = sorted(set(wanted.tolist()) - {u for p in probes for u in p.over.tolist()})
        if missing:
            raise ValueError(f"no input layer of the circuit is over variable(s) {missing}")
        grads = torch.autograd.grad((log_f.real if log_f.is_complex() else log_f).sum(), [p.value for p in probes])
    with torch.no_grad():
        total: Optional[Tensor] = None
        for p, g in zip(probes, grads):
            # torch's gradient of Re log f w.r.t. a complex v is the conjugate of ∂log f/∂v (log f is
            # holomorphic in v); a real v's is ∂log f/∂v itself (f is real in the real inputs)
            if p.folds.numel() != g.shape[0]:  # else every fold, in order (nonzero gives them sorted)
                g = g.index_select(0, p.folds)
            g = g.conj() if g.is_complex() else g
            parts, scale = _category_terms(p.layer, p.source, p.rows, p.folds, categories)
            # each category's value relative to the probed value's scale, as the evaluator saw it
            weight = torch.exp(scale.unsqueeze(1) - p.scale.index_select(0, p.folds).unsqueeze(2))  # (F', B, V)
            part = _with_categories(g, parts) * weight  # (F', B, V)
            if total is None:
                total = part.new_zeros((x.shape[0], wanted.numel(), categories))
            total.index_add_(1, position[p.over], part.transpose(0, 1))
        # f(c)/f is real (a square, or a monotone circuit); complex weights leave rounding in .imag
        return total.real if total.is_complex() else total
