"""The ``tt`` (tensor-train / MPO) kind: layouts, exactness, TT-SVD budgets, costs, init, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import structlayers.kinds.tt as tt_module  # registers the kind
from structlayers import get
from structlayers.kinds.tt import TT
from structlayers.linalg import kron_dense
from structlayers.linalg.tt import bond_limits, chain_dense, interleave, sweep_costs, tt_svd, unflatten_cores

from ..helpers import decaying_matrix, generator, random_factors, rel

EXACT = 1e-10
F64 = torch.float64


def _x(folds, batch, inp, seed=100, dtype=F64):
    return torch.randn(folds, batch, inp, generator=generator(seed), dtype=dtype)


def _tt_weight(folds, out_modes, in_modes, ranks, seed):
    """A weight of exact TT ranks ``ranks`` (d+1 entries) in the given layout."""
    g = generator(seed)
    cores = [torch.randn(folds, ranks[k], m, n, ranks[k + 1], generator=g, dtype=F64)
             for k, (m, n) in enumerate(zip(out_modes, in_modes))]
    return chain_dense(cores)[:, 0, :, :, 0]


def _interleaved_np(w, out_modes, in_modes):
    """Independent numpy version of the interleaving (F, m1 n1 m2 n2 ...)."""
    arr = w.detach().numpy()
    f, d = arr.shape[0], len(out_modes)
    arr = arr.reshape(f, *out_modes, *in_modes)
    order = [0] + [i for k in range(d) for i in (1 + k, 1 + d + k)]
    return arr.transpose(order).reshape(f, -1)


# ------------------------------------------------------------------ layouts
def test_registered_and_default_layouts():
    assert get("tt") is TT
    layer = TT(64, 48, seed=0)
    assert layer.out_modes == (3, 4, 4) and layer.in_modes == (4, 4, 4)  # out ascending, in descending
    assert layer.tt_ranks == (1, 8, 8, 1) and layer.num_cores == 3 and layer.rank == 8
    # Primes: out (1, 7), in (11, 1) is a rank-limited layout, not a scalar times a matrix.
    prime = TT(11, 7, seed=0)
    assert prime.out_modes == (1, 7) and prime.in_modes == (11, 1) and prime.tt_ranks == (1, 7, 1)
    # Default rank 8 is capped at small bonds; an explicit int is a cap too.
    assert TT(4, 4, seed=0).tt_ranks == (1, 4, 1)
    assert TT(16, 16, num_cores=4, tt_rank=3, seed=0).tt_ranks == (1, 3, 3, 3, 1)
    assert TT(16, 16, num_cores=4, tt_rank=16, seed=0).tt_ranks == (1, 4, 16, 4, 1)
    # One mode list given: the other is chosen with the same length.
    assert TT(16, 24, in_modes=(2, 8), seed=0).out_modes == (4, 6)


def test_rank_spec_forms_are_equivalent():
    kw = dict(out_modes=(2, 3, 4), in_modes=(4, 2, 2), seed=3)
    as_list = TT(16, 24, **kw, tt_rank=[3, 5])
    as_ends = TT(16, 24, **kw, tt_rank=(1, 3, 5, 1))
    assert as_list.tt_ranks == as_ends.tt_ranks == (1, 3, 5, 1)
    assert torch.equal(as_list.to_dense(), as_ends.to_dense())
    assert [tuple(g.shape) for g in as_list.cores] == [(1, 1, 2, 4, 3), (1, 3, 3, 2, 5), (1, 5, 4, 2, 1)]


def test_properties_are_read_only_and_config_round_trips():
    layer = TT(24, 16, 2, out_modes=(2, 8), in_modes=(6, 4), tt_rank=[5], seed=1, dtype=F64)
    for name in ("tt_ranks", "out_modes", "in_modes"):
        with pytest.raises(AttributeError):
            setattr(layer, name, (1,))
    clone = type(layer)(**layer.config())
    assert clone.tt_ranks == layer.tt_ranks and clone.dtype == F64
    clone.load_state_dict(layer.state_dict())
    x = _x(2, 3, 24)
    assert torch.equal(clone(x), layer(x))


# --------------------------------------------------------------- exactness
@pytest.mark.parametrize("folds,out,inp,unfolded,options", [
    (1, 12, 10, True, {}),
    (3, 12, 10, False, {"num_cores": 3}),
    (2, 6, 15, False, {"out_modes": (2, 3), "in_modes": (3, 5)}),
    (2, 6, 15, False, {"out_modes": (3, 2), "in_modes": (5, 3)}),
    (2, 24, 16, False, {"out_modes": (2, 3, 4), "in_modes": (2, 4, 2)}),
    (1, 16, 36, False, {"num_cores": 4}),
    (2, 7, 11, False, {}),
    (2, 8, 9, False, {"num_cores": 1}),
])
def test_full_rank_from_dense_is_exact(folds, out, inp, unfolded, options):
    w = torch.randn(folds, out, inp, generator=generator(1), dtype=F64)
    layer = TT.from_dense(w[0] if unfolded else w, **options)
    assert (layer.num_folds, layer.out_features, layer.in_features) == (folds, out, inp)
    assert layer.tt_ranks[1:-1] == bond_limits(layer.out_modes, layer.in_modes)
    x = _x(folds, 7, inp)
    assert rel(layer.to_dense(), w) < EXACT
    assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT
    assert rel(layer._left_to_right(x), x @ w.transpose(1, 2)) < EXACT
    assert rel(layer._right_to_left(x), x @ w.transpose(1, 2)) < EXACT
    assert float(layer._frobenius_sq().detach().sum()) == pytest.approx(float((w ** 2).sum()), rel=1e-12)


def test_complex_and_float32():
    g = generator(2)
    w = torch.complex(torch.randn(2, 12, 8, generator=g, dtype=F64), torch.randn(2, 12, 8, generator=g, dtype=F64))
    layer = TT.from_dense(w, num_cores=3)
    x = torch.randn(2, 4, 8, generator=g, dtype=torch.complex128)
    assert layer.dtype == torch.complex128 and rel(layer(x), x @ w.transpose(1, 2)) < EXACT
    w32 = torch.randn(2, 16, 16, generator=g)
    layer = TT.from_dense(w32, num_cores=2)
    assert layer.dtype == torch.float32 and rel(layer.to_dense(), w32) < 1e-5


def test_from_kronecker_is_two_bond_one_cores_equal_to_the_factors():
    a, b = random_factors(3, (4, 3), (2, 5), seed=3)
    layer = TT.from_kronecker(a, b)
    assert layer.out_modes == (4, 2) and layer.in_modes == (3, 5) and layer.tt_ranks == (1, 1, 1)
    assert torch.equal(layer.cores[0].detach().reshape(3, 4, 3), a)
    assert torch.equal(layer.cores[1].detach().reshape(3, 2, 5), b)
    w = kron_dense(a, b)
    x = _x(3, 6, 15)
    assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT
    assert rel(layer.to_dense(), w) < EXACT
    # Unfolded factors; cost equals the kronecker kind's fast path.
    single = TT.from_kronecker(a[0], b[0])
    assert single.num_folds == 1 and rel(single.to_dense()[0], torch.kron(a[0], b[0])) < EXACT
    assert layer.flops(5) == get("kronecker").from_kronecker(a, b).flops(5)


def test_kronecker_error_report_does_not_materialise(monkeypatch):
    a, b = random_factors(2, (6, 4), (5, 6), seed=4)
    layer = TT.from_kronecker(a, b, factor_cores=True, rank=1)
    expected = rel(layer.to_dense(), kron_dense(a, b))

    def refuse():
        raise AssertionError("materialised")

    monkeypatch.setattr(layer, "to_dense", refuse)
    assert layer.relative_error_kronecker(a, b) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("options,counts", [
    ({"factor_cores": True}, (2, 2)),
    ({"factor_cores": 3}, (3, 3)),
    ({"factor_cores": (1, 2)}, (1, 2)),
    ({"factor_modes": (((2, 2, 2), (3, 1, 3)), (None, (2, 2)))}, (3, 2)),
])
def test_factor_cores_is_exact_at_full_rank(options, counts):
    a, b = random_factors(2, (8, 9), (6, 4), seed=5)
    layer = TT.from_kronecker(a, b, **options)
    assert layer.num_cores == sum(counts)
    ranks = layer.tt_ranks
    assert ranks[counts[0]] == 1  # the bond between A's and B's cores
    w = kron_dense(a, b)
    assert rel(layer.to_dense(), w) < EXACT
    x = _x(2, 5, 36)
    assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT
    # The A-side cores alone contract back to A.
    a_part = chain_dense(list(layer.cores[:counts[0]]))[:, 0, :, :, 0]
    assert rel(a_part, a) < EXACT


def test_factor_cores_tolerance_and_error_formula():
    a = decaying_matrix(2, 16, 16, decay=0.6, seed=6)
    b = decaying_matrix(2, 9, 12, decay=0.5, seed=7)
    w = kron_dense(a, b)
    for tol in (0.3, 0.1, 0.03, 0.01):
        layer = TT.from_kronecker(a, b, factor_cores=2, tolerance=tol)
        assert layer.relative_error(w) <= tol
        assert layer.tt_ranks[2] == 1
    # Exact error split: ||A - A~||^2 ||B||^2 + ||A~||^2 ||B - B~||^2.
    layer = TT.from_kronecker(a, b, factor_cores=2, rank=2)
    at = chain_dense(list(layer.cores[:2]))[:, 0, :, :, 0].detach()
    bt = chain_dense(list(layer.cores[2:]))[:, 0, :, :, 0].detach()
    nrm = lambda t: (t ** 2).sum(dim=(1, 2))  # noqa: E731
    predicted = (nrm(a - at) * nrm(b) + nrm(at) * nrm(b - bt)).sum() / (nrm(a) * nrm(b)).sum()
    assert layer.relative_error(w) == pytest.approx(float(predicted.sqrt()), rel=1e-10)


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize("options", [
    {"out_modes": (4, 8), "in_modes": (8, 4)},  # d = 2: Eckart–Young per bond, provably monotone
    {"out_modes": (2, 4, 4), "in_modes": (4, 2, 4)},  # d = 3: monotone by interlacing
    {"num_cores": 4},
])
def test_error_non_increasing_in_rank(options):
    w = decaying_matrix(2, 32, 32, decay=0.9, seed=8)
    full = TT.from_dense(w, **options)
    errors = [TT.from_dense(w, rank=r, **options).relative_error(w) for r in range(1, max(full.tt_ranks) + 1)]
    assert all(later <= earlier * (1 + 1e-12) + 1e-15 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < EXACT and errors[0] > 0.1


@pytest.mark.parametrize("tol", [0.5, 0.2, 0.05, 1e-3])
@pytest.mark.parametrize("folds,options", [(1, {"num_cores": 3}), (3, {"num_cores": 4}), (2, {"num_cores": 2})])
def test_tolerance_is_met_with_no_larger_ranks_than_needed(tol, folds, options):
    w = decaying_matrix(folds, 24, 16, decay=0.85, seed=9) + 0.3 * _tt_weight(
        folds, (2, 3, 4), (2, 2, 4), (1, 2, 2, 1), seed=10)
    layer = TT.from_dense(w, tolerance=tol, **options)
    err = layer.relative_error(w)
    assert err <= tol
    # Independent replay of TT-SVD with numpy at the chosen ranks: each step's tail fits the
    # budget tol^2 ||W||^2 / (d-1), and one rank less would not have fitted.
    om, im, ranks = layer.out_modes, layer.in_modes, layer.tt_ranks
    d = len(om)
    total = float((w ** 2).sum())
    budget = tol ** 2 * total / (d - 1)
    c = _interleaved_np(w, om, im)
    tails_sum = 0.0
    for k in range(d - 1):
        c = c.reshape(folds, ranks[k] * om[k] * im[k], -1)
        _, s, vh = np.linalg.svd(c, full_matrices=False)
        tail = lambda r: float((s[:, r:] ** 2).sum())  # noqa: E731
        assert tail(ranks[k + 1]) <= budget * (1 + 1e-10)
        assert ranks[k + 1] == 1 or tail(ranks[k + 1] - 1) > budget
        tails_sum += tail(ranks[k + 1])
        c = s[:, :ranks[k + 1], None] * vh[:, :ranks[k + 1], :]
    # Left-orthonormal cores: the squared error is exactly the sum of the discarded tails.
    assert err ** 2 == pytest.approx(tails_sum / total, rel=1e-8, abs=1e-24)


def test_tolerance_recovers_a_low_tt_rank_weight():
    w = _tt_weight(2, (2, 3, 4), (4, 2, 3), (1, 3, 2, 1), seed=11)
    noisy = w + 1e-6 * torch.randn(w.shape, generator=generator(12), dtype=F64)
    layer = TT.from_dense(noisy, tolerance=1e-3, out_modes=(2, 3, 4), in_modes=(4, 2, 3))
    assert layer.tt_ranks == (1, 3, 2, 1)
    assert layer.relative_error(w) < 1e-5


def test_params_share_picks_the_largest_fitting_rank():
    w = torch.randn(2, 32, 48, generator=generator(13), dtype=F64)
    kw = {"out_modes": (2, 4, 4), "in_modes": (4, 3, 4)}
    for share in (0.05, 0.2, 0.6):
        layer = TT.from_dense(w, params_share=share, **kw)
        assert layer.num_params <= share * w.numel()
        r = max(layer.tt_ranks)
        if r < max(bond_limits(kw["out_modes"], kw["in_modes"])):
            assert TT.from_dense(w, rank=r + 1, **kw).num_params > share * w.numel()
    with pytest.raises(ValueError, match="params_share=0.001 allows"):
        TT.from_dense(w, params_share=0.001, **kw)


# ------------------------------------------------------------------- costs
def _built_quietly(build):
    """``build()``, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build()


def test_compression_costlier_than_dense_warns_with_the_numbers():
    w = torch.randn(2, 32, 48, generator=generator(13), dtype=F64)
    kw = {"out_modes": (2, 4, 4), "in_modes": (4, 3, 4)}
    dense = 32 * 48
    with pytest.warns(UserWarning, match=rf"multiply-adds per sample and fold, [0-9.]+x the {dense} of a dense layer"):
        costly = TT.from_dense(w, params_share=0.6, **kw)  # the largest ranks that fit 60 % of the numbers
    assert min(costly._sweep_costs()) > dense  # noqa: SLF001 -- the count the warning quotes
    cheap = _built_quietly(lambda: TT.from_dense(w, rank=2, **kw))
    assert min(cheap._sweep_costs()) <= dense  # noqa: SLF001


def test_split_factors_costlier_than_the_exact_mpo_warn():
    a, b = random_factors(2, (8, 8), (8, 8), seed=5)
    exact = min(sweep_costs((8, 8), (8, 8), (1, 1, 1)))
    with pytest.warns(UserWarning, match=rf"x the {exact} of the exact two-core MPO"):
        TT.from_kronecker(a, b, factor_cores=True)  # full ranks inside the factors
    layer = _built_quietly(lambda: TT.from_kronecker(a, b, factor_cores=True, rank=1))
    assert min(layer._sweep_costs()) <= exact  # noqa: SLF001


def test_params_and_flops_hand_counts():
    f, bsz = 3, 5
    two = TT(10, 12, f, out_modes=(3, 4), in_modes=(2, 5), tt_rank=4, seed=0)
    assert two.num_params == f * (1 * 3 * 2 * 4 + 4 * 4 * 5 * 1)  # 312
    # right-to-left: core 2: B*(m2)*(n1 n2)*r1 = 4*10*4 = 160; core 1: (m1 m2)*(n1)*r1 = 12*2*4 = 96
    # left-to-right: core 1: (m1)*(n1 n2)*r1 = 3*10*4 = 120; core 2: (m1 m2)*(n2)*r1 = 12*5*4 = 240
    assert two._sweep_costs() == (256, 360)
    three = TT(16, 12, f, out_modes=(2, 3, 2), in_modes=(2, 2, 4), tt_rank=[3, 2], seed=0)
    assert three.num_params == f * (1 * 2 * 2 * 3 + 3 * 3 * 2 * 2 + 2 * 2 * 4 * 1)  # 3 * 64
    # rtl: k1: 12*2*1*3 = 72, k2: 6*4*3*2 = 144, k3: 2*16*2*1 = 64  -> 280
    # ltr: k1: 2*16*3 = 96,   k2: 6*8*3*2 = 288,  k3: 12*4*2 = 96  -> 480
    assert three._sweep_costs() == (280, 480)
    flipped = TT(10, 12, f, out_modes=(4, 3), in_modes=(5, 2), tt_rank=4, seed=0)
    rtl, ltr = flipped._sweep_costs()
    assert ltr < rtl
    for layer in (two, three, flipped):
        orders = {o.name: o for o in layer.orders(bsz)}
        rtl, ltr = layer._sweep_costs()
        assert orders["sweep right-to-left"].macs == bsz * f * rtl
        assert orders["sweep left-to-right"].macs == bsz * f * ltr
        # the search includes both sweeps, so it never does worse
        assert orders["searched order"].macs <= bsz * f * min(rtl, ltr)
        assert layer.flops(bsz) == layer.order(bsz).macs
        assert layer.order(bsz).cost == min(o.cost for o in orders.values())
        # The reported count is exactly what the forward's GEMMs do, in every order.
        x = _x(f, bsz, layer.in_features, dtype=torch.float32)
        for order in orders.values():
            with FlopCounterMode(display=False) as counter:
                layer.forward_in(order, x)
            assert counter.get_total_flops() == 2 * order.macs, order.name
        with FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == 2 * layer.flops(bsz)
    # two at batch 5: fewer multiply-adds than either sweep (5 * 3 * 256 = 3840) has contracting
    # the two cores first (m1 n1 r1 m2 n2 = 480 per fold, once), then applying W (120 per sample)
    assert min(o.macs for o in two.orders(bsz)) == f * 3 * 2 * 4 * 4 * 5 + bsz * f * 12 * 10 == 3240
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        two.flops(0)


def test_chunked_forward_matches_one_pass(monkeypatch):
    w = torch.randn(2, 24, 18, generator=generator(16), dtype=F64)
    layer = TT.from_dense(w, num_cores=3)
    x = _x(2, 37, 18).requires_grad_(True)
    rtl, ltr = layer._sweep_costs()
    one_pass = layer._right_to_left(x) if rtl <= ltr else layer._left_to_right(x)
    (grad_one,) = torch.autograd.grad(one_pass.sum(), x)
    per_sample = 2 * layer._largest_intermediate(rtl <= ltr)
    monkeypatch.setattr(tt_module, "CHUNK_ELEMENTS", 5 * per_sample)  # chunks of 5 samples
    with FlopCounterMode(display=False) as counter:
        chunked = layer(x)
    assert counter.get_total_flops() == 2 * layer.flops(37)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), x)
    assert rel(chunked, one_pass) < 1e-14 and rel(grad_chunked, grad_one) < 1e-14
    assert rel(chunked, x @ w.transpose(1, 2)) < EXACT


class _Method(torch.nn.Module):
    """Routes functional_call to any method of the wrapped layer (forward, a sweep, to_dense)."""

    def __init__(self, layer, method):
        super().__init__()
        self.inner, self.method = layer, method

    def forward(self, *args):
        return getattr(self.inner, self.method)(*args)


@pytest.mark.parametrize("method", ["forward", "_right_to_left", "_left_to_right", "to_dense"])
def test_gradcheck_tiny(method):
    layer = TT(6, 4, 2, out_modes=(2, 1, 2), in_modes=(1, 3, 2), tt_rank=2, seed=1, dtype=F64)
    wrapper = _Method(layer, method)
    names = [n for n, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in wrapper.parameters())
    x = _x(2, 3, 6).requires_grad_(True)
    inputs = () if method == "to_dense" else (x,)

    def fn(*args):
        return torch.func.functional_call(wrapper, dict(zip(names, args[len(inputs):])), args[:len(inputs)])

    assert torch.autograd.gradcheck(fn, inputs + params)


# -------------------------------------------------------------------- init
def test_init_variance_matches_nn_linear():
    """Var(W_ij) = 1/(3 in) by construction. Folds are independent draws, so the per-fold
    estimates v_f = mean(W_f^2) * 3 in are i.i.d. with mean 1; their average must lie within
    4 standard errors of 1 (a false alarm about once in 15 000 seeds), and the standard
    error is below 0.03, so the test would catch a 12% miscalibration."""
    folds, inp, out = 200, 64, 48
    layer = TT(inp, out, folds, tt_rank=4, seed=0, dtype=F64)
    w = layer.to_dense().detach()
    v = (w ** 2).mean(dim=(1, 2)) * 3 * inp
    se = float(v.std()) / math.sqrt(folds)
    assert se < 0.03
    assert abs(float(v.mean()) - 1.0) < 4 * se
    # Output variance for unit-variance inputs, the quantity nn.Linear's init fixes (1/3).
    y = layer(_x(folds, 64, inp, seed=14)).detach()
    per_fold = y.pow(2).mean(dim=(1, 2)) * 3
    se_y = float(per_fold.std()) / math.sqrt(folds)
    assert abs(float(per_fold.mean()) - 1.0) < 4 * se_y and se_y < 0.03
    # Every core's std follows 3^(-1/d) / (n_k r_k).
    for g, n, r in zip(layer.cores, layer.in_modes, layer.tt_ranks[1:]):
        expected = 3 ** (-1 / 3) / (n * r)
        assert float(g.detach().var()) == pytest.approx(expected, rel=0.1)


# ------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_with_clear_messages():
    w = torch.randn(12, 10, dtype=F64)
    with pytest.raises(ValueError, match=r"out_modes \(2, 5\) multiply to 10, but out_features is 12"):
        TT(10, 12, out_modes=(2, 5))
    with pytest.raises(ValueError, match=r"in_modes \(3, 3\) multiply to 9, but in_features is 10"):
        TT.from_dense(w, in_modes=(3, 3))
    with pytest.raises(ValueError, match="out_modes and in_modes must have the same length"):
        TT(10, 12, out_modes=(2, 2, 3), in_modes=(2, 5))
    with pytest.raises(ValueError, match="num_cores=3 disagrees"):
        TT(10, 12, out_modes=(3, 4), num_cores=3)
    with pytest.raises(ValueError, match="tt_rank must be a positive int, got 0"):
        TT(10, 12, tt_rank=0)
    with pytest.raises(ValueError, match=r"tt_rank\[1\] must be a positive int, got -2"):
        TT(16, 16, num_cores=3, tt_rank=[2, -2])
    with pytest.raises(ValueError, match="2 bond ranks, or 4 ranks with ones at the ends"):
        TT(16, 16, num_cores=3, tt_rank=[2, 2, 2])
    with pytest.raises(ValueError, match="must start and end with 1"):
        TT(16, 16, num_cores=3, tt_rank=[2, 2, 2, 2])
    with pytest.raises(ValueError, match="bond rank 9 of bond 1 exceeds its largest useful rank 4"):
        TT(16, 16, out_modes=(2, 8), in_modes=(2, 8), tt_rank=[9])
    with pytest.raises(ValueError, match="tt_rank 70 exceeds the largest useful bond rank"):
        TT(16, 16, num_cores=2, tt_rank=70)
    with pytest.raises(TypeError, match="tt_rank must be an int or a list"):
        TT(16, 16, tt_rank="8")
    with pytest.raises(TypeError, match=r"out_modes\[0\] must be a positive int"):
        TT(16, 16, out_modes=(4.0, 4))
    with pytest.raises(ValueError, match="give at most one of rank, tolerance, params_share; got rank, tolerance"):
        TT.from_dense(w, rank=2, tolerance=0.1)
    with pytest.raises(ValueError, match="rank 11 exceeds the largest possible rank"):
        TT.from_dense(w, rank=11)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        TT.from_dense(w, rank=0)
    with pytest.raises(ValueError, match="single-core TT has no bonds"):
        TT.from_dense(w, num_cores=1, tolerance=0.1)
    a, b = random_factors(1, (4, 3), (2, 5), seed=15)
    with pytest.raises(ValueError, match="exact at bond dimension 1"):
        TT.from_kronecker(a, b, rank=2)
    with pytest.raises(ValueError, match="give at most one of rank, tolerance, params_share"):
        TT.from_kronecker(a, b, factor_cores=True, rank=1, params_share=0.5)
    with pytest.raises(ValueError, match=r"factor A out_modes \(2, 3\) multiply to 6, but factor A out_features is 4"):
        TT.from_kronecker(a, b, factor_modes=(((2, 3), None), None))
    with pytest.raises(ValueError, match="factor_cores must be True, a positive int, or a pair"):
        TT.from_kronecker(a, b, factor_cores=(1, 2, 3))
    layer = TT(10, 12, seed=0)
    with pytest.raises(ValueError, match=r"expects input of shape \(F=1, B, in_features=10\)"):
        layer(torch.randn(1, 3, 12))


# ------------------------------------------------------------------ tensorly
@pytest.mark.parametrize("options", [{"num_cores": 2}, {"num_cores": 3}, {"out_modes": (2, 3, 4, 2), "in_modes": (3, 2, 2, 4)}])
def test_tensorly_tt_matrix_keeps_the_tt_svd_result(options):
    """from_dense decomposes with tensorly; at the same bond ranks its error is the one of the
    project's own TT-SVD (linalg.tt.tt_svd) to 1e-10, and so is the weight it represents."""
    w = decaying_matrix(2, 48, 48, decay=0.9, seed=17)
    for rank in (1, 3, 7):
        layer = TT.from_dense(w, rank=rank, **options)
        om, im = layer.out_modes, layer.in_modes
        own, _ = tt_svd(interleave(w, om, im), [m * n for m, n in zip(om, im)], rank=rank)
        reference = TT._from_cores(unflatten_cores(own, om, im))
        assert reference.tt_ranks == layer.tt_ranks
        assert abs(layer.relative_error(w) - reference.relative_error(w)) < 1e-10
        assert rel(layer.to_dense(), reference.to_dense()) < 1e-10


def test_tensorly_backend_is_left_as_the_user_set_it():
    import tensorly as tl

    w = decaying_matrix(1, 16, 16, decay=0.8, seed=18)
    before = tl.get_backend()
    tl.set_backend("numpy")
    try:
        TT.from_dense(w, rank=2)
        assert tl.get_backend() == "numpy"
    finally:
        tl.set_backend(before)
