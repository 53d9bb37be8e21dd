"""Small symbolic circuits and compilations the adapter's tests share."""

from __future__ import annotations

import functools

import torch

import cirkit.symbolic.functional as SF
from cirkit.backend.torch.layers import TorchInputLayer
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.layers import CategoricalLayer, GaussianLayer
from cirkit.templates.region_graph import LinearTree, QuadTree, RandomBinaryTree
from cirkit.templates.utils import Parameterization, parameterization_to_factory

CATEGORIES = 3
REGION_GRAPHS = {
    "quad-tree": lambda: QuadTree((1, 4, 4), num_patch_splits=2),
    "random-binary-tree": lambda: RandomBinaryTree(8, num_repetitions=1, seed=3),
    "linear-tree": lambda: LinearTree(6, num_repetitions=1),
}
NUM_VARIABLES = {"quad-tree": 16, "random-binary-tree": 8, "linear-tree": 6}
SHIFT = 8.0  # nats added to every input unit's log-value in shifted_reference


def full_rank(kind):
    """Policy: ``kind`` at the full rank of every layer's A ⊗ B (exact)."""
    return lambda info: (kind, {"rank": min(info.factor_a) * min(info.factor_b)})


@functools.lru_cache(maxsize=None)
def symbolic(region_graph: str, layer: str, semiring: str, units: int = 2):
    """(c², ∫c²): signed weights for complex-lse-sum, softmax-normalised otherwise."""
    if semiring == "complex-lse-sum":
        param = Parameterization(activation="none", initialization="normal")
    else:
        param = Parameterization(activation="softmax", initialization="normal")
    circuit = REGION_GRAPHS[region_graph]().build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=CATEGORIES),
        sum_product=layer, sum_weight_factory=parameterization_to_factory(param),
        num_input_units=units, num_sum_units=units)
    squared = SF.multiply(circuit, circuit)
    return squared, SF.integrate(squared)


def compile_pair(region_graph, layer, semiring, fold, optimize):
    """Compiled (c², ∫c²) of :func:`symbolic`, with the same seeded parameters every time."""
    squared, partition = symbolic(region_graph, layer, semiring)
    torch.manual_seed(0)  # same initial parameters for every compilation
    ctx = PipelineContext(backend="torch", semiring=semiring, fold=fold, optimize=optimize)
    return ctx.compile(squared), ctx.compile(partition)


def image_circuits(side: int, semiring: str):
    """Compiled (c², ∫c², c) of a signed CP quad-tree circuit over side x side pixels, 17 categories."""
    weights = Parameterization(activation="none", initialization="normal")
    base = QuadTree((1, side, side), num_patch_splits=2).build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=17),
        sum_product="cp", sum_weight_factory=parameterization_to_factory(weights),
        num_input_units=2, num_sum_units=2)
    squared = SF.multiply(base, base)
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring=semiring, fold=True, optimize=False)
    return ctx.compile(squared), ctx.compile(SF.integrate(squared)), ctx.compile(base)


def shifted_reference(circuit, x, num_variables):
    """An independent evaluation with cirkit's own (clamping) semiring: adding SHIFT to each
    input layer's log-output multiplies c²(x) by exp(SHIFT * D) exactly (each term of a smooth,
    decomposable circuit has one input per variable), which lifts every intermediate value
    above the clamp; subtracting SHIFT * D afterwards gives the true log c²(x)."""

    def module_fn(module, *inputs):
        y = module(*inputs)
        return y + SHIFT if isinstance(module, TorchInputLayer) else y

    with torch.no_grad():
        out = circuit.evaluate(x, module_fn=module_fn)
    return out.real[0, :, 0] - SHIFT * num_variables


def two_circuits(region_graph: str, units=(2, 3), **categorical_options):
    """Two different categorical circuits on one region graph, with 2 and 3 units (or ``units``),
    each with parameters of its own."""
    param = Parameterization(activation="softmax", initialization="normal")
    return tuple(REGION_GRAPHS[region_graph]().build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=CATEGORIES, **categorical_options),
        sum_product="cp", sum_weight_factory=parameterization_to_factory(param),
        num_input_units=k, num_sum_units=k) for k in units)


def complex_circuit(region_graph: str, units: int = 2):
    """A categorical circuit on one region graph with complex weights (for |c|² with phases)."""
    param = Parameterization(activation="none", initialization="normal", dtype="complex")
    return REGION_GRAPHS[region_graph]().build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=CATEGORIES),
        sum_product="cp", sum_weight_factory=parameterization_to_factory(param),
        num_input_units=units, num_sum_units=units)


def compile_partition(symbolic_circuit, semiring: str, fold: bool):
    """Compiled ∫ of a symbolic circuit (seeded)."""
    torch.manual_seed(0)
    ctx = PipelineContext(backend="torch", semiring=semiring, fold=fold, optimize=False)
    return ctx.compile(SF.integrate(symbolic_circuit))


def compile_circuit(symbolic_circuit, semiring: str):
    """Compiled (folded, seeded, ``optimize=False``) symbolic circuit, to evaluate at data."""
    torch.manual_seed(0)
    return PipelineContext(backend="torch", semiring=semiring, fold=True, optimize=False).compile(symbolic_circuit)


def gaussian_base():
    """A signed CP quad-tree circuit over 4x4 pixels with 3 Gaussian units per pixel (a new one,
    with parameters of its own, at every call)."""
    weights = Parameterization(activation="none", initialization="normal")
    return QuadTree((1, 4, 4), num_patch_splits=2).build_circuit(
        input_factory=GaussianLayer, sum_product="cp", sum_weight_factory=parameterization_to_factory(weights),
        num_input_units=3, num_sum_units=3)


@functools.lru_cache(maxsize=None)
def gaussian_symbolic():
    """(c², ∫c², c) of :func:`gaussian_base`."""
    base = gaussian_base()
    squared = SF.multiply(base, base)
    return squared, SF.integrate(squared), base
