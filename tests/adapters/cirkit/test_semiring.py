"""The clamp-free log semirings (adapters.cirkit.semiring), float64."""

from __future__ import annotations

import pytest
import torch

from cirkit.backend.torch.semiring import ComplexLSESumSemiring, LSESumSemiring, SumProductSemiring

from adapters.cirkit.semiring import ExactComplexLSESumSemiring, ExactLSESumSemiring, log, unclamped

from .builders import image_circuits

pytestmark = pytest.mark.usefixtures("float64")


def test_real_operations_far_below_the_clamp():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen) - 2000.0  # e^x underflows any float: only logs can hold it
    y = torch.randn(3, 5, generator=gen) - 1000.0
    s = ExactLSESumSemiring
    torch.testing.assert_close(s.sum(x, dim=1), torch.logsumexp(x, dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.add(x, y), torch.logaddexp(x, y), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.prod(x, dim=1), x.sum(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.mul(x, y), x + y, rtol=1e-14, atol=0)
    # a linear map applied in linear space: log(W e^x), computed relative to the max
    w = torch.rand(4, 5, generator=gen)
    got = s.apply_reduce(lambda t: t @ w.T, x, dim=-1, keepdim=True)
    ref = torch.logsumexp(x.unsqueeze(1) + torch.log(w).unsqueeze(0), dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    # cirkit's own semiring clamps there
    assert float(LSESumSemiring.prod(x, dim=1).max()) >= -709 > float(ref.max())


def test_complex_signed_values_keep_their_sign():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(2, 6, generator=gen)
    logs = ComplexLSESumSemiring.cast(torch.log(v.abs())) + 1j * torch.pi * (v < 0)  # log of signed reals
    w = torch.randn(3, 6, generator=gen)
    got = ExactComplexLSESumSemiring.apply_reduce(lambda t: t @ w.T.to(t.dtype), logs, dim=-1, keepdim=True)
    ref = v @ w.T
    torch.testing.assert_close(torch.exp(got).real, ref, rtol=1e-12, atol=1e-14)


def test_log_backward_is_finite_at_exact_zeros_as_in_cirkit():
    x = torch.tensor([0.0, 0.0, 2.0], requires_grad=True)
    (log(x) * torch.tensor([0.0, 1.0, 1.0])).sum().backward()  # 0/0 and 1/0 at the zeros
    top = torch.finfo(torch.float64).max
    assert torch.equal(x.grad, torch.tensor([0.0, top, 0.5]))


def test_unclamped_swaps_and_restores_even_on_error():
    circuit, _, _ = image_circuits(4, "complex-lse-sum")
    before = [layer.semiring for layer in circuit.layers]
    with unclamped(circuit):
        assert {layer.semiring for layer in circuit.layers} == {ExactComplexLSESumSemiring}
    with pytest.raises(RuntimeError, match="boom"):
        with unclamped(circuit):
            raise RuntimeError("boom")
    assert [layer.semiring for layer in circuit.layers] == before


def test_unclamped_names_an_unsupported_semiring():
    circuit, _, _ = image_circuits(4, "complex-lse-sum")
    layer = circuit.layers[0]
    before = layer.semiring
    layer.semiring = type("OtherSemiring", (SumProductSemiring,), {})
    with pytest.raises(ValueError, match="uses semiring OtherSemiring"):
        with unclamped(circuit):
            pass
    layer.semiring = before
    assert all(lyr.semiring is before for lyr in circuit.layers)
