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

ROOT = Path(__file__).resolve().parents[1]
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
    env["PYTHONDONTWRITEBYTECODE"] = "1"

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


def test_every_benchmark_runs_once(asv):
    code, out = asv("run", "--python=same", "--quick", "--dry-run", "--show-stderr",
                    "--machine", MACHINE)
    assert code == 0, f"asv run failed (exit {code}); a benchmark, setup_cache or suite import failed:\n{out}"
    for name in ("layers.KroneckerInput.time_forward", "layers.DenseInput.time_forward_backward",
                 "memory.KroneckerInput.track_forward_backward", "memory.DenseInput.track_forward",
                 "quality.KroneckerInput.track_relative_error", "quality.DenseInput.track_num_params"):
        assert name in out, f"{name} did not run:\n{out}"
    assert " failed" not in out, out


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
