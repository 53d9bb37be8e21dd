"""Log-likelihoods stay correct below cirkit's clamp at log(tiny) ≈ -708.4."""

from __future__ import annotations


import pytest
import torch


from adapters.cirkit import bits_per_dimension, log_likelihood, log_value, swap_kronecker_sum_layers, unclamped

from .builders import image_circuits, shifted_reference

pytestmark = pytest.mark.usefixtures("float64")


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
