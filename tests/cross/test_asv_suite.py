"""Smoke test of the asv suites in asv_bench/: every benchmark runs once, none fails.

Runs ``asv check`` and ``asv run --python=same --quick`` (one call of every benchmark
and parameter set, in this interpreter, nothing built or installed) against a copy of
asv_bench/asv.conf.json whose env, results and html directories and whose asv machine
file live in pytest's tmp_path, so nothing is written into the repository. asv exits
non-zero when a benchmark (or a setup_cache, or the import of a suite) fails, and so
does this test, with asv's output. Timings are not looked at.

Also checks, in a subprocess (the suites pin torch's thread count on import), that the
peak-memory measurement of the memory suite works here and is accurate.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import asv.util as asv_util  # asv is in the test extra

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is tests/cross/)
ASV_DIR = ROOT / "asv_bench"
MACHINE = "asv-smoke"


@pytest.fixture(scope="module")
def asv(tmp_path_factory):
    """Run ``python -m asv ARGS`` on a temporary copy of the config; returns a runner."""
    tmp = tmp_path_factory.mktemp("asv")
    conf = asv_util.load_json(str(ASV_DIR / "asv.conf.json"), js_comments=True)
    conf.update(
        repo=str(ROOT),
        benchmark_dir=str(ASV_DIR / "benchmarks"),
        env_dir=str(tmp / "env"),
        results_dir=str(tmp / "results"),
        html_dir=str(tmp / "html"),
    )
    config = tmp / "asv.conf.json"
    config.write_text(json.dumps(conf, indent=2))
    env = dict(os.environ)
    env["HOME"] = str(tmp)  # asv's machine file (~/.asv-machine.json) goes to tmp, not the real home
    # One thread: nothing is timed here, and one thread is fastest on a busy 2-core machine.
    env["STRUCTLAYERS_BENCH_THREADS"] = "1"
    # The circuit suites: same grid, tiny work (quality models of a few digits), and the
    # models they train cached in tmp rather than in the user's cache.
    env["STRUCTLAYERS_BENCH_SMOKE"] = "1"
    env["STRUCTLAYERS_CACHE"] = str(tmp / "cache")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["COLUMNS"] = "200"  # asv shortens benchmark names to the terminal width

    def run(*args, timeout=600):
        proc = subprocess.run([sys.executable, "-m", "asv", *args, "--config", str(config)],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr

    code, out = run("machine", "--yes", "--machine", MACHINE)
    assert code == 0, out
    return run


def test_asv_check(asv):
    code, out = asv("check", "--python=same")
    assert code == 0, out
    assert "No problems found" in out, out


#: Which benchmarks the smoke run starts (asv matches the regex against each benchmark's
#: name and against ``name(param, ...)``): every benchmark of every suite, with fewer
#: parameter sets in three of them. The memory suites measure the calls of the timing suites
#: after the same setup, and their own code does not depend on the parameters, so they run
#: a few sets (memory: every kind at rank 8 and the smaller size; circuits_memory: two
#: variants); the circuit suites build only K=8 in a smoke run (see _circuits.py: the other
#: K would be n/a). Not starting those ~200 benchmark processes keeps this test fast.
SMOKE_BENCHMARKS = "|".join([
    r"^(?!(memory|circuits|circuits_memory)\.)",  # any other suite, whole (new suites too)
    r"^memory\.\w+\.\w+\('\w+', 8, (32|256)\)$",
    r"^circuits\.SquaredDigits\.\w+\(.*, 8\)$",
    r"^circuits_memory\.SquaredDigits\.\w+\('(cirkit optimize=False|lowrank square 2)', 8\)$",
])


def test_every_benchmark_runs_once(asv):
    code, out = asv("run", "--python=same", "--quick", "--dry-run", "--show-stderr",
                    "--machine", MACHINE, "--bench", SMOKE_BENCHMARKS)
    assert code == 0, f"asv run failed (exit {code}); a benchmark, setup_cache or suite import failed:\n{out}"
    for name in ("layers.KroneckerInput.time_forward", "layers.DenseInput.time_forward_backward",
                 "memory.KroneckerInput.track_forward_backward", "memory.DenseInput.track_forward",
                 "quality.KroneckerInput.track_relative_error", "quality.DenseInput.track_num_params",
                 "circuits.SquaredDigits.time_log_density", "circuits.SquaredDigits.time_log_partition_backward",
                 "circuits_memory.SquaredDigits.track_log_partition",
                 "circuits_quality.SquaredDigitsDensity.track_bpd_increase",
                 "circuits_quality.SquaredDigitsWeights.track_relative_weight_error",
                 "circuits_quality.SquaredDigitsClassifier.track_error_rate",
                 "jobs.TrainStep.time_step", "jobs.TrainStep.track_step_peak_mib", "jobs.Marginal.time_log_marginal",
                 "jobs.Sample.time_sample_16", "engine.LogPartition.track_gemm_efficiency",
                 "engine.LogPartition.track_gemm_efficiency_done"):
        assert name in out, f"{name} did not run:\n{out}"
    assert " failed" not in out, out


def test_circuit_grid_matches_circuit_variants():
    """Every name of the circuit suites' grid is a variant ``circuit_variants`` returns for
    their configuration, and every variant survives the trip from ``setup_cache`` to a
    benchmark process (either failure would only show as n/a in the suites)."""
    script = (
        "import torch\n"
        "from benchmarks import _circuits as c\n"
        "from adapters.cirkit.models import digits_squared_circuit\n"
        "spec = digits_squared_circuit(2, image_shape=(2, 2), num_categories=3)\n"
        "found = c.build_variants(spec, spec.compile(seed=0))\n"
        "x = torch.randint(0, 3, (5, 4), generator=torch.Generator().manual_seed(0))\n"
        "for name, v in found.items():\n"
        "    copy = c.loads(c.dumps(v.model))\n"
        "    same = torch.equal(c.log_density(copy, x), c.log_density(v.model, x))\n"
        "    assert same and torch.equal(c.log_partition(copy), c.log_partition(v.model)), name\n"
        "print('\\n'.join(sorted(set(c.VARIANTS) - set(found))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ASV_DIR, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                                                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", f"not returned by circuit_variants: {proc.stdout}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc is Linux-only")
def test_peak_memory_measures_one_call():
    """32 MiB allocated and freed inside the call, 8 MiB kept: both seen, nothing else."""
    script = (
        "import torch\n"
        "from benchmarks import _common as c\n"
        "assert c.PEAK_RSS_PROBLEM is None, c.PEAK_RSS_PROBLEM\n"
        "keep = []\n"
        "def call():\n"
        "    t = torch.ones(8 * 2**20)\n"        # 32 MiB, freed at return
        "    keep.append(torch.ones(2 * 2**20))\n"  # 8 MiB, kept
        "    return float(t[0])\n"
        "print(c.peak_rss_mib(call), c.peak_rss_mib(lambda: None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ASV_DIR, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    peak, idle = map(float, proc.stdout.split())
    assert 39.5 <= peak <= 41.5, peak   # 32 + 8 MiB live at once
    assert 0 <= idle <= 0.5, idle
