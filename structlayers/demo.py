"""Demo: fit every registered kind to random folded Kronecker weights W = A ⊗ B.

Run ``structlayers demo`` (or ``python -m structlayers.demo``); ``make demo`` is
another job, the circuit benchmark report. For each kind and a few ranks it prints
relative error, the optimal (Eckart–Young) error at the same rank, parameters,
multiply-adds and the measured forward time against the exact layers: ``dense``
(W materialised) and ``kronecker`` (exact, never materialised).

Factors have geometrically decaying spectra (σ_i = decay^i), like trained
circuit weights, so that low ranks are meaningful.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional, Sequence

import torch

import structlayers as sl
from structlayers.benchmarking import environment, median_time, pinned_threads
from structlayers.testing import decaying_factors, decaying_matrix



def decaying_factor(folds: int, size: int, decay: float, gen: torch.Generator, dtype) -> torch.Tensor:
    """(F, size, size) with random singular vectors and singular values decay^i, drawn from
    ``gen``: :func:`structlayers.testing.decaying_matrix`, kept under this name for
    benchmark files written against it."""
    return decaying_matrix(folds, size, size, decay=decay, dtype=dtype, generator=gen)


def _configs(ranks: Sequence[int], size: int) -> List[tuple]:
    """(kind, label, options) for every registered kind, by its capabilities: kinds exact from
    A ⊗ B once, kinds whose rank is the matrix rank at every rank, the others at the
    parameter budget of a flat layer of that rank (with their ``budget_options``)."""
    kinds = sl.available()
    exact = [k for k in kinds if sl.get(k).exact_from_kronecker]
    ranked = [k for k in kinds if k not in exact and sl.get(k).rank_is_matrix_rank]
    others = [k for k in kinds if k not in exact and k not in ranked]
    configs: List[tuple] = [(k, "exact", {}) for k in exact]
    for rank in ranks:
        for kind in ranked:
            configs.append((kind, f"rank={rank}", {"rank": rank}))
        # the optimum's kronecker structure, Ã ⊗ B̃: the cheaper low-rank form on this input
        configs.append(("lowrank", f"rank={rank} kron", {"rank": rank, "structure": "kronecker"}))
    for rank in ranks:
        # Other kinds get the parameter budget of a flat rank-`rank` layer.
        share = rank * 2 * size * size / float(size**4)
        for kind in others:
            configs.append((kind, f"share={share:.4f}", {"params_share": share, **sl.get(kind).budget_options}))
    return configs


def run(size: int = 64, folds: int = 2, batch: int = 256, ranks: Sequence[int] = (16, 64, 256),
        threads: int = 2, dtype: torch.dtype = torch.float32, repeats: int = 5, decay: float = 0.9,
        seed: int = 0, out=None) -> List[dict]:
    """Build every configuration, time it and print the table to ``out`` (default: the
    current ``sys.stdout``); returns the rows."""
    out = sys.stdout if out is None else out
    gen = torch.Generator().manual_seed(seed)
    a, b = decaying_factors(folds, size, decay=decay, dtype=dtype, generator=gen)
    x = torch.randn(folds, batch, size * size, generator=gen, dtype=dtype)
    rows: List[dict] = []
    with pinned_threads(threads), torch.no_grad():
        env = environment()
        print(f"W = A ⊗ B: {folds} folds of {size * size} x {size * size} (A, B: {size} x {size}, "
              f"σ_i = {decay}^i), batch {batch}, {str(dtype).replace('torch.', '')}, "
              f"torch {env['torch']} with {env['torch_threads']} threads; median of {repeats} "
              f"after warm-up", file=out)
        for kind, label, options in _configs(ranks, size):
            try:
                layer = sl.from_kronecker(kind, a, b, **options)
            except (ValueError, TypeError) as exc:
                print(f"  {kind:10s} {label:18s} skipped: {exc}", file=out)
                continue
            exact = layer.exact_from_kronecker
            err = 0.0 if exact else layer.relative_error_kronecker(a, b)
            rank = None if exact else getattr(layer, "rank", None)
            # The Eckart–Young optimum applies where `rank` is the matrix rank (not tt's bond rank).
            optimum = sl.optimal_relative_error_kronecker(a, b, rank) if layer.rank_is_matrix_rank else math.nan
            seconds = median_time(lambda: layer(x), repeats=repeats, warmup=2)
            rows.append(dict(kind=kind, config=label, rank=rank, rel_error=err, optimal_error=optimum,
                             params=layer.num_params, flops=layer.flops(batch), seconds=seconds))
    base = {r["kind"]: r for r in rows if r["config"] == "exact"}
    header = (f"{'kind':10s} {'config':18s} {'rank':>5s} {'rel.err':>9s} {'optimum':>9s} {'params':>10s} "
              f"{'MACs':>12s} {'time ms':>9s} {'vs dense':>9s} {'vs kron':>8s}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        r["speedup_vs_dense"] = base["dense"]["seconds"] / r["seconds"]
        r["speedup_vs_kronecker"] = base["kronecker"]["seconds"] / r["seconds"]
        print(f"{r['kind']:10s} {r['config']:18s} {r['rank'] if r['rank'] is not None else '-':>5} "
              f"{r['rel_error']:9.3e} {r['optimal_error']:9.3e} {r['params']:10d} {r['flops']:12.3e} "
              f"{r['seconds'] * 1e3:9.2f} {r['speedup_vs_dense']:8.1f}x {r['speedup_vs_kronecker']:7.2f}x",
              file=out)
    return rows


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), print the table; returns 0. ``prog`` names
    the command in the usage line."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="factor size K (W is K^2 x K^2)")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ranks", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.9)
    args = parser.parse_args(argv)
    run(size=args.size, folds=args.folds, batch=args.batch, ranks=args.ranks, threads=args.threads,
        dtype=getattr(torch, args.dtype), repeats=args.repeats, decay=args.decay)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
