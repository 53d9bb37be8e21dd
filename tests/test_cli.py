"""The ``structlayers`` console script: ``demo`` with the core alone, subcommands from entry points."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import structlayers as sl
from structlayers import cli

ROOT = Path(__file__).resolve().parents[1]
TINY_DEMO = ["--size", "4", "--folds", "1", "--batch", "2", "--ranks", "2", "--repeats", "1", "--threads", "1"]
BLOCKED = ("cirkit", "adapters", "adapters.cirkit")


@pytest.fixture
def no_extras(monkeypatch):
    """cirkit and the adapters cannot be imported (a None entry in sys.modules blocks it)."""
    loaded = [name for name in sys.modules if name.split(".")[0] in ("cirkit", "adapters")]
    for name in set(BLOCKED) | set(loaded):  # submodules imported earlier in this process too
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import cirkit  # noqa: F401
    with pytest.raises(ImportError):
        import adapters.cirkit  # noqa: F401


def _entry_points(monkeypatch, *specs):
    """Replace the discovery of ``structlayers.commands`` by these (name, value) entry points."""
    found = [EntryPoint(name=name, value=value, group=cli.ENTRY_POINT_GROUP) for name, value in specs]
    monkeypatch.setattr(cli, "_entry_points", lambda: found)


def test_demo_help_needs_only_the_core(no_extras, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: structlayers demo") and "--ranks" in out and "--decay" in out


def test_a_tiny_demo_runs_without_cirkit(no_extras, capsys):
    assert cli.main(["demo", *TINY_DEMO]) == 0
    out = capsys.readouterr().out
    assert "W = A ⊗ B: 1 folds of 16 x 16" in out
    assert "rel.err" in out and re.search(r"^lowrank +rank=2 ", out, re.MULTILINE)
    for kind in sl.available():  # every kind has a row, or a line saying why it was skipped
        assert re.search(rf"^ *{kind} ", out, re.MULTILINE), kind
    assert all(sys.modules[name] is None for name in BLOCKED)  # nothing got past the block


def test_demo_in_a_fresh_interpreter_with_cirkit_blocked():
    code = ("import sys\n"
            f"for name in {BLOCKED!r}:\n"
            "    sys.modules[name] = None\n"
            "from structlayers.cli import main\n"
            f"raise SystemExit(main(['demo', *{TINY_DEMO!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rel.err" in proc.stdout and re.search(r"^lowrank +rank=2 ", proc.stdout, re.MULTILINE)


def test_python_m_structlayers_lists_demo():
    proc = subprocess.run([sys.executable, "-m", "structlayers", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("usage: structlayers") and "demo" in proc.stdout


def _register_hello(subparsers) -> None:
    parser = subparsers.add_parser("hello", help="says hello")
    parser.add_argument("--name", default="world")
    parser.add_argument("--status", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return args.status

    parser.set_defaults(run=run)


def test_an_entry_point_adds_a_subcommand(monkeypatch, capsys):
    _entry_points(monkeypatch, ("hello", f"{__name__}:_register_hello"))
    assert cli.main(["hello", "--name", "folds", "--status", "3"]) == 3
    assert capsys.readouterr().out == "hello folds\n"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "hello" in out and "says hello" in out and "demo" in out
    with pytest.raises(SystemExit) as exit_:  # a registered command keeps its own strict parser
        cli.main(["hello", "--nmae", "x"])
    assert exit_.value.code == 2 and "unrecognized arguments: --nmae x" in capsys.readouterr().err


@pytest.mark.parametrize("value,extra", [("no_such_module_for_structlayers.cli:register", "bench"),
                                         ("no_such_module_for_structlayers.cli:register [plots]", "plots")])
def test_an_entry_point_that_cannot_be_imported_becomes_an_install_hint(monkeypatch, capsys, value, extra):
    _entry_points(monkeypatch, ("hello", f"{__name__}:_register_hello"), ("bench", value))
    hint = (f"structlayers bench needs extra packages: No module named 'no_such_module_for_structlayers'; "
            f"install them with pip install 'structlayers[{extra}]'")
    for argv in (["bench"], ["bench", "--circuit", "digits", "--quick"], ["bench", "--help"]):
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == hint and captured.out == ""
    assert cli.main(["hello"]) == 0  # the other commands still work
    assert cli.main(["demo", *TINY_DEMO]) == 0


def test_an_import_error_inside_the_module_is_caught_too(monkeypatch, capsys, no_extras):
    _entry_points(monkeypatch, ("bench", "adapters.cirkit.bench.cli:register"))
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("structlayers bench needs extra packages: ") and "pip install 'structlayers[bench]'" in err


def test_bad_command_lines(monkeypatch, capsys):
    _entry_points(monkeypatch)
    for argv, message in (([], "the following arguments are required: command"),
                          (["fourier"], "invalid choice: 'fourier'"),
                          (["--version", "demo"], "unrecognized arguments: --version")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_pyproject_declares_the_script_and_the_bench_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    scripts = text[text.index("[project.scripts]"):]
    assert re.search(r'^structlayers = "structlayers\.cli:main"$', scripts, re.MULTILINE)
    commands = text[text.index('[project.entry-points."structlayers.commands"]'):]
    assert re.search(r'^bench = "adapters\.cirkit\.bench\.cli:register"$', commands, re.MULTILINE)
