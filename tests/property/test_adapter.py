"""The cirkit adapter's entry points on small circuits: generated evidence and policies.

Evidence x of generated shape, dtype and values either evaluates (exactly when it is a
(B, D) integer tensor of categories in range) or is refused with a ValueError /
TypeError naming x. Generated policies (valid choices, None and junk) either swap the
circuit (exact choices keep its values) or raise a ValueError / TypeError and leave
it untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adapters.cirkit import evaluate_linear_space, kronecker_sum_layers, log_likelihood, swap_kronecker_sum_layers

from ..adapters.cirkit.builders import CATEGORIES, compile_pair
from ..adapters.cirkit.conftest import float64  # noqa: F401  (the fixture, shared with the adapter's tests)
from .settings import bounded

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture(scope="module")
def circuits():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield {rg: compile_pair(rg, "cp", "complex-lse-sum", True, False)
               for rg in ("linear-tree", "random-binary-tree")}
    finally:
        torch.set_default_dtype(previous)


DTYPES = [torch.long, torch.int32, torch.int16, torch.uint8, torch.float64, torch.float32, torch.bool,
          torch.complex64]


@bounded(200)
@given(data=st.data())
def test_evidence_evaluates_exactly_when_valid(circuits, data):
    rg = data.draw(st.sampled_from(sorted(circuits)), label="circuit")
    squared, partition = circuits[rg]
    d = len(squared.scope)
    batch = data.draw(st.integers(1, 4), label="B")
    width = data.draw(st.sampled_from([d - 1, d, d + 1]), label="D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    in_range = data.draw(st.booleans(), label="categories in range")
    low, high = (0, CATEGORIES - 1) if in_range else (0 if dtype in (torch.uint8, torch.bool) else -2, CATEGORIES + 1)
    values = data.draw(st.lists(st.integers(low, high), min_size=batch * width, max_size=batch * width))
    x = torch.tensor(values).reshape(batch, width).to(dtype)
    if dtype.is_floating_point and data.draw(st.booleans(), label="fraction or NaN"):
        x[0, 0] = data.draw(st.sampled_from([0.5, float("nan")]))
    valid = width == d and dtype in (torch.long, torch.int32) and all(0 <= v < CATEGORIES for v in values)
    entry = data.draw(st.sampled_from(["evaluate_linear_space", "log_likelihood", "log_likelihood(linear)"]))
    call = {"evaluate_linear_space": lambda: evaluate_linear_space(squared, x),
            "log_likelihood": lambda: log_likelihood(squared, x, partition),
            "log_likelihood(linear)": lambda: log_likelihood(squared, x, partition, linear_space=True)}[entry]
    if valid:
        with torch.no_grad():
            out = call()
        assert out.shape[0] == batch and bool(torch.isfinite(out.real).all())
        reference = log_likelihood(squared, x.long(), partition)
        if entry != "evaluate_linear_space":
            assert torch.allclose(out, reference, rtol=1e-9)
    else:
        with pytest.raises((ValueError, TypeError), match=r"\bx\b"):
            call()


CHOICES = st.one_of(
    st.none(), st.just("kronecker"), st.builds(lambda r: ("lowrank", {"rank": r}), st.integers(1, 4)),
    st.builds(lambda r: ("nystrom", {"rank": r, "structure": "flat"}), st.integers(1, 4)),
    st.sampled_from([5, ("lowrank",), ("lowrank", None), ["kronecker", {}], "fourier", ("dense", {"rank": 1}),
                     ("lowrank", {"rank": 0}), ("lowrank", {"rank": "x"}), ("lowrank", {"rank": 99})]),
)


@bounded(60)
@given(data=st.data())
def test_policies_swap_or_refuse_and_leave_the_circuit_untouched(circuits, data):
    rg = data.draw(st.sampled_from(sorted(circuits)), label="circuit")
    squared = copy.deepcopy(circuits[rg][0])
    layers = kronecker_sum_layers(squared)
    choices = [data.draw(CHOICES, label=f"layer {index}") for index, _ in layers]
    by_index = dict(zip([index for index, _ in layers], choices))
    before_types = [type(layer) for layer in squared.layers]
    before_state = {k: v.clone() for k, v in squared.state_dict().items()}
    x = torch.randint(0, CATEGORIES, (3, len(squared.scope)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = evaluate_linear_space(squared, x)
    try:
        report = swap_kronecker_sum_layers(squared, lambda info: by_index[info.index])
    except (ValueError, TypeError) as exc:
        assert "layer" in str(exc) or "policy" in str(exc), str(exc)
        assert [type(layer) for layer in squared.layers] == before_types
        assert all(torch.equal(before_state[k], v) for k, v in squared.state_dict().items())
        return
    assert len(report.rows) + len(report.kept) == len(layers)
    if all(c in (None, "kronecker") for c in choices):
        with torch.no_grad():
            assert torch.allclose(evaluate_linear_space(squared, x), reference, rtol=1e-9, atol=1e-9)
