"""The evaluation engine at K=128 on three circuit shapes: time and GEMM efficiency of Z f+b.

Shapes (untrained, seed 0, float32, complex-lse-sum): ``digits`` (the squared 8x8 digits
quad-tree CP circuit), ``deep-narrow`` (a CP circuit on a linear tree over 40 binary
variables: one fold per layer) and ``continuous`` (Gaussian inputs on the 8x8 grid).
Paths: ``cirkit`` (cirkit's ``optimize=True`` compilation and its own evaluation),
``fast`` (``compile_density``: exact factor-wise Kronecker layers, linear-space evaluation)
and ``lowrank`` (``fast`` with every square's factor swapped for its frozen rank-K/8
truncation, ``circuit_variants``' ``lowrank square``: 7.1x fewer multiply-adds).

``track_gemm_efficiency``: the sum layers' multiply-adds of ``log Z`` forward+backward (the
backward counted as twice the forward) at this machine's matrix-product rate, measured in
the same process, divided by the measured time (median of 5 after a warm-up).
``track_gemm_efficiency_done``: the same for the multiply-adds the call's matrix products
actually run (``structlayers.benchmarking.matmul_macs``; fewer where ``Z`` works on
low-rank blocks).
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from . import _common as common

#: ``STRUCTLAYERS_BENCH_SMOKE=1`` (the test suite's smoke run) builds K=8: for checking, never for numbers
K = 8 if os.environ.get("STRUCTLAYERS_BENCH_SMOKE", "") not in ("", "0") else 128
_MEMO: Dict[tuple, object] = {}


def _build(shape: str, path: str):
    try:
        from adapters.cirkit.bench.circuits import deep_cp_circuit, digits_squared_circuit, gaussian_image_circuit
        from adapters.cirkit.costs import circuit_macs
        from adapters.cirkit.model import compile_density
    except ImportError as exc:  # a commit before the engine work
        raise NotImplementedError(f"engine APIs unavailable on this commit: {exc}") from exc
    builders = {"digits": lambda: digits_squared_circuit(K), "deep-narrow": lambda: deep_cp_circuit(40, K, region_graph="linear-tree"),
                "continuous": lambda: gaussian_image_circuit(K)}
    spec = builders[shape]()
    if path == "cirkit":
        model = spec.compile(seed=0, optimize=True, evaluation="semiring")
    elif path == "fast":
        model = compile_density(spec.circuit, seed=0, num_categories=spec.num_categories)
    else:
        from adapters.cirkit.bench.variants import circuit_variants

        found = circuit_variants(spec, spec.compile(seed=0), kinds=("lowrank",), ranks=(K // 8,),
                                 structures=("square",), materialised=False)
        model = next(v.model for v in found if v.name == f"lowrank square {K // 8}")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, 3 * circuit_macs(model.partition, 1)


class LogPartition:
    params = [["digits", "deep-narrow", "continuous"], ["cirkit", "fast", "lowrank"]]
    param_names = ("shape", "path")
    timeout = 600

    def setup(self, shape, path):
        common.ensure_threads()
        key = (shape, path)
        if key not in _MEMO:
            _MEMO.clear()
            with torch.random.fork_rng():
                _MEMO[key] = _build(shape, path)
        self.model, self.params, self.macs = _MEMO[key]

    def _call(self):
        return torch.autograd.grad(self.model.log_partition().sum(), self.params, allow_unused=True)

    def time_log_partition_backward(self, shape, path):
        self._call()

    def _efficiency(self, macs: int) -> float:
        """``macs`` at this machine's matrix-product rate / the median time of the call."""
        from structlayers.benchmarking import gemm_gflops, median_time

        seconds = median_time(self._call, repeats=5, warmup=1)
        return 2.0 * macs / (gemm_gflops() * 1e9) / seconds

    def track_gemm_efficiency(self, shape, path):
        return self._efficiency(self.macs)

    track_gemm_efficiency.unit = "fraction"

    def track_gemm_efficiency_done(self, shape, path):
        try:
            from structlayers.benchmarking import matmul_macs
        except ImportError as exc:  # a commit before the counter
            raise NotImplementedError(f"matmul_macs unavailable on this commit: {exc}") from exc
        # counted through backward(): torch's counter fails under autograd.grad of leaves
        macs = matmul_macs(lambda: self.model.log_partition().sum().backward())
        self.model.zero_grad(set_to_none=True)
        return self._efficiency(macs)

    track_gemm_efficiency_done.unit = "fraction"
