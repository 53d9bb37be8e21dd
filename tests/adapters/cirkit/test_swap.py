"""Swapped squared circuits reproduce cirkit's own outputs, partition functions and gradients.

Grid: semiring × fold × sum-product layer (cp, cp-t, tucker) × region graph (quad-tree,
random binary tree, linear tree), float64 throughout. References: cirkit's
materialised path (optimize=False) and its optimised path (optimize=True) compiled
from the same symbolic circuit with the same seed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cirkit.backend.torch.layers import TorchSumLayer

from adapters.cirkit.accelerate import is_accelerated
from adapters.cirkit.internals import entry_modules
from adapters.cirkit.layers import TorchKroneckerSumLayer, TorchStructuredSumLayer
from adapters.cirkit.plan import is_kronecker_weight
from adapters.cirkit.swap import rank_policy, square_policy, swap_kronecker_sum_layers

from .builders import CATEGORIES, NUM_VARIABLES, REGION_GRAPHS, compile_pair, full_rank


def evaluate(circuit, partition, x):
    y = circuit(x)
    z = partition()
    return y, z


pytestmark = pytest.mark.usefixtures("float64")


GRID = [(rg, layer, sr, fold)
        for rg in REGION_GRAPHS for layer in ("cp", "cp-t", "tucker")
        for sr in ("sum-product", "lse-sum", "complex-lse-sum") for fold in (False, True)]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("region_graph,layer,semiring,fold", GRID)
def test_exact_swaps_reproduce_cirkit(region_graph, layer, semiring, fold, fast):
    """fast=False: the swapped layers under cirkit's evaluation; True: the plain call runs
    the linear-space evaluation (sum-product circuits keep cirkit's)."""
    x = torch.randint(0, CATEGORIES, (5, NUM_VARIABLES[region_graph]), generator=torch.Generator().manual_seed(1))
    ref_c, ref_z = compile_pair(region_graph, layer, semiring, fold, optimize=False)
    opt_c, opt_z = compile_pair(region_graph, layer, semiring, fold, optimize=True)
    with torch.no_grad():
        y_ref, z_ref = evaluate(ref_c, ref_z, x)
        y_opt, z_opt = evaluate(opt_c, opt_z, x)
    assert torch.allclose(y_opt, y_ref, rtol=1e-9, atol=1e-12)  # both cirkit paths agree first
    assert torch.allclose(z_opt, z_ref, rtol=1e-9, atol=1e-12)
    for kind, mode in [("kronecker", "live"), ("kronecker", "frozen"), ("lowrank", "frozen"), ("nystrom", "frozen")]:
        circuit, partition = copy.deepcopy((ref_c, ref_z))  # one copy keeps their shared parameters
        policy = kind if kind == "kronecker" else full_rank(kind)
        report = swap_kronecker_sum_layers(circuit, policy, mode=mode, fast=fast)
        swap_kronecker_sum_layers(partition, policy, mode=mode, fast=fast)
        assert is_accelerated(circuit) == (fast and semiring != "sum-product")
        assert report.rows and all(r.relative_error < 1e-7 for r in report.rows)
        assert not any(isinstance(m, TorchSumLayer) and is_kronecker_weight(m.weight) for m in circuit.layers)
        with torch.no_grad():
            y, z = evaluate(circuit, partition, x)
        assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-12), (kind, mode)
        assert torch.allclose(z, z_ref, rtol=1e-9, atol=1e-12), (kind, mode)


@pytest.mark.parametrize("semiring", ["lse-sum", "complex-lse-sum"])
@pytest.mark.parametrize("fold", [False, True])
def test_gradients_match(semiring, fold):
    """Live mode: identical gradients for every circuit parameter. Frozen mode: identical
    gradients for the (shared) input layers, and the structured factors receive gradients."""
    x = torch.randint(0, CATEGORIES, (6, 16), generator=torch.Generator().manual_seed(2))
    ref_c, ref_z = compile_pair("quad-tree", "cp", semiring, fold, optimize=False)

    def loss(c, z):
        return -(c(x).real[:, 0, 0] - z().real[0, 0]).sum()

    loss(ref_c, ref_z).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_c.named_parameters()}
    for mode, kind in [("live", "kronecker"), ("frozen", "kronecker")]:
        circuit, partition = copy.deepcopy((ref_c, ref_z))  # one copy keeps their shared parameters
        for p in list(circuit.parameters()) + list(partition.parameters()):
            p.grad = None
        swap_kronecker_sum_layers(circuit, kind, mode=mode)
        swap_kronecker_sum_layers(partition, kind, mode=mode)
        loss(circuit, partition).backward()
        grads = {n: p.grad for n, p in circuit.named_parameters()}
        shared = [n for n in ref_grads if n in grads]
        assert shared
        for n in shared:
            assert grads[n] is not None and torch.allclose(grads[n], ref_grads[n], rtol=1e-9, atol=1e-12), (mode, n)
        if mode == "live":
            assert set(shared) == set(ref_grads)  # every parameter still trains
        else:
            structured = [m for m in circuit.layers if isinstance(m, TorchStructuredSumLayer)]
            assert structured and all(p.grad is not None for m in structured for p in m.parameters())


def test_approximations_and_report():
    ref_c, ref_z = compile_pair("quad-tree", "cp", "complex-lse-sum", True, optimize=False)
    circuit = copy.deepcopy(ref_c)
    report = swap_kronecker_sum_layers(circuit, rank_policy("lowrank", 2))
    kinds = {r.kind for r in report.rows}
    assert kinds == {"lowrank", "kronecker"}  # the 1 x K^2 root keeps the exact layer
    for row in report.rows:
        if row.kind == "lowrank":
            assert row.rank == 2 and 0 < row.relative_error < 1
            assert row.flops_per_sample == 2 * (row.info.out_features + row.info.in_features)
    text = str(report)
    assert "lowrank" in text and "rel.err" in text
    x = torch.randint(0, CATEGORIES, (4, 16))
    with torch.no_grad():
        assert torch.isfinite(circuit(x).real).all()


def test_policy_can_keep_layers_and_live_rejects_approximations():
    ref_c, _ = compile_pair("quad-tree", "cp", "lse-sum", False, optimize=False)
    circuit = copy.deepcopy(ref_c)
    report = swap_kronecker_sum_layers(circuit, lambda info: None if info.out_features == 1 else "kronecker",
                                       mode="live")
    assert len(report.kept) == 1 and report.kept[0].out_features == 1
    assert sum(isinstance(m, TorchKroneckerSumLayer) for m in circuit.layers) == len(report.rows)
    before = list(ref_c.layers)
    with pytest.raises(ValueError, match=r"cannot swap layer \d+ .*mode='live' .* supported kinds: kronecker"):
        swap_kronecker_sum_layers(ref_c, "tt", mode="live", rank=2)
    with pytest.raises(ValueError, match=r"cannot swap layer \d+ .*mode='live' with 'lowrank' .* square_policy"):
        swap_kronecker_sum_layers(ref_c, "lowrank", mode="live", rank=2)
    assert list(ref_c.layers) == before


def test_errors_leave_the_circuit_untouched():
    ref_c, _ = compile_pair("quad-tree", "cp", "lse-sum", True, optimize=False)
    before = list(ref_c.layers)
    with pytest.raises(ValueError, match=r"cannot swap layer \d+ \(1 folds, 1x4\): rank 3 exceeds"):
        swap_kronecker_sum_layers(ref_c, "lowrank", rank=3)  # the root layer has rank 1
    assert list(ref_c.layers) == before and entry_modules(ref_c)[: len(before)] == before
    with pytest.raises(ValueError, match="unknown structured layer kind 'fft'"):
        swap_kronecker_sum_layers(ref_c, "fft")
    with pytest.raises(ValueError, match="unknown mode 'lazy'"):
        swap_kronecker_sum_layers(ref_c, "kronecker", mode="lazy")
    opt_c, _ = compile_pair("quad-tree", "cp", "lse-sum", True, optimize=True)
    with pytest.raises(ValueError, match="the circuit has no Kronecker-weighted sum layer to swap"):
        swap_kronecker_sum_layers(opt_c, "kronecker")
    with pytest.raises(TypeError, match="expected a compiled cirkit TorchCircuit, got Linear"):
        swap_kronecker_sum_layers(torch.nn.Linear(2, 2), "kronecker")
    assert list(ref_c.layers) == before


def test_cirkit_integrate_query_on_a_swapped_circuit():
    """Marginals through cirkit's own IntegrateQuery (fold=False: cirkit 0.3.1's folded
    categorical integration has a shape bug of its own) match the unswapped circuit."""
    from cirkit.backend.torch.queries import IntegrateQuery
    from cirkit.utils.scope import Scope

    ref_c, _ = compile_pair("quad-tree", "cp", "complex-lse-sum", False, optimize=False)
    circuit = copy.deepcopy(ref_c)
    swap_kronecker_sum_layers(circuit, full_rank("nystrom"))
    x = torch.randint(0, CATEGORIES, (4, 16), generator=torch.Generator().manual_seed(6))
    scope = Scope([0, 1, 5, 9])
    with torch.no_grad():
        expected = IntegrateQuery(ref_c)(x, integrate_vars=scope)
        got = IntegrateQuery(circuit)(x, integrate_vars=scope)
        assert not torch.allclose(expected, ref_c(x))  # the query really marginalises
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("evaluation", ["semiring", "linear"])
def test_frozen_fine_tuning_keeps_the_model_normalised(evaluation):
    """c² and Z swapped in one call share their structured modules, so after gradient
    steps on the approximate factors Z̃ still equals the sum of c̃²(x) over every x
    (brute force over 3^3 states); swapped separately, the two drift apart."""
    import itertools

    from adapters.cirkit.bench.circuits import one_sum_circuit
    from adapters.cirkit.swap import square_policy

    spec = one_sum_circuit(4, num_variables=3, num_categories=3, num_outputs=1)
    states = torch.tensor(list(itertools.product(range(3), repeat=3)))
    for shared in (True, False):
        model = spec.compile(seed=0, dtype=torch.float64, evaluation=evaluation)
        policy = square_policy("lowrank", 2)
        if shared:
            report = swap_kronecker_sum_layers([model.density, model.partition], policy)
            structured = [m for m in model.density.layers if isinstance(m, TorchStructuredSumLayer)]
            assert structured and all(m in list(model.partition.layers) for m in structured)
            assert len(report.rows) == len(structured)  # each structure reported once
        else:
            swap_kronecker_sum_layers(model.density, policy)
            swap_kronecker_sum_layers(model.partition, policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        x = states[::4]
        for _ in range(3):
            optimizer.zero_grad()
            (-model.log_likelihood(x).mean()).backward()
            optimizer.step()
        with torch.no_grad():
            total = torch.logsumexp(model.log_likelihood(states)[:, 0], dim=0)
        if shared:
            assert abs(float(total)) < 1e-10
        else:
            assert abs(float(total)) > 1e-3


@pytest.mark.parametrize("kind", ["lowrank", "nystrom"])
def test_live_square_approximations_follow_the_circuit(kind):
    """Live Ã ⊗ conj(Ã): equal to the frozen layer at build time; after the circuit's own
    parameters take a gradient step, equal to a frozen layer rebuilt from the new weights."""
    from adapters.cirkit.layers import TorchLiveSquareSumLayer
    from adapters.cirkit.bench.circuits import digits_squared_circuit
    from adapters.cirkit.swap import square_policy

    spec = digits_squared_circuit(4)
    model = spec.compile(seed=0, dtype=torch.float64)
    x = torch.randint(0, 17, (6, 64), generator=torch.Generator().manual_seed(4))

    def approx(mode, source):
        m = copy.deepcopy(source)
        report = swap_kronecker_sum_layers([m.density, m.partition], square_policy(kind, 2), mode=mode)
        return m, report

    live, report = approx("live", model)
    assert any(isinstance(layer, TorchLiveSquareSumLayer) for layer in live.density.layers)
    assert all(r.mode == "live" and r.params == 0 for r in report.rows if r.kind == kind)
    frozen, frozen_report = approx("frozen", model)
    assert [r.relative_error for r in report.rows] == pytest.approx([r.relative_error for r in frozen_report.rows])
    torch.testing.assert_close(live.log_likelihood(x), frozen.log_likelihood(x), rtol=1e-10, atol=1e-10)
    live.evaluation = "linear"
    torch.testing.assert_close(live.log_likelihood(x), frozen.log_likelihood(x), rtol=1e-10, atol=1e-10)
    before = live.log_likelihood(x).detach()
    optimizer = torch.optim.SGD(live.parameters(), lr=0.1)  # the circuit's own parameters
    (-live.log_likelihood(x).mean()).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in live.parameters())
    optimizer.step()
    after = live.log_likelihood(x).detach()
    assert float((after - before).abs().max()) > 1e-3 and float(after.mean()) > float(before.mean())
    rebuilt, _ = approx("frozen", live)  # live's circuit holds the updated parameters
    assert not any(isinstance(layer, TorchLiveSquareSumLayer) for layer in rebuilt.density.layers)
    torch.testing.assert_close(after, rebuilt.log_likelihood(x).detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("junk", [5, ("lowrank",), ("lowrank", None), ["kronecker", {}], (None, {})])
def test_a_policy_returning_junk_is_a_type_error_and_nothing_is_swapped(junk):
    circuit, partition = compile_pair("linear-tree", "cp", "complex-lse-sum", True, False)
    before = [type(layer) for layer in circuit.layers]
    with pytest.raises(TypeError, match=r"the policy returned .* for layer \d+ .*a policy must return a kind name"):
        swap_kronecker_sum_layers(circuit, lambda info: junk)
    assert [type(layer) for layer in circuit.layers] == before


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda c: swap_kronecker_sum_layers(c, None), TypeError, r"policy must be a kind name or a policy function f\(LayerInfo\) .* got NoneType"),
        (lambda c: swap_kronecker_sum_layers(c, 3), TypeError, "policy must be a kind name or a policy function"),
        (lambda c: swap_kronecker_sum_layers(c, "fourier"), ValueError, "unknown structured layer kind 'fourier'"),
        (lambda c: swap_kronecker_sum_layers(c, "kronecker", fast="yes"), TypeError, "fast must be True or False"),
        (lambda c: rank_policy("lowrank", "x"), TypeError, "rank must be a positive int, got str"),
        (lambda c: rank_policy("lowrank", 0), ValueError, "rank must be a positive int, got 0"),
        (lambda c: square_policy("lowrank", 1.5), TypeError, "factor_rank must be a positive int"),
    ],
)
def test_bad_swap_arguments_are_named(call, error, match):
    circuit, _ = compile_pair("linear-tree", "cp", "complex-lse-sum", True, False)
    before = [type(layer) for layer in circuit.layers]
    with pytest.raises(error, match=match):
        call(circuit)
    assert [type(layer) for layer in circuit.layers] == before
