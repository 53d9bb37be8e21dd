"""Log-likelihoods stay correct below cirkit's clamp at log(tiny) ≈ -708.4."""

from __future__ import annotations

import warnings

import pytest
import torch

from adapters.cirkit import (
    bits_per_dimension,
    evaluate_linear_space,
    log_likelihood,
    log_value,
    swap_kronecker_sum_layers,
    unclamped,
)

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


# ------------------------------------------- non-square approximations and bad arguments (issue #11)
def enumerable(rank=None):
    """(c², ∫c², every state) of a 6-variable, 3-category circuit; with ``rank``, both swapped
    by rank_policy('lowrank', rank), a flat approximation that is no longer a square."""
    import itertools

    from adapters.cirkit import rank_policy

    from .builders import compile_pair

    squared, partition = compile_pair("linear-tree", "cp", "complex-lse-sum", True, False)
    if rank is not None:
        swap_kronecker_sum_layers([squared, partition], rank_policy("lowrank", rank))
    states = torch.tensor(list(itertools.product(range(3), repeat=6)))
    return squared, partition, states


def test_exact_circuit_sums_to_one_without_warning():
    squared, partition, states = enumerable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll = log_likelihood(squared, states, partition)
    assert abs(float(torch.logsumexp(ll, 0))) < 1e-10


@pytest.mark.parametrize("rank,what", [(2, r"c̃²\(x\) < 0 for \d+ of 729 samples"), (3, "Z̃ < 0")])
def test_non_square_values_are_nan_with_a_warning_and_signed_on_request(rank, what):
    """|c̃²(x)| / |Z̃| used to come back as a finite log-density (its exp summed to 2.29 here)."""
    squared, partition, states = enumerable(rank)
    with torch.no_grad():
        signed_values = torch.exp(evaluate_linear_space(squared, states)[:, 0, 0]).real
        z = torch.exp(evaluate_linear_space(partition)).real.reshape(())
    negative = (signed_values / z) < 0
    assert bool(negative.any())
    with pytest.warns(UserWarning, match=rf"log_likelihood: {what}.*NaN is returned.*signed=True"):
        ll = log_likelihood(squared, states, partition)
    assert torch.equal(torch.isnan(ll), negative)
    log_abs, sign = log_likelihood(squared, states, partition, signed=True)
    assert torch.equal(sign < 0, negative) and bool(torch.isfinite(log_abs).all())
    assert float((sign * torch.exp(log_abs)).sum()) == pytest.approx(1.0, rel=1e-9)  # signed values sum to Z̃
    with pytest.warns(UserWarning, match=what):  # the same through a given log Z and linear space
        again = log_likelihood(squared, states, torch.log(z.to(torch.complex128)), linear_space=True)
    assert torch.equal(torch.isnan(again), negative)


def test_bad_partition_base_and_bpd_arguments_are_named():
    squared, partition, states = enumerable()
    x = states[:4]
    with pytest.raises(ValueError, match=r"partition must hold one log Z, got a tensor of shape \(3, 2\)"):
        log_likelihood(squared, x, torch.zeros(3, 2))
    with pytest.raises(TypeError, match=r"partition must be the compiled ∫c² circuit or log Z .* got float"):
        log_likelihood(squared, x, 0.5)
    with pytest.raises(ValueError, match="partition must be the compiled ∫c² circuit, which has no variables"):
        log_likelihood(squared, x, squared)
    with pytest.raises(ValueError, match=r"base must be the compiled c over the variables of squared .*partition circuit"):
        log_likelihood(squared, x, partition, base=partition)
    with pytest.raises(ValueError, match="squared has no variables"):
        log_likelihood(partition, x, partition)
    with pytest.raises(TypeError, match="signed must be True or False"):
        log_likelihood(squared, x, partition, signed="yes")
    ll = log_likelihood(squared, x, partition)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"num_variables must be a positive int, got {bad}"):
            bits_per_dimension(ll, bad)
    with pytest.raises(TypeError, match="num_variables must be a positive int"):
        bits_per_dimension(ll, 6.0)
    with pytest.raises(TypeError, match="log_likelihoods must be a torch.Tensor"):
        bits_per_dimension(ll.tolist(), 6)
