"""`python -m pdserve ...`: the `pdserve` command run by a given Python."""

import sys

from pdserve.cli import main

sys.exit(main())
