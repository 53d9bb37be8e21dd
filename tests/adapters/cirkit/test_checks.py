"""Evidence x is checked once at every entry point: shape, dtype and category range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.cirkit import evaluate_linear_space, log_likelihood, log_value
from adapters.cirkit.checks import check_evidence

from .builders import CATEGORIES, compile_pair

pytestmark = pytest.mark.usefixtures("float64")

D = 6  # linear-tree circuits: 6 variables with CATEGORIES categories each


@pytest.fixture(scope="module")
def pair():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield compile_pair("linear-tree", "cp", "complex-lse-sum", True, False)
    finally:
        torch.set_default_dtype(previous)


def entry_points(squared, partition):
    return {
        "evaluate_linear_space": lambda x: evaluate_linear_space(squared, x),
        "log_value": lambda x: log_value(squared, x),
        "log_likelihood": lambda x: log_likelihood(squared, x, partition),
        "log_likelihood(linear_space)": lambda x: log_likelihood(squared, x, partition, linear_space=True),
    }


VALID = torch.randint(0, CATEGORIES, (8, D), generator=torch.Generator().manual_seed(0))
NEGATIVE, TOO_LARGE = VALID.clone(), VALID.clone()
NEGATIVE[2, 1], TOO_LARGE[5, 4] = -1, CATEGORIES
WITH_NAN = VALID.double()
WITH_NAN[0, 0] = float("nan")

BAD = [
    (torch.zeros(4, D + 1, dtype=torch.long), ValueError, r"x must have shape \(B, D\) with D = 6 variables, got \(4, 7\)"),
    (VALID.T.contiguous(), ValueError, r"got \(6, 8\); is it transposed\? pass x.T"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"x must have shape \(B, D\)"),
    (VALID.double() + 0.5, TypeError, "x must hold integer categories"),
    (WITH_NAN, TypeError, "x must hold integer categories"),
    (VALID.bool(), TypeError, "x must hold integer categories"),
    (VALID.to(torch.int16), TypeError, r"x must hold integer categories of dtype torch.long or torch.int32, got dtype torch.int16; convert with x.long\(\)"),
    (VALID.to(torch.uint8), TypeError, "got dtype torch.uint8"),
    (NEGATIVE, ValueError, r"x has 1 categories out of range, e.g. x\[2, 1\] = -1 for variable 1 with 3 categories"),
    (TOO_LARGE, ValueError, r"x\[5, 4\] = 3 for variable 4 with 3 categories; each must be in \[0, 3\)"),
    (VALID.numpy(), TypeError, r"x must be a torch.Tensor of shape \(B, 6\), got ndarray"),
    (VALID.tolist(), TypeError, "x must be a torch.Tensor of shape"),
]


@pytest.mark.parametrize("entry", list(entry_points(None, None)))
@pytest.mark.parametrize("x,error,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_evidence_is_refused_at_every_entry_point(pair, entry, x, error, match):
    squared, partition = pair
    with pytest.raises(error, match=match):
        entry_points(squared, partition)[entry](x)


def test_valid_evidence_passes_and_integrated_entries_are_not_read(pair):
    squared, partition = pair
    assert check_evidence(squared, VALID) is VALID
    out = evaluate_linear_space(squared, VALID)
    assert out.shape[0] == 8 and bool(torch.isfinite(out.real).all())
    marked = NEGATIVE.clone()
    mask = torch.zeros(D, dtype=torch.bool)
    mask[1] = True  # variable 1 is integrated out: its (negative) placeholder is never read
    assert torch.isfinite(evaluate_linear_space(squared, marked, integrate=mask).real).all()
    with pytest.raises(ValueError, match="the circuit has no variables"):
        check_evidence(partition, VALID)
    with pytest.raises(ValueError, match=r"x is None, but the circuit has variables"):
        check_evidence(squared, None)
    with pytest.raises(TypeError, match="expected a compiled cirkit TorchCircuit"):
        check_evidence(np.zeros(3), VALID)
