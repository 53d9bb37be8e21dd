"""The one on-disk cache of trained models.

A trained model is stored as ``<cache dir>/cirkit/<name>-<key>.pt`` holding its
``state_dict``, the config it was trained with and its training history; ``key`` hashes
the config (JSON) with the versions of cirkit and torch and the cache format, so a
changed setting or library never reads a stale model. Files are written atomically
(temporary file, then rename), so concurrent readers see the old or the new file; an
unreadable or mismatching file is reported with a warning and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from .environment import package_versions

__all__ = ["default_cache_dir", "cache_key", "cached_training", "CachedTraining"]

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$STRUCTLAYERS_CACHE`` if set, else ``~/.cache/structlayers``."""
    env = os.environ.get("STRUCTLAYERS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "structlayers"


def _versions() -> Dict[str, str]:
    """What a cached model depends on besides its config: cirkit, torch, the cache format."""
    found = package_versions()
    cirkit_version = found["cirkit"]
    if cirkit_version is None:  # pragma: no cover - a source checkout of cirkit
        import cirkit

        cirkit_version = getattr(cirkit, "__version__", "unknown")
    return {"cirkit": str(cirkit_version), "torch": str(found["torch"]), "format": str(CACHE_FORMAT)}


def cache_key(config: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the JSON config and the cirkit/torch versions."""
    blob = json.dumps({"config": dict(config), "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class CachedTraining:
    """A model from :func:`cached_training`: ``history`` is what ``train`` returned (as a
    dict), ``seconds`` its wall time (0 when loaded), ``path`` the cache file."""

    model: nn.Module
    history: Optional[Dict[str, Any]]
    path: Path
    from_cache: bool
    seconds: float


def _save_atomically(blob: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(dict(blob), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_training(name: str, config: Mapping[str, Any], build: Callable[[], nn.Module],
                    train: Callable[[nn.Module], Any], *, cache_dir: Optional[os.PathLike] = None,
                    retrain: bool = False) -> CachedTraining:
    """``build()`` trained by ``train(model)`` once per ``config``; later calls load it.

    ``config`` must be JSON-serialisable and name everything that affects the trained
    parameters. ``train`` returns the history (an object with ``to_dict()``, a dict, or
    None). ``retrain=True`` ignores and overwrites an existing file.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "cirkit" / f"{name}-{cache_key(config)}.pt"
    model = build()
    if path.is_file() and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("config") != dict(config):
                raise ValueError("config in the file does not match")
            model.load_state_dict(blob["state_dict"])
            return CachedTraining(model, blob.get("history"), path, True, 0.0)
        except Exception as exc:  # noqa: BLE001 -- any unreadable cache entry is replaced
            warnings.warn(f"ignoring unreadable cache file {path.name}: {exc}; retraining", stacklevel=2)
            model = build()
    start = time.perf_counter()
    history = train(model)
    seconds = time.perf_counter() - start
    if history is not None and hasattr(history, "to_dict"):
        history = history.to_dict()
    _save_atomically({"config": dict(config), "versions": _versions(), "state_dict": model.state_dict(),
                      "history": history}, path)
    return CachedTraining(model, history, path, False, seconds)
