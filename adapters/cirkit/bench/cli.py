"""``structlayers bench``: the benchmark report, plugged into the core console script.

    structlayers bench [--circuit digits] [--units 16,32] [--kinds lowrank,nystrom] [--ranks 4,8]
                       [--structures square,flat] [--batch 128] [--threads 2] [--repeats 5]
                       [--epochs 3] [--mnist-dir DIR] [--out bench-out] [--quick] [--wandb]

:func:`register` is the ``structlayers.commands`` entry point the core's
:mod:`structlayers.cli` loads; the work is :func:`adapters.cirkit.bench.sweep.run_sweep`
plus :mod:`~adapters.cirkit.bench.outputs`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List

from .config import CIRCUITS, STRUCTURES, BenchConfig, BenchError, validate

DEFAULT_OUT = "bench-out"


def parse_int_list(text: str, field: str) -> List[int]:
    """``"16,32"`` -> ``[16, 32]``; a clear error for anything else (empty, not integers)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError("empty list (give comma-separated integers, e.g. 16,32)", field)
    try:
        return [int(t) for t in items]
    except ValueError:
        raise BenchError(f"{text!r} is not a comma-separated list of integers", field) from None


def parse_name_list(text: str, field: str) -> List[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError("empty list", field)
    return items


def _add_bench_options(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    q = BenchConfig.quick_defaults()
    # default=None everywhere: a given option wins over --quick's settings
    p.add_argument("--circuit", default=None, help=f"one of {', '.join(CIRCUITS)} [default: {d.circuit}]")
    p.add_argument("--units", default=None,
                   help=f"comma-separated K values [default: {','.join(map(str, d.units))}; quick "
                        f"{','.join(map(str, q['units']))}]")
    p.add_argument("--kinds", default=None,
                   help=f"approximating structlayers kinds [default: {','.join(d.kinds)}]")
    p.add_argument("--ranks", default=None,
                   help="ranks for every K (square: rank(Ã), flat: rank of the map) [default: K/4,K/2 per K]")
    p.add_argument("--structures", default=None,
                   help=f"any of {','.join(STRUCTURES)} [default: {','.join(d.structures)}]")
    p.add_argument("--batch", type=int, default=None,
                   help=f"rows of test data in the timed log c²(x) call [default: {d.batch}; quick {q['batch']}]")
    p.add_argument("--threads", type=int, default=None, help=f"torch threads [default: {d.threads}]")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repeats, median reported [default: {d.repeats}; quick {q['repeats']}]")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs of the trained circuits [default: {d.epochs}; quick {q['epochs']}]")
    p.add_argument("--max-materialised", type=int, default=None,
                   help=f"skip cirkit's materialised path above this K (its Z builds K^4 weights per fold) "
                        f"[default: {d.max_materialised}]")
    p.add_argument("--downsample", type=int, default=None,
                   help="average-pool the images of digits/mnist by this factor before building the circuit "
                        f"[default: {d.downsample}; quick {q['downsample']}]")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"score on at most this many test rows [default: all; quick {q['test_size']}]")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on at most this many rows (digits: trains in the run instead of using the cached "
                        f"full model) [default: all; quick {q['train_size']}]")
    p.add_argument("--mnist-dir", default=None, help="directory with the MNIST IDX files or mnist.npz (never downloaded)")
    p.add_argument("--seed", type=int, default=None, help=f"initialisation and training seed [default: {d.seed}]")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for results.csv, results.json and the plots [default: {DEFAULT_OUT}]")
    p.add_argument("--quick", action="store_true",
                   help="tiny configuration (digits pooled to 4x4, K=4,8, lowrank only, 1 epoch, 2 repeats): a smoke run")
    p.add_argument("--no-plots", action="store_true", help="write the CSV and JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or training lines")
    p.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases if wandb is installed (WANDB_MODE=offline unless set)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A validated :class:`BenchConfig`; raises :class:`BenchError` naming the bad field."""
    values = dict(BenchConfig.quick_defaults()) if args.quick else {}
    if args.circuit is not None:
        values["circuit"] = args.circuit
    for name in ("units", "ranks"):
        if getattr(args, name) is not None:
            values[name] = parse_int_list(getattr(args, name), name)
    for name in ("kinds", "structures"):
        if getattr(args, name) is not None:
            values[name] = parse_name_list(getattr(args, name), name)
    for name in ("batch", "threads", "repeats", "epochs", "max_materialised", "downsample", "test_size",
                 "train_size", "mnist_dir", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    circuit = values.get("circuit", BenchConfig.circuit)
    if args.quick and args.downsample is None and circuit not in ("digits", "digits-classifier"):
        values["downsample"] = 4 if circuit == "mnist" else 1
    config = BenchConfig(quick=args.quick, **values)
    validate(config)
    return config


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def run_bench(args: argparse.Namespace, out=None) -> int:
    from .outputs import format_table, log_to_wandb, write_outputs
    from .sweep import run_sweep

    out = sys.stdout if out is None else out
    config = config_from_args(args)
    start = time.perf_counter()
    arguments = {k: v for k, v in vars(args).items() if k not in ("command", "run", "parser")}
    result = run_sweep(config, progress=not args.no_progress, arguments=arguments)
    files = write_outputs(result, Path(args.out), plots=not args.no_plots)
    print(format_table(result), file=out)
    print(f"\nwrote {', '.join(p.name for p in files)} to {args.out}/ "
          f"({time.perf_counter() - start:.1f} s)", file=out)
    if args.wandb:
        log_to_wandb(result, files)
    return 0


def _guarded(run, parser: argparse.ArgumentParser):
    """``run(args)``, with a bad configuration reported as ``structlayers bench: error: ...`` (exit 2)."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BenchError as exc:
            message = f"{_option(exc.field)}: {exc.message}" if exc.field else exc.message
            parser.error(message)  # exits with status 2
        return 2  # pragma: no cover

    return guarded


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .train import TRAINING_VARIANTS, TrainConfig

    d = TrainConfig()
    q = TrainConfig.quick_defaults()
    p.add_argument("--units", default=None,
                   help=f"comma-separated K values [default: {','.join(map(str, d.units))}; quick "
                        f"{','.join(map(str, q['units']))}]")
    p.add_argument("--variants", default=None,
                   help=f"training variants: {', '.join(TRAINING_VARIANTS)}; a structured circuit "
                        f"kind[:K/n|rank|share] (kind: a registered kind, e.g. lowrank:K/8, monarch, tt:0.25); "
                        f"live-lowrank:K/n or live-nystrom:K/n [default: {','.join(d.variants)}]")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs [default: {d.epochs}; quick {q['epochs']}]")
    p.add_argument("--batch", type=int, default=None, help=f"mini-batch size [default: {d.batch}]")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate [default: {d.lr}]")
    p.add_argument("--threads", type=int, default=None, help=f"torch threads [default: {d.threads}]")
    p.add_argument("--seed", type=int, default=None, help=f"initialisation, batch order and sampling seed [default: {d.seed}]")
    p.add_argument("--samples", type=int, default=None, help=f"exact samples per trained model [default: {d.samples}]")
    p.add_argument("--sample-units", type=int, default=None,
                   help=f"sample the trained models up to this K [default: {d.sample_units}]")
    p.add_argument("--downsample", type=int, default=None,
                   help=f"average-pool the digits by this factor [default: {d.downsample}; quick {q['downsample']}]")
    p.add_argument("--train-size", type=int, default=None, help="train on at most this many rows [default: all]")
    p.add_argument("--test-size", type=int, default=None, help="score on at most this many rows [default: all]")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder [default: {DEFAULT_OUT}]")
    p.add_argument("--quick", action="store_true", help="smoke run: digits pooled to 4x4, K=4,8, one epoch")
    p.add_argument("--no-plots", action="store_true", help="write the CSV and JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace):
    """A validated :class:`~adapters.cirkit.bench.train.TrainConfig` from the ``bench train`` options."""
    from .train import TrainConfig, validate_train

    values = dict(TrainConfig.quick_defaults()) if args.quick else {}
    if args.units is not None:
        values["units"] = parse_int_list(args.units, "units")
    if args.variants is not None:
        values["variants"] = parse_name_list(args.variants, "variants")
    for name in ("epochs", "batch", "lr", "threads", "seed", "samples", "sample_units", "downsample", "train_size",
                 "test_size"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    config = TrainConfig(quick=args.quick, **values)
    validate_train(config)
    return config


def run_train(args: argparse.Namespace, out=None) -> int:
    from .outputs import format_train_table, write_train_outputs
    from .train import run_training

    out = sys.stdout if out is None else out
    config = train_config_from_args(args)
    start = time.perf_counter()
    result = run_training(config, progress=not args.no_progress)
    files = write_train_outputs(result, Path(args.out), plots=not args.no_plots)
    print(format_train_table(result), file=out)
    print(f"\nwrote {', '.join(p.name for p in files)} to {args.out}/ ({time.perf_counter() - start:.1f} s)",
          file=out)
    return 0


def _add_choose_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", default=f"{DEFAULT_OUT}/train",
                   help=f"a 'bench train' output folder or its train.json [default: {DEFAULT_OUT}/train]")
    p.add_argument("--seconds", type=float, default=None, help="budget: seconds per epoch on the measured machine")
    p.add_argument("--parameters", type=int, default=None, help="budget: trainable parameters")
    p.add_argument("--macs", type=int, default=None, help="budget: multiply-adds of c's sum layers per sample")


def run_choose(args: argparse.Namespace, out=None) -> int:
    """Print the measured circuit (structure and K) with the best test bpd within the budget,
    then every circuit within it, best first."""
    from .config import BenchError
    from .outputs import read_train_rows
    from .train import REFERENCE, within_budget

    out = sys.stdout if out is None else out
    budget = {name: getattr(args, name) for name in ("seconds", "parameters", "macs") if getattr(args, name) is not None}
    if not budget:
        raise BenchError("give at least one budget: --seconds, --parameters or --macs", "seconds")
    for name, value in budget.items():
        if not value > 0:
            raise BenchError(f"must be positive, got {value}", name)
    rows = [r for r in read_train_rows(args.source) if r.variant != REFERENCE]  # cirkit: the exact model, slower
    fits = within_budget(rows, **budget)
    if not fits:
        cheapest = min(rows, key=lambda r: r.seconds_per_epoch, default=None)
        print(f"nothing measured in {args.source} fits {budget}" + (
            f"; the fastest is {cheapest.variant} K={cheapest.units}: {cheapest.seconds_per_epoch:.3f} s/epoch, "
            f"{cheapest.parameters} parameters, {cheapest.macs_per_sample} MACs/x" if cheapest else ""), file=out)
        return 1
    best = fits[0]
    print(f"best within {budget}: {best.variant} at K={best.units} ({best.final_test_bpd:.4f} test bpd after "
          f"{best.epochs} epochs)", file=out)
    print(f"{'variant':20s} {'K':>4s} {'test bpd':>9s} {'s/epoch':>8s} {'params':>9s} {'MACs/x':>10s}", file=out)
    for r in fits:
        print(f"{r.variant:20s} {r.units:4d} {r.final_test_bpd:9.4f} {r.seconds_per_epoch:8.3f} {r.parameters:9d} "
              f"{r.macs_per_sample:10d}", file=out)
    return 0


def register(subparsers) -> None:
    """Add ``bench`` (and ``bench train``) to the ``structlayers`` console script (the
    ``structlayers.commands`` entry point)."""
    p = subparsers.add_parser(
        "bench", help="benchmark report: structured layers against cirkit's two paths; 'bench train': training",
        description="Time, score and plot structured sum layers in a squared circuit against cirkit's "
                    "materialised (optimize=False) and optimize=True paths. Options left out take the "
                    "defaults shown, or the --quick ones. 'structlayers bench train --help': the training "
                    "benchmark.")
    _add_bench_options(p)
    p.set_defaults(run=_guarded(run_bench, p))
    sub = p.add_subparsers(dest="bench_command", metavar="{train,choose}")
    t = sub.add_parser("train", help="train the squared digits circuit in cirkit's pipeline and this package's",
                       description="Train the squared digits circuit from the same initial values, data order "
                                   "and optimiser in every training variant (cirkit's idiomatic pipeline, this "
                                   "package's exact fast path, ...): seconds per epoch, time to the reference's "
                                   "bpd, final bpd, peak memory of a step, curves and exact samples.")
    _add_train_options(t)
    t.set_defaults(run=_guarded(run_train, t))
    c = sub.add_parser("choose", help="the structure and K with the best test bpd within a budget, from a "
                                      "'bench train' run",
                       description="Read a 'bench train' result and say which circuit (structure and K) reached "
                                   "the best test bpd within a budget of seconds per epoch, parameters or "
                                   "multiply-adds per sample (every budget given must hold).")
    _add_choose_options(c)
    c.set_defaults(run=_guarded(run_choose, c))
