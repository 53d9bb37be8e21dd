"""Old home of the ``structlayers`` console script; kept for one release.

The script is :func:`structlayers.cli.main` now; ``bench`` is added to it by the
``structlayers.commands`` entry point :func:`adapters.cirkit.bench.cli.register`.
"""

from structlayers.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
