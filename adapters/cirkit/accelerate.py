"""The fast evaluation as what a compiled circuit does when it is called.

:func:`accelerate` makes ``circuit(x)``, ``circuit()`` and cirkit's ``IntegrateQuery`` on
the circuit run the linear-space evaluation (:mod:`adapters.cirkit.linear_space`): the
same outputs, shapes and dtypes as cirkit's log-space evaluation (values below cirkit's
-708 clamp come out exact instead of clamped). Circuits changed by
:func:`~adapters.cirkit.swap.swap_kronecker_sum_layers` or compiled under
:func:`~adapters.cirkit.compile.use_structured_layers` are accelerated already.

Opting out, for debugging: ``circuit.fast_evaluation = False``, or the block
``with cirkit_evaluation(circuit): ...``. Any other ``module_fn`` given to
``circuit.evaluate`` gets cirkit's own evaluation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit

from .internals import integrate_query_mask
from .linear_space import LOG_SEMIRINGS, evaluate_graph

__all__ = ["AcceleratedCircuit", "accelerate", "cirkit_evaluation", "is_accelerated"]


class AcceleratedCircuit(TorchCircuit):
    """A compiled cirkit circuit whose evaluation is the linear-space fast path.

    Made by :func:`accelerate` from a ``TorchCircuit`` (its class is changed in place;
    modules, parameters and ``state_dict`` stay as they are). ``fast_evaluation``:
    False gives cirkit's own evaluation.
    """

    fast_evaluation: bool = True

    def evaluate(self, x: Optional[Tensor] = None, module_fn=None) -> Tensor:  # noqa: D102
        if self.fast_evaluation and all(layer.semiring in LOG_SEMIRINGS for layer in self.layers):
            if module_fn is None:
                return evaluate_graph(self, x)
            mask = integrate_query_mask(module_fn)
            if mask is not None and x is not None:
                return evaluate_graph(self, x, integrate=mask)
        return super().evaluate(x, module_fn=module_fn)


def accelerate(circuit: TorchCircuit) -> TorchCircuit:
    """Give ``circuit`` (a compiled cirkit ``TorchCircuit``) the fast evaluation, in place.

    Returns the same object. Circuits in cirkit's ``sum-product`` semiring already
    evaluate in linear space and keep cirkit's evaluation.
    """
    if isinstance(circuit, AcceleratedCircuit):
        return circuit
    if type(circuit) is not TorchCircuit:
        raise TypeError(f"accelerate expects a compiled cirkit TorchCircuit, got {type(circuit).__name__}")
    if not all(layer.semiring in LOG_SEMIRINGS for layer in circuit.layers):
        return circuit  # sum-product: cirkit's evaluation is linear-space already
    circuit.__class__ = AcceleratedCircuit
    return circuit


def is_accelerated(circuit: TorchCircuit) -> bool:
    """Whether calling ``circuit`` runs the fast evaluation."""
    return isinstance(circuit, AcceleratedCircuit) and circuit.fast_evaluation


@contextlib.contextmanager
def cirkit_evaluation(*circuits: TorchCircuit) -> Iterator[None]:
    """Within the block, the given circuits evaluate with cirkit's own log-space code."""
    saved = [(c, c.__dict__.get("fast_evaluation")) for c in circuits if isinstance(c, AcceleratedCircuit)]
    try:
        for c, _ in saved:
            c.fast_evaluation = False
        yield
    finally:
        for c, value in saved:
            if value is None:
                c.__dict__.pop("fast_evaluation", None)
            else:
                c.fast_evaluation = value
