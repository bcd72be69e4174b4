"""``python -m promptclip``: the same command line as the ``promptclip`` script."""
from __future__ import annotations

import sys

from promptclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
