"""``python -m fastcore.train``: see :mod:`fastcore.train.cli`."""

import sys

from fastcore.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
