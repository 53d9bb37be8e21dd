"""Linear-space evaluation gives cirkit's outputs and gradients, below -708 too.

float64 throughout. Tolerance: relative 1e-10 on log-values. Squared circuits with
signed weights cancel: cirkit's own two paths (optimize=False and True) differ by up
to ~1e-11 relative on these circuits, so 1e-10 is tight but not at rounding level.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math

import numpy as np
import pytest
import torch

import cirkit.symbolic.functional as SF
from cirkit.backend.torch.layers import TorchInputLayer
from cirkit.backend.torch.parameters.nodes import TorchOuterSumParameter, TorchPointerParameter
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.initializers import NormalInitializer
from cirkit.symbolic.layers import CategoricalLayer
from cirkit.symbolic.parameters import LogSoftmaxParameter, Parameter, TensorParameter
from cirkit.templates.utils import Parameterization, parameterization_to_factory

from adapters.cirkit import linear_space, scaling
from adapters.cirkit import accelerate, cirkit_evaluation, evaluate_linear_space, log_likelihood, log_value, swap_kronecker_sum_layers
from adapters.cirkit.bench.circuits import digits_squared_circuit, one_sum_circuit
from adapters.cirkit.internals import leaf_tensors, node_tensor
from adapters.cirkit.layers import TorchStructuredSquareSumLayer
from adapters.cirkit.model import compile_density
from adapters.cirkit.structured import compile_structured, structure_policy
from adapters.cirkit.semiring import unclamped
from structlayers.kinds._factored import FactoredLayer
from adapters.cirkit.bench.variants import (
    CIRKIT_MATERIALISED,
    CIRKIT_OPTIMIZED,
    CIRKIT_OPTIMIZED_LINEAR,
    EXACT,
    EXACT_SEMIRING,
    circuit_variants,
)

from .builders import (
    CATEGORIES,
    NUM_VARIABLES,
    REGION_GRAPHS,
    compile_circuit,
    compile_pair,
    compile_partition,
    complex_circuit,
    full_rank,
    gaussian_base,
    gaussian_symbolic,
    image_circuits,
    shifted_reference,
    two_circuits,
)

pytestmark = pytest.mark.usefixtures("float64")

RTOL = 1e-10


def semiring_values(circuit, x=None):
    """cirkit's own evaluation (clamp-free semirings), also for an accelerated circuit."""
    with torch.no_grad(), unclamped(circuit), cirkit_evaluation(circuit):
        return circuit(x) if x is not None else circuit()


def raw_tensor(parameter):
    """The one leaf tensor of a cirkit parameter graph."""
    (leaf,) = leaf_tensors(parameter)
    return leaf


def assert_same_logs(got, ref):
    """Real parts within RTOL; imaginary parts (signs, phases) equal modulo 2π."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got.real, ref.real, rtol=RTOL, atol=1e-12)
    if ref.is_complex():
        phase = torch.remainder(got.imag - ref.imag + torch.pi, 2 * torch.pi) - torch.pi
        assert float(phase.abs().max()) < 1e-8


def parameter_grads(module) -> dict:
    """Every parameter gradient of ``module``, by name."""
    return {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict, expected: dict, minimum: int = 1) -> None:
    """The same parameters (at least ``minimum``), their gradients within relative 1e-9."""
    assert got.keys() == expected.keys() and len(got) >= minimum
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-9, atol=1e-12, msg=name)


GRID = [(rg, layer, sr, fold, opt)
        for rg in REGION_GRAPHS for layer in ("cp", "cp-t", "tucker")
        for sr in ("lse-sum", "complex-lse-sum") for fold in (False, True) for opt in (False, True)]


@pytest.mark.parametrize("region_graph,layer,semiring,fold,optimize", GRID)
def test_matches_cirkit_on_every_layer_type_and_region_graph(region_graph, layer, semiring, fold, optimize):
    x = torch.randint(0, CATEGORIES, (5, NUM_VARIABLES[region_graph]), generator=torch.Generator().manual_seed(1))
    circuit, partition = compile_pair(region_graph, layer, semiring, fold, optimize)
    variants = [(circuit, partition)]
    if not optimize:  # cirkit's materialised layers swapped for exact and full-rank structured ones
        for policy in ("kronecker", full_rank("lowrank")):
            c, z = copy.deepcopy((circuit, partition))
            swap_kronecker_sum_layers(c, policy)
            swap_kronecker_sum_layers(z, policy)
            variants.append((c, z))
    for c, z in variants:
        with torch.no_grad():
            reference_c, reference_z = semiring_values(c, x), semiring_values(z)
            assert_same_logs(evaluate_linear_space(c, x), reference_c)
            assert_same_logs(evaluate_linear_space(z), reference_z)
            fast_c, fast_z = accelerate(copy.deepcopy(c)), accelerate(copy.deepcopy(z))
            assert_same_logs(fast_c(x), reference_c)  # the plain call of an accelerated circuit
            assert_same_logs(fast_z(), reference_z)


@pytest.mark.parametrize("semiring", ["lse-sum", "complex-lse-sum"])
@pytest.mark.parametrize("swap", [None, "kronecker", "lowrank"])
def test_gradients_match(semiring, swap):
    x = torch.randint(0, CATEGORIES, (6, 16), generator=torch.Generator().manual_seed(2))
    circuit, partition = compile_pair("quad-tree", "cp", semiring, True, False)
    if swap is not None:
        policy = swap if swap == "kronecker" else full_rank(swap)
        swap_kronecker_sum_layers(circuit, policy)
        swap_kronecker_sum_layers(partition, policy)
    grads = []
    for linear in (False, True):
        c, z = copy.deepcopy((circuit, partition))  # one copy keeps their shared parameters
        loss = -log_likelihood(c, x, z, linear_space=linear).sum()
        loss.backward()
        named = dict(c.named_parameters())
        named.update({f"z.{n}": p for n, p in z.named_parameters()})
        grads.append({n: p.grad for n, p in named.items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-8, atol=1e-10, msg=name)


def product_partition(region_graph: str, semiring: str, fold: bool):
    """∫ c1·c2 of two different circuits on one region graph: the integral of each input
    product is ``logsumexp_v (log p1[i, v] + log p2[j, v])`` with p1 ≠ p2."""
    c1, c2 = two_circuits(region_graph)
    return compile_partition(SF.multiply(c1, c2), semiring, fold)


@pytest.mark.parametrize("semiring", ["lse-sum", "complex-lse-sum"])
@pytest.mark.parametrize("fold", [False, True])
def test_integrated_input_products_never_build_the_outer_sum(semiring, fold, monkeypatch):
    """Different factors (2 and 3 units, different probabilities): the integral of each
    input product is one matrix product, equal to cirkit's K1·K2·V log-sum-exp."""
    partition = product_partition("quad-tree", semiring, fold)
    reference = semiring_values(partition)

    def refuse(*_):
        raise AssertionError("the K1·K2·V outer sum was built")

    monkeypatch.setattr(TorchOuterSumParameter, "forward", refuse)
    with torch.no_grad():
        assert_same_logs(evaluate_linear_space(partition), reference)


def test_integrated_products_of_several_unit_splits_fold_together():
    """∫ [c1·c2, c2·c1] with 2- and 3-unit circuits: outer sums of (2, V)×(3, V) and
    (3, V)×(2, V) inputs are two nodes feeding one folded log-sum-exp."""
    c1, c2 = two_circuits("linear-tree")
    for semiring in ("lse-sum", "complex-lse-sum"):
        partition = compile_partition(SF.concatenate([SF.multiply(c1, c2), SF.multiply(c2, c1)]), semiring, True)
        with torch.no_grad():
            assert_same_logs(evaluate_linear_space(partition), semiring_values(partition))


def log_softmax_logits(shape):
    """Categorical logits normalised by log-softmax: log-probabilities far below -745 stay
    finite (a softmax would flush them to 0 first)."""
    return Parameter.from_unary(LogSoftmaxParameter(shape, axis=1),
                                TensorParameter(*shape, initializer=NormalInitializer()))


@pytest.mark.parametrize("dtype,gap", [(torch.float64, 800.0), (torch.float32, 110.0)])
def test_integrated_products_whose_factors_peak_apart_do_not_underflow(dtype, gap):
    """∫ c1·c2 where c1's inputs put their mass on category 0 and c2's on category 1
    (log-probability -gap elsewhere): every input integral is about 2·e^-gap, which
    rescaling each unit by its own largest log-probability would flush to zero (-inf).
    It must equal cirkit's value."""
    torch.set_default_dtype(dtype)
    c1, c2 = two_circuits("linear-tree", logits_factory=log_softmax_logits)
    partition = compile_partition(SF.multiply(c1, c2), "lse-sum", True)
    pointers = [n for layer in partition.layers if isinstance(layer, TorchInputLayer)
                for n in layer.value.nodes if isinstance(n, TorchPointerParameter)]
    logits = list({id(n.deref()): n.deref() for n in pointers}.values())
    assert len(logits) == 2  # the folded input logits of c1 and of c2
    with torch.no_grad():
        for i, leaf in enumerate(logits):
            t = torch.full_like(node_tensor(leaf), -gap)
            t[..., i] = 0.0
            node_tensor(leaf).copy_(t)
        ref, got = semiring_values(partition), evaluate_linear_space(partition)
    assert bool(torch.isfinite(ref).all()) and float(ref.max()) < -gap  # the regime of the test
    torch.testing.assert_close(got, ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def _brute_force_marginal(circuit, x, mask):
    """log Σ over every assignment of each row's masked variables of cirkit's log-value of a
    categorical circuit (lse-sum), rows (B, 1, 1) as the evaluator gives them."""
    rows = []
    for row, integrated in zip(x, mask):
        where = integrated.nonzero().flatten()
        grid = torch.tensor(list(itertools.product(range(CATEGORIES), repeat=len(where))), dtype=torch.long)
        full = row.repeat(grid.shape[0], 1)
        if len(where):
            full[:, where] = grid
        with torch.no_grad():
            rows.append(circuit(full).reshape(grid.shape[0], -1).logsumexp(dim=0))
    return torch.stack(rows).reshape(x.shape[0], 1, -1)


def test_logs_of_softmax_probabilities_are_never_taken(monkeypatch):
    """The squared categorical inputs of c·c read log(softmax(θ)) through outer sums (cirkit
    squares probabilities as logs). The evaluator takes the softmax's probabilities as they
    are -- in Z (∫ c·c), at data and with variables integrated out, no log of them is computed
    and none exponentiated -- with cirkit's values and gradients (float64). A log-softmax
    keeps its logs (see the test above): it is left alone."""
    from cirkit.backend.torch.parameters.nodes import TorchLogParameter

    c1, _ = two_circuits("linear-tree", units=(3, 3))
    partition = compile_partition(SF.multiply(c1, c1), "lse-sum", True)
    squared = compile_circuit(SF.multiply(c1, c1), "lse-sum")
    assert any(isinstance(n, TorchLogParameter) for layer in squared.layers if isinstance(layer, TorchInputLayer)
               for n in layer.logits.nodes)  # the graphs do take logs of the probabilities
    x = torch.randint(0, CATEGORIES, (6, NUM_VARIABLES["linear-tree"]), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[::2, 1:] = True  # some samples with variables integrated out
    logs = []
    original = TorchLogParameter.forward
    monkeypatch.setattr(TorchLogParameter, "forward", lambda self, t: logs.append(1) or original(self, t))
    for circuit, x_given, integrate in ((partition, None, None), (squared, x, None), (squared, x, mask)):
        params = list(circuit.parameters())
        logs.clear()
        ours = evaluate_linear_space(circuit, x_given, integrate=integrate)
        assert not logs
        if integrate is not None:  # the marginal: against the sum over the integrated categories
            torch.testing.assert_close(ours, _brute_force_marginal(circuit, x, mask), rtol=1e-12, atol=1e-12)
            continue
        torch.testing.assert_close(ours, semiring_values(circuit, x_given), rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(ours.real.sum(), params)
        want = torch.autograd.grad((circuit() if x_given is None else circuit(x_given)).real.sum(), params)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_values_far_below_the_clamp_are_correct():
    circuit, partition, _ = image_circuits(16, "complex-lse-sum")
    x = torch.randint(0, 17, (6, 256), generator=torch.Generator().manual_seed(1))
    reference = shifted_reference(circuit, x, 256)
    assert float(reference.max()) < -750
    with torch.no_grad():
        got = log_value(circuit, x, linear_space=True)[:, 0, 0]
    torch.testing.assert_close(got, reference, rtol=RTOL, atol=1e-8)


def test_tiny_products_are_recomputed_on_logs():
    """Six inputs, two units, whose large entries alternate between the units: each
    entry of their product is e^-120, which float32 flushes to zero in linear space (the
    circuit would give log 0 = -inf). The product is below sqrt(tiny), so that layer is
    computed on logs and the value is right."""
    torch.set_default_dtype(torch.float32)
    model = one_sum_circuit(2, num_variables=6, num_categories=2, squared=False,
                            weight_activation="softmax").compile("lse-sum", dtype=torch.float32, seed=0)
    (inputs,) = [m for m in model.base.layers if isinstance(m, TorchInputLayer)]
    # raw scores, softmax-ed over the two categories: log p(x=0) is 0 or -40 per unit
    likely, unlikely = [0.0, -300.0], [-40.0, 0.0]
    scores = torch.tensor([[likely, unlikely] if i % 2 else [unlikely, likely] for i in range(6)])  # (F, K, V)
    with torch.no_grad():
        raw_tensor(inputs.probs).copy_(scores)
    x = torch.zeros(1, 6, dtype=torch.long)
    with torch.no_grad():
        ref = semiring_values(model.base, x)
        got = evaluate_linear_space(model.base, x)
    assert -125 < float(ref.max()) < -115  # the regime the test is about
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-4)


def test_models_and_variants_use_it():
    spec = digits_squared_circuit(4)
    model = spec.compile(seed=0, dtype=torch.float64, evaluation="linear")
    x = torch.randint(0, 17, (7, 64), generator=torch.Generator().manual_seed(3))
    reference = model.log_likelihood(x).detach()
    variants = {v.name: v for v in circuit_variants(spec, model, kinds=("lowrank",), ranks=(2,))}
    assert {CIRKIT_MATERIALISED, CIRKIT_OPTIMIZED, CIRKIT_OPTIMIZED_LINEAR, EXACT_SEMIRING, EXACT,
            "lowrank square 2"} == set(variants)
    assert variants[EXACT].evaluation == "linear" and variants[EXACT_SEMIRING].evaluation == "semiring"
    assert variants[CIRKIT_OPTIMIZED_LINEAR].evaluation == "linear"
    assert variants[CIRKIT_MATERIALISED].same_values
    for name in (CIRKIT_MATERIALISED, CIRKIT_OPTIMIZED, CIRKIT_OPTIMIZED_LINEAR, EXACT_SEMIRING, EXACT):
        # same seed: cirkit's optimised layout is initialised with the same values
        torch.testing.assert_close(variants[name].model.log_likelihood(x).detach(), reference, rtol=RTOL, atol=0)
    approx = variants["lowrank square 2"].model.log_likelihood(x).detach()
    assert float((approx - reference).abs().max()) > 1e-3  # an approximation, not a copy
    assert model.evaluation == "linear"  # the input model is left as it was


def test_bad_input():
    spec = digits_squared_circuit(2)
    with pytest.raises(ValueError, match="sum-product"):
        spec.compile("sum-product", evaluation="linear")
    model = spec.compile(seed=0)
    with pytest.raises(ValueError, match="evaluation"):
        model.evaluation = "fast"
    with pytest.raises(TypeError, match="TorchCircuit"):
        evaluate_linear_space(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"x of shape \(B, D\)"):
        evaluate_linear_space(model.density)
    with pytest.raises(ValueError, match="shape"):
        evaluate_linear_space(model.density, torch.zeros(64, dtype=torch.long))
    positive = one_sum_circuit(2, squared=False, weight_activation="softmax").compile("sum-product", seed=0)
    with pytest.raises(ValueError, match="sum-product"):
        evaluate_linear_space(positive.base, torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_pair_product_gradients(dtype):
    """The Hadamard product of two inputs writes both gradients into one tensor: gradcheck."""
    from adapters.cirkit.linear_space import _PairProduct

    v = torch.randn(3, 2, 4, 5, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(_PairProduct.apply, (v,))
    torch.testing.assert_close(_PairProduct.apply(v), v[:, 0] * v[:, 1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_products_with_transposed_weights_give_the_weights_gradient_in_their_layout(dtype):
    """``z @ wᵀ`` (a dense sum layer): values and gradients as autograd's product with the
    transposed view (gradcheck, complex too), and w's gradient comes in w's own layout, where
    autograd's is a transposed view that accumulating copies into place."""
    from adapters.cirkit.linear_space import _TransposedWeightProduct

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(3, 6, 4, dtype=dtype, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(_TransposedWeightProduct.apply, (z, w))
    y = _TransposedWeightProduct.apply(z, w)
    torch.testing.assert_close(y, torch.bmm(z, w.transpose(1, 2)), rtol=0, atol=0)
    upstream = torch.randn(y.shape, dtype=dtype, generator=g)
    got = torch.autograd.grad(y, (z, w), upstream)
    want = torch.autograd.grad(torch.bmm(z, w.transpose(1, 2)), (z, w), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[1].stride() == w.stride() and not want[1].is_contiguous()
    # a pass asking for the values' gradient only (a query's) runs no product for w's
    from structlayers.benchmarking import matmul_macs

    one = 3 * 5 * 4 * 6  # multiply-adds of one product

    def values_only():
        view = z.view(z.shape)
        torch.autograd.grad(_TransposedWeightProduct.apply(view, w).real.sum(), [view])

    assert matmul_macs(values_only) == 2 * one
    assert matmul_macs(lambda: _TransposedWeightProduct.apply(z, w).real.sum().backward()) == 3 * one


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_assembled_rows_and_their_gradients(dtype):
    """Rows of several parts put in one order in one write (the inputs of a step's mixed folds
    under one mask for every sample): the concatenation reordered, and gradcheck, complex
    too; a part given as an expanded view (a shared value) included."""
    from adapters.cirkit.linear_space import _Assemble

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 3, 4, dtype=dtype, generator=g).requires_grad_(),
             torch.randn(1, 1, 4, dtype=dtype, generator=g).requires_grad_(),
             torch.randn(3, 3, 4, dtype=dtype, generator=g).requires_grad_()]
    places = (torch.tensor([4, 0]), torch.tensor([2]), torch.tensor([5, 1, 3]))

    def assembled(*p):
        return _Assemble.apply(places, p[0], p[1].expand(-1, 3, -1), p[2])

    reordered = torch.cat([parts[0], parts[1].expand(-1, 3, -1), parts[2]]).index_select(
        0, torch.argsort(torch.cat(places)))
    torch.testing.assert_close(assembled(*parts), reordered, rtol=0, atol=0)
    assert torch.autograd.gradcheck(assembled, tuple(parts))


@pytest.mark.parametrize("shift", [False, True])
def test_gaussian_values_and_their_gradients(shift):
    """A Gaussian layer's values at x as (v, s) in one node: ``v e^s`` is the density (times
    ``e^shift``), s the largest log per (fold, sample), and the hand-written backward gives
    autograd's gradients for the mean, deviation, x and shift (gradcheck); float32 values
    as the logs' :func:`from_logs`, subnormal ones included."""
    from adapters.cirkit.linear_space import _GaussianValues
    from adapters.cirkit.scaling import from_logs

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, dtype=torch.float64, generator=g).requires_grad_()
    std = (0.5 + torch.rand(2, 3, dtype=torch.float64, generator=g)).requires_grad_()
    x = torch.randn(2, 4, dtype=torch.float64, generator=g).requires_grad_()
    extra = torch.randn(2, 3, dtype=torch.float64, generator=g).requires_grad_() if shift else None
    v, s = _GaussianValues.apply(mean, std, x, extra)
    density = torch.distributions.Normal(mean.unsqueeze(1), std.unsqueeze(1)).log_prob(x.unsqueeze(-1))
    if shift:
        density = density + extra.unsqueeze(1)
    torch.testing.assert_close(torch.log(v) + s.unsqueeze(-1), density, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, density.amax(dim=-1), rtol=1e-14, atol=1e-14)
    assert not s.requires_grad
    inputs = (mean, std, x) + ((extra,) if shift else ())

    def density_of(*t):  # v e^s: s is a constant to autograd, the value's gradient flows through v
        v, s = _GaussianValues.apply(*t[:3], t[3] if shift else None)
        return v * torch.exp(s).unsqueeze(-1)

    assert torch.autograd.gradcheck(density_of, inputs)
    # float32: the same values as exponentiating the logs, far below the largest one too
    mean32 = torch.tensor([[0.0, 12.0, 30.0]]); std32 = torch.tensor([[1.0, 0.8, 0.5]])
    x32 = torch.linspace(-2.0, 2.0, 9).unsqueeze(0)
    v32, s32 = _GaussianValues.apply(mean32, std32, x32, None)
    ref_v, ref_s = from_logs(torch.distributions.Normal(mean32.unsqueeze(1), std32.unsqueeze(1)).log_prob(x32.unsqueeze(-1)))
    assert bool((v32[..., 1] > 0).any() and (v32[..., 1] < torch.finfo(torch.float32).tiny).any())  # subnormal
    torch.testing.assert_close(s32, ref_s, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(v32, ref_v, rtol=1e-5, atol=1e-45)


def test_gathers_read_ranges_of_rows_as_views():
    """A mixed fold's parts (one mask for every sample) read rows in a range as a slice: all of a
    tensor is the tensor itself, part of it a view; other rows go through index_select; the
    same rows either way."""
    from adapters.cirkit.linear_space import _MIXED, _OBSERVED, _gather, _take_rows

    gather = _gather(np.array([3, 3, 3, 5, 5]), np.array([2, 3, 4, 0, 2]), np.array([_MIXED] * 3 + [_OBSERVED] * 2), (5,))
    (_, _, first), (_, _, second) = gather.parts
    assert first == slice(2, 5) and isinstance(second, torch.Tensor) and second.tolist() == [0, 2]
    t = torch.arange(24.0).view(6, 4)
    assert _take_rows(t, slice(0, 6)) is t
    view = _take_rows(t, first)
    assert view.data_ptr() == t[2].data_ptr() and torch.equal(view, t[2:5])
    torch.testing.assert_close(_take_rows(t, second), t[[0, 2]], rtol=0, atol=0)


def test_rank_one_factors_are_rescaled_only_out_of_range():
    """Rank-1 blocks per sample keep their factors as they are while every (fold, sample)'s
    largest entry lies in [2^-16, 2^16] (as normalise keeps values); a factor out of range is
    divided by its largest entries, their logs moved into the scale. The block's value is the
    same either way, one tensor on both sides included."""
    from adapters.cirkit.linear_space import _unit_factors

    g = torch.Generator().manual_seed(0)
    u = torch.rand(2, 3, 4, dtype=torch.float64, generator=g) + 0.5  # peaks in range
    w = torch.rand(2, 3, 5, dtype=torch.float64, generator=g) * 1e-9  # peaks far below
    s = torch.randn(2, 3, dtype=torch.float64, generator=g)

    def block(b):
        return (b.left.unsqueeze(-1) * b.right.unsqueeze(-2)) * torch.exp(b.s)[..., None, None]

    want = (u.unsqueeze(-1) * w.unsqueeze(-2)) * torch.exp(s)[..., None, None]
    found = _unit_factors(u, w, s)
    assert found.left is u and found.right is not w
    torch.testing.assert_close(found.right.abs().amax(dim=-1), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(block(found), want, rtol=1e-12, atol=0)
    same = _unit_factors(w, w, s)  # one tensor on both sides: rescaled once, still one
    assert same.left is same.right
    torch.testing.assert_close(block(same), (w.unsqueeze(-1) * w.unsqueeze(-2)) * torch.exp(s)[..., None, None],
                               rtol=1e-12, atol=0)
    kept = _unit_factors(u, u, s)
    assert kept.left is u and kept.right is u and torch.equal(kept.s, s)


def _over_inputs(plan, step) -> bool:
    return step.on_factors and all(plan.steps[j].fetch is None for j in step.fetch.sources)


def _gradients(circuit, x, factored: bool, monkeypatch, integrate=None):
    """The output (log Z for x None, else log |c|²(x) or a marginal) of a copy of ``circuit``
    and its parameter gradients, with the sum layers above squared or integrated inputs on
    their low-rank blocks (``factored``; they never apply their map to a block, nor, at data
    with nothing integrated, does any layer taking rank-1 blocks) or on the inputs
    multiplied out (the plan built with no layer taking factors); also the plan and how
    often a per-sample outer product was formed."""
    calls = []
    with monkeypatch.context() as patch:
        if not factored:
            patch.setattr(linear_space, "_takes_factors", lambda layer: False)
        original = linear_space._sample_outer
        patch.setattr(linear_space, "_sample_outer", lambda l, r: calls.append(l.shape) or original(l, r))
        c = copy.deepcopy(circuit)  # a new circuit: its plan is built here
        plan = linear_space.circuit_plan(c)
        assert any(step.on_factors for step in plan.steps) == factored
        if factored:
            def refuse(*_):
                pytest.fail("a dense block went through the layer")

            for step in plan.steps:
                if _over_inputs(plan, step) or (step.on_factors and x is not None and integrate is None):
                    if hasattr(step.layer, "linear"):  # this package's layers
                        patch.setattr(step.layer, "linear", refuse)
                    else:  # cirkit's tensor-dot layer: its dense rule
                        patch.setattr(step, "rule", refuse)
        value = evaluate_linear_space(c, x, integrate=integrate)
        value.real.sum().backward()
    return value.detach(), parameter_grads(c), plan, len(calls)


def kronecker_structured_lowrank(info):
    """Policy: ``lowrank`` of A and B apart (Kronecker structure), at their full ranks."""
    return "lowrank", {"structure": "kronecker", "factor_ranks": (min(info.factor_a), min(info.factor_b))}


@pytest.mark.parametrize("semiring", ["lse-sum", "complex-lse-sum"])
@pytest.mark.parametrize("swap", [None, "kronecker", kronecker_structured_lowrank, "optimize=True"])
def test_sum_layers_over_integrated_inputs_run_on_their_low_rank_blocks(semiring, swap, monkeypatch):
    """In Z, a sum layer whose inputs are integrals of input products receives per fold a block
    X = L Rᵀ of rank <= V (categories): it computes (A L)(B R)ᵀ instead of A X Bᵀ, and never
    multiplies X out. Values equal cirkit's and the blocks-multiplied-out evaluation's, and
    so do the gradients. None: this package's exact compile (factor-wise Kronecker layers);
    ``optimize=True``: cirkit's compile, whose first tensor-dot layer of each pair takes the
    factors (``(R, W L)``)."""
    if swap is None:
        c = two_circuits("quad-tree")[0]
        partition = compile_density(c, semiring=semiring, seed=0, dtype=torch.float64).partition
    elif swap == "optimize=True":  # cirkit's compile: the first tensor-dot layer of each pair
        _, partition = compile_pair("quad-tree", "cp", semiring, True, True)
    else:
        _, partition = compile_pair("quad-tree", "cp", semiring, True, False)
        swap_kronecker_sum_layers(partition, swap)
    calls = []
    original = linear_space._materialise
    monkeypatch.setattr(linear_space, "_materialise", lambda l, r: calls.append(l.shape) or original(l, r))
    with monkeypatch.context() as patch:  # low rank: the stored thin factors apply, never their product
        patch.setattr(FactoredLayer, "kronecker_terms", lambda layer: pytest.fail("terms multiplied out"))
        value, grads, plan, _ = _gradients(partition, None, True, monkeypatch)
    # each such sum layer multiplies out its output block once; its input blocks never are
    assert len(calls) == sum(step.on_factors for step in plan.steps) > 0
    assert all(_over_inputs(plan, step) for step in plan.steps if step.on_factors)
    dense_value, dense_grads, _, _ = _gradients(partition, None, False, monkeypatch)
    with torch.no_grad():
        assert_same_logs(value, semiring_values(partition))
    assert_same_logs(value, dense_value)
    assert_same_gradients(grads, dense_grads)


@pytest.mark.parametrize("region_graph", ["quad-tree", "linear-tree"])
@pytest.mark.parametrize("semiring", ["lse-sum", "complex-lse-sum"])
@pytest.mark.parametrize("swap", [None, "kronecker", kronecker_structured_lowrank, "optimize=True"])
def test_sum_layers_over_squared_inputs_take_one_rank_one_block_per_sample(region_graph, semiring, swap, monkeypatch):
    """|c|²(x): a squared categorical input's value per sample is ``u ⊗ w`` (rank 1), and the
    sum layer above computes ``(A u)(B w)ᵀ`` for each sample instead of ``A (u wᵀ) Bᵀ``: rank 1
    again, as is the Hadamard product of two such blocks, ``(u₁ ∘ u₂) ⊗ (w₁ ∘ w₂)``. So the
    whole circuit runs on rank-1 blocks and only its output is multiplied out. Values equal
    cirkit's and the evaluation on the inputs multiplied out, and so do the gradients.
    Marginals (some variables integrated out, per sample) take the integral's rank-V block
    where a sample's variable is integrated, and the layers above the inputs multiply out
    their outputs: the same values and gradients as multiplied out; a sample with nothing
    integrated has its complete-evidence value, one with everything integrated log Z. The
    linear tree's products each read one fold of the layers below (rows of their factors).
    None: this package's exact compile; ``optimize=True``: cirkit's own compile, whose
    Kronecker sum layers are pairs of tensor-dot layers (each maps ``u ⊗ w`` to ``w ⊗ W u``)."""
    if swap is None:
        c = two_circuits(region_graph)[0]
        model = compile_density(c, semiring=semiring, seed=0, dtype=torch.float64)
        density, partition = model.density, model.partition
    elif swap == "optimize=True":
        density, partition = compile_pair(region_graph, "cp", semiring, True, True)
    else:  # the swaps are exact (lowrank at full ranks): Z from cirkit's circuit as it was compiled
        density, partition = compile_pair(region_graph, "cp", semiring, True, False)
        swap_kronecker_sum_layers(density, swap)
    num_variables = NUM_VARIABLES[region_graph]
    x = torch.randint(0, CATEGORIES, (5, num_variables), generator=torch.Generator().manual_seed(2))
    value, grads, plan, outers = _gradients(density, x, True, monkeypatch)
    inner = [step for step in plan.steps if step.fetch is not None and step.layer is not None]
    assert all(step.on_factors or step.product_on_factors for step in inner)  # every layer on rank-1 blocks
    assert any(step.operands for step in inner) == (region_graph == "linear-tree")
    assert outers == 1  # the output's block, nothing else
    dense_value, dense_grads, _, dense_outers = _gradients(density, x, False, monkeypatch)
    assert dense_outers > 0  # the inputs' outer products, formed on the dense path
    with torch.no_grad():
        assert_same_logs(value, semiring_values(density, x))
    assert_same_logs(value, dense_value)
    assert_same_gradients(grads, dense_grads)
    mask = torch.zeros(5, num_variables, dtype=torch.bool)
    mask[:, ::3] = True
    mask[1] = False  # complete evidence
    mask[3] = True  # everything integrated
    marginal, marginal_grads, _, marginal_outers = _gradients(density, x, True, monkeypatch, integrate=mask)
    assert marginal_outers == sum(_over_inputs(plan, step) for step in plan.steps) > 0
    dense_marginal, dense_marginal_grads, _, _ = _gradients(density, x, False, monkeypatch, integrate=mask)
    assert_same_logs(marginal, dense_marginal)
    assert_same_gradients(marginal_grads, dense_marginal_grads)
    assert_same_logs(marginal[1], value[1])
    assert_same_logs(marginal[3], semiring_values(partition))


def test_rank_one_blocks_keep_float32_in_range():
    """|c|²(x) of the 8x8 digits circuit with small positive weights (each Kronecker factor
    |·|/10, so W/100: every sum layer shrinks its values, and the Hadamard products square
    that) is far below float32's smallest number, and so are the rank-1 factors of the upper
    layers relative to their inputs': they are rescaled at every layer, so the float32 evaluation agrees with
    cirkit's float32 evaluation on logs (unscaled factors underflow to 0, log -inf).
    Positive weights: no cancellation, so the two agree to float32's precision."""
    torch.set_default_dtype(torch.float32)
    density = digits_squared_circuit(4).compile(seed=0, dtype=torch.float32).density
    swap_kronecker_sum_layers(density, "kronecker")
    factors = [p for name, p in density.named_parameters() if ".structured." in name]  # W = A ⊗ B
    assert factors
    with torch.no_grad():
        for t in factors:
            t.copy_(t.abs() / 10)
    assert any(step.product_on_factors for step in linear_space.circuit_plan(density).steps)
    x = torch.randint(0, 17, (6, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, reference = evaluate_linear_space(density, x), semiring_values(density, x)
    assert float(reference.real.max()) < -500  # the regime of the test
    torch.testing.assert_close(got.real, reference.real, rtol=1e-5, atol=0)


@pytest.mark.parametrize("complex_weights", [False, True])
def test_structured_squares_take_rank_one_blocks_per_sample_in_their_own_fold_order(complex_weights, monkeypatch):
    """A structured circuit's squares (conj(S) ⊗ S, folds permuted against S's own) at data,
    on one rank-1 block per sample: the same |c|²(x) and gradients as on the inputs
    multiplied out."""
    c = digits_squared_circuit(3, image_shape=(3, 3), num_categories=3, complex=complex_weights).circuit
    model, _ = compile_structured(c, structure_policy("monarch"), dtype=torch.float64, seed=1, num_categories=3)
    x = torch.randint(0, 3, (4, 9), generator=torch.Generator().manual_seed(3))
    value, grads, plan, _ = _gradients(model.density, x, True, monkeypatch)
    assert any(step.on_factors for step in plan.steps)
    dense_value, dense_grads, _, _ = _gradients(model.density, x, False, monkeypatch)
    assert_same_logs(value, dense_value)
    assert_same_gradients(grads, dense_grads)


@pytest.mark.parametrize("complex_weights", [False, True])
def test_structured_squares_take_low_rank_blocks_in_their_own_fold_order(complex_weights, monkeypatch):
    """A structured circuit's squares over integrated inputs (conj(S) ⊗ S, folds permuted
    against S's own) on low-rank blocks: the same Z and gradients as on the blocks
    multiplied out."""
    c = digits_squared_circuit(3, image_shape=(3, 3), num_categories=3, complex=complex_weights).circuit
    model, _ = compile_structured(c, structure_policy("monarch"), dtype=torch.float64, seed=1, num_categories=3)
    squares = [s.layer for s in linear_space.circuit_plan(model.partition).steps if s.on_factors]
    assert squares and all(isinstance(layer, TorchStructuredSquareSumLayer) and not layer._identity
                           for layer in squares)
    value, grads, _, _ = _gradients(model.partition, None, True, monkeypatch)
    dense_value, dense_grads, _, _ = _gradients(model.partition, None, False, monkeypatch)
    assert_same_logs(value, dense_value)
    assert_same_gradients(grads, dense_grads)


@pytest.mark.parametrize("fold", [False, True])
def test_squared_gaussian_inputs_are_outer_products_of_their_factors(fold, monkeypatch):
    """|c|²(x) of a Gaussian circuit: each input unit (i, j) is N_i(x) N_j(x); values, gradients
    and marginals (integrated inputs are the closed-form integrals) equal cirkit's, and
    cirkit's K1·K2 Gaussians are never evaluated."""
    from cirkit.backend.torch.layers import TorchGaussianLayer
    from cirkit.backend.torch.queries import IntegrateQuery
    from cirkit.utils.scope import Scope

    squared_symbolic, partition_symbolic, _ = gaussian_symbolic()
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=fold, optimize=False)
    squared, partition = ctx.compile(squared_symbolic), ctx.compile(partition_symbolic)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(5, 16, dtype=torch.bool)
    mask[:, 8:] = True
    mask[1] = False
    mask[4] = True  # everything integrated: the partition function
    reference = copy.deepcopy(squared)
    with unclamped(reference):
        expected = reference(x)
        marginal = [IntegrateQuery(reference)(x[i:i + 1], integrate_vars=Scope(int(v) for v in mask[i].nonzero()))
                    for i in range(5)] if not fold else None  # cirkit 0.3.1's folded query fails
    expected.real.sum().backward()

    def refuse(*_):
        raise AssertionError("cirkit's K1·K2 Gaussians were evaluated")

    monkeypatch.setattr(TorchGaussianLayer, "log_unnormalized_likelihood", refuse)
    got = evaluate_linear_space(squared, x)
    assert_same_logs(got.detach(), expected.detach())
    got.real.sum().backward()
    assert_same_gradients(parameter_grads(squared), parameter_grads(reference), minimum=3)
    with torch.no_grad():
        integrated = evaluate_linear_space(squared, x, integrate=mask)
        assert_same_logs(integrated[4:], evaluate_linear_space(partition).unsqueeze(0))
        if marginal is not None:
            assert_same_logs(integrated, torch.cat(marginal))


@pytest.mark.parametrize("fold", [False, True])
def test_gaussian_inputs_match_cirkit(fold):
    """c(x) of a circuit with Gaussian inputs (evaluated from their means and deviations, not
    through cirkit's Normal): values and gradients equal cirkit's."""
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=fold, optimize=False)
    base = ctx.compile(gaussian_symbolic()[2])
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)) * 2
    reference = copy.deepcopy(base)
    with unclamped(reference):
        expected = reference(x)
    expected.real.sum().backward()
    got = evaluate_linear_space(base, x)
    assert_same_logs(got.detach(), expected.detach())
    got.real.sum().backward()
    assert_same_gradients(parameter_grads(base), parameter_grads(reference), minimum=3)
    if not fold:  # marginals: cirkit 0.3.1's folded IntegrateQuery fails
        from cirkit.backend.torch.queries import IntegrateQuery
        from cirkit.utils.scope import Scope

        with torch.no_grad(), unclamped(reference):
            expected = IntegrateQuery(reference)(x, integrate_vars=Scope(range(8, 16)))
            mask = torch.zeros(16, dtype=torch.bool)
            mask[8:] = True
            assert_same_logs(evaluate_linear_space(base, x, integrate=mask), expected)


@pytest.mark.parametrize("circuit", ["lse-sum", "complex-lse-sum", "optimize=True", "complex weights", "gaussian"])
def test_an_empty_batch_gives_what_cirkit_gives(circuit):
    """Zero samples (e.g. the last chunk of a split that divides evenly, a filtered batch): the
    shape and dtype cirkit's own evaluation returns, with and without variables integrated out
    (one mask for all rows, and per sample), and a backward that runs; the range checks of the
    scaled values found no entry to measure and raised before."""
    if circuit == "gaussian":
        torch.manual_seed(0)
        ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True, optimize=False)
        density = ctx.compile(gaussian_symbolic()[0])
        x = torch.randn(0, 16)
    else:
        if circuit == "optimize=True":
            density, _ = compile_pair("quad-tree", "cp", "complex-lse-sum", True, True)
        else:
            symbolic_circuit = complex_circuit("quad-tree") if circuit == "complex weights" else two_circuits("quad-tree")[0]
            semiring = "lse-sum" if circuit == "lse-sum" else "complex-lse-sum"
            density = compile_density(symbolic_circuit, semiring=semiring, seed=0, dtype=torch.float64).density
        x = torch.zeros(0, NUM_VARIABLES["quad-tree"], dtype=torch.long)
    expected = semiring_values(density, x)
    assert expected.shape[0] == 0
    got = evaluate_linear_space(density, x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    got.real.sum().backward()
    shared = torch.zeros(x.shape[1], dtype=torch.bool)
    shared[::2] = True
    for mask in (shared, torch.zeros(0, x.shape[1], dtype=torch.bool)):
        assert evaluate_linear_space(density, x, integrate=mask).shape == expected.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_thin_outer_products_and_their_gradients(dtype):
    """``left @ rightᵀ`` of the low-rank blocks, with the thin-side-first backward: values and
    finite-difference gradients (complex: torch's conjugate convention)."""
    g = torch.Generator().manual_seed(4)
    left = torch.randn(3, 4, 2, generator=g, dtype=dtype).requires_grad_()
    right = torch.randn(3, 5, 2, generator=g, dtype=dtype).requires_grad_()
    block = linear_space._materialise(left, right)
    torch.testing.assert_close(block, (left @ right.transpose(1, 2)).reshape(3, 1, 20), rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda a, b: linear_space._materialise(a, b), (left, right))


def _density_for_conditionals(region_graph: str, circuit):
    """A compiled density of the conditionals' tests (see there)."""
    if circuit == "cp-t":  # inputs feeding Hadamard products directly
        return compile_pair(region_graph, "cp-t", "complex-lse-sum", True, False)[0]
    if circuit == "monotone":
        return compile_density(two_circuits(region_graph)[0], squared=False, seed=0, dtype=torch.float64).density
    if circuit == "complex weights":
        return compile_density(complex_circuit(region_graph), seed=0, dtype=torch.float64).density
    semiring = "lse-sum" if circuit == "lse-sum" else "complex-lse-sum"
    density, _ = compile_pair(region_graph, "cp", semiring, True, circuit == "optimize=True")
    if circuit not in ("lse-sum", "complex-lse-sum", "optimize=True"):
        swap_kronecker_sum_layers(density, circuit)
    return density


def _ratios_of_evaluations(density, x, mask, u):
    """``f(x_u = c) / f(x)`` (B, V) for every category c, from two evaluations each (``mask``:
    the integrated variables of the denominator; u is observed at c in the numerator)."""
    with torch.no_grad():
        denominator = evaluate_linear_space(density, x, integrate=mask)[:, 0, 0].real
        ratios = []
        for c in range(CATEGORIES):
            xc, observed = x.clone(), mask.clone()
            xc[:, u], observed[:, u] = c, False
            ratios.append(torch.exp(evaluate_linear_space(density, xc, integrate=observed)[:, 0, 0].real - denominator))
    return torch.stack(ratios, dim=1)


@pytest.mark.parametrize("region_graph", ["quad-tree", "linear-tree"])
@pytest.mark.parametrize("circuit", ["lse-sum", "complex-lse-sum", "kronecker", kronecker_structured_lowrank,
                                     "optimize=True", "monotone", "complex weights"])
def test_categorical_conditionals_are_ratios_of_marginals(region_graph, circuit):
    """``p(x_v = c | evidence)`` for every category from one forward and backward (the circuit is
    linear in the inputs over x_v) equals the ratio of the two marginals, per sample with its
    own evidence (one row everything else observed, one row nothing), and sums to 1. Squared
    circuits in both semirings (signed: complex-lse-sum), swapped to this package's exact and
    structured layers, cirkit's optimize=True layers, complex weights (complex sum outputs:
    the gradient's conjugate convention), and a monotone circuit (plain categorical inputs)."""
    density = _density_for_conditionals(region_graph, circuit)
    d = NUM_VARIABLES[region_graph]
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, CATEGORIES, (6, d), generator=g)
    integrate = torch.rand(6, d, generator=g) < 0.5
    integrate[0], integrate[1] = False, True
    for v in (0, d // 2, d - 1):
        mask = integrate.clone()
        mask[:, v] = True
        got = linear_space.categorical_conditionals(density, x, mask, [v], 0, CATEGORIES)[:, 0]
        assert got.shape == (6, CATEGORIES) and got.dtype == torch.float64
        torch.testing.assert_close(got, _ratios_of_evaluations(density, x, mask, v), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.sum(dim=1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-10)
    # where a sum layer takes the inputs' factors, its output is differentiated (the inputs are
    # never multiplied out); else the inputs' values
    record = {}
    with torch.enable_grad():
        linear_space.evaluate_graph(density, x, integrate=mask, input_values=record)
    through_sums = circuit not in ("lse-sum", "complex-lse-sum", "monotone")
    assert {len(probe) == 3 for probe in record.values()} == {through_sums}


def _assert_shared_mask_is_per_sample_mask(circuit, x, mask) -> None:
    """Values and parameter gradients with ``mask`` (D,) equal those with it for every sample (B, D)."""
    results = []
    for integrate in (mask, mask.expand(x.shape[0], -1)):
        c = copy.deepcopy(circuit)
        value = evaluate_linear_space(c, x, integrate=integrate)
        value.real.sum().backward()
        results.append((value.detach(), parameter_grads(c)))
    assert_same_logs(*[r[0] for r in results])
    assert_same_gradients(*[r[1] for r in results])


def _shared_masks(d: int, g: torch.Generator) -> dict:
    return {"last half": torch.arange(d) >= d // 2, "random": torch.rand(d, generator=g) < 0.5,
            "one variable": torch.arange(d) == d // 3, "everything": torch.ones(d, dtype=torch.bool)}


@pytest.mark.parametrize("region_graph", ["quad-tree", "linear-tree"])
@pytest.mark.parametrize("circuit", ["lse-sum", "complex-lse-sum", "kronecker", kronecker_structured_lowrank,
                                     "optimize=True", "monotone", "complex weights", "cp-t"])
def test_one_mask_for_every_sample_computes_per_sample_only_the_folds_over_both(region_graph, circuit, monkeypatch):
    """With the same variables integrated out of every sample, a fold over integrated variables
    alone has one value for all samples (from one evaluation with everything integrated), a
    fold over observed ones alone its value at x (the evaluation with nothing integrated),
    and only the folds over both are computed per sample. Values, parameter gradients and
    the conditionals' derivatives equal those of the same mask given per sample (which
    computes every fold per sample), for every layer kind: this package's exact layers and
    cirkit's take fold subsets; a kind that does not computes all of its folds where any is
    mixed (the Kronecker-structured low-rank swap)."""
    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 0)
    density = _density_for_conditionals(region_graph, circuit)
    d = NUM_VARIABLES[region_graph]
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, CATEGORIES, (6, d), generator=g)
    shared_runs = []
    original = linear_space.CircuitPlan.run_shared_mask
    monkeypatch.setattr(linear_space.CircuitPlan, "run_shared_mask",
                        lambda self, *a, **k: shared_runs.append(original(self, *a, **k)) or shared_runs[-1])
    for name, mask in _shared_masks(d, g).items():
        _assert_shared_mask_is_per_sample_mask(density, x, mask)
        assert shared_runs.pop() is not None and not shared_runs  # the shared path ran once, the per-sample one not
        plan = linear_space.circuit_plan(density)
        classes = plan.fold_classes(mask.numpy(), np.zeros(d, dtype=bool))
        inner = [c for c, step in zip(classes, plan.steps) if step.fetch is not None and step.layer is not None]
        mixed = sum(int((c == linear_space._MIXED).sum()) for c in inner)
        assert mixed < sum(c.size for c in inner)  # some folds are never computed per sample
        if name == "everything":
            assert mixed == 0
        v = int(mask.nonzero()[0])  # an integrated variable: its conditionals, shared and per sample
        got = [linear_space.categorical_conditionals(density, x, integrate, [v], 0, CATEGORIES)
               for integrate in (mask, mask.expand(6, -1))]
        shared_runs.clear()
        torch.testing.assert_close(got[0], got[1], rtol=1e-9, atol=1e-12)


def test_one_mask_for_every_sample_of_gaussian_inputs(monkeypatch):
    """The shared-mask evaluation of a squared circuit with Gaussian inputs (their integrals in
    closed form) equals the per-sample mask's, values and gradients."""
    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 0)
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True, optimize=False)
    squared = ctx.compile(gaussian_symbolic()[0])
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    _assert_shared_mask_is_per_sample_mask(squared, x, torch.arange(16) % 3 == 0)


def test_one_mask_for_every_sample_is_taken_where_it_saves_work(monkeypatch):
    """The shared-mask path runs two more evaluations: it is taken only where the folds it need
    not compute per sample hold SHARED_MASK_MIN_MACS multiply-adds over the batch. The
    evaluation with everything integrated is kept only in a ``reuse`` dict its caller holds
    while the parameters cannot change (a sampler's run): a write through ``.data`` (no version
    bump) between runs is seen by the next one."""
    density = _density_for_conditionals("quad-tree", "kronecker")
    d = NUM_VARIABLES["quad-tree"]
    x = torch.randint(0, CATEGORIES, (4, d), generator=torch.Generator().manual_seed(2))
    mask = torch.arange(d) >= d // 2
    kept = []
    original = linear_space.CircuitPlan.run
    monkeypatch.setattr(linear_space.CircuitPlan, "run",
                        lambda self, *a, **k: kept.append(k.get("keep", False)) or original(self, *a, **k))
    evaluate_linear_space(density, x, integrate=mask)  # a tiny circuit: below the default
    assert kept == [False]
    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 0)
    kept.clear()
    evaluate_linear_space(density, x, integrate=mask)
    assert kept == [True, True]  # everything integrated, and nothing

    def conditionals(reuse):
        return linear_space.categorical_conditionals(density, x, mask, [d - 1], 0, CATEGORIES, reuse=reuse)

    kept.clear()
    conditionals(None), conditionals(None)
    assert kept == [True, True] * 2  # nothing kept between calls
    kept.clear()
    run: dict = {}
    first = conditionals(run)
    conditionals(run)
    assert kept == [True, True, True]  # the integrated evaluation once in the run
    with torch.no_grad():
        next(density.parameters()).data.mul_(1.5)  # no version bump
    again = conditionals({})
    per_sample = linear_space.categorical_conditionals(density, x, mask.expand(4, -1), [d - 1], 0, CATEGORIES)
    torch.testing.assert_close(again, per_sample, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(first, again)


def test_integrated_entries_of_x_are_never_read(monkeypatch):
    """Entries of x that are integrated out may hold anything (NaN for Gaussian inputs, -1 for
    categorical ones): values equal those with zeros there, and gradients stay finite, for a
    shared mask (whose evaluation at x with nothing integrated computes every fold) and per
    sample (whose inputs compute both branches before selecting)."""
    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 0)
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True, optimize=False)
    squared = ctx.compile(gaussian_symbolic()[0])
    density = _density_for_conditionals("quad-tree", "kronecker")
    d = NUM_VARIABLES["quad-tree"]
    cases = [(squared, torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3 == 0,
              float("nan")),
             (density, torch.randint(0, CATEGORIES, (5, d), generator=torch.Generator().manual_seed(1)),
              torch.arange(d) % 3 == 0, -1)]
    for circuit, x, mask, junk in cases:
        for integrate in (mask, mask.expand(5, -1)):
            values = []
            for fill in (0, junk):
                c = copy.deepcopy(circuit)
                value = evaluate_linear_space(c, x.masked_fill(mask, fill), integrate=integrate)
                value.real.sum().backward()
                grads = parameter_grads(c)
                assert all(bool(torch.isfinite(g).all()) for g in grads.values())
                values.append((value.detach(), grads))
            assert_same_logs(values[0][0], values[1][0])
            assert_same_gradients(values[0][1], values[1][1])


@pytest.mark.parametrize("circuit", ["kronecker", "optimize=True", "monotone", "complex weights", "cp-t"])
@pytest.mark.parametrize("evidence", ["per sample", "everything"])
def test_categorical_conditionals_of_every_variable_at_once(circuit, evidence):
    """One derivative gives every variable's ratio ``f(x_u = c) / f(x)``: for a variable integrated
    out in a sample, its conditional given that sample's evidence (sums to 1); for an observed
    one, the ratio to its observed value (1 there). Per-sample evidence, or everything
    observed (no input integrated: the rank-1 path, which must not bypass the derivative);
    variables asked for in any order, each entry equal to the ratio of two evaluations."""
    density = _density_for_conditionals("quad-tree", circuit)
    d = NUM_VARIABLES["quad-tree"]
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, CATEGORIES, (5, d), generator=g)
    mask = torch.rand(5, d, generator=g) < 0.5
    mask[0], mask[1] = False, True
    if evidence == "everything":
        mask[:] = False
    variables = torch.randperm(d, generator=g)[:9].tolist()
    got = linear_space.categorical_conditionals(density, x, None if evidence == "everything" else mask, variables,
                                                0, CATEGORIES)
    assert got.shape == (5, 9, CATEGORIES)
    for i, u in enumerate(variables):
        torch.testing.assert_close(got[:, i], _ratios_of_evaluations(density, x, mask, u), rtol=1e-9, atol=1e-12)
    integrated = mask[:, variables]
    torch.testing.assert_close(got.sum(dim=2)[integrated], torch.ones(int(integrated.sum()), dtype=torch.float64),
                               rtol=0, atol=1e-10)
    at_value = got.gather(2, x[:, variables].unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(at_value[~integrated], torch.ones(int((~integrated).sum()), dtype=torch.float64),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_probe_gradients_meet_each_categorys_value_as_the_contraction_says(dtype):
    """``_with_categories``: ``Σ_ij g[f, b, (i, j)] Σ_t left[f, i, t, c] right[f, j, t, c]`` for the
    factored values (several outer products per category, Ki ≠ Kj) and ``Σ_k g[f, b, k] v[f, c, k]``
    for plain ones, against the sums written out (one product on g in place, no copy of it)."""
    g_ = torch.Generator().manual_seed(5)
    f, b, ki, kj, t, v = 3, 4, 5, 6, 2, 7
    g = torch.randn(f, b, ki * kj, generator=g_, dtype=dtype)
    left, right = torch.randn(f, ki, t, v, generator=g_), torch.randn(f, kj, t, v, generator=g_)
    expected = torch.einsum("fbij,fitc,fjtc->fbc", g.reshape(f, b, ki, kj), left.to(dtype), right.to(dtype))
    torch.testing.assert_close(linear_space._with_categories(g, (left, right)), expected, rtol=1e-12, atol=1e-12)
    plain = torch.randn(f, v, ki * kj, generator=g_)
    torch.testing.assert_close(linear_space._with_categories(g, (plain,)),
                               torch.einsum("fbk,fck->fbc", g, plain.to(dtype)), rtol=1e-12, atol=1e-12)


def test_categorical_conditionals_bad_input():
    density = _density_for_conditionals("quad-tree", "kronecker")
    x = torch.zeros(2, 16, dtype=torch.long)
    for variables in ([16], [], [-1], [5, 5]):
        with pytest.raises(ValueError, match=r"variables must be one or more distinct indices in 0..15"):
            linear_space.categorical_conditionals(density, x, None, variables, 0, CATEGORIES)
    for categories in (CATEGORIES - 1, CATEGORIES + 1):  # never cut short or read past the table
        with pytest.raises(ValueError, match=f"categories is {categories}, but the circuit's categorical inputs have 3"):
            linear_space.categorical_conditionals(density, x, None, [0], 0, categories)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside torch.inference_mode\(\)"):
        linear_space.categorical_conditionals(density, x, None, [0], 0, CATEGORIES)
    squared_symbolic, _, _ = gaussian_symbolic()
    torch.manual_seed(0)
    squared = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True, optimize=False).compile(
        squared_symbolic)
    x = torch.randn(2, 16)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[3] = True
    with pytest.raises(ValueError, match="categorical inputs over one variable each; TorchGaussianLayer"):
        linear_space.categorical_conditionals(squared, x, mask, [3], 0, 3)


def _with_and_without_symmetry(model, shortcut: str, monkeypatch):
    """``log Z`` of ``model`` and its gradients with symmetric blocks tracked, then without
    (``SYMMETRIC_BLOCKS``), each with the number of calls so far of the backward ``shortcut``
    of :mod:`structlayers.linalg.kron`: ``[(value, gradients, calls), (value, gradients, calls)]``."""
    import structlayers.linalg.kron as kron

    params = [p for p in model.parameters() if p.requires_grad]
    taken = []
    original = getattr(kron, shortcut)
    monkeypatch.setattr(kron, shortcut, lambda *a: taken.append(1) or original(*a))
    results = []
    for flag in (True, False):
        monkeypatch.setattr(linear_space, "SYMMETRIC_BLOCKS", flag)
        logz = model.log_partition(cached=False).sum()
        results.append((logz.detach(), torch.autograd.grad(logz, params, allow_unused=True), len(taken)))
    return results


@pytest.mark.parametrize("shape", ["quad-tree categorical", "linear tree (a chain)", "Gaussian", "complex weights"])
def test_symmetric_blocks_spare_a_product_with_the_same_gradients(shape, monkeypatch):
    """In Z of a real |c|² every block is a Gram matrix: the evaluator sees it from the inputs
    (equal parameters on both sides) and the layers (one real square A on both sides), and
    those layers' backward takes A's gradient from one product. Values equal and gradients
    within rounding of the general backward; taken on every real shape, never with complex
    weights (B = conj(A) is another tensor)."""
    from adapters.cirkit.bench.circuits import deep_cp_circuit, gaussian_image_circuit

    specs = {"quad-tree categorical": lambda: digits_squared_circuit(3, image_shape=(4, 4), num_categories=CATEGORIES),
             "linear tree (a chain)": lambda: deep_cp_circuit(8, 3, region_graph="linear-tree"),
             "Gaussian": lambda: gaussian_image_circuit(3, image_shape=(4, 4)),
             "complex weights": lambda: digits_squared_circuit(3, image_shape=(4, 4), num_categories=CATEGORIES,
                                                               complex=True)}
    spec = specs[shape]()
    model = compile_density(spec.circuit, dtype=torch.float64, seed=2, num_categories=spec.num_categories)
    (got, got_grads, used), (ref, ref_grads, used_after) = _with_and_without_symmetry(
        model, "_symmetric_square_backward", monkeypatch)
    assert (used > 0) == (shape != "complex weights") and used_after == used  # the general path took none
    assert torch.equal(got, ref)
    for g, r in zip(got_grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_constant_inputs_are_symmetric_only_with_equal_sides():
    """∫ c·c: both sides' parameters equal, the blocks symmetric; ∫ c1·c2 of two different
    circuits (categorical or Gaussian): not, so no layer above claims symmetry."""
    c1, c2 = two_circuits("quad-tree")
    gaussians = gaussian_symbolic()
    cases = {"categorical ∫c·c": (SF.multiply(c1, c1), True), "categorical ∫c1·c2": (SF.multiply(c1, c2), False),
             "Gaussian ∫c·c": (gaussians[0], True), "Gaussian ∫c1·c2": (SF.multiply(gaussian_base(), gaussians[2]), False)}
    for name, (product, expected) in cases.items():
        partition = compile_partition(product, "lse-sum" if "categorical" in name else "complex-lse-sum", True)
        constants = [layer for layer in partition.layers if isinstance(layer, TorchInputLayer)]
        flags = []
        for layer in constants:
            linear_space._input(layer, (1,), None, symmetric=flags)
        assert flags and all(f == expected for f in flags), name
        if "categorical" in name:  # read as factors, as Z's first layers take them: equal factors
            for layer in constants:
                found = linear_space._input_blocks(layer, (1,), None)
                assert torch.equal(found.left, found.right) == expected, name


@pytest.mark.parametrize("variant", ["kronecker", "lowrank square 3"])
def test_gram_blocks_are_measured_on_their_diagonals(variant, monkeypatch):
    """In Z of a real |c|² every block is a Gram matrix, and a symmetric map keeps it one:
    those sum layers' outputs are measured on their diagonals (scaling's ``gram``). On every
    block so measured -- the exact Kronecker layers and rank-3 squares, float64 -- the
    diagonal's peak is the whole block's, and Z and its gradients are unchanged."""
    spec = digits_squared_circuit(6, image_shape=(2, 4), num_categories=CATEGORIES)
    variants = {v.name: v.model for v in circuit_variants(spec, spec.compile(seed=0), kinds=("lowrank",), ranks=(3,),
                                                          structures=("square",), materialised=False)}
    density = variants[variant].to(torch.float64)
    measured = []
    original = scaling._max_abs

    def checked(v, gram=False):
        if gram:
            measured.append(v.shape)
            torch.testing.assert_close(original(v, gram=True), original(v), rtol=1e-12, atol=0)
        return original(v, gram)

    params = [p for p in density.parameters() if p.requires_grad]
    monkeypatch.setattr(scaling, "_max_abs", checked)
    logz = density.log_partition(cached=False)
    assert measured  # the Gram blocks were measured on their diagonals
    got = torch.autograd.grad(logz.sum(), params, allow_unused=True)
    monkeypatch.setattr(linear_space, "SYMMETRIC_BLOCKS", False)
    ref = density.log_partition(cached=False)
    want = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    torch.testing.assert_close(logz, ref, rtol=1e-12, atol=0)
    assert any(g is not None for g in got)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("complex_weights", [False, True])
def test_products_of_integral_blocks_go_through_inner_units_as_khatri_rao_factors(complex_weights, monkeypatch):
    """In Z, a Hadamard product of two integrals' blocks of rank V (through sum layers, kept as
    factors) feeding a rank-r square is taken as the row-wise products of the factors (V²
    columns) and goes through the square's r inner units, never multiplied out K x K, where V²
    is at most KHATRI_RAO_COLUMNS x K (8 x 8 units, 3 categories: 9 <= 12) and the work is
    small enough (KHATRI_RAO_WORK). Z and its gradients
    equal the multiplied-out evaluation's (float64 / complex128), also when every sum after an
    unmeasured product is measured again (the fallback multiplies them out). At 4 units (9 > 6)
    no product is so taken."""
    results = {}
    for units in (8, 4):
        spec = digits_squared_circuit(units, image_shape=(4, 4), num_categories=CATEGORIES, complex=complex_weights)
        variants = {v.name: v.model for v in circuit_variants(spec, spec.compile(seed=0), kinds=("lowrank",), ranks=(2,),
                                                              structures=("square",), materialised=False)}
        density = variants["lowrank square 2"].to(torch.float64)
        params = [p for p in density.parameters() if p.requires_grad]
        taken = [step for step in linear_space.circuit_plan(density.partition).steps if step.khatri_rao]
        assert bool(taken) == (units == 8)
        if units == 4:
            continue
        taken_at_8 = len(taken)
        inner = []
        original = linear_space._through_inner_units
        monkeypatch.setattr(linear_space, "_through_inner_units", lambda *a: inner.append(1) or original(*a))
        for route in ("khatri-rao", "multiplied out", "measured again"):
            linear_space._PLANS.clear()
            with monkeypatch.context() as patch:
                if route == "multiplied out":
                    patch.setattr(linear_space, "KHATRI_RAO_COLUMNS", 0.0)
                if route == "measured again":  # every sum after an unmeasured product raises: all re-measured
                    patch.setattr(linear_space, "_flush_limit", lambda dtype: math.inf)
                    patch.setattr(scaling, "_flush_limit", lambda dtype: math.inf)
                inner.clear()
                logz = density.log_partition(cached=False)
                grads = torch.autograd.grad(logz.real.sum(), params, allow_unused=True)
                results[route] = (logz, grads, len(inner))
        linear_space._PLANS.clear()
    assert results["khatri-rao"][2] == taken_at_8 and results["multiplied out"][2] == 0
    reference = results["multiplied out"]
    for route in ("khatri-rao", "measured again"):
        logz, grads, _ = results[route]
        torch.testing.assert_close(logz, reference[0], rtol=1e-12, atol=1e-12)
        assert any(g is not None for g in grads)
        for g, r in zip(grads, reference[1]):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_one_function_on_both_sides_is_read_once():
    """∫ c·c of a real circuit reads its integrals' two sides through two pointers to the same
    rows: the plan sees one function (same_inputs), the factors are one tensor and the
    layers above compute with it once. ∫ c1·c2 of two circuits whose parameters hold equal
    values is not one function: the sides stay apart, and the gradients reach both circuits'
    parameters as cirkit's own evaluation gives them (sharing would give c2 nothing and c1
    twice)."""
    c1, c2 = two_circuits("linear-tree", units=(2, 2))
    same = compile_partition(SF.multiply(c1, c1), "lse-sum", True)
    for layer in (layer for layer in same.layers if isinstance(layer, TorchInputLayer)):
        found = linear_space._input_blocks(layer, (1,), None)
        assert found.left is found.right
    apart = compile_partition(SF.multiply(c1, c2), "lse-sum", True)
    pointers = [n for layer in apart.layers if isinstance(layer, TorchInputLayer)
                for n in layer.value.nodes if isinstance(n, TorchPointerParameter)]
    logits = list({id(n.deref()): n.deref() for n in pointers}.values())
    assert len(logits) == 2
    with torch.no_grad():  # equal values, distinct parameters
        node_tensor(logits[1]).copy_(node_tensor(logits[0]))
    for layer in (layer for layer in apart.layers if isinstance(layer, TorchInputLayer)):
        found = linear_space._input_blocks(layer, (1,), None)
        assert found.left is not found.right and torch.equal(found.left, found.right)
    params = list(apart.parameters())
    ours = torch.autograd.grad(evaluate_linear_space(apart).real.sum(), params, allow_unused=True)
    ref = torch.autograd.grad(apart().real.sum(), params, allow_unused=True)
    for g, r in zip(ours, ref):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def _inputs_of(circuit, x):
    """Each input layer's factors at x, as the evaluator reads them (:func:`linear_space._input_blocks`)."""
    return [linear_space._input_blocks(layer, *linear_space._input_arguments(layer, x, None))
            for layer in circuit.layers if isinstance(layer, TorchInputLayer)]


@pytest.mark.parametrize("inputs", ["categorical", "Gaussian"])
def test_one_function_at_data_is_computed_once(inputs, monkeypatch):
    """c·c of a real circuit at data reads its inputs' two sides from the same rows: each
    input's values are computed once, one tensor is both factors of its rank-1 blocks, and
    the layers above keep it one (half the lookups or Gaussian passes of c1·c2). c1·c2 of
    two circuits whose inputs hold equal values keeps two tensors, and both give cirkit's
    values and gradients."""
    if inputs == "categorical":
        c1, c2 = two_circuits("linear-tree", units=(2, 2))
        semiring, counted = "lse-sum", "_lookup"
        x = torch.randint(0, CATEGORIES, (5, NUM_VARIABLES["linear-tree"]))
    else:
        c1, c2 = gaussian_base(), gaussian_base()
        semiring, counted = "complex-lse-sum", "_gaussian_values"
        x = torch.randn(5, 16, dtype=torch.float64)
    same, apart = compile_circuit(SF.multiply(c1, c1), semiring), compile_circuit(SF.multiply(c1, c2), semiring)
    assert all(found.left is found.right for found in _inputs_of(same, x))
    with torch.no_grad():  # c2's inputs take c1's values: equal values, distinct parameters
        for layer in (layer for layer in apart.layers if isinstance(layer, TorchInputLayer)):
            for graph in layer.params.values():
                targets = list({id(n.deref()): n.deref() for n in graph.nodes
                                if isinstance(n, TorchPointerParameter)}.values())
                half = len(targets) // 2  # c1's tensors, then c2's
                for a, b in zip(targets[:half], targets[half:]):
                    node_tensor(b).copy_(node_tensor(a))
    found = _inputs_of(apart, x)
    assert found and all(f.left is not f.right and torch.equal(f.left, f.right) for f in found)
    calls = []
    original = getattr(linear_space, counted)
    monkeypatch.setattr(linear_space, counted, lambda *a: calls.append(1) or original(*a))
    counts = []
    for circuit in (same, apart):
        calls.clear()
        params = list(circuit.parameters())
        ours = evaluate_linear_space(circuit, x)
        counts.append(len(calls))
        ref = semiring_values(circuit, x)
        torch.testing.assert_close(ours.real, ref.real, rtol=RTOL, atol=1e-12)
        got = torch.autograd.grad(ours.real.sum(), params, allow_unused=True)
        want = torch.autograd.grad(circuit(x).real.sum(), params, allow_unused=True)
        for g, r in zip(got, want):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert counts[0] * 2 == counts[1] > 0


@pytest.mark.parametrize("region_graph", ["quad-tree", "linear-tree"])
def test_one_function_at_data_goes_up_once(region_graph, monkeypatch):
    """Above the inputs of a real c·c at data, every sum layer maps one factor instead of two
    (the rank-1 blocks ``u ⊗ u``): about half the matrix products' multiply-adds of the same
    evaluation with the inputs' two sides made two tensors, with the same values and gradients."""
    from structlayers.benchmarking import matmul_macs

    model = compile_density(two_circuits(region_graph, units=(4, 4))[0], semiring="lse-sum", seed=0,
                            dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(0, CATEGORIES, (7, NUM_VARIABLES[region_graph]), generator=torch.Generator().manual_seed(3))
    results = []
    for shared in (True, False):
        if not shared:
            original = linear_space._squared_categorical_rows

            def apart(layer):  # the inputs' two sides as two tensors (at the table: every look-up reads it)
                rows, sides = original(layer)
                return rows._replace(right=rows.right.clone()), sides

            monkeypatch.setattr(linear_space, "_squared_categorical_rows", apart)
        macs = matmul_macs(lambda: evaluate_linear_space(model.density, x))
        value = evaluate_linear_space(model.density, x)
        results.append((macs, value, torch.autograd.grad(value.sum(), params, allow_unused=True)))
    (macs, value, grads), (apart_macs, apart_value, apart_grads) = results
    assert 0 < macs <= 0.55 * apart_macs
    torch.testing.assert_close(value, apart_value, rtol=1e-12, atol=1e-13)
    for g, r in zip(grads, apart_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("kind", ["lowrank", "nystrom", "structured circuit"])
def test_symmetric_blocks_spare_products_of_a_thin_chain(kind, monkeypatch):
    """Z of a real |c|² with squares of ``L R`` through r inner units (frozen low-rank or Nyström
    squares, a tied real Kronecker term; or a structured circuit's layers, squared through c's
    low-rank factors): each such layer maps symmetric blocks to symmetric blocks, and its
    backward takes L's and R's gradients from half the ``K x K x r`` products. The same value
    and gradients within rounding as the general backward."""
    from adapters.cirkit.bench.variants import circuit_variants

    spec = digits_squared_circuit(4, image_shape=(4, 4), num_categories=CATEGORIES)
    if kind == "structured circuit":  # c's own layers low-rank, Z squaring each through its factors
        model, _ = compile_structured(spec.circuit, structure_policy("lowrank", rank=2), dtype=torch.float64, seed=2,
                                      num_categories=CATEGORIES)
    else:
        variants = {v.name: v.model for v in circuit_variants(spec, spec.compile(seed=2), kinds=(kind,), ranks=(2,),
                                                              structures=("square",), materialised=False)}
        model = variants[f"{kind} square 2"].to(torch.float64)
    assert any(getattr(layer, "maps_symmetric", lambda: False)() for layer in model.partition.layers)
    (got, got_grads, used), (ref, ref_grads, used_after) = _with_and_without_symmetry(
        model, "_symmetric_chain_backward", monkeypatch)
    assert used > 0 and used_after == used  # the general path took none
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)  # the chain applied directly: rounding apart
    for g, r in zip(got_grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("semiring", ["lse-sum", "complex-lse-sum"])
def test_fused_product_sum_layers_of_one_fold_read_their_inputs_apart(semiring, monkeypatch):
    """cirkit compiles a CP circuit's ``c`` into CPT layers (Hadamard product, then the sum).
    On a linear tree each of them has one fold reading one row of each of two layers: it
    multiplies those rows as they are, with no stack of them (nor an unbind in the backward).
    The values equal cirkit's, and values and gradients equal those of the stacked inputs."""
    torch.manual_seed(0)  # cirkit fuses a product and the sum above it into a CPT layer when optimising
    c = PipelineContext(backend="torch", semiring=semiring, fold=True, optimize=True).compile(two_circuits("linear-tree")[0])
    x = torch.randint(0, CATEGORIES, (5, NUM_VARIABLES["linear-tree"]), generator=torch.Generator().manual_seed(4))
    plan = linear_space.circuit_plan(c)
    fused = [step for step in plan.steps if step.rule is linear_space._cpt]
    assert fused and all(step.operands for step in fused)

    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(1) or real_stack(*a, **k))

    def evaluated(apart: bool):
        for step in fused:
            step.operands = apart
        stacks.clear()
        c.zero_grad(set_to_none=True)
        y = evaluate_linear_space(c, x)
        count = len(stacks)
        y.real.sum().backward()
        return y.detach(), parameter_grads(c), count

    value, grads, apart_stacks = evaluated(True)
    stacked_value, stacked_grads, stacked_stacks = evaluated(False)
    pieces = sum(step.fetch.kind == "pieces" for step in fused)  # rows of two layers ('narrow': of one, a view)
    assert pieces and stacked_stacks - apart_stacks == 2 * pieces  # values and scales of each
    with torch.no_grad():
        assert_same_logs(value, semiring_values(c, x))
    assert_same_logs(value, stacked_value)
    assert_same_gradients(grads, stacked_grads)


def _cp_symbolic(region_graph: str, activation: str, **categorical_options):
    """A symbolic 3-unit CP circuit over categorical inputs, its weights through ``activation``."""
    return REGION_GRAPHS[region_graph]().build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=CATEGORIES, **categorical_options),
        sum_product="cp", num_input_units=3, num_sum_units=3,
        sum_weight_factory=parameterization_to_factory(Parameterization(activation=activation, initialization="normal")))


def _structured_model(region_graph: str):
    """A structured circuit (low-rank kinds of the zoo as c's sum layers) over :func:`_cp_symbolic`."""
    model, _ = compile_structured(_cp_symbolic(region_graph, "none"), structure_policy("lowrank", rank=2),
                                  dtype=torch.float64, seed=1, num_categories=CATEGORIES)
    return model


def _base_circuit(region_graph: str, case: str):
    """A compiled c (not squared) for :func:`test_sum_layers_over_categorical_inputs_map_their_tables`:
    signed, softmax-normalised or complex weights; folded or not; cirkit's optimize=True; a
    structured circuit's c (its sum layers low-rank kinds of the zoo); or inputs whose category 1
    has log-probabilities near -800 (the table's rows then carry their own scale)."""
    if case == "complex weights":
        return compile_circuit(complex_circuit(region_graph, units=3), "complex-lse-sum")
    if case == "structured":
        return _structured_model(region_graph).base
    logits = {"logits_factory": log_softmax_logits} if case == "far logits" else {}
    c = _cp_symbolic(region_graph, "softmax" if case == "lse-sum" else "none", **logits)
    semiring = "lse-sum" if case == "lse-sum" else "complex-lse-sum"
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring=semiring, fold=case != "unfolded", optimize=case == "optimize=True")
    circuit = ctx.compile(c)
    if case == "far logits":
        with torch.no_grad():
            for layer in circuit.layers:
                if isinstance(layer, TorchInputLayer):
                    raw_tensor(layer.logits)[..., 1] -= 800.0
    return circuit


@pytest.mark.parametrize("region_graph", ["quad-tree", "linear-tree"])
@pytest.mark.parametrize("case", ["lse-sum", "signed", "complex weights", "unfolded", "optimize=True", "structured",
                                  "far logits"])
def test_sum_layers_over_categorical_inputs_map_their_tables(region_graph, case, monkeypatch):
    """At data, a sum layer over a categorical input (one input fold per fold) maps the input's
    V table rows and looks each sample's row up after, where the batch has more than V rows:
    cirkit's values, the gradients of the map of the looked-up rows, and V rows' work in those
    layers whatever the batch. A batch of at most V rows, a mask or a probe looks up first."""
    from structlayers.benchmarking import matmul_macs

    circuit = _base_circuit(region_graph, case)
    looked_up_first = copy.deepcopy(circuit)
    d = NUM_VARIABLES[region_graph]
    x = torch.randint(0, CATEGORIES, (9, d), generator=torch.Generator().manual_seed(5))
    calls = []
    original = linear_space._sum_over_table
    monkeypatch.setattr(linear_space, "_sum_over_table", lambda *a: calls.append(1) or original(*a))

    def run(c, rows):
        params = [p for p in c.parameters() if p.requires_grad]
        value = evaluate_linear_space(c, x[:rows])
        return value, torch.autograd.grad(value.real.sum(), params, allow_unused=True)

    value, grads = run(circuit, 9)
    assert calls, "no sum layer took its input's table"
    assert bool(torch.isfinite(value.real).all())
    assert_same_logs(value.detach(), semiring_values(circuit, x))
    plan = linear_space.circuit_plan(circuit)
    tabled = [s.layer for s in plan.steps if s.over_table is not None]
    per_row = sum(math.prod(linear_space._weights(layer, linear_space._Context(False, False)).shape)
                  for layer in tabled) if case in ("lse-sum", "signed", "unfolded", "optimize=True", "far logits") else None
    macs = [matmul_macs(lambda: evaluate_linear_space(circuit, x[:rows])) for rows in (6, 9)]

    monkeypatch.setattr(linear_space, "_over_table", lambda steps, step: None)  # the plan of the copy: rows first
    ref_value, ref_grads = run(looked_up_first, 9)
    assert_same_logs(value.detach(), ref_value.detach())
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    if per_row is not None:  # three more rows cost the tabled layers nothing: 3 rows of their maps saved
        ref_macs = [matmul_macs(lambda: evaluate_linear_space(looked_up_first, x[:rows])) for rows in (6, 9)]
        assert (ref_macs[1] - ref_macs[0]) - (macs[1] - macs[0]) == 3 * per_row > 0

    calls.clear()
    mask = torch.zeros(9, d, dtype=torch.bool)
    mask[::2, 0] = True
    with torch.no_grad():
        value = evaluate_linear_space(circuit, x[:CATEGORIES])  # no more rows than categories
        assert_same_logs(value, semiring_values(circuit, x[:CATEGORIES]))
        assert_same_logs(evaluate_linear_space(circuit, x, integrate=mask),
                         evaluate_linear_space(looked_up_first, x, integrate=mask))
    assert not calls


def _squared_density(region_graph: str, case: str):
    """|c|² at data (fast path, float64) of a 3-unit categorical circuit: softmax-normalised,
    signed or complex weights, or a structured circuit (low-rank squares)."""
    if case == "structured":
        return _structured_model(region_graph).density
    if case == "complex weights":
        c = complex_circuit(region_graph, units=3)
    else:
        c = _cp_symbolic(region_graph, "softmax" if case == "lse-sum" else "none")
    semiring = "lse-sum" if case == "lse-sum" else "complex-lse-sum"
    return compile_density(c, semiring=semiring, seed=0, dtype=torch.float64, num_categories=CATEGORIES).density


@pytest.mark.parametrize("region_graph", ["quad-tree", "linear-tree"])
@pytest.mark.parametrize("case", ["lse-sum", "signed", "complex weights", "structured"])
def test_sum_layers_over_squared_categorical_inputs_map_their_tables(region_graph, case, monkeypatch):
    """|c|² at data: a sum layer over a squared categorical input maps the input's rank-1 block
    of each category (V rows of factors) and looks each sample's rows up after: cirkit's values,
    the gradients of the map of the looked-up rows, V rows' work whatever the batch. Where the
    layer cannot take the table's factors the input is looked up after all."""
    from structlayers.benchmarking import matmul_macs

    density = _squared_density(region_graph, case)
    looked_up_first, declined = copy.deepcopy(density), copy.deepcopy(density)
    x = torch.randint(0, CATEGORIES, (9, NUM_VARIABLES[region_graph]), generator=torch.Generator().manual_seed(6))
    calls = []
    original = linear_space._sum_over_table
    monkeypatch.setattr(linear_space, "_sum_over_table", lambda *a: calls.append(1) or original(*a))

    def run(c, rows=9):
        params = [p for p in c.parameters() if p.requires_grad]
        value = evaluate_linear_space(c, x[:rows])
        return value, torch.autograd.grad(value.real.sum(), params, allow_unused=True)

    value, grads = run(density)
    assert calls
    assert_same_logs(value.detach(), semiring_values(density, x))
    macs = [matmul_macs(lambda: evaluate_linear_space(density, x[:rows])) for rows in (6, 9)]
    monkeypatch.setattr(linear_space, "_sum_over_table", lambda *a: None)  # every layer declines the table
    assert_same_logs(run(declined)[0].detach(), value.detach())
    monkeypatch.setattr(linear_space, "_over_table", lambda steps, step: None)  # rows first, from the plan on
    ref_value, ref_grads = run(looked_up_first)
    assert_same_logs(value.detach(), ref_value.detach())
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    ref_macs = [matmul_macs(lambda: evaluate_linear_space(looked_up_first, x[:rows])) for rows in (6, 9)]
    assert macs[1] - macs[0] < ref_macs[1] - ref_macs[0]  # three more rows cost the tabled layers nothing


@pytest.mark.parametrize("case", ["lse-sum", "signed", "complex weights", "optimize=True"])
def test_dense_sum_layers_with_the_transposed_weight_node_give_cirkits_gradients(case, monkeypatch):
    """With every dense weight taken through :class:`linear_space._TransposedWeightProduct`
    (its size threshold lowered to 0: the test circuits' weights are small), c(x) and its
    gradients are cirkit's, softmax-normalised and complex weights included."""
    monkeypatch.setattr(linear_space, "TRANSPOSED_WEIGHT_MIN_ENTRIES", 0)
    calls = []
    original = linear_space._TransposedWeightProduct.apply
    monkeypatch.setattr(linear_space._TransposedWeightProduct, "apply", lambda *a: calls.append(1) or original(*a))
    circuit = _base_circuit("quad-tree", case)
    x = torch.randint(0, CATEGORIES, (9, NUM_VARIABLES["quad-tree"]), generator=torch.Generator().manual_seed(7))
    params = list(circuit.parameters())
    ours = evaluate_linear_space(circuit, x)
    assert calls
    got = torch.autograd.grad(ours.real.sum(), params, allow_unused=True)
    reference = circuit(x)  # cirkit's own evaluation (the circuit is not accelerated)
    assert_same_logs(ours.detach(), reference.detach())
    want = torch.autograd.grad(reference.real.sum(), params, allow_unused=True)
    assert any(g is not None for g in got)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
