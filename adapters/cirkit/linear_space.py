"""Evaluate a log-semiring circuit in linear space, with one log-scale per fold and sample.

cirkit evaluates ``lse-sum`` and ``complex-lse-sum`` circuits on logarithms: every sum
layer exponentiates its K inputs, applies its weights and takes the log of its outputs.
In a squared circuit a layer has K² units, so each sum layer spends 2·K² (complex)
exp/log per sample and fold next to its O(K³) factor-wise product -- and the
transcendentals, not the products, dominate (about 60 % of ``c²(x)`` at K=16 measured
with the profiler). This module computes the same outputs without them:

* every layer output is a pair ``(v, s)``: ``v`` (F, B, K) in linear space (real or
  complex) and ``s`` (F, B) a real log-scale, standing for the values ``v · exp(s)``;
* sum layers apply their linear map to ``v`` (no exp, no log), product layers multiply
  the ``v`` and add the ``s``; when a layer's largest entry (per fold and sample) leaves
  [2^-16, 1], ``v`` is divided by it and ``s`` grows by its log, so ``v`` never over-
  or underflows while ``s`` carries the range (values far below cirkit's -708 clamp stay
  exact);
* signed real values stay real: a complex-lse-sum circuit with real weights (``c²``
  of a real circuit) runs on real numbers and gets its ``iπ`` only in the final log;
* the logs come back once, at the outputs: ``log v + s`` in the circuit's encoding.

The scales are constants to autograd (they are detached): the represented value is
the same for any scale, so gradients are exact. A product whose entries are all tiny
(the largest below ``sqrt(tiny)`` of the dtype, where entries far below the largest
would be flushed to zero) is recomputed on logarithms for that layer, so the
evaluation is never less accurate than cirkit's, whose sum layers also exponentiate
relative to the largest input.

Layers the evaluator does not know are evaluated in their semiring (logs in, logs
out) and the result converted back, so any circuit evaluates correctly; only the
known layers are faster. Known: input layers (categorical inputs by a table
lookup of exponentiated logits), Hadamard and Kronecker products, cirkit's sum,
tensor-dot, CP-T and Tucker layers, and this package's structured sum layers.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit
from cirkit.backend.torch.layers import (
    TorchCategoricalLayer,
    TorchHadamardLayer,
    TorchInputLayer,
    TorchKroneckerLayer,
    TorchLayer,
    TorchSumLayer,
)
from cirkit.backend.torch.layers.input import TorchConstantValueLayer
from cirkit.backend.torch.layers.optimized import TorchCPTLayer, TorchTensorDotLayer, TorchTuckerLayer
from cirkit.backend.torch.parameters.nodes import TorchOuterSumParameter, TorchReduceLSEParameter
from cirkit.backend.torch.semiring import ComplexLSESumSemiring, LSESumSemiring

from .folds import evaluate_node, evaluate_parameter, gather_folds
from .layers import TorchKroneckerSumLayer, TorchLiveSquareSumLayer, TorchStructuredSumLayer, apply_linear
from .semiring import ExactComplexLSESumSemiring, ExactLSESumSemiring, log

LOG_SEMIRINGS = (LSESumSemiring, ComplexLSESumSemiring, ExactLSESumSemiring, ExactComplexLSESumSemiring)

Scaled = Tuple[Tensor, Tensor]  # (v (F, [H,] B, K), s (F, [H,] B))


# ------------------------------------------------------------------ conversions
def _max_abs(v: Tensor) -> Tensor:
    """Largest |entry| over the last axis (the ∞-norm of the real and imaginary parts
    for complex v, within √2 of the modulus and without a square root)."""
    if v.is_complex():
        v = torch.view_as_real(v).flatten(start_dim=-2)
    low, high = torch.aminmax(v, dim=-1)  # one pass, no |v| temporary
    return torch.maximum(high, -low)


# Values are rescaled only when their largest entry leaves [2^-16, 1]. At most 1, as
# cirkit's exp(x - max): a sum layer overflows exactly when cirkit's would (its row
# sums times 1), and products cannot overflow. At least 2^-16: products keep far from
# underflow. Layers inside the range cost one max instead of a max and a division.
_LOW, _HIGH = 2.0**-16, 1.0


def _rescaled(v: Tensor, s: Tensor, m: Tensor) -> Scaled:
    m = torch.where(m > 0, m, torch.ones_like(m))  # an all-zero vector stays zero (log -> -inf)
    return v / m.unsqueeze(-1), s + torch.log(m)


def normalise(v: Tensor, s: Tensor) -> Scaled:
    """Keep v's entries in range: divide by the largest entry per (fold, sample) and move
    its log into s when some (fold, sample) has left [2^-32, 2^32]."""
    m = _max_abs(v).detach()
    if bool(((m >= _LOW) & (m <= _HIGH)).all()):
        return v, s
    return _rescaled(v, s, m)


def from_logs(y: Tensor) -> Scaled:
    """Semiring-encoded logs y (..., K) -> (v, s) with s the largest real part over K.

    v is real when y is (or when y is complex with zero imaginary parts: positive values).
    """
    if y.is_complex() and not bool(y.imag.any()):
        y = y.real
    part = y.real if y.is_complex() else y
    s = part.detach().amax(dim=-1)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    return torch.exp(y - s.unsqueeze(-1)), s


def to_logs(v: Tensor, s: Tensor, complex_values: bool) -> Tensor:
    """(v, s) -> logs in the encoding of cirkit's log semirings.

    For complex-lse-sum the log is complex: a signed real v gets ``iπ`` where negative.
    """
    if complex_values and not v.is_complex():
        v = v.to(v.dtype.to_complex())
    return log(v) + s.unsqueeze(-1)


# ------------------------------------------------------------------- the layers
def _align(v: Tensor, s: Tensor) -> Scaled:
    """Bring the H inputs (F, H, B, K) / (F, H, B) to one common scale (F, B)."""
    if v.shape[1] == 1:
        return v, s[:, 0]
    top = s.amax(dim=1)
    return v * torch.exp(s - top.unsqueeze(1)).unsqueeze(-1), top


def _product(v: Tensor, s: Tensor, combine: Callable[[Tensor], Tensor], log_combine: Callable[[Tensor], Tensor]) -> Scaled:
    """A product layer: ``combine`` multiplies the H normalised inputs; the scales add.

    If a product's entries are all tiny (largest below sqrt(tiny)) the entries far below
    its largest may have been flushed to zero: that layer is recomputed on logs.
    """
    out, scale = combine(v), s.sum(dim=1)
    m = _max_abs(out).detach()
    if bool((m < torch.finfo(m.dtype).tiny ** 0.5).any()):  # includes products flushed to 0
        logs = log_combine(to_logs(v, s, complex_values=True))  # complex: v may be signed
        return from_logs(logs)
    if bool(((m >= _LOW) & (m <= _HIGH)).all()):
        return out, scale
    return _rescaled(out, scale, m)


def _hadamard(layer: TorchHadamardLayer, v: Tensor, s: Tensor) -> Scaled:
    return _product(v, s, lambda t: t.prod(dim=1), lambda t: t.sum(dim=1))


def _outer(t: Tensor, mul: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    y = t[:, 0]
    for i in range(1, t.shape[1]):
        y = mul(y.unsqueeze(-1), t[:, i].unsqueeze(-2)).flatten(start_dim=-2)
    return y


def _kronecker(layer: TorchKroneckerLayer, v: Tensor, s: Tensor) -> Scaled:
    return _product(v, s, lambda t: _outer(t, torch.mul), lambda t: _outer(t, torch.add))


def _weighted(v: Tensor, s: Tensor, linear: Callable[[Tensor], Tensor]) -> Scaled:
    """A sum layer: concatenate the H inputs unit-wise (as cirkit does) and apply ``linear``."""
    v, s = _align(v, s)  # v (F, H, B, Ki), s (F, B)
    z = v.permute(0, 2, 1, 3).flatten(start_dim=2)
    return normalise(linear(z), s)


def _sum(layer: TorchSumLayer, v: Tensor, s: Tensor) -> Scaled:
    w = evaluate_parameter(layer.weight)  # (F, Ko, H*Ki)
    return _weighted(v, s, lambda z: apply_linear(lambda t: torch.einsum("fbi,foi->fbo", t, w), z, w.dtype))


def _structured(layer, v: Tensor, s: Tensor) -> Scaled:
    return _weighted(v, s, layer.linear)


def _tensor_dot(layer: TorchTensorDotLayer, v: Tensor, s: Tensor) -> Scaled:
    w = evaluate_parameter(layer.weight)  # (F, Kk, Kj)
    kj, kq = layer._num_contract_units, layer._num_batch_units  # noqa: SLF001 -- cirkit 0.3.1's names

    def linear(z: Tensor) -> Tensor:  # (F, B, Kj*Kq) -> (F, B, Kq*Kk), as cirkit orders it
        z = z.view(z.shape[0], z.shape[1], kj, kq)
        return torch.einsum("fbjq,fkj->fbqk", z, w).flatten(start_dim=2)

    return _weighted(v, s, lambda z: apply_linear(linear, z, w.dtype))


def _cpt(layer: TorchCPTLayer, v: Tensor, s: Tensor) -> Scaled:
    v, s = _hadamard(layer, v, s)  # type: ignore[arg-type]
    w = evaluate_parameter(layer.weight)  # (F, Ko, Ki)
    return normalise(apply_linear(lambda t: torch.einsum("fbi,foi->fbo", t, w), v, w.dtype), s)


def _tucker(layer: TorchTuckerLayer, v: Tensor, s: Tensor) -> Scaled:
    arity, ki, ko = layer.arity, layer.num_input_units, layer.num_output_units
    w = evaluate_parameter(layer.weight).view(-1, ko, *([ki] * arity))
    # cirkit 0.3.1's contraction in interleaved form: input subscripts, weight's, output's
    *in_subs, w_sub, out_sub = layer._einsum  # noqa: SLF001

    def linear(t: Tensor) -> Tensor:
        args: list = []
        for operand, sub in zip(t.unbind(dim=1), in_subs):
            args += [operand, list(sub)]
        return torch.einsum(*args, w, list(w_sub), list(out_sub))

    if v.is_complex() and not w.dtype.is_complex:  # multilinear: complex inputs need a complex weight
        w = w.to(v.dtype)
    return normalise(linear(v), s.sum(dim=1))


def _integrated_products(value) -> Optional[Scaled]:
    """``(v, s)`` of a value graph ``logsumexp_v (a[i, v] + b[j, v])``, else None.

    That is the graph cirkit builds for the integral of a product of two categorical
    (or other finite-support) layers: outer sums of their log-probabilities over the
    units (a: (F, Ki, V), b: (F, Kj, V), one node per pair of unit counts), folded into
    one log-sum-exp over the categories. Each outer sum is replaced by the matrix
    product of :func:`_outer_lse`; the outer sums' folds are tracked through the graph's
    gathers by a placeholder carrying fold numbers. Any other graph gives None.
    Returns v (F, 1, Ki·Kj) and s (F, 1).
    """
    if len(value.outputs) != 1 or not isinstance(value.outputs[0], TorchReduceLSEParameter):
        return None
    reduce = value.outputs[0]
    outers = list(value.node_inputs(reduce))
    for outer in outers:
        if (not isinstance(outer, TorchOuterSumParameter) or len(outer.in_shape1) != 2 or outer.dim != 0
                or list(value.node_outputs(outer)) != [reduce]):
            return None
    if reduce.dim != 1 or not outers:
        return None
    pieces: List[Scaled] = []

    def fn(node, *inputs):
        if node is reduce:
            return inputs[0]  # the fold numbers, gathered as the outer sums would be
        if any(node is outer for outer in outers):
            v, s = _outer_lse(*inputs)
            start = sum(p[0].shape[0] for p in pieces)
            pieces.append((v, s))
            # placeholder: fold numbers, never the K_i·K_j·V outer sum
            return torch.arange(start, start + v.shape[0], dtype=torch.float64).unsqueeze(-1)
        return evaluate_node(node, *inputs)

    folds = evaluate_parameter(value, fn).flatten().long()  # (F,) into the pieces' folds
    v = torch.cat([p[0] for p in pieces]) if len(pieces) > 1 else pieces[0][0]
    s = torch.cat([p[1] for p in pieces]) if len(pieces) > 1 else pieces[0][1]
    return v.index_select(0, folds), s.index_select(0, folds)


def _outer_lse(a: Tensor, b: Tensor) -> Scaled:
    """``logsumexp_v (a[i, v] + b[j, v])`` as linear values: a matrix product over v.

    With ``ma_v``, ``mb_v`` the largest (real parts of) a and b in category v and
    ``s = max_v (ma_v + mb_v)``, the entry is ``Σ_v e^(a_iv - ma_v) e^(ma_v + mb_v - s)
    e^(b_jv - mb_v)`` times ``e^s``: three factors at most 1, each at least the term, so
    a term underflows only when it is below ``tiny`` relative to ``e^s``, which is within
    a factor V of the fold's largest entry -- where a sum layer exponentiating cirkit's
    logs relative to their maximum would flush it too. Returns v (F, 1, Ki·Kj) and
    s (F, 1).
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)

    def column_top(t: Tensor) -> Tensor:  # (F, V); -inf for a category no unit can take
        return (t.real if t.is_complex() else t).detach().amax(dim=1)

    def finite(t: Tensor) -> Tensor:
        return torch.where(torch.isfinite(t), t, torch.zeros_like(t))

    ma, mb = column_top(a), column_top(b)
    top = ma + mb
    s = finite(top.amax(dim=-1, keepdim=True))  # (F, 1)
    weight = torch.exp(top - s)  # (F, V), 0 for impossible categories
    left = torch.exp(a - finite(ma).unsqueeze(1)) * weight.unsqueeze(1)
    v = left @ torch.exp(b - finite(mb).unsqueeze(1)).transpose(-1, -2)  # (F, Ki, Kj)
    return normalise(v.flatten(start_dim=1).unsqueeze(1), s)


def _input(layer: TorchInputLayer, inputs: tuple) -> Scaled:
    if isinstance(layer, TorchCategoricalLayer) and layer.logits is not None and inputs:
        # exp of the logits table once, normalised per category over the units, then a
        # lookup: the scale of a sample is the largest logit of its category, exactly
        # what normalising the looked-up logits would give
        (x,) = inputs  # (F, B, 1)
        logits = evaluate_parameter(layer.logits)  # (F, K, N)
        top = logits.detach().amax(dim=1, keepdim=True)  # (F, 1, N)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        table = torch.exp(logits - top)
        folds = torch.arange(layer.num_folds, device=logits.device)[:, None]
        idx = x.squeeze(dim=2).long()  # (F, B)
        v = table[folds, :, idx]  # (F, B, K)
        return v, top[:, 0][folds, idx]
    if isinstance(layer, TorchConstantValueLayer) and layer.log_space:
        integrated = _integrated_products(layer.value)
        if integrated is not None:  # e.g. the integral of a squared categorical layer
            v, s = integrated
            (batch,) = inputs
            return v.expand(-1, batch, -1), s.expand(-1, batch)
    return from_logs(layer(*inputs))


LayerRule = Callable[[TorchLayer, Tensor, Tensor], Scaled]
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
}


def _in_semiring(layer: TorchLayer, v: Tensor, s: Tensor) -> Scaled:
    """Fallback for a layer without a rule: evaluate it on logs, in its own semiring."""
    complex_values = layer.semiring in (ComplexLSESumSemiring, ExactComplexLSESumSemiring)
    return from_logs(layer(to_logs(v, s, complex_values)))


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


def evaluate_linear_space(circuit: TorchCircuit, x: Optional[Tensor] = None) -> Tensor:
    """``circuit(x)`` of an lse-sum / complex-lse-sum circuit, evaluated in linear space.

    Args:
        circuit: a compiled circuit (folded or not) in 'lse-sum' or 'complex-lse-sum'.
        x: (B, D) inputs, or None for a circuit without inputs (e.g. a partition function).

    Returns:
        What ``circuit(x)`` returns, without cirkit's clamp at -708: (B, O, K) logs
        (complex for complex-lse-sum), or (O, K) for a circuit with empty scope.
        Imaginary parts (signs and phases) agree modulo 2π.
    """
    complex_values = check_log_semiring(circuit)
    if circuit.scope and x is None:
        raise ValueError("the circuit has variables: pass x of shape (B, D)")
    if x is not None and x.dim() != 2:
        raise ValueError(f"x must have shape (B, D), got {tuple(x.shape)}")
    values: List[Tensor] = []
    scales: List[Tensor] = []
    for entry in circuit._address_book:  # noqa: SLF001 -- cirkit's fold bookkeeping, reused as is
        layer, ids, fold_idx = entry.module, entry.in_module_ids, entry.in_fold_idx
        if ids:
            commutative = isinstance(layer, TorchHadamardLayer)
            v = gather_folds(values, ids[0], fold_idx[0], commutative)
            s = gather_folds(scales, ids[0], fold_idx[0], commutative)
            if layer is None:  # the output entry: (O, B, K)
                y = to_logs(v, s, complex_values).transpose(0, 1)
                return y if circuit.scope else y.squeeze(dim=0)
            v, s = RULES.get(type(layer), _in_semiring)(layer, v, s)
        else:
            if not isinstance(layer, TorchInputLayer):
                raise TypeError(f"{type(layer).__name__} has no inputs but is not an input layer")
            if layer.num_variables and x is not None:
                inputs: tuple = (x[..., layer.scope_idx].permute(1, 0, 2),)
            elif layer.num_variables:
                inputs = ()
            else:
                inputs = (1 if x is None else x.shape[0],)
            v, s = _input(layer, inputs)
        values.append(v)
        scales.append(s)
    raise RuntimeError("the circuit's address book has no output entry")
