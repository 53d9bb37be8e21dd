"""Log-likelihoods stay correct below cirkit's clamp at log(tiny) ≈ -708.4."""

from __future__ import annotations

import functools

import pytest
import torch

from cirkit.backend.torch.layers import TorchInputLayer
from cirkit.pipeline import PipelineContext
import cirkit.symbolic.functional as SF
from cirkit.symbolic.layers import CategoricalLayer
from cirkit.templates.region_graph import QuadTree
from cirkit.templates.utils import Parameterization, parameterization_to_factory

from adapters.cirkit import bits_per_dimension, log_likelihood, log_value, swap_kronecker_sum_layers, unclamped

from .test_swap import float64  # noqa: F401  (autouse fixture)

SHIFT = 8.0  # nats added to every input unit's log-value in the reference evaluation


def image_circuits(side: int, semiring: str):
    weights = Parameterization(activation="none", initialization="normal")
    base = QuadTree((1, side, side), num_patch_splits=2).build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=17),
        sum_product="cp", sum_weight_factory=parameterization_to_factory(weights),
        num_input_units=2, num_sum_units=2)
    squared = SF.multiply(base, base)
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring=semiring, fold=True, optimize=False)
    return ctx.compile(squared), ctx.compile(SF.integrate(squared)), ctx.compile(base)


def shifted_reference(circuit, x, num_variables):
    """An independent evaluation with cirkit's own (clamping) semiring: adding SHIFT to each
    input layer's log-output multiplies c²(x) by exp(SHIFT * D) exactly (each term of a smooth,
    decomposable circuit has one input per variable), which lifts every intermediate value
    above the clamp; subtracting SHIFT * D afterwards gives the true log c²(x)."""

    def module_fn(module, *inputs):
        y = module(*inputs)
        return y + SHIFT if isinstance(module, TorchInputLayer) else y

    with torch.no_grad():
        out = circuit.evaluate(x, module_fn=module_fn)
    return out.real[0, :, 0] - SHIFT * num_variables


def test_values_below_the_clamp_are_correct():
    circuit, partition, base = image_circuits(16, "complex-lse-sum")
    x = torch.randint(0, 17, (6, 256), generator=torch.Generator().manual_seed(1))
    reference = shifted_reference(circuit, x, 256)
    assert float(reference.max()) < -750  # far below the clamp: cirkit itself is wrong here
    with torch.no_grad():
        clamped = circuit(x).real[:, 0, 0]
        exact = log_value(circuit, x)[:, 0, 0]
        via_base = 2 * log_value(base, x)[:, 0, 0]
    assert float((clamped - reference).abs().max()) > 10
    assert torch.allclose(exact, reference, rtol=1e-10, atol=1e-8)
    assert torch.allclose(via_base, reference, rtol=1e-10, atol=1e-8)
    # Swapped layers keep the guarantee.
    swap_kronecker_sum_layers(circuit, "kronecker")
    with torch.no_grad():
        assert torch.allclose(log_value(circuit, x)[:, 0, 0], reference, rtol=1e-10, atol=1e-8)
    ll = log_likelihood(circuit, x, partition)
    assert torch.allclose(ll, reference - log_value(partition).reshape(-1)[0], rtol=1e-10)
    assert bits_per_dimension(ll, 256) == pytest.approx(float(-ll.mean() / (256 * torch.log(torch.tensor(2.0)))))


def test_above_the_clamp_exact_and_cirkit_agree_and_semirings_restore():
    circuit, partition, base = image_circuits(8, "complex-lse-sum")
    x = torch.randint(0, 17, (6, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(log_value(circuit, x), circuit(x).real, rtol=1e-12)
        ll = log_likelihood(circuit, x, partition)
        ll_base = log_likelihood(circuit, x, partition, base=base)
    assert torch.allclose(ll, ll_base, rtol=1e-9)
    semirings = [layer.semiring for layer in circuit.layers]
    with pytest.raises(RuntimeError):
        with unclamped(circuit):
            raise RuntimeError("boom")
    assert [layer.semiring for layer in circuit.layers] == semirings
