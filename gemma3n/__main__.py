"""``python -m gemma3n``: the same command line as the ``gemma3n`` console script."""

import sys

from .cli import main

sys.exit(main())
