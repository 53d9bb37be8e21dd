"""Old home of :mod:`adapters.cirkit.bench.plots`; re-exports it for one release."""

from .bench.plots import PLOTS, efficiency_heatmap, error_vs_rank, make_plots, memory, speedup_vs_rank, tradeoff

__all__ = ["PLOTS", "make_plots", "speedup_vs_rank", "error_vs_rank", "tradeoff", "efficiency_heatmap", "memory"]
