"""The circuits a benchmark compares: cirkit's two paths and structured swaps of one model.

One place builds them, so the benchmark script, the asv suites and ``structlayers
bench`` time and score the same things:

* ``cirkit optimize=False`` -- cirkit's materialised path: every Kronecker sum layer
  builds ``A ⊗ B`` (the slow baseline earlier work compared against);
* ``cirkit optimize=True`` -- cirkit shatters each Kronecker sum layer into two
  tensor-dot layers (an exact O(K³) path): the strongest baseline;
* ``cirkit optimize=True + linear`` -- cirkit's optimised layers evaluated by this
  package's linear-space evaluator: separates what the evaluator gains from what the
  layers gain;
* ``kronecker (semiring)`` -- this project's exact factor-wise layers (live parameters)
  inside cirkit's own log-space evaluation;
* ``kronecker`` -- the same layers, linear-space evaluation (the adapter's fast path);
* ``<kind> square r`` -- ``Ã ⊗ conj(Ã)`` with ``rank(Ã) = r`` (:func:`square_policy`):
  an approximation that keeps ``c̃²`` a valid density;
* ``<kind> flat r`` -- the best rank-``r`` map of ``A ⊗ B`` itself
  (:func:`rank_policy`): cheaper, but ``c̃²`` is no longer a square and can go negative.

Structured variants use ``evaluation`` (default ``'linear'``; ``'semiring'`` keeps
cirkit's log-space evaluation); linear evaluation needs a log semiring. Every variant
of one call shares the parameter values of ``model`` (cirkit's own
paths get them through ``load_state_dict`` when their layout matches, else they keep
a seeded initialisation: timings do not depend on the values, and ``Variant.same_values``
says which is which).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from ..swap import SwapReport, rank_policy, square_policy, swap_kronecker_sum_layers
from .circuits import CircuitModel, CompiledCircuitModel

CIRKIT_MATERIALISED = "cirkit optimize=False"
CIRKIT_OPTIMIZED = "cirkit optimize=True"
CIRKIT_OPTIMIZED_LINEAR = "cirkit optimize=True + linear"
EXACT_SEMIRING = "kronecker (semiring)"
EXACT = "kronecker"


@dataclass
class Variant:
    """One compiled model to time or score.

    ``kind``/``rank``/``structure`` are None for cirkit's own paths; ``structure`` is
    'exact', 'square' or 'flat'. ``report`` is the swap report of the density circuit
    (None for cirkit's paths). ``same_values``: evaluates the same function as the
    reference model (exact variants) or an approximation built from it.
    """

    name: str
    model: CompiledCircuitModel
    kind: Optional[str]
    rank: Optional[int]
    structure: Optional[str]
    report: Optional[SwapReport]
    same_values: bool

    @property
    def evaluation(self) -> str:
        """'semiring' (cirkit's log-space forward) or 'linear' (linear space, per-sample scales)."""
        return self.model.evaluation

    @property
    def is_baseline(self) -> bool:
        """cirkit's own layers (in either evaluation)."""
        return self.kind is None


def swapped(model: CompiledCircuitModel, policy, *, mode: str = "frozen") -> tuple[CompiledCircuitModel, SwapReport]:
    """A deep copy of ``model`` with the Kronecker sum layers of ``f`` and ``Z`` swapped by ``policy``
    (shared between the two); the report lists each structure once."""
    model = copy.deepcopy(model)
    # one call: Z's layers share the structured modules of f's (one model, fine-tunable)
    report = swap_kronecker_sum_layers([model.density, model.partition], policy, mode=mode)
    return model, report


def _same_layout(a: CompiledCircuitModel, b: CompiledCircuitModel) -> bool:
    # checked first: load_state_dict copies the matching entries before it reports a mismatch
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def circuit_variants(
    spec: CircuitModel,
    model: CompiledCircuitModel,
    *,
    kinds: Sequence[str] = ("lowrank", "nystrom"),
    ranks: Iterable[int] = (),
    structures: Sequence[str] = ("square",),
    materialised: bool = True,
    evaluation: str = "linear",
    seed: int = 0,
) -> List[Variant]:
    """cirkit's paths, exact ``kronecker`` and approximations of ``model`` (compiled from ``spec``).

    Args:
        spec: the symbolic model ``model`` was compiled from (cirkit's paths are
            compiled from it again, in ``model``'s semiring and dtype).
        model: a compiled model, typically trained, compiled with cirkit's default
            layers (``fold=True``); it is not modified.
        kinds: structured kinds for the approximations (each at every rank and structure).
        ranks: ``rank(Ã)`` for 'square', the map's rank for 'flat'.
        structures: any of 'square' and 'flat'.
        materialised: include cirkit's ``optimize=False`` path (its ``Z`` builds
            ``K⁴`` weights per fold: skip it for large ``K``).
        evaluation: of the structured variants ('linear' or 'semiring'); with
            'linear', ``cirkit optimize=True + linear`` and ``kronecker (semiring)`` are
            added so the evaluator's and the layers' shares of a speed-up can be told apart.
        seed: initialisation of cirkit's paths when ``model``'s values cannot be loaded.
    """
    for s in structures:
        if s not in ("square", "flat"):
            raise ValueError(f"unknown structure {s!r}; choose 'square' or 'flat'")
    out: List[Variant] = []
    for optimize, name in ((False, CIRKIT_MATERIALISED), (True, CIRKIT_OPTIMIZED)):
        if not optimize and not materialised:
            continue
        compiled = spec.compile(model.semiring, optimize=optimize, dtype=model.dtype, seed=seed)
        same = _same_layout(compiled, model)
        if same:  # else a different layout (optimize=True fuses layers): keep the seeded values
            compiled.load_state_dict(model.state_dict())
        out.append(Variant(name, compiled, None, None, None, None, same))
        if optimize and evaluation == "linear":
            fast = copy.deepcopy(compiled)
            fast.evaluation = "linear"
            out.append(Variant(CIRKIT_OPTIMIZED_LINEAR, fast, None, None, None, None, same))
    exact, report = swapped(model, "kronecker", mode="live")
    exact.evaluation = "semiring"
    if evaluation == "linear":
        out.append(Variant(EXACT_SEMIRING, exact, "kronecker", None, "exact", report, True))
        exact = copy.deepcopy(exact)
        exact.evaluation = "linear"
    out.append(Variant(EXACT, exact, "kronecker", None, "exact", report, True))
    policies = {"square": square_policy, "flat": rank_policy}
    for structure in structures:
        for kind in kinds:
            for rank in ranks:
                approx, report = swapped(model, policies[structure](kind, rank))
                approx.evaluation = evaluation
                out.append(Variant(f"{kind} {structure} {rank}", approx, kind, rank, structure, report, False))
    return out
