"""The typed rows of a ``structlayers bench`` sweep, and their CSV/JSON column names.

One :class:`Row` per number of units ``K`` and variant. The sweep fills it, the
outputs flatten it (:meth:`Row.flat`, the CSV columns) and the plots read its fields.
Column names of the flat form, for every timed call ``<call>`` of :data:`CALLS` and
every baseline ``<base>`` of :data:`BASELINES`:

========================================  =================================================
``<call>_ms``                             median milliseconds per call
``<call>_speedup_vs_<base>``              baseline time / time (> 1: faster)
``<call>_beats_<base>``                   speed-up above 1
``<call>_efficiency_vs_<base>``           measured speed-up / theoretical speed-up
``<call>_peak_mib``                       peak resident-memory growth of one call, MiB
``<call>_memory_reduction_vs_<base>``     baseline peak / peak
``<call>_macs``                           multiply-adds of the call's sum layers (the
                                          backward counted as twice the forward)
``<call>_gemm_efficiency``                time those multiply-adds take at the machine's
                                          matrix-product rate (measured in the same run)
                                          / the measured time
``<call>_macs_done``                      multiply-adds of the matrix products the call
                                          actually ran (torch's flop counter; fewer where
                                          the evaluation works on low-rank blocks)
``<call>_gemm_efficiency_done``           the same ratio for those multiply-adds
``theory_speedup_vs_<base>``              multiply-adds per sample of the Kronecker sum
                                          layers, baseline / variant
========================================  =================================================

plus the scalar fields of :class:`Row` under their own names. NaN marks what was
not measured or does not apply.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

NAN = float("nan")

#: (column prefix, label) of the timed calls.
CALLS = (("z_fwd_bwd", "Z fwd+bwd"), ("z_fwd", "Z fwd"), ("logc2_fwd", "log c²(x) fwd"))
CALL_NAMES = tuple(name for name, _ in CALLS)
#: Baseline keys and the variant names they stand for.
BASELINES = {"materialised": "cirkit optimize=False", "opt": "cirkit optimize=True"}


def ratio(num: Optional[float], den: Optional[float]) -> float:
    """``num / den`` for two positive finite numbers, else NaN."""
    if num is None or den is None or not (num > 0 and den > 0) or math.isinf(num) or math.isinf(den):
        return NAN
    return num / den


def _per_baseline() -> Dict[str, float]:
    return {key: NAN for key in BASELINES}


@dataclass
class CallStats:
    """One timed call of one variant."""

    ms: float = NAN
    macs: float = NAN
    gemm_efficiency: float = NAN
    macs_done: float = NAN
    gemm_efficiency_done: float = NAN
    speedup_vs: Dict[str, float] = field(default_factory=_per_baseline)
    efficiency_vs: Dict[str, float] = field(default_factory=_per_baseline)
    peak_mib: float = NAN
    memory_reduction_vs: Dict[str, float] = field(default_factory=_per_baseline)

    def beats(self, baseline: str) -> bool:
        return bool(self.speedup_vs[baseline] > 1.0)


def _calls() -> Dict[str, CallStats]:
    return {name: CallStats() for name in CALL_NAMES}


@dataclass
class Row:
    """One variant at one ``K``: what it is, its timings, quality and structure."""

    circuit: str
    units: int
    variant: str
    kind: Optional[str] = None
    rank: Optional[int] = None
    structure: Optional[str] = None  # 'exact', 'square', 'flat'; None for cirkit's paths
    evaluation: str = "semiring"
    same_values: bool = True
    is_baseline: bool = False
    rank_fraction: float = NAN
    calls: Dict[str, CallStats] = field(default_factory=_calls)
    scored: bool = False
    test_nll: float = NAN
    bpd: float = NAN
    error_rate: float = NAN
    macs_per_sample: float = NAN
    sum_layer_params: float = NAN
    rel_weight_error_max: float = NAN
    rel_weight_error_mean: float = NAN
    theory_speedup_vs: Dict[str, float] = field(default_factory=_per_baseline)
    bpd_diff_vs_exact: float = NAN
    beats_opt: str = ""
    pareto: bool = False
    layers: List[Dict[str, Any]] = field(default_factory=list)

    def call(self, name: str) -> CallStats:
        return self.calls[name]

    @property
    def is_density(self) -> bool:
        """False for flat approximations: ``c̃²`` is no longer a square, can go negative, and
        ``Z̃`` does not normalise it, so its bpd is not a likelihood (it can even beat exact)."""
        return self.structure != "flat"

    @property
    def tradeoff_error(self) -> float:
        """The error axis of the trade-off: bpd difference vs exact, else the weight error."""
        return self.bpd_diff_vs_exact if not math.isnan(self.bpd_diff_vs_exact) else self.rel_weight_error_max

    def flat(self) -> Dict[str, Any]:
        """The row as one flat mapping of scalar columns (the CSV), ``layers`` left out."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("calls", "theory_speedup_vs", "layers"):
                continue
            out[f.name] = getattr(self, f.name)
        for name, stats in self.calls.items():
            out[f"{name}_ms"] = stats.ms
            out[f"{name}_macs"] = stats.macs
            out[f"{name}_gemm_efficiency"] = stats.gemm_efficiency
            out[f"{name}_macs_done"] = stats.macs_done
            out[f"{name}_gemm_efficiency_done"] = stats.gemm_efficiency_done
            for key in BASELINES:
                out[f"{name}_speedup_vs_{key}"] = stats.speedup_vs[key]
                out[f"{name}_beats_{key}"] = stats.beats(key)
                out[f"{name}_efficiency_vs_{key}"] = stats.efficiency_vs[key]
            out[f"{name}_peak_mib"] = stats.peak_mib
            for key in BASELINES:
                out[f"{name}_memory_reduction_vs_{key}"] = stats.memory_reduction_vs[key]
        for key in BASELINES:
            out[f"theory_speedup_vs_{key}"] = self.theory_speedup_vs[key]
        return out

    def to_json(self) -> Dict[str, Any]:
        """:meth:`flat` plus the per-layer swap rows."""
        return dict(self.flat(), layers=self.layers)

    @classmethod
    def from_flat(cls, flat: Dict[str, Any]) -> "Row":
        """The row back from :meth:`flat` / :meth:`to_json` (a results.json row; None is NaN).

        Derived columns (``*_beats_*``) are recomputed from the speed-ups, not read.
        """

        def number(value: Any) -> float:
            if isinstance(value, int) and not isinstance(value, bool):
                return value  # counts (multiply-adds, parameters) stay integers
            return NAN if value is None or value == "" else float(value)

        simple = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("calls", "theory_speedup_vs")}
        values: Dict[str, Any] = {}
        for name, f in simple.items():
            if name not in flat:
                continue
            value = flat[name]
            if f.type == "float":
                value = number(value)
            values[name] = value
        row = cls(**values)
        for name, stats in row.calls.items():
            stats.ms = number(flat.get(f"{name}_ms"))
            stats.macs = number(flat.get(f"{name}_macs"))
            stats.gemm_efficiency = number(flat.get(f"{name}_gemm_efficiency"))
            stats.macs_done = number(flat.get(f"{name}_macs_done"))
            stats.gemm_efficiency_done = number(flat.get(f"{name}_gemm_efficiency_done"))
            stats.peak_mib = number(flat.get(f"{name}_peak_mib"))
            for key in BASELINES:
                stats.speedup_vs[key] = number(flat.get(f"{name}_speedup_vs_{key}"))
                stats.efficiency_vs[key] = number(flat.get(f"{name}_efficiency_vs_{key}"))
                stats.memory_reduction_vs[key] = number(flat.get(f"{name}_memory_reduction_vs_{key}"))
        for key in BASELINES:
            row.theory_speedup_vs[key] = number(flat.get(f"theory_speedup_vs_{key}"))
        return row


#: The CSV columns, in order.
COLUMNS = tuple(Row(circuit="", units=0, variant="").flat())
