"""Pivot (column or row) selection for CUR / Nyström approximations.

Strategies
----------
``uniform``   k indices uniformly at random, without replacement.
``l2``        sampled without replacement with probability proportional to the
              squared norm of each column (Frieze–Kannan–Vempala / Drineas et al.).
``leverage``  sampled without replacement proportional to rank-k leverage scores,
              the squared row norms of the top-k singular basis.
``deim``      deterministic greedy interpolation on the top-k singular basis
              (Sorensen & Embree's DEIM-CUR).
``qr``        deterministic: the first k pivots of a column-pivoted QR of the
              transposed top-k basis (Q-DEIM, Drmač & Gugercin), which has the
              sharpest known error constant of the deterministic choices.

Sampling without replacement avoids repeated pivots; since the CUR core is the
orthogonal-projection core C⁺WR⁺, column rescaling used by with-replacement
schemes would not change the approximation anyway.

All functions are folded: inputs carry a leading fold axis F and return (F, k)
int64 indices on the CPU.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.linalg
import torch

PIVOT_STRATEGIES = ("uniform", "l2", "leverage", "deim", "qr")
RANDOM_STRATEGIES = ("uniform", "l2", "leverage")
NEEDS_BASIS = ("leverage", "deim", "qr")


def select_pivots(
    strategy: str,
    k: int,
    *,
    n: int,
    num_folds: int,
    generator: torch.Generator,
    sq_norms: Optional[torch.Tensor] = None,
    basis: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Choose k of n indices per fold.

    sq_norms: (F, n) squared column norms, needed by ``l2``.
    basis: (F, n, k) with orthonormal columns spanning the dominant right (or
    left) singular subspace, needed by ``leverage``, ``deim`` and ``qr``.
    """
    if strategy not in PIVOT_STRATEGIES:
        raise ValueError(
            f"unknown pivot strategy {strategy!r}; choose one of {', '.join(PIVOT_STRATEGIES)}"
        )
    if not 0 < k <= n:
        raise ValueError(f"cannot choose {k} pivots out of {n}")
    if strategy == "uniform":
        keys = torch.rand(num_folds, n, generator=generator)
        return torch.argsort(keys, dim=1)[:, :k]
    if strategy == "l2":
        assert sq_norms is not None
        return _sample_without_replacement(sq_norms, k, generator)
    assert basis is not None and basis.shape[-1] >= k
    basis = basis[:, :, :k].detach()
    if strategy == "leverage":
        scores = (basis.abs() ** 2).sum(dim=2)
        return _sample_without_replacement(scores, k, generator)
    if strategy == "deim":
        return deim(basis)
    return qdeim(basis)


def _sample_without_replacement(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    probs = weights.detach().double().cpu()
    # Zero-weight entries (zero columns) may still be needed when fewer than k are
    # non-zero; a tiny floor keeps them last in line rather than impossible.
    floor = probs.amax(dim=1, keepdim=True).clamp_min(1.0) * 1e-12
    return torch.multinomial(probs + floor, k, replacement=False, generator=generator)


def deim(basis: torch.Tensor) -> torch.Tensor:
    """DEIM indices for each fold of an (F, n, k) basis: greedy largest interpolation residual."""
    v = basis.detach().cpu().to(torch.complex128 if basis.is_complex() else torch.float64)
    f, n, k = v.shape
    folds = torch.arange(f)
    pivots = torch.empty(f, k, dtype=torch.long)
    pivots[:, 0] = v[:, :, 0].abs().argmax(dim=1)
    for j in range(1, k):
        chosen = pivots[:, :j]
        vp = v[folds[:, None], chosen, :j]  # (F, j, j)
        rhs = v[folds[:, None], chosen, j]  # (F, j)
        coef = torch.linalg.lstsq(vp, rhs.unsqueeze(-1)).solution  # (F, j, 1)
        residual = v[:, :, j] - (v[:, :, :j] @ coef).squeeze(-1)
        residual[folds[:, None], chosen] = 0  # never re-pick (exactly zero in theory)
        pivots[:, j] = residual.abs().argmax(dim=1)
    return pivots


def qdeim(basis: torch.Tensor) -> torch.Tensor:
    """Q-DEIM indices: column-pivoted QR of basis^H, per fold."""
    v = basis.detach().cpu().resolve_conj().numpy()
    k = v.shape[2]
    out = np.empty((v.shape[0], k), dtype=np.int64)
    for fold in range(v.shape[0]):
        _, perm = scipy.linalg.qr(v[fold].conj().T, mode="r", pivoting=True)
        out[fold] = perm[:k]
    return torch.from_numpy(out)
