"""structlayers for cirkit: structured sum layers inside compiled (squared) circuits.

Depends on ``structlayers`` and on cirkit (the PyPI distribution ``libcirkit``);
``structlayers`` itself never imports this package.

>>> report = swap_kronecker_sum_layers(compiled_squared_circuit, rank_policy("nystrom", 16))  # doctest: +SKIP
>>> ctx = use_structured_layers(PipelineContext(backend="torch", semiring="complex-lse-sum"))  # doctest: +SKIP
"""

from .accelerate import AcceleratedCircuit, accelerate, cirkit_evaluation
from .compile import kronecker_sum_rule, use_structured_layers
from .layers import TorchKroneckerSumLayer, TorchStructuredSumLayer, kronecker_factors, semiring_linear
from .likelihood import bits_per_dimension, log_likelihood, log_value, nll_to_bpd
from .model import CircuitDensity, compile_density
from .linear_space import evaluate_linear_space
from .semiring import ExactComplexLSESumSemiring, ExactLSESumSemiring, unclamped
from .swap import LayerInfo, SwapReport, kronecker_sum_layers, rank_policy, square_policy, swap_kronecker_sum_layers

__all__ = [
    "swap_kronecker_sum_layers",
    "rank_policy",
    "square_policy",
    "kronecker_sum_layers",
    "LayerInfo",
    "SwapReport",
    "use_structured_layers",
    "kronecker_sum_rule",
    "TorchKroneckerSumLayer",
    "TorchStructuredSumLayer",
    "kronecker_factors",
    "semiring_linear",
    "log_likelihood",
    "evaluate_linear_space",
    "log_value",
    "bits_per_dimension",
    "unclamped",
    "ExactLSESumSemiring",
    "ExactComplexLSESumSemiring",
    "accelerate",
    "cirkit_evaluation",
    "AcceleratedCircuit",
    "CircuitDensity",
    "compile_density",
    "nll_to_bpd",
]
