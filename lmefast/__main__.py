"""``python -m lmefast``: the demo fit (see lmefast.cli)."""
import sys

from lmefast.cli import main

sys.exit(main())
