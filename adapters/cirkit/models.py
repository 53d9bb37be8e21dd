"""Old home of the benchmark circuits, data and training; kept for one release.

Everything moved to :mod:`adapters.cirkit.bench` (``circuits``, ``data``, ``training``,
``cache``, ``environment``); this module re-exports the old names, so the committed asv
history (today's suites run against older commits) and existing imports keep working.
"""

from .bench.cache import cache_key, default_cache_dir
from .bench.circuits import (
    EVALUATIONS,
    MAX_SQUARED_WEIGHT_ENTRIES,
    REGION_GRAPHS,
    SEMIRINGS,
    SQUARABLE_REGION_GRAPHS,
    SUM_PRODUCT_LAYERS,
    WEIGHT_ACTIVATIONS,
    CircuitModel,
    CompiledCircuitModel,
    deep_cp_circuit,
    digits_classifier_circuit,
    digits_squared_circuit,
    one_sum_circuit,
    squared_weight_entries,
)
from .bench.data import DIGITS_CATEGORIES, DIGITS_CLASSES, DIGITS_SHAPE, DataSplits, digits_data, load_mnist
from .bench.environment import package_versions
from .bench.training import (
    TrainedModel,
    TrainingHistory,
    evaluate_accuracy,
    evaluate_nll,
    train_classifier_circuit,
    train_squared_circuit,
    trained_digits_model,
)

__all__ = [
    "CircuitModel", "CompiledCircuitModel", "DataSplits", "TrainingHistory", "TrainedModel", "REGION_GRAPHS",
    "SQUARABLE_REGION_GRAPHS", "SUM_PRODUCT_LAYERS", "WEIGHT_ACTIVATIONS", "SEMIRINGS", "EVALUATIONS",
    "MAX_SQUARED_WEIGHT_ENTRIES", "DIGITS_SHAPE", "DIGITS_CATEGORIES", "DIGITS_CLASSES", "one_sum_circuit",
    "deep_cp_circuit", "digits_squared_circuit", "digits_classifier_circuit", "digits_data", "load_mnist",
    "evaluate_nll", "evaluate_accuracy", "train_squared_circuit", "train_classifier_circuit",
    "trained_digits_model", "default_cache_dir", "cache_key", "squared_weight_entries", "package_versions",
]
