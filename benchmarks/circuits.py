"""Squared digits circuit: cirkit's paths against structured sum layers, one run.

Circuit (adapters.cirkit.models.digits_squared_circuit): 8x8 images, 17 categories
per pixel, quad-tree (2 splits), CP layers with K units, signed real weights,
c² = multiply(c, c), evaluated in complex-lse-sum, folded, float32. For each K it
times (median of round-robin repeats after warm-up, torch threads pinned):

  Z fwd+bwd   the partition function ∫c², forward and backward
  c²(x) fwd   log c²(x) for a batch of digits

for cirkit's materialised path (optimize=False), cirkit's optimize=True path (the
strongest baseline: each Kronecker sum layer shattered into two tensor-dot
layers), the exact ``kronecker`` layers (compile-time rule, live parameters),
square-preserving approximations (``square_policy``: Ã ⊗ Ã with rank(Ã) = K/4,
K/2) and flat rank-K/4 approximations (``rank_policy``; cheaper, but not a density
any more: c̃² can go negative). Peak memory (structlayers.benchmarking.peak_rss_mib:
growth of the resident high-water mark during one call, MiB) is measured in a
second pass after every timing, because it fixes glibc's allocator thresholds.

With --train-epochs N the exact circuit is first trained and the test bpd of it
and of every approximation derived from it is reported (cirkit's own paths
keep their initial parameters: timings do not depend on the values).

    python benchmarks/circuits.py [--units 32,64] [--batch 256] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from typing import Dict

import torch

from cirkit.pipeline import PipelineContext

from adapters.cirkit import rank_policy, square_policy, swap_kronecker_sum_layers, use_structured_layers
from adapters.cirkit.models import digits_data, digits_squared_circuit, evaluate_nll, train_squared_circuit
from structlayers.benchmarking import environment, interleaved_medians, peak_rss_mib, pinned_threads


def swapped(model, policy):
    model = copy.deepcopy(model)
    swap_kronecker_sum_layers(model.density, policy)
    swap_kronecker_sum_layers(model.partition, policy)
    return model


def variants_for(k: int, max_materialised: int, train_epochs: int, data) -> Dict[str, object]:
    spec = digits_squared_circuit(k)
    out: Dict[str, object] = {}
    if k <= max_materialised:
        out["cirkit optimize=False"] = spec.compile(optimize=False, seed=0)
    out["cirkit optimize=True"] = spec.compile(optimize=True, seed=0)
    ctx = use_structured_layers(PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True,
                                                optimize=True))
    exact = spec.compile(context=ctx, seed=0)
    if train_epochs:  # the exact layers train the circuit's own parameters (live factors)
        train_squared_circuit(exact, data, epochs=train_epochs, progress=True)
    out["kronecker (live)"] = exact
    for kind in ("lowrank", "nystrom"):
        for rank in sorted({max(1, k // 4), max(1, k // 2)}):
            out[f"{kind} square rank(Ã)={rank}"] = swapped(exact, square_policy(kind, rank))
    out[f"lowrank flat rank={max(1, k // 4)}"] = swapped(exact, rank_policy("lowrank", max(1, k // 4)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=lambda s: [int(v) for v in s.split(",")], default=[32, 64])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-epochs", type=int, default=0)
    parser.add_argument("--max-materialised-units", type=int, default=32,
                        help="skip cirkit's materialised path above this K (its Z builds K^4 weights per fold)")
    parser.add_argument("--out")
    args = parser.parse_args()
    data = digits_data(seed=0)
    x = data.x_test[: args.batch]
    results = []
    rows: Dict[tuple, dict] = {}
    with pinned_threads(args.threads):
        env = environment()

        def z_fwd_bwd(model):
            return lambda: model.log_partition().sum().backward()

        def c2_fwd(model):
            def run():
                with torch.no_grad():
                    model.log_density(x)
            return run

        for k in args.units:  # pass 1: times and bpd
            variants = variants_for(k, args.max_materialised_units, args.train_epochs, data)
            z_times = interleaved_medians({n: z_fwd_bwd(m) for n, m in variants.items()}, repeats=args.repeats, warmup=1)
            c_times = interleaved_medians({n: c2_fwd(m) for n, m in variants.items()}, repeats=args.repeats, warmup=1)
            for name, model in variants.items():
                rows[k, name] = dict(
                    units=k, variant=name, z_fwd_bwd_ms=z_times[name] * 1e3, c2_fwd_ms=c_times[name] * 1e3,
                    z_speedup_vs_opt=z_times["cirkit optimize=True"] / z_times[name],
                    c2_speedup_vs_opt=c_times["cirkit optimize=True"] / c_times[name],
                    test_bpd=(evaluate_nll(model, data.x_test) / (64 * math.log(2))
                              if args.train_epochs and not name.startswith("cirkit") else float("nan")))
        for k in args.units:  # pass 2: peak memory, after all timings
            for name, model in variants_for(k, args.max_materialised_units, 0, data).items():
                row = rows[k, name]
                row.update(z_peak_mib=peak_rss_mib(z_fwd_bwd(model)), c2_peak_mib=peak_rss_mib(c2_fwd(model)))
                print(f"K={k:3d} {name:30s} Z f+b {row['z_fwd_bwd_ms']:9.2f} ms ({row['z_speedup_vs_opt']:5.2f}x) "
                      f"{row['z_peak_mib']:7.1f} MiB | c²(x) {row['c2_fwd_ms']:9.2f} ms "
                      f"({row['c2_speedup_vs_opt']:5.2f}x) {row['c2_peak_mib']:7.1f} MiB | bpd {row['test_bpd']:.4f}",
                      flush=True)
    results = list(rows.values())
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": vars(args), "rows": results}, fh, indent=2)


if __name__ == "__main__":
    main()
