"""What a ``structlayers bench`` sweep runs (:class:`BenchConfig`) and its validation.

Errors are :class:`BenchError` naming the offending field of the configuration
(``error.field``); the command line shows that field as its ``--option``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import structlayers

from ..swap import LayerInfo, rank_policy, square_policy

__all__ = ["BenchConfig", "BenchError", "CIRCUITS", "STRUCTURES", "validate", "max_rank", "ranks_for",
           "default_ranks"]

CIRCUITS = ("one-sum", "deep-cp", "deep-narrow", "continuous", "digits", "digits-classifier", "mnist")
STRUCTURES = ("square", "flat")


class BenchError(ValueError):
    """A bad configuration. ``field`` names the configuration field at fault (None when
    the problem is not one field's); the message says what would be right."""

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message


@dataclass
class BenchConfig:
    """What ``structlayers bench`` runs; :meth:`quick_defaults` is the tiny smoke configuration."""

    circuit: str = "digits"
    units: List[int] = field(default_factory=lambda: [16, 32])
    kinds: List[str] = field(default_factory=lambda: ["lowrank", "nystrom"])
    ranks: Optional[List[int]] = None  # None: default_ranks(K) = K/4, K/2 for every K
    structures: List[str] = field(default_factory=lambda: ["square", "flat"])
    batch: int = 128
    threads: int = 2
    repeats: int = 5
    warmup: int = 1
    epochs: int = 3
    max_materialised: int = 32
    mnist_dir: Optional[str] = None
    downsample: int = 1  # image circuits: average-pool the images by this factor first
    test_size: Optional[int] = None  # score on at most this many test rows
    train_size: Optional[int] = None  # train on at most this many rows (not the cached full digits model)
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_defaults(cls) -> Dict[str, Any]:
        """Settings of the smoke configuration, for every field not given explicitly."""
        return dict(units=[4, 8], kinds=["lowrank"], batch=64, repeats=2, epochs=1, downsample=2, test_size=128,
                    train_size=2000)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def default_ranks(num_units: int) -> List[int]:
    """``K/4`` and ``K/2`` (at least 1, no duplicates)."""
    return sorted({max(1, num_units // 4), max(1, num_units // 2)})


def _probe_kind(kind: str, structure: str) -> None:
    """Build the approximation of one tiny 4x4 ⊗ 4x4 layer as the sweep would, or raise BenchError."""
    info = LayerInfo(index=0, num_folds=1, out_features=16, in_features=16, factor_a=(4, 4),
                     factor_b=(4, 4), dtype=torch.float64, conjugate_pair=True)
    try:
        policy = (square_policy if structure == "square" else rank_policy)(kind, 1)
        chosen, options = policy(info)
        a = torch.randn(1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        structlayers.from_kronecker(chosen, a, a.clone(), **options)
    except (ValueError, TypeError, KeyError) as exc:
        raise BenchError(f"kind {kind!r} cannot make the {structure!r} rank-r approximations the "
                         f"sweep needs: {exc}", "kinds") from None


def _positive(config: BenchConfig, name: str, optional: bool = False) -> None:
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchError(f"must be a positive integer, got {value!r}", name)


def validate(config: BenchConfig) -> None:
    """Raise :class:`BenchError` naming the first problem of ``config``."""
    if config.circuit not in CIRCUITS:
        raise BenchError(f"unknown circuit {config.circuit!r}; choose one of {', '.join(CIRCUITS)}", "circuit")
    if not config.units:
        raise BenchError("empty list of unit counts", "units")
    for k in config.units:
        if k < 2:
            raise BenchError(f"K must be at least 2 (the squared layers are K² x K²), got {k}", "units")
    if len(set(config.units)) != len(config.units):
        raise BenchError(f"duplicate values in {config.units}", "units")
    for name in ("batch", "threads", "repeats", "epochs", "max_materialised", "downsample"):
        _positive(config, name)
    if config.warmup < 0:
        raise BenchError(f"warm-up calls must be >= 0, got {config.warmup}", "warmup")
    for name in ("test_size", "train_size"):
        _positive(config, name, optional=True)
    if not config.structures:
        raise BenchError("empty list", "structures")
    for s in config.structures:
        if s not in STRUCTURES:
            raise BenchError(f"unknown structure {s!r}; choose from {', '.join(STRUCTURES)}", "structures")
    if not config.kinds:
        raise BenchError("empty list", "kinds")
    available = structlayers.available()
    for kind in config.kinds:
        if kind not in available:
            raise BenchError(f"unknown kind {kind!r}; available: {', '.join(available)}", "kinds")
        if structlayers.get(kind).exact_from_kronecker:
            raise BenchError(f"kind {kind!r} is exact and takes no rank: cirkit's paths and the exact "
                             "'kronecker' layers are always included; list approximations only", "kinds")
        for structure in config.structures:
            _probe_kind(kind, structure)
    if config.ranks is not None:
        if not config.ranks:
            raise BenchError("empty list", "ranks")
        for r in config.ranks:
            if r < 1:
                raise BenchError(f"a rank must be positive, got {r}", "ranks")
        for k in config.units:
            for r in config.ranks:
                limit = max_rank(k, config.structures)
                if r > limit[0]:
                    raise BenchError(f"rank {r} is too large for K={k}: {limit[1]}; pick smaller ranks or "
                                     "leave the ranks out for K/4, K/2 at every K", "ranks")
    if config.circuit == "mnist":
        if config.mnist_dir is None:
            raise BenchError("the mnist circuit needs a directory holding the four MNIST IDX files "
                             "(train-images-idx3-ubyte, ... optionally .gz) or mnist.npz; nothing is "
                             "downloaded", "mnist_dir")
        if 28 % config.downsample:
            raise BenchError(f"{config.downsample} does not divide the 28x28 MNIST images", "downsample")
    elif config.circuit in ("digits", "digits-classifier", "continuous") and 8 % config.downsample:
        raise BenchError(f"{config.downsample} does not divide the 8x8 digits", "downsample")


def max_rank(num_units: int, structures: Sequence[str]) -> Tuple[int, str]:
    """Largest rank that still approximates a K x K ⊗ K x K layer, and why."""
    bounds = []
    if "square" in structures:
        bounds.append((num_units - 1, f"the square structure needs rank(Ã) < K = {num_units} "
                                      "(at K the layer is exact)"))
    if "flat" in structures:
        bounds.append((num_units * num_units - 1, f"the flat structure needs a rank < K² = {num_units ** 2}"))
    return min(bounds)


def ranks_for(config: BenchConfig, num_units: int) -> List[int]:
    return sorted(set(config.ranks)) if config.ranks is not None else default_ranks(num_units)
