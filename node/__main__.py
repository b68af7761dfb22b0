"""`python -m node` is the `cabinet` command."""

import sys

from .faces.cli import main

if __name__ == "__main__":
    sys.exit(main())
