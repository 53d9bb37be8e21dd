"""Timing helpers shared by the demo, the benchmark report and the asv suites.

Method: pin torch's thread count, run warm-up calls, then report the median of
repeated timed calls (``time.perf_counter``); peak memory is the growth of the
process's resident high-water mark during exactly one call (:func:`peak_rss_mib`).
Numbers go to tables and files; they are never asserted in tests.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import statistics
import time
from typing import Callable, Dict, Iterator, Optional

import torch

from .allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, load_libc


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


def interleaved_timings(fns: Dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2,
                        min_seconds: float = 0.0) -> Dict[str, Dict[str, float]]:
    """Seconds per call of several functions timed round-robin: ``{name: {"median", "min",
    "max"}}`` over ``repeats`` samples after ``warmup`` calls each.

    Interleaving spreads slow drifts of a shared machine (other processes, thermal
    state) evenly over the candidates, so their ratios stay meaningful. With
    ``min_seconds``, a sample of a function shorter than that times a loop of calls long
    enough to reach it and reports the per-call time.
    """
    loops: Dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        loops[name] = 1
        if min_seconds > 0:
            start = time.perf_counter()
            fn()
            loops[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    samples: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / loops[name])
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in samples.items()}


def interleaved_medians(fns: Dict[str, Callable[[], object]], *, repeats: int = 7,
                        warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call for several functions timed round-robin (:func:`interleaved_timings`)."""
    return {name: t["median"] for name, t in interleaved_timings(fns, repeats=repeats, warmup=warmup).items()}


def gemm_gflops(size: int = 2048, *, repeats: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-product rate in GFLOP/s (2 flops per multiply-add): the median
    of ``repeats`` float32 ``size x size`` products, at torch's current thread count.
    Measure it in the same run as the timings it bounds."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats=repeats, warmup=2)
    return 2.0 * size**3 / seconds / 1e9


def matmul_macs(fn: Callable[[], object]) -> int:
    """Multiply-adds of the matrix products (mm, bmm, addmm, convolutions, ...) that one call
    of ``fn`` actually runs, forward and any backward it calls, as torch's flop counter sees
    them (half its flops). Elementwise work is not counted. Unlike a count from the layers'
    shapes, it sees what the evaluation skipped (products on low-rank blocks) or added.
    Run gradients through ``backward()``: the counter fails inside ``torch.autograd.grad``
    of leaf tensors (torch 2.13)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def environment() -> Dict[str, object]:
    """What a timing depends on: machine, threads, library versions."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


_MALLOC_TRIM, _MALLOPT = load_libc()
_MAP_FROM = 64 * 1024  # bytes: blocks from this size on get their own mapping


def _map_large_blocks() -> None:
    """glibc: give every block >= 64 KiB its own mapping, returned to the OS on free,
    and trim the heap beyond 64 KiB. Fixing the thresholds also switches off glibc's
    dynamic threshold (which rises after large frees and then serves big blocks from
    the heap, where fragmentation made peaks depend on earlier allocations): peaks
    then follow the bytes live during the call, page-accurate and repeatable.
    It stays in force for the rest of the process: measure peaks after timings,
    or in a process of their own."""
    _MALLOPT(M_MMAP_THRESHOLD, _MAP_FROM)
    _MALLOPT(M_TRIM_THRESHOLD, _MAP_FROM)


def _peak_rss_problem() -> Optional[str]:
    """None if peak-RSS measurement works in this process, else why not."""
    try:
        before = _read_status_kib("VmHWM")
        _reset_peak_rss()
        _read_status_kib("VmRSS")
    except OSError as exc:
        return f"peak RSS not measurable here (needs Linux /proc/self/clear_refs): {exc}"
    if _MALLOC_TRIM is None or _MALLOPT is None:
        return "peak RSS not measurable here: needs glibc (malloc_trim, mallopt)"
    del before
    return None


PEAK_RSS_PROBLEM = _peak_rss_problem()


def peak_rss_mib(fn: Callable[[], object], warmup: int = 1) -> float:
    """Peak resident memory that one call of ``fn`` adds, in MiB.

    Large blocks get their own mappings (:func:`_map_large_blocks`), warm-up
    calls run first (one-time allocations: thread pools, library workspaces),
    free memory goes back to the OS (``malloc_trim``, so that the call cannot
    reuse pages freed earlier without them counting), the kernel's high-water
    mark is reset to the current RSS (``5`` into ``/proc/self/clear_refs``), and
    the result is ``VmHWM`` after the call minus ``VmRSS`` before it. Covers
    every allocation of the process (torch's CPU allocator, BLAS, Python) and
    nothing outside the call (``import torch`` etc., unlike asv's ``peakmem_``).
    tracemalloc would not do: it sees only Python's allocator, not torch's.
    """
    if PEAK_RSS_PROBLEM is not None:
        raise NotImplementedError(PEAK_RSS_PROBLEM)
    _map_large_blocks()
    for _ in range(warmup):
        fn()
    gc.collect()
    _MALLOC_TRIM(0)
    _reset_peak_rss()
    before = _read_status_kib("VmRSS")
    result = fn()
    peak = _read_status_kib("VmHWM")
    del result
    return (peak - before) / 1024.0
