"""``python -m autotune`` (see `autotune.cli`)."""

import sys

from .cli import main

sys.exit(main())
