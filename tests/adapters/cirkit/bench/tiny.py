"""Tiny-circuit checks shared by the benchmark-harness tests (brute-force enumeration)."""

from __future__ import annotations

import itertools

import torch

from adapters.cirkit.bench.circuits import CompiledCircuitModel

TINY = dict(image_shape=(2, 2), num_categories=3)  # 3**4 = 81 states: brute force is cheap


def all_states(num_variables: int, num_categories: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_categories), repeat=num_variables)))


def assert_normalised(cm: CompiledCircuitModel, num_categories: int) -> None:
    """Σ_x p_o(x) = 1 for every output o, by enumerating every state."""
    x = all_states(cm.num_variables, num_categories)
    with torch.no_grad():
        ll = cm.log_likelihood(x)
    assert ll.shape == (x.shape[0], cm.num_outputs)
    assert ll.dtype == torch.float64
    torch.testing.assert_close(torch.logsumexp(ll, 0), torch.zeros(cm.num_outputs, dtype=torch.float64),
                               atol=1e-10, rtol=0)


def assert_square_of_base(cm: CompiledCircuitModel, x: torch.Tensor) -> None:
    """log c²(x) = 2 Re log c(x) (per output; the diagonal of c²'s O² outputs)."""
    with torch.no_grad():
        lsq = cm.log_density(x)
        lc = cm.log_base(x)
    assert lsq.shape == lc.shape == (x.shape[0], cm.num_outputs)
    torch.testing.assert_close(lsq, 2 * lc.real, atol=1e-6, rtol=1e-9)
