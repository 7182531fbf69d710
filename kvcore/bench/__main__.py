"""`python -m kvcore.bench`: one benchmark trial from the command line (kvcore/bench/cli.py)."""

import sys

from kvcore.bench.cli import main

sys.exit(main())
