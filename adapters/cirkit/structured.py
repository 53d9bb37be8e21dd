"""Structured circuits: any kind of the zoo as a circuit's own sum layers.

A sum layer of the base circuit ``c`` with a structured weight ``S`` (``K_out x K_in``,
any registered kind) costs ``S.flops`` per sample instead of ``K_out·K_in``; its
counterpart in ``|c|²`` and ``∫|c|²`` is ``conj(S) ⊗ S``, applied as ``conj(S) X Sᵀ`` through
the same module (:class:`~adapters.cirkit.layers.TorchStructuredSquareSumLayer`), about
``2·K_in·flops(S)`` per sample instead of ``2·K³``. The three circuits share one set of
structured parameters, so training ``c`` through ``2 Re log c(x) − log Z`` trains a
normalised density.

:func:`structure_density` does this to a :class:`~adapters.cirkit.model.CircuitDensity`
compiled with ``optimize=False`` (plain sum layers in ``c``), in place and all or nothing;
:func:`compile_structured` compiles and structures in one call.

**Initialisation.** ``S = kind.from_dense(W, **options)`` of the dense weight cirkit
initialised (the kind's best approximation of it within the options' budget). Squared
circuits are invariant to the scale of each layer (``|c|²/Z`` is multilinear in every
layer's weight and normalised), so what matters for training is that the initial
directions are generic and the values finite: both hold, and the linear-space
evaluation carries any scale without overflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from cirkit.backend.torch.layers import TorchSumLayer
from cirkit.backend.torch.parameters.nodes import TorchTensorParameter
from cirkit.symbolic.circuit import Circuit

import structlayers

from .internals import node_tensor, replace_layers
from .layers import TorchKroneckerSumLayer, TorchStructuredSquareSumLayer, TorchStructuredSumLayer
from .model import CircuitDensity, compile_density
from .plan import kronecker_leaf_factors
from .swap import SwapReport

__all__ = ["SumLayerInfo", "StructureRow", "StructureReport", "structure_policy", "structure_density",
           "compile_structured", "approximate_density"]


@dataclass(frozen=True)
class SumLayerInfo:
    """What a structure policy sees of one folded sum layer of ``c``."""

    index: int  # position in c's layers
    num_folds: int
    out_features: int
    in_features: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"layer {self.index} ({self.num_folds} folds, {self.out_features}x{self.in_features})"


Choice = Optional[Union[str, Tuple[str, dict]]]
StructurePolicy = Union[str, Callable[[SumLayerInfo], Choice]]


def structure_policy(kind: str, **options) -> Callable[[SumLayerInfo], Choice]:
    """``kind`` with ``options`` for every sum layer it makes cheaper than dense; the others
    (e.g. a ``1 x K`` root, or a rank at least the layer's) stay dense. ``rank`` may be a
    float: a fraction of ``min(out, in)`` (``rank=1/8`` is K/8 on a ``K x K`` layer)."""
    cls = structlayers.get(kind)

    def policy(info: SumLayerInfo) -> Choice:
        opts = dict(options)
        rank = opts.get("rank")
        if isinstance(rank, float):
            opts["rank"] = max(1, int(round(rank * min(info.out_features, info.in_features))))
        if "rank" in opts and cls.rank_is_matrix_rank and opts["rank"] >= min(info.out_features, info.in_features):
            return None
        if min(info.out_features, info.in_features) < 2:
            return None
        return kind, opts

    return policy


@dataclass
class StructureRow:
    info: SumLayerInfo
    kind: str
    params: int
    dense_params: int
    flops_per_sample: int
    dense_flops_per_sample: int
    squared_layers: int  # layers of |c|² and Z that apply this S


@dataclass
class StructureReport:
    rows: List[StructureRow] = field(default_factory=list)
    kept: List[SumLayerInfo] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows) + sum(i.num_folds * i.out_features * i.in_features for i in self.kept)

    def __str__(self) -> str:
        lines = [f"{'layer':>5s} {'folds':>5s} {'shape':>9s} {'kind':10s} {'params':>9s} {'dense':>9s} "
                 f"{'MACs/s':>9s} {'dense':>9s} {'squared':>7s}"]
        for r in self.rows:
            i = r.info
            lines.append(f"{i.index:5d} {i.num_folds:5d} {f'{i.out_features}x{i.in_features}':>9s} {r.kind:10s} "
                         f"{r.params:9d} {r.dense_params:9d} {r.flops_per_sample:9d} {r.dense_flops_per_sample:9d} "
                         f"{r.squared_layers:7d}")
        lines += [f"{i.index:5d} kept dense: {i.name}" for i in self.kept]
        return "\n".join(lines)


def _leaf_of(layer) -> Optional[object]:
    """The ``TorchTensorParameter`` a plain sum layer's weight is (None if it is computed)."""
    nodes = list(layer.weight.nodes)
    return nodes[0] if len(nodes) == 1 and isinstance(nodes[0], TorchTensorParameter) else None


def structure_density(model: CircuitDensity, policy: StructurePolicy) -> StructureReport:
    """Give ``model``'s base circuit structured sum layers and its density and partition
    function the matching squared layers, sharing one set of parameters. In place; every
    replacement is built before any is installed, and an error leaves the model as it was.

    ``model``: a squared :class:`CircuitDensity` compiled with ``optimize=False`` (so that
    ``c`` has plain, arity-1 sum layers; :func:`compile_structured` does that).
    ``policy``: a kind name, or ``f(SumLayerInfo)`` returning a kind, ``(kind, options)``
    or None to keep that layer dense (see :func:`structure_policy`).
    """
    if not isinstance(model, CircuitDensity) or not model.squared:
        raise TypeError("structure_density needs a squared CircuitDensity (compile_density(c) / compile_structured)")
    report = StructureReport()
    by_leaf: Dict[int, Tuple[int, structlayers.StructuredSumLayer]] = {}
    base_new: Dict[object, object] = {}
    for index, layer in enumerate(model.base.layers):
        if not isinstance(layer, TorchSumLayer):
            continue
        leaf = _leaf_of(layer)
        if leaf is None or layer.arity != 1:
            raise ValueError(f"layer {index} of c ({type(layer).__name__}, arity {layer.arity}) is not a plain "
                             "arity-1 sum layer with a tensor weight: compile c with optimize=False and "
                             "signed or complex weights (weight_activation='none')")
        w = node_tensor(leaf).detach()  # (F, Ko, Ki)
        info = SumLayerInfo(index, layer.num_folds, w.shape[1], w.shape[2], w.dtype)
        choice = policy(info) if callable(policy) else policy
        if choice is None:
            report.kept.append(info)
            continue
        kind, options = (choice, {}) if isinstance(choice, str) else choice
        try:
            s = structlayers.from_dense(kind, w.clone(), **options)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"cannot structure {info.name} as {kind!r}: {exc}") from exc
        by_leaf[id(leaf)] = (len(report.rows), s)
        base_new[layer] = TorchStructuredSumLayer(layer.num_input_units, layer.num_output_units, layer.arity,
                                                  structured=s, semiring=layer.semiring, num_folds=layer.num_folds)
        report.rows.append(StructureRow(info, kind, s.num_params, w.numel(), s.flops(1) // layer.num_folds,
                                        info.out_features * info.in_features, 0))
    squared_new: List[Dict[object, object]] = []
    for circuit in (model.density, model.partition):
        mapping: Dict[object, object] = {}
        for index, layer in enumerate(circuit.layers):
            if not isinstance(layer, TorchKroneckerSumLayer):
                continue
            factors = kronecker_leaf_factors(layer.weight)
            touched = factors is not None and any(id(leaf) in by_leaf for leaf, _, _ in factors)
            if not touched:
                continue
            (la, ra, ca), (lb, rb, cb) = factors
            if la is not lb or not (ra == rb).all() or ca == cb:
                raise ValueError(f"layer {index} of a squared circuit is not conj(W) ⊗ W of one layer of c: "
                                 "it cannot share a structured layer")
            row, s = by_leaf[id(la)]
            mapping[layer] = TorchStructuredSquareSumLayer(
                layer.num_input_units, layer.num_output_units, layer.arity, structured=s,
                fold_rows=torch.as_tensor(ra), conjugate_left=ca, semiring=layer.semiring, num_folds=layer.num_folds)
            report.rows[row].squared_layers += 1
        squared_new.append(mapping)
    for row in report.rows:
        if row.squared_layers == 0:
            raise ValueError(f"{row.info.name} of c has no squared counterpart in |c|² or Z: the density would "
                             "not follow c")
    replace_layers(model.base, base_new)
    replace_layers(model.density, squared_new[0])
    replace_layers(model.partition, squared_new[1])
    model._logz_cache = None
    return report


def compile_structured(circuit: Circuit, policy: StructurePolicy, **options) -> Tuple[CircuitDensity, StructureReport]:
    """:func:`~adapters.cirkit.model.compile_density` (``optimize=False``, squared) then
    :func:`structure_density` with ``policy``: a squared circuit whose sum layers are
    structured kinds, trained through ``c``. ``options`` go to ``compile_density``."""
    if options.get("optimize"):
        raise ValueError("structured circuits compile with optimize=False (c keeps plain sum layers)")
    options["optimize"] = False
    model = compile_density(circuit, **options)
    return model, structure_density(model, policy)


#: Pivot strategies that choose the same pivots whatever the fold order and conjugation.
DETERMINISTIC_STRATEGIES = ("qr", "deim")


def approximate_density(model: CircuitDensity, policy) -> SwapReport:
    """Live square approximations applied consistently to ``c``, ``|c|²`` and ``Z``.

    ``policy``: :func:`~adapters.cirkit.swap.square_policy` (or any policy giving ``lowrank``
    or ``nystrom`` with ``factor_ranks=(r, r), square=True``). Every Kronecker sum layer
    ``conj(W) ⊗ W`` of ``|c|²`` and ``Z`` becomes ``conj(W̃) ⊗ W̃`` recomputed from the live
    ``W`` at every forward (:class:`~adapters.cirkit.layers.TorchLiveSquareSumLayer`), and the
    layer of ``c`` holding ``W`` applies ``W̃`` (:class:`~adapters.cirkit.layers.TorchLiveApproxSumLayer`).
    Training ``c`` through ``2 Re log c̃(x) − log Z̃`` then optimises a true normalised
    density. In place, all or nothing; returns the swap report of ``|c|²`` and ``Z``.
    """
    from .layers import TorchLiveApproxSumLayer
    from .swap import LayerInfo, kronecker_sum_layers, swap_kronecker_sum_layers

    if not isinstance(model, CircuitDensity) or not model.squared:
        raise TypeError("approximate_density needs a squared CircuitDensity")
    leaves = {id(_leaf_of(layer)): (i, layer) for i, layer in enumerate(model.base.layers)
              if isinstance(layer, TorchSumLayer) and _leaf_of(layer) is not None}
    decided: Dict[int, tuple] = {}
    for circuit in (model.density, model.partition):
        for index, layer in kronecker_sum_layers(circuit):
            factors = kronecker_leaf_factors(layer.weight)
            if factors is None or id(factors[0][0]) not in leaves:
                continue
            a_shape = (int(factors[0][1].size), *node_tensor(factors[0][0]).shape[1:])
            info = LayerInfo(index=index, num_folds=layer.num_folds, out_features=layer.num_output_units,
                             in_features=layer.num_input_units * layer.arity, factor_a=tuple(a_shape[1:]),
                             factor_b=tuple(a_shape[1:]), dtype=node_tensor(factors[0][0]).dtype, conjugate_pair=True)
            choice = policy(info) if callable(policy) else policy
            key = id(factors[0][0])
            if key in decided and decided[key] != choice:
                raise ValueError(f"the policy treats the squares of one layer of c differently ({choice} and "
                                 f"{decided[key]}): c could not follow them")
            decided[key] = choice
    base_new = {}
    for key, choice in decided.items():
        if choice is None or isinstance(choice, str) or choice[0] == "kronecker":
            continue  # exact: c keeps its layer
        kind, options = choice
        strategy = options.get("strategy", "qr")
        if kind == "nystrom" and strategy not in DETERMINISTIC_STRATEGIES:
            raise ValueError(f"a live nystrom approximation shared by c, |c|² and Z needs a deterministic pivot "
                             f"strategy ({', '.join(DETERMINISTIC_STRATEGIES)}), got {strategy!r}")
        index, layer = leaves[key]
        base_new[layer] = TorchLiveApproxSumLayer(
            layer.num_input_units, layer.num_output_units, layer.arity, weight=layer.weight, kind=kind,
            factor_rank=options["factor_ranks"][0], strategy=strategy, oversampling=options.get("oversampling", 2.0),
            seed=options.get("seed", 0), semiring=layer.semiring, num_folds=layer.num_folds)
    report = swap_kronecker_sum_layers([model.density, model.partition], policy, mode="live")
    replace_layers(model.base, base_new)
    model._logz_cache = None
    model.mark_consistent()
    return report
