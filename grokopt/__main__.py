"""``python -m grokopt``: the same as the ``grokopt`` console script."""

from .cli import main

raise SystemExit(main())
