"""`python -m kvcomm.cli`: the same as the `kvcomm` command."""

import sys

from kvcomm.cli.main import main

sys.exit(main())
