"""`python -m fastft ...`: the same as the `fastft` command."""

import sys

from fastft.cli import main

sys.exit(main())
