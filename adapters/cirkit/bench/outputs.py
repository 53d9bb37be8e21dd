"""Files and tables of a sweep: results.csv, results.json, the console table, W&B."""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path
from typing import Any, List, Sequence

from .schema import CALLS, COLUMNS, NAN, Row

__all__ = ["write_csv", "write_json", "format_table", "write_outputs", "log_to_wandb", "jsonable"]

COLUMN_NOTES = {
    "_ms": "median milliseconds per call",
    "_speedup_vs_opt": "t(cirkit optimize=True) / t",
    "_speedup_vs_materialised": "t(cirkit optimize=False) / t",
    "_peak_mib": "peak resident-memory growth of one call, MiB",
    "theory_speedup_vs_": "multiply-adds per sample of the Kronecker sum layers, baseline / variant",
    "_efficiency_vs_": "measured speedup / theoretical speedup",
    "_macs": "multiply-adds of the call's sum layers (backward = 2 x forward)",
    "_gemm_efficiency": "time of those multiply-adds at the measured matrix-product rate / measured time",
    "_macs_done": "multiply-adds of the matrix products the call actually ran (torch's flop counter)",
    "_gemm_efficiency_done": "the same ratio for the multiply-adds actually run",
    "bpd": "test NLL / (D ln 2); NaN (null) when not scored",
}


def _percent(value: float) -> str:
    """A fraction as a 4-wide percentage ('nan' when not measured)."""
    return f"{'-':>4s}" if value != value else f"{value * 100:3.0f}%"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """One line per row, the columns of :data:`~adapters.cirkit.bench.schema.COLUMNS`."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for r in rows:
            flat = r.flat()
            writer.writerow([_cell(flat[c]) for c in COLUMNS])
    return path


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf as None and anything unknown as its string."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def write_json(result, path: Path, files: Sequence[str] = ()) -> Path:
    """The environment, configuration, notes, per-K set-up and every row (with its layers)."""
    import json

    blob = dict(environment=result.environment, config=result.config.to_dict(), notes=result.notes,
                sizes=result.sizes, rows=[r.to_json() for r in result.rows], files=list(files),
                columns=COLUMN_NOTES)
    with open(path, "w") as fh:
        json.dump(jsonable(blob), fh, indent=2)
    return path


def _fmt(value: Any, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}s}"
    return f"{format(value, spec):>{width}s}"


def format_table(result) -> str:
    """The summary table: times, ratios vs both cirkit paths, peak memory, quality."""
    head = (f"{'K':>4s} {'variant':29s} | {'Z f+b ms':>9s} {'/opt':>6s} {'/mat':>6s} {'eff':>4s} {'done':>4s} | "
            f"{'Z fwd ms':>9s} {'/opt':>6s} {'/mat':>6s} | {'c² ms':>9s} {'/opt':>6s} {'/mat':>6s} {'eff':>4s} "
            f"{'done':>4s} | {'Z MiB':>7s} "
            f"{'c² MiB':>7s} | {'bpd':>7s} {'Δbpd':>7s} {'w.err':>7s}")
    classifier = any(not math.isnan(r.error_rate) for r in result.rows)
    if classifier:
        head += f" {'err%':>6s}"
    head += " | beats opt=True"
    lines = [head, "-" * len(head)]
    for r in result.rows:
        cells = [f"{r.units:4d} {r.variant[:29]:29s}"]
        for m, _ in CALLS:
            c = r.call(m)
            cell = (f"{_fmt(c.ms, '.2f', 9)} {_fmt(c.speedup_vs['opt'], '.2f', 5)}x "
                    f"{_fmt(c.speedup_vs['materialised'], '.2f', 5)}x")
            if m != "z_fwd":
                cell += f" {_percent(c.gemm_efficiency)} {_percent(c.gemm_efficiency_done)}"
            cells.append(cell)
        peaks = f"{_fmt(r.call('z_fwd_bwd').peak_mib, '.1f', 7)} {_fmt(r.call('logc2_fwd').peak_mib, '.1f', 7)}"
        line = " | ".join(cells) + f" | {peaks} | {_fmt(r.bpd, '.4f', 7)} " \
               f"{_fmt(r.bpd_diff_vs_exact, '+.4f', 7)} {_fmt(r.rel_weight_error_max, '.3f', 7)}"
        if classifier:
            line += f" {_fmt(r.error_rate * 100 if not math.isnan(r.error_rate) else NAN, '.2f', 6)}"
        line += f" | {r.beats_opt}" + (" *" if r.pareto and not r.is_baseline else "")
        lines.append(line)
    lines.append("")
    lines.append("/opt, /mat: speedup over cirkit optimize=True and over cirkit's materialised path "
                 "(optimize=False); >1 is faster. c²: batched log c²(x) forward. MiB: peak memory growth of "
                 "one Z f+b call and of one c² call.")
    gflops = result.environment.get("gemm_gflops")
    rate = f" ({gflops:.0f} GFLOP/s)" if gflops else ""
    lines.append(f"eff: the call's sum-layer multiply-adds, as the layers define them, at this machine's "
                 f"matrix-product rate measured in this run{rate} / the measured time; done: the same for the "
                 "multiply-adds the call's matrix products actually ran (fewer where layers work on low-rank "
                 "blocks, so eff can pass 100 %).")
    lines.append("w.err: largest relative weight error of a swapped layer; Δbpd vs the exact model; "
                 "* on the Pareto front (c² speedup vs optimize=True, error).")
    if any(not r.is_density for r in result.rows):
        lines.append("flat rows: c̃² is not a square any more (it can go negative) and Z̃ does not normalise "
                     "it, so their bpd is not a likelihood; they are never on the Pareto front.")
    for note in dict.fromkeys(result.notes):
        lines.append("note: " + note)
    return "\n".join(lines)


def write_outputs(result, out_dir: Path, *, plots: bool = True) -> List[Path]:
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


def log_to_wandb(result, files: Sequence[Path], *, stream=None) -> bool:
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
                     config=jsonable(dict(config=result.config.to_dict(), environment=result.environment)))
    table = wandb.Table(columns=list(COLUMNS), data=[[jsonable(r.flat()[c]) for c in COLUMNS] for r in result.rows])
    images = {Path(p).stem: wandb.Image(str(p)) for p in files if str(p).endswith(".png")}
    run.log(dict(results=table, **images))
    run.finish()
    print(f"--wandb: logged {len(result.rows)} rows and {len(images)} plots (mode {os.environ['WANDB_MODE']})",
          file=stream)
    return True


# ----------------------------------------------------------------------------- bench train
def format_train_table(result) -> str:
    """The ``bench train`` table: per K and variant, speed, quality, memory."""
    from .train import REFERENCE

    head = (f"{'K':>4s} {'variant':18s} | {'s/epoch':>8s} {'×ref':>6s} | {'to ref bpd s':>12s} | "
            f"{'test bpd':>8s} {'Δ ref':>8s} | {'step MiB':>8s} {'×ref':>5s} | {'params':>8s} {'MACs/x':>9s} | "
            f"{'sample s':>8s}")
    lines = [head, "-" * len(head)]
    for r in result.rows:
        lines.append(f"{r.units:4d} {r.variant[:18]:18s} | {_fmt(r.seconds_per_epoch, '.3f', 8)} "
                     f"{_fmt(r.speedup_vs_reference, '.2f', 5)}x | {_fmt(r.seconds_to_reference, '.2f', 12)} | "
                     f"{_fmt(r.final_test_bpd, '.4f', 8)} {_fmt(r.final_bpd_diff_vs_reference, '+.4f', 8)} | "
                     f"{_fmt(r.peak_step_mib, '.1f', 8)} {_fmt(r.memory_vs_reference, '.2f', 5)} | "
                     f"{r.parameters:8d} {r.macs_per_sample:9d} | {_fmt(r.sample_seconds, '.1f', 8)}"
                     + (" *" if r.pareto else ""))
    lines.append("")
    lines.append(f"×ref: {REFERENCE}'s seconds per epoch / these (>1 faster); to ref bpd: training seconds until "
                 f"the test bpd first reaches {REFERENCE}'s final one; step MiB: peak memory growth of one "
                 "training step (×ref: relative to the reference, <1 less). params: trainable numbers of c and Z; "
                 "MACs/x: multiply-adds of c's sum layers per sample. * on the (s/epoch, test bpd) Pareto front.")
    lines += _best_within_lines(result.rows)
    for note in dict.fromkeys(result.notes):
        lines.append("note: " + note)
    return "\n".join(lines)


def _best_within_lines(rows) -> List[str]:
    """For the cost of every dense circuit (the ``exact`` rows): the best test bpd within it."""
    from .train import REFERENCE, best_within

    models = [r for r in rows if r.variant != REFERENCE]  # the reference is the same model as exact, in cirkit
    out = []
    for ref in (r for r in rows if r.variant == "exact"):
        for label, budget in (("s/epoch", dict(seconds=ref.seconds_per_epoch)),
                              ("parameters", dict(parameters=ref.parameters)),
                              ("MACs/x", dict(macs=ref.macs_per_sample))):
            best = best_within(models, **budget)
            if best is not None and best is not ref:
                out.append(f"within the {label} of the dense K={ref.units} circuit: {best.variant} K={best.units} "
                           f"({best.final_test_bpd:.4f} bpd against {ref.final_test_bpd:.4f})")
    return out


def write_train_outputs(result, out_dir: Path, *, plots: bool = True) -> List[Path]:
    """train.csv, train.json and (with matplotlib) train_curves.png and samples.png."""
    import json

    from .train import TRAIN_COLUMNS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "train.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TRAIN_COLUMNS)
        for r in result.rows:
            flat = r.flat()
            writer.writerow([_cell(flat[c]) for c in TRAIN_COLUMNS])
    files = [csv_path]
    if plots:
        try:
            from . import plots as P

            files.append(P.train_curves(result.rows, out_dir / "train_curves.png"))
            files.append(P.train_pareto(result.rows, out_dir / "pareto.png"))
            if result.samples:
                files.append(P.sample_grid(result.samples, result.image_shape, out_dir / "samples.png"))
        except ImportError as exc:
            print(f"plots skipped: {exc}", file=sys.stderr)
            result.notes.append(f"plots skipped: {exc}")
    json_path = out_dir / "train.json"
    blob = dict(environment=result.environment, config=result.config.to_dict(), notes=result.notes,
                rows=[dataclasses_asdict(r) for r in result.rows],
                samples={k: v.tolist() for k, v in result.samples.items()},
                files=[p.name for p in files] + [json_path.name])
    with open(json_path, "w") as fh:
        json.dump(jsonable(blob), fh, indent=2)
    files.append(json_path)
    return files


def read_train_rows(path) -> list:
    """The rows of a ``bench train`` run: ``path`` is its ``train.json`` or the folder holding it."""
    import json

    from .config import BenchError
    from .train import TrainRow

    path = Path(path)
    if path.is_dir():
        path = path / "train.json"
    try:
        with open(path) as fh:
            rows = json.load(fh)["rows"]
        return [TrainRow(**row) for row in rows]
    except FileNotFoundError:
        raise BenchError(f"nothing at {path}: give a 'bench train' output folder or its train.json "
                         f"('structlayers bench train --out DIR' writes one)", "from") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{path} is not a bench train result ({exc})", "from") from None


def dataclasses_asdict(row) -> dict:
    import dataclasses

    return dataclasses.asdict(row)
