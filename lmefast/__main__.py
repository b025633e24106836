"""``python -m lmefast``: the command line (lmefast.cli), the demo fit without arguments."""
import sys

from lmefast.cli import main

sys.exit(main())
