"""Contraction orders (structlayers.linalg.contract): counts, execution, chunking, memory limits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from structlayers.linalg.contract import contract, contract_dense, plan, steps_from_pairs

from ..helpers import generator, rel

EXACT = 1e-12


def _operands(inputs, sizes, seed=0):
    g = generator(seed)
    return [torch.randn([sizes[c] for c in s], generator=g, dtype=torch.float64) for s in inputs]


def test_step_costs_are_the_product_of_all_index_sizes():
    sizes = {"f": 2, "b": 3, "i": 4, "j": 5, "k": 6}
    # x (f b i) with A (f i j): contract i -> (f b j): 2*3*4*5; then with B (f j k): 2*3*5*6
    steps, macs, peak = steps_from_pairs(("fbi", "fij", "fjk"), "fbk", sizes, [(0, 1), (0, 1)])
    assert [s.macs for s in steps] == [120, 180] and macs == 300
    assert peak == max(2 * 3 * 5, 2 * 3 * 6)
    assert steps[0].equation == "fbi,fij->fbj" and steps[-1].result == "fbk"


def test_searched_order_is_the_cheapest_of_all_pairings():
    inputs, output = ("fbij", "fkil", "fmjl"), "fbkm"
    sizes = {"f": 2, "b": 30, "i": 4, "j": 5, "k": 6, "l": 7, "m": 8}
    found = plan(inputs, output, tuple(sorted(sizes.items())))
    brute = min(steps_from_pairs(inputs, output, sizes, pairs)[1]
                for pairs in ([(0, 1), (0, 1)], [(0, 2), (0, 1)], [(1, 2), (0, 1)]))
    assert found.macs == brute


@pytest.mark.parametrize("chunk", [None, 1, 7, 100])
def test_contract_matches_einsum_and_counts_exactly(chunk):
    inputs, output = ("fbij", "fkir", "fmjr"), "fbkm"  # r: a hyperedge shared by two factors
    sizes = {"f": 2, "b": 13, "i": 4, "j": 5, "k": 6, "r": 3, "m": 2}
    ops = _operands(inputs, sizes)
    p = plan(inputs, output, tuple(sorted(sizes.items())))
    with FlopCounterMode(display=False) as counter:
        y = contract(p, ops, chunk=None if chunk is None else (0, "b", chunk))
    assert rel(y, torch.einsum("fbij,fkir,fmjr->fbkm", *ops)) < EXACT
    assert counter.get_total_flops() == 2 * p.macs


def test_outer_steps_are_counted():
    """Factors sharing only a rank index (CP) meet in an outer product; it is run as a
    matmul so that torch's counter sees it."""
    inputs, output = ("fair", "fbjr", "fckr"), "fabcijk"
    sizes = {"f": 2, "a": 2, "i": 3, "b": 4, "j": 2, "c": 3, "k": 2, "r": 5}
    ops = _operands(inputs, sizes, seed=1)
    p = plan(inputs, output, tuple(sorted(sizes.items())))
    assert any(s.outer for s in p.steps)
    with FlopCounterMode(display=False) as counter:
        y = contract(p, ops)
    assert rel(y, torch.einsum("fair,fbjr,fckr->fabcijk", *ops)) < EXACT
    assert counter.get_total_flops() == 2 * p.macs
    # contracting only an index of size 1 is an outer product too
    a, b = _operands(("fit", "ftj"), {"f": 2, "i": 3, "t": 1, "j": 4}, seed=2)
    with FlopCounterMode(display=False) as counter:
        w = contract_dense(("fit", "ftj"), "fij", (a, b))
    assert rel(w, a @ b) < EXACT and counter.get_total_flops() == 2 * 2 * 3 * 4


def test_memory_limit_is_respected_when_possible():
    inputs, output = ("fbi", "fij", "fjk"), "fbk"
    sizes = {"f": 1, "b": 1000, "i": 8, "j": 8, "k": 8}
    key = tuple(sorted(sizes.items()))
    free = plan(inputs, output, key)
    assert free.peak == 1000 * 8
    tight = plan(inputs, output, key, 1)  # nothing fits: the search is repeated without the limit
    assert len(tight.steps) == 2 and tight.macs == free.macs
    one = plan(("fbi",), "fib", (("b", 3), ("f", 2), ("i", 4)))
    assert one.macs == 0 and math.prod((2, 4, 3)) == one.peak
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.equal(contract(one, [x]), x.transpose(1, 2))


def test_gradients_flow_through_every_step():
    inputs, output = ("fbij", "fkir", "fmjr"), "fbkm"
    sizes = {"f": 1, "b": 3, "i": 2, "j": 2, "k": 2, "r": 2, "m": 2}
    ops = [t.requires_grad_(True) for t in _operands(inputs, sizes, seed=3)]
    p = plan(inputs, output, tuple(sorted(sizes.items())))
    assert torch.autograd.gradcheck(lambda *t: contract(p, list(t), chunk=(0, "b", 2)), tuple(ops))
