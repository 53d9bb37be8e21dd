"""Circuit builders and the compiled model (adapters.cirkit.bench.circuits)."""

from __future__ import annotations


import pytest
import torch

from adapters.cirkit.bench.circuits import SQUARABLE_REGION_GRAPHS, SUM_PRODUCT_LAYERS, deep_cp_circuit, digits_classifier_circuit, digits_squared_circuit, one_sum_circuit, squared_weight_entries
from adapters.cirkit.bench.training import train_classifier_circuit, train_squared_circuit
from cirkit.backend.torch.layers import TorchSumLayer
from cirkit.backend.torch.parameters.nodes import TorchKroneckerParameter

from .tiny import TINY, all_states, assert_normalised, assert_square_of_base


# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize("product", ["hadamard", "kronecker"])
@pytest.mark.parametrize("complex_weights", [False, True])
def test_one_sum_circuit_is_normalised_and_has_one_kronecker_layer(product, complex_weights):
    m = one_sum_circuit(3, num_categories=3, product=product, complex=complex_weights)
    assert m.num_outputs == 3 and m.num_variables == 2 and m.is_squared
    cm = m.compile(fold=False, dtype=torch.float64, seed=0)
    assert cm.semiring == "complex-lse-sum"
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(2, 3))
    sums = [layer for layer in cm.density.layers if isinstance(layer, TorchSumLayer)]
    kron = [s for s in sums if isinstance(s.weight.outputs[0], TorchKroneckerParameter)]
    assert len(kron) == 1
    ki = 3 if product == "hadamard" else 9
    assert kron[0].weight().shape == (1, 3 * 3, ki * ki)  # (F, O², Ki²) = kron(W, W)
    # cirkit squares a Kronecker product layer into a Kronecker layer followed by a
    # constant permutation sum layer of (Ki²)² entries; a Hadamard layer needs none
    assert len(sums) == (1 if product == "hadamard" else 2)
    assert squared_weight_entries(m.circuit) == 9 * ki**2 + (0 if product == "hadamard" else 81**2)


def test_one_sum_circuit_sum_product_semiring_matches():
    m = one_sum_circuit(2, num_categories=3, num_outputs=1)
    a = m.compile("sum-product", dtype=torch.float64, seed=1)
    b = m.compile("complex-lse-sum", dtype=torch.float64, seed=1)
    x = all_states(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert_normalised(a, 3)


@pytest.mark.parametrize("region_graph", ["random-binary-tree", "linear-tree"])
def test_deep_cp_circuit_compiles_and_is_normalised(region_graph):
    m = deep_cp_circuit(6, 3, region_graph=region_graph, num_categories=2)
    assert m.num_variables == 6
    cm = m.compile(dtype=torch.float64, seed=0)
    assert_normalised(cm, 2)
    assert_square_of_base(cm, all_states(6, 2))


def test_deep_cp_circuit_depth_and_outputs():
    m = deep_cp_circuit(8, 2, depth=2, num_categories=2, num_outputs=2)  # multivariate leaves
    cm = m.compile(dtype=torch.float64, seed=0)
    assert cm.log_partition().shape == (2,)
    assert_normalised(cm, 2)
    with pytest.raises(ValueError, match=r"depth must be in \[1, 3\]"):
        deep_cp_circuit(8, 2, depth=4)
    with pytest.raises(ValueError, match="linear tree over 8 variables has depth 7"):
        deep_cp_circuit(8, 2, depth=3, region_graph="linear-tree")
    with pytest.raises(ValueError, match="unknown region graph 'quad-tree-2'"):
        deep_cp_circuit(8, 2, region_graph="quad-tree-2")


SQUARABLE = [(rg, layer) for rg in SQUARABLE_REGION_GRAPHS for layer in SUM_PRODUCT_LAYERS]


@pytest.mark.parametrize("region_graph,layer", SQUARABLE)
def test_tiny_image_squared_circuit_brute_force(region_graph, layer):
    """Σ_x c(x)²/Z = 1 over all 81 states and log c² = 2 log|c|, float64."""
    m = digits_squared_circuit(2, region_graph, layer, **TINY)
    cm = m.compile(dtype=torch.float64, seed=0)
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(4, 3))


@pytest.mark.parametrize("region_graph", ["quad-tree-2", "random-binary-tree"])
def test_tiny_image_complex_squared_circuit_brute_force(region_graph):
    m = digits_squared_circuit(2, region_graph, "cp", complex=True, **TINY)
    cm = m.compile(dtype=torch.float64, seed=0)
    assert m.complex_weights and cm.semiring == "complex-lse-sum"
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(4, 3))


def test_tiny_image_monotone_weights_in_lse_sum():
    m = digits_squared_circuit(2, weight_activation="softmax", **TINY)
    assert m.default_semiring == "lse-sum"
    cm = m.compile(dtype=torch.float64, seed=0)
    assert cm.semiring == "lse-sum"
    assert_normalised(cm, 3)
    assert_square_of_base(cm, all_states(4, 3))


@pytest.mark.parametrize("region_graph,layer", [
    ("quad-tree-2", "cp"), ("quad-tree-2", "cp-t"), ("quad-tree-2", "tucker"),
    ("quad-tree-4", "cp"), ("random-binary-tree", "cp"), ("linear-tree", "cp"),
])
def test_digits_squared_circuit_compiles_and_evaluates(region_graph, layer, digits):
    m = digits_squared_circuit(2, region_graph, layer)
    assert m.num_variables == 64 and m.num_categories == 17 and m.num_outputs == 1
    assert m.squared is not None and m.partition is not None
    assert len(m.partition.scope) == 0
    cm = m.compile(seed=0)
    x = digits.x_test[:16]
    with torch.no_grad():
        ll = cm(x)
        logz = cm.log_partition()
    assert ll.shape == (16, 1) and ll.dtype == torch.float32
    assert torch.isfinite(ll).all() and (ll < 0).all()
    assert logz.shape == (1,) and torch.isfinite(logz).all()


def test_digits_squared_circuit_is_square_of_base_float64(digits):
    cm = digits_squared_circuit(3).compile(dtype=torch.float64, seed=0)
    assert_square_of_base(cm, digits.x_test[:32])


def test_compiled_parts_share_parameters():
    m = digits_squared_circuit(2, **TINY)
    cm = m.compile(dtype=torch.float64, seed=0)
    ids = [{id(p) for p in part.parameters()} for part in (cm.base, cm.density, cm.partition)]
    assert ids[0] and ids[0] == ids[1] == ids[2]
    assert {id(p) for p in cm.parameters()} == ids[0]
    x = all_states(4, 3)
    with torch.no_grad():
        before_z, before_c = cm.log_partition().clone(), cm.log_base(x).clone()
        for p in cm.base.parameters():
            p.mul_(1.5)
        # the squared circuit and Z see the change made through the base circuit
        assert not torch.allclose(cm.log_partition(), before_z)
        assert not torch.allclose(cm.log_base(x), before_c)
    assert_normalised(cm, 3)
    assert_square_of_base(cm, x)


def test_compile_seed_is_reproducible_and_restores_rng():
    m = digits_squared_circuit(2, **TINY)
    state = torch.random.get_rng_state()
    a, b = m.compile(seed=3), m.compile(seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    c = m.compile(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_compile_in_a_given_context():
    from cirkit.pipeline import PipelineContext

    m = digits_squared_circuit(2, **TINY)
    ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=False, optimize=True)
    cm = m.compile(context=ctx, dtype=torch.float64, seed=0)
    assert cm.semiring == "complex-lse-sum"
    assert_normalised(cm, 3)
    with pytest.raises(ValueError, match="either context= or semiring"):
        m.compile("lse-sum", context=ctx)


def test_float64_parameters_and_outputs():
    cm = digits_squared_circuit(2, complex=True, **TINY).compile(dtype=torch.float64, seed=0)
    dtypes = {p.dtype for p in cm.parameters()}
    assert dtypes == {torch.float64, torch.complex128}
    assert cm.log_partition().dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32  # restored after compile / evaluation


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs,message", [
    (dict(region_graph="not-a-graph"), "unknown region graph 'not-a-graph'"),
    (dict(region_graph="quad-graph"), "'quad-graph' is not structured-decomposable"),
    (dict(region_graph="poon-domingos"), "'poon-domingos' is not structured-decomposable"),
    (dict(layer="mixture"), "unknown sum-product layer 'mixture'"),
    (dict(region_graph="quad-tree-4", layer="tucker", num_units=8), "too large to square"),
    (dict(complex=True, weight_activation="softmax"), "complex sum weights take no activation"),
    (dict(weight_activation="relu"), "unknown weight_activation 'relu'"),
])
def test_digits_squared_circuit_rejects_bad_arguments(kwargs, message):
    kwargs = {"num_units": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        digits_squared_circuit(**kwargs)


def test_semiring_checks():
    signed = digits_squared_circuit(2, **TINY)
    with pytest.raises(ValueError, match="signed real sum weights .* need semiring 'complex-lse-sum'"):
        signed.compile("lse-sum")
    with pytest.raises(ValueError, match="unknown semiring 'max-product'"):
        signed.compile("max-product")
    cplx = digits_squared_circuit(2, complex=True, **TINY)
    with pytest.raises(ValueError, match="complex sum weights need semiring 'complex-lse-sum'"):
        cplx.compile("sum-product")
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        signed.compile(dtype=torch.float16)
    with pytest.raises(ValueError, match="monotone .* needs non-negative sum weights"):
        digits_classifier_circuit(2, weight_activation="none")


def test_model_input_checks(digits):
    cm = digits_squared_circuit(2, **TINY).compile(seed=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4\)"):
        cm(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer category indices"):
        cm(torch.zeros(3, 4))
    big = digits_squared_circuit(2).compile(seed=0)
    with pytest.raises(ValueError, match=r"training data values must be in 0\.\.16"):
        train_squared_circuit(big, digits.x_train[:8] + 1, epochs=1, progress=False)


# ----------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("squared", [False, True])
def test_classifier_tiny_each_class_is_normalised(squared, shared):
    m = digits_classifier_circuit(2, squared=squared, shared=shared, num_classes=3, **TINY)
    assert m.num_outputs == 3 and m.is_squared == squared
    assert m.default_semiring == ("complex-lse-sum" if squared else "lse-sum")
    assert len(m.circuit.outputs) == (1 if shared else 3)
    cm = m.compile(dtype=torch.float64, seed=0)
    assert_normalised(cm, 3)
    if squared:  # shared: outputs y1*C + y2 of c², the diagonal is c_y(x)²
        assert_square_of_base(cm, all_states(4, 3))
    else:
        torch.testing.assert_close(cm.log_partition(), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    x = all_states(4, 3)
    with torch.no_grad():
        ll = cm(x)
    if not shared:  # independent circuits: the classes' densities differ everywhere
        assert (ll[:, 0] - ll[:, 1]).abs().min() > 0


def test_digits_classifier_circuit_trains_and_predicts(small_digits):
    cm = digits_classifier_circuit(2, region_graph="quad-graph", shared=True).compile(seed=0)
    assert cm.num_outputs == 10
    with torch.no_grad():
        assert cm(small_digits.x_test[:5]).shape == (5, 10)
    hist = train_classifier_circuit(cm, small_digits, epochs=2, batch_size=64, lr=0.1, seed=0, progress=False)
    assert len(hist.test_accuracy) == 2 and len(hist.test_nll) == 2
    assert hist.test_nll[-1] < hist.initial_test_nll
    pred = cm.predict(small_digits.x_test)
    assert pred.shape == (128,) and pred.dtype == torch.long and 0 <= int(pred.min()) <= int(pred.max()) < 10
    hist = train_classifier_circuit(cm, small_digits, epochs=1, batch_size=64, lr=0.05, seed=0,
                                      progress=False, objective="discriminative")
    assert hist.objective == "cross-entropy" and len(hist.test_accuracy) == 1
    with pytest.raises(ValueError, match="unknown objective"):
        train_classifier_circuit(cm, small_digits, epochs=1, objective="hinge")
    with pytest.raises(ValueError, match="needs labelled data"):
        train_squared_circuit(cm, small_digits.x_train, epochs=1, progress=False)
