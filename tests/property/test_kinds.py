"""Properties of every registered kind (``structlayers.available()``, so a new kind is in at once).

Shapes, folds, dtypes, scales, ranks, budgets and seeds are generated; the capability
attributes say which promises a kind makes (exactness, optimality in a rank option,
tolerances met). The invalid-argument property reads the option names from each
constructor's signature and tries junk for one of them at a time: the call succeeds, or
raises a ValueError / TypeError whose message names that option.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import structlayers as sl
from structlayers.linalg import kron_dense
from structlayers.testing import decaying_matrix

from ..kind_specs import SPECS
from .settings import bounded

KINDS = sl.available()
EXACT = 1e-9


def _tensor(seed: int, shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 9)
folds = st.integers(1, 3)
composite = st.sampled_from([4, 6, 8, 9, 12])  # sizes every kind's small init options fit


def quiet(call):
    """Run ``call`` with the kinds' advisory UserWarnings (tt costlier than dense, sketched
    larger than dense) silenced: they are about cost, not correctness."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return call()


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", KINDS)
@bounded(30)
@given(f=folds, out=dims, inp=dims, seed=seeds)
def test_full_rank_from_dense_is_exact_in_float64(kind, f, out, inp, seed):
    w = _tensor(seed, (f, out, inp))
    for options in SPECS[kind]["full_dense"](w):
        layer = quiet(lambda: sl.from_dense(kind, w, **options))
        assert layer.relative_error(w) < EXACT, options
        x = _tensor(seed + 1, (f, 3, inp))
        assert torch.allclose(layer(x), x @ w.transpose(1, 2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@bounded(30)
@given(f=folds, a1=st.integers(1, 4), a2=st.integers(1, 4), b1=st.integers(1, 4), b2=st.integers(1, 4), seed=seeds)
def test_full_rank_from_kronecker_is_exact_in_float64(kind, f, a1, a2, b1, b2, seed):
    a, b = _tensor(seed, (f, a1, a2)), _tensor(seed + 1, (f, b1, b2))
    w = kron_dense(a, b)
    for options in SPECS[kind]["full_kron"](a, b):
        layer = quiet(lambda: sl.from_kronecker(kind, a, b, **options))
        assert layer.relative_error(w) < EXACT, options


# ------------------------------------------------------------------ ranks and tolerances
OPTIMAL = [k for k in KINDS if sl.get(k).optimal_rank_option]


@pytest.mark.parametrize("kind", OPTIMAL)
@bounded(30)
@given(f=folds, out=st.integers(2, 10), inp=st.integers(2, 10), seed=seeds, decay=st.floats(0.3, 1.0))
def test_errors_do_not_increase_with_the_optimal_rank_option(kind, f, out, inp, seed, decay):
    w = decaying_matrix(f, out, inp, decay=decay, seed=seed)
    option = sl.get(kind).optimal_rank_option
    errors = []
    for r in range(1, max(out, inp) + 1):
        try:
            errors.append(sl.from_dense(kind, w, **{option: r}).relative_error(w))
        except ValueError as exc:
            assert option in str(exc)  # beyond the largest rank of the layout
            break
    assert errors and all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < EXACT  # the largest rank of the layout is exact


MATRIX_OPTIMAL = [k for k in OPTIMAL if sl.get(k).rank_is_matrix_rank and sl.get(k).optimal_rank_option == "rank"]


@pytest.mark.parametrize("kind", MATRIX_OPTIMAL)
@bounded(30)
@given(f=folds, out=st.integers(2, 10), inp=st.integers(2, 10), seed=seeds, data=st.data())
def test_matrix_rank_optimal_kinds_reach_the_eckart_young_optimum(kind, f, out, inp, seed, data):
    w = _tensor(seed, (f, out, inp))
    r = data.draw(st.integers(1, min(out, inp)), label="rank")
    assert sl.from_dense(kind, w, rank=r).relative_error(w) == pytest.approx(
        sl.optimal_relative_error(w, r), rel=1e-9, abs=1e-12)
    a, b = _tensor(seed, (f, 3, 2)), _tensor(seed + 1, (f, 2, 3))
    r = data.draw(st.integers(1, 4), label="kronecker rank")
    assert sl.from_kronecker(kind, a, b, rank=r).relative_error_kronecker(a, b) == pytest.approx(
        sl.optimal_relative_error_kronecker(a, b, r), rel=1e-6, abs=1e-7)


TOLERANT = [k for k in KINDS if sl.get(k).meets_tolerance]


@pytest.mark.parametrize("kind", TOLERANT)
@bounded(40)
@given(f=folds, out=st.integers(2, 12), inp=st.integers(2, 12), seed=seeds, decay=st.floats(0.2, 1.0),
       tolerance=st.floats(0.0, 0.95), dtype=st.sampled_from([torch.float32, torch.float64]),
       exponent=st.integers(-60, 60))
def test_tolerances_are_met_at_any_scale(kind, f, out, inp, seed, decay, tolerance, dtype, exponent):
    # float64: 1e-290 .. 1e290; float32: 1e-30 .. 1e30 (its range ends near 3e38)
    scale = 10.0 ** (exponent * 29 // 6 if dtype == torch.float64 else exponent // 2)
    w = (decaying_matrix(f, out, inp, decay=decay, seed=seed) * scale).to(dtype)
    layer = quiet(lambda: sl.from_dense(kind, w, tolerance=tolerance))
    rounding = 0.0 if dtype == torch.float64 else 1e-5
    assert layer.dtype == dtype
    assert layer.relative_error(w) <= tolerance * (1 + 1e-9) + rounding + 1e-12


# --------------------------------------------------------------- errors and randomness
@pytest.mark.parametrize("kind", KINDS)
@bounded(30)
@given(f=folds, a1=st.integers(1, 4), a2=st.integers(1, 4), b1=st.integers(1, 4), b2=st.integers(1, 4),
       seed=seeds, exponent=st.integers(-100, 100))
def test_kronecker_error_equals_the_materialised_error(kind, f, a1, a2, b1, b2, seed, exponent):
    a, b = _tensor(seed, (f, a1, a2)) * 10.0**exponent, _tensor(seed + 1, (f, b1, b2))
    budget = SPECS[kind]["budget"]
    try:
        layer = quiet(lambda: sl.from_kronecker(kind, a, b, **(budget(1) if budget else {})))
    except ValueError:  # the budget does not fit these factors (e.g. monarch's block grid)
        layer = quiet(lambda: sl.from_kronecker(kind, a, b, **SPECS[kind]["full_kron"](a, b)[0]))
    materialised = layer.relative_error(kron_dense(a, b))
    assert layer.relative_error_kronecker(a, b) == pytest.approx(materialised, abs=1e-6)
    per_fold = layer.relative_error_kronecker(a, b, per_fold=True)
    assert torch.allclose(per_fold, layer.relative_error(kron_dense(a, b), per_fold=True), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@bounded(30)
@given(f=folds, out=composite, inp=composite, seed=seeds,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.complex128]))
def test_identical_seeds_give_identical_layers_and_empty_batches_work(kind, f, out, inp, seed, dtype):
    options = SPECS[kind]["init"](inp, out)

    def build(**source):
        return quiet(lambda: sl.create(kind, inp, out, f, dtype=dtype, **options, **source))

    first = build(seed=seed)
    assert torch.equal(first.to_dense(), build(seed=seed).to_dense())
    assert torch.equal(first.to_dense(), build(generator=torch.Generator().manual_seed(seed)).to_dense())
    torch.manual_seed(seed)
    unseeded = build().to_dense()
    torch.manual_seed(seed)
    assert torch.equal(unseeded, build().to_dense())
    assert first(torch.zeros(f, 0, inp, dtype=dtype)).shape == (f, 0, out)


# ------------------------------------------------------------------ invalid arguments
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "x", "2", "False", "auto", "meta", "gpu", "flat"]),
    st.lists(st.integers(-1, 6), max_size=3), st.tuples(st.integers(-1, 6), st.integers(-1, 6)),
    st.sampled_from([torch.float16, torch.int32, torch.bool, torch.complex64, torch.device("meta")]),
    st.sampled_from([torch.zeros(2), torch.tensor(float("nan")), object(), 2**70, -(2**70), 1e-300, [[1, 2], [3]]]),
)
TENSOR_JUNK = st.sampled_from([
    torch.zeros(0, 3), torch.ones(3), torch.ones(2, 2, 2, 2), torch.ones(3, 3, dtype=torch.int64),
    torch.full((3, 3), float("nan")), torch.full((3, 3), float("inf")), torch.empty(3, 3, device="meta"),
    torch.ones(3, 3).numpy(), [[1.0, 2.0]], None, 3.0,
])
#: the name a message uses for a tensor argument
SHOWN = {"weight": "W", "a": "A", "b": "B"}


def _parameters(function, skip=("self", "cls")):
    return [name for name, p in inspect.signature(function).parameters.items()
            if name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _assert_named(call, name):
    try:
        quiet(call)
    except (ValueError, TypeError) as exc:
        assert SHOWN.get(name, name) in str(exc), f"{name}: {type(exc).__name__}: {exc}"


@pytest.mark.parametrize("kind", KINDS)
@bounded(400)
@given(data=st.data())
def test_every_invalid_argument_is_a_value_or_type_error_naming_it(kind, data):
    cls = sl.get(kind)
    w = _tensor(0, (2, 6, 4))
    a, b = _tensor(1, (2, 3, 2)), _tensor(2, (2, 2, 2))
    entry = data.draw(st.sampled_from(["create", "from_dense", "from_kronecker"]), label="entry")
    if entry == "create":
        base = {"in_features": 4, "out_features": 6, "num_folds": 2, **SPECS[kind]["init"](4, 6)}
        name = data.draw(st.sampled_from(_parameters(cls.__init__)), label="option")
        base[name] = data.draw(JUNK, label="value")
        _assert_named(lambda: cls(**base), name)
        return
    function = cls.from_dense if entry == "from_dense" else cls.from_kronecker
    tensors = {"weight": w} if entry == "from_dense" else {"a": a, "b": b}
    base = dict(SPECS[kind]["full_dense"](w)[0] if entry == "from_dense" else SPECS[kind]["full_kron"](a, b)[0])
    name = data.draw(st.sampled_from(_parameters(function)), label="option")
    if name in tensors:
        tensors[name] = data.draw(TENSOR_JUNK, label="tensor")
    else:
        base[name] = data.draw(JUNK, label="value")
    _assert_named(lambda: function(*tensors.values(), **base), name)


def test_the_suite_covers_every_registered_kind():
    assert set(KINDS) == set(SPECS) and TOLERANT and OPTIMAL and MATRIX_OPTIMAL
    assert math.isfinite(EXACT)
