"""The compiled models a benchmark compares (adapters.cirkit.bench.variants)."""

from __future__ import annotations

import pytest
import torch

from adapters.cirkit.bench.circuits import digits_squared_circuit
from adapters.cirkit.bench.variants import (
    CIRKIT_MATERIALISED,
    CIRKIT_OPTIMIZED,
    CIRKIT_OPTIMIZED_LINEAR,
    EXACT,
    EXACT_SEMIRING,
    circuit_variants,
)


@pytest.fixture(scope="module")
def tiny():
    spec = digits_squared_circuit(3, image_shape=(2, 2), num_categories=3)
    return spec, spec.compile(seed=0, dtype=torch.float64)


def test_names_values_and_the_model_left_alone(tiny):
    spec, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variants = circuit_variants(spec, model, kinds=("lowrank",), ranks=(1,), structures=("square", "flat"))
    names = [v.name for v in variants]
    assert names == [CIRKIT_MATERIALISED, CIRKIT_OPTIMIZED, CIRKIT_OPTIMIZED_LINEAR, EXACT_SEMIRING, EXACT,
                     "lowrank square 1", "lowrank flat 1"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randint(0, 3, (7, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.log_likelihood(x)
        for v in variants:
            assert v.is_baseline == (v.kind is None)
            if v.same_values and (v.structure in (None, "exact")):
                torch.testing.assert_close(v.model.log_likelihood(x), reference, rtol=1e-9, atol=1e-9,
                                           msg=v.name)
    by_name = {v.name: v for v in variants}
    assert by_name[EXACT].evaluation == "linear" and by_name[EXACT_SEMIRING].evaluation == "semiring"
    assert by_name["lowrank square 1"].report is not None and not by_name["lowrank square 1"].same_values


def test_without_the_materialised_path_and_in_semiring_evaluation(tiny):
    spec, model = tiny
    variants = circuit_variants(spec, model, kinds=("nystrom",), ranks=(1,), materialised=False,
                                evaluation="semiring")
    assert [v.name for v in variants] == [CIRKIT_OPTIMIZED, EXACT, "nystrom square 1"]
    assert all(v.evaluation == "semiring" for v in variants)


def test_unknown_structure_is_named(tiny):
    spec, model = tiny
    with pytest.raises(ValueError, match="unknown structure 'round'"):
        circuit_variants(spec, model, ranks=(1,), structures=("round",))
