"""Pivot strategies: distinctness, determinism, and the sampling distribution of l2."""

import pytest
import torch

from structlayers.linalg import PIVOT_STRATEGIES, select_pivots
from structlayers.linalg.pivots import deim, qdeim

from ..helpers import generator


@pytest.mark.parametrize("strategy", PIVOT_STRATEGIES)
def test_pivots_are_distinct_and_in_range(strategy):
    g = generator(1)
    basis, _ = torch.linalg.qr(torch.randn(3, 40, 8, generator=g, dtype=torch.float64))
    norms = torch.rand(3, 40, generator=g, dtype=torch.float64)
    piv = select_pivots(strategy, 8, n=40, num_folds=3, generator=generator(2), sq_norms=norms, basis=basis)
    assert piv.shape == (3, 8) and piv.dtype == torch.long
    for row in piv:
        assert len(set(row.tolist())) == 8 and 0 <= int(row.min()) and int(row.max()) < 40


def test_deim_and_qdeim_find_the_support_of_a_sparse_basis():
    """A basis living on rows {3, 11, 17, 29} (mixed by a rotation): both must pick exactly those."""
    g = generator(3)
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    basis = torch.zeros(1, 32, 4, dtype=torch.float64)
    basis[0, [3, 11, 17, 29]] = rot
    assert sorted(deim(basis)[0].tolist()) == [3, 11, 17, 29]
    assert sorted(qdeim(basis)[0].tolist()) == [3, 11, 17, 29]


def test_l2_sampling_follows_squared_norms():
    """First draw frequencies over 4000 seeds vs probabilities p = w / sum(w): within 4 standard errors."""
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0]], dtype=torch.float64)
    counts = torch.zeros(5)
    trials = 4000
    g = generator(4)
    for _ in range(trials):
        counts[select_pivots("l2", 1, n=5, num_folds=1, generator=g, sq_norms=weights)[0, 0]] += 1
    p = weights[0] / weights.sum()
    freq = counts.double() / trials
    stderr = (p * (1 - p) / trials).sqrt()
    assert bool(((freq - p).abs() <= 4 * stderr).all())


def test_unknown_strategy_and_too_many_pivots():
    with pytest.raises(ValueError, match="unknown pivot strategy 'volume'"):
        select_pivots("volume", 2, n=5, num_folds=1, generator=generator(0))
    with pytest.raises(ValueError, match="cannot choose 6 pivots out of 5"):
        select_pivots("uniform", 6, n=5, num_folds=1, generator=generator(0))
