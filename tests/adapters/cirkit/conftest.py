"""Fixtures shared by the adapter's tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """torch's default dtype float64 for the test (cirkit allocates parameters in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
