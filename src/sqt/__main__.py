"""`python -m sqt` is the `sqt` command."""

import sys

from .cli import main

sys.exit(main())
