"""The adapter's public names, and the old module paths kept for one release."""

from __future__ import annotations

import importlib

import adapters.cirkit as adapter

#: The names of the previous release: they must all stay (additions are fine).
PREVIOUS = {
    "swap_kronecker_sum_layers", "rank_policy", "square_policy", "kronecker_sum_layers", "LayerInfo",
    "SwapReport", "use_structured_layers", "kronecker_sum_rule", "TorchKroneckerSumLayer",
    "TorchStructuredSumLayer", "kronecker_factors", "semiring_linear", "log_likelihood",
    "evaluate_linear_space", "log_value", "bits_per_dimension", "unclamped", "ExactLSESumSemiring",
    "ExactComplexLSESumSemiring",
}
ADDED = {"accelerate", "cirkit_evaluation", "AcceleratedCircuit", "CircuitDensity", "compile_density", "nll_to_bpd"}

OLD_PATHS = {
    "adapters.cirkit.models": ["CircuitModel", "CompiledCircuitModel", "DataSplits", "digits_squared_circuit",
                               "digits_classifier_circuit", "one_sum_circuit", "deep_cp_circuit", "digits_data",
                               "load_mnist", "train_squared_circuit", "train_classifier_circuit", "evaluate_nll",
                               "evaluate_accuracy", "trained_digits_model", "default_cache_dir", "cache_key",
                               "package_versions", "squared_weight_entries"],
    "adapters.cirkit.variants": ["circuit_variants", "Variant", "EXACT", "CIRKIT_OPTIMIZED", "default_ranks"],
    "adapters.cirkit.report": ["run_sweep", "BenchConfig", "pareto_front", "write_outputs", "format_table"],
    "adapters.cirkit.plots": ["make_plots", "PLOTS"],
    "adapters.cirkit.cli": ["main"],
}


def test_the_public_names():
    assert set(adapter.__all__) == PREVIOUS | ADDED
    for name in adapter.__all__:
        assert getattr(adapter, name) is not None, name


def test_old_module_paths_still_import():
    for module, names in OLD_PATHS.items():
        m = importlib.import_module(module)
        for name in names:
            assert hasattr(m, name), (module, name)
    from adapters.cirkit import models
    from adapters.cirkit.bench import circuits

    assert models.CompiledCircuitModel is circuits.CompiledCircuitModel  # one class, two paths


def test_every_private_cirkit_attribute_is_read_in_one_module():
    """Outside adapters/cirkit/internals.py no module touches cirkit's private names."""
    import pathlib
    import re

    root = pathlib.Path(adapter.__file__).parent
    private = re.compile(r"\._(nodes|in_nodes|out_nodes|outputs|address_book|fold_idx|einsum|num_contract_units|"
                         r"num_batch_units|compiler|ptensor|entry_modules|layer_fn)\b")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name != "internals.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, offenders
