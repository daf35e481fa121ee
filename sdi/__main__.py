"""``python -m sdi``: the ``sdi`` command line (:mod:`sdi.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
