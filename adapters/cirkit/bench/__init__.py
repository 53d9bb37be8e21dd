"""The benchmark harness of the cirkit adapter: circuits, data, training, sweeps, plots.

Not the adapter itself (that is :mod:`adapters.cirkit`): this package builds the
circuits the project measures, trains them, compares variants and writes reports.

============  ==================================================================
module        holds
============  ==================================================================
circuits      symbolic builders (:class:`CircuitModel`) and the compiled model
data          digits and MNIST as integer tensors (never downloaded), pooling
training      the training loop, test NLL, accuracy, the cached digits model
cache         the one on-disk cache of trained models
progress      the one progress display
environment   versions, git commit, machine
variants      the compiled models a benchmark compares
config        :class:`BenchConfig` and its validation
schema        the typed result rows and their column names
analysis      Pareto fronts, beats-labels
sweep         the ``structlayers bench`` sweep
outputs       CSV, JSON, console table, W&B
plots         PNG plots (matplotlib, imported when plotting)
cli           the ``bench`` subcommand of the ``structlayers`` console script
============  ==================================================================
"""
