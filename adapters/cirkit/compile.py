"""Emit structured sum layers at compile time.

No ``from __future__ import annotations`` here: cirkit reads the rule's
signature from its (real) annotations.
"""

import contextlib
from typing import Iterator

from cirkit.backend.torch.compiler import TorchCompiler
from cirkit.backend.torch.layers import TorchLayer
from cirkit.backend.torch.rules.layers import DEFAULT_LAYER_COMPILATION_RULES, compile_sum_layer
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.layers import SumLayer
from cirkit.symbolic.parameters import KroneckerParameter

from .accelerate import accelerate
from .layers import TorchKroneckerSumLayer
from .swap import MODES, kronecker_sum_layers, swap_kronecker_sum_layers


def compile_kronecker_sum_layer(compiler: TorchCompiler, sl: SumLayer) -> TorchLayer:
    """Compile a sum layer; one whose weight is a Kronecker product becomes a
    :class:`TorchKroneckerSumLayer`, which cirkit folds but does not shatter or fuse."""
    if not isinstance(sl.weight.output, KroneckerParameter):
        return compile_sum_layer(compiler, sl)
    return TorchKroneckerSumLayer(sl.num_input_units, sl.num_output_units, sl.arity,
                                  weight=compiler.compile_parameter(sl.weight), semiring=compiler.semiring)


@contextlib.contextmanager
def kronecker_sum_rule() -> Iterator[None]:
    """Within the block, cirkit compiles Kronecker-weighted sum layers factor-wise.

    cirkit keeps one module-level rule table shared by every context, so the rule is
    installed for the block only and the previous one restored afterwards.
    """
    previous = DEFAULT_LAYER_COMPILATION_RULES.get(SumLayer)
    DEFAULT_LAYER_COMPILATION_RULES[SumLayer] = compile_kronecker_sum_layer
    try:
        yield
    finally:
        if previous is None:
            del DEFAULT_LAYER_COMPILATION_RULES[SumLayer]
        else:
            DEFAULT_LAYER_COMPILATION_RULES[SumLayer] = previous


def use_structured_layers(ctx: PipelineContext, kind="kronecker", *, mode: str = "live",
                          fast: bool = True, **options) -> PipelineContext:
    """Make ``ctx.compile`` (and ``ctx.integrate``/``multiply``, which call it) emit structured layers.

    Kronecker-weighted sum layers compile to exact factor-wise layers, which cirkit
    folds and which ``optimize=True`` leaves alone; then, unless ``kind`` is
    ``kronecker`` in ``live`` mode (the default: an exact, faster path that trains the
    circuit's own parameters), they are swapped by :func:`swap_kronecker_sum_layers`
    with ``kind``, ``mode`` and ``options``. With ``fast`` (the default) every circuit the
    context compiles evaluates through the linear-space fast path when it is called
    (:func:`~adapters.cirkit.accelerate.accelerate`). Returns ``ctx``.
    """
    if not isinstance(ctx, PipelineContext):
        raise TypeError(f"expected a cirkit PipelineContext, got {type(ctx).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'frozen' or 'live'")
    compile_symbolic = ctx.compile

    def compile(sc):
        if ctx.is_compiled(sc):
            return ctx.get_compiled_circuit(sc)
        with kronecker_sum_rule():
            circuit = compile_symbolic(sc)
        if kronecker_sum_layers(circuit) and not (kind == "kronecker" and mode == "live" and not options):
            swap_kronecker_sum_layers(circuit, kind, mode=mode, fast=fast, **options)
        if fast:
            accelerate(circuit)
        return circuit

    ctx.compile = compile  # type: ignore[method-assign]
    return ctx
