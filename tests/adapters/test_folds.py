"""Fold gathers and parameter graphs evaluated without advanced indexing equal cirkit's."""

from __future__ import annotations

import pytest
import torch

from cirkit.backend.torch.parameters.nodes import TorchPointerParameter
from cirkit.backend.torch.parameters.parameter import TorchParameter

from adapters.cirkit.folds import evaluate_parameter, gather_folds

from .test_swap import compile_pair
from .test_swap import float64  # noqa: F401 -- the autouse float64 fixture, for this module too

INDICES = {
    "identity": torch.arange(6).view(3, 2),
    "pairs swapped": torch.tensor([[1, 0], [3, 2], [5, 4]]),
    "repeated": torch.tensor([[0, 0], [5, 1], [2, 2]]),
    "one input": torch.tensor([4, 0, 2]),
    "fewer rows": torch.tensor([[0, 1], [2, 3]]),
}


@pytest.mark.parametrize("commutative", [False, True])
@pytest.mark.parametrize("name", list(INDICES))
def test_gather_equals_cirkits_indexing_with_gradients(name, commutative):
    idx = INDICES[name]
    parts = [torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
    weights = torch.randn(*idx.shape, 2, 3, generator=torch.Generator().manual_seed(9))
    got = gather_folds(parts, [0, 1], idx, commutative)
    ref = torch.cat(parts, dim=0)[idx]
    if commutative and name == "pairs swapped":  # same inputs per fold, in either order
        assert torch.equal(got.sort(dim=1).values, ref.sort(dim=1).values)
        return
    assert torch.equal(got, ref)
    grads = torch.autograd.grad((got * weights).sum(), parts)
    ref_grads = torch.autograd.grad((ref * weights).sum(), parts)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-14, atol=0)


def test_gather_keeps_the_order_for_non_commutative_consumers():
    """A Kronecker product or a sum layer needs its inputs in cirkit's order."""
    t = torch.arange(6.0).view(6, 1)
    got = gather_folds([t], [0], INDICES["pairs swapped"], commutative=False)
    assert got[:, :, 0].tolist() == [[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]


def test_slices_pass_through():
    t = torch.randn(3, 2)
    assert torch.equal(gather_folds([t], [0], (slice(None), None)), t[:, None])


@pytest.mark.parametrize("fold", [False, True])
def test_parameter_graphs_equal_cirkits_evaluation(fold):
    """Every parameter graph of a squared circuit and of its partition function: the same
    values as cirkit's evaluation, and the same gradients on the leaf tensors."""
    circuit, partition = compile_pair("quad-tree", "cp", "complex-lse-sum", fold, optimize=False)
    params = [m for c in (circuit, partition) for m in c.modules() if isinstance(m, TorchParameter)]
    pointers = [n for p in params for n in p.nodes if isinstance(n, TorchPointerParameter)]
    # folded: pointers into some folds of a tensor (the index_select path); unfolded: none
    assert any(n._fold_idx is not None for n in pointers) == fold  # noqa: SLF001
    leaves = list(circuit.parameters()) + list(partition.parameters())
    for p in params:
        got, ref = evaluate_parameter(p), p()
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.real.dtype)
        used = [leaf for leaf in leaves if leaf.requires_grad]
        g = torch.autograd.grad((got.real * probe).sum(), used, allow_unused=True)
        r = torch.autograd.grad((ref.real * probe).sum(), used, allow_unused=True)
        for a, b in zip(g, r):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_plans_go_with_their_index_tensors():
    """The reshape-or-select decision is cached per index tensor, and dropped with it."""
    from adapters.cirkit import folds

    before = len(folds._VIEW_PLANS)  # noqa: SLF001
    t = torch.randn(6, 2)
    for _ in range(50):  # throwaway indices, as from circuits compiled and discarded
        gather_folds([t], [0], torch.arange(6).view(3, 2))
    assert len(folds._VIEW_PLANS) <= before + 1  # noqa: SLF001
