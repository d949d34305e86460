"""``python -m xaiwatch ...``: the same command line as the ``xaiwatch`` console script."""

from __future__ import annotations

import sys

from xaiwatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
