"""`python -m scripts.fleet`: the namespace fleet's command (scripts/fleet/cli.py)."""

import sys

from scripts.fleet.cli import main

sys.exit(main())
