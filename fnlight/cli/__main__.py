"""``python -m fnlight.cli``: the ``fnlight`` command."""

import sys

from fnlight.cli import main

if __name__ == "__main__":
    sys.exit(main())
