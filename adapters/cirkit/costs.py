"""Multiply-adds of a compiled circuit's sum layers: what a GEMM-bound evaluation must do.

``circuit_macs(circuit, batch)`` adds every sum layer's multiply-adds for one forward
over ``batch`` samples: cirkit's dense sum, CP-T, tensor-dot and Tucker layers by their
shapes, this package's layers by their own ``flops``. Products and input layers cost no
multiply-adds of a matrix product and are left out: the count is the work a perfect
evaluation would still have to do at the matrix-product rate. One exception: in a partition
function the linear-space evaluator applies the sum layers just above integrated inputs to
their rank-V blocks (:mod:`~adapters.cirkit.linear_space`), far below the count given here.
"""

from __future__ import annotations

from cirkit.backend.torch.circuits import TorchCircuit
from cirkit.backend.torch.layers import TorchSumLayer
from cirkit.backend.torch.layers.optimized import TorchCPTLayer, TorchTensorDotLayer, TorchTuckerLayer

from .internals import tensordot_units

__all__ = ["layer_macs", "circuit_macs"]


def layer_macs(layer, batch: int) -> int:
    """Multiply-adds of one sum layer's forward over ``batch`` samples (0 for other layers)."""
    f = layer.num_folds
    if callable(getattr(layer, "flops", None)):  # this package's layers count their own
        return int(layer.flops(batch))
    if isinstance(layer, TorchSumLayer):
        return f * layer.num_output_units * layer.num_input_units * layer.arity * batch
    if isinstance(layer, TorchCPTLayer):
        return f * layer.num_output_units * layer.num_input_units * batch
    if isinstance(layer, TorchTensorDotLayer):
        kj, kq = tensordot_units(layer)
        kk = layer.num_output_units // kq
        return f * kk * kj * kq * batch
    if isinstance(layer, TorchTuckerLayer):
        return f * layer.num_output_units * layer.num_input_units ** layer.arity * batch
    return 0


def circuit_macs(circuit: TorchCircuit, batch: int = 1) -> int:
    """Multiply-adds of every sum layer of ``circuit`` for one forward over ``batch`` samples."""
    return sum(layer_macs(layer, batch) for layer in circuit.layers)
