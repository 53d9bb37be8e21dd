"""The trained-model cache (adapters.cirkit.bench.cache, trained_digits_model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.cirkit.bench import training
from adapters.cirkit.bench.cache import cache_key, default_cache_dir
from adapters.cirkit.bench.circuits import digits_squared_circuit
from adapters.cirkit.bench.data import digits_data
from adapters.cirkit.bench.training import trained_digits_model


# ----------------------------------------------------------------------------- caching


CACHE_CFG = dict(num_units=2, epochs=1, seed=7, batch_size=256, lr=0.05)


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_trains_to_identical_parameters_and_cache_is_reused(tmp_path, monkeypatch):
    a = trained_digits_model(cache_dir=tmp_path / "a", **CACHE_CFG)
    b = trained_digits_model(cache_dir=tmp_path / "b", **CACHE_CFG)
    assert not a.from_cache and not b.from_cache
    assert a.path.name == b.path.name and a.path.is_file()
    assert _params_equal(a.model, b.model)
    assert a.history.train_nll == b.history.train_nll
    initial = digits_squared_circuit(2).compile(seed=7)
    assert not _params_equal(a.model, initial)  # training did move the parameters

    def no_training(*args, **kwargs):
        raise AssertionError("trained_digits_model retrained despite a cache hit")

    monkeypatch.setattr(training, "train_squared_circuit", no_training)
    c = trained_digits_model(cache_dir=tmp_path / "a", **CACHE_CFG)
    assert c.from_cache and c.path == a.path
    assert _params_equal(c.model, a.model)
    assert c.history.test_nll == a.history.test_nll
    x = digits_data().x_test[:8]
    with torch.no_grad():
        torch.testing.assert_close(c.model(x), a.model(x), rtol=0, atol=0)


def test_cache_key_and_default_directory(tmp_path, monkeypatch):
    cfg = dict(num_units=2, epochs=1)
    assert cache_key(cfg) == cache_key(dict(cfg))
    assert cache_key(cfg) != cache_key(dict(cfg, epochs=2))
    monkeypatch.setenv("STRUCTLAYERS_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("STRUCTLAYERS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "structlayers"


def test_cache_uses_env_dir_and_replaces_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTLAYERS_CACHE", str(tmp_path))
    cfg = dict(CACHE_CFG, num_units=1, seed=1)
    first = trained_digits_model(**cfg)
    assert first.path.parent == tmp_path / "cirkit" and not first.from_cache
    first.path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring unreadable cache file"):
        again = trained_digits_model(**cfg)
    assert not again.from_cache and _params_equal(again.model, first.model)
    assert trained_digits_model(**cfg).from_cache
