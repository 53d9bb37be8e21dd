"""What a benchmark result depends on: machine, threads, library versions, git commit."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from structlayers.benchmarking import environment as machine_environment

__all__ = ["package_versions", "git_commit", "run_environment"]


def package_versions() -> Dict[str, Optional[str]]:
    """Installed versions of torch, cirkit (distribution ``libcirkit``) and structlayers;
    None for a distribution that is not installed (e.g. a source checkout)."""
    out: Dict[str, Optional[str]] = {"torch": str(torch.__version__)}
    for dist, key in (("libcirkit", "cirkit"), ("structlayers", "structlayers")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:  # pragma: no cover - e.g. a source checkout
            out[key] = None
    return out


def git_commit() -> Optional[str]:
    """The checked-out commit of the source tree this package runs from, if it is a git checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_environment(**extra: Any) -> Dict[str, Any]:
    """Machine, Python, torch threads, package versions and git commit, plus ``extra``."""
    return dict(machine_environment(), **package_versions(), git_commit=git_commit(), **extra)
