"""Swap the Kronecker-weighted sum layers of a compiled cirkit circuit for structured ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit
from cirkit.backend.torch.layers import TorchLayer, TorchSumLayer
from cirkit.backend.torch.semiring import ComplexLSESumSemiring, LSESumSemiring, SumProductSemiring

import structlayers

from structlayers._checks import check_bool, check_policy, check_policy_choice, check_positive_int
from structlayers.linalg import kron_chain_flops

from .accelerate import accelerate
from .internals import replace_layers
from .layers import (
    TorchKroneckerSumLayer,
    TorchLiveSquareSumLayer,
    TorchStructuredSumLayer,
    kronecker_factors,
)
from .plan import is_kronecker_weight

SUPPORTED_SEMIRINGS = (SumProductSemiring, LSESumSemiring, ComplexLSESumSemiring)
MODES = ("frozen", "live")
# Kinds that are exact for A ⊗ B and can be recomputed from the live factors at every forward.
LIVE_KINDS = ("kronecker",)


@dataclass(frozen=True)
class LayerInfo:
    """What a policy sees of one Kronecker sum layer."""

    index: int  # position in circuit.layers
    num_folds: int
    out_features: int  # Ko = Ko1 * Ko2
    in_features: int  # arity * Ki = Ki1 * Ki2
    factor_a: Tuple[int, int]  # (Ko1, Ki1)
    factor_b: Tuple[int, int]  # (Ko2, Ki2)
    dtype: torch.dtype
    conjugate_pair: bool = False  # B == conj(A): the layer of a squared circuit c² or |c|²

    @property
    def name(self) -> str:
        return f"layer {self.index} ({self.num_folds} folds, {self.out_features}x{self.in_features})"


Policy = Union[str, Callable[[LayerInfo], Optional[Union[str, Tuple[str, dict]]]]]


@dataclass
class SwapRow:
    info: LayerInfo
    kind: str
    mode: str
    rank: Optional[int]
    params: int
    flops_per_sample: int
    relative_error: float


@dataclass
class SwapReport:
    rows: List[SwapRow] = field(default_factory=list)
    kept: List[LayerInfo] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'layer':>5s} {'folds':>5s} {'shape':>11s} {'A':>9s} {'B':>9s} {'kind':10s} {'mode':6s} "
                 f"{'rank':>5s} {'params':>9s} {'MACs/sample':>12s} {'rel.err':>9s}"]
        for r in self.rows:
            i = r.info
            lines.append(
                f"{i.index:5d} {i.num_folds:5d} {f'{i.out_features}x{i.in_features}':>11s} "
                f"{'x'.join(map(str, i.factor_a)):>9s} {'x'.join(map(str, i.factor_b)):>9s} {r.kind:10s} "
                f"{r.mode:6s} {str(r.rank if r.rank is not None else '-'):>5s} {r.params:9d} "
                f"{r.flops_per_sample:12d} {r.relative_error:9.2e}")
        lines += [f"{i.index:5d} kept by the policy: {i.name}" for i in self.kept]
        return "\n".join(lines)


def rank_policy(kind: str, rank: int, **options) -> Callable[[LayerInfo], Tuple[str, dict]]:
    """Policy: ``kind`` at ``rank`` wherever A ⊗ B has a larger rank; elsewhere exact ``kronecker``.

    Layers too small for the rank (e.g. a circuit's root, 1 x K^2, of rank 1) keep
    the exact factor-wise layer, which is also the cheapest there. The report
    shows which kind each layer got.

    In a squared circuit, an approximation that is not itself a square (the flat
    structures) can make c²(x) negative, so the result is no longer a density;
    :func:`square_policy` keeps every layer a square.
    """
    structlayers.get(kind)
    rank = check_positive_int(rank, "rank")

    def policy(info: LayerInfo) -> Tuple[str, dict]:
        max_rank = min(info.factor_a) * min(info.factor_b)
        if rank >= max_rank:
            return "kronecker", {}
        return kind, {"rank": rank, **options}

    return policy


def square_policy(kind: str, factor_rank: int, **options) -> Callable[[LayerInfo], Tuple[str, dict]]:
    """Policy for squared circuits: A ⊗ conj(A) becomes Ã ⊗ conj(Ã) with rank(Ã) = ``factor_rank``.

    The swapped circuit stays a square of a circuit, so c²(x) >= 0 and Z normalises
    it exactly. ``kind`` is a kind that keeps the square form (``square_form``:
    ``lowrank``, Ã the truncated SVD of A; ``nystrom``, Ã = CUR(A)). Layers whose factors
    are not a conjugate pair, or whose factors have rank <= ``factor_rank``, keep the
    exact ``kronecker`` layer.
    """
    factor_rank = check_positive_int(factor_rank, "factor_rank")
    if not structlayers.get(kind).square_form:
        square = [k for k in structlayers.available() if structlayers.get(k).square_form]
        raise ValueError(f"square_policy needs a kind that keeps the square form Ã ⊗ conj(Ã): "
                         f"{', '.join(square)}; got {kind!r}")

    def policy(info: LayerInfo) -> Tuple[str, dict]:
        if not info.conjugate_pair or factor_rank >= min(info.factor_a):
            return "kronecker", {}
        return kind, {"factor_ranks": (factor_rank, factor_rank), "square": True, **options}

    return policy


def kronecker_sum_layers(circuit: TorchCircuit) -> List[Tuple[int, TorchLayer]]:
    """(index, layer) of every sum layer whose weight is a Kronecker product."""
    found = []
    for index, layer in enumerate(circuit.layers):
        if isinstance(layer, (TorchKroneckerSumLayer, TorchLiveSquareSumLayer)):  # live: swappable again
            found.append((index, layer))
        elif isinstance(layer, TorchSumLayer) and is_kronecker_weight(layer.weight):
            found.append((index, layer))
    return found


def _check_circuit(circuit: object) -> TorchCircuit:
    if not isinstance(circuit, TorchCircuit):
        raise TypeError(f"expected a compiled cirkit TorchCircuit, got {type(circuit).__name__}")
    return circuit


def _check_semiring(index: int, layer: TorchLayer) -> None:
    if layer.semiring not in SUPPORTED_SEMIRINGS:
        raise ValueError(
            f"layer {index} ({type(layer).__name__}) uses semiring {layer.semiring.__name__}; supported: "
            "sum-product, lse-sum, complex-lse-sum")


def swap_kronecker_sum_layers(
    circuit: Union[TorchCircuit, Sequence[TorchCircuit]],  # a list or tuple for several
    policy: Policy,
    *,
    mode: str = "frozen",
    fast: bool = True,
    **options,
) -> SwapReport:
    """Replace every Kronecker-weighted sum layer of ``circuit`` (in place) and report.

    Args:
        circuit: a compiled ``TorchCircuit`` (fold=True or False, optimize=False, or
            compiled with :func:`use_structured_layers`), or several circuits that
            share parameters, such as ``c²`` and its partition function ``∫c²``: a
            layer whose factors equal those of a layer already swapped (same fold
            layout, same values) gets the *same* structured module, so ``c̃²`` and
            ``Z̃`` stay one model while frozen factors fine-tune (and randomised
            approximations are drawn once). The report lists each structure once.
        policy: a structlayers kind name, or a function ``f(LayerInfo)`` returning a
            kind name, a ``(kind, options)`` pair, or None to keep that layer.
        mode: ``frozen`` — the factors' structured approximation is computed once from
            the current weights and becomes the layer's own trainable parameters
            (post-training compression, fine-tunable); ``live`` — recomputed from the
            circuit's parameters at every forward, so training the original circuit
            still works: ``kronecker`` (exact), and ``lowrank``/``nystrom`` as square
            approximations (:func:`square_policy`; structure chosen without gradient).
        fast: the swapped circuits evaluate through the linear-space fast path when called
            (:func:`~adapters.cirkit.accelerate.accelerate`); False keeps cirkit's evaluation.
        options: passed to ``from_kronecker`` of each layer's kind (under a policy's own).

    Every replacement is built before any is installed: on an error (unsupported
    semiring, a rank the layer cannot have, ...) every circuit is left untouched and
    the error names the layer.
    """
    circuits = list(circuit) if isinstance(circuit, (list, tuple)) else [circuit]
    if not circuits:
        raise ValueError("no circuit to swap")
    circuits = [_check_circuit(c) for c in circuits]
    check_policy(policy, "policy", "f(LayerInfo)")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'frozen' or 'live'")
    check_bool(fast, "fast")
    for c in circuits:
        if not kronecker_sum_layers(c):
            names = sorted({type(layer).__name__ for layer in c.layers})
            raise ValueError(
                "the circuit has no Kronecker-weighted sum layer to swap (its layers: " + ", ".join(names)
                + "); compile the squared circuit with optimize=False, or use use_structured_layers() "
                "to keep them with optimize=True")
    report = SwapReport()
    built: List[Tuple[Tensor, Tensor, TorchLayer]] = []  # (A, B, replacement), to share equal layers
    replacements = [{} for _ in circuits]  # type: List[Dict[int, TorchLayer]]
    for c, replaced in zip(circuits, replacements):
        _plan_swaps(c, policy, mode, options, report, built, replaced)
    for c, replaced in zip(circuits, replacements):
        replace_layers(c, {c.layers[i]: new for i, new in replaced.items()})
        if fast:
            accelerate(c)
    return report


def _plan_swaps(circuit: TorchCircuit, policy: Policy, mode: str, options: dict, report: SwapReport,
                built: List[Tuple[Tensor, Tensor, TorchLayer]], replacements: Dict[int, TorchLayer]) -> None:
    """Build (without installing) the replacements of one circuit's Kronecker sum layers."""
    for index, layer in kronecker_sum_layers(circuit):
        _check_semiring(index, layer)
        with torch.no_grad():
            a, b = kronecker_factors(layer.weight)  # type: ignore[misc]
        twin = next((new for a0, b0, new in built
                     if a0.shape == a.shape and b0.shape == b.shape and torch.equal(a0, a) and torch.equal(b0, b)
                     and new.semiring is layer.semiring and new.arity == layer.arity), None)
        if twin is not None:
            replacements[index] = twin
            continue
        info = LayerInfo(index=index, num_folds=layer.num_folds, out_features=layer.num_output_units,
                         in_features=layer.num_input_units * layer.arity, factor_a=tuple(a.shape[1:]),
                         factor_b=tuple(b.shape[1:]), dtype=a.dtype,
                         conjugate_pair=a.shape == b.shape and bool(torch.equal(b, a.conj())))
        choice = check_policy_choice(policy(info) if callable(policy) else policy, info.name)
        if choice is None:
            report.kept.append(info)
            continue
        layer_kind, layer_options = choice
        layer_options = {**options, **layer_options}
        try:
            new, row = _build(layer, info, a, b, layer_kind, mode, layer_options)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"cannot swap {info.name}: {exc}") from exc
        replacements[index] = new
        built.append((a, b, new))
        report.rows.append(row)


def _build(layer, info: LayerInfo, a, b, kind: str, mode: str, options: dict):
    structlayers.get(kind)  # unknown kinds fail with the registry's message
    if mode == "live" and kind in TorchLiveSquareSumLayer.KINDS:
        return _build_live_square(layer, info, a, b, kind, options)
    if mode == "live":
        if kind not in LIVE_KINDS:
            raise ValueError(f"mode='live' recomputes the layer from the circuit's parameters at every "
                             f"forward; supported kinds: {', '.join(LIVE_KINDS)} and, as square "
                             f"approximations (square_policy), {', '.join(TorchLiveSquareSumLayer.KINDS)} "
                             f"(got {kind!r}); use mode='frozen' for other approximations")
        if options:
            raise ValueError(f"the live kronecker layer is exact and takes no options, got {sorted(options)}")
        new = TorchKroneckerSumLayer(layer.num_input_units, layer.num_output_units, layer.arity,
                                     weight=layer.weight, semiring=layer.semiring, num_folds=layer.num_folds)
        return new, SwapRow(info, kind, mode, 1, 0, kron_chain_flops([a], [b]), 0.0)
    structured = structlayers.from_kronecker(kind, a.detach().clone(), b.detach().clone(), **options)
    new = TorchStructuredSumLayer(layer.num_input_units, layer.num_output_units, layer.arity,
                                  structured=structured, semiring=layer.semiring, num_folds=layer.num_folds)
    rank = getattr(structured, "rank", None)
    exact = structlayers.get(kind).exact_from_kronecker and not options
    error = 0.0 if exact else structured.relative_error_kronecker(a, b)
    row = SwapRow(info, kind, mode, rank if isinstance(rank, int) else None, structured.num_params,
                  structured.flops(1) // structured.num_folds, error)
    return new, row


def _build_live_square(layer, info: LayerInfo, a, b, kind: str, options: dict):
    """A :class:`TorchLiveSquareSumLayer`; the options are those :func:`square_policy` gives."""
    if not options.get("square") or "factor_ranks" not in options:
        raise ValueError(f"mode='live' with {kind!r} keeps the layer a square Ã ⊗ conj(Ã): use "
                         f"square_policy({kind!r}, rank) (got options {sorted(options)})")
    allowed = {"square", "factor_ranks", "strategy", "oversampling", "seed"} if kind == "nystrom" \
        else {"square", "factor_ranks"}
    if set(options) - allowed:
        raise ValueError(f"live {kind} takes options {sorted(allowed)}, got {sorted(options)}")
    rank = options["factor_ranks"][0]
    # the frozen layer validates the options and gives the error at build time
    frozen = structlayers.from_kronecker(kind, a, b, **{"seed": 0, **options} if kind == "nystrom" else options)
    extra = {k: options[k] for k in ("strategy", "oversampling") if k in options}
    new = TorchLiveSquareSumLayer(layer.num_input_units, layer.num_output_units, layer.arity,
                                  weight=layer.weight, kind=kind, factor_rank=rank, seed=options.get("seed", 0),
                                  semiring=layer.semiring, num_folds=layer.num_folds, **extra)
    left, right = a[:, :, :rank], a[:, :rank, :]  # shapes only, for the multiply-add count
    flops = kron_chain_flops([left, right], [left, right])
    return new, SwapRow(info, kind, "live", rank * rank, 0, flops, frozen.relative_error_kronecker(a, b))
