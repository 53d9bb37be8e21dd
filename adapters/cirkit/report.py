"""Old home of the ``structlayers bench`` sweep; re-exports :mod:`adapters.cirkit.bench` for one release."""

from .bench.analysis import beats_label, mark_pareto, pareto_front, pareto_points
from .bench.config import CIRCUITS, STRUCTURES, BenchConfig, BenchError, max_rank, ranks_for, validate
from .bench.outputs import format_table, log_to_wandb, write_csv, write_json, write_outputs
from .bench.schema import BASELINES, CALLS as MEASUREMENTS, Row
from .bench.sweep import Prepared, SweepResult, baseline_macs, prepare, report_summary, run_sweep, score_nll

__all__ = ["beats_label", "mark_pareto", "pareto_front", "pareto_points", "CIRCUITS", "STRUCTURES",
           "BenchConfig", "BenchError", "max_rank", "ranks_for", "validate", "format_table", "log_to_wandb",
           "write_csv", "write_json", "write_outputs", "BASELINES", "MEASUREMENTS", "Row", "Prepared",
           "SweepResult", "baseline_macs", "prepare", "report_summary", "run_sweep", "score_nll"]
