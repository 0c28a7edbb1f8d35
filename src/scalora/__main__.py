"""``python -m scalora``: the same as the ``scalora`` command."""

import sys

from scalora.cli import main

if __name__ == "__main__":
    sys.exit(main())
