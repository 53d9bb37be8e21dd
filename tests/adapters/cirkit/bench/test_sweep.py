"""``structlayers bench``: files, columns, ratio consistency, plots, bad input.

One ``--quick`` run in-process (digits pooled to 4x4, trained for one epoch into a
temporary cache) and one through ``python -m structlayers`` (the cheaper
untrained ``one-sum`` circuit at K=4, to stay within the time budget). Timings are read
for consistency only, never compared with a bound.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from adapters.cirkit.bench.analysis import beats_label, pareto_front
from adapters.cirkit.bench.config import BenchConfig, default_ranks
from adapters.cirkit.bench.outputs import log_to_wandb, write_outputs
from adapters.cirkit.bench.schema import Row
from adapters.cirkit.bench.sweep import SweepResult, baseline_macs
from adapters.cirkit.bench.variants import CIRKIT_MATERIALISED, CIRKIT_OPTIMIZED, EXACT
from adapters.cirkit.swap import LayerInfo
from structlayers import cli
from structlayers.benchmarking import PEAK_RSS_PROBLEM

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("speedup_vs_rank.png", "error_vs_rank.png", "tradeoff.png", "efficiency_heatmap.png", "memory.png")
MEASURED = ("z_fwd_bwd", "z_fwd", "logc2_fwd")


class FakeWandb(types.ModuleType):
    """Records what log_to_wandb sends; never touches the network or the disk."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        fake = self

        class Run:
            def log(self, data):
                fake.calls.append(("log", data))

            def finish(self):
                fake.calls.append(("finish", None))

        self.Run = Run

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self.Run()

    def Table(self, columns, data):  # noqa: N802 -- wandb's spelling
        return ("table", columns, data)

    def Image(self, path):  # noqa: N802
        return ("image", path)


def read_csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(value: str) -> float:
    return float(value) if value != "" else math.nan


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    fake = FakeWandb()
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRUCTLAYERS_CACHE", str(root / "cache"))
        mp.delenv("WANDB_MODE", raising=False)
        mp.setitem(sys.modules, "wandb", fake)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["bench", "--quick", "--out", str(root / "out"), "--wandb"])
        wandb_mode = os.environ.get("WANDB_MODE")
    out = root / "out"
    rows = read_csv(out / "results.csv")
    blob = json.loads((out / "results.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    return types.SimpleNamespace(code=code, out=out, rows=rows, json=blob, stdout=stdout.getvalue(),
                                 stderr=stderr.getvalue(), wandb=fake, wandb_mode=wandb_mode, cache=root / "cache")


def test_quick_run_writes_every_file_and_prints_the_table(quick):
    assert quick.code == 0
    for name in ("results.csv", "results.json") + PLOTS:
        assert (quick.out / name).is_file(), name
    assert "beats opt=True" in quick.stdout and "/opt" in quick.stdout and "/mat" in quick.stdout
    for row in quick.rows:
        assert row["variant"][:29] in quick.stdout
    assert "bench" in quick.stderr  # the progress bar (tqdm) or its line-per-step fallback
    assert list(quick.cache.glob("cirkit/digits-*.pt"))  # trained once, cached


def test_columns_present_and_values_where_they_must_exist(quick):
    required = ["circuit", "units", "variant", "kind", "rank", "structure", "is_baseline", "same_values",
                "scored", "test_nll", "bpd", "bpd_diff_vs_exact", "error_rate", "rel_weight_error_max",
                "rel_weight_error_mean", "sum_layer_params", "macs_per_sample", "theory_speedup_vs_opt",
                "theory_speedup_vs_materialised", "beats_opt", "pareto", "rank_fraction"]
    for m in MEASURED:
        required += [f"{m}_ms", f"{m}_speedup_vs_opt", f"{m}_speedup_vs_materialised", f"{m}_peak_mib",
                     f"{m}_memory_reduction_vs_opt", f"{m}_efficiency_vs_opt", f"{m}_beats_opt",
                     f"{m}_beats_materialised"]
    assert set(required) <= set(quick.rows[0])
    for row in quick.rows:
        must = [f"{m}_{s}" for m in MEASURED for s in ("ms", "speedup_vs_opt", "speedup_vs_materialised")]
        must += ["macs_per_sample", "theory_speedup_vs_opt", "theory_speedup_vs_materialised",
                 "logc2_fwd_efficiency_vs_opt", "rel_weight_error_max"]
        if PEAK_RSS_PROBLEM is None:
            must += [f"{m}_peak_mib" for m in MEASURED]
        if row["scored"] == "True":
            must += ["test_nll", "bpd", "bpd_diff_vs_exact"]
        for col in must:
            assert math.isfinite(num(row[col])), (row["variant"], col, row[col])
        if row["is_baseline"] == "False":
            assert row["scored"] == "True"
        assert row["circuit"] == "digits"
        assert math.isnan(num(row["error_rate"]))  # a density, not the classifier
    if PEAK_RSS_PROBLEM is not None:
        assert PEAK_RSS_PROBLEM in quick.json["notes"]


def test_every_variant_present(quick):
    config = BenchConfig(**{**BenchConfig.quick_defaults()})
    sizes = {s["units"]: s for s in quick.json["sizes"]}
    assert sorted(sizes) == config.units
    for k in config.units:
        rows = [r for r in quick.rows if int(r["units"]) == k]
        names = [r["variant"] for r in rows]
        assert names == sizes[k]["variants"]  # exactly what circuit_variants returned, in order
        assert {CIRKIT_MATERIALISED, CIRKIT_OPTIMIZED, EXACT} <= set(names)
        approx = sorted((r["kind"], r["structure"], int(r["rank"])) for r in rows if r["rank"] not in ("", "None"))
        expected = sorted((kind, s, rank) for kind in config.kinds for s in config.structures
                          for rank in default_ranks(k))
        assert approx == expected
    assert len(quick.json["rows"]) == len(quick.rows)


def test_ratios_are_consistent_with_times_and_counts(quick):
    for k in {int(r["units"]) for r in quick.rows}:
        rows = [r for r in quick.rows if int(r["units"]) == k]
        opt = next(r for r in rows if r["variant"] == CIRKIT_OPTIMIZED)
        mat = next(r for r in rows if r["variant"] == CIRKIT_MATERIALISED)
        exact = next(r for r in rows if r["variant"] == EXACT)
        for row in rows:
            for m in MEASURED:
                t = num(row[f"{m}_ms"])
                assert num(row[f"{m}_speedup_vs_opt"]) == pytest.approx(num(opt[f"{m}_ms"]) / t, rel=1e-9)
                assert num(row[f"{m}_speedup_vs_materialised"]) == pytest.approx(num(mat[f"{m}_ms"]) / t, rel=1e-9)
                assert (row[f"{m}_beats_opt"] == "True") == (num(row[f"{m}_speedup_vs_opt"]) > 1)
                assert num(row[f"{m}_efficiency_vs_opt"]) == pytest.approx(
                    num(row[f"{m}_speedup_vs_opt"]) / num(row["theory_speedup_vs_opt"]), rel=1e-9)
                # the counted multiply-adds, and the efficiency both counts give for one time; every
                # call computes (a trained model is in eval mode, where log Z would come from its cache)
                done, defined = num(row[f"{m}_macs_done"]), num(row[f"{m}_macs"])
                assert done > 0 and num(row[f"{m}_gemm_efficiency_done"]) == pytest.approx(
                    num(row[f"{m}_gemm_efficiency"]) * done / defined, rel=1e-9)
                peak, peak_opt = num(row[f"{m}_peak_mib"]), num(opt[f"{m}_peak_mib"])
                if peak > 0 and peak_opt > 0:
                    assert num(row[f"{m}_memory_reduction_vs_opt"]) == pytest.approx(peak_opt / peak, rel=1e-9)
            assert num(row["theory_speedup_vs_opt"]) == pytest.approx(
                num(opt["macs_per_sample"]) / num(row["macs_per_sample"]), rel=1e-9)
            if row["scored"] == "True":
                assert num(row["bpd"]) == pytest.approx(num(row["test_nll"]) / (16 * math.log(2)), rel=1e-9)
                assert num(row["bpd_diff_vs_exact"]) == pytest.approx(num(row["bpd"]) - num(exact["bpd"]), abs=1e-12)
        # the exact factor-wise layers do what optimize=True does: two small products per layer
        assert num(exact["theory_speedup_vs_opt"]) == pytest.approx(1.0)
        assert num(mat["theory_speedup_vs_materialised"]) == pytest.approx(1.0)
        assert num(exact["rel_weight_error_max"]) == 0.0 and num(exact["bpd_diff_vs_exact"]) == 0.0
        assert num(exact["bpd"]) == pytest.approx(num(mat["bpd"]), abs=1e-4)  # same values, same function
        for row in rows:
            if row["variant"] in (CIRKIT_OPTIMIZED, CIRKIT_MATERIALISED):
                continue
            wins = [num(row[f"{m}_speedup_vs_opt"]) > 1 for m in MEASURED]
            label = row["beats_opt"]
            assert (label == "yes") == all(wins)
            assert label.startswith("no") == (not any(wins))
            if label == "no (beats materialised only)":
                assert any(num(row[f"{m}_speedup_vs_materialised"]) > 1 for m in MEASURED)


def test_json_holds_the_environment_and_arguments(quick):
    env = quick.json["environment"]
    for key in ("machine", "python", "torch", "torch_threads", "threads", "cirkit", "git_commit", "arguments",
                "timing", "peak_memory"):
        assert key in env, key
    assert env["threads"] == env["torch_threads"] == 2
    assert env["torch"] == torch.__version__
    assert env["arguments"]["quick"] is True and env["arguments"]["wandb"] is True
    assert quick.json["config"]["units"] == [4, 8]
    assert {s["units"]: s["trained"] for s in quick.json["sizes"]} == {4: True, 8: True}
    assert all(isinstance(r["layers"], list) and r["layers"] for r in quick.json["rows"] if not r["is_baseline"])


def test_pngs_are_images(quick):
    from matplotlib.image import imread

    for name in PLOTS:
        path = quick.out / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0, name


def test_wandb_logging_is_optional(quick, capsys):
    kinds = [c[0] for c in quick.wandb.calls]
    assert kinds == ["init", "log", "finish"]
    assert quick.wandb.calls[0][1]["mode"] == "offline" and quick.wandb_mode == "offline"
    logged = quick.wandb.calls[1][1]
    assert logged["results"][0] == "table" and len(logged["results"][2]) == len(quick.rows)
    assert {k for k in logged if k != "results"} == {Path(p).stem for p in PLOTS}
    result = SweepResult([], [], {}, [], BenchConfig())
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", None)  # not installed: import fails
        assert log_to_wandb(result, []) is False
    assert "wandb' package is not installed" in capsys.readouterr().err


def test_console_entry_point_in_a_subprocess(tmp_path):
    env = {**os.environ, "STRUCTLAYERS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "structlayers", "bench", "--quick", "--circuit", "one-sum",
                           "--units", "4", "--out", str(tmp_path / "out"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert {r["circuit"] for r in rows} == {"one-sum"} and {int(r["units"]) for r in rows} == {4}
    assert all(math.isfinite(num(r["logc2_fwd_speedup_vs_opt"])) for r in rows)
    for name in PLOTS:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    assert "untrained seeded model" in done.stdout


@pytest.mark.parametrize("argv,message", [
    (["--circuit", "cube"], "unknown circuit 'cube'"),
    (["--kinds", "fancy"], "unknown kind 'fancy'"),
    (["--kinds", "kronecker"], "is exact and takes no rank"),
    (["--kinds", "tt", "--structures", "flat"], "kind 'tt' cannot make the 'flat'"),
    (["--kinds", "sketched", "--structures", "square"], "kind 'sketched' cannot make the 'square'"),
    (["--structures", "round"], "unknown structure 'round'"),
    (["--ranks", "0"], "a rank must be positive, got 0"),
    (["--ranks", "4,-2"], "a rank must be positive, got -2"),
    (["--units", "8", "--ranks", "8", "--structures", "square"], "rank 8 is too large for K=8"),
    (["--units", "4", "--ranks", "16", "--structures", "flat"], "rank 16 is too large for K=4"),
    (["--units", ""], "--units: empty list"),
    (["--units", "8,x"], "not a comma-separated list of integers"),
    (["--units", "1"], "K must be at least 2"),
    (["--ranks", ","], "--ranks: empty list"),
    (["--batch", "0"], "--batch: must be a positive integer"),
    (["--circuit", "mnist"], "--mnist-dir: the mnist circuit needs a directory"),
])
def test_bad_input_is_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--out", str(tmp_path / "out")] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "structlayers bench: error:" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_mnist_files_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--circuit", "mnist", "--mnist-dir", str(tmp_path / "nowhere"), "--units", "4",
                  "--out", str(tmp_path / "out"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mnist-dir: the mnist circuit" in err and "does not exist" in err and "never downloads" in err


def test_pareto_front_on_a_hand_made_example():
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.6), (0.5, 0.1), (2.0, 0.45), (math.nan, 0.0), (3.0, 0.6)]
    # (1, .5) loses to (2, .4); (2, .45) too; NaN ignored; the duplicate (3, .6) kept twice
    assert pareto_front(points) == [3, 1, 2, 6]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (2.0, 0.5)]) == [1]


def test_theoretical_multiply_adds():
    info = LayerInfo(index=0, num_folds=2, out_features=15, in_features=24, factor_a=(3, 4), factor_b=(5, 6),
                     dtype=torch.float32)
    counts = baseline_macs([info])
    assert counts["materialised"] == 2 * 15 * 24
    assert counts["opt"] == 2 * (3 * 4 * 6 + 3 * 5 * 6)  # A over Ki1 for each Ki2, then B over Ki2 for each Ko1


def test_beats_label_flags_rows_that_beat_only_the_materialised_path():
    row = Row(circuit="digits", units=4, variant="x")
    for m in MEASURED:
        row.call(m).speedup_vs.update(opt=0.8, materialised=3.0)
    assert beats_label(row) == "no (beats materialised only)"
    row.call("logc2_fwd").speedup_vs["opt"] = 1.5
    assert beats_label(row) == "only log c²(x) fwd"
    for m in MEASURED:
        row.call(m).speedup_vs["opt"] = 2.0
    assert beats_label(row) == "yes"
    assert beats_label(Row(circuit="digits", units=4, variant=CIRKIT_OPTIMIZED, is_baseline=True)) == "-"


def test_demo_subcommand_runs_the_layer_demo(capsys):
    assert cli.main(["demo", "--size", "4", "--folds", "1", "--batch", "2", "--ranks", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "kronecker" in out and "lowrank" in out


def test_without_matplotlib_the_numbers_are_still_written(quick, tmp_path, capsys):
    rows = [Row.from_flat(r) for r in quick.json["rows"]]
    result = SweepResult(rows, quick.json["sizes"], quick.json["environment"], [], BenchConfig())
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)  # not installed: import fails
        files = write_outputs(result, tmp_path)
    assert [p.name for p in files] == ["results.csv", "results.json"]
    assert "plots skipped" in capsys.readouterr().err and "matplotlib" in result.notes[-1]
    again = read_csv(tmp_path / "results.csv")
    diffs = [(k, a[k], b[k]) for a, b in zip(again, quick.rows) for k in b if a[k] != b[k]]
    assert not diffs and len(again) == len(quick.rows)  # rows read back from results.json: the same CSV
