"""What the sweep concludes from its rows: Pareto fronts and which calls beat cirkit."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

from .schema import BASELINES, CALLS, NAN, Row

__all__ = ["pareto_front", "pareto_points", "mark_pareto", "beats_label"]


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


def pareto_points(group: Sequence[Row]) -> List[Tuple[float, float]]:
    """(log c²(x) speedup vs optimize=True, error) per row; NaN for rows not eligible for the
    front (flat approximations, whose bpd is not a likelihood)."""
    return [(r.call("logc2_fwd").speedup_vs["opt"], r.tradeoff_error) if r.is_density else (NAN, NAN)
            for r in group]


def mark_pareto(rows: Sequence[Row]) -> None:
    """``pareto``: on the (log c²(x) speedup vs optimize=True, error) front of its K,
    among the rows that are densities."""
    for k in sorted({r.units for r in rows}):
        group = [r for r in rows if r.units == k]
        front = set(pareto_front(pareto_points(group)))
        for i, r in enumerate(group):
            r.pareto = i in front


def beats_label(row: Row) -> str:
    """'yes' / 'no' / 'only <calls>': which timed calls beat cirkit optimize=True;
    'no (beats materialised only)' when it is faster than the materialised path alone."""
    if row.variant in BASELINES.values():
        return "-"
    wins = [label for m, label in CALLS if row.call(m).speedup_vs["opt"] > 1.0]
    mat_only = [label for m, label in CALLS
                if row.call(m).speedup_vs["materialised"] > 1.0 >= row.call(m).speedup_vs["opt"]]
    if len(wins) == len(CALLS):
        return "yes"
    if not wins:
        return "no (beats materialised only)" if mat_only else "no"
    return "only " + ", ".join(wins)
