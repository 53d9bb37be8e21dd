"""structlayers.gradients: which inputs' gradients the running backward pass needs."""

from __future__ import annotations

import pytest
import torch

from structlayers.gradients import wanted_gradients


class _Recorder(torch.autograd.Function):
    """``a * k * b`` (a non-tensor k between two tensors) recording what its backward is told."""

    seen: list = []

    @staticmethod
    def forward(ctx, a, k, b):  # type: ignore[override]
        return a * b * k

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        _Recorder.seen.append(wanted_gradients(ctx, (0, 2)))
        return grad, None, grad


def _run(ask):
    _Recorder.seen.clear()
    ask()
    return _Recorder.seen[-1]


def test_a_pass_asking_for_some_tensors_only_wants_their_gradients():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    # edges into views (a view's node) and into leaves, with autograd.grad and backward
    assert _run(lambda: torch.autograd.grad(_Recorder.apply(a.view(3), 2.0, b * 2).sum(), [b])) == [False, False, True]
    assert _run(lambda: torch.autograd.grad(_Recorder.apply(a.view(3), 2.0, b * 2).sum(), [a])) == [True, False, False]
    assert _run(lambda: torch.autograd.grad(_Recorder.apply(a, 2.0, b * 2).sum(), [b])) == [False, False, True]
    # a leaf asked for: torch cannot tell the node, so the gradient counts as wanted
    assert _run(lambda: torch.autograd.grad(_Recorder.apply(a, 2.0, b * 2).sum(), [a])) == [True, False, False]
    assert _run(lambda: _Recorder.apply(a, 2.0, b * 2).sum().backward()) == [True, False, True]
    # an input that needs no gradient stays False
    assert _run(lambda: _Recorder.apply(a, 2.0, b.detach()).sum().backward()) == [True, False, False]


def test_positions_must_name_every_tensor_argument():
    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):  # type: ignore[override]
            return a * b

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            wanted_gradients(ctx, (0,))
            return grad, grad

    a = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError, match="tensor_positions must name the node's 2 tensor arguments"):
        Wrong.apply(a, a * 1).sum().backward()
