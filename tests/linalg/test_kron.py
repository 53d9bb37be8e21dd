"""Kronecker helpers against the materialised product."""

import pytest
import torch

from structlayers.linalg import (
    kron_apply,
    kron_chain_flops,
    kron_columns,
    kron_dense,
    kron_inner_lowrank,
    kron_rows,
    lowrank_frobenius_sq,
)

from ..helpers import generator, random_factors, rel


def test_kron_dense_matches_torch_kron():
    a, b = random_factors(2, (3, 4), (2, 5), seed=1)
    for f in range(2):
        assert torch.equal(kron_dense(a, b)[f], torch.kron(a[f], b[f]))


@pytest.mark.parametrize("len_a,len_b", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2)])
def test_kron_apply_with_chains(len_a, len_b):
    g = generator(2)
    dims_a, dims_b = [5, 2, 4, 3][: len_a + 1], [3, 6, 2, 4][: len_b + 1]
    chain_a = [torch.randn(2, dims_a[i], dims_a[i + 1], generator=g, dtype=torch.float64) for i in range(len_a)]
    chain_b = [torch.randn(2, dims_b[i], dims_b[i + 1], generator=g, dtype=torch.float64) for i in range(len_b)]
    a, b = chain_a[0], chain_b[0]
    for m in chain_a[1:]:
        a = a @ m
    for m in chain_b[1:]:
        b = b @ m
    x = torch.randn(2, 7, a.shape[-1] * b.shape[-1], generator=g, dtype=torch.float64)
    expected = x @ kron_dense(a, b).transpose(1, 2)
    assert rel(kron_apply(chain_a, chain_b, x), expected) < 1e-13
    naive = sum(m.shape[-1] * m.shape[-2] for m in chain_a) * b.shape[-1] * 10
    assert 0 < kron_chain_flops(chain_a, chain_b) < naive


def test_columns_rows_and_inner_products():
    a, b = random_factors(2, (3, 4), (5, 2), seed=3)
    w = kron_dense(a, b)
    cols_a, cols_b = torch.tensor([[0, 3, 2], [1, 1, 0]]), torch.tensor([[1, 0, 1], [0, 1, 1]])
    cols = kron_columns(a, b, cols_a, cols_b)
    rows = kron_rows(a, b, torch.tensor([[2, 0], [1, 1]]), torch.tensor([[4, 0], [3, 2]]))
    for f in range(2):
        assert torch.equal(cols[f], w[f][:, cols_a[f] * 2 + cols_b[f]])
        assert torch.equal(rows[f], w[f][torch.tensor([[2, 0], [1, 1]])[f] * 5 + torch.tensor([[4, 0], [3, 2]])[f]])
    g = generator(4)
    left = torch.randn(2, 15, 3, generator=g, dtype=torch.float64)
    right = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    expected = (w * (left @ right)).sum(dim=(1, 2))
    assert torch.allclose(kron_inner_lowrank(a, b, left, right), expected, rtol=1e-12)
    assert torch.allclose(lowrank_frobenius_sq(left, right), ((left @ right) ** 2).sum(dim=(1, 2)), rtol=1e-12)
