"""The fast path as the plain call (adapters.cirkit.accelerate), float64."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from cirkit.backend.torch.queries import IntegrateQuery
from cirkit.utils.scope import Scope

from adapters.cirkit import accelerate, cirkit_evaluation, evaluate_linear_space, swap_kronecker_sum_layers
from adapters.cirkit import linear_space, plan
from adapters.cirkit.accelerate import AcceleratedCircuit, is_accelerated

from .builders import CATEGORIES, compile_pair, image_circuits

pytestmark = pytest.mark.usefixtures("float64")


def cirkit_values(circuit, x=None):
    with torch.no_grad(), cirkit_evaluation(circuit):
        return circuit(x) if x is not None else circuit()


@pytest.mark.parametrize("semiring", ["lse-sum", "complex-lse-sum"])
@pytest.mark.parametrize("fold", [False, True])
def test_plain_call_values_and_gradients_equal_cirkits(semiring, fold):
    circuit, partition = compile_pair("quad-tree", "cp", semiring, fold, optimize=True)
    x = torch.randint(0, CATEGORIES, (6, 16), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy((circuit, partition))
    fast_c, fast_z = accelerate(circuit), accelerate(partition)
    assert isinstance(fast_c, AcceleratedCircuit) and is_accelerated(fast_z)
    grads = []
    for c, z in (reference, (fast_c, fast_z)):
        with cirkit_evaluation(*([c, z] if c is reference[0] else [])):
            y, logz = c(x), z()
        assert y.shape == (6, 1, 1) and logz.shape == (1, 1)
        (-(y.real[:, 0, 0] - logz.real[0, 0]).sum()).backward()
        grads.append([p.grad.clone() for p in c.parameters()])
        if c is not reference[0]:
            torch.testing.assert_close(y, reference[0](x), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(logz, reference[1](), rtol=1e-10, atol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_opt_out_gives_cirkits_own_evaluation(monkeypatch):
    circuit, partition, _ = image_circuits(16, "complex-lse-sum")
    x = torch.randint(0, 17, (3, 256), generator=torch.Generator().manual_seed(1))
    accelerate(circuit)
    with torch.no_grad():
        fast = circuit(x).real[:, 0, 0]
        with cirkit_evaluation(circuit):
            monkeypatch.setattr(linear_space, "evaluate_graph", lambda *a, **k: pytest.fail("fast path used"))
            clamped = circuit(x).real[:, 0, 0]
        monkeypatch.undo()
        circuit.fast_evaluation = False
        also_clamped = circuit(x).real[:, 0, 0]
        circuit.fast_evaluation = True
    assert float(fast.max()) < -750  # far below the clamp: only the fast path is exact here
    assert float((clamped - fast).abs().min()) > 10 and torch.equal(clamped, also_clamped)
    assert is_accelerated(circuit)


@pytest.mark.parametrize("fold", [False, True])
def test_cirkits_integrate_query_runs_on_the_fast_path(fold):
    circuit, _ = compile_pair("quad-tree", "cp", "complex-lse-sum", fold, optimize=True)
    x = torch.randint(0, CATEGORIES, (4, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 8:] = True
    mask[0] = False
    reference = evaluate_linear_space(circuit, x, integrate=mask)
    accelerate(circuit)
    with torch.no_grad():
        got = IntegrateQuery(circuit)(x, integrate_vars=mask)  # cirkit itself fails folded on categoricals
        torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-10)
        one_scope = IntegrateQuery(circuit)(x, integrate_vars=Scope(range(8, 16)))
        torch.testing.assert_close(one_scope[1:], reference[1:], rtol=1e-10, atol=1e-10)
    if not fold:  # cirkit's own query works unfolded: the same numbers
        with torch.no_grad(), cirkit_evaluation(circuit):
            own = IntegrateQuery(circuit)(x, integrate_vars=mask)
        torch.testing.assert_close(own, reference, rtol=1e-10, atol=1e-10)


def test_the_plan_is_built_once_and_each_parameter_graph_evaluated_once_per_call(monkeypatch):
    circuit, partition = compile_pair("quad-tree", "cp", "complex-lse-sum", True, optimize=False)
    swap_kronecker_sum_layers([circuit, partition], "kronecker", mode="live")
    built, runs = [], []
    init, run = linear_space.CircuitPlan.__init__, plan.ParameterPlan.run
    monkeypatch.setattr(linear_space.CircuitPlan, "__init__", lambda self, c: (built.append(1), init(self, c))[1])
    monkeypatch.setattr(plan.ParameterPlan, "run", lambda self, *a: (runs.append(id(self)), run(self, *a))[1])
    x = torch.randint(0, CATEGORIES, (4, 16), generator=torch.Generator().manual_seed(3))
    graphs = {id(p) for layer in partition.layers for p in layer.params.values()}
    for _ in range(3):
        runs.clear()
        partition()
        # one evaluation per parameter graph (the live Kronecker factors read through it)
        assert len(runs) == len(set(runs)) <= len(graphs) + sum(1 for layer in partition.layers
                                                                if type(layer).__name__ == "TorchConstantValueLayer")
    circuit(x)
    assert len(built) == 2  # one plan per circuit, reused by every later call
    swap_kronecker_sum_layers(partition, "lowrank", rank=1)  # new layers: a new plan
    partition()
    assert len(built) == 3


def test_accelerated_circuits_copy_and_pickle():
    circuit, _ = compile_pair("quad-tree", "cp", "lse-sum", True, optimize=True)
    accelerate(circuit)
    x = torch.randint(0, CATEGORIES, (2, 16), generator=torch.Generator().manual_seed(4))
    for clone in (copy.deepcopy(circuit), pickle.loads(pickle.dumps(circuit))):
        assert is_accelerated(clone)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), circuit(x), rtol=0, atol=0)


def test_accelerate_refuses_what_is_not_a_compiled_circuit():
    with pytest.raises(TypeError, match="compiled cirkit TorchCircuit"):
        accelerate(torch.nn.Linear(2, 2))
