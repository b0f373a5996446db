"""``python -m exml_fast``: the ``exml-fast`` command line (see :mod:`exml_fast.cli`)."""

import sys

from exml_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
