"""``structlayers bench train``: identical starts, files, columns, plots, bad input (nothing timed)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import types

import pytest
import torch

from adapters.cirkit.bench.circuits import digits_squared_circuit
from adapters.cirkit.bench.train import TRAIN_COLUMNS, TRAINING_VARIANTS, CirkitPipeline, TrainConfig, as_density
from adapters.cirkit.model import compile_density
from structlayers import cli
from structlayers.benchmarking import PEAK_RSS_PROBLEM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["bench", "train", "--quick", "--out", str(root), "--no-progress"])
    with open(root / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    blob = json.loads((root / "train.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    return types.SimpleNamespace(code=code, out=root, rows=rows, json=blob, stdout=stdout.getvalue())


def both_pipelines(seed: int):
    """(spec, cirkit's pipeline, the fast path) of one 4x4 digits circuit, K=4, in float64."""
    spec = digits_squared_circuit(4, image_shape=(4, 4), num_categories=17)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            reference = CirkitPipeline(spec.circuit, num_categories=17, seed=seed, dtype=torch.float64)
            fast = compile_density(spec.circuit, seed=seed, num_categories=17, dtype=torch.float64)
        finally:
            torch.set_default_dtype(torch.float32)
    return spec, reference, fast


def test_both_pipelines_start_from_the_same_values():
    """cirkit's pipeline and the fast path, compiled from one symbolic c with one seed:
    the same initial log-likelihoods (float64), so their curves are comparable."""
    spec, reference, fast = both_pipelines(seed=3)
    x = torch.randint(0, 17, (9, 16), generator=torch.Generator().manual_seed(0))
    reference.eval()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast.log_likelihood(x), reference.log_likelihood(x), rtol=1e-10, atol=1e-10)
        # the trained values carry over for sampling
        density = as_density(reference, spec.circuit, 17)
        torch.testing.assert_close(density.log_base(x).real, reference.c(x).real[:, 0, :1], rtol=1e-10, atol=1e-10)


def test_quick_run_writes_every_file(quick):
    assert quick.code == 0
    for name in ("train.csv", "train.json", "train_curves.png", "samples.png"):
        assert (quick.out / name).is_file(), name
    for name in ("train_curves.png", "samples.png"):
        assert (quick.out / name).read_bytes()[:8] == PNG_MAGIC
    assert list(quick.rows[0]) == list(TRAIN_COLUMNS)
    config = TrainConfig(**TrainConfig.quick_defaults())
    assert {(int(r["units"]), r["variant"]) for r in quick.rows} == {(k, v) for k in config.units
                                                                     for v in config.variants}
    assert "s/epoch" in quick.stdout and "to ref bpd" in quick.stdout


def test_columns_hold_what_they_say(quick):
    for k in {int(r["units"]) for r in quick.rows}:
        group = {r["variant"]: r for r in quick.rows if int(r["units"]) == k}
        ref = group["cirkit"]
        for r in group.values():
            num = {c: float(r[c]) if r[c] not in ("", "None") else math.nan for c in r if c not in ("variant", "pareto")}
            assert num["seconds_per_epoch"] > 0 and math.isfinite(num["final_test_bpd"])
            assert num["speedup_vs_reference"] == pytest.approx(float(ref["seconds_per_epoch"]) / num["seconds_per_epoch"])
            # same start, same data order, same optimiser, same function: the same model within float32 noise
            assert abs(num["initial_test_bpd"] - float(ref["initial_test_bpd"])) < 1e-4
            assert abs(num["final_bpd_diff_vs_reference"]) < 2e-3
            if PEAK_RSS_PROBLEM is None:
                assert num["peak_step_mib"] > 0
    rows = quick.json["rows"]
    assert all(len(r["test_bpd"]) == len(r["epoch_seconds"]) == r["epochs"] for r in rows)
    for key, values in quick.json["samples"].items():
        x = torch.tensor(values)
        assert x.shape == (8, 16) and int(x.min()) >= 0 and int(x.max()) < 17, key
    env = quick.json["environment"]
    for key in ("torch", "cirkit", "threads", "git_commit", "timing", "peak_memory", "data", "arguments"):
        assert key in env, key


@pytest.mark.parametrize("argv,message", [
    (["--variants", "nope"], "--variants: unknown training variant 'nope'"),
    (["--units", "1"], "--units: every K must be an integer of at least 2"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--lr", "-1"], "--lr: must be a positive number"),
    (["--downsample", "3"], "--downsample: 3 does not divide the 8x8 digits"),
])
def test_bad_input_is_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "train", "--out", str(tmp_path / "out")] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "structlayers bench train: error:" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_variant_registry_names_the_reference():
    assert {"cirkit", "exact"} <= set(TRAINING_VARIANTS)


def test_structured_variant_names():
    from adapters.cirkit.bench.config import BenchError
    from adapters.cirkit.bench.train import parse_structure, training_variant

    assert parse_structure("lowrank:K/8") == ("lowrank", {"rank": 1 / 8})
    assert parse_structure("lowrank:4") == ("lowrank", {"rank": 4})
    assert parse_structure("tt:0.25") == ("tt", {"params_share": 0.25})
    assert parse_structure("monarch") == ("monarch", {})
    assert parse_structure("cirkit") is None
    for bad, message in (("lowrank:K/x", "K/<number>"), ("lowrank:-2", "positive integer"), ("fft", "unknown training")):
        with pytest.raises(BenchError, match=message):
            training_variant(bad)


def test_best_within_and_the_front():
    from adapters.cirkit.bench.train import TrainRow, best_within, pareto_rows

    rows = [TrainRow(units=k, variant=v, epochs=1, seconds_per_epoch=s, final_test_bpd=b, parameters=p, macs_per_sample=m)
            for k, v, s, b, p, m in ((32, "exact", 1.0, 2.0, 100, 50), (64, "exact", 4.0, 1.8, 400, 200),
                                     (64, "lowrank:K/8", 0.8, 1.9, 90, 40), (128, "lowrank:K/8", 3.0, 1.7, 300, 150))]
    assert best_within(rows, seconds=1.0).variant == "lowrank:K/8"  # cheaper and better than the dense K=32
    assert best_within(rows, seconds=4.0).units == 128
    assert best_within(rows, parameters=95).units == 64 and best_within(rows, macs=10) is None
    assert sorted(pareto_rows(rows)) == [2, 3]  # the structured circuits dominate both dense ones


def test_choose_reads_a_run_and_names_the_best_within_a_budget(quick):
    """``bench choose`` over the quick run's train.json: the answer is the row with the lowest
    final bpd among those within every budget given, the listing holds exactly those rows."""
    rows = [r for r in quick.json["rows"] if r["variant"] != "cirkit"]
    budget = sorted(r["seconds_per_epoch"] for r in rows)[len(rows) // 2]
    within = sorted((r for r in rows if r["seconds_per_epoch"] <= budget), key=lambda r: r["final_test_bpd"])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["bench", "choose", "--from", str(quick.out), "--seconds", repr(budget)])
    lines = stdout.getvalue().splitlines()
    assert code == 0
    assert f"{within[0]['variant']} at K={within[0]['units']}" in lines[0]
    assert [(line.split()[0], int(line.split()[1])) for line in lines[2:]] == [(r["variant"], r["units"]) for r in within]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["bench", "choose", "--from", str(quick.out), "--parameters", "1"]) == 1
    assert "nothing measured" in stdout.getvalue() and "the fastest is" in stdout.getvalue()


@pytest.mark.parametrize("argv,message", [
    ([], "--seconds: give at least one budget"),
    (["--macs", "0"], "--macs: must be positive"),
    (["--seconds", "1", "--from", "missing-folder"], "--from: nothing at missing-folder: give a 'bench train' output folder"),
])
def test_choose_bad_input_is_named(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "choose"] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_live_variant_names():
    from adapters.cirkit.bench.config import BenchError
    from adapters.cirkit.bench.train import training_variant

    assert callable(training_variant("live-lowrank:K/4")) and callable(training_variant("live-nystrom:2"))
    for bad in ("live-tt:K/4", "live-lowrank", "live-lowrank:x"):
        with pytest.raises(BenchError, match="live-"):
            training_variant(bad)


def test_both_pipelines_follow_one_trajectory():
    """Same start, same batches, same Adam: the parameters stay equal step after step (float64),
    so a gap in final bpd between the pipelines is the training's sensitivity to rounding,
    not a different model or gradient."""
    spec, reference, fast = both_pipelines(seed=1)
    x = torch.randint(0, 17, (40, 16), generator=torch.Generator().manual_seed(1))
    optimisers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (reference, fast)]
    for step in range(8):
        batch = x[step % 4 * 10: step % 4 * 10 + 10]
        losses = []
        for model, opt in zip((reference, fast), optimisers):
            loss = -model.log_likelihood(batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-10)
    assert len(list(reference.parameters())) == len(list(fast.parameters()))
    for a, b in zip(reference.parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
