"""PNG plots of a ``structlayers bench`` sweep (:class:`~adapters.cirkit.bench.schema.Row` objects).

matplotlib is imported inside the functions and used through ``Figure`` objects with
the Agg canvas, never through ``pyplot``: no global backend state is touched and
nothing needs a display. Install it with the ``bench`` extra.

* ``speedup_vs_rank.png``: speedup of every approximation over cirkit's
  ``optimize=True`` path (solid) and its materialised path (dashed), per timed call
  (columns) and ``K`` (rows); the exact ``kronecker`` layers as a dotted level.
* ``error_vs_rank.png``: relative weight error (largest over the swapped layers) and
  test bpd difference against the exact model.
* ``tradeoff.png``: error against ``log c²(x)`` speedup over ``optimize=True``, one
  panel per ``K``, the Pareto front drawn and ringed.
* ``efficiency_heatmap.png``: GEMM efficiency of Z forward+backward and of ``log c²(x)``
  (the sum layers' multiply-adds at the machine's matrix-product rate, measured in the
  same run, / the measured time), sizes × variants.
* ``memory.png``: peak-memory reduction over ``optimize=True`` (peak of the baseline /
  peak of the variant) for each timed call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .analysis import pareto_front, pareto_points
from .schema import CALLS, Row
from .variants import EXACT

Getter = Callable[[Row], Any]
MARKERS = "osD^v<>ph*"


def _figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.2):
    import matplotlib

    matplotlib.rcParams.setdefault("figure.dpi", 100)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=100)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sizes(rows: Sequence[Row]) -> List[int]:
    return sorted({int(r.units) for r in rows})


def _approx_groups(rows: Sequence[Row]) -> List[Tuple[str, str]]:
    """(kind, structure) of the ranked approximations, in order of appearance."""
    seen: Dict[Tuple[str, str], None] = {}
    for r in rows:
        if not r.is_baseline and isinstance(r.rank, int):
            seen[(str(r.kind), str(r.structure))] = None
    return list(seen)


def _series(rows: Sequence[Row], k: int, group: Tuple[str, str], get: Getter) -> Tuple[List[int], List[float]]:
    pts = sorted((r.rank, get(r)) for r in rows
                 if r.units == k and (r.kind, r.structure) == group
                 and isinstance(r.rank, int) and _finite(get(r)))
    return [p[0] for p in pts], [p[1] for p in pts]


def _colors(n: int) -> List[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(max(n, 1))]


def _exact(rows: Sequence[Row], k: int) -> Optional[Row]:
    """The exact layers in the same evaluation as the approximations (``kronecker``), else any exact row."""
    exact = [r for r in rows if r.units == k and not r.is_baseline and r.rank is None]
    return next((r for r in exact if r.variant == EXACT), exact[0] if exact else None)


def _rank_ticks(ax, rows: Sequence[Row], k: int | None = None) -> None:
    ranks = sorted({r.rank for r in rows if isinstance(r.rank, int) and (k is None or r.units == k)})
    if ranks:
        ax.set_xticks(ranks)


def speedup_vs_rank(rows: Sequence[Row], path: Path) -> Path:
    sizes, groups = _sizes(rows), _approx_groups(rows)
    colors = _colors(len(groups))
    fig, axes = _figure(len(sizes), len(CALLS))
    for i, k in enumerate(sizes):
        exact = _exact(rows, k)
        for j, (m, label) in enumerate(CALLS):
            ax = axes[i][j]
            for g, color in zip(groups, colors):
                for base, style, tag in (("opt", "-", "vs opt=True"), ("materialised", "--", "vs materialised")):
                    x, y = _series(rows, k, g, lambda r, m=m, base=base: r.call(m).speedup_vs[base])
                    if x:
                        ax.plot(x, y, style, marker="o", color=color, label=f"{g[0]} {g[1]} {tag}")
            if exact is not None and _finite(exact.call(m).speedup_vs["opt"]):
                ax.axhline(exact.call(m).speedup_vs["opt"], color="grey", linestyle=":",
                           label="kronecker (exact) vs opt=True")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            _rank_ticks(ax, rows, k)
            ax.set_title(f"K={k}: {label}")
            ax.set_xlabel("rank (square: rank(Ã), flat: rank of the map)")
            ax.set_ylabel("speedup (>1: faster)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle("Speedup over cirkit optimize=True (solid) and materialised (dashed)")
    return _save(fig, path)


def error_vs_rank(rows: Sequence[Row], path: Path) -> Path:
    sizes, groups = _sizes(rows), _approx_groups(rows)
    colors = _colors(len(groups))
    fig, axes = _figure(1, 2, width=5.5)
    for ax, key, title in ((axes[0][0], "rel_weight_error_max", "relative weight error (largest layer)"),
                           (axes[0][1], "bpd_diff_vs_exact", "test bpd − exact bpd")):
        for s, k in enumerate(sizes):
            for g, color in zip(groups, colors):
                x, y = _series(rows, k, g, lambda r, key=key: getattr(r, key))
                if x:
                    ax.plot(x, y, "-", marker=MARKERS[s % len(MARKERS)], color=color, label=f"{g[0]} {g[1]}, K={k}")
        ax.set_title(title)
        ax.set_xlabel("rank")
        _rank_ticks(ax, rows)
        if key == "bpd_diff_vs_exact":
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def tradeoff(rows: Sequence[Row], path: Path) -> Path:
    sizes = _sizes(rows)
    fig, axes = _figure(1, len(sizes), width=5.0, height=4.0)
    for ax, k in zip(axes[0], sizes):
        group = [r for r in rows if r.units == k]
        points = [(r.call("logc2_fwd").speedup_vs["opt"], r.tradeoff_error) for r in group]
        eligible = pareto_points(group)
        front = pareto_front(eligible)
        use_bpd = any(_finite(r.bpd_diff_vs_exact) for r in group)
        shown = set()
        for r, (x, y) in zip(group, points):
            if not (_finite(x) and _finite(y)):
                continue
            ranked = isinstance(r.rank, int)
            tag = ("approximation" if r.is_density else "flat (not a density)") if ranked \
                else "exact (cirkit's paths, kronecker)"
            color = {"approximation": "tab:blue", "flat (not a density)": "tab:orange"}.get(tag, "tab:gray")
            ax.scatter([x], [y], s=25, color=color, label=None if tag in shown else tag)
            shown.add(tag)
            if ranked:
                ax.annotate(str(r.variant), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if front:
            fx = [points[i][0] for i in front]
            fy = [points[i][1] for i in front]
            ax.step(fx, fy, where="post", color="tab:red", label="Pareto front")
            ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="tab:red")
        ax.axvline(1.0, color="black", linewidth=0.8, label="cirkit optimize=True")
        ax.set_xscale("log")
        ax.set_xlabel("log c²(x) speedup over cirkit optimize=True")
        ax.set_ylabel("test bpd − exact bpd" if use_bpd else "relative weight error")
        ax.set_title(f"K={k}: accuracy vs speed")
        ax.legend(fontsize="x-small", loc="best")
    return _save(fig, path)


def efficiency_heatmap(rows: Sequence[Row], path: Path) -> Path:
    """GEMM efficiency (the sum layers' multiply-adds at the machine's matrix-product rate /
    the measured time) of Z f+b and of log c²(x): sizes × variants."""
    import numpy as np

    sizes = _sizes(rows)
    variants = list(dict.fromkeys(r.variant for r in rows))
    panels = (("z_fwd_bwd", "Z fwd+bwd"), ("logc2_fwd", "log c²(x) fwd"))
    fig, axes = _figure(len(panels), 1, width=max(6.0, 0.75 * len(variants) + 2.0),
                        height=max(2.4, 0.55 * len(sizes) + 1.8))
    for ax, (m, label) in zip([a[0] for a in axes], panels):
        grid = np.full((len(sizes), len(variants)), np.nan)
        for r in rows:
            value = r.call(m).gemm_efficiency
            if _finite(value):
                grid[sizes.index(r.units), variants.index(r.variant)] = value
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", origin="lower",
                          vmin=0.0, vmax=max(1.0, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0))
        for (i, j), value in np.ndenumerate(grid):
            if math.isfinite(value):
                ax.text(j, i, f"{100 * value:.0f}%", ha="center", va="center", color="white", fontsize=7)
        ax.set_xticks(range(len(variants)), variants, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(len(sizes)), [f"K={k}" for k in sizes])
        ax.set_title(f"{label}: multiply-adds at the measured GEMM rate / measured time")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def memory(rows: Sequence[Row], path: Path) -> Path:
    sizes = _sizes(rows)
    most = max(sum(1 for r in rows if r.units == k) for k in sizes)
    fig, axes = _figure(len(sizes), 1, width=max(8.0, 0.6 * most), height=3.6)
    width = 0.8 / len(CALLS)
    for ax, k in zip([a[0] for a in axes], sizes):
        group = [r for r in rows if r.units == k]
        for j, (m, label) in enumerate(CALLS):
            values = [r.call(m).memory_reduction_vs["opt"] for r in group]
            xs = [i + (j - 1) * width for i in range(len(group))]
            ax.bar(xs, [v if _finite(v) else 0.0 for v in values], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(group)), [str(r.variant) for r in group], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("peak(opt=True) / peak")
        ax.set_title(f"K={k}: peak memory of cirkit optimize=True / peak of the variant (>1: less memory)")
        ax.legend(fontsize="small")
    return _save(fig, path)


PLOTS = (
    ("speedup_vs_rank.png", speedup_vs_rank),
    ("error_vs_rank.png", error_vs_rank),
    ("tradeoff.png", tradeoff),
    ("efficiency_heatmap.png", efficiency_heatmap),
    ("memory.png", memory),
)


def make_plots(rows: Sequence[Row], out_dir: Path) -> List[Path]:
    """Every plot of :data:`PLOTS` into ``out_dir``; returns the paths."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the benchmark plots need matplotlib: pip install 'structlayers[bench]' "
                          "(or pip install matplotlib)") from exc
    del matplotlib  # the plots import what they use; this only checks it is installed
    out_dir = Path(out_dir)
    return [fn(rows, out_dir / name) for name, fn in PLOTS]


# ----------------------------------------------------------------------------- bench train
def train_curves(rows: Sequence[Any], path: Path) -> Path:
    """Test bpd against training wall-clock seconds, one line per variant, one panel per K."""
    sizes = sorted({r.units for r in rows})
    variants = list(dict.fromkeys(r.variant for r in rows))
    colors = dict(zip(variants, _colors(len(variants))))
    fig, axes = _figure(1, len(sizes), width=4.6, height=3.6)
    for ax, k in zip(axes[0], sizes):
        for r in (r for r in rows if r.units == k):
            elapsed, t = [0.0], 0.0
            for s in r.epoch_seconds:
                t += s
                elapsed.append(t)
            ax.plot(elapsed, [r.initial_test_bpd] + list(r.test_bpd), "-", marker="o", markersize=3,
                    color=colors[r.variant], label=f"{r.variant} ({r.seconds_per_epoch:.2f} s/epoch)")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("training wall-clock seconds")
        ax.set_ylabel("test bits per dimension")
        ax.set_title(f"K={k}")
        ax.legend(fontsize="x-small")
    fig.suptitle("Squared digits circuit: test bpd against training time")
    return _save(fig, path)


def train_pareto(rows: Sequence[Any], path: Path) -> Path:
    """Final test bpd against seconds per epoch for every (K, variant), the Pareto front
    (both minimised) across all of them drawn and ringed."""
    from .train import pareto_rows

    variants = list(dict.fromkeys(r.variant for r in rows))
    colors = dict(zip(variants, _colors(len(variants))))
    fig, axes = _figure(1, 1, width=6.0, height=4.5)
    ax = axes[0][0]
    for name in variants:
        pts = [r for r in rows if r.variant == name]
        ax.scatter([r.seconds_per_epoch for r in pts], [r.final_test_bpd for r in pts], color=colors[name], label=name)
        for r in pts:
            ax.annotate(f"K={r.units}", (r.seconds_per_epoch, r.final_test_bpd), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    front = sorted(pareto_rows(list(rows)), key=lambda i: rows[i].seconds_per_epoch)
    if front:
        fx = [rows[i].seconds_per_epoch for i in front]
        fy = [rows[i].final_test_bpd for i in front]
        ax.step(fx, fy, where="post", color="tab:red", label="Pareto front")
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="tab:red")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per epoch")
    ax.set_ylabel("final test bits per dimension")
    ax.set_title("Which circuit for a time budget: test bpd against training cost")
    ax.legend(fontsize="x-small")
    return _save(fig, path)


def sample_grid(samples: Dict[str, Any], image_shape: Tuple[int, int], path: Path, columns: int = 16) -> Path:
    """Exact samples of every trained variant, as images: one block of rows per variant."""
    import numpy as np

    names = list(samples)
    h, w = image_shape
    blocks = []
    for name in names:
        x = np.asarray(samples[name], dtype=float)
        n = x.shape[0]
        rows_needed = -(-n // columns)
        canvas = np.full((rows_needed * (h + 1), columns * (w + 1)), np.nan)
        for i in range(n):
            r, c = divmod(i, columns)
            canvas[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = x[i].reshape(h, w)
        blocks.append((name, canvas))
    fig, axes = _figure(len(blocks), 1, width=0.45 * columns, height=0.45 * max(b.shape[0] for _, b in blocks) / (h + 1) + 0.6)
    for ax, (name, canvas) in zip([a[0] for a in axes], blocks):
        ax.imshow(np.ma.masked_invalid(canvas), cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{name}: {np.isfinite(canvas).sum() // (h * w)} exact samples", fontsize="small")
        ax.set_axis_off()
    return _save(fig, path)
