"""``structlayers bench train``: a squared circuit trained end to end, pipeline against pipeline.

Every variant trains the same model -- the squared digits circuit ``|c|²/Z`` of
:func:`~adapters.cirkit.bench.circuits.digits_squared_circuit` at ``K`` units -- from the
same initial values (all compiled from one symbolic ``c`` with one seed; the test
checks the initial likelihoods agree), on the same mini-batch order, with the same
optimiser (Adam, lr 1e-2, batch 256 by default: the settings of the public research
code for sum-of-squares circuits on cirkit):

* ``cirkit`` -- cirkit's idiomatic pipeline, as its users run it: ``c`` and
  ``∫ conjugate(c)·c`` compiled by cirkit (``fold=True, optimize=True``,
  ``complex-lse-sum``), ``log p(x) = 2 Re log c(x) − log Z`` from cirkit's own forward,
  ``log Z`` cached while evaluating. Nothing of this package runs in its step.
* ``exact`` -- this package's exact fast path
  (:func:`~adapters.cirkit.model.compile_density`): exact factor-wise Kronecker layers,
  the linear-space evaluation, likelihoods through ``c``.
* whatever else :data:`TRAINING_VARIANTS` holds (:func:`register_training_variant`).

Per variant and ``K``: median seconds per epoch (training steps only), the training
seconds until its test bpd first reaches the reference's (``cirkit``) final test bpd,
final test bpd, peak memory of one training step, and the curves; exact samples of
each trained model (chain rule, :meth:`~adapters.cirkit.model.CircuitDensity.sample`)
for the ``K`` up to ``sample_units``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import cirkit.symbolic.functional as SF
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.circuit import Circuit

from structlayers.benchmarking import PEAK_RSS_PROBLEM, peak_rss_mib, pinned_threads

import structlayers

from ..costs import circuit_macs
from ..likelihood import nll_to_bpd
from ..model import CircuitDensity, compile_density, default_dtype
from ..structured import approximate_density, compile_structured, structure_policy
from ..swap import square_policy
from .circuits import digits_squared_circuit
from .config import BenchError
from .data import DIGITS_CATEGORIES, DIGITS_SHAPE, DataSplits, digits_data, pooled_splits
from .environment import run_environment
from .progress import Progress
from .training import evaluate_nll, train_squared_circuit

__all__ = ["TrainConfig", "TrainRow", "TrainResult", "CirkitPipeline", "TRAINING_VARIANTS",
           "register_training_variant", "training_variant", "parse_structure", "run_training", "REFERENCE",
           "best_within", "within_budget", "pareto_rows"]

NAN = float("nan")
REFERENCE = "cirkit"
#: A variant has reached the reference's final test bpd when it is within this many bits
#: per dimension of it (float32 runs of the same computation differ at the 1e-4 level).
REACHED = 1e-3


@dataclass
class TrainConfig:
    """What ``structlayers bench train`` runs."""

    units: List[int] = field(default_factory=lambda: [16, 32])
    variants: List[str] = field(default_factory=lambda: ["cirkit", "exact"])
    epochs: int = 5
    batch: int = 256
    lr: float = 1e-2
    threads: int = 2
    seed: int = 0
    samples: int = 64
    sample_units: int = 128  # draw samples of the trained models up to this K (64 digits at K=128: about 9 s)
    downsample: int = 1
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    quick: bool = False

    @classmethod
    def quick_defaults(cls) -> Dict[str, Any]:
        """The smoke configuration: digits pooled to 4x4, K=4,8, one epoch, a few samples."""
        return dict(units=[4, 8], epochs=1, downsample=2, samples=8, train_size=512, test_size=128)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- variants
class CirkitPipeline(nn.Module):
    """cirkit's idiomatic training pipeline for ``|c|²/Z``, only cirkit's calls inside.

    ``c`` and ``Z = ∫ conjugate(c)·c`` compiled in one cirkit context (shared
    parameters); ``log_likelihood(x) = 2 Re log c(x) − log Z`` with both from cirkit's
    forward; in eval mode ``log Z`` is computed once per :meth:`eval` call and reused.
    """

    def __init__(self, circuit: Circuit, *, num_categories: int, seed: int, dtype: torch.dtype = torch.float32,
                 semiring: str = "complex-lse-sum") -> None:
        super().__init__()
        ctx = PipelineContext(backend="torch", semiring=semiring, fold=True, optimize=True)
        with torch.random.fork_rng(devices=[]), default_dtype(dtype):
            torch.manual_seed(seed)
            self.c = ctx.compile(circuit)
            self.z = ctx.compile(SF.integrate(SF.multiply(SF.conjugate(circuit), circuit)))
        self.num_variables, self.num_categories, self.dtype = len(circuit.scope), num_categories, dtype
        self.num_outputs = 1
        self._cached_logz: Optional[Tensor] = None

    def train(self, mode: bool = True) -> "CirkitPipeline":
        self._cached_logz = None  # recomputed when evaluation starts again
        return super().train(mode)

    def log_partition(self) -> Tensor:
        if self.training or torch.is_grad_enabled():
            return self.z().real.reshape(-1)[:1]
        if self._cached_logz is None:
            self._cached_logz = self.z().real.reshape(-1)[:1]
        return self._cached_logz

    def log_likelihood(self, x: Tensor) -> Tensor:
        with default_dtype(self.dtype):
            return 2 * self.c(x).real[:, 0, :1] - self.log_partition()


def _cirkit(circuit: Circuit, config: TrainConfig, categories: int) -> nn.Module:
    return CirkitPipeline(circuit, num_categories=categories, seed=config.seed)


def _exact(circuit: Circuit, config: TrainConfig, categories: int) -> nn.Module:
    return compile_density(circuit, seed=config.seed, num_categories=categories)


#: name -> builder(symbolic c, config, number of categories) -> a model with log_likelihood(x)
TRAINING_VARIANTS: Dict[str, Callable[[Circuit, TrainConfig, int], nn.Module]] = {
    REFERENCE: _cirkit,
    "exact": _exact,
}


def parse_structure(name: str) -> Optional[Tuple[str, dict]]:
    """A structured-circuit variant name -> (kind, options), or None if ``name`` is not one.

    ``kind`` (the kind's defaults), ``kind:K/8`` or ``kind:4`` (rank: a fraction of the
    layer's size, or a number), ``kind:0.25`` (params_share, a fraction of the dense
    parameters, in (0, 1)).
    """
    kind, _, arg = name.partition(":")
    if kind not in structlayers.available():
        return None
    if not arg:
        return kind, {}
    if arg.upper().startswith("K/"):
        try:
            return kind, {"rank": 1.0 / float(arg[2:])}
        except ValueError:
            raise BenchError(f"{name!r}: K/<number> expected after the colon", "variants") from None
    try:
        value = float(arg)
    except ValueError:
        raise BenchError(f"{name!r}: after the colon give K/<n>, a rank or a parameter share", "variants") from None
    if value.is_integer() and value >= 1:
        return kind, {"rank": int(value)}
    if 0 < value < 1:
        return kind, {"params_share": value}
    raise BenchError(f"{name!r}: a rank must be a positive integer, a share lie in (0, 1)", "variants")


def training_variant(name: str) -> Callable[[Circuit, TrainConfig, int], nn.Module]:
    """The builder of a registered variant, or of a structured circuit named ``kind[:budget]``
    (:func:`parse_structure`): ``c``'s sum layers of that kind, trained from scratch."""
    if name in TRAINING_VARIANTS:
        return TRAINING_VARIANTS[name]
    if name.startswith("live-"):
        return _live_variant(name)
    parsed = parse_structure(name)
    if parsed is None:
        raise BenchError(f"unknown training variant {name!r}; registered: {', '.join(TRAINING_VARIANTS)}; or a "
                         f"structured circuit kind[:K/n|rank|share] with kind one of "
                         f"{', '.join(structlayers.available())}", "variants")
    kind, options = parsed

    def build(circuit: Circuit, config: TrainConfig, categories: int) -> nn.Module:
        model, _ = compile_structured(circuit, structure_policy(kind, **options), seed=config.seed,
                                      num_categories=categories)
        return model

    return build


def _live_variant(name: str) -> Callable[[Circuit, TrainConfig, int], nn.Module]:
    """``live-<lowrank|nystrom>:K/n`` (or ``:r``): the dense circuit trained through live square
    approximations of rank(Ã) = r applied to c, |c|² and Z alike."""
    kind, _, arg = name[len("live-"):].partition(":")
    if kind not in ("lowrank", "nystrom") or not arg:
        raise BenchError(f"{name!r}: live-lowrank:K/n or live-nystrom:K/n (or a rank after the colon)", "variants")
    try:
        fraction = 1.0 / float(arg[2:]) if arg.upper().startswith("K/") else None
        rank = None if fraction is not None else int(arg)
    except ValueError:
        raise BenchError(f"{name!r}: after the colon give K/<n> or a rank", "variants") from None

    def build(circuit: Circuit, config: TrainConfig, categories: int) -> nn.Module:
        model = compile_density(circuit, seed=config.seed, num_categories=categories, optimize=False)

        def policy(info):
            r = rank if rank is not None else max(1, int(round(fraction * min(info.factor_a))))
            return square_policy(kind, r)(info)

        approximate_density(model, policy)
        return model

    return build


def register_training_variant(name: str, builder: Callable[[Circuit, TrainConfig, int], nn.Module]) -> None:
    """Add a variant to ``structlayers bench train``: ``builder(c, config, categories)``
    returns a module with ``log_likelihood(x) -> (B, 1)`` compiled from ``c`` with
    ``config.seed``, and the attributes of :class:`~adapters.cirkit.bench.training.LikelihoodModel`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a training variant needs a non-empty name, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    TRAINING_VARIANTS[name] = builder


def as_density(model: nn.Module, circuit: Circuit, categories: int) -> CircuitDensity:
    """A :class:`CircuitDensity` holding ``model``'s trained values (for sampling)."""
    if isinstance(model, CircuitDensity):
        return model
    if isinstance(model, CirkitPipeline):
        density = compile_density(circuit, num_categories=categories, dtype=model.dtype)
        density.base.load_state_dict(model.c.state_dict())  # the same layout: optimize=True, same rule for c
        return density
    raise TypeError(f"cannot sample from a {type(model).__name__}")


# ----------------------------------------------------------------------------- results
@dataclass
class TrainRow:
    """One variant trained at one ``K``."""

    units: int
    variant: str
    epochs: int
    seconds_per_epoch: float = NAN  # median over epochs, training steps only
    epoch_seconds: List[float] = field(default_factory=list)
    test_bpd: List[float] = field(default_factory=list)  # after every epoch
    initial_test_bpd: float = NAN
    final_test_bpd: float = NAN
    final_bpd_diff_vs_reference: float = NAN
    seconds_to_reference: float = NAN  # training seconds until test bpd <= the reference's final + REACHED
    speedup_vs_reference: float = NAN  # reference seconds per epoch / these
    peak_step_mib: float = NAN  # peak memory growth of one training step
    memory_vs_reference: float = NAN  # peak / reference peak
    sample_seconds: float = NAN
    parameters: int = 0  # trainable numbers the model uses
    macs_per_sample: int = 0  # multiply-adds of c's sum layers per sample (a likelihood's)
    pareto: bool = False  # on the (seconds per epoch, final test bpd) front of all rows

    def flat(self) -> Dict[str, Any]:
        """The scalar columns (the CSV)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not isinstance(getattr(self, f.name), list)}


TRAIN_COLUMNS = tuple(TrainRow(units=0, variant="", epochs=0).flat())


@dataclass
class TrainResult:
    rows: List[TrainRow]
    samples: Dict[str, Tensor]  # "<variant> K=<k>" -> (n, D) samples
    image_shape: tuple
    environment: Dict[str, Any]
    notes: List[str]
    config: TrainConfig


# ----------------------------------------------------------------------------- the run
def validate_train(config: TrainConfig) -> None:
    """Raise :class:`~adapters.cirkit.bench.config.BenchError` naming the first bad field."""
    if not config.units or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in config.units):
        raise BenchError(f"every K must be an integer of at least 2, got {config.units}", "units")
    if len(set(config.units)) != len(config.units):
        raise BenchError(f"duplicate values in {config.units}", "units")
    if not config.variants:
        raise BenchError("empty list", "variants")
    for v in config.variants:
        training_variant(v)  # unknown names and bad budgets fail here, before any work
    for name in ("epochs", "batch", "threads", "samples", "sample_units", "downsample"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BenchError(f"must be a positive integer, got {value!r}", name)
    for name in ("train_size", "test_size"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BenchError(f"must be a positive integer, got {value!r}", name)
    if not (isinstance(config.lr, (int, float)) and not isinstance(config.lr, bool) and config.lr > 0
            and math.isfinite(config.lr)):
        raise BenchError(f"must be a positive number, got {config.lr!r}", "lr")
    if 8 % config.downsample:
        raise BenchError(f"{config.downsample} does not divide the 8x8 digits", "downsample")


def _data(config: TrainConfig) -> tuple[DataSplits, tuple]:
    data = pooled_splits(digits_data(seed=0), DIGITS_SHAPE, config.downsample)
    if config.train_size is not None:
        data = DataSplits(data.x_train[:config.train_size], data.y_train[:config.train_size], data.x_test, data.y_test)
    if config.test_size is not None:
        data = DataSplits(data.x_train, data.y_train, data.x_test[:config.test_size], data.y_test[:config.test_size])
    side = DIGITS_SHAPE[0] // config.downsample
    return data, (side, side)


def _step(model: nn.Module, x: Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        loss = -model.log_likelihood(x)[:, 0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_training(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train every variant of ``config`` at every ``K``; time, score, measure and sample them."""
    validate_train(config)
    data, image = _data(config)
    d = data.x_train.shape[1]
    rows: List[TrainRow] = []
    samples: Dict[str, Tensor] = {}
    notes: List[str] = []
    trained: List[tuple] = []
    bar = Progress(len(config.units) * len(config.variants), "bench train", enabled=progress, echo_steps=True,
                   leave=True)
    with pinned_threads(config.threads):
        env = run_environment(threads=config.threads)
        for k in config.units:
            spec = digits_squared_circuit(k, image_shape=image, num_categories=DIGITS_CATEGORIES)
            initial: Dict[str, float] = {}
            for name in config.variants:
                try:
                    model = training_variant(name)(spec.circuit, config, DIGITS_CATEGORIES)
                except (ValueError, TypeError) as exc:
                    raise BenchError(f"K={k}: cannot build {name!r}: {exc}", "variants") from None
                initial[name] = nll_to_bpd(evaluate_nll(model, data.x_test), d)
                history = train_squared_circuit(model, data, epochs=config.epochs, batch_size=config.batch,
                                                lr=config.lr, seed=config.seed, progress=False)
                row = TrainRow(units=k, variant=name, epochs=config.epochs, epoch_seconds=list(history.epoch_seconds),
                               test_bpd=list(history.test_bpd), initial_test_bpd=initial[name],
                               final_test_bpd=history.test_bpd[-1],
                               seconds_per_epoch=statistics.median(history.epoch_seconds),
                               parameters=_parameters(model), macs_per_sample=_macs(model))
                rows.append(row)
                trained.append((k, name, model, spec))
                bar.step(f"K={k} {name}: {row.seconds_per_epoch:.2f} s/epoch, test bpd {row.final_test_bpd:.4f}")
            same = [v for name, v in initial.items() if name in TRAINING_VARIANTS]  # one model, several pipelines
            if same and max(same) - min(same) > 1e-3:
                notes.append(f"K={k}: initial test bpd differs by {max(same) - min(same):.2e} between the "
                             "pipelines of the same model")
        _relate(rows, notes)
        for i in pareto_rows(rows):
            rows[i].pareto = True
        # peak memory after every timing (the measurement fixes the allocator's settings), then samples
        batch = data.x_train[: config.batch].long()
        gc.collect()
        for (k, name, model, spec), row in zip(trained, rows):
            if PEAK_RSS_PROBLEM:
                break
            probe = copy.deepcopy(model)  # the steps of the measurement leave the trained model alone
            probe.train()
            row.peak_step_mib = peak_rss_mib(_step(probe, batch, torch.optim.Adam(probe.parameters(), lr=config.lr)))
            del probe
        _memory(rows)
        for (k, name, model, spec), row in zip(trained, rows):
            if k > config.sample_units:
                continue
            density = as_density(model, spec.circuit, DIGITS_CATEGORIES)
            start = time.perf_counter()
            samples[f"{name} K={k}"] = density.sample(config.samples, generator=torch.Generator().manual_seed(config.seed))
            row.sample_seconds = time.perf_counter() - start
    bar.close()
    skipped = [k for k in config.units if k > config.sample_units]
    if skipped:
        notes.append(f"no samples at K={skipped} (above sample_units={config.sample_units}: exact sampling "
                     "evaluates the squared circuit forward and backward D times over the samples)")
    if PEAK_RSS_PROBLEM:
        notes.append(PEAK_RSS_PROBLEM)
    env.update(timing="seconds per epoch: wall time of the training steps (evaluation excluded), median over "
                      "epochs; torch threads pinned",
               peak_memory="growth of the resident high-water mark during one training step "
                           "(structlayers.benchmarking.peak_rss_mib), measured after all timings",
               data=f"sklearn digits {image[0]}x{image[1]}, {data.x_train.shape[0]} training and "
                    f"{data.x_test.shape[0]} test rows", arguments=config.to_dict())
    return TrainResult(rows, samples, image, env, notes, config)


def _used(model: nn.Module):
    """The circuits of a trained model: (c, Z)."""
    if isinstance(model, CirkitPipeline):
        return model.c, model.z
    return model.base, model.partition


def _parameters(model: nn.Module) -> int:
    """Trainable numbers of c and Z (each shared tensor once)."""
    unique = {id(p): p for circuit in _used(model) for p in circuit.parameters() if p.requires_grad}
    return sum(p.numel() for p in unique.values())


def _macs(model: nn.Module) -> int:
    return circuit_macs(_used(model)[0], 1)


def pareto_rows(rows: List[TrainRow]) -> List[int]:
    """Indices of the rows on the (seconds per epoch, final test bpd) front, both minimised."""
    from .analysis import pareto_front

    return pareto_front([(-r.seconds_per_epoch, r.final_test_bpd) for r in rows])


def within_budget(rows: List[TrainRow], *, seconds: Optional[float] = None, parameters: Optional[int] = None,
                  macs: Optional[int] = None) -> List[TrainRow]:
    """The rows within every given budget (seconds per epoch on this machine, trainable
    parameters, multiply-adds per sample), best final test bpd first."""
    ok = [r for r in rows if (seconds is None or r.seconds_per_epoch <= seconds)
          and (parameters is None or r.parameters <= parameters) and (macs is None or r.macs_per_sample <= macs)]
    return sorted(ok, key=lambda r: r.final_test_bpd)


def best_within(rows: List[TrainRow], **budget) -> Optional[TrainRow]:
    """The row with the best final test bpd within every given budget (:func:`within_budget`), or None."""
    ok = within_budget(rows, **budget)
    return ok[0] if ok else None


def _relate(rows: List[TrainRow], notes: List[str]) -> None:
    """Columns against the reference variant at the same K."""
    for k in sorted({r.units for r in rows}):
        group = [r for r in rows if r.units == k]
        ref = next((r for r in group if r.variant == REFERENCE), None)
        if ref is None:
            notes.append(f"K={k}: no {REFERENCE!r} variant, so no ratios against it")
            continue
        target = ref.final_test_bpd
        for r in group:
            r.final_bpd_diff_vs_reference = r.final_test_bpd - target
            r.speedup_vs_reference = ref.seconds_per_epoch / r.seconds_per_epoch
            elapsed = 0.0
            for seconds, bpd in zip(r.epoch_seconds, r.test_bpd):
                elapsed += seconds
                if bpd <= target + REACHED:
                    r.seconds_to_reference = elapsed
                    break


def _memory(rows: List[TrainRow]) -> None:
    for k in sorted({r.units for r in rows}):
        group = [r for r in rows if r.units == k]
        ref = next((r for r in group if r.variant == REFERENCE), None)
        for r in group:
            if ref is not None and ref.peak_step_mib > 0:
                r.memory_vs_reference = r.peak_step_mib / ref.peak_step_mib
