"""Forward time of the Kronecker-input kinds against the dense layer, one run.

W = A ⊗ B with A, B of size 64 x 64 (W is 4096 x 4096), batch 256, float32,
torch threads pinned (default 2). Factors have decaying spectra (σ_i = 0.9^i)
so that rank 64 is a meaningful approximation. Reports median forward time
(round-robin over the layers, after warm-up), speedup vs dense, relative error
and the Eckart–Young optimum at the same rank. Writes JSON with --out.

    python benchmarks/kronecker_layers.py [--threads 2] [--repeats 15] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import structlayers as sl
from structlayers.benchmarking import environment, interleaved_medians, pinned_threads
from structlayers.testing import decaying_factors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--decay", type=float, default=0.9)
    parser.add_argument("--out")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    a, b = decaying_factors(1, args.size, decay=args.decay, dtype=torch.float32, generator=gen)
    x = torch.randn(1, args.batch, args.size**2, generator=gen)
    r = args.rank
    layers = {
        "dense": sl.from_kronecker("dense", a, b),
        "kronecker": sl.from_kronecker("kronecker", a, b),
        f"lowrank r={r}": sl.from_kronecker("lowrank", a, b, rank=r),
        f"lowrank r={r} kronecker-structured": sl.from_kronecker("lowrank", a, b, rank=r, structure="kronecker"),
        f"nystrom r={r} (product grid)": sl.from_kronecker("nystrom", a, b, rank=r),
        f"nystrom r={r} (joint pivots)": sl.from_kronecker("nystrom", a, b, rank=r, structure="flat"),
    }
    with pinned_threads(args.threads), torch.no_grad():
        times = interleaved_medians({k: (lambda l=l: l(x)) for k, l in layers.items()}, repeats=args.repeats)
        env = environment()
    optimum = sl.optimal_relative_error_kronecker(a, b, r)
    rows = []
    print(f"A, B {args.size}x{args.size} (W {args.size**2}x{args.size**2}), batch {args.batch}, float32, "
          f"{env['torch_threads']} threads, torch {env['torch']}, median of {args.repeats} round-robin")
    print(f"{'layer':40s} {'ms':>8s} {'vs dense':>9s} {'rel.err':>9s} {'optimum':>9s} {'params':>9s} {'MACs':>10s}")
    for name, layer in layers.items():
        exact = layer.exact_from_kronecker
        err = 0.0 if exact else layer.relative_error_kronecker(a, b)
        opt = optimum if layer.rank_is_matrix_rank else float("nan")
        row = dict(layer=name, ms=times[name] * 1e3, speedup_vs_dense=times["dense"] / times[name],
                   rel_error=err, optimal_error=opt, params=layer.num_params, flops=layer.flops(args.batch))
        rows.append(row)
        print(f"{name:40s} {row['ms']:8.2f} {row['speedup_vs_dense']:8.1f}x {err:9.4f} {opt:9.4f} "
              f"{row['params']:9d} {row['flops']:10.3e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
