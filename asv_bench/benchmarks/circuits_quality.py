"""Quality of the swapped circuits: test bpd, its increase, weight error, classifier error.

Every ``track_`` here is lower-is-better, as asv assumes (errors, never accuracies).
The grid is ``_circuits.VARIANTS``: the names ``circuit_variants`` returns for the
fixed configuration (lowrank / nystrom, square / flat, ranks 2 and 4).

* ``SquaredDigitsDensity``: ``digits_squared_circuit(K=8)`` trained for 5 epochs by
  ``trained_digits_model`` (cached on disk: ``$STRUCTLAYERS_CACHE``, default
  ``~/.cache/structlayers``), each variant built from it by ``circuit_variants``;
  ``track_test_bpd`` is the test NLL in bits per dimension (``-log p(x) / (64 ln 2)``
  on the held-out split of the training run), ``track_bpd_increase`` that minus the
  exact ``kronecker`` variant's. A flat approximation's ``c̃²`` can go negative, so
  its "bpd" is that of ``|c̃²(x)| / Z̃``, not of a density.
* ``SquaredDigitsWeights``: ``track_relative_weight_error``, the largest
  ``‖A ⊗ B − layer‖_F / ‖A ⊗ B‖_F`` over the swapped layers of the density circuit
  (from the ``SwapReport``); 0 for the exact swap, n/a for cirkit's own layers.
* ``SquaredDigitsClassifier``: ``digits_classifier_circuit(K=8, squared=True)``
  (ten squared class-conditional circuits; a monotone one has no Kronecker layer to
  swap) trained for 2 epochs with ``train_classifier_circuit`` (generative; its
  parameters cached on disk beside ``trained_digits_model``'s, under ``asv/``);
  ``track_error_rate`` is ``1 - accuracy`` of ``argmax_y log p(x | y) + log p(y)`` on
  the test split, for the original (``cirkit optimize=False``: the trained circuit itself,
  compiled that way; ``circuit_variants`` is called with ``materialised=False`` to spare a
  second compile of the same thing), the exact swaps and the square approximations (built
  with ``structures=('square',)``: a flat approximation is no density, so no Bayes
  classifier; those show as n/a).

Variants that keep a seeded initialisation instead of the trained values
(``Variant.same_values`` false for cirkit's own paths: ``optimize=True`` fuses the
layers, so the trained ``state_dict`` does not load) are n/a.

One ``setup_cache`` (shared by the three classes) trains at most once per ``asv run``
(and not at all once the on-disk cache holds the models), builds the variants and
computes every number; ``setup`` and the ``track_`` methods only look them up.
"""

from __future__ import annotations

from typing import Dict

import torch

from . import _circuits as circuits

SMOKE = circuits.SMOKE
#: Units and training epochs of the density model (``trained_digits_model(K, epochs)``).
DENSITY_UNITS, DENSITY_EPOCHS = (4, 1) if SMOKE else (8, 5)
#: Units, epochs, classes and image of the classifier (smoke: two classes, the central
#: 4x4 pixels of a few digits).
CLASSIFIER_UNITS, CLASSIFIER_EPOCHS = (4, 1) if SMOKE else (8, 2)
CLASSIFIER_CLASSES = 2 if SMOKE else 10
CLASSIFIER_IMAGE = (4, 4) if SMOKE else (8, 8)
#: Structures of the classifier's approximations (flat ones show as n/a).
CLASSIFIER_STRUCTURES = ("square",)
SMOKE_DIGITS = 120  # training and test digits per split in smoke mode
SEED = 0
#: The exact variant the bpd increase is measured against.
EXACT_NAME = "kronecker"
#: cirkit's materialised path: the circuit as compiled and trained (the classifier's original).
ORIGINAL_NAME = "cirkit optimize=False"


def _usable(variant) -> str | None:
    """None if ``variant`` carries the trained values (or an approximation of them), else why not."""
    if variant.same_values or not variant.is_baseline:
        return None
    return (f"{variant.name} keeps a seeded initialisation (the trained parameters do not fit its "
            "layout), so its quality says nothing")


def _bpd(nll: float, num_variables: int) -> float:
    """Bits per dimension through the adapter's one formula (present on every benchmarked commit)."""
    from adapters.cirkit.likelihood import bits_per_dimension

    return bits_per_dimension(torch.tensor([-nll], dtype=torch.float64), num_variables)


def _log_prior(labels: torch.Tensor):
    try:
        from adapters.cirkit.bench.training import class_log_prior
    except ImportError:  # a commit before the bench package: the same empirical prior, inline
        counts = torch.bincount(labels, minlength=CLASSIFIER_CLASSES).double()
        return torch.log(counts.clamp_min(1.0) / counts.sum())
    return class_log_prior(labels, CLASSIFIER_CLASSES)


def _density_tables(models) -> Dict[str, dict]:
    trained = models.trained_digits_model(DENSITY_UNITS, DENSITY_EPOCHS, seed=SEED)
    config = trained.config
    data = models.digits_data(seed=config["data_seed"], test_fraction=config["test_fraction"])
    x_test = data.x_test[:SMOKE_DIGITS] if SMOKE else data.x_test
    found = circuits.build_variants(getattr(trained.model, "spec", None) or trained.model.model, trained.model)
    bpd: Dict[str, object] = {}
    weights: Dict[str, object] = {}
    for name in circuits.VARIANTS:
        variant = found.get(name)
        if variant is None:
            bpd[name] = weights[name] = circuits.missing(name, found)
            continue
        reason = _usable(variant)
        bpd[name] = reason or _bpd(models.evaluate_nll(variant.model, x_test), variant.model.num_variables)
        if variant.report is None:
            weights[name] = f"{name} is cirkit's own circuit: nothing swapped, no SwapReport"
        else:
            weights[name] = max((row.relative_error for row in variant.report.rows), default=0.0)
    exact = bpd.get(EXACT_NAME)
    if isinstance(exact, float):
        increase = {name: value - exact if isinstance(value, float) else value for name, value in bpd.items()}
    else:
        increase = {name: f"no bpd of the exact variant {EXACT_NAME!r}: {exact}" for name in bpd}
    return {"bpd": bpd, "bpd_increase": increase, "weight_error": weights}


def _classifier_data(models):
    data = models.digits_data(seed=SEED)
    if not SMOKE:
        return data

    def part(x, y):  # the first classes, the central 4x4 pixels, a few digits
        keep = y < CLASSIFIER_CLASSES
        x = x[keep][:SMOKE_DIGITS].view(-1, 8, 8)[:, 2:6, 2:6].reshape(-1, 16)
        return x, y[keep][:SMOKE_DIGITS]

    return type(data)(*part(data.x_train, data.y_train), *part(data.x_test, data.y_test))


def _trained_classifier(models, data):
    """``(spec, model)``: the classifier, its parameters from the on-disk cache or trained now."""
    config = dict(builder="asv digits_classifier_circuit", num_units=CLASSIFIER_UNITS, squared=True,
                  num_classes=CLASSIFIER_CLASSES, epochs=CLASSIFIER_EPOCHS, seed=SEED, objective="generative",
                  image_shape=list(CLASSIFIER_IMAGE), data_seed=SEED, smoke_digits=SMOKE_DIGITS if SMOKE else None)
    spec = models.digits_classifier_circuit(CLASSIFIER_UNITS, squared=True, num_classes=CLASSIFIER_CLASSES,
                                            image_shape=CLASSIFIER_IMAGE)

    def train(model):
        models.train_classifier_circuit(model, data, epochs=CLASSIFIER_EPOCHS, seed=SEED, progress=False)

    try:
        from adapters.cirkit.bench.cache import cached_training
    except ImportError:  # a commit before the one model cache: train in this run
        model = spec.compile(seed=SEED)
        train(model)
        return spec, model
    return spec, cached_training("asv-digits-classifier", config, lambda: spec.compile(seed=SEED), train).model


def _classifier_table(models) -> Dict[str, object]:
    data = _classifier_data(models)
    spec, model = _trained_classifier(models, data)
    log_prior = _log_prior(data.y_train)
    # Square structures only: a flat approximation's |c̃²(x)|/Z̃ is not a density, so a Bayes
    # classifier built on it is not one either (and each variant deep-copies ten circuits).
    # materialised=False: cirkit's optimize=False path would be a second compile of `model`
    # (the ten circuits compile in ~10 s) with the same values: `model` itself is evaluated.
    found = circuits.build_variants(spec, model, structures=CLASSIFIER_STRUCTURES, materialised=False)

    def error_rate(m) -> float:
        return 1.0 - models.evaluate_accuracy(m, data.x_test, data.y_test, log_prior)

    errors: Dict[str, object] = {}
    for name in circuits.VARIANTS:
        variant = found.get(name)
        if name == ORIGINAL_NAME:
            errors[name] = error_rate(model)
        elif variant is not None:
            errors[name] = _usable(variant) or error_rate(variant.model)
        elif " flat " in name:
            errors[name] = (f"{name}: a flat approximation is no density (|c̃²|/Z̃), so no Bayes "
                            f"classifier; the classifier's variants are built with structures="
                            f"{CLASSIFIER_STRUCTURES}")
        else:
            errors[name] = circuits.missing(name, found, structures=CLASSIFIER_STRUCTURES)
    return errors


def _quality_cache() -> dict:
    try:
        models, _ = circuits.adapter()
    except NotImplementedError as exc:
        return {"problem": str(exc)}
    needed = ("digits_data", "trained_digits_model", "digits_classifier_circuit", "train_classifier_circuit",
              "evaluate_nll", "evaluate_accuracy", "default_cache_dir", "cache_key")
    absent = [name for name in needed if not hasattr(models, name)]
    if absent:
        return {"problem": f"adapters.cirkit.models lacks {', '.join(absent)} on this commit"}
    with circuits.one_thread():  # nothing here is timed; see _circuits.one_thread
        tables = _density_tables(models)
        tables["error_rate"] = _classifier_table(models)
    return {"problem": None, **tables}


class _QualityCase:
    params = [list(circuits.VARIANTS)]
    param_names = ("variant",)
    timeout = 600
    tables: tuple  # keys of the numbers in the cache; n/a if any is missing for the variant

    def setup_cache(self):
        return _quality_cache()

    setup_cache.timeout = 1800  # first run: trains both models

    def setup(self, cache, variant):
        if cache["problem"] is not None:
            raise NotImplementedError(cache["problem"])
        for table in self.tables:
            if isinstance(cache[table][variant], str):
                raise NotImplementedError(cache[table][variant])


class SquaredDigitsDensity(_QualityCase):
    """Test bpd of the trained squared digits circuit (K=8) and of every variant of it."""

    tables = ("bpd", "bpd_increase")
    unit = "bits/dim"

    def track_test_bpd(self, cache, variant):
        return cache["bpd"][variant]

    def track_bpd_increase(self, cache, variant):
        return cache["bpd_increase"][variant]


class SquaredDigitsWeights(_QualityCase):
    """Largest relative Frobenius error of a swapped layer's weight (density circuit, K=8)."""

    tables = ("weight_error",)
    unit = "relative error"

    def track_relative_weight_error(self, cache, variant):
        return cache["weight_error"][variant]


class SquaredDigitsClassifier(_QualityCase):
    """Test error rate (1 - accuracy) of the squared digits classifier (K=8) and its variants."""

    tables = ("error_rate",)
    unit = "error rate"

    def track_error_rate(self, cache, variant):
        return cache["error_rate"][variant]
