"""Monarch block grids (structlayers.linalg.blocks): shapes, the blockwise view, blocks of A ⊗ B."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from structlayers.linalg import kron_dense
from structlayers.linalg.blocks import (
    balanced_num_blocks,
    block_view,
    check_block_rank,
    check_num_blocks,
    kron_block_sets,
    kron_block_svd,
    per_block,
    svd_dtype,
)

from ..helpers import generator, random_factors

# The four ways a block grid can meet the factors of A (4, 6) ⊗ B (6, 4), out = in = 24:
# rows: Lb divides b1 = 6, or b1 divides Lb; columns: P = 24 / K divides b2 = 4, or b2 divides P.
GRIDS = [(2, 2), (3, 12), (12, 3), (12, 12), (1, 1), (6, 6), (24, 24), (2, 24)]


def numpy_block(w: np.ndarray, blocks, l: int, k: int) -> np.ndarray:
    """Block (l, k) by its definition: rows s*Lb + l, columns k*P + p."""
    out, inp = w.shape[-2:]
    lo, ki = blocks
    rows = np.arange(out // lo) * lo + l
    cols = k * (inp // ki) + np.arange(inp // ki)
    return w[..., rows[:, None], cols[None, :]]


def test_balanced_num_blocks_is_the_largest_divisor_up_to_sqrt():
    assert balanced_num_blocks(1024, 1024) == (32, 32)
    assert balanced_num_blocks(12, 10) == (3, 2)
    assert balanced_num_blocks(13, 7) == (1, 1)
    for n in range(1, 200):
        (d, _) = balanced_num_blocks(n, 1)
        assert n % d == 0 and d * d <= n
        assert not any(n % e == 0 and e * e <= n for e in range(d + 1, n + 1))


def test_check_num_blocks_and_block_rank():
    assert check_num_blocks(None, 12, 10) == (3, 2)
    assert check_num_blocks(2, 12, 10) == (2, 2)
    assert check_num_blocks([4, 5], 12, 10) == (4, 5)
    with pytest.raises(ValueError, match=r"in_features=10 is not divisible by the number of input blocks 4.*1, 2, 5, 10"):
        check_num_blocks(4, 12, 10)
    with pytest.raises(TypeError, match="num_blocks must be a positive int or a pair"):
        check_num_blocks(2.0, 12, 10)
    assert check_block_rank(3, 4, 5, (3, 2)) == 3
    with pytest.raises(ValueError, match=r"block_rank 5 exceeds min\(output block size 4, input block size 5\) = 4"):
        check_block_rank(5, 4, 5, (3, 2))
    assert svd_dtype(torch.float16) == torch.float32 and svd_dtype(torch.complex128) == torch.complex128


@pytest.mark.parametrize("blocks", [(3, 2), (2, 5), (1, 1), (12, 10), (6, 1)])
def test_block_view_holds_the_blocks_by_definition(blocks):
    w = torch.randn(2, 12, 10, generator=generator(1), dtype=torch.float64)
    view = block_view(w, blocks)
    lo, ki = blocks
    assert view.shape == (2, lo, ki, 12 // lo, 10 // ki)
    for l in range(lo):
        for k in range(ki):
            assert np.array_equal(view[:, l, k].numpy(), numpy_block(w.numpy(), blocks, l, k))


@pytest.mark.parametrize("blocks", GRIDS)
def test_every_block_of_a_kronecker_product_is_a_kronecker_product_of_sub_matrices(blocks):
    a, b = random_factors(2, (4, 6), (6, 4), seed=2)
    w = kron_dense(a, b).numpy()
    a_sets, b_sets, (ra, ca), (rb, cb) = kron_block_sets(a, b, blocks)
    a_blk, b_blk = per_block(a_sets, ra, ca), per_block(b_sets, rb, cb)
    for l in range(blocks[0]):
        for k in range(blocks[1]):
            for f in range(2):
                product = np.kron(a_blk[f, l, k].numpy(), b_blk[f, l, k].numpy())
                assert np.array_equal(product, numpy_block(w[f], blocks, l, k))


@pytest.mark.parametrize("blocks", [(4, 4), (2, 4), (8, 1)])
def test_grids_that_do_not_meet_the_factors_give_none(blocks):
    a, b = random_factors(1, (4, 6), (6, 4), seed=3)
    assert kron_block_sets(a, b, blocks) is None and kron_block_svd(a, b, blocks) is None


@pytest.mark.parametrize("blocks", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_kron_block_svd_equals_the_svd_of_every_dense_block(blocks, dtype):
    a, b = random_factors(2, (4, 6), (6, 4), seed=4, dtype=dtype)
    w = kron_dense(a, b)
    blockwise = kron_block_svd(a, b, blocks)
    dense_sv = torch.linalg.svdvals(block_view(w, blocks))  # (F, Lb, K, min(S, P))
    p = min(dense_sv.shape[-1], blockwise.spectrum.shape[-1])
    assert torch.allclose(blockwise.spectrum[..., :p], dense_sv[..., :p], rtol=1e-10, atol=1e-12)
    tail = dense_sv[..., p:]
    assert tail.numel() == 0 or float(tail.max()) < 1e-12  # beyond the spectrum: zero
    assert torch.allclose(blockwise.total_sq, (w.abs() ** 2).sum(dim=(1, 2)), rtol=1e-12)
    uu, ss, vv = torch.linalg.svd(block_view(w, blocks), full_matrices=False)
    checked = 0
    for k in range(1, p + 1):  # the top-k truncation of every block, as u^T vh
        u, vh = blockwise.factors(k)
        trunc = u.transpose(-1, -2) @ vh
        expected = (uu[..., :k] * ss[..., None, :k].to(dtype)) @ vv[..., :k, :]
        gap = ss[..., k - 1] - (ss[..., k] if k < ss.shape[-1] else 0)
        if float(gap.min()) > 1e-8:  # the truncation is unique only above a gap
            assert torch.allclose(trunc, expected, rtol=1e-8, atol=1e-10), k
            checked += 1
    assert checked >= 1
