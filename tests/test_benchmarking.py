"""structlayers.benchmarking: what its counters count (timings are never asserted)."""

from __future__ import annotations

import torch

from structlayers.benchmarking import matmul_macs


def test_matmul_macs_counts_the_products_run_forward_and_backward():
    """m·k·n per product; a backward through both operands adds the two products of the
    gradients; elementwise work adds nothing."""
    a = torch.randn(3, 5, 7, requires_grad=True)
    b = torch.randn(3, 7, 2)
    assert matmul_macs(lambda: torch.bmm(a, b).exp()) == 3 * 5 * 7 * 2
    assert matmul_macs(lambda: torch.bmm(a, b).sum().backward()) == 2 * 3 * 5 * 7 * 2  # b needs no gradient
    b.requires_grad_()
    assert matmul_macs(lambda: torch.bmm(a, b).sum().backward()) == 3 * 3 * 5 * 7 * 2
    assert matmul_macs(lambda: (a * 2).sum()) == 0
