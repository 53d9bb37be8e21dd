"""Ready-made cirkit circuits, data loaders and a training loop for squared circuits.

This module builds the circuits that the structured-layer experiments run on, with
cirkit (PyPI ``libcirkit`` 0.3.1) doing all the circuit work through its public API:

* :func:`one_sum_circuit`: one sum layer over one product of input layers, the smallest
  circuit whose square has exactly one Kronecker-weighted sum layer (for benchmarks).
* :func:`deep_cp_circuit`: a CP circuit over a random-binary-tree or linear-tree region graph.
* :func:`digits_squared_circuit`: the squared density circuit ``c²/Z`` over the 8x8 digits.
* :func:`digits_classifier_circuit`: ten class-conditional densities over the 8x8 digits.
* :func:`digits_data`, :func:`load_mnist`: data as integer tensors, never downloaded.
* :func:`train_squared_circuit`, :func:`train_classifier_circuit`: Adam on the exact NLL.
* :func:`trained_digits_model`: train once, cache ``state_dict`` + config on disk.

Every builder returns a :class:`CircuitModel`: the symbolic circuit ``c``, its square
``c²`` (``multiply(c, c)`` for real weights, ``multiply(conjugate(c), c)`` for complex
ones; ``None`` for a monotone model, whose density is ``c`` itself) and the symbolic
partition function ``Z = integrate(density)``. :meth:`CircuitModel.compile` compiles the
density and ``Z`` in one :class:`cirkit.pipeline.PipelineContext`, so they share the base
circuit's parameter tensors, and wraps them in a :class:`CompiledCircuitModel`
(a ``torch.nn.Module`` whose ``forward`` is the normalised log-likelihood).

Shapes used throughout: ``x`` is a LongTensor ``(B, D)`` of category indices, ``O`` is
the number of outputs of ``c`` (1 for a density, 10 for the classifier), and every
log-quantity returned by :class:`CompiledCircuitModel` is real.

Semirings and parameterisations (see ``/tmp/notes/cirkit.md`` section 0):

* signed real sum weights (``weight_activation='none'``, the default for squared circuits)
  and complex weights need ``semiring='complex-lse-sum'``: ``lse-sum`` takes the log of
  negative numbers and returns NaN, and ``sum-product`` underflows on 64 variables;
* positive weights (``'softmax'``, ``'softplus'``, ``'positive-clamp'``, ``'sigmoid'``)
  work in the faster ``'lse-sum'``;
* ``'sum-product'`` is accepted for real weights but only makes sense for tiny circuits.

cirkit is GPLv3; this module only calls its API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

import cirkit.symbolic.functional as SF
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.circuit import Circuit
from cirkit.symbolic.layers import (
    CategoricalLayer,
    HadamardLayer,
    KroneckerLayer,
    SumLayer,
)
from cirkit.templates.region_graph import (
    LinearTree,
    PoonDomingos,
    QuadGraph,
    QuadTree,
    RandomBinaryTree,
    RegionGraph,
)
from cirkit.templates.utils import Parameterization, parameterization_to_factory
from cirkit.utils.scope import Scope

from .linear_space import evaluate_linear_space
from .swap import swap_kronecker_sum_layers

__all__ = [
    "CircuitModel",
    "CompiledCircuitModel",
    "DataSplits",
    "TrainingHistory",
    "TrainedModel",
    "REGION_GRAPHS",
    "SQUARABLE_REGION_GRAPHS",
    "SUM_PRODUCT_LAYERS",
    "WEIGHT_ACTIVATIONS",
    "SEMIRINGS",
    "one_sum_circuit",
    "deep_cp_circuit",
    "digits_squared_circuit",
    "digits_classifier_circuit",
    "digits_data",
    "load_mnist",
    "evaluate_nll",
    "evaluate_accuracy",
    "train_squared_circuit",
    "train_classifier_circuit",
    "trained_digits_model",
    "default_cache_dir",
    "cache_key",
    "squared_weight_entries",
]

#: Region graphs whose circuits are structured-decomposable, hence can be squared.
SQUARABLE_REGION_GRAPHS = ("quad-tree-2", "quad-tree-4", "random-binary-tree", "linear-tree")
#: All region graphs the image builders know. 'quad-graph' and 'poon-domingos' are
#: decomposable but not structured-decomposable: only monotone (unsquared) models use them.
REGION_GRAPHS = SQUARABLE_REGION_GRAPHS + ("quad-graph", "poon-domingos")
SUM_PRODUCT_LAYERS = ("cp", "cp-t", "tucker")
WEIGHT_ACTIVATIONS = ("none", "softmax", "softplus", "positive-clamp", "sigmoid")
SEMIRINGS = ("complex-lse-sum", "lse-sum", "sum-product")
EVALUATIONS = ("semiring", "linear")

#: Refuse to square circuits for which cirkit would build more constant permutation
#: weight entries than this when squaring (see :func:`squared_weight_entries`; read at
#: call time, so it can be raised). 2**28 entries are 2 GiB as complex64. A Tucker
#: quad-tree-2 at K=8 needs 1.1e9 (its 63 squared Kronecker product layers each add a
#: 4096 x 4096 constant permutation); Tucker on quad-tree-4 needs 9e8 already at K=3. CP
#: and CP-T circuits need none (their Kronecker sum weights, 2.1e9 entries for the digits
#: circuit at K=64, are formed only by cirkit's optimize=False forward).
MAX_SQUARED_WEIGHT_ENTRIES = 2**28

DIGITS_SHAPE = (8, 8)
DIGITS_CATEGORIES = 17
DIGITS_CLASSES = 10

_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------
# Symbolic construction
# --------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


def _weight_factory(complex_weights: bool, activation: str, init: str):
    _check_choice("weight_activation", activation, WEIGHT_ACTIVATIONS)
    _check_choice("weight_init", init, ("normal", "uniform", "dirichlet"))
    if complex_weights and activation != "none":
        raise ValueError(
            f"complex sum weights take no activation (got weight_activation={activation!r}); "
            "use weight_activation='none'"
        )
    return parameterization_to_factory(
        Parameterization(
            initialization=init,
            activation=activation,
            dtype="complex" if complex_weights else "real",
        )
    )


def _default_semiring(complex_weights: bool, activation: str) -> str:
    """'complex-lse-sum' for weights that can be negative or complex, 'lse-sum' otherwise."""
    return "complex-lse-sum" if complex_weights or activation == "none" else "lse-sum"


def _image_region_graph(name: str, image_shape: tuple[int, int], rg_seed: int) -> RegionGraph:
    _check_choice("region graph", name, REGION_GRAPHS)
    shape = (1, int(image_shape[0]), int(image_shape[1]))
    num_variables = shape[1] * shape[2]
    if name == "quad-tree-2":
        return QuadTree(shape, num_patch_splits=2)
    if name == "quad-tree-4":
        return QuadTree(shape, num_patch_splits=4)
    if name == "random-binary-tree":
        return RandomBinaryTree(num_variables, num_repetitions=1, seed=rg_seed)
    if name == "linear-tree":
        return LinearTree(num_variables, num_repetitions=1)
    if name == "quad-graph":
        return QuadGraph(shape)
    delta = int(max(math.ceil(shape[1] / 8), math.ceil(shape[2] / 8)))
    return PoonDomingos(shape, delta=delta)


def squared_weight_entries(c: Circuit, *, sum_layers: bool = True) -> int:
    """Total entries of the dense weights cirkit 0.3.1 materialises for ``c²``.

    Each sum layer of ``c`` (weight ``Ko x arity·Ki``) becomes one with the Kronecker
    weight ``Ko² x (arity·Ki)²`` (formed by cirkit's ``optimize=False`` forward; left out
    with ``sum_layers=False``). Each Kronecker product layer (Tucker) of arity ``a`` over
    ``Ki`` units becomes a Kronecker layer over ``Ki²`` units *followed by a constant
    permutation sum layer* of ``(Ki**(2a))²`` entries (``multiply_kronecker_layers``),
    built when the circuit is squared.
    """
    total = 0
    for sl in c.layers:
        if isinstance(sl, SumLayer) and sum_layers:
            total += (sl.num_output_units**2) * (sl.arity * sl.num_input_units) ** 2
        elif isinstance(sl, KroneckerLayer):
            total += (sl.num_input_units ** (2 * sl.arity)) ** 2
    return total


def _check_squarable(c: Circuit, what: str) -> None:
    """Raise ValueError for circuits cirkit 0.3.1 cannot square (correctly / feasibly)."""
    if not c.properties.structured_decomposable:
        raise ValueError(
            f"{what} cannot be squared: the circuit is not structured-decomposable, so cirkit's "
            f"multiply(c, c) is undefined (use one of {', '.join(SQUARABLE_REGION_GRAPHS)}, "
            "or a monotone model)"
        )
    for sl in c.layers:
        if isinstance(sl, SumLayer) and sl.arity > 1 and sl.num_input_units > 1:
            # cirkit 0.3.1 orders kron(W1, W2) columns differently from the product of
            # the inputs for such layers (notes, section 0): the square would be wrong.
            raise ValueError(
                f"{what} cannot be squared: it has an n-ary (mixing) sum layer with arity "
                f"{sl.arity} over {sl.num_input_units} units, which cirkit 0.3.1 squares wrongly"
            )
    # Only the permutation layers are built when cirkit squares the circuit; Kronecker sum
    # weights are formed only by cirkit's optimize=False forward, never by this package.
    entries = squared_weight_entries(c, sum_layers=False)
    if entries > MAX_SQUARED_WEIGHT_ENTRIES:
        raise ValueError(
            f"{what} is too large to square: cirkit would materialise {entries:,} weight "
            f"entries for c² (limit models.MAX_SQUARED_WEIGHT_ENTRIES = "
            f"{MAX_SQUARED_WEIGHT_ENTRIES:,}); squaring a Tucker (Kronecker) layer of arity a "
            "over K units adds a dense K**(2a) x K**(2a) permutation layer -- use 'cp' or "
            "'cp-t', a binary region graph, or fewer units"
        )


@dataclass(frozen=True, eq=False)
class CircuitModel:
    """Symbolic circuits of a normalisable model ``p_o(x) = f_o(x) / Z_o``, ``o < O``.

    Attributes:
        circuit: the base circuit ``c``: one output layer of ``O`` units, or (per-output
            circuits, e.g. an unshared classifier) ``SF.concatenate`` of ``O`` one-unit
            circuits ``c_o``.
        squared: ``c²`` -- ``multiply(c, c)`` (real weights) or
            ``multiply(conjugate(c), c)`` (complex weights); for one ``O``-unit output
            it has ``O²`` units ordered ``o1·O + o2``, for concatenated circuits it is
            the concatenation of the ``O`` squares. ``None`` for a monotone model
            (then ``f = c``).
        partition: ``integrate(f)`` over all variables, ``f = squared or circuit``:
            a circuit with no inputs and the same outputs as ``f``.
        num_variables: ``D``, the number of variables (columns of ``x``).
        num_categories: categories of every categorical input (values ``0..V-1``).
        num_outputs: ``O``.
        complex_weights: whether the sum weights of ``c`` are complex.
        weight_activation: the activation on the sum weights ('none' = signed).
        default_semiring: the semiring :meth:`compile` uses when none is given.
        density_index: which of ``f``'s flattened outputs are ``f_0 .. f_{O-1}``
            (the diagonal ``o·(O+1)`` for a squared ``O``-unit output).
        config: the builder's arguments (JSON-serialisable), e.g. for cache keys.
    """

    circuit: Circuit
    squared: Circuit | None
    partition: Circuit
    num_variables: int
    num_categories: int
    num_outputs: int
    complex_weights: bool
    weight_activation: str
    default_semiring: str
    density_index: tuple[int, ...] = (0,)
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_squared(self) -> bool:
        return self.squared is not None

    @property
    def density(self) -> Circuit:
        """The unnormalised density ``f``: ``c²`` for squared models, ``c`` otherwise."""
        return self.squared if self.squared is not None else self.circuit

    def compile(
        self,
        semiring: str | None = None,
        *,
        fold: bool = True,
        optimize: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        context: PipelineContext | None = None,
        evaluation: str = "semiring",
    ) -> "CompiledCircuitModel":
        """Compile ``f`` then ``Z`` in one pipeline context, so they share parameters.

        Args:
            semiring: 'complex-lse-sum', 'lse-sum' or 'sum-product'; defaults to
                :attr:`default_semiring`. 'lse-sum' and 'sum-product' are refused for
                weights they cannot represent (signed in lse-sum, complex in both).
            fold, optimize: cirkit's compiler flags (``optimize=True`` shatters squared
                sum layers into two TensorDot layers; ``False`` is faster for ``c²(x)``
                at K<=16, see the notes, section 6).
            dtype: ``torch.float32`` or ``torch.float64``; the parameters are created in
                it (complex weights in the matching complex dtype) and every evaluation
                runs with it as torch's default dtype. Fixed for the compiled model.
            seed: if given, parameters are initialised under ``torch.manual_seed(seed)``
                (the global RNG state is restored afterwards), so equal seeds give equal
                parameters.
            context: an existing :class:`PipelineContext` to compile in (e.g. one with
                extra compilation rules); then ``semiring``, ``fold`` and ``optimize``
                must be left at their defaults and the context's own settings apply.
            evaluation: see :attr:`CompiledCircuitModel.evaluation`.

        Returns:
            A :class:`CompiledCircuitModel`. Its ``base`` (compiled ``c``), ``density``
            and ``partition`` hold the *same* parameter tensors (``density`` and
            ``partition`` point at ``base``'s tensors), so a gradient step on the
            log-likelihood moves all three consistently.
        """
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if context is not None:
            if semiring is not None or not fold or optimize:
                raise ValueError("pass either context= or semiring/fold/optimize, not both")
            semiring = _semiring_name_of(context)
            ctx = context
        else:
            semiring = self.default_semiring if semiring is None else semiring
            _check_choice("semiring", semiring, SEMIRINGS)
            ctx = PipelineContext(backend="torch", semiring=semiring, fold=fold, optimize=optimize)
        self._check_semiring(semiring)
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng, _default_dtype(dtype):
            if seed is not None:
                torch.manual_seed(seed)
            # c first: its tensors are allocated and initialised here; f = c² and Z only
            # point at them (a concatenation of squares does not compile concat(c_o))
            base = ctx.compile(self.circuit)
            density = ctx.compile(self.density)
            partition = ctx.compile(self.partition)
        return CompiledCircuitModel(self, base, density, partition, semiring=semiring, dtype=dtype,
                                    evaluation=evaluation)

    def _check_semiring(self, semiring: str) -> None:
        if semiring == "complex-lse-sum":
            return
        if self.complex_weights:
            raise ValueError(
                f"complex sum weights need semiring 'complex-lse-sum', not {semiring!r}"
            )
        if semiring == "lse-sum" and self.weight_activation == "none":
            raise ValueError(
                "signed real sum weights (weight_activation='none') need semiring "
                "'complex-lse-sum': 'lse-sum' takes the log of negative values and returns NaN"
            )


def _semiring_name_of(ctx: PipelineContext) -> str:
    impl = ctx._compiler.semiring  # noqa: SLF001 -- cirkit has no public accessor
    from cirkit.backend.torch.semiring import (
        ComplexLSESumSemiring,
        LSESumSemiring,
        SumProductSemiring,
    )

    names = {
        ComplexLSESumSemiring: "complex-lse-sum",
        LSESumSemiring: "lse-sum",
        SumProductSemiring: "sum-product",
    }
    for cls, name in names.items():
        if isinstance(impl, type) and issubclass(impl, cls):
            return name
    raise ValueError(f"unsupported semiring {impl!r} in the given context")


def _make_model(
    circuits: Sequence[Circuit],
    *,
    squared: bool,
    complex_weights: bool,
    weight_activation: str,
    num_categories: int,
    num_outputs: int,
    what: str,
    config: Mapping[str, Any],
) -> CircuitModel:
    """One circuit with ``num_outputs`` units, or ``num_outputs`` one-output circuits."""
    concat = len(circuits) > 1
    if squared:
        for c in circuits:
            _check_squarable(c, what)
        squares = [SF.multiply(SF.conjugate(c), c) if complex_weights else SF.multiply(c, c)
                   for c in circuits]
    elif complex_weights or weight_activation == "none":
        raise ValueError(
            "a monotone (unsquared) model needs non-negative sum weights: use "
            "complex=False and a positive weight_activation such as 'softmax'"
        )
    base = SF.concatenate(circuits) if concat else circuits[0]
    csq = None
    if squared:
        csq = SF.concatenate(squares) if concat else squares[0]
    density = csq if csq is not None else base
    if squared and not concat:  # c² of an O-unit output has O² units o1·O + o2: the diagonal
        index = tuple(o * (num_outputs + 1) for o in range(num_outputs))
    else:
        index = tuple(range(num_outputs))
    return CircuitModel(
        circuit=base,
        squared=csq,
        partition=SF.integrate(density),
        num_variables=len(base.scope),
        num_categories=num_categories,
        num_outputs=num_outputs,
        complex_weights=complex_weights,
        weight_activation=weight_activation,
        default_semiring=_default_semiring(complex_weights, weight_activation),
        density_index=index,
        config=dict(config),
    )


def _categorical_factory(num_categories: int):
    if num_categories < 2:
        raise ValueError(f"num_categories must be at least 2, got {num_categories}")
    return functools.partial(CategoricalLayer, num_categories=num_categories)


def _check_positive(**kw: int) -> None:
    for name, value in kw.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def one_sum_circuit(
    num_units: int,
    *,
    num_variables: int = 2,
    num_categories: int = 4,
    num_outputs: int | None = None,
    product: str = "hadamard",
    complex: bool = False,  # noqa: A002 -- the name the callers use
    weight_activation: str = "none",
    weight_init: str = "normal",
    squared: bool = True,
) -> CircuitModel:
    """The smallest circuit whose square has exactly one Kronecker-weighted sum layer.

    ``c(x) = W · prod_i e_i(x_i)``: ``num_variables`` categorical input layers of
    ``num_units`` units each, one product layer, and one sum layer with weight ``W`` of
    shape ``(O, Ki)``, ``O = num_outputs`` (default ``num_units``) and ``Ki = num_units``
    (``product='hadamard'``) or ``num_units**num_variables`` (``'kronecker'``).

    After squaring, the single sum layer of ``c²`` has the weight ``W ⊗ W`` (or
    ``conj(W) ⊗ W``) of shape ``(O², Ki²)``: with the defaults, a ``K² x K²`` Kronecker
    layer over ``2K²`` categorical input units -- a benchmark for one such layer.

    Returns:
        A :class:`CircuitModel` with ``O = num_outputs`` outputs; ``squared=False`` gives
        the monotone model (needs a positive ``weight_activation``).
    """
    _check_positive(num_units=num_units, num_variables=num_variables)
    _check_choice("product", product, ("hadamard", "kronecker"))
    num_outputs = num_units if num_outputs is None else num_outputs
    _check_positive(num_outputs=num_outputs)
    wf = _weight_factory(complex, weight_activation, weight_init)
    make_input = _categorical_factory(num_categories)
    inputs = [make_input(Scope([i]), num_units) for i in range(num_variables)]
    if product == "hadamard":
        prod = HadamardLayer(num_units, arity=num_variables)
    else:
        prod = KroneckerLayer(num_units, arity=num_variables)
    top = SumLayer(prod.num_output_units, num_outputs, arity=1, weight_factory=wf)
    c = Circuit([*inputs, prod, top], {prod: inputs, top: [prod]}, outputs=[top])
    config = dict(builder="one_sum_circuit", num_units=num_units, num_variables=num_variables,
                  num_categories=num_categories, num_outputs=num_outputs, product=product,
                  complex=complex, weight_activation=weight_activation, weight_init=weight_init,
                  squared=squared)
    return _make_model([c], squared=squared, complex_weights=complex,
                       weight_activation=weight_activation, num_categories=num_categories,
                       num_outputs=num_outputs, what="this one-sum circuit", config=config)


def deep_cp_circuit(
    num_variables: int,
    num_units: int,
    depth: int | None = None,
    *,
    region_graph: str = "random-binary-tree",
    num_categories: int = 2,
    num_outputs: int = 1,
    complex: bool = False,  # noqa: A002
    weight_activation: str = "none",
    weight_init: str = "normal",
    rg_seed: int = 42,
    squared: bool = True,
) -> CircuitModel:
    """A deep CP circuit over ``num_variables`` categorical variables.

    Region graphs:

    * ``'random-binary-tree'``: cirkit's ``RandomBinaryTree(D, depth=depth, seed=rg_seed)``
      (one repetition, so no mixing layers). ``depth=None`` is the maximum,
      ``ceil(log2 D)``; a smaller depth leaves multivariate leaf regions, which are
      fully factorised into products of univariate categoricals.
    * ``'linear-tree'``: ``LinearTree(D)``, the HMM-like chain; its depth is always
      ``D - 1``, so ``depth`` must be ``None`` or ``D - 1``.

    Every region gets ``num_units`` categorical units (leaves) or a CP block: one
    ``K x K`` sum layer per child then a Hadamard product; the root's last sum layer has
    ``num_outputs`` units. Both region graphs are structured-decomposable, so the circuit
    can be squared.
    """
    _check_positive(num_variables=num_variables, num_units=num_units, num_outputs=num_outputs)
    _check_choice("region graph", region_graph, ("random-binary-tree", "linear-tree"))
    if num_variables < 2:
        raise ValueError("deep_cp_circuit needs at least 2 variables")
    if region_graph == "random-binary-tree":
        max_depth = int(math.ceil(math.log2(num_variables)))
        if depth is not None and not 1 <= depth <= max_depth:
            raise ValueError(f"depth must be in [1, {max_depth}] for {num_variables} variables, got {depth}")
        rg = RandomBinaryTree(num_variables, depth=depth, num_repetitions=1, seed=rg_seed)
    else:
        if depth is not None and depth != num_variables - 1:
            raise ValueError(
                f"a linear tree over {num_variables} variables has depth {num_variables - 1}, "
                f"got depth={depth}"
            )
        rg = LinearTree(num_variables, num_repetitions=1)
    wf = _weight_factory(complex, weight_activation, weight_init)
    c = rg.build_circuit(
        input_factory=_categorical_factory(num_categories),
        sum_product="cp",
        sum_weight_factory=wf,
        num_input_units=num_units,
        num_sum_units=num_units,
        num_classes=num_outputs,
    )
    config = dict(builder="deep_cp_circuit", num_variables=num_variables, num_units=num_units,
                  depth=depth, region_graph=region_graph, num_categories=num_categories,
                  num_outputs=num_outputs, complex=complex, weight_activation=weight_activation,
                  weight_init=weight_init, rg_seed=rg_seed, squared=squared)
    return _make_model([c], squared=squared, complex_weights=complex,
                       weight_activation=weight_activation, num_categories=num_categories,
                       num_outputs=num_outputs, what=f"a CP circuit on {region_graph!r}",
                       config=config)


def _image_circuit(
    num_units: int,
    *,
    region_graph: str,
    layer: str,
    complex_weights: bool,
    weight_activation: str,
    weight_init: str,
    image_shape: tuple[int, int],
    num_categories: int,
    num_classes: int,
    rg_seed: int,
    squared: bool,
    builder: str,
    shared: bool = True,
) -> CircuitModel:
    _check_positive(num_units=num_units, num_classes=num_classes)
    _check_choice("region graph", region_graph, REGION_GRAPHS)
    _check_choice("sum-product layer", layer, SUM_PRODUCT_LAYERS)
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (height, width), got {image_shape!r}")
    what = f"the {layer!r} circuit on region graph {region_graph!r}"
    if squared and region_graph not in SQUARABLE_REGION_GRAPHS:
        raise ValueError(
            f"{what} cannot be squared: {region_graph!r} is not structured-decomposable "
            f"(cirkit raises StructuralPropertyError in multiply); squarable region graphs: "
            f"{', '.join(SQUARABLE_REGION_GRAPHS)}"
        )
    wf = _weight_factory(complex_weights, weight_activation, weight_init)
    rg = _image_region_graph(region_graph, image_shape, rg_seed)
    per_circuit = num_classes if shared else 1
    circuits = [
        rg.build_circuit(
            input_factory=_categorical_factory(num_categories),
            sum_product=layer,
            sum_weight_factory=wf,
            num_input_units=num_units,
            num_sum_units=num_units,
            num_classes=per_circuit,
        )
        for _ in range(1 if shared else num_classes)
    ]
    config = dict(builder=builder, num_units=num_units, region_graph=region_graph, layer=layer,
                  complex=complex_weights, weight_activation=weight_activation,
                  weight_init=weight_init, image_shape=list(image_shape),
                  num_categories=num_categories, num_classes=num_classes, rg_seed=rg_seed,
                  squared=squared, shared=shared)
    return _make_model(circuits, squared=squared, complex_weights=complex_weights,
                       weight_activation=weight_activation, num_categories=num_categories,
                       num_outputs=num_classes, what=what, config=config)


def digits_squared_circuit(
    num_units: int,
    region_graph: str = "quad-tree-2",
    layer: str = "cp",
    complex: bool = False,  # noqa: A002
    *,
    weight_activation: str = "none",
    weight_init: str = "normal",
    image_shape: tuple[int, int] = DIGITS_SHAPE,
    num_categories: int = DIGITS_CATEGORIES,
    rg_seed: int = 42,
) -> CircuitModel:
    """The squared density ``p(x) = c(x)² / Z`` (``|c(x)|²/Z`` if complex) over 8x8 digits.

    ``c`` is built with ``RegionGraph.build_circuit`` and ``CategoricalLayer(num_categories=17)``
    inputs (pixel values 0..16; cirkit's ``image_data`` template would hardcode 256),
    ``num_units`` input and sum units per layer, one output.

    Args:
        num_units: K. The squared circuit has K² units per layer.
        region_graph: 'quad-tree-2' | 'quad-tree-4' | 'random-binary-tree' | 'linear-tree'.
            'quad-graph' and 'poon-domingos' raise ValueError: they are not
            structured-decomposable, so cirkit cannot multiply them.
        layer: 'cp' | 'cp-t' | 'tucker'. cirkit squares each Tucker (Kronecker product)
            layer of arity a into a Kronecker layer plus a dense constant
            ``K**(2a) x K**(2a)`` permutation layer, so 'tucker' raises ValueError once
            :func:`squared_weight_entries` exceeds ``MAX_SQUARED_WEIGHT_ENTRIES``: from
            K=8 on the binary region graphs, from K=3 on 'quad-tree-4'.
        complex: complex sum weights; then ``c² = multiply(conjugate(c), c)``.
        weight_activation: 'none' (signed, the point of squaring; default) or a positive
            activation ('softmax', ...) for a monotone-weight squared circuit.
        image_shape, num_categories: override for tiny test circuits.
        rg_seed: seed of the random binary tree.

    Returns:
        A :class:`CircuitModel` with ``circuit = c``, ``squared = c²`` and
        ``partition = integrate(c²)``; ``num_variables = H·W`` (64).
    """
    return _image_circuit(
        num_units, region_graph=region_graph, layer=layer, complex_weights=complex,
        weight_activation=weight_activation, weight_init=weight_init, image_shape=image_shape,
        num_categories=num_categories, num_classes=1, rg_seed=rg_seed, squared=True,
        builder="digits_squared_circuit",
    )


def digits_classifier_circuit(
    num_units: int,
    region_graph: str = "quad-tree-2",
    layer: str = "cp",
    *,
    squared: bool = False,
    shared: bool = False,
    complex: bool = False,  # noqa: A002
    weight_activation: str | None = None,
    weight_init: str = "normal",
    num_classes: int = DIGITS_CLASSES,
    image_shape: tuple[int, int] = DIGITS_SHAPE,
    num_categories: int = DIGITS_CATEGORIES,
    rg_seed: int = 42,
) -> CircuitModel:
    """Class-conditional densities ``p(x | y)``, ``y < num_classes``, over 8x8 digits.

    The model has ``num_classes`` outputs, one normalised density per class; classify
    with ``argmax_y log p(x | y) + log p(y)`` (:meth:`CompiledCircuitModel.predict`,
    :func:`train_classifier_circuit`).

    Structure (``shared``):

    * ``shared=False`` (default): ``num_classes`` independent circuits on the same region
      graph, joined with cirkit's ``SF.concatenate`` (folding evaluates them together).
      ``num_classes`` times the parameters and compute of one circuit.
    * ``shared=True``: one circuit built with cirkit's ``num_classes`` -- every layer is
      shared except the root sum layer, so a class differs from another only by ``K``
      mixing weights over shared components. Cheap, but a weak classifier: at K=8,
      monotone, 5 epochs, lr 0.05 it reached 26 % test accuracy (generative), against
      92 % (generative) / 95 % (discriminative) unshared.

    Parameterisation (``squared``):

    * ``squared=False`` (default): *monotone* -- softmax sum weights, normalised
      categoricals, semiring 'lse-sum'; ``log Z_y`` is computed anyway (0 up to
      roundoff). Cheap and robust in cirkit 0.3.1, and it also allows the
      non-structured-decomposable 'quad-graph' / 'poon-domingos'.
    * ``squared=True``: ``p(x|y) = c_y(x)² / Z_y`` with signed weights
      (semiring 'complex-lse-sum'). With ``shared=True`` ``c²`` has ``C²`` outputs
      ``y1·C + y2`` of which the diagonal is used (so the root layer and ``Z`` do ``C``
      times the needed work); the quad-tree has no n-ary sum layers, which cirkit 0.3.1
      squares wrongly.

    ``weight_activation`` defaults to 'softmax' (monotone) or 'none' (squared).
    """
    if weight_activation is None:
        weight_activation = "none" if squared else "softmax"
    return _image_circuit(
        num_units, region_graph=region_graph, layer=layer, complex_weights=complex,
        weight_activation=weight_activation, weight_init=weight_init, image_shape=image_shape,
        num_categories=num_categories, num_classes=num_classes, rg_seed=rg_seed,
        squared=squared, builder="digits_classifier_circuit", shared=shared,
    )


# --------------------------------------------------------------------------------------
# Compiled model
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """cirkit allocates parameters (and casts constants) in torch's default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class CompiledCircuitModel(nn.Module):
    """Compiled ``f`` and ``Z`` of a :class:`CircuitModel` (``f = c²`` or ``c``).

    Submodules ``base`` (compiled ``c``), ``density`` (compiled ``f``) and ``partition``
    (compiled ``Z``) share their parameter tensors; ``parameters()`` lists each once.
    ``state_dict()`` lists shared tensors under each submodule's prefix (same storage);
    loading it into a model compiled from the same :class:`CircuitModel` config restores
    all three.

    All methods take ``x``: LongTensor ``(B, D)`` with values in ``0..V-1`` and return
    real tensors in the model's dtype:

    * :meth:`log_density` ``(B, O)``: ``log f_o(x)`` (``log |c_o(x)|²`` when squared);
    * :meth:`log_partition` ``(O,)``: ``log Z_o``;
    * :meth:`log_likelihood` / ``forward`` ``(B, O)``: ``log p_o(x) = log f_o(x) - log Z_o``;
    * :meth:`log_base` ``(B, O)``: ``log c_o(x)`` as the semiring computes it (complex
      in 'complex-lse-sum', whose real part is ``log |c_o(x)|``; linear values in
      'sum-product' are turned into ``log |c|`` + ``iπ`` for negative values);
    * :meth:`predict` ``(B,)``: ``argmax_o log p_o(x) + log prior_o``.

    :attr:`evaluation` chooses how the circuits are evaluated: ``'semiring'`` (cirkit's
    own forward, log values layer by layer) or ``'linear'``
    (:func:`adapters.cirkit.linear_space.evaluate_linear_space`: linear-space values
    with one log-scale per sample, the same outputs without per-layer exp/log, and
    without cirkit's -708 clamp; log semirings only).
    """

    def __init__(
        self,
        model: CircuitModel,
        base: nn.Module,
        density: nn.Module,
        partition: nn.Module,
        *,
        semiring: str,
        dtype: torch.dtype,
        evaluation: str = "semiring",
    ) -> None:
        super().__init__()
        self.base = base
        self.density = density
        self.partition = partition
        self.model = model  # the symbolic CircuitModel (not a submodule)
        self.semiring = semiring
        self.dtype = dtype
        self.register_buffer("_index", torch.tensor(model.density_index), persistent=False)
        self.evaluation = evaluation

    @property
    def evaluation(self) -> str:
        """'semiring' (cirkit's forward) or 'linear' (linear space with per-sample scales)."""
        return self._evaluation

    @evaluation.setter
    def evaluation(self, value: str) -> None:
        _check_choice("evaluation", value, EVALUATIONS)
        if value == "linear" and self.semiring == "sum-product":
            raise ValueError("evaluation='linear' is for the log semirings: a 'sum-product' "
                             "circuit already evaluates in linear space")
        self._evaluation = value

    def _run(self, circuit: nn.Module, x: Tensor | None = None) -> Tensor:
        if self._evaluation == "linear":
            return evaluate_linear_space(circuit, x)
        return circuit(x) if x is not None else circuit()

    @property
    def num_outputs(self) -> int:
        return self.model.num_outputs

    @property
    def num_variables(self) -> int:
        return self.model.num_variables

    def _check_x(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_variables:
            raise ValueError(f"x must have shape (B, {self.num_variables}), got {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise ValueError(f"x must hold integer category indices, got dtype {x.dtype}")
        return x.long()

    def log_base(self, x: Tensor) -> Tensor:
        """``log c(x)``, ``(B, O)`` (complex in 'complex-lse-sum')."""
        x = self._check_x(x)
        with _default_dtype(self.dtype):
            y = self._run(self.base, x).flatten(1)  # (B, L, K) -> (B, L·K) = (B, O)
        if self.semiring == "sum-product":
            return torch.log(y.to(self.dtype.to_complex()))
        return y

    def log_density(self, x: Tensor) -> Tensor:
        """``log f(x)``, ``(B, O)``: the diagonal ``log |c_o(x)|²`` for squared models."""
        x = self._check_x(x)
        with _default_dtype(self.dtype):
            y = self._run(self.density, x).flatten(1)
        y = y.index_select(-1, self._index)
        return self._real_log(y)

    def log_partition(self) -> Tensor:
        """``log Z``, ``(O,)``."""
        with _default_dtype(self.dtype):
            z = self._run(self.partition).flatten()  # (L, K) -> (L·K,)
        return self._real_log(z.index_select(-1, self._index))

    def _real_log(self, y: Tensor) -> Tensor:
        if self.semiring == "sum-product":
            return torch.log(y.real.clamp_min(0.0)) if y.is_complex() else torch.log(y.clamp_min(0.0))
        return y.real if y.is_complex() else y

    def log_likelihood(self, x: Tensor) -> Tensor:
        """``log p_o(x) = log f_o(x) - log Z_o``, ``(B, O)``."""
        return self.log_density(x) - self.log_partition()

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.log_likelihood(x)

    @torch.no_grad()
    def predict(self, x: Tensor, log_prior: Tensor | None = None, batch_size: int = 512) -> Tensor:
        """``argmax_o log p_o(x) (+ log_prior[o])``, LongTensor ``(B,)``."""
        out = []
        for i in range(0, x.shape[0], batch_size):
            ll = self.log_likelihood(x[i : i + batch_size])
            if log_prior is not None:
                ll = ll + log_prior.to(ll)
            out.append(ll.argmax(dim=-1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class DataSplits(NamedTuple):
    """Train/test splits: ``x_*`` integer tensors ``(N, D)`` (or ``(N, H, W)``), ``y_*`` LongTensor ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits_data(seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split by class.

    Returns:
        :class:`DataSplits` with ``x_*`` LongTensor ``(N, 64)``, values 0..16 (row-major
        pixels), ``y_*`` LongTensor ``(N,)`` in 0..9. The split is stratified by label
        and a function of ``seed`` only; ``N_test = round(1797 · test_fraction)`` up to
        per-class rounding.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is a test dependency
        raise ImportError("digits_data needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.as_tensor(d.data).round().long()
    y = torch.as_tensor(d.target).long()
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for cls in torch.unique(y).tolist():
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(idx.numel() * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = torch.cat(train_idx)
    te = torch.cat(test_idx)
    tr = tr[torch.randperm(tr.numel(), generator=g)]
    te = te[torch.randperm(te.numel(), generator=g)]
    return DataSplits(x[tr], y[tr], x[te], y[te])


_IDX_TYPES = {0x08: ("B", 1), 0x09: ("b", 1), 0x0B: (">h", 2), 0x0C: (">i", 4),
              0x0D: (">f", 4), 0x0E: (">d", 8)}
_MNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _read_idx(path: Path) -> Tensor:
    """Parse one IDX file (optionally gzip-compressed) into a uint8 tensor."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"corrupt IDX file {path}: cannot read it ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"corrupt IDX file {path}: bad magic number {raw[:4].hex() or '(empty)'}")
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        known = "known but unsupported" if type_code in _IDX_TYPES else "unknown"
        raise ValueError(f"corrupt IDX file {path}: data type 0x{type_code:02x} is {known}; MNIST uses unsigned bytes (0x08)")
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"corrupt IDX file {path}: truncated header ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = math.prod(dims)
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(
            f"corrupt IDX file {path}: header says {'x'.join(map(str, dims))} = {expected} bytes, "
            f"file holds {len(body)}"
        )
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find_idx(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for suffix in ("", ".gz"):
            p = root / (name + suffix)
            if p.is_file():
                return p
    return None


def load_mnist(
    path: str | os.PathLike[str],
    *,
    flatten: bool = True,
    dtype: torch.dtype = torch.uint8,
) -> DataSplits:
    """Read MNIST from local files; never downloads.

    ``path`` is either

    * a directory holding the four IDX files ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
      (each optionally ``.gz``; the ``train-images.idx3-ubyte`` spelling is accepted too),
      or, failing that, a file ``mnist.npz`` in it; or
    * an ``.npz`` file with arrays ``x_train, y_train, x_test, y_test`` (Keras layout).

    Returns:
        :class:`DataSplits`: ``x_*`` of shape ``(N, H·W)`` (``flatten``) or ``(N, H, W)``,
        values 0..255, in ``dtype`` (uint8 by default: 70k images as int64 would take
        440 MB; :func:`train_squared_circuit` converts batches to long), ``y_*`` LongTensor.

    Raises:
        FileNotFoundError: the path or some of the files do not exist (names listed).
        ValueError: a file is corrupt (bad magic, truncated, not gzip, wrong shapes, image
            and label counts differ, missing npz keys).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"MNIST path {root} does not exist (load_mnist never downloads)")
    arrays: dict[str, Tensor] = {}
    if root.is_file():
        if root.suffix != ".npz":
            raise ValueError(f"MNIST file {root} is not an .npz file; pass an .npz or a directory of IDX files")
        arrays = _read_mnist_npz(root)
        source = str(root)
    else:
        found = {key: _find_idx(root, names) for key, names in _MNIST_FILES.items()}
        missing = [names[0] for key, names in _MNIST_FILES.items() if found[key] is None]
        if missing and (root / "mnist.npz").is_file() and len(missing) == len(_MNIST_FILES):
            arrays = _read_mnist_npz(root / "mnist.npz")
            source = str(root / "mnist.npz")
        elif missing:
            raise FileNotFoundError(
                f"MNIST files missing in {root}: {', '.join(missing)} (optionally .gz), or put "
                "an mnist.npz there; load_mnist never downloads"
            )
        else:
            arrays = {key: _read_idx(p) for key, p in found.items() if p is not None}
            source = str(root)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dim() != 3:
            raise ValueError(f"MNIST {split} images in {source} must be (N, H, W), got shape {tuple(x.shape)}")
        if y.dim() != 1:
            raise ValueError(f"MNIST {split} labels in {source} must be (N,), got shape {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"MNIST {split} split in {source}: {x.shape[0]} images but {y.shape[0]} labels"
            )

    def prep(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1) if flatten else x
        return x.to(dtype)

    return DataSplits(prep(arrays["x_train"]), arrays["y_train"].long(),
                      prep(arrays["x_test"]), arrays["y_test"].long())


def _read_mnist_npz(path: Path) -> dict[str, Tensor]:
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("it holds a single array, not named arrays")
            present = list(z.files)
            raw = {k: z[k] for k in _MNIST_FILES if k in present}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        # np.load raises ValueError ("pickled data") for files that are not archives
        raise ValueError(f"corrupt MNIST npz {path}: {e}") from e
    missing = [k for k in _MNIST_FILES if k not in raw]
    if missing:
        raise ValueError(
            f"MNIST npz {path} lacks arrays {', '.join(missing)} (has {', '.join(present) or 'none'})"
        )
    out = {}
    for k, a in raw.items():
        if a.dtype.kind not in "ui" or (a.size and (a.min() < 0 or a.max() > 255)):
            raise ValueError(f"MNIST npz {path}: {k} must hold integers in 0..255, got dtype {a.dtype}")
        out[k] = torch.from_numpy(np.ascontiguousarray(a).astype(np.uint8 if k.startswith("x") else np.int64))
    return out


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclass
class TrainingHistory:
    """Per-epoch record of a training run.

    ``train_nll[e]``: mean NLL (nats per example) over epoch ``e``'s mini-batches, taken
    while training. ``test_nll[e]``: mean NLL on the test set after epoch ``e`` (empty
    without test data). ``*_bpd = nll / (D · ln 2)`` (bits per dimension, D = 64 for
    digits). ``initial_test_nll``: before the first step. ``epoch_seconds`` /
    ``epoch_cpu_seconds``: wall / process CPU time of each epoch's training steps
    (evaluation excluded; CPU time counts all threads). ``test_accuracy``: classifier runs.
    """

    train_nll: list[float] = field(default_factory=list)
    test_nll: list[float] = field(default_factory=list)
    train_bpd: list[float] = field(default_factory=list)
    test_bpd: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_cpu_seconds: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    initial_test_nll: float | None = None
    num_variables: int = 0
    objective: str = "nll"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainingHistory":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _bpd(nll: float, d: int) -> float:
    return nll / (d * math.log(2.0))


def _unpack(data: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """-> x_train, y_train, x_test, y_test from DataSplits / (x_train, x_test) / x_train."""
    if isinstance(data, Tensor):
        return data, None, None, None
    if all(hasattr(data, a) for a in ("x_train", "x_test")):
        return data.x_train, getattr(data, "y_train", None), data.x_test, getattr(data, "y_test", None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], None, data[1], None
    raise TypeError(
        "data must be a DataSplits, an (x_train, x_test) pair of tensors, or an x_train tensor"
    )


def _check_data(model: CompiledCircuitModel, x: Tensor, y: Tensor | None, name: str) -> None:
    if x.dim() != 2 or x.shape[1] != model.num_variables:
        raise ValueError(f"{name} must have shape (N, {model.num_variables}), got {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= model.model.num_categories):
        raise ValueError(
            f"{name} values must be in 0..{model.model.num_categories - 1}, "
            f"got {int(x.min())}..{int(x.max())}"
        )
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"labels for {name} must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def _select(ll: Tensor, y: Tensor | None) -> Tensor:
    """Per-example log-likelihood: the label's output, or output 0 of a 1-output model."""
    if ll.shape[1] == 1:
        return ll[:, 0]
    if y is None:
        raise ValueError(f"a model with {ll.shape[1]} outputs needs labels to pick the output")
    return ll.gather(1, y.view(-1, 1).long()).squeeze(1)


def evaluate_nll(model: CompiledCircuitModel, x: Tensor, y: Tensor | None = None, batch_size: int = 512) -> float:
    """Mean ``-log p(x)`` in nats (``-log p(x | y)`` for multi-output models), no gradient."""
    total, n = 0.0, 0
    with torch.no_grad():
        logz = model.log_partition()
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].long()
            yb = None if y is None else y[i : i + batch_size]
            ll = _select(model.log_density(xb) - logz, yb)
            total += float(ll.double().sum())
            n += xb.shape[0]
    return -total / max(n, 1)


def evaluate_accuracy(model: CompiledCircuitModel, x: Tensor, y: Tensor, log_prior: Tensor | None = None) -> float:
    """Fraction of ``argmax_y log p(x | y) + log_prior`` equal to the label."""
    return float((model.predict(x.long(), log_prior) == y).double().mean())


class _Progress:
    """tqdm when importable, else one stderr line per epoch; silent when disabled."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        self.enabled = enabled
        self.desc = desc
        if enabled:
            try:
                from tqdm.auto import tqdm  # type: ignore[import-not-found]
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, leave=False)

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(nll=f"{loss:.3f}")

    def close(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"{self.desc}: {summary}", file=sys.stderr, flush=True)


def _fit(
    model: CompiledCircuitModel,
    data: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    weight_decay: float,
    loss_kind: str,
) -> TrainingHistory:
    if not isinstance(model, CompiledCircuitModel):
        raise TypeError("model must be a CompiledCircuitModel (see CircuitModel.compile)")
    _check_positive(epochs=epochs, batch_size=batch_size)
    x_tr, y_tr, x_te, y_te = _unpack(data)
    if model.num_outputs > 1 and (y_tr is None or (x_te is not None and y_te is None)):
        raise ValueError(f"a model with {model.num_outputs} outputs needs labelled data (DataSplits)")
    _check_data(model, x_tr, y_tr, "training data")
    if x_te is not None:
        _check_data(model, x_te, y_te, "test data")
    d = model.num_variables
    hist = TrainingHistory(num_variables=d, objective=loss_kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    log_prior = None
    if loss_kind == "cross-entropy" or model.num_outputs > 1:
        counts = torch.bincount(y_tr.long(), minlength=model.num_outputs).to(model.dtype)
        log_prior = torch.log(counts.clamp_min(1.0) / counts.sum())
    if x_te is not None:
        hist.initial_test_nll = evaluate_nll(model, x_te, y_te)
    n = x_tr.shape[0]
    num_batches = (n + batch_size - 1) // batch_size
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        bar = _Progress(progress, num_batches, f"epoch {epoch + 1}/{epochs}")
        total, t0, c0 = 0.0, time.perf_counter(), time.process_time()
        for b in range(num_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb = x_tr[idx].long()
            yb = None if y_tr is None else y_tr[idx].long()
            ll = model.log_likelihood(xb)
            if loss_kind == "cross-entropy":
                loss = nn.functional.cross_entropy(ll + log_prior, yb)
            else:
                loss = -_select(ll, yb).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.detach().item()} at epoch {epoch + 1}, batch {b + 1}: try a "
                    "smaller lr, dtype=torch.float64, or semiring 'complex-lse-sum' for signed weights"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.detach().item()
            total += value * xb.shape[0]
            bar.step(value)
        hist.epoch_seconds.append(time.perf_counter() - t0)
        hist.epoch_cpu_seconds.append(time.process_time() - c0)
        hist.train_nll.append(total / n)
        hist.train_bpd.append(_bpd(total / n, d))
        summary = f"train {loss_kind} {total / n:.4f}"
        if loss_kind == "nll":
            summary += f" ({hist.train_bpd[-1]:.4f} bpd)"
        if x_te is not None:
            nll = evaluate_nll(model, x_te, y_te)
            hist.test_nll.append(nll)
            hist.test_bpd.append(_bpd(nll, d))
            summary += f", test nll {nll:.4f} ({hist.test_bpd[-1]:.4f} bpd)"
            if model.num_outputs > 1 and y_te is not None:
                hist.test_accuracy.append(evaluate_accuracy(model, x_te, y_te, log_prior))
                summary += f", test acc {hist.test_accuracy[-1]:.4f}"
        bar.close(summary + f", {hist.epoch_seconds[-1]:.2f} s")
    model.eval()
    return hist


def train_squared_circuit(
    model: CompiledCircuitModel,
    data: Any,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    *,
    weight_decay: float = 0.0,
) -> TrainingHistory:
    """Minimise the exact NLL ``-(log f(x) - log Z)`` with Adam (``f = c²`` for squared models).

    Args:
        model: a :class:`CompiledCircuitModel`; it trains in the dtype it was compiled
            with (float32 or float64) and in its semiring (signed real weights need
            'complex-lse-sum', softmax weights work in 'lse-sum' -- both chosen at
            :meth:`CircuitModel.compile`). Trained in place.
        data: :class:`DataSplits` (test split evaluated after every epoch), a pair
            ``(x_train, x_test)``, or ``x_train`` alone; integer tensors ``(N, D)``.
            Models with several outputs (class-conditional) use the labels to pick each
            example's output.
        epochs, batch_size, lr, weight_decay: the usual; ``Z`` is recomputed every step.
        seed: seeds the mini-batch order, so equal seeds (and equal initial parameters)
            give identical parameters.
        progress: a tqdm bar if tqdm is importable, else one line per epoch on stderr.

    Returns:
        A :class:`TrainingHistory` (NLL in nats per example, bpd = NLL / (D ln 2)).

    Raises:
        FloatingPointError: the loss became NaN/inf.
        ValueError: data of the wrong shape, out-of-range categories, missing labels.
    """
    return _fit(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                progress=progress, weight_decay=weight_decay, loss_kind="nll")


def train_classifier_circuit(
    model: CompiledCircuitModel,
    data: DataSplits,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    *,
    objective: str = "generative",
    weight_decay: float = 0.0,
) -> TrainingHistory:
    """Train a class-conditional model (:func:`digits_classifier_circuit`).

    ``objective='generative'``: minimise ``-log p(x | y)`` (each class's density on its
    own examples); ``'discriminative'``: cross-entropy of ``softmax_y(log p(x|y) + log p(y))``
    with the empirical prior. Either way ``test_nll`` is ``-log p(x | y)`` and
    ``test_accuracy`` is the accuracy of ``argmax_y log p(x | y) + log p(y)``.
    """
    _check_choice("objective", objective, ("generative", "discriminative"))
    if model.num_outputs < 2:
        raise ValueError("train_classifier_circuit needs a model with one output per class")
    return _fit(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                progress=progress, weight_decay=weight_decay,
                loss_kind="nll" if objective == "generative" else "cross-entropy")


# --------------------------------------------------------------------------------------
# Cached training
# --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$STRUCTLAYERS_CACHE`` if set, else ``~/.cache/structlayers``."""
    env = os.environ.get("STRUCTLAYERS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "structlayers"


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions of torch, cirkit (distribution ``libcirkit``) and structlayers;
    None for a distribution that is not installed (e.g. a source checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {"torch": str(torch.__version__)}
    for dist, key in (("libcirkit", "cirkit"), ("structlayers", "structlayers")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:  # pragma: no cover - e.g. a source checkout
            out[key] = None
    return out


def _versions() -> dict[str, str]:
    """What a cached model depends on besides its config: cirkit, torch, the cache format."""
    found = package_versions()
    cirkit_version = found["cirkit"]
    if cirkit_version is None:  # pragma: no cover - a source checkout of cirkit
        import cirkit

        cirkit_version = getattr(cirkit, "__version__", "unknown")
    return {"cirkit": str(cirkit_version), "torch": str(found["torch"]), "format": str(_CACHE_FORMAT)}


def cache_key(config: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the JSON config and the cirkit/torch versions."""
    blob = json.dumps({"config": dict(config), "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainedModel:
    """Result of :func:`trained_digits_model`.

    ``from_cache`` is True when the parameters were loaded instead of trained; ``path``
    is the cache file (``<cache_dir>/cirkit/digits-<key>.pt``).
    """

    model: CompiledCircuitModel
    history: TrainingHistory
    config: dict[str, Any]
    path: Path
    from_cache: bool


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def trained_digits_model(
    num_units: int,
    epochs: int,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    region_graph: str = "quad-tree-2",
    layer: str = "cp",
    complex: bool = False,  # noqa: A002
    weight_activation: str = "none",
    semiring: str | None = None,
    dtype: str = "float32",
    fold: bool = True,
    optimize: bool = False,
    batch_size: int = 128,
    lr: float = 0.05,
    test_fraction: float = 0.2,
    data_seed: int = 0,
    evaluation: str = "linear",
    progress: bool = False,
    retrain: bool = False,
) -> TrainedModel:
    """Train :func:`digits_squared_circuit` on :func:`digits_data` once; cache the result.

    The cache file ``<cache_dir>/cirkit/digits-<key>.pt`` holds the ``state_dict``, the
    config and the training history; ``key`` hashes every argument that affects the
    parameters (not ``cache_dir``/``progress``/``retrain``) plus the cirkit and torch
    versions. When it exists the model is rebuilt from the config and the parameters
    loaded -- no training. ``retrain=True`` ignores and overwrites it. An unreadable cache
    file is reported with a warning and replaced.

    Training is seeded: ``seed`` initialises the parameters and orders the mini-batches,
    so the same config trains to identical parameters.

    Args:
        cache_dir: default :func:`default_cache_dir` (``$STRUCTLAYERS_CACHE`` or
            ``~/.cache/structlayers``).
        dtype: 'float32' or 'float64' (a string, so the config stays JSON).
        evaluation: how the model is evaluated while training and afterwards
            (:attr:`CompiledCircuitModel.evaluation`); 'linear' (the default) is several
            times faster than cirkit's log-space forward for the same values.

    The Kronecker-weighted sum layers of ``f`` and ``Z`` are the exact factor-wise
    ``kronecker`` layers in ``live`` mode (the same function and parameters as cirkit's,
    without building ``A ⊗ B``); ``state_dict`` keys are those of cirkit's layers.
        Others: see :func:`digits_squared_circuit`, :meth:`CircuitModel.compile` and
            :func:`train_squared_circuit`.
    """
    _check_choice("dtype", dtype, tuple(_DTYPES))
    config = dict(
        dataset="sklearn-digits", num_units=num_units, epochs=epochs, seed=seed,
        region_graph=region_graph, layer=layer, complex=complex,
        weight_activation=weight_activation, semiring=semiring, dtype=dtype, fold=fold,
        optimize=optimize, batch_size=batch_size, lr=lr, test_fraction=test_fraction,
        data_seed=data_seed, evaluation=evaluation, layers="kronecker live",
    )
    sym = digits_squared_circuit(num_units, region_graph, layer, complex,
                                 weight_activation=weight_activation)
    def build() -> CompiledCircuitModel:
        compiled = sym.compile(semiring, fold=fold, optimize=optimize, dtype=_DTYPES[dtype], seed=seed,
                               evaluation=evaluation)
        if not optimize:  # optimize=True already shattered them into cirkit's exact O(K³) layers
            swap_kronecker_sum_layers([compiled.density, compiled.partition], "kronecker", mode="live")
        return compiled

    model = build()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "cirkit" / f"digits-{cache_key(config)}.pt"
    if path.is_file() and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("config") != config:
                raise ValueError("config in the file does not match")
            model.load_state_dict(blob["state_dict"])
            return TrainedModel(model, TrainingHistory.from_dict(blob["history"]), config, path, True)
        except Exception as e:  # noqa: BLE001 -- any unreadable cache entry is replaced
            warnings.warn(f"ignoring unreadable cache file {path}: {e}; retraining", stacklevel=2)
            model = build()
    data = digits_data(seed=data_seed, test_fraction=test_fraction)
    history = train_squared_circuit(model, data, epochs=epochs, batch_size=batch_size, lr=lr,
                                    seed=seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"config": config, "versions": _versions(), "state_dict": model.state_dict(),
            "history": history.to_dict()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return TrainedModel(model, history, config, path, False)
