"""structlayers against its peers on the same weights, and each kind against its own best order.

Peers: tensorly-torch (``tltorch``, the optional extra ``peers``: ``pip install
"structlayers[peers]"``). Without it the peer columns are skipped with a message; the
structlayers rows and the order grid still run. Never imported by the tests.

Part 1, peers. Decaying-spectrum weights (σ_i = 0.995^i, ``structlayers.testing``) of
4096 x 4096 at batch 1024 and 1024 x 1024 at batch 256, float32. For each size two
budgets: 25 % of the dense parameters, and the parameters of a tensor train of bond
rank 16 (``tt`` at rank 16, the others at that parameter share); ``tucker`` also in its
split-modes layout (order 2d, as tltorch tensorizes). Every peer gets the same mode
layout as ``tt``'s (out and in modes); tltorch is timed in both of its
implementations (``factorized``: contract x with the factors; ``reconstructed``:
rebuild W, then one GEMM) and its faster one is its score. Columns: relative Frobenius
error of the weight, parameters, build time, forward and forward+backward median (ms)
of round-robin repeats after warm-up, and the time relative to ``nn.Linear``.

Part 2, orders. For every registered kind over a grid of sizes and batches: the forward
time (``layer.forward(x)``: the input checks and the order the cost model picks) divided
by the fastest of its orders, each timed through ``layer.forward_in(order, x)``; rebuild +
GEMM is one of them where W is small enough. ``nn.Module.__call__``'s hook dispatch (about
1.5 µs, the same for every order and for ``nn.Linear``) is left out of both; the table's
``call`` column shows the module call for reference. Orders whose modelled cost is above
``--skip-factor`` times the chosen one's are not timed (their time is not the minimum unless
the model is off by that factor). The
goal is <= 1.1; the worst case is printed, of the medians' ratio and of the ratio of each
function's fastest round (on a shared machine the medians of equal work differ by 10-15 %).

    python benchmarks/peers.py [--threads 2] [--repeats 7] [--out peers.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import structlayers as sl
from structlayers.benchmarking import environment, interleaved_timings, pinned_threads
from structlayers.testing import decaying_matrix

DECAY = 0.995
TLTORCH_NAMES = {"tt": "BlockTT", "cp": "CP", "tucker": "Tucker"}
#: tltorch's CP initialisation is ALS on the order-2d tensor; its Khatri-Rao products have
#: (entries of W / smallest mode) * rank elements. Above this many it is not attempted.
TLTORCH_CP_MAX_ELEMENTS = 1 << 28


def _tltorch():
    try:
        import tltorch  # noqa: F401  (an optional peer)
    except ImportError:
        return None
    return tltorch


#: each timed sample loops a call until it lasts at least this long (seconds), so that
#: sub-millisecond calls are not timed at the clock's and the scheduler's resolution.
MIN_SAMPLE_SECONDS = 0.02


def _timed_rounds(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, dict]:
    """Round-robin timing: median and spread (min, max) in ms per call, per function."""
    timings = interleaved_timings(fns, repeats=repeats, warmup=2, min_seconds=MIN_SAMPLE_SECONDS)
    return {name: {k: v * 1e3 for k, v in t.items()} for name, t in timings.items()}


def _forward_backward(module: Callable[[torch.Tensor], torch.Tensor], params: List[torch.Tensor], x: torch.Tensor):
    def run():
        for p in params:
            p.grad = None
        module(x).sum().backward()
    return run


def _ours(kind: str, w: torch.Tensor, options: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # costlier-than-dense warnings: the table shows the cost
        start = time.perf_counter()
        layer = sl.from_dense(kind, w, **options)
        seconds = time.perf_counter() - start
    return layer, seconds


def _peer(tltorch, kind: str, w: torch.Tensor, out_modes, in_modes, rank, implementation: str):
    """A tltorch FactorizedLinear with our layout from the same weight, or (None, reason)."""
    out, inp = w.shape
    if kind == "cp" and isinstance(rank, float):
        modes = list(out_modes) + list(in_modes)
        cp_rank = int(rank * out * inp / sum(modes))
        khatri_rao = out * inp // min(modes) * cp_rank
        if khatri_rao > TLTORCH_CP_MAX_ELEMENTS:
            return None, (f"tltorch CP-ALS at rank {cp_rank} on the order-{len(modes)} tensor needs "
                          f"{khatri_rao * 4 / 2**30:.0f} GiB Khatri-Rao products; not attempted")
    linear = nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    kwargs = {"n_iter_max": 25} if kind in ("cp", "tucker") else {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly's notes on SVD starts larger than a mode
        peer = tltorch.FactorizedLinear.from_linear(
            linear, rank=rank, auto_tensorize=False, in_tensorized_features=tuple(in_modes),
            out_tensorized_features=tuple(out_modes), bias=False, factorization=TLTORCH_NAMES[kind],
            implementation=implementation, decomposition_kwargs=kwargs)
    return (peer, time.perf_counter() - start), None


def _peer_error(peer, w: torch.Tensor) -> float:
    with torch.no_grad():
        approx = peer.weight.to_matrix().reshape(w.shape).double()
        return float((approx - w.double()).norm() / w.double().norm())


def peers(args) -> List[dict]:
    tltorch = _tltorch()
    if tltorch is None:
        print("tltorch (tensorly-torch) is not installed: peer rows skipped. "
              "Install the extra with `pip install \"structlayers[peers]\"` to compare.")
    rows = []
    for n, batch in args.sizes:
        w = decaying_matrix(1, n, n, decay=DECAY, dtype=torch.float32, seed=0)[0]
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(1))
        linear = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        rank16, _ = _ours("tt", w[None], {"rank": 16})
        share16 = rank16.num_params / (n * n)
        budgets = [("25 %", 0.25, {"tt": {"params_share": 0.25}}), ("TT rank 16", share16, {"tt": {"rank": 16}})]
        for label, share, special in budgets:
            models: Dict[str, tuple] = {"nn.Linear": (linear, list(linear.parameters()), 0.0, n * n, 0.0)}
            notes, remarks = {}, {}
            for kind in ("tt", "cp", "cp split", "tucker", "tucker split"):
                if kind == "cp split" and (n > args.cp_full_size or share > 0.1):
                    continue  # CP-ALS on the order-2d tensor at rank in the thousands: minutes (358 s at 1024, 25 %)
                options = dict(special.get(kind, {"params_share": share}))
                if kind.endswith(" split"):
                    kind, options["split_modes"] = kind[: -len(" split")], True
                if kind == "cp" and n > args.cp_full_size:
                    # ALS at 4096 and 25 % is rank ~5500 on 16.7 M entries: ~0.3 T multiply-adds a sweep
                    options["iterations"] = args.cp_large_iterations
                    remarks[f"structlayers {kind}"] = f"CP-ALS limited to {args.cp_large_iterations} sweeps at this size"
                layer, seconds = _ours(kind, w[None], options)
                err = layer.relative_error(w[None])
                label_ours = f"structlayers {kind}" + (" (split modes)" if options.get("split_modes") else "")
                models[label_ours] = (lambda t, layer=layer: layer(t[None])[0], list(layer.parameters()),
                                      err, layer.num_params, seconds)
                if tltorch is None or options.get("split_modes"):
                    continue
                # the same layout as ours; tltorch's rank: the same TT rank, else the same share
                rank = 16 if (kind == "tt" and label == "TT rank 16") else share
                for implementation in ("factorized", "reconstructed"):
                    built, reason = _peer(tltorch, kind, w, rank16.out_modes, rank16.in_modes, rank, implementation)
                    if built is None:
                        notes[f"tltorch {kind}"] = reason
                        break
                    peer, seconds = built
                    params = [p for p in peer.parameters()]
                    models[f"tltorch {kind} ({implementation})"] = (
                        peer, params, _peer_error(peer, w), sum(p.numel() for p in params), seconds)
            with pinned_threads(args.threads):
                with torch.no_grad():
                    fwd = _timed_rounds({k: (lambda m=m[0]: m(x)) for k, m in models.items()}, args.repeats)
                fwdbwd = _timed_rounds({k: _forward_backward(m[0], m[1], x) for k, m in models.items()}, args.repeats)
            base_f, base_b = fwd["nn.Linear"]["median"], fwdbwd["nn.Linear"]["median"]
            for name, (_, _, err, params, seconds) in models.items():
                rows.append(dict(size=n, batch=batch, budget=label, share=round(share, 4), layer=name, rel_error=err,
                                 params=params, build_s=seconds, fwd_ms=fwd[name], fwd_bwd_ms=fwdbwd[name],
                                 fwd_vs_linear=fwd[name]["median"] / base_f,
                                 fwd_bwd_vs_linear=fwdbwd[name]["median"] / base_b))
            for name, reason in notes.items():
                rows.append(dict(size=n, batch=batch, budget=label, share=round(share, 4), layer=name, skipped=reason))
            for row in rows:
                if row["size"] == n and row["budget"] == label and row["layer"] in remarks:
                    row["note"] = remarks[row["layer"]]
            _print_peers([r for r in rows if r["size"] == n and r["budget"] == label])
    return rows


def _print_peers(rows: List[dict]) -> None:
    head = rows[0]
    print(f"\nW {head['size']}x{head['size']}, batch {head['batch']}, budget {head['budget']} "
          f"(share {head['share']:.4f}); ms: median [min-max]")
    print(f"{'layer':36s} {'rel.err':>8s} {'params':>9s} {'build s':>8s} {'fwd ms':>22s} {'x Lin':>6s} "
          f"{'fwd+bwd ms':>24s} {'x Lin':>6s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['layer']:36s} skipped: {r['skipped']}")
            continue
        f, b = r["fwd_ms"], r["fwd_bwd_ms"]
        print(f"{r['layer']:36s} {r['rel_error']:8.4f} {r['params']:9d} {r['build_s']:8.2f} "
              f"{f['median']:9.2f} [{f['min']:.1f}-{f['max']:.1f}] {r['fwd_vs_linear']:6.2f} "
              f"{b['median']:10.2f} [{b['min']:.1f}-{b['max']:.1f}] {r['fwd_bwd_vs_linear']:6.2f}"
              + (f"  ({r['note']})" if "note" in r else ""))
    sys.stdout.flush()


# ---------------------------------------------------------------------- part 2
def _grid_layer(kind: str, n: int, share: float):
    w = decaying_matrix(1, n, n, decay=DECAY, dtype=torch.float32, seed=2)
    cls = sl.get(kind)
    if cls.exact_from_dense:
        return sl.from_dense(kind, w)
    options = {"params_share": share}
    # the fit's quality does not matter for timing: CP-ALS gets one sweep
    options.update({"sketched": {"fit": "projection", "seed": 0}, "cp": {"iterations": 1}}.get(kind, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sl.from_dense(kind, w, **options)


def orders(args) -> List[dict]:
    rows = []
    print(f"\nForward time / fastest order (goal <= 1.1); orders modelled above {args.skip_factor}x the "
          f"chosen one's cost not timed")
    print(f"{'kind':10s} {'n':>5s} {'batch':>6s} {'chosen':24s} {'fastest':24s} {'ratio':>6s} {'(min)':>6s}  "
          f"timed orders (ms, median)")
    for n in args.grid_sizes:
        for kind in sl.available():
            layer = _grid_layer(kind, n, args.grid_share)
            for batch in args.grid_batches if n < 4096 else args.grid_batches_large:
                x = torch.randn(1, batch, n, generator=torch.Generator().manual_seed(3))
                chosen = layer.order(batch)
                candidates = [o for o in layer.orders(batch) if o.cost <= args.skip_factor * chosen.cost]
                fns = {o.name: (lambda o=o: layer.forward_in(o, x)) for o in candidates}
                fns["forward"] = lambda: layer.forward(x)
                fns["call"] = lambda: layer(x)
                with pinned_threads(args.threads), torch.no_grad():
                    times = _timed_rounds(fns, args.repeats)
                fastest = min((o.name for o in candidates), key=lambda k: times[k]["median"])
                ratio = times["forward"]["median"] / times[fastest]["median"]
                # the same ratio on the fastest round of each: robust to other jobs on the machine
                # (the forward and its own order measure the same work)
                ratio_min = times["forward"]["min"] / min(times[o.name]["min"] for o in candidates)
                rows.append(dict(kind=kind, size=n, batch=batch, chosen=chosen.name, fastest=fastest, ratio=ratio,
                                 ratio_min=ratio_min, times={k: v["median"] for k, v in times.items()},
                                 skipped=[o.name for o in layer.orders(batch) if o not in candidates]))
                timed = ", ".join(f"{k} {v['median']:.2f}" for k, v in times.items() if k not in ("forward", "call"))
                timed += f"; call {times['call']['median']:.2f}"
                print(f"{kind:10s} {n:5d} {batch:6d} {chosen.name:24s} {fastest:24s} {ratio:6.2f} {ratio_min:6.2f}  {timed}")
                sys.stdout.flush()
    for key, what in (("ratio", "medians"), ("ratio_min", "fastest rounds")):
        worst = max(rows, key=lambda r: r[key])
        print(f"worst case ({what}): {worst['kind']} n={worst['size']} batch={worst['batch']}: {worst[key]:.2f}x "
              f"(chosen {worst['chosen']}, fastest {worst['fastest']})")
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--skip-factor", type=float, default=4.0)
    parser.add_argument("--grid-share", type=float, default=0.25)
    parser.add_argument("--part", choices=("all", "peers", "orders"), default="all")
    parser.add_argument("--size", type=int, choices=(1024, 4096), default=None,
                        help="part 1 at this weight size only (default: both)")
    parser.add_argument("--cp-full-size", type=int, default=1024,
                        help="above this size our CP-ALS runs --cp-large-iterations sweeps (default 25 below)")
    parser.add_argument("--cp-large-iterations", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    args.sizes = [(256, 64)] if args.quick else [(n, b) for n, b in ((4096, 1024), (1024, 256))
                                                 if args.size is None or n == args.size]
    args.grid_sizes = [64, 256] if args.quick else [256, 1024, 4096]
    args.grid_batches = [1, 64] if args.quick else [1, 16, 256, 1024]
    args.grid_batches_large = [1, 256]  # 4096 x 4096: the slow orders take seconds per call
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"torch {env['torch']}, {args.threads} threads, float32, median of {args.repeats} round-robin repeats")
    result = {"environment": env, "args": {k: v for k, v in vars(args).items()}}
    if args.part in ("all", "peers"):
        result["peers"] = peers(args)
    if args.part in ("all", "orders"):
        result["orders"] = orders(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
