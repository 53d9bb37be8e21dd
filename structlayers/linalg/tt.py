"""Tensor trains of matrices (matrix-product operators): layouts, TT-SVD, contraction, costs.

The feature counts are factored into ``d`` modes, ``out = m_1 ... m_d`` and
``in = n_1 ... n_d`` (row-major multi-indices, the ``torch.kron`` convention), and

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_d[:, i_d, j_d, :]

with cores G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1; the r_k are the bond
ranks (bond dimensions). Every function takes folded cores (F, r_{k-1}, m_k, n_k, r_k).

TT-SVD (Oseledets 2011): sequential truncated SVDs of the weight with out and in
mode indices interleaved, (m_1 n_1)(m_2 n_2)... The cores come out left-orthonormal,
so the squared error is exactly the sum of the squared tails discarded at each step.

Automatic modes: each feature count is split into ``d`` factors as evenly as
possible (the smallest largest factor), out modes ascending and in modes
descending, which balances m_k n_k across cores and so maximises the bond ranks
the layout can hold. Factors of 1 are used when a count has fewer than ``d``
prime factors (e.g. out=7, in=11, d=2 gives modes (1, 7) and (11, 1), a
rank-limited layout). Default ``d``: 3 when both counts have at least three prime
factors (with multiplicity), else 2.

Costs. Applying an MPO is one sweep over the cores, right-to-left or left-to-right:

    right-to-left: sum_k r_{k-1} r_k * (m_k ... m_d) * (n_1 ... n_k)
    left-to-right: sum_k r_{k-1} r_k * (m_1 ... m_k) * (n_k ... n_d)

multiply-adds per sample and fold (:func:`sweep_costs`). Other orders (contracting some
cores with each other first, or all of them into W) are found by a contraction-order
search over the network :func:`mpo_network` describes (see :mod:`structlayers.linalg.contract`).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence as _SequenceABC
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._checks import check_positive_int
from .svd import smallest_rank_for_tolerance, svd, tail_error_sq

Modes = Tuple[int, ...]

#: cores used when neither modes nor ``num_cores`` are given and both counts allow three.
DEFAULT_MAX_CORES = 3


# ------------------------------------------------------------- mode layouts
def prime_factor_count(n: int) -> int:
    """Number of prime factors of n counted with multiplicity (Omega(n)); 0 for n = 1."""
    count, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            n //= p
            count += 1
        p += 1
    return count + (1 if n > 1 else 0)


def balanced_modes(n: int, d: int) -> Modes:
    """n as a product of d positive factors, ascending, with the largest factor as small as
    possible (ties: the next largest, and so on). Factors of 1 appear only when n has
    fewer than d prime factors."""
    n, d = check_positive_int(n, "n"), check_positive_int(d, "d")
    best: List[Optional[Modes]] = [None]

    def key(modes: Modes) -> Modes:
        return tuple(sorted(modes, reverse=True))

    def search(rest: int, slots: int, smallest: int, prefix: Tuple[int, ...]) -> None:
        if slots == 1:
            if rest >= smallest:
                cand = prefix + (rest,)
                if best[0] is None or key(cand) < key(best[0]):
                    best[0] = cand
            return
        # Non-decreasing factors: the next one is at most the geometric mean of the rest.
        limit = int(round(rest ** (1.0 / slots))) + 1
        for f in range(smallest, limit + 1):
            if rest % f == 0 and f ** slots <= rest:
                search(rest // f, slots - 1, f, prefix + (f,))

    search(n, d, 1, ())
    assert best[0] is not None
    return best[0]


def default_num_cores(out_features: int, in_features: int) -> int:
    """3 when both counts have at least three prime factors, else 2."""
    omega = min(prime_factor_count(out_features), prime_factor_count(in_features))
    return DEFAULT_MAX_CORES if omega >= DEFAULT_MAX_CORES else 2


def check_modes(modes: object, features: int, name: str, features_name: str) -> Modes:
    """``modes`` as a tuple of positive ints whose product is ``features``, else raise."""
    if isinstance(modes, (str, bytes)) or not isinstance(modes, _SequenceABC):
        raise TypeError(f"{name} must be a list or tuple of positive ints, got {type(modes).__name__} {modes!r}")
    if len(modes) == 0:
        raise ValueError(f"{name} must have at least one entry (one per core)")
    out = tuple(check_positive_int(m, f"{name}[{k}]") for k, m in enumerate(modes))
    if math.prod(out) != features:
        raise ValueError(f"{name} {out} multiply to {math.prod(out)}, but {features_name} is {features}")
    return out


def resolve_modes(
    out_features: int,
    in_features: int,
    out_modes: Optional[Sequence[int]] = None,
    in_modes: Optional[Sequence[int]] = None,
    num_cores: Optional[int] = None,
    *,
    what: str = "",
) -> Tuple[Modes, Modes]:
    """Validate given modes and fill in missing ones (see the module docstring).

    ``what`` prefixes the option names in error messages (e.g. "factor A").
    """
    prefix = f"{what} " if what else ""
    if num_cores is not None:
        num_cores = check_positive_int(num_cores, f"{prefix}num_cores")
    om = None if out_modes is None else check_modes(out_modes, out_features, f"{prefix}out_modes", f"{prefix}out_features")
    im = None if in_modes is None else check_modes(in_modes, in_features, f"{prefix}in_modes", f"{prefix}in_features")
    if om is not None and im is not None and len(om) != len(im):
        raise ValueError(f"{prefix}out_modes and in_modes must have the same length (one pair per core), "
                         f"got {len(om)} and {len(im)}: {om} and {im}")
    given = om if om is not None else im
    if given is not None:
        if num_cores is not None and num_cores != len(given):
            raise ValueError(f"{prefix}num_cores={num_cores} disagrees with the {len(given)} given modes {given}")
        d = len(given)
    else:
        d = num_cores if num_cores is not None else default_num_cores(out_features, in_features)
    if om is None:
        om = balanced_modes(out_features, d)
    if im is None:
        im = tuple(reversed(balanced_modes(in_features, d)))
    return om, im


def bond_limits(out_modes: Modes, in_modes: Modes) -> Tuple[int, ...]:
    """Largest useful rank of each of the d-1 bonds: min(prod_{i<=k} m_i n_i, prod_{i>k} m_i n_i).

    A larger bond rank cannot represent anything more; TT-SVD at full rank reaches it.
    """
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    total = math.prod(sizes)
    limits, left = [], 1
    for p in sizes[:-1]:
        left *= p
        limits.append(min(left, total // left))
    return tuple(limits)


# ------------------------------------------------------------------- TT-SVD
def interleave(w: torch.Tensor, out_modes: Modes, in_modes: Modes) -> torch.Tensor:
    """(F, out, in) -> (F, m_1 n_1 m_2 n_2 ... m_d n_d) flattened, mode indices interleaved."""
    f, d = w.shape[0], len(out_modes)
    t = w.reshape(f, *out_modes, *in_modes)
    order = [0] + [i for k in range(d) for i in (1 + k, 1 + d + k)]
    return t.permute(order).reshape(f, -1)


def tt_svd(
    t: torch.Tensor,
    dims: Sequence[int],
    *,
    rank: Optional[int] = None,
    step_tolerance: Optional[float] = None,
    total_sq: Optional[torch.Tensor] = None,
    fold_weights: Optional[torch.Tensor] = None,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Folded TT-SVD of t (F, prod(dims)) with physical dimensions ``dims``.

    Returns cores (F, r_{k-1}, dims[k], r_k) (all but the last left-orthonormal) and the
    squared error discarded at each of the d-1 steps, per fold (each (F,)); the
    squared error of the result is exactly their sum.

    rank: bond ranks min(rank, available singular values) (= min(rank, bond limit)).
    step_tolerance: at each step the smallest rank shared by all folds with
        sum_f w_f tail_f(r)^2 <= step_tolerance^2 * sum_f total_sq_f, where w =
        ``fold_weights`` (default ones) and ``total_sq`` (default ||t_f||^2).
    Neither: full bond ranks, exact.
    """
    f = t.shape[0]
    if total_sq is None:
        total_sq = (t.abs() ** 2).sum(dim=1)
    weights = None if fold_weights is None else fold_weights.double()[:, None]
    cores, step_errors = [], []
    c, r_prev = t, 1
    for p in dims[:-1]:
        u, s, vh = svd(c.reshape(f, r_prev * p, -1))
        tails = tail_error_sq(s)  # (F, p_max + 1)
        if rank is not None:
            r = min(rank, s.shape[1])
        elif step_tolerance is not None:
            weighted = tails if weights is None else tails * weights
            r = smallest_rank_for_tolerance(weighted, total_sq, step_tolerance) or s.shape[1]
        else:
            r = s.shape[1]
        cores.append(u[:, :, :r].reshape(f, r_prev, p, r))
        step_errors.append(tails[:, r])
        c = s[:, :r, None].to(vh.dtype) * vh[:, :r, :]
        r_prev = r
    cores.append(c.reshape(f, r_prev, dims[-1], 1))
    return cores, step_errors


def chain_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract consecutive cores (F, r, m, n, r') into (F, r_left, M, N, r_right), with
    M = prod m and N = prod n in row-major (torch.kron) order. Differentiable."""
    t = cores[0]
    for g in cores[1:]:
        f, rl, big_m, big_n, _ = t.shape
        _, _, m, n, rr = g.shape
        t = torch.einsum("faMNr,frmns->faMmNns", t, g).reshape(f, rl, big_m * m, big_n * n, rr)
    return t


def sweep_costs(out_modes: Modes, in_modes: Modes, ranks: Sequence[int]) -> Tuple[int, int]:
    """Multiply-adds per sample (and fold) of the right-to-left and left-to-right sweeps of
    an MPO with these modes and bond ranks ``(1, r_1, ..., r_{d-1}, 1)``."""
    om, im, r, d = out_modes, in_modes, ranks, len(out_modes)
    rtl = sum(r[k] * r[k + 1] * math.prod(om[k:]) * math.prod(im[:k + 1]) for k in range(d))
    ltr = sum(r[k] * r[k + 1] * math.prod(om[:k + 1]) * math.prod(im[k:]) for k in range(d))
    return rtl, ltr


#: einsum letters for network indices; ``f`` (fold) and ``b`` (batch) are reserved.
INDEX_LETTERS = "".join(c for c in string.ascii_letters if c not in "fb")


def mpo_network(out_modes: Modes, in_modes: Modes, ranks: Sequence[int]
                ) -> Tuple[Tuple[str, ...], str, str, Dict[str, int]]:
    """Einsum subscripts of an MPO as a tensor network.

    Returns (core subscripts, in subscripts, out subscripts, sizes): core k is the view
    (F, [r_{k-1}], m_k, n_k, [r_k]) without its boundary bonds (r_0 = r_d = 1), written
    ``f`` + bond + m + n + bond; ``in`` are the n_k letters and ``out`` the m_k letters, so
    x (F, B, n_1..n_d) is ``"fb" + in``, y is ``"fb" + out`` and W is ``"f" + out + in``.
    ``sizes`` holds every letter but ``f`` and ``b``.
    """
    d = len(out_modes)
    letters = iter(INDEX_LETTERS)
    ms = [next(letters) for _ in range(d)]
    ns = [next(letters) for _ in range(d)]
    bonds = [next(letters) for _ in range(d - 1)]
    sizes = {**dict(zip(ms, out_modes)), **dict(zip(ns, in_modes)), **dict(zip(bonds, ranks[1:-1]))}
    cores = tuple("f" + (bonds[k - 1] if k > 0 else "") + ms[k] + ns[k] + (bonds[k] if k < d - 1 else "")
                  for k in range(d))
    return cores, "".join(ns), "".join(ms), sizes


def core_views(cores: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Folded cores (F, r, m, n, r') without the boundary bonds, as :func:`mpo_network` names them."""
    views = list(cores)
    views[0] = views[0][:, 0]
    views[-1] = views[-1][..., 0]
    return views


def unflatten_cores(cores: Sequence[torch.Tensor], om: Modes, im: Modes) -> List[torch.Tensor]:
    """Cores (F, r, m_k * n_k, r') from :func:`tt_svd` as MPO cores (F, r, m_k, n_k, r')."""
    return [g.reshape(g.shape[0], g.shape[1], m, n, g.shape[-1]) for g, m, n in zip(cores, om, im)]


def mpo_frobenius_sq(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """||W||_F^2 per fold, (F,), of the MPO with these cores, from the transfer matrices
    E_k = sum_{m,n} G_k^H E_{k-1} G_k (r_k x r_k), never forming W."""
    e = None
    for g in cores:
        t = g if e is None else torch.einsum("fxy,fymnb->fxmnb", e, g)
        e = torch.einsum("fxmnc,fxmnb->fcb", g.conj(), t)
    return e[:, 0, 0].real


__all__ = ["DEFAULT_MAX_CORES", "Modes", "balanced_modes", "bond_limits", "chain_dense", "check_modes",
           "default_num_cores", "interleave", "mpo_frobenius_sq", "prime_factor_count", "resolve_modes",
           "sweep_costs", "tt_svd", "unflatten_cores", "INDEX_LETTERS", "mpo_network", "core_views"]
