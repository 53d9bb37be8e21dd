"""Deep chains of one-fold layers in one autograd node (adapters.cirkit.chains).

float64. A chain computes what the layer rules compute, in the same order: its values are
the step-by-step evaluation's to the last bit for the exact Kronecker layer, and the
gradients within rounding (the order in which a parameter's contributions are added may
differ). Each case checks that the chain actually ran."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from adapters.cirkit import chains, linear_space, square_policy, swap_kronecker_sum_layers
from adapters.cirkit.bench.circuits import deep_cp_circuit, digits_squared_circuit
from adapters.cirkit.chains import ChainLink, run_chain
from adapters.cirkit.model import compile_density
from adapters.cirkit.scaling import _Unmeasured, normalise
from adapters.cirkit.structured import approximate_density, compile_structured, structure_policy
from structlayers.linalg import kron_apply

pytestmark = pytest.mark.usefixtures("float64")

DEPTH = 8


def linear_tree(complex_weights=False, units=3):
    return deep_cp_circuit(DEPTH, units, region_graph="linear-tree", complex=complex_weights).circuit


def density(kind: str):
    """A deep narrow squared circuit whose Z has one-fold sum layers of the given sort."""
    if kind == "structured lowrank":  # c's layers a structured kind, squared through its thin factors
        model, _ = compile_structured(linear_tree(), structure_policy("lowrank", rank=2), dtype=torch.float64,
                                      seed=3, num_categories=2)
        return model
    model = compile_density(linear_tree(kind == "complex weights"), dtype=torch.float64, seed=3, num_categories=2)
    if kind == "frozen lowrank square":
        swap_kronecker_sum_layers([model.density, model.partition], square_policy("lowrank", 2))
    elif kind == "kronecker kind":  # structlayers' exact Kronecker kind (one Kronecker term)
        swap_kronecker_sum_layers([model.density, model.partition], "kronecker")
    elif kind == "live lowrank square":
        approximate_density(model, square_policy("lowrank", 2))
    return model


KINDS = ["exact", "complex weights", "frozen lowrank square", "kronecker kind", "live lowrank square",
         "structured lowrank"]


def counting(monkeypatch):
    """Count the chains that ran (the evaluator's chain step returning a value)."""
    ran = []
    original = linear_space._run_chain

    def counted(*args):
        out = original(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(linear_space, "_run_chain", counted)
    return ran


def log_z_and_gradients(model):
    params = [p for p in model.parameters() if p.requires_grad]
    logz = model.log_partition(cached=False).sum()
    grads = torch.autograd.grad(logz, params, allow_unused=True)  # a swap leaves c's parameters out of Z
    return logz.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_chains_are_found_where_layers_have_one_fold():
    plan = linear_space.circuit_plan(density("exact").partition)
    (links,) = plan.chains.values()  # one chain: every product -> sum pair above the first
    assert len(links) == DEPTH - 1
    # exact layers have no inner units: the chain reads its operands multiplied out, as the
    # layers do, so none of them is kept as factors only
    assert not plan.inner_chains
    assert all(plan.steps[source].dense_needed for link in links for source, _ in link.outside)
    assert links[0].carried is None and all(link.carried is not None for link in links[1:])
    assert all(links[k + 1].product == links[k].total + 1 for k in range(len(links) - 1))
    wide = compile_density(digits_squared_circuit(3, image_shape=(2, 2), num_categories=2).circuit,
                           dtype=torch.float64, seed=0, num_categories=2)
    assert linear_space.circuit_plan(wide.partition).chains == {}  # a quad tree's layers have several folds
    # at data the products keep rank-1 factors per sample (far cheaper than a chain's blocks)
    assert linear_space.circuit_plan(density("exact").density).chains == {}


@pytest.mark.parametrize("kind", KINDS)
def test_a_chain_equals_the_layers_one_by_one(kind, monkeypatch):
    model = density(kind)
    plan = linear_space.circuit_plan(model.partition)
    assert plan.chains
    ran = counting(monkeypatch)
    logz, grads = log_z_and_gradients(model)
    assert ran == [True]
    monkeypatch.setattr(plan, "chains", {})
    ref_logz, ref_grads = log_z_and_gradients(model)
    assert ran == [True]  # the reference ran without it
    if kind == "exact":
        assert torch.equal(logz, ref_logz)
    torch.testing.assert_close(logz, ref_logz, rtol=1e-14, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def test_a_chain_rescales_as_the_layers_do(monkeypatch):
    """Weights scaled so that every sum's output leaves [2^-16, 2^16]: each link divides by
    its largest entry, as normalise does."""
    model = density("exact")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3 and p.shape[-1] == p.shape[-2]:  # the sum weights
                p.mul_(300.0)
    divisors = []
    original = chains.rescale

    def recorded(*args, **kwargs):
        out = original(*args, **kwargs)
        if out[2] is not None:
            divisors.append(out[2])
        return out

    monkeypatch.setattr(chains, "rescale", recorded)
    logz, grads = log_z_and_gradients(model)
    assert len(divisors) >= DEPTH // 2 and all(isinstance(d, float) and d > 2.0**16 for d in divisors)
    monkeypatch.setattr(linear_space.circuit_plan(model.partition), "chains", {})
    ref_logz, ref_grads = log_z_and_gradients(model)
    assert torch.equal(logz, ref_logz)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ run_chain on its own
class _Map:
    """A one-fold layer whose map is A ⊗ B (what run_chain asks of a sum layer)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def kronecker_chain(self):
        return [self.a], [self.b]


def _links(dtype, n=3, k=3, generator=None, scale=1.0):
    """n links over k x k blocks: an outside operand each (two for the first link)."""
    g = generator or torch.Generator().manual_seed(0)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        if dtype.is_complex:
            t = torch.complex(t, torch.randn(*shape, generator=g, dtype=torch.float64))
        return t.to(dtype)

    mats = [(rand(1, k, k) * scale, rand(1, k, k) * scale) for _ in range(n)]
    operands = [rand(1, 1, k * k) for _ in range(n + 1)]
    scales = [torch.full((1, 1), 0.25 * i, dtype=torch.float64) for i in range(n + 1)]
    return mats, operands, scales


def _chain(mats, operands, scales):
    links = [(ChainLink(2 * i, 2 * i + 1, None if i == 0 else 1, ((0, 0), (0, 1)) if i == 0 else ((0, i + 1),)),
              [(operands[0], scales[0]), (operands[1], scales[1])] if i == 0 else [(operands[i + 1], scales[i + 1])],
              _Map(a, b), False) for i, (a, b) in enumerate(mats)]
    return run_chain(links)


def _one_by_one(mats, operands, scales):
    """The layer rules' arithmetic: product, then A X Bᵀ, then normalise after an unmeasured product."""
    v, s = operands[0] * operands[1], scales[0] + scales[1]
    for i, (a, b) in enumerate(mats):
        if i:
            v, s = operands[i + 1] * v, scales[i + 1] + s
        v, s = normalise(kron_apply([a], [b], v), s, after_unmeasured=True)
    return v, s


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_run_chain_values_and_gradcheck(dtype, scale):
    mats, operands, scales = _links(dtype, scale=scale)
    v, s = _chain(mats, operands, scales)
    ref_v, ref_s = _one_by_one(mats, operands, scales)
    torch.testing.assert_close(v, ref_v, rtol=1e-14, atol=0)
    torch.testing.assert_close(s, ref_s, rtol=1e-14, atol=0)
    assert (scale > 1) == bool(s.item() > scales[-1].item() + 10)  # large weights: rescaled links

    def value(*tensors):
        n = len(mats)
        ms = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(n)]
        v, s = _chain(ms, list(tensors[2 * n:]), scales)
        # log |value represented| (the scale a constant to autograd): entries of very different
        # sizes leave finite differences of the value itself at the mercy of rounding
        return torch.log(v.abs()) + s.unsqueeze(-1)

    inputs = [t.clone().requires_grad_() for pair in mats for t in pair] + \
             [t.clone().requires_grad_() for t in operands]
    assert torch.autograd.gradcheck(value, inputs)


def test_run_chain_gradients_of_some_inputs_only():
    mats, operands, scales = _links(torch.float64)
    weight = mats[1][0].clone().requires_grad_()
    operand = operands[2].clone().requires_grad_()
    mats[1] = (weight, mats[1][1])
    operands[2] = operand
    v, _ = _chain(mats, operands, scales)
    got = torch.autograd.grad(v.sum(), (weight, operand))
    ref_v, _ = _one_by_one(mats, operands, scales)
    ref = torch.autograd.grad(ref_v.sum(), (weight, operand))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=0)


def test_a_flushed_link_sends_the_evaluation_to_the_measured_path(monkeypatch):
    """A sum after an unmeasured product that comes out below sqrt(tiny) raises, as the
    layer rules do; the evaluation then runs once more with every product measured (no
    chains) and gives the same value."""
    mats, operands, scales = _links(torch.float32)
    operands[1] = operands[1] * 1e-25  # the first product ~1e-25: below sqrt(tiny) = 1.1e-19
    with pytest.raises(_Unmeasured):
        _chain(mats, operands, scales)
    with pytest.raises(_Unmeasured):
        _one_by_one(mats, operands, scales)
    model = density("exact")
    ref = model.log_partition(cached=False).detach()
    calls = []

    def flushed(links, factors=None):
        calls.append(len(links))
        raise _Unmeasured

    monkeypatch.setattr(linear_space, "run_chain", flushed)
    torch.testing.assert_close(model.log_partition(cached=False).detach(), ref, rtol=1e-12, atol=0)
    assert calls == [DEPTH - 1]  # once; the measured evaluation takes no chain


def test_run_chain_declines_what_it_does_not_compute():
    mats, operands, scales = _links(torch.float64)
    assert _chain(mats, operands, [s.requires_grad_() for s in scales]) is None  # scales with gradients
    mats, operands, scales = _links(torch.float64)
    assert _chain(mats, [operands[0].expand(1, 2, -1), *operands[1:]], scales) is None  # two samples
    assert _chain(mats, [operands[0].to(torch.float32), *operands[1:]], scales) is None  # mixed dtypes
    assert _chain([(a, b[:, :, :2]) for a, b in mats], operands, scales) is None  # blocks that do not fit

    class NoTerm:
        def kronecker_chain(self):
            return None

    links = [(ChainLink(0, 1, None, ((0, 0), (0, 1))), [(operands[0], scales[0]), (operands[1], scales[1])],
              NoTerm(), False)]
    assert run_chain(links) is None
    assert math.isclose(float(_one_by_one(mats, operands, scales)[1]), float(_chain(mats, operands, scales)[1]))


# ------------------------------------------------------------------ through the inner units
class _Chained:
    """A one-fold layer whose map is given by its Kronecker chains (``kronecker_chain``)."""

    def __init__(self, chain_a, chain_b):
        self.chain = (list(chain_a), list(chain_b))

    def kronecker_chain(self):
        return self.chain


def _inner_case(dtype, n=5, k=6, r=2, v=2, last=True, scale=1.0, seed=0):
    """n links over k x k blocks whose maps are L R per side (r inner units), the last one a
    single matrix per side (2 x k) where ``last``; the first link's two operands and every
    later one's operand given as factors (k, v) with a log-scale each."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        if dtype.is_complex:
            t = torch.complex(t, torch.randn(*shape, generator=g, dtype=torch.float64))
        return t.to(dtype)

    maps = [([rand(1, k, r) * scale, rand(1, r, k)], [rand(1, k, r) * scale, rand(1, r, k)]) for _ in range(n - last)]
    if last:
        maps.append(([rand(1, 2, k)], [rand(1, 2, k)]))
    lefts, rights = rand(n + 1, k, v), rand(n + 1, k, v)
    scales = torch.linspace(-1.0, 2.0, n + 1, dtype=torch.float64).unsqueeze(-1)
    return maps, lefts, rights, scales


def _inner_links_of(maps, lefts, rights, scales, dense_first=False):
    def block(row):  # the operand's block multiplied out, normalised as the evaluator keeps values
        return normalise((lefts[row] @ rights[row].transpose(-1, -2)).reshape(1, 1, -1), scales[row:row + 1])

    def factors(row):
        return chains.OperandFactors(lefts, rights, scales, row)

    links, fs = [], []
    for i, (chain_a, chain_b) in enumerate(maps):
        rows = (0, 1) if i == 0 else (i + 1,)
        links.append((ChainLink(2 * i, 2 * i + 1, None if i == 0 else 1, tuple((0, r) for r in rows)),
                      [block(r) for r in rows], _Chained(chain_a, chain_b), False))
        fs.append([None if (dense_first and i == 0) else factors(r) for r in rows])
    return links, fs


def _inner_reference(maps, lefts, rights, scales):
    """log of the last block, from the blocks multiplied out in float64/complex128, no scaling."""
    def block(row):
        return lefts[row] @ rights[row].transpose(-1, -2) * torch.exp(scales[row])

    def matrix(chain):
        return functools.reduce(torch.matmul, [m[0] for m in chain])

    x = block(0) * block(1)
    for i, (chain_a, chain_b) in enumerate(maps):
        if i:
            x = x * block(i + 1)
        x = matrix(chain_a) @ x @ matrix(chain_b).transpose(-1, -2)
    return torch.log(x.reshape(-1).to(torch.complex128))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("last", [True, False])
@pytest.mark.parametrize("dense_first", [False, True])
def test_inner_chain_values_and_gradcheck(dtype, last, dense_first, monkeypatch):
    ran = []
    original = chains._inner_chain
    monkeypatch.setattr(chains, "_inner_chain", lambda *a: ran.append(a[2]) or original(*a))
    maps, lefts, rights, scales = _inner_case(dtype, last=last)
    links, fs = _inner_links_of(maps, lefts, rights, scales, dense_first)
    v, s = run_chain(links, fs)
    assert len(ran) == 1 and ran[0].taken == len(maps) and ran[0].first_factored == (not dense_first)
    assert (ran[0].last is not None) == last
    got = torch.log(v.reshape(-1).to(torch.complex128)) + s.reshape(-1)
    ref = _inner_reference(maps, lefts, rights, scales)
    # logs of complex values: compare the values (the imaginary parts are defined modulo 2π)
    torch.testing.assert_close(torch.exp(got - ref.real.max()), torch.exp(ref - ref.real.max()), rtol=1e-12, atol=1e-13)

    def value(lefts_, rights_, *mats):
        it = iter(mats)
        ms = [([next(it) for _ in a], [next(it) for _ in b]) for a, b in maps]
        links_, fs_ = _inner_links_of(ms, lefts_, rights_, scales, dense_first)
        v_, s_ = run_chain(links_, fs_)
        return torch.log(v_.abs()) + s_.unsqueeze(-1)

    inputs = [lefts.clone().requires_grad_(), rights.clone().requires_grad_(),
              *(m.clone().requires_grad_() for a, b in maps for m in (*a, *b))]
    assert torch.autograd.gradcheck(value, inputs)


def test_inner_chain_rescales_every_link():
    """Large weights: each link's inner block is divided by its peak; the value is the
    unscaled product's."""
    maps, lefts, rights, scales = _inner_case(torch.float64, n=8, scale=40.0)
    v, s = run_chain(*_inner_links_of(maps, lefts, rights, scales))
    ref = _inner_reference(maps, lefts, rights, scales)
    assert float(s.max()) > 60  # far outside what float64 values alone would hold unscaled at float32
    torch.testing.assert_close(torch.log(v.abs().reshape(-1)) + s.reshape(-1), ref.real, rtol=1e-12, atol=1e-12)


def test_inner_chain_is_declined_where_it_does_not_pay_or_fit(monkeypatch):
    ran = []
    original = chains._inner_chain
    monkeypatch.setattr(chains, "_inner_chain", lambda *a: ran.append(True) or original(*a))
    # r = 5 of k = 6 inner units: the V-fold operators cost more than the blocks
    maps, lefts, rights, scales = _inner_case(torch.float64, r=5, last=False)
    links, fs = _inner_links_of(maps, lefts, rights, scales)
    out = run_chain(links, fs)
    assert not ran and out is not None  # the blocks' chain instead
    # a later operand without factors: the links before it go inner, the rest as blocks
    maps, lefts, rights, scales = _inner_case(torch.float64, last=False)
    links, fs = _inner_links_of(maps, lefts, rights, scales)
    fs[2] = [None]
    assert chains._inner_links(links, fs).taken == 2
    v, s = run_chain(links, fs)
    torch.testing.assert_close(torch.log(v.abs().reshape(-1)) + s.reshape(-1),
                               _inner_reference(maps, lefts, rights, scales).real, rtol=1e-12, atol=1e-12)
    fs[1] = [None]  # one link before it: too few
    ran.clear()
    assert run_chain(links, fs) is not None and not ran
    # mixed dtypes
    links, fs = _inner_links_of(maps, lefts, rights, scales)
    fs[3] = [fs[3][0]._replace(right=rights.to(torch.float32))]
    assert chains._inner_links(links, fs) is None


def test_inner_chain_with_a_flushed_link_raises():
    """A peak below sqrt(tiny) sends the evaluation to the measured path, as the blocks do."""
    maps, lefts, rights, scales = _inner_case(torch.float32, n=4, last=False)
    maps[2][0][1] = maps[2][0][1] * 1e-25  # the third link's inner block ~1e-25
    with pytest.raises(_Unmeasured):
        run_chain(*_inner_links_of(maps, lefts, rights, scales))


@pytest.mark.parametrize("complex_weights", [False, True])
@pytest.mark.parametrize("policy", ["frozen", "live"])
def test_a_lowrank_deep_circuit_runs_through_the_inner_units(complex_weights, policy, monkeypatch):
    """Z of a deep narrow circuit whose layers are rank-2 squares over 8 units: the chain
    runs through the inner units from the integrals' factors (nothing multiplied out on the
    way) and gives the layers' values and gradients."""
    model = compile_density(deep_cp_circuit(DEPTH, 8, region_graph="linear-tree", complex=complex_weights).circuit,
                            dtype=torch.float64, seed=3, num_categories=2)
    if policy == "frozen":
        swap_kronecker_sum_layers([model.density, model.partition], square_policy("lowrank", 2))
    else:
        approximate_density(model, square_policy("lowrank", 2))
    assert linear_space.circuit_plan(model.partition).inner_chains
    plans = []
    original = chains._inner_chain
    monkeypatch.setattr(chains, "_inner_chain", lambda *a: plans.append(a[2]) or original(*a))
    multiplied = []
    dense = linear_space._dense_blocks
    monkeypatch.setattr(linear_space, "_dense_blocks", lambda b: multiplied.append(b) or dense(b))
    operators = []
    transfer = chains._Transfer.apply
    monkeypatch.setattr(chains._Transfer, "apply", lambda m, p, q: operators.append((p, q)) or transfer(m, p, q))
    logz, grads = log_z_and_gradients(model)
    assert len(plans) == 1 and plans[0].taken == DEPTH - 1 and plans[0].first_factored
    assert plans[0].last is not None  # the root: one matrix per side
    assert not multiplied
    # a real circuit: one tensor of factors and one map on both sides, so Q is P (built once)
    (p, q), = operators
    assert (q.data_ptr() == p.data_ptr()) == (not complex_weights)
    monkeypatch.setattr(linear_space.circuit_plan(model.partition), "chains", {})
    ref_logz, ref_grads = log_z_and_gradients(model)
    torch.testing.assert_close(logz, ref_logz, rtol=1e-13, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-11, atol=1e-13)
