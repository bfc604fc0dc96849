"""``python -m graphopt``: the command-line interface (see graphopt.cli)."""

import sys

from .cli import main

sys.exit(main())
