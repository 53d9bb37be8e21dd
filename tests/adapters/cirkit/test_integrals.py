"""Integrals of Gaussian products in linear space equal cirkit's logs, with their gradients.

float64 throughout; the closed form is the same as cirkit's, only evaluated in another
order, so values agree to rounding (relative 1e-12) and gradients to 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cirkit.backend.torch.parameters.nodes import TorchGaussianProductLogPartition
from cirkit.pipeline import PipelineContext

from adapters.cirkit import evaluate_linear_space, swap_kronecker_sum_layers
from adapters.cirkit import integrals
from adapters.cirkit.integrals import gaussian_product_integrals
from adapters.cirkit.semiring import unclamped

from .builders import gaussian_symbolic

pytestmark = pytest.mark.usefixtures("float64")


def gaussian_parameters(folds=3, k1=4, k2=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean1, mean2 = torch.randn(folds, k1, generator=g) * 2, torch.randn(folds, k2, generator=g) * 2
    std1, std2 = torch.rand(folds, k1, generator=g) + 0.2, torch.rand(folds, k2, generator=g) + 0.2
    return [t.requires_grad_() for t in (mean1, std1, mean2, std2)]


def cirkit_integrals(mean1, std1, mean2, std2):
    """cirkit's own node: logs (F, K1·K2) -> (F, K1, K2) values."""
    node = TorchGaussianProductLogPartition((mean1.shape[1],), (std1.shape[1],), (mean2.shape[1],),
                                            (std2.shape[1],), num_folds=mean1.shape[0])
    return node(mean1, std1, mean2, std2).exp().view(mean1.shape[0], mean1.shape[1], mean2.shape[1])


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 4 * 5 * 8, 2**30])  # one fold, two folds, all at once
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, True), (True, False, True, False),
                                   (True, True, False, False)])
def test_gaussian_product_integrals_equal_cirkits_values_and_gradients(needs, chunk_bytes, monkeypatch):
    """Also when the folds are computed a chunk at a time (the last chunk shorter)."""
    monkeypatch.setattr(integrals, "CHUNK_BYTES", chunk_bytes)
    params = gaussian_parameters()
    for p, need in zip(params, needs):
        p.requires_grad_(need)
    weights = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    ref = cirkit_integrals(*params)
    v, s = gaussian_product_integrals(*params)
    assert v.shape == (3, 4, 5) and s.shape == (3,) and not s.requires_grad
    torch.testing.assert_close(v * s.exp().view(-1, 1, 1), ref, rtol=1e-12, atol=0)
    # the largest integral of each fold is the scale: entries at most 1, one of them 1
    torch.testing.assert_close(v.flatten(start_dim=1).amax(dim=1), torch.ones(3), rtol=0, atol=0)
    wanted = [p for p in params if p.requires_grad]
    expected = torch.autograd.grad((weights * ref).sum(), wanted)
    got = torch.autograd.grad((weights * v * s.exp().view(-1, 1, 1)).sum(), wanted)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_gaussian_product_integrals_pass_gradcheck():
    def represented(*params):  # the represented values: v alone moves with the (constant) scale
        v, s = gaussian_product_integrals(*params)
        return v * s.exp().view(-1, 1, 1)

    assert torch.autograd.gradcheck(represented, gaussian_parameters(folds=2, k1=2, k2=3, seed=4))


def test_gaussian_product_integrals_take_the_promoted_dtype():
    """float32 means with float64 deviations give float64 integrals (the differences of the means
    are float32 roundings: float32 agreement)."""
    mean1, std1, mean2, std2 = (t.detach() for t in gaussian_parameters())
    mean1, mean2 = mean1.float(), mean2.float()
    v, s = gaussian_product_integrals(mean1, std1, mean2, std2)
    assert v.dtype == s.dtype == torch.float64
    torch.testing.assert_close(v * s.exp().view(-1, 1, 1), cirkit_integrals(mean1.double(), std1, mean2.double(), std2),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("shapes", [[(2, 3), (2, 3), (2, 4), (2, 5)], [(2, 3), (2, 4), (2, 4), (2, 4)],
                                    [(2, 3), (2, 3), (3, 4), (3, 4)], [(2, 3, 1)] * 2 + [(2, 4, 1)] * 2])
def test_gaussian_product_integrals_refuse_mismatched_shapes(shapes):
    tensors = [torch.ones(shape) for shape in shapes]
    with pytest.raises(ValueError, match=r"means and standard deviations must be \(F, K1\), \(F, K1\), "
                                         r"\(F, K2\), \(F, K2\)"):
        gaussian_product_integrals(*tensors)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_the_partition_of_a_gaussian_squared_circuit_takes_them_and_equals_cirkits(fold, swap, monkeypatch):
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=fold, optimize=False)
    partition = ctx.compile(gaussian_symbolic()[1])
    if swap:
        swap_kronecker_sum_layers(partition, "kronecker")
    reference = copy.deepcopy(partition)
    with unclamped(reference):
        expected = reference()
    expected.real.sum().backward()
    calls = []
    original = TorchGaussianProductLogPartition.forward
    monkeypatch.setattr(TorchGaussianProductLogPartition, "forward",
                        lambda self, *a: calls.append(1) or original(self, *a))
    got = evaluate_linear_space(partition)
    assert calls == []  # the integrals never went through cirkit's logs
    torch.testing.assert_close(got.real, expected.real, rtol=1e-12, atol=1e-12)
    got.real.sum().backward()
    grads = dict(partition.named_parameters())
    count = 0
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
            count += 1
    assert count >= 2  # means and standard deviations at least
