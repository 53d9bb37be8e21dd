"""``python -m structlayers``: the ``structlayers`` console script (see :mod:`structlayers.cli`)."""

from .cli import main

raise SystemExit(main())
