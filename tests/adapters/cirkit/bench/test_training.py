"""Training and scoring (adapters.cirkit.bench.training)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from adapters.cirkit.bench.circuits import digits_classifier_circuit, digits_squared_circuit
from adapters.cirkit.bench.training import evaluate_nll, train_classifier_circuit, train_squared_circuit

from .tiny import TINY


# ----------------------------------------------------------------------------- training


def test_training_reduces_nll_and_reports_bpd(small_digits):
    cm = digits_squared_circuit(2).compile(seed=0)
    hist = train_squared_circuit(cm, small_digits, epochs=2, batch_size=64, lr=0.1, seed=0, progress=False)
    assert len(hist.train_nll) == len(hist.test_nll) == len(hist.epoch_seconds) == 2
    assert hist.test_nll[-1] < hist.initial_test_nll
    assert hist.train_nll[-1] < hist.train_nll[0]
    assert hist.test_bpd[-1] == pytest.approx(hist.test_nll[-1] / (64 * math.log(2)))
    assert hist.test_nll[-1] == pytest.approx(evaluate_nll(cm, small_digits.x_test), rel=1e-6)


def test_training_float64_and_pair_data(small_digits):
    cm = digits_squared_circuit(2, complex=True).compile(dtype=torch.float64, seed=0)
    before = evaluate_nll(cm, small_digits.x_test)
    hist = train_squared_circuit(cm, (small_digits.x_train, small_digits.x_test), epochs=1,
                                   batch_size=128, lr=0.1, seed=0, progress=False)
    assert hist.test_nll[0] < before
    assert {p.dtype for p in cm.parameters()} <= {torch.float64, torch.complex128}


def test_progress_without_tqdm_prints_to_stderr(small_digits, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm...` raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    cm = digits_squared_circuit(2, **TINY).compile(seed=0)
    x = torch.randint(0, 3, (40, 4), generator=torch.Generator().manual_seed(0))
    train_squared_circuit(cm, x, epochs=1, batch_size=16, lr=0.05, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1: train nll" in err and "bpd" in err


def test_training_rejects_bad_data():
    cm = digits_squared_circuit(2, **TINY).compile(seed=0)
    with pytest.raises(TypeError, match="data must be a DataSplits"):
        train_squared_circuit(cm, [1, 2, 3], epochs=1)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train_squared_circuit(cm, torch.zeros(4, 4, dtype=torch.long), epochs=0)


def test_default_classifier_has_independent_class_circuits(small_digits):
    m = digits_classifier_circuit(2)
    assert m.config["shared"] is False and not m.is_squared and len(m.circuit.outputs) == 10
    cm = m.compile(seed=0)
    hist = train_classifier_circuit(cm, small_digits, epochs=2, batch_size=64, lr=0.1, seed=0, progress=False)
    assert hist.test_accuracy[-1] > 0.5  # 10 classes: chance is about 0.1
    torch.testing.assert_close(cm.log_partition(), torch.zeros(10), atol=1e-5, rtol=0)
