"""``python -m bitsmith``: the same command line as the ``bitsmith`` console script."""

from .cli import main

raise SystemExit(main())
