"""Timing helpers shared by the demo, the benchmark report and the asv suites.

Method: pin torch's thread count, run warm-up calls, then report the median of
repeated timed calls (``time.perf_counter``). Numbers go to tables and files;
they are never asserted in tests.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from typing import Callable, Dict, Iterator

import torch


@contextlib.contextmanager
def pinned_threads(num_threads: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(num_threads)``; restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        torch.set_num_threads(previous)


def median_time(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2,
                min_seconds: float = 0.0) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    If one call is shorter than ``min_seconds``, each sample times a loop of calls
    long enough to reach it and reports the per-call time.
    """
    for _ in range(warmup):
        fn()
    inner = 1
    if min_seconds > 0:
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        inner = max(1, int(min_seconds / max(once, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def interleaved_medians(fns: Dict[str, Callable[[], object]], *, repeats: int = 7,
                        warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call for several functions timed round-robin.

    Interleaving spreads slow drifts of a shared machine (other processes, thermal
    state) evenly over the candidates, so their ratios stay meaningful.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def environment() -> Dict[str, object]:
    """What a timing depends on: machine, threads, library versions."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
