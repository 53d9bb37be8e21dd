"""The ``structlayers bench`` sweep: build, time, score and measure every variant.

For every number of units ``K`` the sweep

1. builds a circuit (:data:`~adapters.cirkit.bench.config.CIRCUITS`) and, for the digits,
   MNIST and classifier circuits, trains it (seeded; kept in the model cache,
   :mod:`adapters.cirkit.bench.cache`); ``one-sum`` and ``deep-cp`` are untrained seeded
   models scored on uniformly random data;
2. takes the compiled models to compare from
   :func:`adapters.cirkit.bench.variants.circuit_variants` (cirkit's materialised and
   ``optimize=True`` paths, exact ``kronecker`` layers, approximations);
3. times, threads pinned, round-robin with a warm-up and the median of the repeats
   (:mod:`structlayers.benchmarking`): ``Z`` forward+backward, ``Z`` forward, and
   ``log c²(x)`` forward on a batch of test data; then scores each variant (test NLL,
   bits per dimension, classifier error rate) and reads its swap report (relative
   weight error, parameters, multiply-adds);
4. after every timing of every ``K`` (the measurement changes the allocator's
   settings), measures the peak-memory growth of each timed call.

Every speedup is given against both cirkit paths. The theoretical speedup counts the
multiply-adds per sample of the Kronecker sum layers only (the other layers cost the
same in every variant); efficiency = measured speedup / theoretical speedup. Rows are
:class:`~adapters.cirkit.bench.schema.Row`.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from structlayers.benchmarking import (
    PEAK_RSS_PROBLEM,
    gemm_gflops,
    interleaved_medians,
    matmul_macs,
    peak_rss_mib,
    pinned_threads,
)

from ..costs import circuit_macs
from ..likelihood import nll_to_bpd
from ..swap import LayerInfo, SwapReport
from .analysis import beats_label, mark_pareto
from .cache import cached_training
from .circuits import (
    CircuitModel,
    CompiledCircuitModel,
    deep_cp_circuit,
    digits_classifier_circuit,
    gaussian_image_circuit,
    digits_squared_circuit,
    one_sum_circuit,
)
from .config import BenchConfig, BenchError, ranks_for, validate
from .data import (
    DIGITS_CATEGORIES,
    DIGITS_SHAPE,
    MNIST_CATEGORIES,
    MNIST_SHAPE,
    DataSplits,
    digits_data,
    load_mnist,
    pooled_splits,
)
from .environment import run_environment
from .progress import Progress
from .schema import BASELINES, CALLS, NAN, Row, ratio
from .training import (
    class_log_prior,
    evaluate_accuracy,
    evaluate_nll,
    train_classifier_circuit,
    train_squared_circuit,
    trained_digits_model,
)
from .variants import CIRKIT_MATERIALISED, CIRKIT_OPTIMIZED, EXACT, Variant, circuit_variants

__all__ = ["Prepared", "SweepResult", "prepare", "run_sweep", "baseline_macs", "report_summary", "score_nll"]

DEEP_CP_VARIABLES = 16
#: the deep, narrow circuit: a CP circuit on a linear tree, one fold per layer
DEEP_NARROW_VARIABLES = 40
RANDOM_ROWS = 512


# ----------------------------------------------------------------------------- circuits and data


@dataclass
class Prepared:
    """One K's circuit: symbolic spec, compiled (trained) model, data and notes."""

    spec: CircuitModel
    model: CompiledCircuitModel
    x_test: torch.Tensor
    y_test: Optional[torch.Tensor]
    log_prior: Optional[torch.Tensor]
    batch: torch.Tensor
    info: Dict[str, Any]


def _batch_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] >= batch:
        return x[:batch]
    reps = -(-batch // x.shape[0])
    return x.repeat(reps, 1)[:batch]


def _test_rows(config: BenchConfig, x: torch.Tensor, y: Optional[torch.Tensor]):
    if config.test_size is None:
        return x, y
    return x[: config.test_size], None if y is None else y[: config.test_size]


def prepare(config: BenchConfig, num_units: int, *, progress: bool = False) -> Prepared:
    """Build (and train) the circuit of ``config`` with ``num_units`` units."""
    circuit, k, seed = config.circuit, num_units, config.seed
    info: Dict[str, Any] = dict(units=k, trained=False, from_cache=False, train_seconds=0.0)
    y_test = log_prior = None
    if circuit in ("one-sum", "deep-cp", "deep-narrow"):
        spec = {"one-sum": lambda: one_sum_circuit(k),
                "deep-cp": lambda: deep_cp_circuit(DEEP_CP_VARIABLES, k),
                "deep-narrow": lambda: deep_cp_circuit(DEEP_NARROW_VARIABLES, k, region_graph="linear-tree")}[circuit]()
        model = spec.compile(seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        rows = config.test_size or RANDOM_ROWS
        x_test = torch.randint(0, spec.num_categories, (rows, spec.num_variables), generator=gen)
        info["data"] = (f"{rows} uniformly random rows ({spec.num_variables} variables, "
                        f"{spec.num_categories} categories); untrained seeded model")
    elif circuit == "continuous":
        factor = config.downsample
        data = pooled_splits(digits_data(seed=0), DIGITS_SHAPE, factor)
        image = (DIGITS_SHAPE[0] // factor, DIGITS_SHAPE[1] // factor)
        spec = gaussian_image_circuit(k, image_shape=image)
        model = spec.compile(seed=seed)
        x_test = data.x_test.double() / (DIGITS_CATEGORIES - 1)  # pixel intensities in [0, 1]
        info["data"] = (f"sklearn digits {image[0]}x{image[1]} as intensities in [0, 1]; untrained seeded "
                        "Gaussian-input model")
    elif circuit == "digits" and config.downsample == 1 and config.train_size is None:
        trained = trained_digits_model(k, config.epochs, seed=seed, progress=progress)
        model, spec = trained.model, trained.model.spec
        x_test = digits_data(seed=0).x_test
        info.update(trained=True, from_cache=trained.from_cache, cache_file=trained.path.name,
                    history=trained.history.to_dict(), train_seconds=float(sum(trained.history.epoch_seconds)),
                    data="sklearn digits 8x8, 17 categories, stratified test split")
    else:
        if circuit == "mnist":
            try:
                data = load_mnist(config.mnist_dir)
            except (FileNotFoundError, ValueError) as exc:
                raise BenchError(f"the mnist circuit: {exc}", "mnist_dir") from None
            shape, categories, name = MNIST_SHAPE, MNIST_CATEGORIES, "MNIST 28x28"
        else:
            data = digits_data(seed=0)
            shape, categories, name = DIGITS_SHAPE, DIGITS_CATEGORIES, "sklearn digits 8x8"
        factor = config.downsample
        data = pooled_splits(data, shape, factor)
        if config.train_size is not None:
            n = config.train_size
            data = DataSplits(data.x_train[:n], data.y_train[:n], data.x_test, data.y_test)
        image = (shape[0] // factor, shape[1] // factor)
        classifier = circuit == "digits-classifier"
        if classifier:
            spec = digits_classifier_circuit(k, squared=True, image_shape=image, num_categories=categories)
        else:
            spec = digits_squared_circuit(k, image_shape=image, num_categories=categories)
        key = dict(circuit=circuit, units=k, epochs=config.epochs, seed=seed, downsample=factor,
                   spec=dict(spec.config), train_rows=int(data.x_train.shape[0]))

        def train(m):
            fit = train_classifier_circuit if classifier else train_squared_circuit
            return fit(m, data, epochs=config.epochs, seed=seed, progress=progress)

        got = cached_training(circuit, key, lambda: spec.compile(seed=seed), train)
        model = got.model
        info.update(trained=True, from_cache=got.from_cache, cache_file=got.path.name, train_seconds=got.seconds,
                    history=got.history)
        info["data"] = f"{name}" + (f" average-pooled to {image[0]}x{image[1]}" if factor > 1 else "")
        x_test, y_test = data.x_test, data.y_test
        if classifier:
            log_prior = class_log_prior(data.y_train, spec.num_outputs)
    x_test, y_test = _test_rows(config, x_test, y_test)
    info.update(test_rows=int(x_test.shape[0]), num_variables=spec.num_variables)
    x_test = x_test.long() if spec.num_categories is not None else x_test.to(model.dtype)
    return Prepared(spec, model, x_test, y_test, log_prior, _batch_rows(x_test, config.batch), info)


# ----------------------------------------------------------------------------- structure


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


def _baseline_params(infos: Iterable[LayerInfo]) -> int:
    return sum(i.num_folds * (i.factor_a[0] * i.factor_a[1]
                              + (0 if i.conjugate_pair else i.factor_b[0] * i.factor_b[1])) for i in infos)


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


# ----------------------------------------------------------------------------- scoring


def score_nll(model: CompiledCircuitModel, x: torch.Tensor, y: Optional[torch.Tensor]) -> float:
    """Mean test NLL in nats: ``-log p(x)``, ``-log p(x | y)`` with labels, and for an
    unlabelled model with several outputs (one-sum: K densities) the mean over the outputs.
    A flat approximation (no density) is scored by ``log|f(x)/Z|``, as the table says."""
    return evaluate_nll(model, x, y, unlabelled="mean", signed=True)


def _timed_calls(variant: Variant, batch: torch.Tensor) -> Dict[str, Callable[[], object]]:
    model = variant.model
    # a training step's gradients: set, not added to those of the previous call. Cleared as an
    # optimizer clears them, from its list of parameters (Module.zero_grad walks every submodule
    # on each call: 0.4-1 ms for these models, a cost no training loop pays)
    parameters = list(model.parameters())

    def z_fwd_bwd():
        for p in parameters:
            p.grad = None
        model.log_partition().sum().backward()

    def z_fwd():
        with torch.no_grad():  # computed: a trained model is in eval mode, where log Z is cached
            return model.log_partition(cached=False)

    def logc2_fwd():
        with torch.no_grad():
            return model.log_density(batch)

    return {"z_fwd_bwd": z_fwd_bwd, "z_fwd": z_fwd, "logc2_fwd": logc2_fwd}


def call_macs(variant: Variant, batch: int) -> Dict[str, int]:
    """Multiply-adds of each timed call's sum layers; a backward costs twice its forward."""
    z = circuit_macs(variant.model.partition, 1)
    return {"z_fwd_bwd": 3 * z, "z_fwd": z, "logc2_fwd": circuit_macs(variant.model.density, batch)}


def _new_row(config: BenchConfig, k: int, v: Variant) -> Row:
    rank = v.rank if isinstance(v.rank, int) else None
    return Row(circuit=config.circuit, units=k, variant=v.name, kind=v.kind, rank=rank, structure=v.structure,
               evaluation=v.evaluation, same_values=bool(v.same_values), is_baseline=bool(v.is_baseline),
               rank_fraction=rank / k if rank is not None else NAN)


def _rows_for(config: BenchConfig, k: int, prepared: Prepared, variants: Sequence[Variant],
              times: Mapping[str, Mapping[str, float]], gflops: float,
              calls: Mapping[str, Mapping[str, Callable[[], object]]]) -> List[Row]:
    d = prepared.spec.num_variables
    infos = _layer_infos(variants)
    theory = baseline_macs(infos)
    ref_times = {key: times.get(name) for key, name in BASELINES.items()}
    classifier = prepared.spec.num_outputs > 1
    out = []
    for v in variants:
        row = _new_row(config, k, v)
        macs = call_macs(v, prepared.batch.shape[0])
        for m, _ in CALLS:
            stats = row.call(m)
            stats.ms = times[v.name][m] * 1e3
            stats.macs = macs[m]
            stats.gemm_efficiency = ratio(2.0 * macs[m] / (gflops * 1e9), times[v.name][m])
            stats.macs_done = matmul_macs(calls[v.name][m])  # one more call, counted, not timed
            stats.gemm_efficiency_done = ratio(2.0 * stats.macs_done / (gflops * 1e9), times[v.name][m])
            for key in BASELINES:
                base = ref_times[key][m] if ref_times[key] is not None else NAN
                stats.speedup_vs[key] = ratio(base, times[v.name][m])
        # quality: cirkit paths whose layout differs keep seeded values and are not scored
        row.scored = (not v.is_baseline) or bool(v.same_values)
        if row.scored:
            row.test_nll = score_nll(v.model, prepared.x_test, prepared.y_test)
            if classifier and prepared.y_test is not None:
                row.error_rate = 1.0 - evaluate_accuracy(v.model, prepared.x_test, prepared.y_test,
                                                         prepared.log_prior)
        row.bpd = nll_to_bpd(row.test_nll, d)
        # structure: multiply-adds, parameters, weight error
        if v.report is not None:
            for name, value in report_summary(v.report).items():
                setattr(row, name, value)
        else:
            row.sum_layer_params = _baseline_params(infos)
            if v.name.startswith(CIRKIT_MATERIALISED):  # cirkit's layers, whatever evaluates them
                row.macs_per_sample = theory["materialised"]
            elif v.name.startswith(CIRKIT_OPTIMIZED):
                row.macs_per_sample = theory["opt"]
            if not math.isnan(row.macs_per_sample):
                row.rel_weight_error_max = row.rel_weight_error_mean = 0.0
        for key in BASELINES:
            row.theory_speedup_vs[key] = ratio(theory[key], row.macs_per_sample)
            for m, _ in CALLS:
                row.call(m).efficiency_vs[key] = ratio(row.call(m).speedup_vs[key], row.theory_speedup_vs[key])
        row.layers = _layer_rows(v.report)
        out.append(row)
    exact = next((r for r in out if r.variant == EXACT), None)
    exact_bpd = exact.bpd if exact is not None else NAN
    for row in out:
        row.bpd_diff_vs_exact = row.bpd - exact_bpd
    return out


def _memory_ratios(rows: Sequence[Row]) -> None:
    refs = {key: next((r for r in rows if r.variant == name), None) for key, name in BASELINES.items()}
    for row in rows:
        for m, _ in CALLS:
            for key, ref in refs.items():
                base = ref.call(m).peak_mib if ref is not None else NAN
                row.call(m).memory_reduction_vs[key] = ratio(base, row.call(m).peak_mib)


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    rows: List[Row]
    sizes: List[Dict[str, Any]]
    environment: Dict[str, Any]
    notes: List[str]
    config: BenchConfig


def run_sweep(config: BenchConfig, *, progress: bool = True, arguments: Optional[Mapping[str, Any]] = None) -> SweepResult:
    """Time, score and measure every variant of every ``K`` in ``config.units``."""
    validate(config)
    notes: List[str] = []
    rows: List[Row] = []
    sizes: List[Dict[str, Any]] = []
    kept: List[Tuple[List[Variant], torch.Tensor, List[Row]]] = []
    bar = Progress(5 * len(config.units), "bench", enabled=progress, echo_steps=True, leave=True)
    with pinned_threads(config.threads):
        gflops = gemm_gflops()
        env = run_environment(threads=config.threads, gemm_gflops=gflops)
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
                             f"max_materialised = {config.max_materialised}); its ratios are NaN")
            bar.step(f"K={k}: {len(variants)} variants built")
            calls = {v.name: _timed_calls(v, prepared.batch) for v in variants}
            times: Dict[str, Dict[str, float]] = {}
            for m, _ in CALLS:
                medians = interleaved_medians({n: c[m] for n, c in calls.items()}, repeats=config.repeats,
                                              warmup=config.warmup)
                for n, t in medians.items():
                    times.setdefault(n, {})[m] = t
            bar.step(f"K={k}: timed")
            k_rows = _rows_for(config, k, prepared, variants, times, gflops, calls)
            rows.extend(k_rows)
            sizes.append(size)
            bar.step(f"K={k}: scored")
            kept.append((variants, prepared.batch, k_rows))
        # After every timing: the measurement fixes malloc's settings for the rest of the process.
        # gc.freeze: the objects alive now (models, data) move to the permanent generation, so the
        # gc.collect() in each measurement scans only what the call itself left behind (else it
        # walks every cirkit object of every variant: 0.3 s a call).
        gc.collect()
        gc.freeze()
        try:
            for variants, batch, k_rows in kept:
                by_name = {r.variant: r for r in k_rows}
                for v in variants:
                    for m, fn in _timed_calls(v, batch).items():
                        by_name[v.name].call(m).peak_mib = NAN if PEAK_RSS_PROBLEM else peak_rss_mib(fn)
                _memory_ratios(k_rows)
                bar.step(f"K={k_rows[0].units}: peak memory")
        finally:
            gc.unfreeze()
    bar.close()
    if PEAK_RSS_PROBLEM:
        notes.append(PEAK_RSS_PROBLEM)
    env.update(timing=f"median of {config.repeats} round-robin repeats after {config.warmup} warm-up call(s), "
                      "torch threads pinned",
               peak_memory="growth of the resident high-water mark during one call "
                           "(structlayers.benchmarking.peak_rss_mib), measured after all timings",
               arguments=dict(arguments) if arguments is not None else config.to_dict())
    if config.circuit in ("one-sum", "deep-cp", "deep-narrow", "continuous"):
        notes.append(f"{config.circuit}: untrained seeded model (scored on uniformly random data, or the digits as "
                     "intensities for the continuous circuit); its bpd "
                     "compares variants with the exact model, it is not a measure of fit")
    for row in rows:
        if row.is_baseline and not row.scored:
            notes.append(f"K={row.units}: {row.variant} has a different parameter layout and keeps "
                         "seeded values; it is timed, not scored")
    for row in rows:
        row.beats_opt = beats_label(row)
    mark_pareto(rows)
    return SweepResult(rows, sizes, env, notes, config)
