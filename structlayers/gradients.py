"""Which inputs of a custom autograd node the running backward pass needs gradients for.

``ctx.needs_input_grad`` says which inputs require a gradient when the node was built. A pass
that asks for some tensors only (``torch.autograd.grad(out, probes)``: a query's derivative
with respect to the inputs' values, never the weights) still runs every branch of a node's
backward under it, e.g. a weight's gradient of the size of the weight times the samples. The
engine knows which of the node's edges lead to a wanted tensor; :func:`wanted_gradients`
asks it.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["wanted_gradients"]


def _will_execute(node) -> bool:
    """Whether the running backward pass executes ``node`` (True where torch cannot tell)."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # an older torch; a leaf's edge under autograd.grad
        return True


def wanted_gradients(ctx, tensor_positions: Sequence[int]) -> List[bool]:
    """Per argument of the node's ``apply``, whether this backward pass needs its gradient:
    ``ctx.needs_input_grad`` where an argument's edge leads to nothing the pass computes set
    to False. ``tensor_positions``: the positions of the tensor arguments, in order (the
    node's edges are the tensors' only). Call it from ``backward`` only."""
    wanted = list(ctx.needs_input_grad)
    edges = ctx.next_functions
    if len(edges) != len(tensor_positions):
        raise ValueError(f"tensor_positions must name the node's {len(edges)} tensor arguments, "
                         f"got {len(tensor_positions)} positions")
    for position, (node, _) in zip(tensor_positions, edges):
        if wanted[position] and node is not None:
            wanted[position] = _will_execute(node)
    return wanted
