"""Benchmark report of structured sum layers in squared circuits (``structlayers bench``).

For every number of units ``K`` the sweep

1. builds a circuit (:data:`CIRCUITS`) and, for the digits, MNIST and classifier circuits,
   trains it (seeded; cached on disk, see :func:`adapters.cirkit.models.default_cache_dir`);
   ``one-sum`` and ``deep-cp`` are untrained seeded models scored on uniformly random data;
2. takes the compiled models to compare from
   :func:`adapters.cirkit.variants.circuit_variants` (cirkit's materialised and
   ``optimize=True`` paths, exact ``kronecker`` layers, approximations) and records every
   scalar field of each :class:`~adapters.cirkit.variants.Variant`, whatever it holds;
3. times, threads pinned, round-robin with a warm-up and the median of the repeats
   (:mod:`structlayers.benchmarking`): ``Z`` forward+backward, ``Z`` forward, and
   ``log c²(x)`` forward on a batch of test data; then scores each variant (test NLL,
   bits per dimension, classifier error rate) and reads its swap report (relative
   weight error, parameters, multiply-adds);
4. after every timing of every ``K`` (the measurement changes the allocator's
   settings), measures the peak-memory growth of each timed call.

Every speedup is given against both cirkit paths. The theoretical speedup counts the
multiply-adds per sample of the Kronecker sum layers only (the other layers cost the
same in every variant); efficiency = measured speedup / theoretical speedup.

Plotting lives in :mod:`adapters.cirkit.plots` (matplotlib, imported lazily); the
command line in :mod:`adapters.cirkit.cli`.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

import structlayers
from structlayers.benchmarking import (
    PEAK_RSS_PROBLEM,
    environment,
    interleaved_medians,
    peak_rss_mib,
    pinned_threads,
)

from . import models as M
from .swap import LayerInfo, SwapReport, rank_policy, square_policy
from .variants import CIRKIT_MATERIALISED, CIRKIT_OPTIMIZED, EXACT, Variant, circuit_variants, default_ranks

CIRCUITS = ("one-sum", "deep-cp", "digits", "digits-classifier", "mnist")
STRUCTURES = ("square", "flat")
#: (column prefix, label) of the timed calls.
MEASUREMENTS = (("z_fwd_bwd", "Z fwd+bwd"), ("z_fwd", "Z fwd"), ("logc2_fwd", "log c²(x) fwd"))
BASELINES = {"materialised": CIRKIT_MATERIALISED, "opt": CIRKIT_OPTIMIZED}
DEEP_CP_VARIABLES = 16
RANDOM_ROWS = 512
NAN = float("nan")


class BenchError(ValueError):
    """A bad configuration: the message names the problem."""


@dataclass
class BenchConfig:
    """What ``structlayers bench`` runs; :meth:`quick` is the tiny smoke configuration."""

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
        """Settings ``--quick`` uses for every option not given explicitly."""
        return dict(units=[4, 8], kinds=["lowrank"], batch=64, repeats=2, epochs=1, downsample=2, test_size=128,
                    train_size=2000)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- validation


def parse_int_list(text: str, what: str) -> List[int]:
    """``"16,32"`` -> ``[16, 32]``; a clear error for anything else (empty, not integers)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError(f"{what}: empty list (give comma-separated integers, e.g. 16,32)")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise BenchError(f"{what}: {text!r} is not a comma-separated list of integers") from None


def parse_name_list(text: str, what: str) -> List[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError(f"{what}: empty list")
    return items


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
                         f"sweep needs: {exc}") from None


def validate(config: BenchConfig) -> None:
    """Raise :class:`BenchError` naming the first problem of ``config``."""
    if config.circuit not in CIRCUITS:
        raise BenchError(f"unknown circuit {config.circuit!r}; choose one of {', '.join(CIRCUITS)}")
    if not config.units:
        raise BenchError("--units: empty list of unit counts")
    for k in config.units:
        if k < 2:
            raise BenchError(f"--units: K must be at least 2 (the squared layers are K² x K²), got {k}")
    if len(set(config.units)) != len(config.units):
        raise BenchError(f"--units: duplicate values in {config.units}")
    for name in ("batch", "threads", "repeats", "epochs", "max_materialised", "downsample"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if config.warmup < 0:
        raise BenchError(f"warm-up calls must be >= 0, got {config.warmup}")
    for name in ("test_size", "train_size"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BenchError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not config.structures:
        raise BenchError("--structures: empty list")
    for s in config.structures:
        if s not in STRUCTURES:
            raise BenchError(f"unknown structure {s!r}; choose from {', '.join(STRUCTURES)}")
    if not config.kinds:
        raise BenchError("--kinds: empty list")
    available = structlayers.available()
    for kind in config.kinds:
        if kind not in available:
            raise BenchError(f"unknown kind {kind!r}; available: {', '.join(available)}")
        if kind in ("dense", "kronecker"):
            raise BenchError(f"kind {kind!r} is exact and takes no rank: cirkit's paths and the exact "
                             "'kronecker' layers are always included; --kinds lists approximations")
        for structure in config.structures:
            _probe_kind(kind, structure)
    if config.ranks is not None:
        if not config.ranks:
            raise BenchError("--ranks: empty list")
        for r in config.ranks:
            if r < 1:
                raise BenchError(f"--ranks: a rank must be positive, got {r}")
        for k in config.units:
            for r in config.ranks:
                limit = max_rank(k, config.structures)
                if r > limit[0]:
                    raise BenchError(
                        f"--ranks: rank {r} is too large for K={k}: {limit[1]}; pick smaller ranks or "
                        "omit --ranks for K/4, K/2 at every K")
    if config.circuit == "mnist":
        if config.mnist_dir is None:
            raise BenchError("--circuit mnist needs --mnist-dir DIR holding the four MNIST IDX files "
                             "(train-images-idx3-ubyte, ... optionally .gz) or mnist.npz; nothing is downloaded")
        if 28 % config.downsample:
            raise BenchError(f"--downsample {config.downsample} does not divide the 28x28 MNIST images")
    elif config.circuit in ("digits", "digits-classifier") and 8 % config.downsample:
        raise BenchError(f"--downsample {config.downsample} does not divide the 8x8 digits")


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


# ----------------------------------------------------------------------------- circuits and data


@dataclass
class Prepared:
    """One K's circuit: symbolic spec, compiled (trained) model, data and notes."""

    spec: M.CircuitModel
    model: M.CompiledCircuitModel
    x_test: torch.Tensor
    y_test: Optional[torch.Tensor]
    log_prior: Optional[torch.Tensor]
    batch: torch.Tensor
    info: Dict[str, Any]


def _pool(x: torch.Tensor, shape: Tuple[int, int], factor: int) -> torch.Tensor:
    """Average-pool flattened images (N, H·W) by ``factor``; values stay integer categories."""
    if factor == 1:
        return x
    h, w = shape
    img = x.reshape(-1, 1, h, w).double()
    pooled = torch.nn.functional.avg_pool2d(img, factor)
    return pooled.round().long().reshape(x.shape[0], -1)


def _pooled_splits(data: M.DataSplits, shape: Tuple[int, int], factor: int) -> M.DataSplits:
    return M.DataSplits(_pool(data.x_train, shape, factor), data.y_train,
                        _pool(data.x_test, shape, factor), data.y_test)


def _cached_training(name: str, config: Mapping[str, Any], build: Callable[[], M.CompiledCircuitModel],
                     train: Callable[[M.CompiledCircuitModel], M.TrainingHistory]) -> Tuple[M.CompiledCircuitModel, Dict[str, Any]]:
    """Train ``build()`` with ``train`` once per config; the state_dict is cached beside
    :func:`~adapters.cirkit.models.trained_digits_model`'s files."""
    path = M.default_cache_dir() / "cirkit" / f"{name}-{M.cache_key(config)}.pt"
    model = build()
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("config") != dict(config):
                raise ValueError("config in the file does not match")
            model.load_state_dict(blob["state_dict"])
            return model, dict(from_cache=True, cache_file=path.name, train_seconds=0.0,
                               history=blob.get("history"))
        except Exception as exc:  # noqa: BLE001 -- an unreadable cache entry is replaced
            print(f"ignoring unreadable cache file {path.name}: {exc}; retraining", file=sys.stderr)
            model = build()
    start = time.perf_counter()
    history = train(model)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"config": dict(config), "state_dict": model.state_dict(), "history": history.to_dict()}, tmp)
    os.replace(tmp, path)
    return model, dict(from_cache=False, cache_file=path.name, train_seconds=seconds, history=history.to_dict())


def _batch_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] >= batch:
        return x[:batch].long()
    reps = -(-batch // x.shape[0])
    return x.repeat(reps, 1)[:batch].long()


def _test_rows(config: BenchConfig, x: torch.Tensor, y: Optional[torch.Tensor]):
    if config.test_size is None:
        return x, y
    return x[: config.test_size], None if y is None else y[: config.test_size]


def prepare(config: BenchConfig, num_units: int, *, progress: bool = False) -> Prepared:
    """Build (and train) the circuit of ``config`` with ``num_units`` units."""
    circuit, k, seed = config.circuit, num_units, config.seed
    info: Dict[str, Any] = dict(units=k, trained=False, from_cache=False, train_seconds=0.0)
    y_test = log_prior = None
    if circuit in ("one-sum", "deep-cp"):
        spec = (M.one_sum_circuit(k) if circuit == "one-sum"
                else M.deep_cp_circuit(DEEP_CP_VARIABLES, k))
        model = spec.compile(seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        rows = config.test_size or RANDOM_ROWS
        x_test = torch.randint(0, spec.num_categories, (rows, spec.num_variables), generator=gen)
        info["data"] = (f"{rows} uniformly random rows ({spec.num_variables} variables, "
                        f"{spec.num_categories} categories); untrained seeded model")
    elif circuit == "digits" and config.downsample == 1 and config.train_size is None:
        trained = M.trained_digits_model(k, config.epochs, seed=seed, progress=progress)
        model, spec = trained.model, trained.model.model
        data = M.digits_data(seed=0)
        x_test = data.x_test
        info.update(trained=True, from_cache=trained.from_cache, cache_file=trained.path.name,
                    history=trained.history.to_dict(), train_seconds=float(sum(trained.history.epoch_seconds)),
                    data="sklearn digits 8x8, 17 categories, stratified test split")
    else:
        if circuit == "mnist":
            try:
                data = M.load_mnist(config.mnist_dir)
            except (FileNotFoundError, ValueError) as exc:
                raise BenchError(f"--circuit mnist: {exc}") from None
            shape, categories, name = (28, 28), 256, "MNIST 28x28"
        else:
            data = M.digits_data(seed=0)
            shape, categories, name = M.DIGITS_SHAPE, M.DIGITS_CATEGORIES, "sklearn digits 8x8"
        factor = config.downsample
        data = _pooled_splits(data, shape, factor)
        if config.train_size is not None:
            n = config.train_size
            data = M.DataSplits(data.x_train[:n], data.y_train[:n], data.x_test, data.y_test)
        image = (shape[0] // factor, shape[1] // factor)
        classifier = circuit == "digits-classifier"
        if classifier:
            spec = M.digits_classifier_circuit(k, squared=True, image_shape=image, num_categories=categories)
        else:
            spec = M.digits_squared_circuit(k, image_shape=image, num_categories=categories)
        key = dict(circuit=circuit, units=k, epochs=config.epochs, seed=seed, downsample=factor,
                   spec=dict(spec.config), train_rows=int(data.x_train.shape[0]))

        def train(m):
            fit = M.train_classifier_circuit if classifier else M.train_squared_circuit
            return fit(m, data, epochs=config.epochs, seed=seed, progress=progress)

        model, extra = _cached_training(circuit, key, lambda: spec.compile(seed=seed), train)
        info.update(trained=True, **extra)
        info["data"] = f"{name}" + (f" average-pooled to {image[0]}x{image[1]}" if factor > 1 else "")
        x_test, y_test = data.x_test, data.y_test
        if classifier:
            counts = torch.bincount(data.y_train, minlength=spec.num_outputs).double()
            log_prior = torch.log(counts.clamp_min(1.0) / counts.sum())
    x_test, y_test = _test_rows(config, x_test, y_test)
    info.update(test_rows=int(x_test.shape[0]), num_variables=spec.num_variables)
    return Prepared(spec, model, x_test.long(), y_test, log_prior, _batch_rows(x_test, config.batch), info)


# ----------------------------------------------------------------------------- rows


def variant_fields(variant: Variant) -> Dict[str, Any]:
    """Every scalar field and property of a variant (``name`` as ``variant``), generically."""
    out: Dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(variant)] if dataclasses.is_dataclass(variant) else []
    names += [n for n in dir(type(variant)) if not n.startswith("_")
              and isinstance(getattr(type(variant), n, None), property)]
    for n in names:
        try:
            value = getattr(variant, n)
        except Exception:  # noqa: BLE001 -- a property that cannot be read is just not recorded
            continue
        if value is None or isinstance(value, (str, bool, int, float)):
            out["variant" if n == "name" else n] = value
    out["is_baseline"] = bool(variant.is_baseline)
    return out


def _layer_infos(variants: Sequence[Variant]) -> List[LayerInfo]:
    for v in variants:
        if v.report is not None:
            return sorted([r.info for r in v.report.rows] + list(v.report.kept), key=lambda i: i.index)
    return []


def baseline_macs(infos: Iterable[LayerInfo]) -> Dict[str, int]:
    """Multiply-adds per sample of the Kronecker sum layers in cirkit's two paths.

    materialised: ``F·Ko1Ko2·Ki1Ki2`` (``W = A ⊗ B`` applied densely); ``optimize=True``
    shatters the layer into two tensor-dot layers, ``A`` over ``Ki1`` (for each ``Ki2``)
    then ``B`` over ``Ki2`` (for each ``Ko1``): ``F·(Ko1·Ki1·Ki2 + Ko1·Ko2·Ki2)``.
    """
    mat = opt = 0
    for i in infos:
        (ko1, ki1), (ko2, ki2) = i.factor_a, i.factor_b
        mat += i.num_folds * ko1 * ko2 * ki1 * ki2
        opt += i.num_folds * (ko1 * ki1 * ki2 + ko1 * ko2 * ki2)
    return {"materialised": mat, "opt": opt}


def report_summary(report: SwapReport) -> Dict[str, Any]:
    """Totals of a swap report: multiply-adds per sample, stored parameters, weight errors."""
    macs = params = 0
    errors, weights = [], []
    for r in report.rows:
        i = r.info
        macs += i.num_folds * r.flops_per_sample
        if r.mode == "live":  # reads the circuit's factors: A (and B unless B = conj(A))
            (ko1, ki1), (ko2, ki2) = i.factor_a, i.factor_b
            params += i.num_folds * (ko1 * ki1 + (0 if i.conjugate_pair else ko2 * ki2))
        else:
            params += r.params
        errors.append(float(r.relative_error))
        weights.append(i.num_folds)
    for i in report.kept:
        macs += i.num_folds * i.out_features * i.in_features
        params += i.num_folds * (i.factor_a[0] * i.factor_a[1] + i.factor_b[0] * i.factor_b[1])
    total = sum(weights)
    return dict(
        macs_per_sample=macs, sum_layer_params=params,
        rel_weight_error_max=max(errors) if errors else 0.0,
        rel_weight_error_mean=(sum(e * w for e, w in zip(errors, weights)) / total) if total else 0.0,
    )


def _layer_rows(report: Optional[SwapReport]) -> List[Dict[str, Any]]:
    if report is None:
        return []
    out = []
    for r in report.rows:
        i = r.info
        out.append(dict(layer=i.index, folds=i.num_folds, shape=[i.out_features, i.in_features],
                        factor_a=list(i.factor_a), factor_b=list(i.factor_b), kind=r.kind, mode=r.mode,
                        rank=r.rank, params=r.params, flops_per_sample=r.flops_per_sample,
                        relative_error=float(r.relative_error)))
    for i in report.kept:
        out.append(dict(layer=i.index, folds=i.num_folds, shape=[i.out_features, i.in_features],
                        factor_a=list(i.factor_a), factor_b=list(i.factor_b), kind="kept", mode=None,
                        rank=None, params=None, flops_per_sample=i.out_features * i.in_features,
                        relative_error=0.0))
    return out


def _ratio(num: float, den: float) -> float:
    if num is None or den is None or not (num > 0 and den > 0) or math.isinf(num) or math.isinf(den):
        return NAN
    return num / den


def _timed_calls(variant: Variant, batch: torch.Tensor) -> Dict[str, Callable[[], object]]:
    model = variant.model

    def z_fwd_bwd():
        model.log_partition().sum().backward()

    def z_fwd():
        with torch.no_grad():
            return model.log_partition()

    def logc2_fwd():
        with torch.no_grad():
            return model.log_density(batch)

    return {"z_fwd_bwd": z_fwd_bwd, "z_fwd": z_fwd, "logc2_fwd": logc2_fwd}


def beats_label(row: Mapping[str, Any]) -> str:
    """'yes' / 'no' / 'only <measurements>': which timed calls beat cirkit optimize=True;
    'no (beats materialised only)' when it is faster than the materialised path alone."""
    if row.get("variant") in BASELINES.values():
        return "-"
    wins = [label for m, label in MEASUREMENTS if row.get(f"{m}_speedup_vs_opt", NAN) > 1.0]
    mat_only = [label for m, label in MEASUREMENTS
                if row.get(f"{m}_speedup_vs_materialised", NAN) > 1.0 >= row.get(f"{m}_speedup_vs_opt", NAN)]
    if len(wins) == len(MEASUREMENTS):
        return "yes"
    if not wins:
        return "no (beats materialised only)" if mat_only else "no"
    return "only " + ", ".join(wins)


@dataclass
class SweepResult:
    rows: List[Dict[str, Any]]
    sizes: List[Dict[str, Any]]
    environment: Dict[str, Any]
    notes: List[str]
    config: BenchConfig


class _Progress:
    """tqdm over the sweep's steps when importable, else one line per step on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.bar, self.done, self.total = enabled, None, 0, total
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="bench", file=sys.stderr)

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_sweep(config: BenchConfig, *, progress: bool = True, arguments: Optional[Mapping[str, Any]] = None) -> SweepResult:
    """Time, score and measure every variant of every ``K`` in ``config.units``."""
    validate(config)
    notes: List[str] = []
    rows: List[Dict[str, Any]] = []
    sizes: List[Dict[str, Any]] = []
    kept: List[Tuple[int, List[Variant], torch.Tensor, List[Dict[str, Any]]]] = []
    bar = _Progress(5 * len(config.units), progress)
    with pinned_threads(config.threads):
        env = environment()
        for k in config.units:
            prepared = prepare(config, k, progress=progress)
            bar.step(f"K={k}: circuit ready")
            ranks = ranks_for(config, k)
            materialised = k <= config.max_materialised
            start = time.perf_counter()
            try:
                variants = circuit_variants(prepared.spec, prepared.model, kinds=tuple(config.kinds), ranks=ranks,
                                            structures=tuple(config.structures), materialised=materialised,
                                            seed=config.seed)
            except (ValueError, TypeError) as exc:
                raise BenchError(f"K={k}: cannot build the variants: {exc}") from None
            size = dict(prepared.info, ranks=ranks, materialised=materialised,
                        variants_seconds=time.perf_counter() - start, variants=[v.name for v in variants])
            if not materialised:
                notes.append(f"K={k}: cirkit's materialised path (optimize=False) skipped (K > "
                             f"--max-materialised {config.max_materialised}); its ratios are NaN")
            bar.step(f"K={k}: {len(variants)} variants built")
            calls = {v.name: _timed_calls(v, prepared.batch) for v in variants}
            times: Dict[str, Dict[str, float]] = {}
            for m, _ in MEASUREMENTS:
                medians = interleaved_medians({n: c[m] for n, c in calls.items()}, repeats=config.repeats,
                                              warmup=config.warmup)
                for n, t in medians.items():
                    times.setdefault(n, {})[m] = t
            bar.step(f"K={k}: timed")
            k_rows = _rows_for(config, k, prepared, variants, times)
            rows.extend(k_rows)
            sizes.append(size)
            bar.step(f"K={k}: scored")
            kept.append((k, variants, prepared.batch, k_rows))
        # After every timing: the measurement fixes malloc's settings for the rest of the process.
        # gc.freeze: the objects alive now (models, data) move to the permanent generation, so the
        # gc.collect() in each measurement scans only what the call itself left behind (else it
        # walks every cirkit object of every variant: 0.3 s a call).
        gc.collect()
        gc.freeze()
        try:
            for k, variants, batch, k_rows in kept:
                by_name = {r["variant"]: r for r in k_rows}
                for v in variants:
                    for m, fn in _timed_calls(v, batch).items():
                        by_name[v.name][f"{m}_peak_mib"] = NAN if PEAK_RSS_PROBLEM else peak_rss_mib(fn)
                _memory_ratios(k_rows)
                bar.step(f"K={k}: peak memory")
        finally:
            gc.unfreeze()
    bar.close()
    if PEAK_RSS_PROBLEM:
        notes.append(PEAK_RSS_PROBLEM)
    env = dict(env, threads=config.threads, **M.package_versions(), git_commit=git_commit(),
               timing=f"median of {config.repeats} round-robin repeats after {config.warmup} warm-up call(s), "
                      "torch threads pinned",
               peak_memory="growth of the resident high-water mark during one call "
                           "(structlayers.benchmarking.peak_rss_mib), measured after all timings",
               arguments=dict(arguments) if arguments is not None else config.to_dict())
    if config.circuit in ("one-sum", "deep-cp"):
        notes.append(f"{config.circuit}: untrained seeded model scored on uniformly random data; its bpd "
                     "compares variants with the exact model, it is not a measure of fit")
    for row in rows:
        if row["is_baseline"] and not row.get("scored"):
            notes.append(f"K={row['units']}: {row['variant']} has a different parameter layout and keeps "
                         "seeded values; it is timed, not scored")
    for row in rows:
        row["beats_opt"] = beats_label(row)
    _mark_pareto(rows)
    return SweepResult(rows, sizes, env, notes, config)


def _rows_for(config: BenchConfig, k: int, prepared: Prepared, variants: Sequence[Variant],
              times: Mapping[str, Mapping[str, float]]) -> List[Dict[str, Any]]:
    d = prepared.spec.num_variables
    theory = baseline_macs(_layer_infos(variants))
    ref_times = {key: times.get(name) for key, name in BASELINES.items()}
    classifier = prepared.spec.num_outputs > 1
    out = []
    for v in variants:
        row: Dict[str, Any] = dict(circuit=config.circuit, units=k)
        row.update(variant_fields(v))
        rank = row.get("rank")
        row["rank_fraction"] = rank / k if isinstance(rank, int) else NAN
        for m, _ in MEASUREMENTS:
            t = times[v.name][m]
            row[f"{m}_ms"] = t * 1e3
            for key in BASELINES:
                base = ref_times[key][m] if ref_times[key] is not None else NAN
                row[f"{m}_speedup_vs_{key}"] = _ratio(base, t)
            row[f"{m}_beats_materialised"] = bool(row[f"{m}_speedup_vs_materialised"] > 1.0)
            row[f"{m}_beats_opt"] = bool(row[f"{m}_speedup_vs_opt"] > 1.0)
        # quality: cirkit paths whose layout differs keep seeded values and are not scored
        scored = (not v.is_baseline) or bool(getattr(v, "same_values", False))
        row["scored"] = scored
        nll = err = NAN
        if scored:
            nll = score_nll(v.model, prepared.x_test, prepared.y_test)
            if classifier and prepared.y_test is not None:
                err = 1.0 - M.evaluate_accuracy(v.model, prepared.x_test, prepared.y_test, prepared.log_prior)
        row["test_nll"] = nll
        row["bpd"] = nll / (d * math.log(2.0))
        row["error_rate"] = err
        # structure: multiply-adds, parameters, weight error
        if v.report is not None:
            row.update(report_summary(v.report))
        elif v.name.startswith(CIRKIT_MATERIALISED):  # cirkit's layers, whatever evaluates them
            row.update(macs_per_sample=theory["materialised"], rel_weight_error_max=0.0, rel_weight_error_mean=0.0)
        elif v.name.startswith(CIRKIT_OPTIMIZED):
            row.update(macs_per_sample=theory["opt"], rel_weight_error_max=0.0, rel_weight_error_mean=0.0)
        else:
            row.update(macs_per_sample=NAN, rel_weight_error_max=NAN, rel_weight_error_mean=NAN)
        row.setdefault("sum_layer_params", _baseline_params(_layer_infos(variants)) if v.report is None else NAN)
        for key in BASELINES:
            row[f"theory_speedup_vs_{key}"] = _ratio(theory[key], row["macs_per_sample"])
            for m, _ in MEASUREMENTS:
                row[f"{m}_efficiency_vs_{key}"] = _ratio(row[f"{m}_speedup_vs_{key}"],
                                                         row[f"theory_speedup_vs_{key}"])
        row["layers"] = _layer_rows(v.report)
        out.append(row)
    exact = next((r for r in out if r["variant"] == EXACT), None)
    exact_bpd = exact["bpd"] if exact is not None else NAN
    for row in out:
        row["bpd_diff_vs_exact"] = row["bpd"] - exact_bpd
    return out


def score_nll(model: M.CompiledCircuitModel, x: torch.Tensor, y: Optional[torch.Tensor]) -> float:
    """Mean test NLL in nats: ``-log p(x)``, ``-log p(x | y)`` with labels, and for an
    unlabelled model with several outputs (one-sum: K densities) the mean over the outputs."""
    if y is not None or model.num_outputs == 1:
        return M.evaluate_nll(model, x, y)
    total = 0.0
    with torch.no_grad():
        logz = model.log_partition()
        for i in range(0, x.shape[0], 512):
            total += float((model.log_density(x[i:i + 512]) - logz).double().mean(1).sum())
    return -total / max(x.shape[0], 1)


def _baseline_params(infos: Iterable[LayerInfo]) -> int:
    return sum(i.num_folds * (i.factor_a[0] * i.factor_a[1]
                              + (0 if i.conjugate_pair else i.factor_b[0] * i.factor_b[1])) for i in infos)


def _memory_ratios(rows: List[Dict[str, Any]]) -> None:
    refs = {key: next((r for r in rows if r["variant"] == name), None) for key, name in BASELINES.items()}
    for row in rows:
        for m, _ in MEASUREMENTS:
            for key, ref in refs.items():
                base = ref[f"{m}_peak_mib"] if ref is not None else NAN
                row[f"{m}_memory_reduction_vs_{key}"] = _ratio(base, row[f"{m}_peak_mib"])


# ----------------------------------------------------------------------------- Pareto front


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point dominates, when ``x`` (speed) is to be
    maximised and ``y`` (error) minimised; sorted by increasing ``x``. Points with a NaN
    coordinate are ignored; equal points are all kept."""
    valid = [(x, y, i) for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for x, y, i in valid:
        dominated = any(x2 >= x and y2 <= y and (x2 > x or y2 < y) for x2, y2, _ in valid)
        if not dominated:
            front.append((x, y, i))
    return [i for _, _, i in sorted(front)]


def tradeoff_error(row: Mapping[str, Any]) -> float:
    """The error axis of the trade-off: bpd difference vs exact, else the weight error."""
    value = row.get("bpd_diff_vs_exact", NAN)
    return value if not math.isnan(value) else row.get("rel_weight_error_max", NAN)


def is_density(row: Mapping[str, Any]) -> bool:
    """False for flat approximations: ``c̃²`` is no longer a square, can go negative, and
    ``Z̃`` does not normalise it, so its bpd is not a likelihood (it can even beat exact)."""
    return row.get("structure") != "flat"


def pareto_points(group: Sequence[Mapping[str, Any]]) -> List[Tuple[float, float]]:
    """(log c²(x) speedup vs optimize=True, error) per row; NaN for rows not eligible for the
    front (flat approximations, whose bpd is not a likelihood)."""
    return [(r["logc2_fwd_speedup_vs_opt"], tradeoff_error(r)) if is_density(r) else (NAN, NAN) for r in group]


def _mark_pareto(rows: List[Dict[str, Any]]) -> None:
    """``pareto``: on the (log c²(x) speedup vs optimize=True, error) front of its K,
    among the rows that are densities."""
    for k in sorted({r["units"] for r in rows}):
        group = [r for r in rows if r["units"] == k]
        front = set(pareto_front(pareto_points(group)))
        for i, r in enumerate(group):
            r["pareto"] = i in front


# ----------------------------------------------------------------------------- output


def csv_columns(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """Every scalar column, in first-seen order (nested ``layers`` go to the JSON only)."""
    cols: List[str] = []
    for r in rows:
        for key, value in r.items():
            if key not in cols and not isinstance(value, (list, dict)):
                cols.append(key)
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    cols = csv_columns(rows)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for r in rows:
            writer.writerow([_cell(r.get(c)) for c in cols])
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def write_json(result: SweepResult, path: Path, files: Sequence[str] = ()) -> Path:
    blob = dict(environment=result.environment, config=result.config.to_dict(), notes=result.notes,
                sizes=result.sizes, rows=result.rows, files=list(files),
                columns={"_ms": "median milliseconds per call", "_speedup_vs_opt": "t(cirkit optimize=True) / t",
                         "_speedup_vs_materialised": "t(cirkit optimize=False) / t",
                         "_peak_mib": "peak resident-memory growth of one call, MiB",
                         "theory_speedup_vs_": "multiply-adds per sample of the Kronecker sum layers, baseline / variant",
                         "_efficiency_vs_": "measured speedup / theoretical speedup",
                         "bpd": "test NLL / (D ln 2); NaN (null) when not scored"})
    with open(path, "w") as fh:
        json.dump(_jsonable(blob), fh, indent=2)
    return path


def _fmt(value: Any, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}s}"
    return f"{format(value, spec):>{width}s}"


def format_table(result: SweepResult) -> str:
    """The summary table: times, ratios vs both cirkit paths, peak memory, quality."""
    head = (f"{'K':>4s} {'variant':29s} | {'Z f+b ms':>9s} {'/opt':>6s} {'/mat':>6s} | {'Z fwd ms':>9s} "
            f"{'/opt':>6s} {'/mat':>6s} | {'c² ms':>9s} {'/opt':>6s} {'/mat':>6s} | {'Z MiB':>7s} {'c² MiB':>7s} | "
            f"{'bpd':>7s} {'Δbpd':>7s} {'w.err':>7s}")
    classifier = any(not math.isnan(r.get("error_rate", NAN)) for r in result.rows)
    if classifier:
        head += f" {'err%':>6s}"
    head += " | beats opt=True"
    lines = [head, "-" * len(head)]
    for r in result.rows:
        cells = [f"{r['units']:4d} {r['variant'][:29]:29s}"]
        for m, _ in MEASUREMENTS:
            cells.append(f"{_fmt(r[f'{m}_ms'], '.2f', 9)} {_fmt(r[f'{m}_speedup_vs_opt'], '.2f', 5)}x "
                         f"{_fmt(r[f'{m}_speedup_vs_materialised'], '.2f', 5)}x")
        peaks = f"{_fmt(r.get('z_fwd_bwd_peak_mib', NAN), '.1f', 7)} {_fmt(r.get('logc2_fwd_peak_mib', NAN), '.1f', 7)}"
        line = " | ".join(cells) + f" | {peaks} | {_fmt(r['bpd'], '.4f', 7)} " \
               f"{_fmt(r['bpd_diff_vs_exact'], '+.4f', 7)} {_fmt(r.get('rel_weight_error_max'), '.3f', 7)}"
        if classifier:
            line += f" {_fmt(r['error_rate'] * 100 if not math.isnan(r['error_rate']) else NAN, '.2f', 6)}"
        line += f" | {r['beats_opt']}" + (" *" if r.get("pareto") and not r["is_baseline"] else "")
        lines.append(line)
    lines.append("")
    lines.append("/opt, /mat: speedup over cirkit optimize=True and over cirkit's materialised path "
                 "(optimize=False); >1 is faster. c²: batched log c²(x) forward. MiB: peak memory growth of "
                 "one Z f+b call and of one c² call.")
    lines.append("w.err: largest relative weight error of a swapped layer; Δbpd vs the exact model; "
                 "* on the Pareto front (c² speedup vs optimize=True, error).")
    if any(not is_density(r) for r in result.rows):
        lines.append("flat rows: c̃² is not a square any more (it can go negative) and Z̃ does not normalise "
                     "it, so their bpd is not a likelihood; they are never on the Pareto front.")
    for note in dict.fromkeys(result.notes):
        lines.append("note: " + note)
    return "\n".join(lines)


def write_outputs(result: SweepResult, out_dir: Path, *, plots: bool = True) -> List[Path]:
    """results.csv, results.json and the PNG plots into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [write_csv(result.rows, out_dir / "results.csv")]
    if plots:
        try:
            from . import plots as P

            files += P.make_plots(result.rows, out_dir)
        except ImportError as exc:  # matplotlib missing: the numbers are still written
            print(f"plots skipped: {exc}", file=sys.stderr)
            result.notes.append(f"plots skipped: {exc}")
    files.append(write_json(result, out_dir / "results.json", [p.name for p in files] + ["results.json"]))
    return files


def log_to_wandb(result: SweepResult, files: Sequence[Path], *, stream=None) -> bool:
    """Log the rows and plots to Weights & Biases if ``wandb`` is importable (offline by
    default: ``WANDB_MODE=offline`` unless set). Returns whether it logged."""
    stream = stream if stream is not None else sys.stderr
    try:
        import wandb  # type: ignore[import-not-found]
    except ImportError:
        print("--wandb: the 'wandb' package is not installed (pip install wandb); results were written to "
              "files only", file=stream)
        return False
    os.environ.setdefault("WANDB_MODE", "offline")
    out_dir = Path(files[0]).parent if files else Path(".")
    run = wandb.init(project="structlayers-bench", dir=str(out_dir), mode=os.environ["WANDB_MODE"],
                     config=_jsonable(dict(config=result.config.to_dict(), environment=result.environment)))
    cols = csv_columns(result.rows)
    table = wandb.Table(columns=cols, data=[[_jsonable(r.get(c)) for c in cols] for r in result.rows])
    images = {Path(p).stem: wandb.Image(str(p)) for p in files if str(p).endswith(".png")}
    run.log(dict(results=table, **images))
    run.finish()
    print(f"--wandb: logged {len(result.rows)} rows and {len(images)} plots (mode {os.environ['WANDB_MODE']})",
          file=stream)
    return True

