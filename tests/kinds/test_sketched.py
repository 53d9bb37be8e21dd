"""The ``sketched`` kind: unbiasedness and variance, exact options, Kronecker path, bookkeeping, errors.

Statistical tests use fixed seeds, so they are deterministic; the bounds are stated
next to each and chosen so that a correct implementation passes them with a wide
margin while a biased estimator or a wrong variance would not.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import structlayers.kinds.sketched  # noqa: F401  (registers the kind)
import structlayers as sl
from structlayers.kinds.sketched import Sketched
from structlayers.linalg import kron_dense
from structlayers.linalg.sketch import SKETCHES, expected_relative_error

from ..helpers import decaying_matrix, generator, random_factors, rel

EXACT = 1e-10
SEEDS = 200  # independent seeds for the statistical tests
FOLDS = 8  # each seed builds FOLDS independent draws (folds have independent sketches)


def _big(fn, *args, **kwargs):
    """Call with allow_larger=True and its UserWarning silenced: the small test matrices
    make most option sets larger than dense (the warning itself is tested below)."""
    kwargs.setdefault("allow_larger", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _draws(w: torch.Tensor, **options) -> torch.Tensor:
    """SEEDS * FOLDS independent to_dense() estimates of W (out, in): shape (N, out, in)."""
    wf = w.expand(FOLDS, -1, -1)
    with torch.no_grad():
        est = [_big(Sketched.from_dense, wf, seed=s, **options).to_dense() for s in range(SEEDS)]
    return torch.cat(est)


# --------------------------------------------------------------- statistics
@pytest.mark.parametrize("sketch,k", [("gaussian", 2), ("sign", 2), ("sparse", 2), ("orthogonal", 3)])
def test_unbiased_estimate_mean_approaches_w(sketch, k):
    w = torch.randn(8, 6, generator=generator(0), dtype=torch.float64)
    est = _draws(w, num_terms=1, low_rank=k, sketch=sketch)
    n = est.shape[0]
    per_draw = ((est - w) ** 2).sum((1, 2)) / (w**2).sum()  # squared relative error of each draw
    expected = expected_relative_error(6, 8, num_terms=1, low_rank=k, sketch=sketch) ** 2
    # The closed-form variance: the sample mean of the squared error is within 4 of its own
    # standard errors (estimated from the draws) of the formula.
    se = float(per_draw.std()) / math.sqrt(n)
    assert abs(float(per_draw.mean()) - expected) < 4 * se, (float(per_draw.mean()), expected, se)
    # Unbiasedness: E||mean - W||^2 = expected ||W||^2 / n for independent unbiased draws. We
    # require ||mean - W|| <= 3 RMS standard errors; by Markov's inequality an unbiased estimator
    # fails this with probability <= 1/9 whatever its distribution (observed ratios: 0.5..1.9 of 1).
    # The bound is about 0.1 ||W|| here, while one draw is off by sqrt(expected) >= 0.8 ||W||.
    bias_sq = float(((est.mean(0) - w) ** 2).sum() / (w**2).sum())
    assert bias_sq <= 9 * expected / n, (bias_sq, expected / n)
    assert math.sqrt(9 * expected / n) < 0.2 * math.sqrt(expected)


@pytest.mark.parametrize("sketch", ["gaussian", "sign"])
def test_variance_falls_like_one_over_num_terms(sketch):
    w = torch.randn(8, 6, generator=generator(1), dtype=torch.float64)
    mse = {}
    for terms in (1, 4):
        est = _draws(w, num_terms=terms, low_rank=2, sketch=sketch)
        mse[terms] = float(((est - w) ** 2).sum((1, 2)).mean() / (w**2).sum())
    # Independent terms: the MSE is exactly (c_out + c_in) / (4L), so the ratio is 4. Each MSE is a
    # mean of 1600 draws with coefficient of variation <= 0.75, i.e. standard error <= 2%; the
    # ratio's is <= 3%, and we allow 10% (more than 3 standard errors).
    assert mse[1] / mse[4] == pytest.approx(4.0, rel=0.10), mse
    assert mse[4] == pytest.approx(expected_relative_error(6, 8, num_terms=4, low_rank=2, sketch=sketch) ** 2,
                                   rel=0.10)


def test_projection_fit_is_the_least_squares_optimum():
    w = decaying_matrix(1, 9, 7, decay=0.9, seed=2)[0]
    for seed in range(3):
        proj = _big(Sketched.from_dense, w, num_terms=2, low_rank=1, fit="projection", seed=seed)
        unb = _big(Sketched.from_dense, w, num_terms=2, low_rank=1, fit="unbiased", seed=seed)
        assert torch.equal(proj.u1, unb.u1) and torch.equal(proj.u2, unb.u2)
        # Independent reference: the residual of the best fit in {U1^T X + Y U2} is
        # (I - P) W (I - Q), P / Q projecting on the stacked sketches' row spaces.
        u1 = proj.u1[0].reshape(-1, 9).numpy()
        u2 = proj.u2[0].reshape(-1, 7).numpy()
        p = u1.T @ np.linalg.pinv(u1.T)
        q = np.linalg.pinv(u2) @ u2
        residual = (np.eye(9) - p) @ w.numpy() @ (np.eye(7) - q)
        best = np.linalg.norm(residual) / np.linalg.norm(w.numpy())
        assert proj.relative_error(w) == pytest.approx(best, rel=1e-10)
        assert proj.relative_error(w) < 1.0
        assert proj.relative_error(w) <= unb.relative_error(w)


def test_projection_expected_error_formula():
    w = torch.randn(10, 8, generator=generator(3), dtype=torch.float64)
    est = _draws(w, num_terms=2, low_rank=2, fit="projection")
    per_draw = ((est - w) ** 2).sum((1, 2)) / (w**2).sum()
    expected = expected_relative_error(8, 10, num_terms=2, low_rank=2, fit="projection") ** 2
    assert expected == pytest.approx((1 - 4 / 10) * (1 - 4 / 8))
    se = float(per_draw.std()) / math.sqrt(per_draw.numel())
    assert abs(float(per_draw.mean()) - expected) < 4 * se


@pytest.mark.parametrize("sketch", SKETCHES)
def test_random_init_matches_linear_variance(sketch):
    # E[W~_ij^2] = 1/(3 in) by construction (nn.Linear's variance). Over 40 seeds the mean of
    # 3 in * mean(W~^2) is within 4 standard errors (estimated from the seeds, about 1%) of 1, and
    # so is the output's 3 * mean(y^2) for unit-variance inputs.
    weights, outputs = [], []
    for seed in range(40):
        layer = Sketched(64, 48, 2, num_terms=3, low_rank=2, sketch=sketch, seed=seed, dtype=torch.float64)
        x = torch.randn(2, 128, 64, generator=generator(100 + seed), dtype=torch.float64)
        with torch.no_grad():
            weights.append(float((layer.to_dense() ** 2).mean()) * 3 * 64)
            outputs.append(float((layer(x) ** 2).mean()) * 3)
    for values in (torch.tensor(weights), torch.tensor(outputs)):
        se = float(values.std()) / math.sqrt(values.numel())
        assert se < 0.03
        assert abs(float(values.mean()) - 1.0) < 4 * se, (float(values.mean()), se)


# --------------------------------------------------------------- exactness
@pytest.mark.parametrize("out,inp", [(12, 10), (6, 15), (7, 7)])
@pytest.mark.parametrize("terms,extra", [(1, 0), (3, 2)])
def test_orthogonal_sketch_at_full_size_is_exact(out, inp, terms, extra):
    w = torch.randn(2, out, inp, generator=generator(4), dtype=torch.float64)
    k = max(out, inp) + extra
    layer = _big(Sketched.from_dense, w, num_terms=terms, low_rank=k, sketch="orthogonal", seed=5)
    eye_out = torch.eye(out, dtype=torch.float64)
    assert torch.allclose(layer.u1.transpose(-1, -2) @ layer.u1, eye_out.expand_as(eye_out), atol=1e-13)
    assert rel(layer.to_dense(), w) < EXACT
    x = torch.randn(2, 4, inp, generator=generator(6), dtype=torch.float64)
    assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT


@pytest.mark.parametrize("sketch", ["gaussian", "sign", "orthogonal"])
def test_projection_fit_is_exact_once_terms_span(sketch):
    w = torch.randn(12, 9, generator=generator(8), dtype=torch.float64)
    layer = _big(Sketched.from_dense, w, num_terms=3, low_rank=3, sketch=sketch, fit="projection", seed=9)
    assert rel(layer.to_dense()[0], w) < EXACT


def test_concatenated_forward_equals_the_sum_of_terms():
    layer = _big(Sketched, 7, 5, 2, num_terms=3, low_rank=2, dtype=torch.float64, seed=10)
    reference = sum(layer.u1[:, i].transpose(1, 2) @ layer.s1[:, i] + layer.s2[:, i] @ layer.u2[:, i]
                    for i in range(3)) / 6
    assert rel(layer.to_dense(), reference) < EXACT
    x = torch.randn(2, 11, 7, generator=generator(11), dtype=torch.float64)
    assert rel(layer(x), x @ reference.transpose(1, 2)) < EXACT


@pytest.mark.parametrize("fit", ["unbiased", "projection"])
def test_num_terms_is_a_reparametrisation_for_gaussian_sketches(fit):
    # (L, k) = (2, 2) and (4, 1) draw the same normals in the same order; the stacked sketches
    # differ only by a scale, so both fits give the same W~ (see the module docstring).
    w = torch.randn(3, 8, 6, generator=generator(30), dtype=torch.float64)
    two = _big(Sketched.from_dense, w, num_terms=2, low_rank=2, fit=fit, seed=31)
    four = _big(Sketched.from_dense, w, num_terms=4, low_rank=1, fit=fit, seed=31)
    assert rel(two.to_dense(), four.to_dense()) < EXACT
    assert two.flops(3) == four.flops(3) and two.num_params == four.num_params


# -------------------------------------------------------------- Kronecker
@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("fit", ["unbiased", "projection"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_from_kronecker_matches_from_dense(sketch, fit, dtype):
    a, b = random_factors(2, (4, 3), (3, 5), seed=12, dtype=dtype)  # out 12, in 15
    w = kron_dense(a, b)
    options = dict(num_terms=2, low_rank=3, sketch=sketch, fit=fit, seed=13)
    via_kron = _big(Sketched.from_kronecker, a, b, **options)
    via_dense = _big(Sketched.from_dense, w, **options)
    assert via_kron.dtype == dtype
    assert torch.equal(via_kron.u1, via_dense.u1) and torch.equal(via_kron.u2, via_dense.u2)
    assert rel(via_kron.s1, via_dense.s1) < EXACT and rel(via_kron.s2, via_dense.s2) < EXACT
    assert rel(via_kron.to_dense(), via_dense.to_dense()) < EXACT
    # The non-materialising error report uses the layer's low-rank form.
    assert via_kron.relative_error_kronecker(a, b) == pytest.approx(via_kron.relative_error(w), rel=1e-8)


def test_from_kronecker_orthogonal_is_exact_for_complex():
    a, b = random_factors(1, (2, 3), (3, 2), seed=14, dtype=torch.complex128)
    layer = _big(Sketched.from_kronecker, a[0], b[0], low_rank=6, sketch="orthogonal", seed=15)
    assert rel(layer.to_dense()[0], torch.kron(a[0], b[0])) < EXACT


# ------------------------------------------------------------ bookkeeping
def test_hand_counts_params_buffers_flops_config():
    f, out, inp, terms, k, batch = 3, 20, 18, 2, 2, 5
    layer = Sketched(inp, out, f, num_terms=terms, low_rank=k, seed=16)
    assert layer.s1.shape == (3, 2, 2, 18) and layer.s2.shape == (3, 2, 20, 2)
    assert layer.u1.shape == (3, 2, 2, 20) and layer.u2.shape == (3, 2, 2, 18)
    # learnable: S1 L*k*in + S2 L*out*k = 2*2*18 + 2*20*2 = 152 per fold
    assert layer.num_params == 3 * 152
    # fixed sketches: U1 L*k*out + U2 L*k*in = 80 + 72 = 152 per fold
    assert layer.num_buffers == 3 * 152
    # x (18) -> 2Lk = 8 wide: 8*18 = 144; -> out: 8*20 = 160; 304 per sample per fold
    assert layer.orders(batch)[0].macs == 5 * 3 * 304  # the two GEMMs (tiny W: the forward may rebuild it)
    x = torch.randn(f, batch, inp, generator=generator(17))
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * layer.flops(batch)  # the counter counts mul and add
    assert layer.config() == {"in_features": 18, "out_features": 20, "num_folds": 3, "dtype": torch.float32,
                              "num_terms": 2, "low_rank": 2, "sketch": "gaussian", "allow_larger": False}
    assert (layer.num_terms, layer.low_rank, layer.sketch) == (2, 2, "gaussian")
    assert not any(t.requires_grad for t in layer.buffers())


def test_state_dict_round_trip_includes_sketches():
    a, b = random_factors(2, (4, 3), (3, 4), seed=18)
    layer = _big(Sketched.from_kronecker, a, b, num_terms=2, low_rank=1, sketch="sign", seed=19)
    state = layer.state_dict()
    assert set(state) == {"s1", "s2", "u1", "u2"}
    clone = Sketched(**layer.config(), seed=20)
    assert not torch.equal(clone.u1, layer.u1)
    clone.load_state_dict(state)
    assert torch.equal(clone.u1, layer.u1) and torch.equal(clone.u2, layer.u2)
    x = torch.randn(2, 4, 12, generator=generator(21), dtype=torch.float64)
    assert torch.equal(clone(x), layer(x))
    with pytest.raises(RuntimeError, match="u1"):
        clone.load_state_dict({k: v for k, v in state.items() if k != "u1"})


def test_gradcheck_tiny():
    layer = _big(Sketched, 3, 2, 2, num_terms=2, low_rank=1, sketch="orthogonal", dtype=torch.float64, seed=22)
    x = torch.randn(2, 3, 3, generator=generator(23), dtype=torch.float64, requires_grad=True)
    s1 = layer.s1.detach().clone().requires_grad_(True)
    s2 = layer.s2.detach().clone().requires_grad_(True)

    def fn(x, s1, s2):
        return torch.func.functional_call(layer, {"s1": s1, "s2": s2}, (x,))

    assert torch.autograd.gradcheck(fn, (x, s1, s2))


def test_seed_and_generator_reproducibility():
    one = Sketched(10, 6, num_terms=1, low_rank=1, sketch="sparse", seed=24)
    two = Sketched(10, 6, num_terms=1, low_rank=1, sketch="sparse", generator=torch.Generator().manual_seed(24))
    assert torch.equal(one.u1, two.u1) and torch.equal(one.s2, two.s2)
    w = torch.randn(6, 10, generator=generator(25))
    assert torch.equal(Sketched.from_dense(w, low_rank=1, seed=3).s1, Sketched.from_dense(w, low_rank=1, seed=3).s1)
    assert not torch.equal(Sketched.from_dense(w, low_rank=1, seed=3).u1, Sketched.from_dense(w, low_rank=1, seed=4).u1)


# ------------------------------------------------------------------ budgets
def test_budget_options():
    w = torch.randn(30, 40, generator=generator(27), dtype=torch.float64)
    assert Sketched.from_dense(w, rank=3, seed=0).low_rank == 3  # rank is an alias of low_rank
    # params_share 0.5: 2*L*k*70 <= 600 -> k = 4 for L = 1, k = 2 for L = 2
    assert Sketched.from_dense(w, params_share=0.5, seed=0).low_rank == 4
    two = Sketched.from_dense(w, params_share=0.5, num_terms=2, seed=0)
    assert (two.num_terms, two.low_rank) == (2, 2)
    assert two.num_params + two.num_buffers <= 0.5 * two.dense_params
    # tolerance: the smallest k whose expected error meets it (here the projection fit).
    layer = _big(Sketched.from_dense, w, tolerance=0.6, fit="projection", seed=0)
    k = layer.low_rank
    assert expected_relative_error(40, 30, num_terms=1, low_rank=k, fit="projection") <= 0.6
    assert expected_relative_error(40, 30, num_terms=1, low_rank=k - 1, fit="projection") > 0.6
    # unbiased gaussian: (31 + 41) / (4 k) <= 0.9^2 -> k = ceil(22.2) = 23
    assert _big(Sketched.from_dense, w, tolerance=0.9, seed=0).low_rank == 23
    # tolerance 0 with orthogonal sketches: k = max(out, in), exact
    exact = _big(Sketched.from_dense, w, tolerance=0.0, sketch="orthogonal", seed=0)
    assert exact.low_rank == 40 and exact.relative_error(w) < EXACT


def test_at_dense_size_is_allowed_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = Sketched(12, 12, num_terms=1, low_rank=3, seed=0)  # 2*1*3*24 = 144 = 12*12
    assert layer.num_params + layer.num_buffers == layer.dense_params


def test_larger_than_dense_raises_or_warns():
    numbers = re.escape("2*L*k*(in+out) = 2*1*6*(10+12) = 264 numbers per fold (132 learnable + 132 fixed")
    with pytest.raises(ValueError, match=numbers + r".*more than the 120 = 12\*10 \(out_features\*in_features\) of a dense layer.*allow_larger=True"):
        Sketched(10, 12, num_terms=1, low_rank=6, seed=0)
    w = torch.randn(12, 10, generator=generator(28))
    with pytest.raises(ValueError, match=numbers):
        Sketched.from_dense(w, low_rank=6, seed=0)
    with pytest.raises(ValueError, match=r"chosen for tolerance=0.5"):
        Sketched.from_dense(w, tolerance=0.5, seed=0)
    with pytest.warns(UserWarning, match="stores more than a dense layer: " + numbers):
        layer = Sketched(10, 12, num_terms=1, low_rank=6, allow_larger=True, seed=0)
    assert layer.config()["allow_larger"] is True
    with pytest.warns(UserWarning, match="stores more than a dense layer"):
        sl.from_dense("sketched", w, low_rank=6, allow_larger=True, seed=0)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(num_terms=0, low_rank=1), ValueError, "num_terms must be a positive int, got 0"),
    (dict(num_terms=-2, low_rank=1), ValueError, "num_terms must be a positive int, got -2"),
    (dict(num_terms=1.5, low_rank=1), TypeError, "num_terms must be a positive int"),
    (dict(num_terms=1, low_rank=0), ValueError, "low_rank must be a positive int, got 0"),
    (dict(num_terms=1, low_rank=1, sketch="srht"), ValueError,
     "unknown sketch 'srht'; choose one of 'gaussian', 'sign', 'sparse', 'orthogonal'"),
    (dict(num_terms=1, low_rank=1, allow_larger="yes"), TypeError, "allow_larger must be a bool"),
    (dict(num_terms=1, low_rank=1, dtype=torch.int64), TypeError, "dtype must be a floating-point or complex"),
    (dict(num_terms=1, low_rank=1, seed=1, generator=torch.Generator()), ValueError, "give seed or generator, not both"),
])
def test_bad_constructor_input(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Sketched(10, 12, **kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(), ValueError, "sketched needs low_rank (or rank, tolerance or params_share)"),
    (dict(low_rank=2, num_terms=0), ValueError, "num_terms must be a positive int, got 0"),
    (dict(low_rank=2, sketch="gauss"), ValueError, "unknown sketch 'gauss'"),
    (dict(low_rank=2, fit="svd"), ValueError, "unknown fit 'svd'; choose one of 'unbiased', 'projection'"),
    (dict(low_rank=2, rank=3), ValueError, "rank is an alias of low_rank for sketched layers; got rank=3 and low_rank=2"),
    (dict(low_rank=2, params_share=0.5), ValueError, "give low_rank or one of tolerance / params_share, not both"),
    (dict(rank=2, params_share=0.5), ValueError, "give at most one of rank, tolerance, params_share"),
    (dict(params_share=0.01), ValueError, "params_share=0.01 allows 1.2 stored numbers per fold (of a dense "
     "layer's 120), but the smallest sketched layer, num_terms=1 and low_rank=1, stores 2*L*(in+out) = 44"),
    (dict(params_share=1.5), ValueError, "params_share must be in (0, 1], got 1.5"),
    (dict(tolerance=0.0), ValueError, "tolerance=0 is unreachable with random 'gaussian' sketches"),
    (dict(tolerance=-0.1), ValueError, "tolerance must be in [0, 1), got -0.1"),
])
def test_bad_from_dense_input(kwargs, error, message):
    w = torch.randn(12, 10, generator=generator(29))
    with pytest.raises(error, match=re.escape(message)):
        Sketched.from_dense(w, **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match="non-finite"):
        Sketched.from_dense(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), low_rank=1)
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        Sketched.from_dense([[1.0]], low_rank=1)
    with pytest.raises(ValueError, match="A and B must have the same number of folds"):
        Sketched.from_kronecker(torch.ones(2, 2, 2), torch.ones(3, 2, 2), low_rank=1)
    layer = Sketched(10, 12, 2, num_terms=1, low_rank=1, seed=0)
    with pytest.raises(ValueError, match=re.escape("expects input of shape (F=2, B, in_features=10), got (2, 3, 9)")):
        layer(torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        layer.flops(0)
