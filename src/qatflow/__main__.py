"""``python -m qatflow``: the same as the ``qatflow`` console script."""

import sys

from qatflow.cli import main

sys.exit(main())
