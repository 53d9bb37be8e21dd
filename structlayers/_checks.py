"""Input validation shared by every kind.

Every public entry point funnels user input through these helpers so that bad
input fails early with a message that names the offending argument, its shape
or dtype, and what was expected. Nothing here clips or repairs input.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Tuple

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_weight_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in _FLOAT_DTYPES + _COMPLEX_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point or complex dtype, got {tensor.dtype}"
        )


def check_finite(tensor: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def as_folded_weight(weight: object, name: str = "W") -> torch.Tensor:
    """Validate a weight of shape (F, out, in) or (out, in); return it as (F, out, in)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 2:
        weight = weight.unsqueeze(0)
    if weight.dim() != 3:
        raise ValueError(
            f"{name} must have shape (F, out, in) or (out, in), got {tuple(weight.shape)}"
        )
    if 0 in weight.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")
    check_weight_dtype(weight, name)
    check_finite(weight, name)
    return weight


def as_folded_factors(a: object, b: object) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate Kronecker factors A (F, a1, a2) and B (F, b1, b2); 2-D inputs get F=1."""
    a = as_folded_weight(a, "A")
    b = as_folded_weight(b, "B")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"A and B must have the same number of folds, got A {tuple(a.shape)} "
            f"and B {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"A and B must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"A and B must be on one device, got {a.device} and {b.device}")
    return a, b


def check_budget(
    rank: Optional[int] = None,
    tolerance: Optional[float] = None,
    params_share: Optional[float] = None,
    *,
    rank_name: str = "rank",
    required: Optional[str] = None,
) -> None:
    """The one validation of a budget: at most one of rank / tolerance / params_share, each in
    its valid range (rank a positive int, tolerance in [0, 1), params_share in (0, 1]).

    rank_name: the kind's own name for its rank option (e.g. monarch's ``block_rank``),
        used in the messages.
    required: the kind's name when the kind needs a budget: then giving none raises
        "<required> needs one of <rank_name>, tolerance or params_share".
    """
    given = [n for n, v in ((rank_name, rank), ("tolerance", tolerance), ("params_share", params_share))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of {rank_name}, tolerance, params_share; got {', '.join(given)}")
    if not given and required is not None:
        raise ValueError(f"{required} needs one of {rank_name}, tolerance or params_share")
    if rank is not None:
        check_positive_int(rank, rank_name)
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
            raise TypeError(f"tolerance must be a float, got {type(tolerance).__name__}")
        if not 0.0 <= float(tolerance) < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if params_share is not None:
        if isinstance(params_share, bool) or not isinstance(params_share, numbers.Real):
            raise TypeError(f"params_share must be a float, got {type(params_share).__name__}")
        if not 0.0 < float(params_share) <= 1.0:
            raise ValueError(f"params_share must be in (0, 1], got {params_share}")


def rank_for_params_share(
    share: float, dense_params: int, params_for_rank: Callable[[int], int], max_rank: int, what: str
) -> int:
    """Largest rank r <= max_rank whose parameter count fits in share * dense_params."""
    budget = share * dense_params
    best = 0
    for r in range(1, max_rank + 1):
        if params_for_rank(r) <= budget:
            best = r
        else:
            break
    if best == 0:
        raise ValueError(
            f"params_share={share} allows {int(budget)} parameters, but the smallest "
            f"{what} (rank 1) needs {params_for_rank(1)}"
        )
    return best


def check_rank_range(rank: int, max_rank: int, what: str) -> None:
    if rank > max_rank:
        raise ValueError(f"rank {rank} exceeds the largest possible rank {max_rank} of {what}")


def check_choice(value: object, allowed: Tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")
    return value  # type: ignore[return-value]


def make_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Generator:
    """A CPU generator from ``seed`` or ``generator`` (not both); a fresh random one if neither.

    Randomness is always drawn on the CPU so results do not depend on the device.
    """
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        gen.manual_seed(int(seed))
    return gen
