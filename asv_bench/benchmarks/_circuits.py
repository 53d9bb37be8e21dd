"""Shared pieces of the circuit suites: the grid, the cached variants, the measured calls.

``circuits.py`` (times), ``circuits_memory.py`` (peak memory) and
``circuits_quality.py`` (test bpd, weight error, classifier error) measure the
squared digits circuit ``c²/Z`` of ``adapters.cirkit.models.digits_squared_circuit``
(8x8 digits, 17 categories per pixel, quad-tree, CP layers, signed real weights,
complex-lse-sum, folded, float32) in every variant that
``adapters.cirkit.variants.circuit_variants`` returns for one fixed configuration
(:data:`KINDS` x :data:`RANKS` x :data:`STRUCTURES`): cirkit's materialised path,
cirkit's optimize=True path (in cirkit's log-space evaluation and in the adapter's
linear-space one), the exact ``kronecker`` swap (in both evaluations) and the square /
flat approximations (linear-space evaluation, ``circuit_variants``' default). The
variants are built only by that function; the grid is the fixed tuple :data:`VARIANTS`
of their names, so that asv's history stays comparable when the function returns more
variants (append new names to :data:`VARIANTS`; a name it does not return for the
configuration shows as n/a, with the names it did return).

Inputs and caching (asv 0.6 details as in ``_common.py``):

* :class:`DigitsCase` (timings and memory) measures *untrained* circuits compiled with
  ``seed=0``: timings and peak memory do not depend on the parameter values.
  Its ``setup_cache`` builds every variant for every ``K`` once per ``asv run`` and
  returns each compiled model pickled to ``bytes`` (:func:`dumps`; asv pickles the
  returned value itself, which fails on cirkit's models, see :class:`_Pickler`); ``setup``
  unpickles only the one variant it needs. A variant that cannot be pickled shows as n/a
  with the error (``tests/test_asv_suite.py`` pickles every variant, so CI notices).
* ``circuits_quality.py`` trains (or loads from the on-disk cache) once in its own
  ``setup_cache`` and returns plain numbers.

On a commit without the cirkit adapter, ``circuit_variants`` or cirkit itself (asv
runs these files against every commit it benchmarks), ``setup_cache`` returns the
reason and ``setup`` raises ``NotImplementedError`` with it: the benchmarks show as
n/a instead of failing. Only import errors are treated so; anything else fails.

``STRUCTLAYERS_BENCH_SMOKE=1`` (set by ``tests/test_asv_suite.py``) keeps the grid but
shrinks the work behind it (a batch of 4, only the first K built, the others n/a, tiny
quality models): for checking that everything runs, never for numbers.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import types
from typing import Dict, Iterator, Optional

import torch

try:
    from . import _common as common  # pins torch's threads (once per process)
    COMMON_PROBLEM: Optional[str] = None
except ImportError as exc:  # a commit older than what _common.py needs
    common = None
    COMMON_PROBLEM = f"benchmarks/_common.py cannot be imported on this commit: {exc}"

# ------------------------------------------------------------------------ grid
#: Factor size K of the circuit (c² has K² units per layer). K=32 would take the
#: materialised path's Z to K⁴ = 10⁶ weights per fold and the run far past its budget.
UNITS = (8, 16)
#: The fixed configuration passed to ``circuit_variants`` (kinds x ranks x structures).
KINDS = ("lowrank", "nystrom")
#: rank(Ã) of the 'square' approximations, the map's rank for 'flat' ones (nystrom: ka·kb).
#: Absolute, not K/4 and K/2, so that the variant names are the same for every K.
RANKS = (2, 4)
STRUCTURES = ("square", "flat")
#: Names ``circuit_variants`` returns for that configuration: the grid. Append only.
VARIANTS = (
    "cirkit optimize=False",
    "cirkit optimize=True",
    "cirkit optimize=True + linear",
    "kronecker (semiring)",
    "kronecker",
    "lowrank square 2",
    "lowrank square 4",
    "nystrom square 2",
    "nystrom square 4",
    "lowrank flat 2",
    "lowrank flat 4",
    "nystrom flat 2",
    "nystrom flat 4",
)
SMOKE = os.environ.get("STRUCTLAYERS_BENCH_SMOKE", "") not in ("", "0")
#: Digits per timed ``log c²(x)`` call (random categories: timings do not depend on values).
BATCH = 4 if SMOKE else 64
SEED = 0


# -------------------------------------------------------------- availability
def adapter():
    """``(models, variants)`` modules of ``adapters.cirkit``; NotImplementedError if absent."""
    if COMMON_PROBLEM is not None:
        raise NotImplementedError(COMMON_PROBLEM)
    try:
        from adapters.cirkit import models, variants
    except ImportError as exc:  # no cirkit, or a commit without the adapter / variants
        raise NotImplementedError(f"adapters.cirkit.variants.circuit_variants unavailable: {exc}") from exc
    if not hasattr(variants, "circuit_variants"):
        raise NotImplementedError("adapters.cirkit.variants has no circuit_variants on this commit")
    return models, variants


def build_variants(spec, model, structures=STRUCTURES, **options) -> dict:
    """``{name: Variant}`` of ``circuit_variants`` for the fixed configuration."""
    _, variants = adapter()
    found = variants.circuit_variants(spec, model, kinds=KINDS, ranks=RANKS, structures=structures, **options)
    return {v.name: v for v in found}


def missing(name: str, found: dict, structures=STRUCTURES) -> str:
    return (f"circuit_variants(kinds={KINDS}, ranks={RANKS}, structures={structures}) "
            f"returned no variant {name!r} (it returned {sorted(found)})")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Build with one thread, as ``_common`` does: many small LAPACK calls, nothing measured."""
    torch.set_num_threads(1)
    try:
        yield
    finally:
        common.ensure_threads()


# ------------------------------------------------------------------- pickling
def _vmap(func, in_dims, out_dims, randomness, chunk_size):
    return torch.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)


class _Pickler(pickle.Pickler):
    """A pickler for compiled cirkit models.

    cirkit's Kronecker parameter node holds ``torch.vmap(torch.kron)``: a closure that
    carries ``torch.kron``'s qualified name, so plain pickle looks that name up and
    fails. Such wrappers are pickled as the ``torch.vmap`` call that made them.
    """

    _vmap_code = None

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType):
            if _Pickler._vmap_code is None:
                _Pickler._vmap_code = torch.vmap(torch.neg).__code__
            if obj.__code__ is _Pickler._vmap_code:
                cells = dict(zip(obj.__code__.co_freevars, (c.cell_contents for c in obj.__closure__)))
                return _vmap, tuple(cells[k] for k in ("func", "in_dims", "out_dims", "randomness", "chunk_size"))
        return NotImplemented


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(blob: bytes):
    """``pickle.loads`` with the cyclic garbage collector paused: a compiled circuit is a
    large graph of small objects, and collections triggered while it is rebuilt made
    unpickling 3x slower on average and up to 10x on some calls."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return pickle.loads(blob)
    finally:
        if enabled:
            gc.enable()


# ------------------------------------------------------------------ the case
def _timing_cache() -> dict:
    """``{"problem": reason or None, "models": {(name, K): bytes or reason}}``."""
    try:
        models, _ = adapter()
    except NotImplementedError as exc:
        return {"problem": str(exc), "models": {}}
    out: Dict[tuple, object] = {}
    with one_thread():
        for k in UNITS:
            if SMOKE and k != UNITS[0]:
                out.update({(name, k): f"smoke run: K={k} not built" for name in VARIANTS})
                continue
            spec = models.digits_squared_circuit(k)
            found = build_variants(spec, spec.compile(seed=SEED))
            for name in VARIANTS:
                out[name, k] = _pickled(found[name].model) if name in found else missing(name, found)
    return {"problem": None, "models": out}


def _pickled(model):
    """``dumps(model)``, or why it cannot be pickled (that variant is then n/a, the others run)."""
    try:
        return dumps(model)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        return f"cannot pass this variant from setup_cache to the benchmark processes: {exc!r}"


class DigitsCase:
    """Grid variant x K over the squared digits circuit (untrained, ``seed=0``).

    ``setup`` leaves ``self.model`` (a ``CompiledCircuitModel``), ``self.x`` (LongTensor
    ``(BATCH, 64)`` of random categories) and ``self.params`` (trainable tensors, for
    the gradients of ``log Z``).
    """

    params = [list(VARIANTS), list(UNITS)]
    param_names = ("variant", "K")
    timeout = 600

    def setup_cache(self):
        return _timing_cache()

    setup_cache.timeout = 900  # building every variant for both K, on a busy machine

    def setup(self, cache, variant, k):
        if cache["problem"] is not None:
            raise NotImplementedError(cache["problem"])
        common.ensure_threads()
        key = (variant, k)
        if key not in _MEMO:  # asv re-runs setup before every timed call: unpickle once
            _MEMO.clear()
            blob = cache["models"][key]
            if isinstance(blob, str):
                _MEMO[key] = blob
            else:
                model = loads(blob)
                gen = torch.Generator().manual_seed(SEED)
                spec = getattr(model, "spec", None) or model.model  # renamed from .model
                x = torch.randint(0, spec.num_categories, (BATCH, model.num_variables), generator=gen)
                _MEMO[key] = (model, x, [p for p in model.parameters() if p.requires_grad])
        state = _MEMO[key]
        if isinstance(state, str):
            raise NotImplementedError(state)
        self.model, self.x, self.params = state


_MEMO: Dict[tuple, object] = {}


# -------------------------------------------------------------- measured calls
def log_density(model, x: torch.Tensor) -> torch.Tensor:
    """``log c²(x)`` of a batch, inference (no autograd)."""
    with torch.no_grad():
        return model.log_density(x)


def log_partition(model) -> torch.Tensor:
    """``log Z = log ∫c²``, inference."""
    with torch.no_grad():
        return model.log_partition()


def log_partition_backward(model, params) -> tuple:
    """``log Z`` and its gradient with respect to every trainable parameter (the part of a
    training step that does not depend on the batch). Gradients are returned, not
    accumulated, so repeated calls do the same work; parameters ``Z`` does not use (e.g.
    the original weights of layers a frozen approximation replaced) get None."""
    return torch.autograd.grad(model.log_partition().sum(), params, allow_unused=True)
