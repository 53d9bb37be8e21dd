"""The StructuredSumLayer interface and registry, exercised for every registered kind."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import structlayers as sl
from structlayers.base import REBUILD, REBUILD_MARGIN
from structlayers.linalg import kron_dense

from .helpers import decaying_factors, decaying_matrix, generator, random_factors, rel
from .kind_specs import SPECS

KINDS = sl.available()
EXACT = 1e-10


def test_every_registered_kind_has_a_test_spec():
    assert set(KINDS) == set(SPECS), "add the new kind to tests/kind_specs.py"
    assert {"dense", "kronecker", "lowrank", "nystrom"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("folds,out,inp,unfolded", [(1, 12, 10, True), (3, 12, 10, False), (2, 6, 15, False)])
def test_full_rank_from_dense_is_exact(kind, folds, out, inp, unfolded):
    w = torch.randn(folds, out, inp, generator=generator(1), dtype=torch.float64)
    x = torch.randn(folds, 7, inp, generator=generator(2), dtype=torch.float64)
    for options in SPECS[kind]["full_dense"](w):
        layer = sl.from_dense(kind, w[0] if unfolded else w, **options)
        assert isinstance(layer, sl.get(kind)) and layer.kind == kind
        assert (layer.num_folds, layer.out_features, layer.in_features) == (folds, out, inp)
        assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT, options
        assert rel(layer.to_dense(), w) < EXACT, options
        assert layer.relative_error(w) < EXACT


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("folds,shape_a,shape_b", [(1, (4, 3), (2, 5)), (3, (3, 3), (4, 4)), (2, (2, 5), (3, 2))])
def test_full_rank_from_kronecker_is_exact(kind, folds, shape_a, shape_b):
    a, b = random_factors(folds, shape_a, shape_b, seed=3)
    w = kron_dense(a, b)
    x = torch.randn(folds, 5, w.shape[2], generator=generator(4), dtype=torch.float64)
    for options in SPECS[kind]["full_kron"](a, b):
        layer = sl.from_kronecker(kind, a, b, **options)
        assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT, options
        assert rel(layer.to_dense(), w) < EXACT, options
        # The non-materialising error report: accurate to ~sqrt(eps) (see its docstring).
        assert layer.relative_error_kronecker(a, b) < 1e-7, options


@pytest.mark.parametrize("kind", KINDS)
def test_unfolded_kronecker_factors(kind):
    a, b = random_factors(1, (3, 4), (2, 3), seed=5)
    options = SPECS[kind]["full_kron"](a, b)[0]
    layer = sl.from_kronecker(kind, a[0], b[0], **options)
    assert layer.num_folds == 1
    assert rel(layer.to_dense()[0], torch.kron(a[0], b[0])) < EXACT


@pytest.mark.parametrize("kind", KINDS)
def test_random_init_forward_matches_to_dense_and_scale(kind):
    layer = sl.create(kind, 64, 48, 2, dtype=torch.float64, seed=0, **SPECS[kind]["init"](64, 48))
    x = torch.randn(2, 500, 64, generator=generator(6), dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 500, 48)
    assert rel(y, x @ layer.to_dense().transpose(1, 2)) < EXACT
    # Output variance near nn.Linear's 1/3 for unit-variance inputs (loose: few random draws).
    assert 0.05 < float(y.detach().var()) < 2.0


@pytest.mark.parametrize("kind", KINDS)
def test_random_init_is_reproducible(kind):
    one = sl.create(kind, 12, 8, 2, seed=7, **SPECS[kind]["init"](12, 8))
    two = sl.create(kind, 12, 8, 2, seed=7, **SPECS[kind]["init"](12, 8))
    three = sl.create(kind, 12, 8, 2, seed=8, **SPECS[kind]["init"](12, 8))
    assert torch.equal(one.to_dense(), two.to_dense())
    assert not torch.equal(one.to_dense(), three.to_dense())


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_through_forward(kind):
    a, b = random_factors(2, (3, 2), (2, 3), seed=9)
    layer = sl.from_kronecker(kind, a, b, **SPECS[kind]["full_kron"](a, b)[0])
    x = torch.randn(2, 3, 6, generator=generator(10), dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x,) + params)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    a, b = random_factors(2, (4, 3), (3, 4), seed=11)
    layer = sl.from_kronecker(kind, a, b, **SPECS[kind]["full_kron"](a, b)[-1])
    clone = type(layer)(**layer.config())
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 12, generator=generator(12), dtype=torch.float64)
    assert torch.equal(clone(x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_float32_and_complex(kind):
    a, b = random_factors(2, (4, 4), (3, 3), seed=13, dtype=torch.float32)
    layer = sl.from_kronecker(kind, a, b, **SPECS[kind]["full_kron"](a, b)[0])
    assert layer.dtype == torch.float32
    assert rel(layer.to_dense(), kron_dense(a, b)) < 1e-5
    ac, bc = random_factors(2, (4, 4), (3, 3), seed=14, dtype=torch.complex128)
    layer = sl.from_kronecker(kind, ac, bc, **SPECS[kind]["full_kron"](ac, bc)[0])
    assert layer.dtype == torch.complex128
    x = torch.randn(2, 5, 12, generator=generator(15), dtype=torch.complex128)
    assert rel(layer(x), x @ kron_dense(ac, bc).transpose(1, 2)) < EXACT


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_after_construction(kind):
    torch.manual_seed(0)
    target = decaying_matrix(2, 12, 12, decay=0.7, seed=16)
    start = sl.create(kind, 12, 12, 2, dtype=torch.float64, seed=1, **SPECS[kind]["init"](12, 12))
    x = torch.randn(2, 64, 12, generator=generator(17), dtype=torch.float64)
    y = x @ target.transpose(1, 2)
    opt = torch.optim.Adam(start.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((start(x) - y) ** 2).mean()
        loss.backward()
        assert all(p.grad is not None for p in start.parameters())
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_laid_out_contiguously(kind):
    """Every construction gives contiguous parameters, also from transposed (non-contiguous)
    input weights and from decompositions whose factors come out transposed: autograd writes
    each gradient in its parameter's layout, so a transposed parameter costs a copy of its
    gradient per backward. After one backward every gradient is contiguous too."""
    w = torch.randn(2, 10, 12, generator=generator(40), dtype=torch.float64).transpose(1, 2)  # (2, 12, 10)
    a, b = random_factors(2, (4, 4), (4, 4), seed=41)
    a, b = a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2)
    built = [sl.from_dense(kind, w, **options) for options in SPECS[kind]["full_dense"](w)]
    built += [sl.from_kronecker(kind, a, b, **options) for options in SPECS[kind]["full_kron"](a, b)]
    if SPECS[kind]["budget"]:
        built.append(sl.from_kronecker(kind, a, b, **SPECS[kind]["budget"](2)))
    built.append(sl.create(kind, 12, 10, 2, dtype=torch.float64, seed=1, **SPECS[kind]["init"](12, 10)))
    for layer in built:
        strided = [name for name, p in layer.named_parameters() if not p.is_contiguous()]
        assert not strided, (kind, strided)
        x = torch.randn(2, 3, layer.in_features, generator=generator(42), dtype=torch.float64)
        layer(x).square().sum().backward()
        assert all(p.grad is None or p.grad.is_contiguous() for p in layer.parameters())


@pytest.mark.parametrize("kind", [k for k in KINDS if SPECS[k]["budget"]])
def test_relative_error_reports_agree(kind):
    """relative_error_kronecker (no materialisation) equals the dense computation."""
    a, b = random_factors(2, (5, 4), (4, 5), seed=18)
    layer = sl.from_kronecker(kind, a, b, **SPECS[kind]["budget"](4))
    w = kron_dense(a, b)
    dense_err = rel(layer.to_dense(), w)
    assert layer.relative_error(w) == pytest.approx(dense_err, rel=1e-10)
    assert layer.relative_error_kronecker(a, b) == pytest.approx(dense_err, rel=1e-8)
    per_fold = layer.relative_error_kronecker(a, b, per_fold=True)
    assert per_fold.shape == (2,)
    expected = (layer.to_dense() - w).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)
    assert torch.allclose(per_fold, expected, rtol=1e-8)


# ------------------------------------------------------------------ bookkeeping
def test_flops_and_params_hand_counts():
    """The kinds' own orders (``orders(b)[0]``; on weights this small the forward may
    rebuild W instead, which flops() then reports)."""
    f, bsz = 3, 5
    a, b = random_factors(f, (4, 6), (5, 3), seed=19)  # out = 20, in = 18
    assert sl.Dense.from_kronecker(a, b).num_params == f * 20 * 18
    assert sl.Dense.from_kronecker(a, b).flops(bsz) == bsz * f * 20 * 18
    kron = sl.Kronecker.from_kronecker(a, b)
    assert kron.num_params == f * (4 * 6 + 5 * 3)
    # X (6 x 3): A first: 4*6*3 + 4*3*5 = 132; B first: 6*3*5 + 4*6*5 = 210.
    assert kron.orders(bsz)[0].macs == bsz * f * 132
    low = sl.LowRank.from_kronecker(a, b, rank=7)
    assert low.num_params == f * 7 * (20 + 18)
    assert low.orders(bsz)[0].macs == bsz * f * 7 * (20 + 18)
    nys = sl.Nystrom.from_kronecker(a, b, factor_ranks=(2, 3))
    assert nys.num_params == f * (2 * (4 + 6) + 3 * (5 + 3))
    # chains A: 4x2 @ 2x6, B: 5x3 @ 3x3, acting on X (6 x 3). Best interleaving:
    # right_a 2*6*3 = 36 -> (2x3), right_b 3*3*2 = 18 -> (2x3), left_b 5*3*2 = 30 -> (2x5),
    # left_a 4*2*5 = 40 -> (4x5): 124 (all A then all B would cost 156).
    assert nys.orders(bsz)[0].macs == bsz * f * 124
    square = sl.LowRank.from_kronecker(a[:, :4, :4], a[:, :4, :4], rank=4, square=True)
    assert square.num_params == f * 2 * (4 + 4) and square.num_buffers == 0
    sum_of_two = sl.Kronecker.from_dense(kron_dense(a, b), factor_shapes=((4, 6), (5, 3)), rank=2)
    assert sum_of_two.orders(bsz)[0].macs == 2 * bsz * f * 132


# ------------------------------------------------------------------ capabilities
def test_every_kind_says_what_its_rank_means():
    for kind in KINDS:
        cls = sl.get(kind)
        assert isinstance(cls.rank_meaning, str) and cls.rank_meaning.strip(), kind
        assert isinstance(cls.kronecker_choose_options, tuple) and cls.kronecker_choose_options, kind
        assert isinstance(cls.budget_options, dict), kind


@pytest.mark.parametrize("kind", [k for k in KINDS if sl.get(k).exact_from_kronecker])
def test_exact_from_kronecker_means_exact_and_no_budget_options(kind):
    a, b = random_factors(2, (4, 3), (2, 5), seed=20)
    layer = sl.from_kronecker(kind, a, b)
    assert rel(layer.to_dense(), kron_dense(a, b)) < EXACT
    for option in ({"rank": 1}, {"tolerance": 0.1}, {"params_share": 0.5}):
        with pytest.raises(TypeError):
            sl.from_kronecker(kind, a, b, **option)


@pytest.mark.parametrize("kind", [k for k in KINDS if sl.get(k).exact_from_dense])
def test_exact_from_dense_means_exact_and_no_budget_options(kind):
    w = torch.randn(2, 6, 5, generator=generator(21), dtype=torch.float64)
    assert rel(sl.from_dense(kind, w).to_dense(), w) < EXACT
    with pytest.raises(TypeError):
        sl.from_dense(kind, w, tolerance=0.1)


def test_kinds_that_are_not_exact_take_budgets():
    a, b = random_factors(1, (4, 4), (4, 4), seed=22)
    for kind in KINDS:
        cls = sl.get(kind)
        if not cls.exact_from_kronecker:
            layer = cls.from_kronecker(a, b, params_share=0.5, **cls.budget_options)
            assert layer.num_params <= 0.5 * 256, kind
        if not cls.exact_from_dense:
            assert cls.from_dense(a[0], params_share=1.0).num_params <= 16, kind


@pytest.mark.parametrize("kind", [k for k in KINDS if sl.get(k).rank_is_matrix_rank])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_rank_is_matrix_rank_bounds_the_rank_of_w(kind, rank):
    a, b = random_factors(2, (4, 3), (3, 4), seed=23)
    w = kron_dense(a, b)
    for options in sl.get(kind).kronecker_choose_options:
        layer = sl.from_kronecker(kind, a, b, rank=rank, **options)
        assert layer.rank == rank
        assert int(torch.linalg.matrix_rank(layer.to_dense().detach()).max()) <= rank
        # and the Eckart–Young optimum at that rank is a lower bound of its error
        assert layer.relative_error(w) >= sl.optimal_relative_error_kronecker(a, b, rank) - 1e-12
    layer = sl.from_dense(kind, w, rank=rank)
    assert int(torch.linalg.matrix_rank(layer.to_dense().detach()).max()) <= rank


@pytest.mark.parametrize("kind", [k for k in KINDS if sl.get(k).square_form])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_square_form_keeps_a_times_its_conjugate(kind, dtype):
    a, _ = random_factors(2, (4, 4), (4, 4), seed=24, dtype=dtype)
    layer = sl.from_kronecker(kind, a, a.conj(), square=True, factor_ranks=(2, 2))
    fa, fb = layer.factors()
    assert torch.equal(fb, fa.conj())
    assert rel(layer.to_dense(), kron_dense(fa, fa.conj())) < EXACT
    assert layer.num_params == 2 * 2 * (4 + 4)  # one stored factor: left_a (4 x 2), right_a (2 x 4)


@pytest.mark.parametrize("kind", KINDS)
def test_every_choose_option_builds_on_kronecker_input(kind):
    a, b = random_factors(1, (4, 4), (4, 4), seed=25)
    cls = sl.get(kind)
    for options in cls.kronecker_choose_options:
        request = {} if cls.exact_from_kronecker else {"params_share": 0.5, **cls.budget_options}
        layer = cls.from_kronecker(a, b, **{**options, **request})
        assert layer.relative_error_kronecker(a, b) < 1.0


# ------------------------------------------------ extreme values, dtypes, devices (issue #11)
TOLERANCE_KINDS = [k for k in KINDS if k not in ("dense", "sketched")]  # sketched: W-independent tolerance


@pytest.mark.parametrize("kind", TOLERANCE_KINDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 1e-22),
                                         (torch.float64, 1e200), (torch.float64, 1e-200)])
def test_tolerance_holds_for_any_finite_weight(kind, dtype, scale):
    """Squared norms of 1e20 float32 weights overflowed: the tolerance was then ignored."""
    w = decaying_matrix(2, 16, 16, decay=0.7, seed=4)
    reference = sl.from_dense(kind, w, tolerance=0.1)
    layer = sl.from_dense(kind, (w * scale).to(dtype), tolerance=0.1)
    assert layer.dtype == dtype
    assert layer.num_params == reference.num_params
    assert layer.relative_error((w * scale).to(dtype)) <= 0.1
    assert layer.relative_error((w * scale).to(dtype)) == pytest.approx(reference.relative_error(w), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("kind", [k for k in TOLERANCE_KINDS if not sl.get(k).exact_from_kronecker])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float64, 1e150), (torch.float64, 1e-150)])
def test_kronecker_tolerance_holds_for_any_finite_factors(kind, dtype, scale):
    a, b = decaying_factors(2, 4, decay=0.5, seed=5)
    options = SPECS[kind]["budget"](1) if kind in ("tt", "monarch") else {}
    options = {k: v for k, v in options.items() if k not in ("rank", "block_rank")}
    reference = sl.from_kronecker(kind, a, b, tolerance=0.2, **options)
    big_a, big_b = (a * scale).to(dtype), (b * scale).to(dtype)
    layer = sl.from_kronecker(kind, big_a, big_b, tolerance=0.2, **options)
    assert layer.num_params == reference.num_params
    assert layer.relative_error_kronecker(big_a, big_b) <= 0.2
    assert layer.relative_error_kronecker(big_a, big_b) == pytest.approx(
        reference.relative_error_kronecker(a, b), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_weights_have_error_zero_and_tolerances_take_the_smallest_layer(kind):
    zero = torch.zeros(2, 6, 6, dtype=torch.float64)
    for options in SPECS[kind]["full_dense"](zero):
        layer = sl.from_dense(kind, zero, **options)
        assert layer.relative_error(zero) == 0.0
        assert layer.relative_error(zero, per_fold=True).tolist() == [0.0, 0.0]
    a, b = torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(1, 3, 2, dtype=torch.float64)
    for options in SPECS[kind]["full_kron"](a, b):
        assert sl.from_kronecker(kind, a, b, **options).relative_error_kronecker(a, b) == 0.0
    nonzero = sl.create(kind, 6, 6, 2, dtype=torch.float64, seed=0, **SPECS[kind]["init"](6, 6))
    assert nonzero.relative_error(zero) == float("inf")
    if kind in TOLERANCE_KINDS:
        full = sl.from_dense(kind, zero, **SPECS[kind]["full_dense"](zero)[0])
        assert sl.from_dense(kind, zero, tolerance=0.1).num_params <= full.num_params
        if getattr(sl.get(kind), "rank_is_matrix_rank", False):
            assert sl.from_dense(kind, zero, tolerance=0.1).rank == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_factored_in_float32_and_come_back_in_their_dtype(kind, dtype):
    w = decaying_matrix(1, 8, 8, decay=0.8, seed=6).to(dtype)
    a, b = (t.to(dtype) for t in decaying_factors(1, 4, decay=0.8, seed=7))
    options = SPECS[kind]["full_dense"](w)[0]
    layer = sl.from_dense(kind, w, **options)
    assert layer.dtype == dtype and layer.relative_error(w) < 1e-2
    layer = sl.from_kronecker(kind, a, b, **SPECS[kind]["full_kron"](a, b)[0])
    assert layer.dtype == dtype and layer.relative_error_kronecker(a, b) < 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_input_of_another_dtype_is_a_type_error_naming_x(kind):
    layer = sl.create(kind, 6, 6, 2, dtype=torch.float64, seed=0, **SPECS[kind]["init"](6, 6))
    for bad in (torch.float32, torch.bool, torch.int64):
        with pytest.raises(TypeError, match=rf"x has dtype {bad}, but this {kind} layer computes in torch.float64"):
            layer(torch.zeros(2, 3, 6, dtype=bad))


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_batch_gives_an_empty_output(kind):
    for inp, out in ((8, 64), (64, 8)):  # tt sweeps right-to-left for one, left-to-right for the other
        layer = sl.create(kind, inp, out, 2, dtype=torch.float64, seed=0, **SPECS[kind]["init"](inp, out))
        assert layer(torch.zeros(2, 0, inp, dtype=torch.float64)).shape == (2, 0, out)


@pytest.mark.parametrize("kind", KINDS)
def test_meta_device_construction_allocates_and_draws_nothing(kind, monkeypatch):
    drawn = []
    for name in ("randn", "rand", "randint", "empty", "zeros"):
        original = getattr(torch, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            if not out.is_meta:
                drawn.append((_name, tuple(out.shape)))
            return out

        monkeypatch.setattr(torch, name, spy)
    size = 2**20 * 3 * 5 * 7  # a dense layer this size would need terabytes
    options = SPECS[kind]["init"](64, 64) if kind != "sketched" else {"num_terms": 1, "low_rank": 2}
    layer = sl.create(kind, size, size, device="meta", **options)
    assert all(t.is_meta for t in layer.state_dict().values())
    assert [d for d in drawn if torch.Size(d[1]).numel() > 1] == []  # nothing of the layer's size


@pytest.mark.parametrize("kind", KINDS)
def test_torch_manual_seed_makes_unseeded_construction_reproducible(kind):
    def build():
        torch.manual_seed(123)
        return sl.create(kind, 12, 12, 2, dtype=torch.float64, **SPECS[kind]["init"](12, 12)).to_dense()

    assert torch.equal(build(), build())
    w = decaying_matrix(1, 12, 12, decay=0.8, seed=8)
    if kind in ("lowrank", "nystrom", "sketched"):  # the kinds with random constructions
        options = {"rank": 3, "method": "randomized"} if kind == "lowrank" else (
            {"rank": 3, "strategy": "uniform"} if kind == "nystrom" else {"low_rank": 2})
        torch.manual_seed(5)
        first = sl.from_dense(kind, w, **options).to_dense()
        torch.manual_seed(5)
        assert torch.equal(sl.from_dense(kind, w, **options).to_dense(), first)


# ------------------------------------------------------------------ evaluation orders
def _some_layers(kind):
    """Layers of this kind from the spec's exact constructions (every structure it lists)."""
    a, b = random_factors(2, (3, 4), (4, 3), seed=26)
    w = torch.randn(2, 12, 10, generator=generator(27), dtype=torch.float64)
    layers = [sl.from_kronecker(kind, a, b, **o) for o in SPECS[kind]["full_kron"](a, b)]
    layers += [sl.from_dense(kind, w, **o) for o in SPECS[kind]["full_dense"](w)]
    return layers


@pytest.mark.parametrize("kind", KINDS)
def test_every_order_is_exact_and_counts_what_it_does(kind):
    """Each order the forward can choose gives x W^T to 1e-10 with exactly the multiply-adds
    it states (torch's counter counts 2 per multiply-add); flops() is the count of the order
    the cost model picks (multiply-adds plus weighted memory traffic)."""
    for layer in _some_layers(kind):
        w = layer.to_dense().detach()
        for batch in (1, 7, 300):
            x = torch.randn(2, batch, layer.in_features, generator=generator(28), dtype=torch.float64)
            orders = layer.orders(batch)
            chosen = layer.order(batch)
            assert chosen in orders and layer.flops(batch) == chosen.macs
            assert chosen.cost == min(o.cost for o in layer._eligible(orders))
            for order in orders:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    y = layer.forward_in(order, x)
                assert rel(y, x @ w.transpose(1, 2)) < EXACT, (order.name, batch)
                assert counter.get_total_flops() == 2 * order.macs, (order.name, batch)


@pytest.mark.parametrize("kind", KINDS)
def test_every_order_has_the_same_gradients(kind):
    for layer in _some_layers(kind)[:2]:
        x = torch.randn(2, 5, layer.in_features, generator=generator(29), dtype=torch.float64, requires_grad=True)
        reference = None
        for order in layer.orders(5):
            layer.zero_grad()
            (gx,) = torch.autograd.grad(layer.forward_in(order, x).square().sum(), x, retain_graph=False)
            layer.forward_in(order, x.detach()).square().sum().backward()
            grads = [gx] + [p.grad.clone() for p in layer.parameters()]
            if reference is None:
                reference = grads
            else:
                assert all(rel(g, r) < EXACT for g, r in zip(grads, reference)), order.name


@pytest.mark.parametrize("kind", KINDS)
def test_rebuild_wins_on_large_batches_of_small_weights(kind):
    """Rebuilding W costs a fixed number of multiply-adds; past some batch size W x costs
    less than any structured order that is costlier per sample than dense (the order chosen
    there rebuilds W, or is the kind's contraction that does exactly the rebuild's products)."""
    for layer in _some_layers(kind):
        names = [o.name for o in layer.orders(1)]
        if REBUILD not in names:
            assert kind == "dense"
            continue
        n = 10 ** 6

        def marginal(name_is_rebuild):  # cost of n more samples at a large batch
            def cost(batch):
                return min(o.cost for o in layer.orders(batch) if (o.name == REBUILD) == name_is_rebuild)
            return cost(2 * n) - cost(n)

        if marginal(False) > marginal(True):  # W x per sample: rebuild, or an own order doing its products
            chosen, rebuild = layer.order(10 ** 9), layer.orders(10 ** 9)[-1]
            assert chosen.name == REBUILD or chosen.macs == rebuild.macs


@pytest.mark.parametrize("kind", KINDS)
def test_declared_factorisations_are_the_weight(kind):
    """``thin_factors`` (W = L R), ``kronecker_terms`` (W = Σ_t A_t ⊗ B_t) and their stored
    form ``kronecker_chains``, where a layer declares them, are its weight to 1e-10 (float64), and carry gradients."""
    for layer in _some_layers(kind):
        w = layer.to_dense().detach()
        thin, terms = layer.thin_factors(), layer.kronecker_terms()
        if thin is not None:
            assert rel(thin[0] @ thin[1], w) < EXACT and thin[0].requires_grad
        if terms is not None:
            a, b = terms
            built = sum(kron_dense(a[:, t], b[:, t]) for t in range(a.shape[1]))
            assert rel(built, w) < EXACT and (a.requires_grad or b.requires_grad)
        chains = layer.kronecker_chains()
        assert (chains is None) == (terms is None)
        if chains is not None:  # the stored form multiplies out to the terms
            for chain, term in zip(chains, terms):
                assert rel(functools.reduce(torch.matmul, chain), term) < EXACT
        single = layer.kronecker_chain()  # one term: its chains without the terms' axis
        assert (single is None) == (chains is None or chains[0][0].shape[1] != 1)
        if single is not None:
            for chain, term in zip(single, terms):
                assert rel(functools.reduce(torch.matmul, chain), term[:, 0]) < EXACT


def test_kronecker_terms_are_declared_by_the_kronecker_kinds():
    a, b = random_factors(2, (3, 4), (4, 3), seed=26)
    assert sl.from_kronecker("kronecker", a, b).kronecker_terms() is not None
    assert sl.from_kronecker("lowrank", a, b, structure="kronecker", factor_ranks=(3, 3)).kronecker_terms() is not None
    assert sl.from_kronecker("lowrank", a, b, rank=9).kronecker_terms() is None  # flat: W = L R
    assert sl.from_kronecker("tt", a, b).kronecker_terms() is None


def test_an_own_contraction_doing_the_rebuilds_products_is_preferred_on_large_weights():
    """At 256 x 256, Tucker's searched order does exactly the rebuild's multiply-adds at
    batch 256 and the model prices it within REBUILD_MARGIN: the searched order runs (the
    rebuild measured up to 1.4x slower there). At 64 x 64 the model's choice stands."""
    large, small = sl.Tucker(256, 256, rank=8), sl.Tucker(64, 64, rank=8)
    for layer in (large, small):
        *own, rebuild = layer.orders(256)
        twin = next(o for o in own if o.macs == rebuild.macs)
        assert rebuild.name == REBUILD and rebuild.cost < twin.cost <= REBUILD_MARGIN * rebuild.cost
    assert large.order(256).name == "searched order"
    assert small.order(256).name == REBUILD


def test_the_rebuild_order_is_never_offered_for_huge_weights():
    a, b = random_factors(1, (3, 3), (3, 3), seed=30)
    small = sl.LowRank.from_kronecker(a, b, rank=9)
    assert REBUILD in [o.name for o in small.orders(4)]
    big_a = torch.zeros(1, 2 ** 7, 2 ** 7)
    big = sl.Kronecker.from_kronecker(big_a, big_a)  # W would have 2^28 entries
    assert [o.name for o in big.orders(10 ** 9)] == ["Kronecker factors"]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind):
    layer = _some_layers(kind)[0]
    x = torch.zeros(2, 0, layer.in_features, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, layer.out_features)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
