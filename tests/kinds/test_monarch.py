"""The ``monarch`` kind: structure, optimal blockwise projection, Kronecker constructor, bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import structlayers as sl
import structlayers.kinds.monarch  # noqa: F401  (registers the kind)
from structlayers.kinds.monarch import Monarch
from structlayers.linalg import kron_dense

from ..helpers import decaying_matrix, generator, random_factors, rel

EXACT = 1e-10


# --------------------------------------------------------- independent references
def reference_dense(layer: Monarch) -> np.ndarray:
    """W from the parameters by the defining index formula, element by element in numpy:
    W[s*Lb + l, k*P + p] = sum_t left[l, s, k*r + t] * right[k, l*r + t, p]."""
    left, right = layer.left.detach().numpy(), layer.right.detach().numpy()
    (lo, ki), (s_, p_), r = layer.num_blocks, layer.block_shape, layer.block_rank
    w = np.zeros((layer.num_folds, layer.out_features, layer.in_features), dtype=left.dtype)
    for f in range(layer.num_folds):
        for l in range(lo):
            for k in range(ki):
                for s in range(s_):
                    for p in range(p_):
                        w[f, s * lo + l, k * p_ + p] = sum(
                            left[f, l, s, k * r + t] * right[f, k, l * r + t, p] for t in range(r))
    return w


def block_index(out: int, inp: int, blocks, l: int, k: int):
    """Rows and columns of block (l, k) of the Monarch grid: rows s*Lb + l, columns k*P + p."""
    lo, ki = blocks
    return np.arange(out // lo) * lo + l, k * (inp // ki) + np.arange(inp // ki)


def brute_force_projection(w, blocks, r: int):
    """Blockwise truncated SVD, one numpy SVD per block and fold; returns (projection, rel. error)."""
    arr = w.detach().numpy() if isinstance(w, torch.Tensor) else w
    arr = arr[None] if arr.ndim == 2 else arr
    f, out, inp = arr.shape
    proj = np.zeros_like(arr)
    for fold in range(f):
        for l in range(blocks[0]):
            for k in range(blocks[1]):
                rows, cols = block_index(out, inp, blocks, l, k)
                u, s, vh = np.linalg.svd(arr[fold][np.ix_(rows, cols)], full_matrices=False)
                proj[fold][np.ix_(rows, cols)] = (u[:, :r] * s[:r]) @ vh[:r]
    return proj, float(np.linalg.norm(arr - proj) / np.linalg.norm(arr))


def blocks_of(w: torch.Tensor, blocks):
    f, out, inp = w.shape
    return [w[:, rows][:, :, cols] for l in range(blocks[0]) for k in range(blocks[1])
            for rows, cols in [block_index(out, inp, blocks, l, k)]]


# ----------------------------------------------------------------- structure
def test_square_case_is_dao_et_al_p_l_pt_r():
    """n = m^2, m blocks, block rank 1: W = P L P^T R with block-diagonal L, R and P the
    reshape-transpose permutation (x viewed as m x m, transposed)."""
    m = 4
    layer = Monarch(m * m, m * m, num_blocks=m, dtype=torch.float64, seed=0)
    assert layer.left.shape == (1, m, m, m) and layer.right.shape == (1, m, m, m)
    big_l = scipy.linalg.block_diag(*layer.left[0].detach().numpy())
    big_r = scipy.linalg.block_diag(*layer.right[0].detach().numpy())
    perm = np.zeros((m * m, m * m))
    for i in range(m):
        for j in range(m):
            perm[i * m + j, j * m + i] = 1.0
    w = perm @ big_l @ perm.T @ big_r
    assert rel(layer.to_dense()[0], torch.from_numpy(w)) < 1e-14
    x = torch.randn(1, 5, m * m, generator=generator(0), dtype=torch.float64)
    assert rel(layer(x)[0], x[0] @ torch.from_numpy(w).T) < 1e-14


@pytest.mark.parametrize("folds,out,inp,blocks,r", [(2, 12, 10, (3, 2), 2), (1, 6, 15, (2, 5), 1),
                                                    (3, 8, 8, (4, 2), 2), (1, 9, 4, (1, 4), 1)])
def test_forward_and_to_dense_follow_the_index_formula(folds, out, inp, blocks, r):
    layer = Monarch(inp, out, folds, num_blocks=blocks, block_rank=r, dtype=torch.float64, seed=1)
    w = torch.from_numpy(reference_dense(layer))
    assert rel(layer.to_dense(), w) < 1e-14
    x = torch.randn(folds, 6, inp, generator=generator(1), dtype=torch.float64)
    assert rel(layer(x), x @ w.transpose(1, 2)) < 1e-14
    # Every block of W has rank <= r.
    for blk in blocks_of(w, blocks):
        assert int(torch.linalg.matrix_rank(blk).max()) <= r


def test_default_num_blocks_is_about_sqrt():
    assert Monarch(1024, 1024, seed=0).num_blocks == (32, 32)
    assert Monarch(10, 12, seed=0).num_blocks == (3, 2)  # largest divisor <= sqrt: 12 -> 3, 10 -> 2
    assert Monarch(13, 7, seed=0).num_blocks == (1, 1)  # primes: a single block
    assert Monarch(64, 48, seed=0, num_blocks=(6, 8)).block_shape == (8, 8)


# ------------------------------------------------------------------ from_dense
@pytest.mark.parametrize("folds,out,inp,blocks,unfolded", [
    (1, 12, 10, None, True), (3, 12, 10, None, False), (2, 6, 15, (2, 5), False),
    (2, 12, 10, 1, False), (1, 12, 10, (12, 10), True), (2, 16, 8, (4, 2), False)])
def test_full_block_rank_from_dense_is_exact(folds, out, inp, blocks, unfolded):
    w = torch.randn(folds, out, inp, generator=generator(2), dtype=torch.float64)
    layer = Monarch.from_dense(w[0] if unfolded else w, num_blocks=blocks)
    assert (layer.num_folds, layer.out_features, layer.in_features) == (folds, out, inp)
    assert layer.block_rank == layer.max_block_rank == min(layer.block_shape)
    x = torch.randn(folds, 7, inp, generator=generator(3), dtype=torch.float64)
    assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT
    assert rel(layer.to_dense(), w) < EXACT
    assert layer.relative_error(w) < EXACT


@pytest.mark.parametrize("blocks", [(3, 2), (2, 5), (6, 1), (1, 1)])
def test_projection_is_the_blockwise_svd_optimum_and_monotone(blocks):
    w = decaying_matrix(2, 12, 10, decay=0.85, seed=4)
    errors = []
    max_rank = min(12 // blocks[0], 10 // blocks[1])
    for r in range(1, max_rank + 1):
        layer = Monarch.from_dense(w, num_blocks=blocks, block_rank=r)
        proj, err = brute_force_projection(w, blocks, r)
        assert rel(layer.to_dense(), torch.from_numpy(proj)) < 1e-10, r
        assert layer.relative_error(w) == pytest.approx(err, rel=1e-10, abs=1e-13)
        errors.append(layer.relative_error(w))
        if r < max_rank:  # perturbing the factors (staying in the class) never helps
            for seed in range(3):
                g = generator(100 + seed)
                moved = Monarch._bare(10, 12, 2)
                moved.left = torch.nn.Parameter(layer.left + 1e-3 * torch.randn(layer.left.shape, generator=g, dtype=torch.float64))
                moved.right = torch.nn.Parameter(layer.right + 1e-3 * torch.randn(layer.right.shape, generator=g, dtype=torch.float64))
                assert moved.relative_error(w) > errors[-1]
    assert all(e2 <= e1 + 1e-15 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < EXACT


def test_tolerance_picks_the_smallest_block_rank():
    w = decaying_matrix(3, 16, 12, decay=0.9, seed=5)
    blocks = (4, 3)  # blocks 4 x 4: block ranks 1..4
    brute = [brute_force_projection(w, blocks, r)[1] for r in range(1, 5)]
    for tol in (0.99, 0.8, 0.5, 0.3, 0.1, 0.01, 0.0):
        layer = Monarch.from_dense(w, num_blocks=blocks, tolerance=tol)
        r = layer.block_rank
        assert layer.relative_error(w) <= tol + 1e-12
        assert brute[r - 1] <= tol + 1e-12
        if r > 1:
            assert brute[r - 2] > tol  # one less would miss the tolerance
    assert Monarch.from_dense(w, num_blocks=blocks, tolerance=0.0).block_rank == 4


def test_params_share_picks_the_largest_fitting_block_rank():
    w = decaying_matrix(2, 16, 16, seed=6)
    dense = 2 * 16 * 16
    for share, expected in ((0.25, 1), (0.5, 2), (0.74, 2), (1.0, 4)):
        layer = Monarch.from_dense(w, num_blocks=2, params_share=share)
        r = layer.block_rank
        # Blocks 8 x 8; per fold r * (Lb*in + K*out) = 64 r parameters: r = floor(4 * share).
        assert r == expected and layer.num_params == 2 * 64 * r <= share * dense
        assert 2 * 64 * (r + 1) > share * dense
    with pytest.raises(ValueError, match=r"params_share=0\.2 allows 102 parameters.*needs 128"):
        Monarch.from_dense(w, num_blocks=2, params_share=0.2)


def test_complex_and_float32_from_dense():
    g = generator(7)
    w = torch.complex(torch.randn(2, 8, 6, generator=g, dtype=torch.float64),
                      torch.randn(2, 8, 6, generator=g, dtype=torch.float64))
    layer = Monarch.from_dense(w, num_blocks=(2, 3))
    assert layer.dtype == torch.complex128 and rel(layer.to_dense(), w) < EXACT
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.complex128)
    assert rel(layer(x), x @ w.transpose(1, 2)) < EXACT
    layer = Monarch.from_dense(w, num_blocks=(2, 3), block_rank=1)
    assert rel(layer.to_dense(), torch.from_numpy(brute_force_projection(w, (2, 3), 1)[0])) < 1e-10
    w32 = w.real.float()
    layer = Monarch.from_dense(w32, num_blocks=(2, 3))
    assert layer.dtype == torch.float32 and rel(layer.to_dense(), w32) < 1e-5


# -------------------------------------------------------------- from_kronecker
@pytest.mark.parametrize("folds,shape_a,shape_b", [(1, (4, 3), (2, 5)), (3, (3, 3), (4, 4)), (2, (2, 5), (3, 2))])
def test_from_kronecker_default_is_exact_block_rank_one(folds, shape_a, shape_b):
    a, b = random_factors(folds, shape_a, shape_b, seed=8)
    (a1, a2), (b1, b2) = shape_a, shape_b
    layer = Monarch.from_kronecker(a, b)
    assert layer.num_blocks == (b1, a2) and layer.block_rank == 1 and layer.block_shape == (a1, b2)
    # Every block of L is A, every block of R is B: A ⊗ B = P (I ⊗ A) P^T (I ⊗ B).
    assert all(torch.equal(layer.left[:, l], a) for l in range(b1))
    assert all(torch.equal(layer.right[:, k], b) for k in range(a2))
    assert layer.num_params == folds * (b1 * a1 * a2 + a2 * b1 * b2)
    w = kron_dense(a, b)
    assert rel(layer.to_dense(), w) < 1e-15
    x = torch.randn(folds, 5, a2 * b2, generator=generator(9), dtype=torch.float64)
    assert rel(layer(x), x @ w.transpose(1, 2)) < 1e-14
    assert layer.relative_error_kronecker(a, b) < 1e-7
    # Any budget keeps block rank 1 (already exact); an explicit larger rank pads with zeros.
    assert Monarch.from_kronecker(a, b, tolerance=0.0).block_rank == 1
    assert Monarch.from_kronecker(a, b, params_share=1.0).block_rank == 1
    if min(a1, b2) >= 2:
        padded = Monarch.from_kronecker(a, b, block_rank=2)
        assert padded.block_rank == 2 and rel(padded.to_dense(), w) < 1e-15


# The four ways a block grid can meet the factors of A (4, 6) ⊗ B (6, 4), out = in = 24:
# rows: Lb divides b1 = 6, or b1 divides Lb; columns: P = 24 / K divides b2 = 4, or b2 divides P.
GRIDS = [(2, 2), (3, 12), (12, 3), (12, 12), (1, 1), (6, 6), (24, 24), (2, 24)]


@pytest.mark.parametrize("blocks", GRIDS)
def test_from_kronecker_other_grids_equal_the_dense_projection(blocks):
    a, b = random_factors(2, (4, 6), (6, 4), seed=10)
    w = kron_dense(a, b)
    full = Monarch.from_kronecker(a, b, num_blocks=blocks)
    assert full.num_blocks == blocks and rel(full.to_dense(), w) < EXACT
    for r in range(1, full.block_rank):
        layer = Monarch.from_kronecker(a, b, num_blocks=blocks, block_rank=r)
        proj, err = brute_force_projection(w, blocks, r)
        assert rel(layer.to_dense(), torch.from_numpy(proj)) < 1e-10, r
        assert layer.relative_error(w) == pytest.approx(err, rel=1e-10)
        assert layer.relative_error_kronecker(a, b) == pytest.approx(err, rel=1e-8)


def test_from_kronecker_budgets_match_from_dense():
    a, b = random_factors(3, (4, 6), (6, 4), seed=11)
    w = kron_dense(a, b)
    for tol in (0.9, 0.5, 0.2, 0.05):
        layer = Monarch.from_kronecker(a, b, num_blocks=(2, 2), tolerance=tol)
        ref = Monarch.from_dense(w, num_blocks=(2, 2), tolerance=tol)
        assert layer.block_rank == ref.block_rank and layer.relative_error(w) <= tol
    # (2, 2) grid: blocks are A[:, 3 cols] ⊗ B[3 rows, :], exact at block rank 3 * 3 = 9 < 12 = min(S, P).
    assert Monarch.from_kronecker(a, b, num_blocks=(2, 2)).block_rank == 9
    # 96 r parameters per fold against 576 dense: r = floor(6 * share).
    assert Monarch.from_kronecker(a, b, num_blocks=(2, 2), params_share=1.0).block_rank == 6
    assert Monarch.from_kronecker(a, b, num_blocks=(2, 2), params_share=0.5).block_rank == 3
    assert Monarch.from_kronecker(a, b, num_blocks=(2, 2), block_rank=12).relative_error(w) < EXACT
    # params_share stops at the exact block rank: A (2, 6) ⊗ B (6, 2) in one block has rank 2 * 2 = 4,
    # while the budget (24 r per fold against 144) would allow 6; from_dense takes the 6.
    a, b = random_factors(1, (2, 6), (6, 2), seed=26)
    assert Monarch.from_kronecker(a, b, num_blocks=1, params_share=1.0).block_rank == 4
    assert Monarch.from_dense(kron_dense(a, b), num_blocks=1, params_share=1.0).block_rank == 6


def test_from_kronecker_complex_grid():
    a, b = random_factors(2, (4, 6), (6, 4), seed=12, dtype=torch.complex128)
    w = kron_dense(a, b)
    layer = Monarch.from_kronecker(a, b, num_blocks=(12, 3), block_rank=2)
    assert rel(layer.to_dense(), torch.from_numpy(brute_force_projection(w, (12, 3), 2)[0])) < 1e-10
    assert rel(Monarch.from_kronecker(a, b, num_blocks=(12, 3)).to_dense(), w) < EXACT


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("blocks", [None, (4, 4), (16, 4)])
def test_from_kronecker_and_forward_never_form_the_dense_matrix(blocks):
    """No op output (not even a view) is larger than the layer's largest parameter, which is
    well below the 64 x 64 product."""
    a, b = random_factors(1, (8, 8), (8, 8), seed=13)
    with LargestTensor() as seen:
        layer = Monarch.from_kronecker(a, b, num_blocks=blocks)
    largest_param = max(p.numel() for p in layer.parameters())
    assert largest_param <= 64 * 64 // 2 and seen.largest <= largest_param
    x = torch.randn(1, 4, 64, generator=generator(14), dtype=torch.float64)
    with LargestTensor() as seen:
        y = layer(x)
    assert seen.largest <= largest_param
    assert rel(y, x @ kron_dense(a, b).transpose(1, 2)) < EXACT


def test_relative_error_kronecker_on_any_grid():
    a, b = random_factors(2, (4, 6), (6, 4), seed=15)
    w = kron_dense(a, b)
    noisy = w + 0.3 * torch.randn(w.shape, generator=generator(16), dtype=torch.float64)
    for blocks in [(2, 2), (4, 4)]:  # (4, 4) does not fit the factors: generic fallback
        layer = Monarch.from_dense(noisy, num_blocks=blocks, block_rank=2)
        assert layer.relative_error_kronecker(a, b) == pytest.approx(rel(layer.to_dense(), w), rel=1e-8)
        expected = (layer.to_dense() - w).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)
        assert torch.allclose(layer.relative_error_kronecker(a, b, per_fold=True), expected, rtol=1e-8)


# ----------------------------------------------------------------- bookkeeping
def test_flops_and_params_hand_counts():
    # in = 12 (K = 3 blocks of P = 4), out = 10 (Lb = 2 blocks of S = 5), r = 2, F = 3.
    layer = Monarch(12, 10, 3, num_blocks=(2, 3), block_rank=2, seed=0)
    assert layer.right.shape == (3, 3, 2 * 2, 4) and layer.left.shape == (3, 2, 5, 3 * 2)
    assert layer.num_params == 3 * (3 * 4 * 4 + 2 * 5 * 6)  # 3 * 108
    # Per sample: R is 3 blocks of (4 x 4): 48; L is 2 blocks of (5 x 6): 60.
    # (the block products; at this tiny size the forward may rebuild W instead, see flops())
    assert layer.orders(7)[0].name == "block products" and layer.orders(7)[0].macs == 7 * 3 * (48 + 60)
    # Square Monarch: 2 n sqrt(n) multiply-adds and parameters per fold.
    square = Monarch(1024, 1024, seed=0)
    assert square.flops(1) == square.num_params == 2 * 1024 * 32
    assert sl.get("monarch") is Monarch and sl.create("monarch", 12, 10, 3, num_blocks=(2, 3), block_rank=2).num_params == 324


@pytest.mark.parametrize("folds,inp,out,blocks,r,batch", [(3, 12, 10, (2, 3), 2, 7), (1, 64, 64, None, 1, 5),
                                                          (2, 15, 6, (3, 5), 2, 4)])
def test_flops_count_what_the_forward_multiplies(folds, inp, out, blocks, r, batch):
    layer = Monarch(inp, out, folds, num_blocks=blocks, block_rank=r, seed=0)
    x = torch.randn(folds, batch, inp, generator=generator(17))
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * layer.flops(batch)  # the counter reports 2 per multiply-add


def test_gradcheck():
    layer = Monarch(6, 4, 2, num_blocks=(2, 3), block_rank=2, dtype=torch.float64, seed=18)
    x = torch.randn(2, 3, 6, generator=generator(19), dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x,) + params)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_init_variance_matches_nn_linear(r):
    """Var(W_ij) = 1/(3 in). Each block W_b = L_b R_b (S x r times r x P, Gaussian entries with
    variances a, b) has E||W_b||^2 = r S P a b and Var ||W_b||^2 = 2 r S P (S + P + r + 1) a^2 b^2;
    blocks and folds are independent, so the mean of W^2 over all n = F Lb K blocks has relative
    standard deviation sqrt(2 (S + P + r + 1) / (n r S P)). Bound: 6 of those (Chebyshev: a
    random seed fails with probability <= 1/36; Gaussian approximation ~1e-9). The mean of W
    has standard deviation sigma / sqrt(#entries) exactly; bound 6 of those too."""
    f, inp, out, blocks = 8, 64, 48, (6, 8)
    layer = Monarch(inp, out, f, num_blocks=blocks, block_rank=r, dtype=torch.float64, seed=20)
    w = layer.to_dense().detach()
    s_, p_ = layer.block_shape
    var = 1.0 / (3 * inp)
    rel_sd = math.sqrt(2 * (s_ + p_ + r + 1) / (f * blocks[0] * blocks[1] * r * s_ * p_))
    assert abs(float((w**2).mean()) / var - 1) < 6 * rel_sd
    assert abs(float(w.mean())) < 6 * math.sqrt(var / w.numel())
    x = torch.randn(f, 256, inp, generator=generator(21), dtype=torch.float64)
    assert 0.2 < float(layer(x).detach().var()) < 0.5  # nn.Linear: 1/3


def test_config_and_state_dict_round_trip():
    w = decaying_matrix(2, 12, 10, seed=22)
    for layer in [Monarch.from_dense(w, num_blocks=(6, 5), block_rank=2),
                  Monarch.from_kronecker(*random_factors(2, (4, 6), (3, 2), seed=23), num_blocks=(1, 3))]:
        clone = type(layer)(**layer.config())
        assert clone.num_blocks == layer.num_blocks and clone.block_rank == layer.block_rank
        clone.load_state_dict(layer.state_dict())
        x = torch.randn(2, 3, layer.in_features, generator=generator(24), dtype=torch.float64)
        assert torch.equal(clone(x), layer(x))
    assert "num_blocks=(6, 5), block_rank=2" in repr(Monarch.from_dense(w, num_blocks=(6, 5), block_rank=2))


def test_bad_inputs_raise_with_clear_messages():
    with pytest.raises(ValueError, match=r"in_features=10 is not divisible by the number of input blocks 4.*1, 2, 5, 10"):
        Monarch(10, 12, num_blocks=4)
    with pytest.raises(ValueError, match=r"out_features=12 is not divisible by the number of output blocks 5"):
        Monarch(10, 12, num_blocks=(5, 2))
    with pytest.raises(ValueError, match=r"num_blocks must be an int or a pair"):
        Monarch(12, 12, num_blocks=(2, 3, 4))
    with pytest.raises(TypeError, match=r"num_blocks must be a positive int or a pair.*float"):
        Monarch(12, 12, num_blocks=2.0)
    with pytest.raises(ValueError, match=r"num_blocks must be a positive int, got 0"):
        Monarch(12, 12, num_blocks=0)
    with pytest.raises(ValueError, match=r"num_blocks\[1\] \(blocks_in\) must be a positive int, got -1"):
        Monarch(12, 12, num_blocks=(3, -1))
    with pytest.raises(ValueError, match=r"block_rank 5 exceeds min\(output block size 4, input block size 4\) = 4"):
        Monarch(12, 12, num_blocks=3, block_rank=5)
    with pytest.raises(ValueError, match=r"block_rank must be a positive int, got 0"):
        Monarch(12, 12, block_rank=0)
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        Monarch(12, 12, seed=0, generator=torch.Generator())
    w = torch.randn(12, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"at most one of block_rank, tolerance, params_share; got block_rank, tolerance"):
        Monarch.from_dense(w, block_rank=1, tolerance=0.1)
    with pytest.raises(ValueError, match=r"tolerance must be in \[0, 1\), got 1.5"):
        Monarch.from_dense(w, tolerance=1.5)
    with pytest.raises(ValueError, match=r"block_rank 5 exceeds"):
        Monarch.from_dense(w, num_blocks=(3, 2), block_rank=5)
    with pytest.raises(ValueError, match=r"in_features=10 is not divisible"):
        Monarch.from_dense(w, num_blocks=3)
    with pytest.raises(ValueError, match=r"W must have shape \(F, out, in\) or \(out, in\)"):
        Monarch.from_dense(torch.randn(12))
    with pytest.raises(ValueError, match=r"W contains 1 non-finite"):
        Monarch.from_dense(torch.where(torch.arange(120).reshape(12, 10) == 5, float("nan"), w))
    with pytest.raises(TypeError, match="W must have a floating-point or complex dtype"):
        Monarch.from_dense(torch.ones(4, 4, dtype=torch.long))
    a, b = random_factors(1, (4, 6), (6, 4), seed=25)
    with pytest.raises(ValueError, match=r"num_blocks=\(4, 4\).*blocks_out \(4\) and b1 \(6\) divide one another"):
        Monarch.from_kronecker(a, b, num_blocks=4)
    with pytest.raises(ValueError, match=r"num_blocks=\(2, 4\).*input block size in/blocks_in \(6\) and b2 \(4\)"):
        Monarch.from_kronecker(a, b, num_blocks=(2, 4))
    with pytest.raises(ValueError, match=r"block_rank 5 exceeds min\(output block size 4, input block size 4\)"):
        Monarch.from_kronecker(a, b, block_rank=5)
    with pytest.raises(ValueError, match="A and B must have the same number of folds"):
        Monarch.from_kronecker(a, torch.randn(2, 6, 4, dtype=torch.float64))
    layer = Monarch(12, 10, 2, seed=0)
    with pytest.raises(ValueError, match=r"expects input of shape \(F=2, B, in_features=12\), got \(2, 3, 10\)"):
        layer(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        layer.flops(0)
