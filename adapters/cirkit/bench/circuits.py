"""Circuits the benchmarks run on: symbolic builders and the compiled model.

Built with cirkit's public API (PyPI ``libcirkit`` 0.3.1, GPLv3; this module only calls it):

* :func:`one_sum_circuit`: one sum layer over one product of input layers, the smallest
  circuit whose square has exactly one Kronecker-weighted sum layer.
* :func:`deep_cp_circuit`: a CP circuit over a random-binary-tree or linear-tree region graph.
* :func:`digits_squared_circuit`: the squared density ``c²/Z`` over the 8x8 digits.
* :func:`digits_classifier_circuit`: ten class-conditional densities over the 8x8 digits.

Every builder returns a :class:`CircuitModel`: the symbolic circuit ``c``, its square
``c²`` (``multiply(c, c)`` for real weights, ``multiply(conjugate(c), c)`` for complex
ones; ``None`` for a monotone model, whose density is ``c`` itself) and the symbolic
partition function ``Z = integrate(density)``. :meth:`CircuitModel.compile` compiles
``c``, the density and ``Z`` in one :class:`cirkit.pipeline.PipelineContext`, so they
share the base circuit's parameter tensors, and wraps them in a
:class:`CompiledCircuitModel` (a ``torch.nn.Module`` whose ``forward`` is the normalised
log-likelihood).

Shapes used throughout: ``x`` is a LongTensor ``(B, D)`` of category indices, ``O`` is
the number of outputs of ``c`` (1 for a density, 10 for the classifier), and every
log-quantity returned by :class:`CompiledCircuitModel` is real.

Semirings and parameterisations:

* signed real sum weights (``weight_activation='none'``, the default for squared circuits)
  and complex weights need ``semiring='complex-lse-sum'``: ``lse-sum`` takes the log of
  negative numbers and returns NaN, and ``sum-product`` underflows on 64 variables;
* positive weights (``'softmax'``, ``'softplus'``, ``'positive-clamp'``, ``'sigmoid'``)
  work in the faster ``'lse-sum'``;
* ``'sum-product'`` is accepted for real weights but only makes sense for tiny circuits.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import cirkit.symbolic.functional as SF
from cirkit.backend.torch.semiring import ComplexLSESumSemiring, LSESumSemiring, SumProductSemiring
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.circuit import Circuit
from cirkit.symbolic.layers import CategoricalLayer, GaussianLayer, HadamardLayer, KroneckerLayer, SumLayer
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

from structlayers._checks import check_choice, check_positive_int

from ..internals import context_semiring
from .data import DIGITS_CATEGORIES, DIGITS_CLASSES, DIGITS_SHAPE
from ..model import EVALUATIONS, CircuitDensity, default_dtype

__all__ = [
    "CircuitModel",
    "CompiledCircuitModel",
    "REGION_GRAPHS",
    "SQUARABLE_REGION_GRAPHS",
    "SUM_PRODUCT_LAYERS",
    "WEIGHT_ACTIVATIONS",
    "SEMIRINGS",
    "EVALUATIONS",
    "MAX_SQUARED_WEIGHT_ENTRIES",
    "one_sum_circuit",
    "deep_cp_circuit",
    "digits_squared_circuit",
    "digits_classifier_circuit",
    "gaussian_image_circuit",
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

#: Refuse to square circuits for which cirkit would build more constant permutation
#: weight entries than this when squaring (see :func:`squared_weight_entries`; read at
#: call time, so it can be raised). 2**28 entries are 2 GiB as complex64. A Tucker
#: quad-tree-2 at K=8 needs 1.1e9 (its 63 squared Kronecker product layers each add a
#: 4096 x 4096 constant permutation); Tucker on quad-tree-4 needs 9e8 already at K=3. CP
#: and CP-T circuits need none (their Kronecker sum weights, 2.1e9 entries for the digits
#: circuit at K=64, are formed only by cirkit's optimize=False forward).
MAX_SQUARED_WEIGHT_ENTRIES = 2**28

def _weight_factory(complex_weights: bool, activation: str, init: str):
    check_choice(activation, WEIGHT_ACTIVATIONS, "weight_activation")
    check_choice(init, ("normal", "uniform", "dirichlet"), "weight_init")
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
    check_choice(name, REGION_GRAPHS, "region graph")
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
            # the inputs for such layers: the square would be wrong.
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
    num_categories: int | None  # None: continuous inputs (real-valued x)
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
                sum layers into two TensorDot layers; ``False`` builds ``A ⊗ B``).
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
            check_choice(semiring, SEMIRINGS, "semiring")
            ctx = PipelineContext(backend="torch", semiring=semiring, fold=fold, optimize=optimize)
        self._check_semiring(semiring)
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng, default_dtype(dtype):
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
    impl = context_semiring(ctx)
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
    num_categories: int | None,
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_positive_int(value, name)


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
    check_choice(product, ("hadamard", "kronecker"), "product")
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
    check_choice(region_graph, ("random-binary-tree", "linear-tree"), "region graph")
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
    check_choice(region_graph, REGION_GRAPHS, "region graph")
    check_choice(layer, SUM_PRODUCT_LAYERS, "sum-product layer")
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


def gaussian_image_circuit(
    num_units: int,
    image_shape: tuple[int, int] = DIGITS_SHAPE,
    region_graph: str = "quad-tree-2",
    *,
    weight_init: str = "normal",
    rg_seed: int = 42,
) -> CircuitModel:
    """A squared circuit with continuous inputs: ``c`` with Gaussian input layers (K
    univariate Gaussians per pixel) and signed CP sum layers over ``image_shape``;
    ``|c|²`` integrates in closed form (products of Gaussians). ``x`` is real-valued."""
    _check_positive(num_units=num_units)
    wf = _weight_factory(False, "none", weight_init)
    rg = _image_region_graph(region_graph, image_shape, rg_seed)
    c = rg.build_circuit(input_factory=GaussianLayer, sum_product="cp", sum_weight_factory=wf,
                         num_input_units=num_units, num_sum_units=num_units)
    config = dict(builder="gaussian_image_circuit", num_units=num_units, image_shape=list(image_shape),
                  region_graph=region_graph, weight_init=weight_init, rg_seed=rg_seed)
    return _make_model([c], squared=True, complex_weights=False, weight_activation="none", num_categories=None,
                       num_outputs=1, what="a Gaussian-input circuit", config=config)


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
      mixing weights over shared components. Cheap, but a much weaker classifier than
      the unshared circuits.

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


class CompiledCircuitModel(CircuitDensity):
    """A :class:`~adapters.cirkit.model.CircuitDensity` compiled from a :class:`CircuitModel`.

    Submodules ``base`` (compiled ``c``), ``density`` (compiled ``f``: ``|c|²`` or ``c``)
    and ``partition`` (compiled ``Z``) share their parameter tensors; ``parameters()``
    lists each once. ``state_dict()`` lists shared tensors under each submodule's prefix
    (same storage); loading it into a model compiled from the same :class:`CircuitModel`
    config restores all three. ``spec`` is the symbolic :class:`CircuitModel`.

    Likelihoods of squared models go through ``c`` (``2 Re log c(x) − log Z``);
    :meth:`log_density` evaluates ``f`` at x (what marginals and samples use).
    """

    def __init__(self, model: CircuitModel, base: nn.Module, density: nn.Module, partition: nn.Module, *,
                 semiring: str, dtype: torch.dtype, evaluation: str = "linear") -> None:
        super().__init__(base, density, partition, squared=model.is_squared, density_index=model.density_index,
                         num_variables=model.num_variables, num_categories=model.num_categories,
                         semiring=semiring, dtype=dtype, evaluation=evaluation)
        self.spec = model  # the symbolic CircuitModel (not a submodule)

    @property
    def model(self) -> CircuitModel:
        """Old name of :attr:`spec`, kept for one release."""
        return self.spec
