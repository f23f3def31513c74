"""``python -m adamkit``: the same command line as the ``adamkit`` console script."""

from __future__ import annotations

import sys

from adamkit.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
