"""Squared digits circuit: cirkit's paths against structured sum layers, one run.

Circuit: 8x8 images, 17 categories per pixel, quad-tree (2 splits) region graph,
CP layers with K units, signed real weights, squared with multiply(c, c) and
evaluated in complex-lse-sum, folded. For each K it times (median of round-robin
repeats after warm-up, torch threads pinned):

  Z fwd+bwd   the partition function ∫c², forward and backward
  c²(x) fwd   log c²(x) for a batch of digits

for cirkit's materialised path (optimize=False), cirkit's optimize=True path (the
strongest baseline: each Kronecker sum layer shattered into two tensor-dot
layers), the exact ``kronecker`` layers (compile-time rule, live parameters) and
approximations at rank K/4 and K/2 per Kronecker layer. Peak memory is the growth
of the process's peak RSS during the timed calls (VmHWM after resetting it through
/proc/self/clear_refs), in MiB.

    python benchmarks/circuits.py [--units 32,64] [--batch 256] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
from typing import Callable, Dict

import torch

import cirkit.symbolic.functional as SF
from cirkit.pipeline import PipelineContext
from cirkit.symbolic.layers import CategoricalLayer
from cirkit.templates.region_graph import QuadTree
from cirkit.templates.utils import Parameterization, parameterization_to_factory

from adapters.cirkit import rank_policy, swap_kronecker_sum_layers, use_structured_layers
from structlayers.benchmarking import environment, interleaved_medians, pinned_threads


def squared_digits(units: int):
    weights = parameterization_to_factory(Parameterization(activation="none", initialization="normal"))
    base = QuadTree((1, 8, 8), num_patch_splits=2).build_circuit(
        input_factory=functools.partial(CategoricalLayer, num_categories=17),
        sum_product="cp", sum_weight_factory=weights, num_input_units=units, num_sum_units=units)
    squared = SF.multiply(base, base)
    return squared, SF.integrate(squared)


def peak_rss_mib(fn: Callable[[], object]) -> float:
    """Growth of peak RSS (MiB) over one call of fn, measured from the current RSS."""
    def read(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
        raise RuntimeError(field)

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    start = read("VmRSS:")
    fn()
    return (read("VmHWM:") - start) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=lambda s: [int(v) for v in s.split(",")], default=[32, 64])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-materialised-units", type=int, default=32,
                        help="skip cirkit's materialised path above this K (its Z builds K^4 weights per fold)")
    parser.add_argument("--out")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[: args.batch], dtype=torch.long)
    results = []
    with pinned_threads(args.threads):
        env = environment()
        for k in args.units:
            squared, partition = squared_digits(k)
            variants: Dict[str, tuple] = {}
            for name, optimize in (("cirkit optimize=False", False), ("cirkit optimize=True", True)):
                if not optimize and k > args.max_materialised_units:
                    continue
                torch.manual_seed(0)
                ctx = PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True, optimize=optimize)
                variants[name] = (ctx.compile(squared), ctx.compile(partition))
            torch.manual_seed(0)
            ctx = use_structured_layers(PipelineContext(backend="torch", semiring="complex-lse-sum", fold=True,
                                                        optimize=True))
            exact = (ctx.compile(squared), ctx.compile(partition))
            variants["kronecker (live)"] = exact
            for kind in ("lowrank", "nystrom"):
                for rank in (max(1, k // 4), max(1, k // 2)):
                    circuit, z = copy.deepcopy(exact)
                    swap_kronecker_sum_layers(circuit, rank_policy(kind, rank), mode="frozen")
                    swap_kronecker_sum_layers(z, rank_policy(kind, rank), mode="frozen")
                    variants[f"{kind} r={rank}"] = (circuit, z)

            def z_fwd_bwd(pair):
                def run():
                    pair[1]().real.sum().backward()
                return run

            def c2_fwd(pair):
                def run():
                    with torch.no_grad():
                        pair[0](x)
                return run

            z_times = interleaved_medians({n: z_fwd_bwd(p) for n, p in variants.items()}, repeats=args.repeats, warmup=1)
            c_times = interleaved_medians({n: c2_fwd(p) for n, p in variants.items()}, repeats=args.repeats, warmup=1)
            with torch.no_grad():
                ref = variants["cirkit optimize=True"]
                ref_z = float(ref[1]().real.reshape(-1)[0])
                ref_ll = ref[0](x).real[:, 0, 0] - ref_z
            for name, pair in variants.items():
                with torch.no_grad():
                    log_z = float(pair[1]().real.reshape(-1)[0])
                    ll = pair[0](x).real[:, 0, 0] - log_z
                bpd_delta = float((ref_ll - ll).mean()) / (64 * math.log(2))
                row = dict(units=k, variant=name, z_fwd_bwd_ms=z_times[name] * 1e3, c2_fwd_ms=c_times[name] * 1e3,
                           z_peak_mib=peak_rss_mib(z_fwd_bwd(pair)), c2_peak_mib=peak_rss_mib(c2_fwd(pair)),
                           log_z=log_z, bpd_minus_exact=bpd_delta)
                row["z_speedup_vs_opt"] = z_times["cirkit optimize=True"] / z_times[name]
                row["c2_speedup_vs_opt"] = c_times["cirkit optimize=True"] / c_times[name]
                results.append(row)
                print(f"K={k:3d} {name:24s} Z f+b {row['z_fwd_bwd_ms']:9.2f} ms ({row['z_speedup_vs_opt']:5.2f}x) "
                      f"{row['z_peak_mib']:7.1f} MiB | c²(x) {row['c2_fwd_ms']:9.2f} ms "
                      f"({row['c2_speedup_vs_opt']:5.2f}x) {row['c2_peak_mib']:7.1f} MiB | "
                      f"log Z {log_z:9.3f} | Δbpd vs exact {bpd_delta:+.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": vars(args), "rows": results}, fh, indent=2)


if __name__ == "__main__":
    main()
