"""Kronecker helpers against the materialised product."""

import functools
import math

import pytest
import torch

from structlayers.linalg import (
    balanced_factor_shapes,
    check_factor_shapes,
    kron_apply,
    kron_chain_flops,
    kron_columns,
    kron_dense,
    kron_inner_lowrank,
    kron_rows,
    kron_sum_apply,
    lowrank_frobenius_sq,
)
from structlayers.linalg.kron import khatri_rao

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


def _chains_and_apply(seed, folds, samples, dims_a, dims_b, dtype):
    """Random chains (gradients required) of the given inner dimensions, an input of
    ``samples`` per fold, the expected output (the materialised product) and the apply."""
    g = generator(seed)
    chain_a = [torch.randn(folds, dims_a[i], dims_a[i + 1], generator=g, dtype=dtype).requires_grad_()
               for i in range(len(dims_a) - 1)]
    chain_b = [torch.randn(folds, dims_b[i], dims_b[i + 1], generator=g, dtype=dtype).requires_grad_()
               for i in range(len(dims_b) - 1)]
    a, b = chain_a[0], chain_b[0]
    for m in chain_a[1:]:
        a = a @ m
    for m in chain_b[1:]:
        b = b @ m
    x = torch.randn(folds, samples, dims_a[-1] * dims_b[-1], generator=g, dtype=dtype).requires_grad_()
    expected = (x @ kron_dense(a, b).transpose(1, 2)).detach()
    n_a = len(chain_a)

    def apply(x, *mats):
        return kron_apply(list(mats[:n_a]), list(mats[n_a:]), x)

    return (x, *chain_a, *chain_b), expected, apply, g


@pytest.mark.parametrize("per_fold", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("dims_a,dims_b", [([3, 4], [5, 2]), ([5, 2, 4], [3, 6]), ([5, 2, 4], [3, 2, 6])])
def test_kron_apply_on_a_batch_fold_by_fold_or_broadcast(per_fold, dtype, dims_a, dims_b, monkeypatch):
    """A matrix on the blocks' first axis, applied fold by fold (each fold's matrix read in
    place; into one output without autograd, stacked with it) or broadcast to the samples:
    values against the materialised product, with and without autograd, and gradcheck."""
    from structlayers.linalg import kron as kron_module

    monkeypatch.setattr(kron_module, "PER_FOLD_MIN_ELEMENTS", 0 if per_fold else 10 ** 9)
    calls = []
    original = kron_module._first_axis
    monkeypatch.setattr(kron_module, "_first_axis", lambda m, blocks: calls.append(1) or original(m, blocks))
    inputs, expected, apply, _ = _chains_and_apply(6, 3, 4, dims_a, dims_b, dtype)
    with torch.no_grad():
        assert rel(apply(*inputs), expected) < 1e-13
    assert rel(apply(*inputs), expected) < 1e-13
    assert bool(calls) == per_fold  # each order has a step on the first axis
    assert torch.autograd.gradcheck(apply, inputs)


@pytest.mark.parametrize("m_dtype,blocks_dtype", [(torch.float64, torch.float64), (torch.float64, torch.complex128),
                                                   (torch.complex128, torch.float64), (torch.complex128, torch.complex128)])
def test_first_axis_products_are_one_node_with_gradients_in_each_inputs_dtype(m_dtype, blocks_dtype):
    """The fold-by-fold products on the blocks' first axis under autograd: one node (no stack,
    whose copy forward and backward it replaces), values against einsum, gradients by finite
    differences, real gradients for a real input beside a complex one, and each input's
    gradient the same when only it is asked for."""
    from structlayers.linalg import kron as kron_module

    g = torch.Generator().manual_seed(3)
    m = torch.randn(3, 4, 5, generator=g, dtype=m_dtype).requires_grad_()
    blocks = torch.randn(3, 2, 5, 6, generator=g, dtype=blocks_dtype).requires_grad_()
    out = kron_module._first_axis(m, blocks)
    assert type(out.grad_fn).__name__ == "_FirstAxisBackward"
    torch.testing.assert_close(out, torch.einsum("frp,fnpq->fnrq", m.to(out.dtype), blocks.to(out.dtype)), rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(kron_module._first_axis, (m, blocks))
    weights = torch.randn(out.shape, generator=g, dtype=out.dtype)
    both = torch.autograd.grad((out * weights).sum().real, (m, blocks))
    assert [t.dtype for t in both] == [m_dtype, blocks_dtype]
    for i, alone_inputs in enumerate([(m, blocks.detach()), (m.detach(), blocks)]):
        (alone,) = torch.autograd.grad((kron_module._first_axis(*alone_inputs) * weights).sum().real, alone_inputs[i])
        torch.testing.assert_close(alone, both[i], rtol=1e-13, atol=1e-13)


def test_first_axis_backward_skips_the_matrix_gradient_a_pass_does_not_ask_for():
    """A query's derivative with respect to the blocks (a view of them here, as the evaluation
    passes its values) runs the forward's products and the blocks' gradient only: no
    products for the matrix's gradient, which ``needs_input_grad`` alone would have run."""
    from structlayers.benchmarking import matmul_macs
    from structlayers.linalg import kron as kron_module

    f, n, r, p, q = 3, 4, 5, 6, 7
    m = torch.randn(f, r, p, dtype=torch.float64, requires_grad=True)
    blocks = torch.randn(f, n, p, q, dtype=torch.float64, requires_grad=True)
    one = f * n * r * p * q  # multiply-adds of one pass of products

    def values_only():
        view = blocks.view(f, n, p, q)
        torch.autograd.grad(kron_module._first_axis(m, view).sum(), [view])

    assert matmul_macs(values_only) == 2 * one
    assert matmul_macs(lambda: kron_module._first_axis(m, blocks).sum().backward()) == 3 * one


def test_one_sample_chain_backward_skips_the_matrices_gradients_a_pass_does_not_ask_for():
    """``A X Bᵀ`` for one sample per fold (one node): a pass asking for the block's gradient
    only (a view of it, as a query's) runs fewer products than one asking for everything, and
    gives the same block gradient."""
    from structlayers.benchmarking import matmul_macs

    inputs, _, apply, g = _chains_and_apply(5, 2, 1, [5, 2, 4], [3, 6], torch.float64)
    x, mats = inputs[0], inputs[1:]
    weights = torch.randn(2, 1, 15, generator=g, dtype=torch.float64)
    found = {}

    def values_only():
        view = x.view(x.shape)
        (found["values_only"],) = torch.autograd.grad((apply(view, *mats) * weights).sum(), [view])

    def everything():
        x.grad = None
        (apply(x, *mats) * weights).sum().backward()

    assert matmul_macs(values_only) < matmul_macs(everything)
    torch.testing.assert_close(found["values_only"], x.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("dims_a,dims_b", [([3, 4], [5, 2]), ([2, 5], [3, 4]), ([4, 4], [4, 4]),  # both orders
                                           ([5, 2, 4], [3, 6]), ([5, 2, 4], [3, 2, 6])])  # chains (factored)
def test_kron_apply_of_one_sample_per_fold_and_its_gradients(dtype, dims_a, dims_b):
    """One sample per fold runs ``A X Bᵀ`` as one autograd node with its own backward, for
    plain factors and chains: values against the materialised product, gradients by finite
    differences (complex: torch's conjugate convention), and each input's gradient alone."""
    inputs, expected, apply, g = _chains_and_apply(5, 2, 1, dims_a, dims_b, dtype)
    assert rel(apply(*inputs), expected) < 1e-13
    assert torch.autograd.gradcheck(apply, inputs)
    weights = torch.randn(2, 1, dims_a[0] * dims_b[0], generator=g, dtype=dtype)
    full = torch.autograd.grad((apply(*inputs) * weights).sum().real, inputs)
    for i in range(len(inputs)):  # only one input needing a gradient: the same gradient
        alone_inputs = [t.detach().requires_grad_(j == i) for j, t in enumerate(inputs)]
        (alone,) = torch.autograd.grad((apply(*alone_inputs) * weights).sum().real, alone_inputs[i])
        torch.testing.assert_close(alone, full[i], rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("shape_a,shape_b", [((3, 4), (5, 2)), ((6, 2), (2, 7)), ((4, 4), (4, 4))])
def test_kron_sum_apply_is_the_sum_of_the_products(shape_a, shape_b):
    """Both orders (A first, B first: whichever is cheaper for the shapes) against the sum of
    the materialised products."""
    g = generator(5)
    r = 3
    a = torch.randn(2, r, *shape_a, generator=g, dtype=torch.float64)
    b = torch.randn(2, r, *shape_b, generator=g, dtype=torch.float64)
    w = sum(kron_dense(a[:, t], b[:, t]) for t in range(r))
    x = torch.randn(2, 6, shape_a[1] * shape_b[1], generator=g, dtype=torch.float64)
    assert rel(kron_sum_apply(a, b, x), x @ w.transpose(1, 2)) < 1e-13


def test_factor_shapes():
    assert balanced_factor_shapes(12, 10) == ((3, 2), (4, 5))
    assert balanced_factor_shapes(4096, 4096) == ((64, 64), (64, 64))
    assert balanced_factor_shapes(7, 13) == ((1, 1), (7, 13))
    assert check_factor_shapes([(3, 2), (4, 5)], 12, 10) == ((3, 2), (4, 5))
    with pytest.raises(ValueError, match=r"give a 6 x 6 product, but the layer is 6 x 5"):
        check_factor_shapes(((2, 2), (3, 3)), 6, 5)
    with pytest.raises(ValueError, match=r"factor_shapes must be \(\(a1, a2\), \(b1, b2\)\) of positive ints"):
        check_factor_shapes(((2, 0), (3, 3)), 6, 0)


@pytest.mark.parametrize("sides", [("a", "b"), ("b", "a")])
def test_the_symmetric_square_backward_equals_the_general_one(sides):
    """A X Aᵀ with X symmetric: A's gradient from (G + Gᵀ)(A X) in one product equals the sum
    of the two the general backward computes, for either order of the sides and any G; the
    block's gradient is the same."""
    from structlayers.linalg.kron import block_chain_backward, block_chain_forward, symmetric_square

    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 6, 6, dtype=torch.float64, generator=g)
    x = torch.randn(3, 6, 6, dtype=torch.float64, generator=g)
    x = x + x.transpose(1, 2)
    grad = torch.randn(3, 6, 6, dtype=torch.float64, generator=g)  # not symmetric
    mats = [a, a]
    assert symmetric_square(sides, mats)
    _, inputs = block_chain_forward(x, sides, mats)
    g_x, (g_first, g_second) = block_chain_backward(grad, sides, mats, inputs, True, [True, True])
    s_x, (s_first, s_second) = block_chain_backward(grad, sides, mats, inputs, True, [True, True], symmetric=True)
    assert s_second is None
    torch.testing.assert_close(s_first, g_first + g_second, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_x, g_x, rtol=1e-12, atol=1e-12)
    # only one real square matrix on both sides qualifies
    assert not symmetric_square(sides, [a, a.clone()])
    assert not symmetric_square(sides, [a.to(torch.complex128)] * 2)
    assert not symmetric_square(sides, [a[:, :4]] * 2)
    assert not symmetric_square(("a", "a"), mats)


@pytest.mark.parametrize("thin", [True, False])
@pytest.mark.parametrize("first", ["a", "b"])
def test_the_symmetric_chain_backward_equals_the_general_one(first, thin, monkeypatch):
    """L R X Rᵀ Lᵀ with X symmetric and one real thin chain on both sides: R's and L's gradients
    from the shortcut equal the sums of the two the general backward computes, and the block's
    gradient is the symmetric part of the general one (for any G), whichever side goes first;
    with ``(G + Gᵀ) L`` formed as two thin products or from G + Gᵀ (``thin``)."""
    from structlayers.linalg import kron
    from structlayers.linalg.kron import block_chain_backward, block_chain_forward, symmetric_chain

    monkeypatch.setattr(kron, "THIN_CHAIN_RATIO", 1 if thin else 100)

    g = torch.Generator().manual_seed(4)
    lower = torch.randn(3, 7, 2, dtype=torch.float64, generator=g)
    right = torch.randn(3, 2, 7, dtype=torch.float64, generator=g)
    x = torch.randn(3, 7, 7, dtype=torch.float64, generator=g)
    x = x + x.transpose(1, 2)
    grad = torch.randn(3, 7, 7, dtype=torch.float64, generator=g)  # not symmetric
    other = "b" if first == "a" else "a"
    sides, mats = (first, other, first, other), [right, right, lower, lower]
    assert symmetric_chain(sides, mats)
    y, inputs = block_chain_forward(x, sides, mats)
    a = lower @ right
    torch.testing.assert_close(y, a @ x @ a.transpose(1, 2), rtol=1e-12, atol=1e-12)
    g_x, general = block_chain_backward(grad, sides, mats, inputs, True, [True] * 4)
    s_x, shortcut = block_chain_backward(grad, sides, mats, inputs, True, [True] * 4, symmetric=True)
    assert shortcut[1] is None and shortcut[3] is None
    torch.testing.assert_close(shortcut[0], general[0] + general[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shortcut[2], general[2] + general[3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_x, (g_x + g_x.transpose(1, 2)) / 2, rtol=1e-12, atol=1e-12)
    # only one real chain, the same tensors on both sides, R before L, qualifies
    assert not symmetric_chain(sides, [right, right.clone(), lower, lower])
    assert not symmetric_chain(sides, [right, right, lower.to(torch.complex128), lower.to(torch.complex128)])
    assert not symmetric_chain((first, first, other, other), mats)
    assert not symmetric_chain(sides, [right, lower, right, lower])


def test_chains_get_a_terms_axis_and_one_list_for_the_same_matrices():
    """with_terms_axis gives (F, 1, ·, ·) matrices, one list for both sides exactly where they are
    the same tensors (same_matrices), two lists for equal values in distinct tensors."""
    from structlayers.linalg.kron import same_matrices, with_terms_axis

    left, right = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    chain = [left, right]
    a, b = with_terms_axis(chain, [left, right])
    assert same_matrices(chain, [left, right]) and a is b and [m.shape for m in a] == [(3, 1, 5, 2), (3, 1, 2, 4)]
    copy = [left.clone(), right]
    a, b = with_terms_axis(chain, copy)
    assert not same_matrices(chain, copy) and a is not b and torch.equal(a[0], b[0])
    assert not same_matrices(chain, [left])


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("widths", [(3,), (3, 4), (2, 3, 4)])
def test_khatri_rao_products_and_their_gradients_are_row_wise_kronecker_products(dtype, widths):
    gen = generator(11)
    parts = [torch.randn(2, 5, v, generator=gen, dtype=dtype).requires_grad_() for v in widths]
    got = khatri_rao(parts)
    # row by row, torch.kron of the parts' rows (the last part's index fastest)
    want = torch.stack([torch.stack([functools.reduce(torch.kron, [p[f, k] for p in parts]) for k in range(5)])
                        for f in range(2)])
    assert got.shape == (2, 5, math.prod(widths))
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    weights = torch.randn(got.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad((got * weights).sum().real, parts)
    expected = torch.autograd.grad((want * weights).sum().real, parts)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)
    torch.autograd.gradcheck(lambda *ps: khatri_rao(list(ps)), [p.detach().requires_grad_() for p in parts])


def test_khatri_rao_of_a_real_and_a_complex_factor_gives_the_real_one_a_real_gradient():
    u = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.complex128, requires_grad=True)
    weights = torch.randn(2, 3, 8, dtype=torch.complex128)
    got = torch.autograd.grad(khatri_rao([u, w]), (u, w), weights)
    want = torch.autograd.grad((u.unsqueeze(-1) * w.unsqueeze(-2)).flatten(start_dim=-2), (u, w), weights)
    assert got[0].dtype == torch.float64
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-14)


def test_khatri_rao_one_tensor_on_both_sides_gets_both_gradients():
    u = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(khatri_rao([u, u]).square().sum(), [u])
    (e,) = torch.autograd.grad((u.unsqueeze(-1) * u.unsqueeze(-2)).flatten(start_dim=-2).square().sum(), [u])
    torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("parts, message", [([], "at least one"),
                                            ([torch.ones(2, 3, 1), torch.ones(2, 4, 1)], "leading shapes")])
def test_khatri_rao_rejects_parts_that_have_no_row_wise_product(parts, message):
    with pytest.raises(ValueError, match=message):
        khatri_rao(parts)
