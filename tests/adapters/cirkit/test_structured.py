"""Structured circuits (adapters.cirkit.structured): every registered kind as c's sum layers,
squared and integrated through the kind's own forward, against the dense circuit holding
its to_dense() weights (float64, folded, real and complex)."""

from __future__ import annotations

import itertools

import pytest
import torch

import structlayers
from adapters.cirkit.bench.circuits import digits_squared_circuit
from adapters.cirkit.internals import node_tensor
from adapters.cirkit.layers import TorchStructuredSquareSumLayer, TorchStructuredSumLayer
from adapters.cirkit.model import compile_density
from adapters.cirkit.structured import compile_structured, structure_policy

from ...kind_specs import SPECS

pytestmark = pytest.mark.usefixtures("float64")

V = 3


def spec_policy(kind):
    """Each layer gets the kind with the first option set of its spec entry (exact there)."""

    def policy(info):
        if min(info.out_features, info.in_features) < 2:
            return None
        w = torch.zeros(info.num_folds, info.out_features, info.in_features, dtype=info.dtype)
        return kind, SPECS[kind]["full_dense"](w)[0]

    return policy


def circuit(complex_weights: bool, units: int = 4, layer: str = "cp"):
    return digits_squared_circuit(units, image_shape=(2, 2), num_categories=V, complex=complex_weights,
                                  layer=layer).circuit


def dense_twin(model, c, seed):
    """The dense circuit compiled like ``model`` whose weights are the structured layers' to_dense()."""
    ref = compile_density(c, dtype=torch.float64, seed=seed, num_categories=V, optimize=False)
    pairs = []
    with torch.no_grad():
        for lr, ls in zip(ref.base.layers, model.base.layers):
            if isinstance(ls, TorchStructuredSumLayer):
                leaf = node_tensor(lr.weight.nodes[0])
                leaf.copy_(ls.structured.to_dense())
                pairs.append((leaf, ls.structured))
    return ref, pairs


@pytest.mark.parametrize("layer", ["cp", "cp-t"])
@pytest.mark.parametrize("complex_weights", [False, True])
@pytest.mark.parametrize("kind", structlayers.available())
def test_every_kind_equals_the_dense_circuit_of_its_to_dense(kind, complex_weights, layer):
    c = circuit(complex_weights, layer=layer)
    model, report = compile_structured(c, spec_policy(kind), dtype=torch.float64, seed=1, num_categories=V)
    assert report.rows and all(r.squared_layers == 2 for r in report.rows)  # one layer in |c|², one in Z
    assert any(isinstance(layer, TorchStructuredSquareSumLayer) for layer in model.partition.layers)
    assert_equals_dense_twin(model, c, kind, seed=1)


@pytest.mark.parametrize("complex_weights", [False, True])
@pytest.mark.parametrize("kind", ["lowrank", "nystrom"])
def test_thin_factors_square_through_an_r_by_r_block(kind, complex_weights):
    """S = L R of rank 1 on 4 units: the squares go R on both sides, then L (fewer multiply-adds
    than S's forward twice), with the values and gradients of the dense circuit."""
    c = circuit(complex_weights)
    model, _ = compile_structured(c, structure_policy(kind, rank=1), dtype=torch.float64, seed=4, num_categories=V)
    squares = [layer for layer in model.partition.layers if isinstance(layer, TorchStructuredSquareSumLayer)]
    assert squares and all(layer._factors() is not None for layer in squares)
    assert all(layer.flops(1) < layer._generic_macs(1) for layer in squares)
    assert_equals_dense_twin(model, c, kind, seed=4)


def assert_equals_dense_twin(model, c, kind, seed):
    """log p(x) over every state, |c|²(x), Z and the gradients of ``model`` equal those of the
    dense circuit holding its structured layers' to_dense() weights (float64)."""
    ref, pairs = dense_twin(model, c, seed=seed)
    x = torch.tensor(list(itertools.product(range(V), repeat=4)))
    ll, ref_ll = model.log_likelihood(x), ref.log_likelihood(x)
    torch.testing.assert_close(ll, ref_ll, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(model.log_density(x), ref.log_density(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(model.log_partition(), ref.log_partition(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.logsumexp(ll, 0), torch.zeros(1, dtype=torch.float64), atol=1e-9, rtol=0)
    # gradients: the structured parameters' equal the dense weights' pulled back through to_dense()
    ll.sum().backward()
    ref_ll.sum().backward()
    for leaf, s in pairs:
        params = [p for p in s.parameters() if p.requires_grad]
        pulled = torch.autograd.grad(s.to_dense(), params, grad_outputs=leaf.grad, allow_unused=True)
        for p, g in zip(params, pulled):
            expected = g if g is not None else torch.zeros_like(p)
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9, msg=f"{kind}: {p.shape}")


def test_parameters_are_shared_by_the_three_circuits():
    model, _ = compile_structured(circuit(False), structure_policy("lowrank", rank=2), dtype=torch.float64,
                                  seed=2, num_categories=V)
    x = torch.randint(0, V, (8, 4), generator=torch.Generator().manual_seed(0))
    shared = {id(layer.structured) for layer in model.base.layers if isinstance(layer, TorchStructuredSumLayer)}
    for c in (model.density, model.partition):
        used = {id(layer.structured) for layer in c.layers if isinstance(layer, TorchStructuredSquareSumLayer)}
        assert used == shared
    with torch.no_grad():
        before = model.log_partition().clone()
    opt = torch.optim.SGD([p for m in model.base.layers if isinstance(m, TorchStructuredSumLayer)
                           for p in m.parameters()], lr=0.1)
    (-model.log_base(x).real.sum()).backward()  # a step on c alone...
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model.log_partition(), before)  # ...moves Z
        states = torch.tensor(list(itertools.product(range(V), repeat=4)))
        total = torch.logsumexp(model.log_likelihood(states)[:, 0], 0)
    assert abs(float(total)) < 1e-10  # still normalised: c, |c|² and Z follow the same S


def test_trains_and_stays_normalised():
    model, report = compile_structured(circuit(False, units=6), structure_policy("lowrank", rank=2),
                                       dtype=torch.float64, seed=3, num_categories=V)
    assert report.params < sum(r.dense_params for r in report.rows) + sum(
        i.num_folds * i.out_features * i.in_features for i in report.kept)
    x = torch.randint(0, V, (64, 4), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(10):
        loss = -model.log_likelihood(x).mean()
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first
    states = torch.tensor(list(itertools.product(range(V), repeat=4)))
    with torch.no_grad():
        assert abs(float(torch.logsumexp(model.log_likelihood(states)[:, 0], 0))) < 1e-10


def test_bad_structuring_is_named():
    c = circuit(False)
    with pytest.raises(ValueError, match="cannot structure layer .* as 'lowrank'"):
        compile_structured(c, lambda info: ("lowrank", {"rank": 99}), dtype=torch.float64, seed=0, num_categories=V)
    with pytest.raises(ValueError, match="optimize=False"):
        compile_structured(c, "dense", optimize=True)
    # optimize=True fuses c's deeper CP blocks: the plain sum layers are structured, the fused
    # ones stay dense with their dense squares, and the model stays one normalised density
    from adapters.cirkit.structured import structure_density

    model = compile_density(c, dtype=torch.float64, seed=0, num_categories=V)
    structure_density(model, structure_policy("lowrank", rank=2))
    states = torch.tensor(list(itertools.product(range(V), repeat=4)))
    with torch.no_grad():
        assert abs(float(torch.logsumexp(model.log_likelihood(states)[:, 0], 0))) < 1e-10
    with pytest.raises(TypeError, match="squared CircuitDensity"):
        structure_density(torch.nn.Linear(2, 2), "dense")


@pytest.mark.parametrize("kind", ["lowrank", "nystrom"])
def test_live_approximations_of_c_and_its_square_stay_one_normalised_model(kind):
    """square_policy applied to c, |c|² and Z alike: likelihoods through c̃ equal those through
    c̃², the model sums to one, and it still does after SGD steps on W through the approximation."""
    from adapters.cirkit.layers import TorchLiveApproxSumLayer
    from adapters.cirkit.structured import approximate_density
    from adapters.cirkit.swap import square_policy

    model = compile_density(circuit(False, units=4), dtype=torch.float64, seed=5, num_categories=V, optimize=False)
    approximate_density(model, square_policy(kind, 2))
    assert any(isinstance(layer, TorchLiveApproxSumLayer) for layer in model.base.layers) and model.through_base
    states = torch.tensor(list(itertools.product(range(V), repeat=4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        ll = model.log_likelihood(states)
        with torch.no_grad():
            through_square = model.log_density(states) - model.log_partition()
        torch.testing.assert_close(ll.detach(), through_square, rtol=1e-9, atol=1e-9)
        assert abs(float(torch.logsumexp(ll.detach()[:, 0], 0))) < 1e-9, step
        opt.zero_grad()
        (-ll[:20].mean()).backward()
        opt.step()
    with pytest.raises(ValueError, match="deterministic pivot strategy"):
        other = compile_density(circuit(False), dtype=torch.float64, seed=5, num_categories=V, optimize=False)
        approximate_density(other, square_policy("nystrom", 2, strategy="uniform"))


def test_a_copy_of_an_approximated_model_still_goes_through_c():
    """A deep copy of a model approximated in c, |c|² and Z alike keeps scoring through c̃: the
    mark that c̃ follows the squares survives the copy (through |c̃|² at data, a K=256 digits
    batch needs tens of GiB)."""
    import copy

    from adapters.cirkit.structured import approximate_density
    from adapters.cirkit.swap import square_policy

    model = compile_density(circuit(False, units=4), dtype=torch.float64, seed=5, num_categories=V, optimize=False)
    approximate_density(model, square_policy("lowrank", 2))
    x = torch.tensor(list(itertools.product(range(V), repeat=4)))[:20]
    twin = copy.deepcopy(model)
    assert twin.through_base
    torch.testing.assert_close(twin.log_likelihood(x), model.log_likelihood(x), rtol=1e-12, atol=1e-12)
    assert all(a is not b for a, b in zip(twin.density.layers, model.density.layers))


@pytest.mark.parametrize("kind", structlayers.available())
def test_every_kind_trains_as_a_circuit_layer_and_stays_normalised(kind):
    """Adam steps on a circuit whose sum layers are ``kind`` (real weights): finite losses, the
    parameters move, and the density still sums to one over every state."""
    model, _ = compile_structured(circuit(False), spec_policy(kind), dtype=torch.float64, seed=6, num_categories=V)
    states = torch.tensor(list(itertools.product(range(V), repeat=4)))
    x = states[torch.randint(0, len(states), (32,), generator=torch.Generator().manual_seed(2))]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(3):
        loss = -model.log_likelihood(x).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():
        assert abs(float(torch.logsumexp(model.log_likelihood(states)[:, 0], 0))) < 1e-9


def _marginals_with_one_mask(model, masks_per_row: bool):
    """Marginals of a copy of ``model`` (6 rows of a 4x4 image, its last column integrated out of
    every row: ``(D,)``, or the same mask given per row ``(B, D)``) and their gradients. The left
    2x2 patches are observed, the right ones mixed: layers compute some of their folds."""
    import copy

    model = copy.deepcopy(model)
    x = torch.randint(0, V, (6, 16), generator=torch.Generator().manual_seed(3))
    observed = torch.arange(16) % 4 != 3
    logp = model.log_marginal(x, observed.expand(x.shape[0], -1) if masks_per_row else observed)
    logp.sum().backward()
    return logp.detach(), [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind,build", [(kind, "every kind") for kind in structlayers.available()]
                         + [(kind, build) for kind in ("lowrank", "nystrom") for build in ("thin squares", "live", "frozen swap")])
def test_marginals_with_one_mask_for_every_row_take_fold_subsets(kind, build, monkeypatch):
    """With the same pixels integrated out of every row, only folds over observed and integrated
    pixels are computed per row (CircuitPlan.run_shared_mask, forced on here): a structured
    layer computes only those of its folds where it declares ``fold_subsets`` (a square of
    thin factors, Kronecker terms, live approximations), else all of them. Marginals and
    gradients equal those of the same mask per row, for every kind as c's layers
    (compile_structured, exact options), low-rank squares through thin factors, live square
    approximations of c, |c|² and Z, and frozen swaps."""
    from adapters.cirkit import linear_space, swap_kronecker_sum_layers
    from adapters.cirkit.structured import approximate_density
    from adapters.cirkit.swap import square_policy

    c = digits_squared_circuit(4, image_shape=(4, 4), num_categories=V).circuit  # several mixed folds per layer
    if build in ("every kind", "thin squares"):
        policy = spec_policy(kind) if build == "every kind" else structure_policy(kind, rank=2)
        model, _ = compile_structured(c, policy, dtype=torch.float64, seed=1, num_categories=V)
    else:
        model = compile_density(c, dtype=torch.float64, seed=5, num_categories=V, optimize=False)
        if build == "live":
            approximate_density(model, square_policy(kind, 2))
        else:
            swap_kronecker_sum_layers(model.density, square_policy(kind, 2))
    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 0)
    subsets = []
    original = linear_space._takes_fold_subsets
    monkeypatch.setattr(linear_space, "_takes_fold_subsets",
                        lambda step: subsets.append((type(step.layer).__name__, original(step))) or subsets[-1][1])
    shared, per_row = _marginals_with_one_mask(model, False), _marginals_with_one_mask(model, True)
    torch.testing.assert_close(shared[0], per_row[0], rtol=1e-10, atol=1e-12)
    assert len(shared[1]) == len(per_row[1]) > 0
    for a, b in zip(shared[1], per_row[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    structured = {name: taken for name, taken in subsets if "Structured" in name or "Live" in name}
    assert structured  # the mixed folds reached a structured layer
    if build != "every kind":  # thin squares, live approximations and Kronecker terms take fold subsets
        assert all(structured.values())
