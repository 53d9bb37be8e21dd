"""nn.Linear replacements on a 4096 x 4096 dense weight with a decaying spectrum.

Batch 1024, float32, torch threads pinned (default 2). ``lowrank`` at rank 256
(theoretical 8x fewer multiply-adds than nn.Linear) is compared with ``tt``,
``sketched`` and ``monarch`` at comparable parameter counts (params_share of
lowrank r=256 = 0.125). Median of round-robin repeats after warm-up; relative
Frobenius error of each weight. Writes JSON with --out.

    python benchmarks/linear_layers.py [--threads 2] [--repeats 9] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import structlayers as sl
from structlayers.benchmarking import environment, interleaved_medians, pinned_threads
from structlayers.testing import decaying_matrix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--decay", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    n = args.features
    with pinned_threads(args.threads):
        w = decaying_matrix(1, n, n, decay=args.decay, dtype=torch.float32, generator=gen)[0]
        linear = nn.Linear(n, n)
        with torch.no_grad():
            linear.weight.copy_(w)
        share = args.rank * 2 * n / (n * n)
        builds = {
            f"lowrank r={args.rank}": ("lowrank", {"rank": args.rank, "seed": 0}),
            f"nystrom r={args.rank}": ("nystrom", {"rank": args.rank}),
            "tt (params_share)": ("tt", {"params_share": share}),
            "monarch (params_share)": ("monarch", {"params_share": share}),
            "sketched (params_share, projection fit)": ("sketched", {"params_share": share, "fit": "projection", "seed": 0}),
        }
        modules = {"nn.Linear": linear}
        for name, (kind, options) in builds.items():
            modules[name] = sl.Linear.from_linear(linear, kind, **options)
        x = torch.randn(args.batch, n, generator=gen)
        with torch.no_grad():
            times = interleaved_medians({k: (lambda m=m: m(x)) for k, m in modules.items()}, repeats=args.repeats)
        env = environment()
    print(f"W {n}x{n} (σ_i = {args.decay}^i), batch {args.batch}, float32, {env['torch_threads']} threads, "
          f"torch {env['torch']}, median of {args.repeats} round-robin")
    print(f"{'layer':42s} {'ms':>8s} {'vs Linear':>9s} {'rel.err':>8s} {'params':>10s} {'MACs':>10s}")
    rows = []
    for name, module in modules.items():
        if name == "nn.Linear":
            err, params, flops = 0.0, n * n, n * n * args.batch
        else:
            err = module.layer.relative_error(w)
            params, flops = module.layer.num_params, module.layer.flops(args.batch)
        row = dict(layer=name, ms=times[name] * 1e3, speedup=times["nn.Linear"] / times[name],
                   rel_error=err, params=params, flops=flops)
        rows.append(row)
        print(f"{name:42s} {row['ms']:8.2f} {row['speedup']:8.2f}x {err:8.4f} {params:10d} {flops:10.3e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
