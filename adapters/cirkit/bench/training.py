"""Training and scoring of the benchmark circuits: Adam on the exact NLL, test NLL, accuracy.

* :func:`train_squared_circuit`, :func:`train_classifier_circuit`: minimise the exact NLL
  (or a class cross-entropy) of a :class:`~adapters.cirkit.bench.circuits.CompiledCircuitModel`.
* :func:`evaluate_nll`, :func:`evaluate_accuracy`: scores without gradient.
* :func:`trained_digits_model`: the digits circuit trained once and kept in the cache
  (:mod:`adapters.cirkit.bench.cache`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
from torch import Tensor, nn

from structlayers._checks import check_choice

from ..likelihood import nll_to_bpd
from ..swap import swap_kronecker_sum_layers
from .cache import cached_training
from .circuits import CompiledCircuitModel, _check_positive, digits_squared_circuit
from .data import DataSplits, digits_data
from .progress import Progress

__all__ = ["TrainingHistory", "TrainedModel", "train_squared_circuit", "train_classifier_circuit",
           "evaluate_nll", "evaluate_accuracy", "class_log_prior", "trained_digits_model"]


@dataclass
class TrainingHistory:
    """Per-epoch record of a training run.

    ``train_nll[e]``: mean NLL (nats per example) over epoch ``e``'s mini-batches, taken
    while training. ``test_nll[e]``: mean NLL on the test set after epoch ``e`` (empty
    without test data). ``*_bpd = nll / (D · ln 2)`` (bits per dimension, D = 64 for
    digits). ``initial_test_nll``: before the first step. ``epoch_seconds`` /
    ``epoch_cpu_seconds``: wall / process CPU time of each epoch's training steps
    (evaluation excluded; CPU time counts all threads). ``test_accuracy``: classifier runs.
    """

    train_nll: list[float] = field(default_factory=list)
    test_nll: list[float] = field(default_factory=list)
    train_bpd: list[float] = field(default_factory=list)
    test_bpd: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_cpu_seconds: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    initial_test_nll: float | None = None
    num_variables: int = 0
    objective: str = "nll"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainingHistory":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _unpack(data: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """-> x_train, y_train, x_test, y_test from DataSplits / (x_train, x_test) / x_train."""
    if isinstance(data, Tensor):
        return data, None, None, None
    if all(hasattr(data, a) for a in ("x_train", "x_test")):
        return data.x_train, getattr(data, "y_train", None), data.x_test, getattr(data, "y_test", None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], None, data[1], None
    raise TypeError(
        "data must be a DataSplits, an (x_train, x_test) pair of tensors, or an x_train tensor"
    )


def _check_data(model: LikelihoodModel, x: Tensor, y: Tensor | None, name: str) -> None:
    if x.dim() != 2 or x.shape[1] != model.num_variables:
        raise ValueError(f"{name} must have shape (N, {model.num_variables}), got {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= model.num_categories):
        raise ValueError(
            f"{name} values must be in 0..{model.num_categories - 1}, "
            f"got {int(x.min())}..{int(x.max())}"
        )
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"labels for {name} must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def _select(ll: Tensor, y: Tensor | None, unlabelled: str = "error") -> Tensor:
    """Per-example log-likelihood (B,) from (B, O): the label's output, output 0 of a
    1-output model, or (``unlabelled='mean'``, no labels) the mean over the outputs."""
    if ll.shape[1] == 1:
        return ll[:, 0]
    if y is None:
        if unlabelled == "mean":
            return ll.mean(dim=1)
        raise ValueError(f"a model with {ll.shape[1]} outputs needs labels to pick the output")
    return ll.gather(1, y.view(-1, 1).long()).squeeze(1)


def class_log_prior(y: Tensor, num_classes: int) -> Tensor:
    """Empirical ``log p(y)`` of integer labels ``y`` (N,), (num_classes,) float64; a class
    without examples counts as one."""
    counts = torch.bincount(y.long(), minlength=num_classes).double()
    return torch.log(counts.clamp_min(1.0) / counts.sum())


def evaluate_nll(model: LikelihoodModel, x: Tensor, y: Tensor | None = None, batch_size: int = 512,
                 *, unlabelled: str = "error", signed: bool = False) -> float:
    """Mean ``-log p(x)`` in nats, no gradient (``2 Re log c(x) − log Z`` for squared models).

    Multi-output models: ``-log p(x | y)`` with labels ``y``; without labels
    ``unlabelled='mean'`` averages over the outputs (e.g. the K densities of a one-sum
    circuit), ``'error'`` raises. ``x`` is scored in batches of ``batch_size`` rows.
    ``signed``: score ``log|f(x)/Z|`` where the model is no density (flat approximations)
    instead of NaN.
    """
    check_choice(unlabelled, ("error", "mean"), "unlabelled")
    total, n = 0.0, 0
    was_training = model.training
    model.eval()  # log Z once for every batch
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].long()
            yb = None if y is None else y[i : i + batch_size]
            ll = model.log_likelihood(xb, signed=True)[0] if signed else model.log_likelihood(xb)  # log Z cached
            ll = _select(ll, yb, unlabelled)
            total += float(ll.double().sum())
            n += xb.shape[0]
    model.train(was_training)
    return -total / max(n, 1)


def evaluate_accuracy(model: CompiledCircuitModel, x: Tensor, y: Tensor, log_prior: Tensor | None = None) -> float:
    """Fraction of ``argmax_y log p(x | y) + log_prior`` equal to the label."""
    return float((model.predict(x.long(), log_prior) == y).double().mean())


class LikelihoodModel(Protocol):
    """What the training loop needs of a model: ``log_likelihood(x) -> (B, O)``, its
    parameters, ``num_outputs``, ``num_variables``, ``num_categories``, ``dtype``, and
    ``train()``/``eval()`` (a :class:`CompiledCircuitModel`, or a benchmark's baseline)."""

    num_outputs: int
    num_variables: int
    num_categories: int
    dtype: torch.dtype

    def log_likelihood(self, x: Tensor) -> Tensor: ...


def _fit(
    model: LikelihoodModel,
    data: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    weight_decay: float,
    loss_kind: str,
) -> TrainingHistory:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "log_likelihood", None)):
        raise TypeError("model must be a CompiledCircuitModel (see CircuitModel.compile) or another module "
                        "with log_likelihood(x)")
    _check_positive(epochs=epochs, batch_size=batch_size)
    x_tr, y_tr, x_te, y_te = _unpack(data)
    if model.num_outputs > 1 and (y_tr is None or (x_te is not None and y_te is None)):
        raise ValueError(f"a model with {model.num_outputs} outputs needs labelled data (DataSplits)")
    _check_data(model, x_tr, y_tr, "training data")
    if x_te is not None:
        _check_data(model, x_te, y_te, "test data")
    d = model.num_variables
    hist = TrainingHistory(num_variables=d, objective=loss_kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    log_prior = None
    if loss_kind == "cross-entropy" or model.num_outputs > 1:
        log_prior = class_log_prior(y_tr, model.num_outputs).to(model.dtype)
    if x_te is not None:
        hist.initial_test_nll = evaluate_nll(model, x_te, y_te)
    n = x_tr.shape[0]
    num_batches = (n + batch_size - 1) // batch_size
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        bar = Progress(num_batches, f"epoch {epoch + 1}/{epochs}", enabled=progress)
        total, t0, c0 = 0.0, time.perf_counter(), time.process_time()
        for b in range(num_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb = x_tr[idx].long()
            yb = None if y_tr is None else y_tr[idx].long()
            ll = model.log_likelihood(xb)
            if loss_kind == "cross-entropy":
                loss = nn.functional.cross_entropy(ll + log_prior, yb)
            else:
                loss = -_select(ll, yb).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.detach().item()} at epoch {epoch + 1}, batch {b + 1}: try a "
                    "smaller lr, dtype=torch.float64, or semiring 'complex-lse-sum' for signed weights"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.detach().item()
            total += value * xb.shape[0]
            bar.step(f"nll={value:.3f}")
        hist.epoch_seconds.append(time.perf_counter() - t0)
        hist.epoch_cpu_seconds.append(time.process_time() - c0)
        hist.train_nll.append(total / n)
        hist.train_bpd.append(nll_to_bpd(total / n, d))
        summary = f"train {loss_kind} {total / n:.4f}"
        if loss_kind == "nll":
            summary += f" ({hist.train_bpd[-1]:.4f} bpd)"
        if x_te is not None:
            nll = evaluate_nll(model, x_te, y_te)
            hist.test_nll.append(nll)
            hist.test_bpd.append(nll_to_bpd(nll, d))
            summary += f", test nll {nll:.4f} ({hist.test_bpd[-1]:.4f} bpd)"
            if model.num_outputs > 1 and y_te is not None:
                hist.test_accuracy.append(evaluate_accuracy(model, x_te, y_te, log_prior))
                summary += f", test acc {hist.test_accuracy[-1]:.4f}"
        bar.close(summary + f", {hist.epoch_seconds[-1]:.2f} s")
    model.eval()
    return hist


def train_squared_circuit(
    model: CompiledCircuitModel,
    data: Any,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    *,
    weight_decay: float = 0.0,
) -> TrainingHistory:
    """Minimise the exact NLL ``-(log f(x) - log Z)`` with Adam (``f = c²`` for squared models).

    Args:
        model: a :class:`CompiledCircuitModel`; it trains in the dtype it was compiled
            with (float32 or float64) and in its semiring (signed real weights need
            'complex-lse-sum', softmax weights work in 'lse-sum' -- both chosen at
            :meth:`CircuitModel.compile`). Trained in place.
        data: :class:`DataSplits` (test split evaluated after every epoch), a pair
            ``(x_train, x_test)``, or ``x_train`` alone; integer tensors ``(N, D)``.
            Models with several outputs (class-conditional) use the labels to pick each
            example's output.
        epochs, batch_size, lr, weight_decay: the usual; ``Z`` is recomputed every step.
        seed: seeds the mini-batch order, so equal seeds (and equal initial parameters)
            give identical parameters.
        progress: a tqdm bar if tqdm is importable, else one line per epoch on stderr.

    Returns:
        A :class:`TrainingHistory` (NLL in nats per example, bpd = NLL / (D ln 2)).

    Raises:
        FloatingPointError: the loss became NaN/inf.
        ValueError: data of the wrong shape, out-of-range categories, missing labels.
    """
    return _fit(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                progress=progress, weight_decay=weight_decay, loss_kind="nll")


def train_classifier_circuit(
    model: CompiledCircuitModel,
    data: DataSplits,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    *,
    objective: str = "generative",
    weight_decay: float = 0.0,
) -> TrainingHistory:
    """Train a class-conditional model (:func:`digits_classifier_circuit`).

    ``objective='generative'``: minimise ``-log p(x | y)`` (each class's density on its
    own examples); ``'discriminative'``: cross-entropy of ``softmax_y(log p(x|y) + log p(y))``
    with the empirical prior. Either way ``test_nll`` is ``-log p(x | y)`` and
    ``test_accuracy`` is the accuracy of ``argmax_y log p(x | y) + log p(y)``.
    """
    check_choice(objective, ("generative", "discriminative"), "objective")
    if model.num_outputs < 2:
        raise ValueError("train_classifier_circuit needs a model with one output per class")
    return _fit(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                progress=progress, weight_decay=weight_decay,
                loss_kind="nll" if objective == "generative" else "cross-entropy")


@dataclass
class TrainedModel:
    """Result of :func:`trained_digits_model`.

    ``from_cache`` is True when the parameters were loaded instead of trained; ``path``
    is the cache file (``<cache_dir>/cirkit/digits-<key>.pt``).
    """

    model: CompiledCircuitModel
    history: TrainingHistory
    config: dict[str, Any]
    path: Path
    from_cache: bool


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def trained_digits_model(
    num_units: int,
    epochs: int,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    region_graph: str = "quad-tree-2",
    layer: str = "cp",
    complex: bool = False,  # noqa: A002
    weight_activation: str = "none",
    semiring: str | None = None,
    dtype: str = "float32",
    fold: bool = True,
    optimize: bool = False,
    batch_size: int = 128,
    lr: float = 0.05,
    test_fraction: float = 0.2,
    data_seed: int = 0,
    evaluation: str = "linear",
    progress: bool = False,
    retrain: bool = False,
) -> TrainedModel:
    """Train :func:`digits_squared_circuit` on :func:`digits_data` once; cache the result.

    The cache file ``<cache_dir>/cirkit/digits-<key>.pt`` holds the ``state_dict``, the
    config and the training history; ``key`` hashes every argument that affects the
    parameters (not ``cache_dir``/``progress``/``retrain``) plus the cirkit and torch
    versions. When it exists the model is rebuilt from the config and the parameters
    loaded -- no training. ``retrain=True`` ignores and overwrites it. An unreadable cache
    file is reported with a warning and replaced.

    Training is seeded: ``seed`` initialises the parameters and orders the mini-batches,
    so the same config trains to identical parameters.

    Args:
        cache_dir: default :func:`default_cache_dir` (``$STRUCTLAYERS_CACHE`` or
            ``~/.cache/structlayers``).
        dtype: 'float32' or 'float64' (a string, so the config stays JSON).
        evaluation: how the model is evaluated while training and afterwards
            (:attr:`CompiledCircuitModel.evaluation`); 'linear' (the default) is several
            times faster than cirkit's log-space forward for the same values.

    The Kronecker-weighted sum layers of ``f`` and ``Z`` are the exact factor-wise
    ``kronecker`` layers in ``live`` mode (the same function and parameters as cirkit's,
    without building ``A ⊗ B``); ``state_dict`` keys are those of cirkit's layers.
        Others: see :func:`digits_squared_circuit`, :meth:`CircuitModel.compile` and
            :func:`train_squared_circuit`.
    """
    check_choice(dtype, tuple(_DTYPES), "dtype")
    config = dict(
        dataset="sklearn-digits", num_units=num_units, epochs=epochs, seed=seed,
        region_graph=region_graph, layer=layer, complex=complex,
        weight_activation=weight_activation, semiring=semiring, dtype=dtype, fold=fold,
        optimize=optimize, batch_size=batch_size, lr=lr, test_fraction=test_fraction,
        data_seed=data_seed, evaluation=evaluation, layers="kronecker live",
    )
    sym = digits_squared_circuit(num_units, region_graph, layer, complex,
                                 weight_activation=weight_activation)
    def build() -> CompiledCircuitModel:
        compiled = sym.compile(semiring, fold=fold, optimize=optimize, dtype=_DTYPES[dtype], seed=seed,
                               evaluation=evaluation)
        if not optimize:  # optimize=True already shattered them into cirkit's exact O(K³) layers
            swap_kronecker_sum_layers([compiled.density, compiled.partition], "kronecker", mode="live")
        return compiled

    def train(model: CompiledCircuitModel) -> TrainingHistory:
        data = digits_data(seed=data_seed, test_fraction=test_fraction)
        return train_squared_circuit(model, data, epochs=epochs, batch_size=batch_size, lr=lr,
                                     seed=seed, progress=progress)

    got = cached_training("digits", config, build, train, cache_dir=cache_dir, retrain=retrain)
    return TrainedModel(got.model, TrainingHistory.from_dict(got.history or {}), config, got.path,
                        got.from_cache)
