"""Tensor decompositions by tensorly, fold by fold, on torch tensors: TT-matrix, CP, Tucker.

tensorly dispatches every operation through a backend chosen by name. The functions here
switch it to ``pytorch`` for the current thread only (:func:`torch_backend`) and restore
that thread's previous backend afterwards, so tensorly's global default, and any other
thread's backend, is never changed for the user. Inputs and outputs are torch tensors with
a leading fold axis; tensorly works on one fold at a time.

The tensorized layout is the tensor-train one (:mod:`structlayers.linalg.tt`): out =
m_1..m_d, in = n_1..n_d, and the weight seen as an order-d tensor with modes of size
m_k n_k (:func:`mode_tensor`). CP and Tucker of that tensor are sums of Kronecker
products of d small matrices (one per mode); A ⊗ B is CP rank 1 in the modes (a1 a2),
(b1 b2).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, List, Sequence, Tuple

import torch

from .tt import INDEX_LETTERS, Modes, interleave

#: ALS sweeps of :func:`cp_als` unless told otherwise (each costs about 3 * (entries of W) * rank
#: multiply-adds; from the SVD start the error has mostly settled by then).
CP_ITERATIONS = 25
#: HOOI sweeps of :func:`tucker_hooi` unless told otherwise (from the HOSVD start it converges fast).
TUCKER_ITERATIONS = 10
#: stop early when the relative error changes by less than this between sweeps.
CONVERGENCE_TOL = 1e-8


@contextlib.contextmanager
def torch_backend() -> Iterator[None]:
    """tensorly with its PyTorch backend in this block, for this thread only."""
    import tensorly as tl

    previous = tl.get_backend()
    tl.set_backend("pytorch", local_threadsafe=True)
    try:
        yield
    finally:
        tl.set_backend(previous, local_threadsafe=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # tensorly warns when an SVD start asks for more vectors than a mode has (it then pads
    # with random columns, which is what a rank above a mode size needs).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        yield


def split_layout(out_modes: Modes, in_modes: Modes) -> Tuple[Modes, Modes]:
    """The layout with separate out and in modes: out (m_1..m_d, 1..1), in (1..1, n_1..n_d), so
    the tensorized weight is (m_1, ..., m_d, n_1, ..., n_d), order 2d. Its decompositions
    have one factor per out mode and per in mode (cheaper to apply, but A ⊗ B is no longer
    rank one in it)."""
    d = len(out_modes)
    return tuple(out_modes) + (1,) * d, (1,) * d + tuple(in_modes)


def mode_tensor(w: torch.Tensor, out_modes: Modes, in_modes: Modes) -> torch.Tensor:
    """W (F, out, in) as (F, m_1 n_1, ..., m_d n_d)."""
    return interleave(w, out_modes, in_modes).reshape(w.shape[0], *(m * n for m, n in zip(out_modes, in_modes)))


def tt_matrix(w: torch.Tensor, out_modes: Modes, in_modes: Modes, ranks: Sequence[int]) -> List[torch.Tensor]:
    """TT-SVD of W (F, out, in) at bond ranks ``ranks`` (d+1 entries, ones at the ends, each
    at most its bond limit) by tensorly's ``tensor_train_matrix``; folded cores
    (F, r_{k-1}, m_k, n_k, r_k)."""
    from tensorly.decomposition import tensor_train_matrix

    f, d = w.shape[0], len(out_modes)
    per_fold = []
    with torch_backend():
        for t in w.reshape(f, *out_modes, *in_modes):
            per_fold.append(list(tensor_train_matrix(t, list(ranks)).factors))
    cores = [torch.stack([fold[k] for fold in per_fold]) for k in range(d)]
    for k, g in enumerate(cores):
        if tuple(g.shape[1:]) != (ranks[k], out_modes[k], in_modes[k], ranks[k + 1]):
            raise AssertionError(f"tensorly returned core {k} of shape {tuple(g.shape[1:])}")
    return cores


def cp_als(t: torch.Tensor, rank: int, *, iterations: int = CP_ITERATIONS, seed: int = 0,
           tol: float = CONVERGENCE_TOL) -> List[torch.Tensor]:
    """Rank-``rank`` CP of every fold of t (F, p_1, ..., p_d) by tensorly's ``parafac``
    (alternating least squares from the SVD start, random columns where a mode is smaller
    than the rank, drawn from ``seed``); factors (F, p_k, rank) with the weights folded in."""
    from tensorly.decomposition import parafac

    d = t.dim() - 1
    per_fold = []
    with torch_backend(), _quiet():
        for fold in t:
            weights, factors = parafac(fold, rank, n_iter_max=iterations, init="svd", tol=tol,
                                       random_state=seed)
            factors = list(factors)
            factors[-1] = factors[-1] * weights[None, :]
            per_fold.append(factors)
    return [torch.stack([fold[k] for fold in per_fold]) for k in range(d)]


def cp_exact(t: torch.Tensor) -> List[torch.Tensor]:
    """An exact CP of every fold of t (F, p_1, ..., p_d) of rank prod(p) / max(p): one term
    per entry of the other modes, unit vectors there and the fibre of t along the largest
    mode. Factors (F, p_k, rank), the same for every fold except the largest mode's."""
    f, dims = t.shape[0], tuple(t.shape[1:])
    big = max(range(len(dims)), key=lambda k: dims[k])
    rest = [k for k in range(len(dims)) if k != big]
    rank = math.prod(dims[k] for k in rest)
    grid = torch.arange(rank).reshape([dims[k] for k in rest])  # term index by the other modes' indices
    factors = []
    for k in range(len(dims)):
        if k == big:
            fibres = t.movedim(1 + big, -1).reshape(f, rank, dims[big])
            factors.append(fibres.transpose(1, 2))
            continue
        position = rest.index(k)
        index = grid.movedim(position, 0).reshape(dims[k], -1)  # terms whose k-th index is i
        one_hot = torch.zeros(dims[k], rank, dtype=t.dtype, device=t.device)
        one_hot.scatter_(1, index.to(t.device), 1)
        factors.append(one_hot.expand(f, -1, -1).clone())
    return factors


def tucker_hooi(t: torch.Tensor, ranks: Sequence[int], *, iterations: int = TUCKER_ITERATIONS,
                tol: float = CONVERGENCE_TOL) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Multilinear-rank ``ranks`` Tucker of every fold of t (F, p_1, ..., p_d) by tensorly's
    ``tucker`` (HOOI from the HOSVD start); core (F, R_1, ..., R_d), factors (F, p_k, R_k)
    with orthonormal columns."""
    from tensorly.decomposition import tucker

    d = t.dim() - 1
    cores, per_fold = [], []
    with torch_backend(), _quiet():
        for fold in t:
            core, factors = tucker(fold, list(ranks), n_iter_max=iterations, init="svd", tol=tol)
            cores.append(core)
            per_fold.append(list(factors))
    return torch.stack(cores), [torch.stack([fold[k] for fold in per_fold]) for k in range(d)]


def cp_network(out_modes: Modes, in_modes: Modes, rank: int):
    """Einsum subscripts of a CP layer: factor k (F, m_k, n_k, R) is ``f`` + m + n + ``r``-letter.
    Returns (factor subscripts, in subscripts, out subscripts, sizes), as
    :func:`~structlayers.linalg.tt.mpo_network` does."""
    d = len(out_modes)
    letters = iter(INDEX_LETTERS)
    ms = [next(letters) for _ in range(d)]
    ns = [next(letters) for _ in range(d)]
    r = next(letters)
    sizes = {**dict(zip(ms, out_modes)), **dict(zip(ns, in_modes)), r: rank}
    return tuple("f" + ms[k] + ns[k] + r for k in range(d)), "".join(ns), "".join(ms), sizes


def tucker_network(out_modes: Modes, in_modes: Modes, ranks: Sequence[int]):
    """Einsum subscripts of a Tucker layer: the core (F, R_1..R_d) first, then factor k
    (F, m_k, n_k, R_k); as :func:`cp_network` otherwise."""
    d = len(out_modes)
    letters = iter(INDEX_LETTERS)
    ms = [next(letters) for _ in range(d)]
    ns = [next(letters) for _ in range(d)]
    rs = [next(letters) for _ in range(d)]
    sizes = {**dict(zip(ms, out_modes)), **dict(zip(ns, in_modes)), **dict(zip(rs, ranks))}
    operands = ("f" + "".join(rs),) + tuple("f" + ms[k] + ns[k] + rs[k] for k in range(d))
    return operands, "".join(ns), "".join(ms), sizes


def multilinear_limits(dims: Sequence[int]) -> Tuple[int, ...]:
    """Largest useful multilinear rank per mode: min(p_k, prod of the other modes)."""
    total = math.prod(dims)
    return tuple(min(p, total // p) for p in dims)


def unfolding_spectra(t: torch.Tensor) -> List[torch.Tensor]:
    """Singular values of every mode unfolding of every fold: d tensors (F, min(p_k, rest))."""
    f, dims = t.shape[0], t.shape[1:]
    return [torch.linalg.svdvals(t.movedim(1 + k, 1).reshape(f, dims[k], -1)) for k in range(len(dims))]


__all__ = ["split_layout", "CONVERGENCE_TOL", "CP_ITERATIONS", "TUCKER_ITERATIONS", "cp_als", "cp_exact", "cp_network", "mode_tensor",
           "tucker_network",
           "multilinear_limits", "torch_backend", "tt_matrix", "tucker_hooi", "unfolding_spectra"]
