"""tensorly behind structlayers.linalg.decompose: backend scoping, exact CP, shapes."""

from __future__ import annotations

import threading

import pytest
import torch

from structlayers.linalg.decompose import (
    cp_als,
    cp_exact,
    mode_tensor,
    multilinear_limits,
    torch_backend,
    tt_matrix,
    tucker_hooi,
)
from structlayers.linalg.tt import bond_limits, chain_dense

from ..helpers import generator, rel

EXACT = 1e-12


def _cp_dense(factors):
    letters = "abcdeg"[: len(factors)]
    eq = ",".join(f"f{c}r" for c in letters) + "->f" + letters
    return torch.einsum(eq, *factors)


@pytest.mark.parametrize("dims", [(3,), (4, 2), (2, 5, 3), (3, 2, 2, 4)])
def test_exact_cp_has_rank_prod_over_max_and_reproduces_the_tensor(dims):
    t = torch.randn(2, *dims, generator=generator(1), dtype=torch.float64)
    factors = cp_exact(t)
    big = max(dims)
    assert all(u.shape[-1] == (torch.tensor(dims).prod().item() // big) for u in factors)
    assert rel(_cp_dense(factors), t) < EXACT


def test_als_and_hooi_shapes_and_fold_independence():
    t = torch.randn(3, 4, 5, 6, generator=generator(2), dtype=torch.float64)
    factors = cp_als(t, 3, iterations=5, seed=0)
    assert [tuple(u.shape) for u in factors] == [(3, 4, 3), (3, 5, 3), (3, 6, 3)]
    alone = cp_als(t[1:2], 3, iterations=5, seed=0)
    assert all(torch.allclose(u[1:2], v, atol=1e-12) for u, v in zip(factors, alone))
    core, us = tucker_hooi(t, (2, 3, 4))
    assert tuple(core.shape) == (3, 2, 3, 4) and [tuple(u.shape) for u in us] == [(3, 4, 2), (3, 5, 3), (3, 6, 4)]
    assert multilinear_limits((4, 5, 6)) == (4, 5, 6) and multilinear_limits((2, 3, 10)) == (2, 3, 6)


def test_tt_matrix_at_full_ranks_is_exact():
    w = torch.randn(2, 12, 8, generator=generator(3), dtype=torch.float64)
    om, im = (2, 3, 2), (2, 2, 2)
    ranks = (1,) + bond_limits(om, im) + (1,)
    cores = tt_matrix(w, om, im, ranks)
    assert rel(chain_dense(cores)[:, 0, :, :, 0], w) < 1e-10
    assert mode_tensor(w, om, im).shape == (2, 4, 6, 4)


def test_backend_is_switched_for_this_thread_only_and_restored():
    import tensorly as tl

    before = tl.get_backend()
    tl.set_backend("numpy")
    seen = {}
    try:
        with torch_backend():
            seen["inside"] = tl.get_backend()
            worker = threading.Thread(target=lambda: seen.__setitem__("other thread", tl.get_backend()))
            worker.start()
            worker.join()
        seen["after"] = tl.get_backend()
    finally:
        tl.set_backend(before)
    assert seen == {"inside": "pytorch", "other thread": "numpy", "after": "numpy"}
