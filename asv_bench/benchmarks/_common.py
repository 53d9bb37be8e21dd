"""Shared pieces of the asv suites: thread pinning, inputs, layer grids, peak memory.

Importing this module pins torch's intra-op threads, once per process:
``STRUCTLAYERS_BENCH_THREADS`` (default 2). asv imports the benchmark modules in
every process that runs a benchmark (and in the fork server, whose children
inherit the setting), so every measurement runs with the same thread count.

Only the public API of ``structlayers`` is used. A suite for another area (for
example squared circuits built with cirkit) is one more module beside
``layers.py``: it imports this module for the pinning and for
:func:`peak_rss_mib` / :func:`forward_backward`, and defines its own case class
with its own ``setup_cache`` (see ``asv_bench/README.md``).

asv details the suites rely on (asv 0.6 / asv_runner 0.3):

* ``setup_cache`` is keyed by the module and line where it is *defined*, so the
  two case classes below build their grids once per ``asv run`` and every suite
  class inheriting a case shares that one build (timings, memory and quality).
* When a benchmark has a ``setup``, asv re-runs it before every timed call
  (asv#966). ``setup`` here only looks things up (memoised per process), so
  re-running it costs microseconds.
* ``setup`` raising ``NotImplementedError`` marks that parameter combination as
  skipped (shown as n/a), used for combinations that do not exist, e.g. a rank
  for a kind that is exact and takes none.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, Optional, Tuple

import torch

import structlayers as sl

try:
    from structlayers.testing import decaying_matrix
except ImportError:  # commits before structlayers.testing: the demo's function, the same draws
    from structlayers.demo import decaying_factor

    def decaying_matrix(folds, rows, cols, *, decay, dtype, generator):
        return decaying_factor(folds, rows, decay, generator, dtype)

# --------------------------------------------------------------------- threads
THREADS = int(os.environ.get("STRUCTLAYERS_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def ensure_threads() -> None:
    """Re-pin if something in this process changed the thread count (cheap no-op otherwise)."""
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


# ------------------------------------------------------------------------ grid
#: Every registered kind; a fixed tuple (not ``sl.available()``) so that the
#: parameter grid, and with it asv's history, stays stable when kinds are added.
KINDS = ("dense", "kronecker", "lowrank", "nystrom", "tt", "sketched", "monarch")
#: The kind's own rank option (see ``kronecker_options`` / ``dense_options``).
RANKS = (8, 32)
#: Factor size K of A, B (W = A ⊗ B is K^2 x K^2).
KRONECKER_SIZES = (32, 64)
#: n of the dense weights W (n x n).
DENSE_SIZES = (256, 1024)
FOLDS = 2
BATCH = 256
DTYPE = torch.float32
KRONECKER_DECAY = 0.9   # singular values of A and B: 0.9^i
DENSE_DECAY = 0.99      # singular values of W: 0.99^i


def _exact(kind: str, constructor: str, capability: str) -> bool:
    """The kind's capability attribute ``exact_from_kronecker`` / ``exact_from_dense`` (see
    ``structlayers.StructuredSumLayer``). Commits from before those attributes: the
    constructor takes no options besides its inputs (no keyword-only parameters)."""
    cls = sl.get(kind)
    if hasattr(cls, capability):
        return bool(getattr(cls, capability))
    parameters = inspect.signature(getattr(cls, constructor)).parameters.values()
    return not any(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in parameters)


def kronecker_options(kind: str, rank: int) -> Optional[dict]:
    """Options of ``sl.from_kronecker(kind, A, B, **options)`` at ``rank``.

    None: the kind is exact from A ⊗ B and takes no rank (``exact_from_kronecker``:
    dense materialises W, kronecker stores A and B), or is measured exact (monarch,
    exact at block rank 1 on its default grid, where a block rank would only add
    zeros); such kinds are measured at ``RANKS[0]`` only. The rank options are fixed
    per kind, like ``KINDS``: asv's history is keyed by them.
    """
    if _exact(kind, "from_kronecker", "exact_from_kronecker"):
        return None
    return {
        "monarch": None,
        "lowrank": {"rank": rank},                          # Eckart–Young optimum, flat
        "nystrom": {"rank": rank},                          # CUR(A) ⊗ CUR(B), rank = ka * kb
        "tt": {"factor_cores": True, "rank": rank},         # bond dimension inside the factors
        "sketched": {"rank": rank, "seed": 0},              # per-term sketch size
    }[kind]


def dense_options(kind: str, rank: int) -> Optional[dict]:
    """Options of ``sl.from_dense(kind, W, **options)`` at ``rank``; None: exact, no rank
    (``exact_from_dense``)."""
    if _exact(kind, "from_dense", "exact_from_dense"):
        return None
    return {
        "kronecker": {"rank": rank},        # nearest sum of `rank` Kronecker products
        "lowrank": {"rank": rank},
        "nystrom": {"rank": rank},
        "tt": {"rank": rank},               # maximal bond dimension
        "sketched": {"rank": rank, "seed": 0},
        "monarch": {"block_rank": rank},
    }[kind]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kronecker_factors(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A, B: (FOLDS, size, size) with decaying spectra; deterministic per size."""
    gen = _generator(size)
    a = decaying_matrix(FOLDS, size, size, decay=KRONECKER_DECAY, dtype=DTYPE, generator=gen)
    b = decaying_matrix(FOLDS, size, size, decay=KRONECKER_DECAY, dtype=DTYPE, generator=gen)
    return a, b


def dense_weight(size: int) -> torch.Tensor:
    """W: (FOLDS, size, size) with a decaying spectrum; deterministic per size."""
    return decaying_matrix(FOLDS, size, size, decay=DENSE_DECAY, dtype=DTYPE, generator=_generator(size))


def folded_input(in_features: int) -> torch.Tensor:
    """x: (FOLDS, BATCH, in_features)."""
    return torch.randn(FOLDS, BATCH, in_features, generator=_generator(1), dtype=DTYPE)


# ------------------------------------------------------------------ the cases
class _Case:
    """Parameter grid kind x rank x size over one kind of input.

    ``setup_cache`` (defined in the subclasses below, so that each has one cache
    key) returns ``{"inputs": {size: ...}, "layers": {(kind, rank, size): layer or
    reason}}`` with every layer that needs a decomposition; the ``dense`` kind is
    only a copy (or materialisation) of the input and is built in ``setup``
    instead, which keeps the pickled cache that every benchmark process loads
    small. A reason (str) marks a combination the kind cannot build.
    """

    params = [list(KINDS), list(RANKS)]
    param_names = ("kind", "rank", "size")
    timeout = 600  # seconds, per benchmark and for the shared setup_cache
    options: Callable[[str, int], Optional[dict]]

    def _build(self, kind: str, inputs, options: dict) -> sl.StructuredSumLayer:
        raise NotImplementedError

    def _build_grid(self, sizes, make_inputs) -> dict:
        # Built with one thread (restored afterwards): the constructors make many
        # small LAPACK calls, which on a busy 2-core machine run far slower with two
        # threads (see tests/conftest.py); nothing here is measured.
        torch.set_num_threads(1)
        try:
            return self._build_all(sizes, make_inputs)
        finally:
            torch.set_num_threads(THREADS)

    def _build_all(self, sizes, make_inputs) -> dict:
        inputs, layers = {}, {}
        for size in sizes:
            inputs[size] = make_inputs(size)
            for kind in KINDS:
                if kind == "dense":
                    continue
                for rank in RANKS:
                    options = type(self).options(kind, rank)
                    if options is None:
                        if rank != RANKS[0]:
                            continue
                        options = {}
                    try:
                        layers[kind, rank, size] = self._build(kind, inputs[size], options)
                    except ValueError as exc:  # an infeasible rank for this kind and size
                        layers[kind, rank, size] = f"{kind} {options}: {exc}"
        return {"inputs": inputs, "layers": layers}

    def setup(self, cache, kind, rank, size):
        ensure_threads()
        key = (type(self).__name__, kind, rank, size)
        if key not in _MEMO:
            _MEMO.clear()  # one combination per process; keep memory to it
            _MEMO[key] = self._instance(cache, kind, rank, size)
        state = _MEMO[key]
        if isinstance(state, str):
            raise NotImplementedError(state)
        self.layer, self.x, self.x_grad, self.grad_inputs = state

    def _instance(self, cache, kind, rank, size):
        if type(self).options(kind, rank) is None and rank != RANKS[0]:
            return f"{kind} is exact and takes no rank (measured at rank={RANKS[0]})"
        if kind == "dense":
            layer = self._build("dense", cache["inputs"][size], {})
        else:
            layer = cache["layers"][kind, rank, size]
            if isinstance(layer, str):
                return layer
        x = folded_input(layer.in_features)
        x_grad = x.clone().requires_grad_(True)
        return layer, x, x_grad, [x_grad, *layer.parameters()]


_MEMO: Dict[tuple, object] = {}


class KroneckerCase(_Case):
    """W[f] = A[f] ⊗ B[f], layers from ``sl.from_kronecker``; size is K (W is K^2 x K^2)."""

    params = _Case.params + [list(KRONECKER_SIZES)]
    options = staticmethod(kronecker_options)

    def setup_cache(self):
        return self._build_grid(KRONECKER_SIZES, kronecker_factors)

    def _build(self, kind, inputs, options):
        a, b = inputs
        return sl.from_kronecker(kind, a, b, **options)

    def relative_error(self, cache, size) -> float:
        a, b = cache["inputs"][size]
        return float(self.layer.relative_error_kronecker(a, b))


class DenseCase(_Case):
    """Plain dense weights W (n x n, decaying spectrum), layers from ``sl.from_dense``."""

    params = _Case.params + [list(DENSE_SIZES)]
    options = staticmethod(dense_options)

    def setup_cache(self):
        return self._build_grid(DENSE_SIZES, dense_weight)

    def _build(self, kind, inputs, options):
        return sl.from_dense(kind, inputs, **options)

    def relative_error(self, cache, size) -> float:
        return float(self.layer.relative_error(cache["inputs"][size]))


# -------------------------------------------------------------- the measured calls
def forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inference: one forward without autograd."""
    with torch.no_grad():
        return layer(x)


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, inputs) -> tuple:
    """One training step's worth of work: forward, then the gradients of ``sum(y)``
    with respect to ``inputs`` (the input, so that a layer inside a network is
    covered, and the parameters). Gradients are returned, not accumulated, so
    repeated calls do the same work."""
    return torch.autograd.grad(layer(x).sum(), inputs)


# --------------------------------------------------------------------- memory
# One implementation, shared with benchmarks/circuits.py (see its docstring there).
from structlayers.benchmarking import PEAK_RSS_PROBLEM, peak_rss_mib  # noqa: E402,F401
