"""The adapter's cirkit layers (adapters.cirkit.layers), float64: exact against the weights they stand for."""

from __future__ import annotations

import pytest
import torch

from cirkit.backend.torch.semiring import ComplexLSESumSemiring, LSESumSemiring, SumProductSemiring

import structlayers
from structlayers.linalg import kron_apply
from adapters.cirkit.layers import (
    TorchKroneckerSumLayer,
    TorchLiveSquareSumLayer,
    TorchStructuredSumLayer,
    apply_linear,
    kronecker_factors,
    semiring_linear,
)
from adapters.cirkit.swap import kronecker_sum_layers

from .builders import compile_pair, image_circuits

pytestmark = pytest.mark.usefixtures("float64")


def encode(semiring, v):
    """Linear values v in the semiring's encoding."""
    if semiring is SumProductSemiring:
        return v
    if semiring is LSESumSemiring:
        return torch.log(v)
    return torch.log(v.to(torch.complex128))


@pytest.mark.parametrize("semiring", [SumProductSemiring, LSESumSemiring, ComplexLSESumSemiring])
def test_semiring_linear_concatenates_inputs_unit_wise(semiring):
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(2, 3, 4, 5, generator=gen) + 0.1  # (F, H, B, Ki), positive so every semiring holds it
    w = torch.rand(2, 6, 15, generator=gen)  # (F, Ko, H*Ki)
    got = semiring_linear(semiring, lambda z: z @ w.transpose(1, 2).to(z.dtype), encode(semiring, v), w.dtype)
    z = v.permute(0, 2, 1, 3).flatten(start_dim=2)  # (F, B, H*Ki): the H inputs side by side
    ref = encode(semiring, z @ w.transpose(1, 2))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_a_real_map_acts_on_complex_inputs_part_by_part():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 7, 5, dtype=torch.complex128, generator=gen)
    w = torch.randn(2, 3, 5, generator=gen)
    calls = []

    def linear(t):
        calls.append(t.dtype)
        return t @ w.transpose(1, 2)

    got = apply_linear(linear, z, w.dtype)
    torch.testing.assert_close(got, z @ w.transpose(1, 2).to(z.dtype), rtol=1e-13, atol=1e-13)
    assert calls == [torch.float64]  # one real call over the stacked parts, never a complex product


@pytest.mark.parametrize("fold", [False, True])
def test_kronecker_layer_equals_the_materialised_weight(fold):
    ref_c, _ = compile_pair("quad-tree", "cp", "complex-lse-sum", fold, optimize=False)
    for _, layer in kronecker_sum_layers(ref_c):
        a, b = kronecker_factors(layer.weight)
        w = layer.weight()
        kron = torch.einsum("fij,fkl->fikjl", a, b).reshape(w.shape)
        torch.testing.assert_close(kron, w, rtol=1e-14, atol=0)
        new = TorchKroneckerSumLayer(layer.num_input_units, layer.num_output_units, layer.arity,
                                     weight=layer.weight, semiring=layer.semiring, num_folds=layer.num_folds)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(layer.num_folds, layer.arity, 3, layer.num_input_units, generator=gen) \
            .to(torch.complex128)
        torch.testing.assert_close(new(x), layer(x), rtol=1e-10, atol=1e-10)
        chain_a, chain_b = new.kronecker_chain()  # what a deep chain applies (adapters.cirkit.chains)
        z = torch.randn(layer.num_folds, 3, layer.num_input_units * layer.arity, generator=gen)
        torch.testing.assert_close(kron_apply(chain_a, chain_b, z), new.linear(z), rtol=1e-13, atol=1e-13)
        assert new.flops(3) == 3 * layer.num_folds * (a.shape[1] * a.shape[2] * b.shape[2]
                                                      + a.shape[1] * b.shape[1] * b.shape[2]) or \
            new.flops(3) == 3 * layer.num_folds * (b.shape[1] * b.shape[2] * a.shape[2]
                                                   + a.shape[1] * b.shape[1] * a.shape[2])


def test_layers_refuse_weights_that_do_not_fit():
    ref_c, _ = compile_pair("quad-tree", "cp", "complex-lse-sum", True, optimize=False)
    (_, layer), *_ = kronecker_sum_layers(ref_c)
    structured = structlayers.create("dense", layer.num_input_units * layer.arity, layer.num_output_units + 1,
                                     num_folds=layer.num_folds)
    with pytest.raises(ValueError, match="structured layer has"):
        TorchStructuredSumLayer(layer.num_input_units, layer.num_output_units, layer.arity,
                                structured=structured, num_folds=layer.num_folds)
    with pytest.raises(ValueError, match="live approximations support"):
        TorchLiveSquareSumLayer(layer.num_input_units, layer.num_output_units, layer.arity, weight=layer.weight,
                                kind="tt", factor_rank=1, num_folds=layer.num_folds)
    with pytest.raises(ValueError, match="expected"):
        TorchKroneckerSumLayer(layer.num_input_units + 1, layer.num_output_units, layer.arity,
                               weight=layer.weight, num_folds=layer.num_folds)
    _, _, base = image_circuits(4, "complex-lse-sum")  # c itself: plain (not Kronecker) sum weights
    plain = next(lyr for lyr in base.layers if hasattr(lyr, "weight"))
    assert kronecker_factors(plain.weight) is None
    with pytest.raises(ValueError, match="Kronecker node"):
        TorchKroneckerSumLayer(plain.num_input_units, plain.num_output_units, plain.arity,
                               weight=plain.weight, num_folds=plain.num_folds)


def test_live_square_layer_equals_the_frozen_approximation():
    ref_c, _ = compile_pair("quad-tree", "cp", "complex-lse-sum", True, optimize=False)
    for _, layer in kronecker_sum_layers(ref_c):
        a, b = kronecker_factors(layer.weight)
        if a.shape[1] < 2 or a.shape[2] < 2:
            continue
        live = TorchLiveSquareSumLayer(layer.num_input_units, layer.num_output_units, layer.arity,
                                       weight=layer.weight, kind="lowrank", factor_rank=1,
                                       semiring=layer.semiring, num_folds=layer.num_folds)
        frozen = structlayers.from_kronecker("lowrank", a.detach(), b.detach(), factor_ranks=(1, 1), square=True)
        z = torch.randn(layer.num_folds, 4, layer.num_input_units * layer.arity, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(live.linear(z), frozen(z), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kron_apply(*live.kronecker_chain(), z), frozen(z), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conjugate_left", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("kind, options", [("lowrank", {"rank": 2}), ("monarch", {"num_blocks": 2})])
def test_structured_square_layer_is_the_kronecker_square_of_its_folds(kind, options, dtype, conjugate_left):
    """TorchStructuredSquareSumLayer fold f applies conj(S_g) ⊗ S_g (or S_g ⊗ conj(S_g)) with
    g = fold_rows[f], a 3-cycle here (not its own inverse), through the thin factors (lowrank)
    or S's own forward (monarch), against the Kronecker product formed in float64."""
    from adapters.cirkit.layers import TorchStructuredSquareSumLayer

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 6, 8, dtype=dtype, generator=gen)
    s = structlayers.from_dense(kind, weight, **options)
    rows = torch.tensor([1, 2, 0])
    layer = TorchStructuredSquareSumLayer(64, 36, structured=s, fold_rows=rows, conjugate_left=conjugate_left,
                                          semiring=SumProductSemiring, num_folds=3)
    assert (layer._factors() is not None) == (kind == "lowrank")
    z = torch.randn(3, 5, 64, dtype=dtype, generator=gen)
    w = s.to_dense().detach()
    expected = torch.stack([
        z[f] @ (torch.kron(w[g].conj(), w[g]) if conjugate_left else torch.kron(w[g], w[g].conj())).T
        for f, g in enumerate(rows.tolist())])
    torch.testing.assert_close(layer.linear(z), expected, rtol=1e-12, atol=1e-12)
    chains = layer.kronecker_chain()  # through the thin factors only, in this layer's fold order
    assert (chains is not None) == (kind == "lowrank")
    if chains is not None:
        torch.testing.assert_close(kron_apply(*chains, z), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, options, one_term", [
    ("kronecker", {}, True),  # A ⊗ B itself
    ("lowrank", {"factor_ranks": (2, 2), "square": True}, True),  # Ã ⊗ conj(Ã), each a chain of two
    ("kronecker", {"rank": 2}, False),  # a sum of two Kronecker products (created): no single term
    ("lowrank", {"rank": 3}, False),  # a flat low-rank map: no Kronecker term at all
])
def test_structured_layer_kronecker_chain(kind, options, one_term):
    """kronecker_chain of a structured layer: its map as one Kronecker product of chains where
    the kind stores a single term (what a deep chain applies), else None."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    if options.get("rank") == 2:
        s = structlayers.create(kind, 16, 9, num_folds=2, dtype=torch.float64, **options)
    else:
        s = structlayers.from_kronecker(kind, a, a.conj(), **options)
    layer = TorchStructuredSumLayer(16, 9, structured=s, semiring=SumProductSemiring, num_folds=2)
    chains = layer.kronecker_chain()
    assert (chains is not None) == one_term
    if one_term:
        z = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(kron_apply(*chains, z), layer.linear(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("complex_weights", [False, True])
def test_kronecker_layer_on_factors_permutes_the_thin_factors(complex_weights):
    """linear_on_factors where A and B are the parameter tensors permuted (a squared circuit's
    layer reading c's folds in its own order): the thin factors are permuted instead, and A = B
    multiplies both factors in one product. Values and leaf gradients equal (A left, B right)
    with A and B gathered."""
    from adapters.cirkit.bench.circuits import digits_squared_circuit
    from adapters.cirkit.model import compile_density
    from adapters.cirkit.plan import kronecker_permuted_inputs

    from adapters.cirkit.layers import _thin

    # K=16 and two columns: factors thinner than the weights, so they are what moves
    model = compile_density(digits_squared_circuit(16, complex=complex_weights).circuit, dtype=torch.float64,
                            seed=0, num_categories=17)
    circuit = model.partition
    gen = torch.Generator().manual_seed(6)
    permuted = same = 0
    cycles = 0  # permutations that are not their own inverse: index and inverse cannot be confused
    for layer in [lyr for lyr in circuit.layers if isinstance(lyr, TorchKroneckerSumLayer)]:
        a, b = kronecker_factors(layer.weight)
        found = kronecker_permuted_inputs(layer.weight)
        permuted += found is not None
        cycles += found is not None and not torch.equal(found[2][found[2]], torch.arange(layer.num_folds))
        same += found is not None and found[0] is found[1]
        left = torch.randn(layer.num_folds, a.shape[2], 2, dtype=a.dtype, generator=gen)
        right = torch.randn(layer.num_folds, b.shape[2], 2, dtype=b.dtype, generator=gen)
        assert found is None or _thin(found[0], left, right)  # the permuted ones move their factors
        leaves = [p for p in layer.weight.parameters() if p.requires_grad]
        got, ref = layer.linear_on_factors(left, right), (a @ left, b @ right)
        probe = [torch.randn(t.shape, dtype=t.real.dtype, generator=gen) for t in ref]
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-13)
        g = torch.autograd.grad(sum((t.real * p).sum() for t, p in zip(got, probe)), leaves, retain_graph=True)
        r = torch.autograd.grad(sum((t.real * p).sum() for t, p in zip(ref, probe)), leaves)
        for x, y in zip(g, r):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)
    assert permuted and cycles  # the folded circuit reads some layers' weights permuted
    assert (same > 0) == (not complex_weights)  # real: B is A; complex: B = conj(A), another tensor
