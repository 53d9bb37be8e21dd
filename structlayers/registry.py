"""The kind registry: names of the concrete :class:`~structlayers.base.StructuredSumLayer`
classes and constructors by name.

A subclass is registered by naming it in its class statement
(``class LowRank(StructuredSumLayer, kind="lowrank")``); the base class then calls
:func:`register`. This module imports nothing from the rest of the package, so
``base`` can use it without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Type

if TYPE_CHECKING:  # annotations only: base imports this module
    import torch

    from .base import StructuredSumLayer

_REGISTRY: Dict[str, Type["StructuredSumLayer"]] = {}


def register(name: str, cls: Type["StructuredSumLayer"]) -> None:
    """Make ``cls`` reachable as ``name``; a name can belong to one class only."""
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a structured layer kind named {name!r} is already registered "
                         f"({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls


def available() -> List[str]:
    """Names of the registered kinds, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Type["StructuredSumLayer"]:
    """The class registered under ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"kind name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown structured layer kind {name!r}; available: {', '.join(available())}") from None


def create(name: str, in_features: int, out_features: int, num_folds: int = 1, **options) -> "StructuredSumLayer":
    """A randomly initialised layer of kind ``name`` (trainable from scratch)."""
    return get(name)(in_features, out_features, num_folds, **options)


def from_dense(name: str, weight: "torch.Tensor", **options) -> "StructuredSumLayer":
    """``get(name).from_dense(weight, **options)``."""
    return get(name).from_dense(weight, **options)


def from_kronecker(name: str, a: "torch.Tensor", b: "torch.Tensor", **options) -> "StructuredSumLayer":
    """``get(name).from_kronecker(a, b, **options)``."""
    return get(name).from_kronecker(a, b, **options)


__all__ = ["available", "create", "from_dense", "from_kronecker", "get", "register"]
