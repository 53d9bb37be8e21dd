"""Fixtures of the benchmark-harness tests: the digits data."""

from __future__ import annotations

import pytest

from adapters.cirkit.bench.data import DataSplits, digits_data


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return digits_data(seed=0)


@pytest.fixture(scope="module")
def small_digits(digits) -> DataSplits:
    return DataSplits(digits.x_train[:256], digits.y_train[:256], digits.x_test[:128], digits.y_test[:128])
