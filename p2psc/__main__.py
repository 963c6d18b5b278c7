"""``python -m p2psc``: the ``p2psc`` command."""

import sys

from .cli import main

sys.exit(main())
