"""CircuitDensity (adapters.cirkit.model): likelihoods through c, log Z cache, marginals,
conditionals and exact samples, against brute-force enumeration on tiny circuits (float64)."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch

from cirkit.symbolic.layers import CategoricalLayer
from cirkit.templates.region_graph import QuadTree, RandomBinaryTree
from cirkit.templates.utils import Parameterization, parameterization_to_factory

from cirkit.backend.torch.layers import TorchInputLayer

from adapters.cirkit import cirkit_evaluation, compile_density, swap_kronecker_sum_layers, square_policy
from adapters.cirkit.model import _integrate_layer_fn

pytestmark = pytest.mark.usefixtures("float64")

V = 3  # categories of the tiny circuits


def tiny_circuit(units: int = 3, *, complex_weights: bool = False, side: int = 2, categories: int = V,
                 classes: int = 1):
    weights = Parameterization(activation="none", initialization="normal",
                               dtype="complex" if complex_weights else "real")
    return QuadTree((1, side, side), num_patch_splits=2).build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=categories),
        sum_product="cp", sum_weight_factory=parameterization_to_factory(weights),
        num_input_units=units, num_sum_units=units, num_classes=classes)


def states(d: int, v: int = V) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(v), repeat=d)))


@pytest.fixture(params=["real", "complex"])
def tiny(request):
    c = tiny_circuit(complex_weights=request.param == "complex")
    return compile_density(c, dtype=torch.float64, seed=0, num_categories=V)


@pytest.mark.parametrize("evaluation", ["linear", "semiring"])
def test_likelihood_through_c_equals_the_squared_circuit(tiny, evaluation):
    tiny.evaluation = evaluation
    x = states(4)
    with torch.no_grad():
        through_c = tiny.log_likelihood(x)
        through_c2 = tiny.log_density(x) - tiny.log_partition()
    torch.testing.assert_close(through_c, through_c2, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(torch.logsumexp(through_c, 0), torch.zeros(1, dtype=torch.float64), atol=1e-11, rtol=0)


def test_multi_output_likelihoods_through_c():
    model = compile_density(tiny_circuit(classes=3), dtype=torch.float64, seed=1, num_categories=V)
    x = states(4)
    with torch.no_grad():
        ll = model.log_likelihood(x)
        ref = model.log_density(x) - model.log_partition()
    assert ll.shape == (x.shape[0], 3)
    torch.testing.assert_close(ll, ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(torch.logsumexp(ll, 0), torch.zeros(3, dtype=torch.float64), atol=1e-11, rtol=0)


def test_swapped_layers_and_both_evaluations_agree():
    model = compile_density(tiny_circuit(units=4), dtype=torch.float64, seed=2, num_categories=V)
    swapped = copy.deepcopy(model)
    swap_kronecker_sum_layers([swapped.density, swapped.partition], square_policy("lowrank", 2))
    x = states(4)
    with torch.no_grad():
        for m in (model, swapped):
            for evaluation in ("linear", "semiring"):
                m.evaluation = evaluation
                torch.testing.assert_close(torch.logsumexp(m.log_density(x) - m.log_partition(), 0),
                                           torch.zeros(1, dtype=torch.float64), atol=1e-10, rtol=0)
    # the base circuit is not swapped: c keeps its exact values while c̃² changes
    assert not torch.allclose(swapped.log_density(x), model.log_density(x))


def test_log_z_is_cached_in_eval_mode_and_never_stale():
    model = compile_density(tiny_circuit(), dtype=torch.float64, seed=3, num_categories=V)
    calls = []
    original = type(model)._graph

    def counting(self, circuit, *args, **kwargs):
        if circuit is self.partition:
            calls.append(1)
        return original(self, circuit, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "_graph", counting)
        model.eval()
        with torch.no_grad():
            first = model.log_partition()
            again = model.log_partition()
            assert len(calls) == 1 and torch.equal(first, again)
            # cached=False (a benchmark's timed call) computes it, and leaves the cache as it was
            torch.testing.assert_close(model.log_partition(cached=False), first, rtol=1e-13, atol=0)
            assert len(calls) == 2 and torch.equal(model.log_partition(), first) and len(calls) == 2
        calls.clear()
        # an optimiser step changes the parameters in place: recomputed
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        (-model.log_likelihood(states(4)[:5]).mean()).backward()
        opt.step()
        model.eval()
        calls.clear()
        with torch.no_grad():
            after_step = model.log_partition()
        assert len(calls) == 1 and not torch.allclose(after_step, first)
        # load_state_dict restores the old parameters: recomputed, and equal to the first value
        fresh = compile_density(tiny_circuit(), dtype=torch.float64, seed=3, num_categories=V)
        model.load_state_dict(fresh.state_dict())
        with torch.no_grad():
            restored = model.log_partition()
        assert len(calls) == 2
        torch.testing.assert_close(restored, first, rtol=1e-13, atol=0)
        # parameters replaced through .data (no version bump, as vector_to_parameters does): recomputed
        for p in model.parameters():
            p.data = p.data * 1.1
        with torch.no_grad():
            rescaled = model.log_partition()
        assert len(calls) == 3 and not torch.allclose(rescaled, restored)
        calls.pop()
        # a swap replaces the partition function's layers: recomputed
        swap_kronecker_sum_layers([model.density, model.partition], square_policy("lowrank", 1))
        with torch.no_grad():
            model.log_partition()
        assert len(calls) == 3
        # gradients needed: never served from the cache
        z = model.log_partition()
        assert z.requires_grad and len(calls) == 4


@pytest.mark.parametrize("evaluation", ["linear", "semiring"])
def test_marginals_match_brute_force_and_sum_correctly(tiny, evaluation):
    tiny.evaluation = evaluation
    x = states(4)
    with torch.no_grad():
        joint = tiny.log_likelihood(x)[:, 0].exp()  # (81,)
        observed = torch.tensor([True, False, True, False])
        marg = tiny.log_marginal(x, observed)[:, 0].exp()
        # brute force: sum the joint over the unobserved variables
        key = x[:, 0] * V + x[:, 2]
        ref = torch.zeros(V * V, dtype=torch.float64).index_add_(0, key, joint)[key]
        torch.testing.assert_close(marg, ref, rtol=1e-10, atol=1e-12)
        # per-sample masks: every sample its own observed set
        masks = torch.rand(x.shape[0], 4, generator=torch.Generator().manual_seed(0)) < 0.5
        per_sample = tiny.log_marginal(x, masks)[:, 0]
        for i in range(0, x.shape[0], 7):
            one = tiny.log_marginal(x[i:i + 1], masks[i])[0, 0]
            torch.testing.assert_close(per_sample[i], one, rtol=1e-10, atol=1e-10)
        # nothing observed: probability 1; everything observed: the likelihood
        torch.testing.assert_close(tiny.log_marginal(x[:3], torch.zeros(4, dtype=torch.bool)),
                                   torch.zeros(3, 1, dtype=torch.float64), atol=1e-11, rtol=0)
        torch.testing.assert_close(tiny.log_marginal(x, torch.ones(4, dtype=torch.bool)), tiny.log_likelihood(x),
                                   rtol=1e-10, atol=1e-10)


def test_conditionals_normalise(tiny):
    x = states(4)
    query = torch.tensor([False, True, False, True])
    evidence = torch.tensor([True, False, False, False])
    with torch.no_grad():
        cond = tiny.log_conditional(x, query, evidence)[:, 0].exp()
    # for each evidence value, the conditional over the query's V² values sums to 1
    for e in range(V):
        rows = (x[:, 0] == e) & (x[:, 2] == 0)
        assert float(cond[rows].sum()) == pytest.approx(1.0, abs=1e-10)


def test_marginals_far_below_the_clamp_match_a_float64_reference():
    """16x16 pixels, 17 categories: every marginal is far below cirkit's -708 clamp."""
    c = tiny_circuit(units=2, side=16, categories=17)
    model = compile_density(c, dtype=torch.float64, seed=4, num_categories=17)
    x = torch.randint(0, 17, (5, 256), generator=torch.Generator().manual_seed(5))
    observed = torch.zeros(256, dtype=torch.bool)
    observed[:200] = True
    with torch.no_grad():
        got = model.log_marginal(x, observed)[:, 0] + model.log_partition()
        # reference: cirkit's own clamping evaluation, every input shifted by e^8 (as
        # builders.shifted_reference does), which lifts every intermediate value above the clamp
        shift = 8.0

        def module_fn(layer, *inputs):
            y = _integrate_layer_fn(layer, *inputs, integrate_vars_mask=(~observed).expand(5, -1))
            return y + shift if isinstance(layer, TorchInputLayer) else y

        with cirkit_evaluation(model.density):
            ref = model.density.evaluate(torch.where(observed, x, 0), module_fn=module_fn).real[0, :, 0]
        ref = ref - shift * 256
    assert float(ref.max()) < -708
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8)


def test_conditionals_of_every_variable_against_enumeration(tiny):
    """``p(x_u = c | x_observed)`` for unobserved u and ``p(x_u = c | x_observed without u)`` for
    observed u, from the normalised table of all 81 states (per-sample evidence: one row with
    nothing observed, one with everything)."""
    table = tiny.log_likelihood(states(4))[:, 0].exp().view(V, V, V, V).detach()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (6, 4), generator=g)
    per_sample = torch.rand(6, 4, generator=g) < 0.5
    per_sample[0], per_sample[1] = False, True
    for observed in (per_sample, torch.ones(4, dtype=torch.bool)):  # the second: leave-one-out only
        got = tiny.conditionals(x, observed)
        assert got.shape == (6, 4, V) and got.dtype == torch.float64
        _assert_conditionals(got, table, x, observed.expand(6, 4))


def _assert_conditionals(got, table, x, observed):
    """``got`` (B, 4, V) against the 4-variable probability ``table`` (V, V, V, V)."""
    for b in range(x.shape[0]):
        for u in range(4):
            given = observed[b].clone()
            given[u] = False
            index = tuple(x[b, w] if given[w] else slice(None) for w in range(4))
            joint = table[index]  # the free variables' axes, u among them
            free = [w for w in range(4) if not given[w]]
            others = tuple(i for i, w in enumerate(free) if w != u)
            marginal = joint.sum(dim=others) if others else joint  # (sum over () would sum every axis)
            torch.testing.assert_close(got[b, u], marginal / marginal.sum(), rtol=1e-9, atol=1e-12)


def test_queries_in_chunks_equal_one_pass(tiny):
    """Rows are independent: marginals, conditionals and samples in chunks of any size (1 row, the default
    from the memory budget) equal those of one pass; a budget below one row still gives 1."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, V, (7, 4), generator=g)
    observed = torch.rand(7, 4, generator=g) < 0.5
    observed[0] = True  # a chunk of this row alone integrates nothing
    for mask in (observed, observed[0]):  # per sample, and one for all rows
        torch.testing.assert_close(tiny.log_marginal(x, mask, max_rows=2), tiny.log_marginal(x, mask, max_rows=7),
                                   rtol=1e-12, atol=1e-14)
    whole = tiny.conditionals(x, observed, max_rows=7)
    torch.testing.assert_close(tiny.conditionals(x, observed, max_rows=1), whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tiny.conditionals(x, observed), whole, rtol=1e-12, atol=1e-14)
    assert tiny.rows_per_chunk(budget_bytes=1) == 1 and tiny.rows_per_chunk() > 7
    for method in ("gradients", "marginals"):
        draws = [tiny.sample(20, generator=torch.Generator().manual_seed(1), max_rows=rows, method=method)
                 for rows in (1, None)]
        assert torch.equal(draws[0], draws[1])
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="max_rows must be a positive int or None"):
            tiny.sample(2, max_rows=bad)
        with pytest.raises(ValueError, match="max_rows must be a positive int or None"):
            tiny.conditionals(x, observed, max_rows=bad)
        with pytest.raises(ValueError, match="max_rows must be a positive int or None"):
            tiny.log_marginal(x, observed, max_rows=bad)


@pytest.mark.parametrize("evaluation", ["linear", "semiring"])
def test_queries_of_no_samples_are_empty(tiny, evaluation):
    """An empty batch gives empty answers of the right shape under both evaluations (the
    linear one raised from its range checks), and a backward through them runs."""
    tiny.evaluation = evaluation
    x = states(4)[:0]
    observed = torch.zeros(0, 4, dtype=torch.bool)
    assert tiny.log_likelihood(x).shape == (0, 1) and tiny.predict(x).shape == (0,)
    for mask in (observed, torch.tensor([True, False, True, False])):
        assert tiny.log_marginal(x, mask).shape == (0, 1)
        assert tiny.log_marginal(x, mask, max_rows=1).shape == (0, 1)
    tiny.log_likelihood(x).sum().backward()
    if evaluation == "linear":
        assert tiny.conditionals(x, observed).shape == (0, 4, V)


def test_samples_after_parameters_written_in_place(tiny, monkeypatch):
    """Work a sampler's steps share is kept for one run only: after parameters are rewritten
    without a version bump (through ``.data``, as ``vector_to_parameters`` does), the next run
    draws what a sampler computing every fold per row draws."""
    from adapters.cirkit import linear_space

    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 0)
    tiny.sample(50, generator=torch.Generator().manual_seed(1))
    for p in tiny.parameters():
        p.data = p.data * 1.3
    shared = tiny.sample(200, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 2**62)
    assert torch.equal(shared, tiny.sample(200, generator=torch.Generator().manual_seed(2)))


def test_conditionals_are_named_errors(tiny):
    x = states(4)[:3]
    with pytest.raises(ValueError, match=r"observed must have shape \(4,\) or \(B, 4\)"):
        tiny.conditionals(x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must hold categories in 0..2"):
        tiny.conditionals(x + 5, torch.ones(4, dtype=torch.bool))
    tiny.evaluation = "semiring"
    with pytest.raises(ValueError, match="conditionals needs evaluation='linear'"):
        tiny.conditionals(x, torch.ones(4, dtype=torch.bool))
    many = compile_density(tiny_circuit(classes=2), dtype=torch.float64, seed=1, num_categories=V)
    with pytest.raises(ValueError, match="one-output density"):
        many.conditionals(x, torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("method", ["gradients", "marginals"])
def test_samples_follow_the_distribution(method):
    """χ² test against the exact probabilities of all 81 states (fixed seed), for both ways
    of computing the conditionals."""
    model = compile_density(tiny_circuit(), dtype=torch.float64, seed=6, num_categories=V)
    n = 4000
    x = model.sample(n, generator=torch.Generator().manual_seed(7), method=method)
    assert x.shape == (n, 4) and x.dtype == torch.long and int(x.min()) >= 0 and int(x.max()) < V
    with torch.no_grad():
        p = model.log_likelihood(states(4))[:, 0].exp()
    counts = torch.bincount(x[:, 0] * 27 + x[:, 1] * 9 + x[:, 2] * 3 + x[:, 3], minlength=81).double()
    expected = n * p
    keep = expected >= 5  # the usual validity condition; the rest pooled into one cell
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    pooled_e, pooled_o = float(expected[~keep].sum()), float(counts[~keep].sum())
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
    dof = int(keep.sum()) + (1 if pooled_e > 0 else 0) - 1
    # 99.9 % quantile of χ²(dof) by the Wilson–Hilferty approximation
    z = 3.09
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert stat < bound, (stat, bound, dof)
    again = model.sample(n, generator=torch.Generator().manual_seed(7), method=method)
    assert torch.equal(again, x)  # same seed, same samples


@pytest.mark.parametrize("order", [None, [3, 0, 2, 1]])
def test_both_sampling_methods_draw_the_same_samples(tiny, order):
    """The conditionals from one forward and backward (``'gradients'``) equal the ratios of
    marginals (``'marginals'``) to rounding, so one seed gives the same samples (float64;
    real and complex weights; in chunks smaller than the batch)."""
    draws = {method: tiny.sample(300, generator=torch.Generator().manual_seed(3), order=order, max_rows=128,
                                 method=method)
             for method in ("gradients", "marginals")}
    assert torch.equal(draws["gradients"], draws["marginals"])
    assert len(torch.unique(draws["gradients"], dim=0)) > 20  # not one repeated state


@pytest.mark.parametrize("order", [None, [3, 0, 2, 1]])
def test_samples_and_marginals_with_one_mask_for_all_rows(tiny, order, monkeypatch):
    """The sampler's masks are the same for every sample, and so may be a marginal's: computed
    per sample only where a fold is over both observed and integrated variables
    (:meth:`~adapters.cirkit.linear_space.CircuitPlan.run_shared_mask`, forced here on the tiny
    circuit), the same samples from one seed and the same marginals and gradients."""
    from adapters.cirkit import linear_space

    def draw_and_marginal():
        model = copy.deepcopy(tiny)
        x = states(4)[:9]
        logp = model.log_marginal(x, torch.tensor([False, True, True, False]))
        logp.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return model.sample(200, generator=torch.Generator().manual_seed(5), order=order), logp.detach(), grads

    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 2**62)  # never
    every_fold = draw_and_marginal()
    monkeypatch.setattr(linear_space, "SHARED_MASK_MIN_MACS", 0)  # always
    calls = []
    original = linear_space.CircuitPlan.run_shared_mask
    monkeypatch.setattr(linear_space.CircuitPlan, "run_shared_mask",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    mixed_only = draw_and_marginal()
    assert len(calls) > 4
    assert torch.equal(every_fold[0], mixed_only[0])
    torch.testing.assert_close(every_fold[1], mixed_only[1], rtol=1e-12, atol=1e-12)
    assert len(every_fold[2]) == len(mixed_only[2]) > 0
    for a, b in zip(every_fold[2], mixed_only[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sampling_methods_by_evaluation(tiny, monkeypatch):
    """'auto' differentiates under the linear evaluation and evaluates marginals under cirkit's
    own evaluation; 'gradients' needs the linear evaluation."""
    used = []
    for name in ("_conditionals_by_gradients", "_conditionals_by_marginals"):
        original = getattr(type(tiny), name)
        monkeypatch.setattr(type(tiny), name, lambda self, *a, _f=original, _n=name, **k: used.append(_n) or _f(self, *a, **k))
    tiny.sample(2)
    assert set(used) == {"_conditionals_by_gradients"}
    tiny.evaluation = "semiring"
    used.clear()
    tiny.sample(2)
    assert set(used) == {"_conditionals_by_marginals"}
    with pytest.raises(ValueError, match="method='gradients' needs evaluation='linear'"):
        tiny.sample(2, method="gradients")
    with pytest.raises(ValueError, match="method must be one of 'auto', 'gradients', 'marginals'"):
        tiny.sample(2, method="backward")


def test_bad_queries_are_named(tiny):
    x = states(4)[:4]
    with pytest.raises(ValueError, match=r"observed must have shape \(4,\) or \(B, 4\)"):
        tiny.log_marginal(x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="observed must be a boolean tensor"):
        tiny.log_marginal(x, torch.ones(4))
    with pytest.raises(ValueError, match="query and evidence must be disjoint"):
        tiny.log_conditional(x, torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must hold categories in 0..2"):
        tiny.log_likelihood(x + 5)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        tiny.sample(0)
    with pytest.raises(ValueError, match="order must be a permutation"):
        tiny.sample(2, order=[0, 0, 1, 2])
    many = compile_density(tiny_circuit(classes=2), dtype=torch.float64, seed=1, num_categories=V)
    with pytest.raises(ValueError, match="one-output density"):
        many.sample(2)
    # unobserved positions are ignored, even out of range
    observed = torch.tensor([True, True, False, False])
    junk = x.clone()
    junk[:, 2:] = 99
    torch.testing.assert_close(tiny.log_marginal(junk, observed), tiny.log_marginal(x, observed))


def test_random_binary_tree_marginals():
    c = RandomBinaryTree(5, num_repetitions=1, seed=1).build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=2), sum_product="cp",
        sum_weight_factory=parameterization_to_factory(Parameterization(activation="none", initialization="normal")),
        num_input_units=3, num_sum_units=3)
    model = compile_density(c, dtype=torch.float64, seed=0, num_categories=2)
    x = states(5, 2)
    observed = torch.tensor([True, False, False, True, False])
    with torch.no_grad():
        joint = model.log_likelihood(x)[:, 0].exp()
        key = x[:, 0] * 2 + x[:, 3]
        ref = torch.zeros(4, dtype=torch.float64).index_add_(0, key, joint)[key]
        torch.testing.assert_close(model.log_marginal(x, observed)[:, 0].exp(), ref, rtol=1e-10, atol=1e-12)
