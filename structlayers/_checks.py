"""Input validation shared by every kind.

Every public entry point funnels user input through these helpers so that bad
input fails early with a message that names the offending argument, its shape
or dtype, and what was expected. Nothing here clips or repairs input.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Callable, List, Optional, Tuple

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    if value >= 2**63:
        raise ValueError(f"{name} must be a positive int below 2**63 (torch sizes are int64), got {value}")
    return int(value)


def check_nonnegative_int(value: object, name: str) -> int:
    """Return ``value`` as an int if it is an integer >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be a non-negative int below 2**63, got {value}")
    return int(value)


def check_real(value: object, name: str, *, minimum: float, what: str) -> float:
    """Return ``value`` as a float if it is a finite real number >= ``minimum``, else raise.

    what: the meaning of the value, for the message (e.g. "pivots per unit of rank").
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= {minimum:g} ({what}), got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g} ({what}), got {value!r}")
    return float(value)


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool; a string such as "False" is not one."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_weight_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in _FLOAT_DTYPES + _COMPLEX_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point or complex dtype, got {tensor.dtype}"
        )


def check_layer_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """A layer's parameter dtype: a floating-point or complex ``torch.dtype``; None gives
    torch's default dtype."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES + _COMPLEX_DTYPES:
        raise TypeError(f"{name} must be a floating-point or complex torch.dtype (e.g. torch.float32), "
                        f"got {type(dtype).__name__} {dtype!r}")
    return dtype


def check_device(device: object, name: str = "device") -> Optional[torch.device]:
    """``device`` as a torch.device (None stays None: torch's default device)."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device, a device string such as 'cpu' or 'meta', or None; "
                        f"got {type(device).__name__} {device!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name}={device!r} is not a device torch knows ({exc}); use e.g. 'cpu', 'cuda:0' "
                         f"or 'meta'") from None
    try:
        torch.empty(0, device=device)  # a known device type whose backend is missing fails here
    except Exception as exc:  # RuntimeError, AssertionError, ImportError (a backend module missing), ...
        raise ValueError(f"{name}={str(device)!r} is not available on this machine "
                         f"({type(exc).__name__}: {exc})") from None
    return device


def is_meta(device: object) -> bool:
    """Whether ``device`` (a torch.device, string or None) is the meta device."""
    return device is not None and torch.device(device).type == "meta"


def check_input(x: object, name: str, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Raise unless ``x`` is a tensor of the layer's ``dtype`` (torch does not mix dtypes in a
    product; a bool or integer input is not a number of the layer's kind)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        convert = (f" or convert the layer with .to({x.dtype})"
                   if x.dtype.is_floating_point or x.dtype.is_complex else "")
        raise TypeError(f"{name} has dtype {x.dtype}, but {what} computes in {dtype}: pass {name}.to({dtype})"
                        f"{convert}")
    return x


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
    if weight.is_meta:
        raise ValueError(f"{name} is on the meta device and has no values to approximate; load the "
                         f"weights first (e.g. module.to_empty(device='cpu') and load_state_dict), or "
                         f"create a randomly initialised layer with device='meta'")
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
    also: Tuple[str, ...] = (),
) -> None:
    """The one validation of a budget: at most one of rank / tolerance / params_share, each in
    its valid range (rank a positive int, tolerance in [0, 1), params_share in (0, 1]).

    rank_name: the kind's own name for its rank option (e.g. monarch's ``block_rank``),
        used in the messages.
    required: the kind's name when the kind needs a budget: then giving none raises
        "<required> needs one of <rank_name>, tolerance or params_share".
    also: other options that would have made a budget (e.g. factor_ranks), named in that message.
    """
    given = [n for n, v in ((rank_name, rank), ("tolerance", tolerance), ("params_share", params_share))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of {rank_name}, tolerance, params_share; got {', '.join(given)}")
    if not given and required is not None:
        names = [rank_name, "tolerance", "params_share", *also]
        raise ValueError(f"{required} needs one of {', '.join(names[:-1])} or {names[-1]}")
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
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")
    return value  # type: ignore[return-value]


def make_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Generator:
    """A CPU generator from ``seed`` or ``generator`` (not both); torch's global CPU generator
    if neither, so ``torch.manual_seed(s)`` makes construction reproducible, as for every
    torch module.

    Randomness is always drawn on the CPU so results do not depend on the device.
    """
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator (randomness is drawn on the CPU so that "
                             f"results do not depend on the device), got one on {generator.device}")
        return generator
    if seed is None:
        return torch.default_generator
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return gen


def check_patterns(patterns: object, name: str) -> Optional[List[str]]:
    """Glob patterns as a list: one string is one pattern (not its characters); None stays None."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (bytes, bytearray)) or not isinstance(patterns, Iterable):
        raise TypeError(f"{name} must be a glob pattern or a list of them, got {type(patterns).__name__} {patterns!r}")
    out = list(patterns)
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name} must hold glob pattern strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    return out


def check_policy(policy: object, name: str, signature: str) -> None:
    """A kind name (unknown names fail here, before any work) or a callable policy
    ``signature`` (e.g. "f(LayerInfo)") returning what :func:`check_policy_choice` accepts."""
    if isinstance(policy, str):
        from .registry import get  # the registry imports nothing of the package: no cycle

        get(policy)
    elif not callable(policy):
        raise TypeError(f"{name} must be a kind name or a policy function {signature} returning a kind name, a "
                        f"(kind, options) pair or None; got {type(policy).__name__} {policy!r}")


def check_policy_choice(choice: object, where: str) -> Optional[Tuple[str, dict]]:
    """What a policy returned for ``where``, as (kind, options), or None to keep the layer.

    A policy may return a kind name, a (kind name, options dict) pair, or None.
    """
    if choice is None:
        return None
    if isinstance(choice, str):
        return choice, {}
    if (isinstance(choice, tuple) and len(choice) == 2 and isinstance(choice[0], str)
            and isinstance(choice[1], Mapping)):
        return choice[0], dict(choice[1])
    raise TypeError(f"the policy returned {choice!r} for {where}; a policy must return a kind name, a "
                    f"(kind name, options dict) pair, or None to keep the layer")
