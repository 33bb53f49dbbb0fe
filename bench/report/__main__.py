"""`python -m bench.report`: see bench/report/cli.py."""

import sys

from .cli import main

sys.exit(main())
