"""use_structured_layers: structured layers emitted by ctx.compile, folded and optimised."""

from __future__ import annotations

import pytest
import torch

from cirkit.backend.torch.rules.layers import DEFAULT_LAYER_COMPILATION_RULES, compile_sum_layer
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.layers import SumLayer

from adapters.cirkit.accelerate import is_accelerated
from adapters.cirkit import TorchKroneckerSumLayer, TorchStructuredSumLayer, rank_policy, use_structured_layers

from .builders import compile_pair, symbolic

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("semiring", ["sum-product", "lse-sum", "complex-lse-sum"])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_compile_time_layers_match_cirkit(semiring, fold, optimize, fast):
    squared, _ = symbolic("quad-tree", "cp", semiring)
    ref_c, ref_z = compile_pair("quad-tree", "cp", semiring, fold, optimize=False)
    torch.manual_seed(0)
    ctx = use_structured_layers(PipelineContext(backend="torch", semiring=semiring, fold=fold, optimize=optimize),
                                fast=fast)
    circuit = ctx.compile(squared)
    partition = ctx.integrate(circuit)
    assert any(isinstance(m, TorchKroneckerSumLayer) for m in circuit.layers)
    assert any(isinstance(m, TorchKroneckerSumLayer) for m in partition.layers)
    assert is_accelerated(circuit) == is_accelerated(partition) == (fast and semiring != "sum-product")
    x = torch.randint(0, 3, (5, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(circuit(x), ref_c(x), rtol=1e-9, atol=1e-12)
        assert torch.allclose(partition(), ref_z(), rtol=1e-9, atol=1e-12)
    assert ctx.compile(squared) is circuit  # cached, not swapped twice
    # The rule is installed only while compiling.
    assert DEFAULT_LAYER_COMPILATION_RULES[SumLayer] is compile_sum_layer


def test_compile_time_approximation_and_training():
    squared, _ = symbolic("quad-tree", "cp", "complex-lse-sum")
    torch.manual_seed(0)
    ctx = use_structured_layers(PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True),
                                rank_policy("nystrom", 2), mode="frozen")
    circuit = ctx.compile(squared)
    partition = ctx.integrate(circuit)
    assert any(isinstance(m, TorchStructuredSumLayer) for m in circuit.layers)
    x = torch.randint(0, 3, (8, 16), generator=torch.Generator().manual_seed(4))
    params = list({id(p): p for p in [*circuit.parameters(), *partition.parameters()]}.values())
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = -(circuit(x).real[:, 0, 0] - partition().real[0, 0]).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_bad_arguments():
    with pytest.raises(TypeError, match="expected a cirkit PipelineContext, got dict"):
        use_structured_layers({})
    with pytest.raises(ValueError, match="unknown mode 'eager'"):
        use_structured_layers(PipelineContext(backend="torch"), mode="eager")
