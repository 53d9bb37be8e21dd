"""The ``structlayers`` console script (also ``python -m structlayers``).

    structlayers demo [options]       the structured-layer table (:mod:`structlayers.demo`)
    structlayers COMMAND [options]    commands that other packages add (e.g. ``bench``)

``demo`` needs nothing but this package; everything after ``demo`` goes to the demo's
own parser unchanged. Every further subcommand comes from the entry-point group
``structlayers.commands``: an entry point loads to a function ``register(subparsers)``
that adds its parser(s) to the given argparse subparsers and sets
``parser.set_defaults(run=run)`` with ``run(args) -> int`` (the exit status). An entry
point whose module cannot be imported (ImportError, e.g. a missing optional package)
still shows up: as a subcommand that says which extra to install and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import List, Optional, Sequence

PROG = "structlayers"
ENTRY_POINT_GROUP = "structlayers.commands"
DEFAULT_EXTRA = "bench"


def _entry_points() -> List[metadata.EntryPoint]:
    """The installed entry points of ``structlayers.commands``."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _extra_of(entry_point: metadata.EntryPoint) -> str:
    """The extra named by the entry point (``module:register [extra]``), else ``bench``."""
    extras = getattr(entry_point, "extras", None) or []
    return extras[0] if extras else DEFAULT_EXTRA


def _add_unavailable(subparsers, name: str, error: ImportError, extra: str) -> None:
    """A subcommand ``name`` that accepts anything and explains what to install."""
    message = (f"{PROG} {name} needs extra packages: {error}; "
               f"install them with pip install '{PROG}[{extra}]'")

    def run(args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 2

    parser = subparsers.add_parser(name, add_help=False,
                                   help=f"unavailable here: needs pip install '{PROG}[{extra}]'")
    parser.set_defaults(run=run, accepts_any_arguments=True)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``demo`` and every entry point of ``structlayers.commands``."""
    top = argparse.ArgumentParser(prog=PROG, description="structured linear layers for PyTorch")
    subparsers = top.add_subparsers(dest="command")
    subparsers.required = True
    # listed for --help; main() hands everything after 'demo' to structlayers.demo.main
    subparsers.add_parser("demo", help="every kind fitted to random Kronecker weights: error, size, speed "
                                       "(see structlayers demo --help)")
    for entry_point in _entry_points():
        if entry_point.name in subparsers.choices:
            continue  # the first one of a name wins; 'demo' is the core's
        try:
            register = entry_point.load()
        except ImportError as exc:  # ModuleNotFoundError included
            _add_unavailable(subparsers, entry_point.name, exc, _extra_of(entry_point))
            continue
        register(subparsers)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (argparse REMAINDER would eat them)
        from . import demo

        return int(demo.main(argv[1:], prog=f"{PROG} demo") or 0)
    top = build_parser()
    args, unknown = top.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        top.error(f"unrecognized arguments: {' '.join(unknown)}")
    run = getattr(args, "run", None)
    if run is None:
        top.error(f"the command {args.command!r} set no run function (parser.set_defaults(run=...))")
    return int(run(args) or 0)


__all__ = ["ENTRY_POINT_GROUP", "build_parser", "main"]
