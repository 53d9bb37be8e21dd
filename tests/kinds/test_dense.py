"""dense: the reference stores W as given."""

import torch

import structlayers as sl
from structlayers.linalg import kron_dense

from ..helpers import random_factors


def test_dense_stores_a_copy_and_materialises_kronecker_input():
    w = torch.randn(2, 5, 4, dtype=torch.float64)
    layer = sl.Dense.from_dense(w)
    assert torch.equal(layer.weight, w)
    w.add_(1.0)  # the layer holds its own copy
    assert not torch.equal(layer.weight, w)
    a, b = random_factors(2, (2, 3), (3, 2), seed=1)
    assert torch.equal(sl.Dense.from_kronecker(a, b).weight, kron_dense(a, b))
