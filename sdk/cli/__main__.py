"""``python -m sdk.cli``: the same as the ``edgeship`` command."""

import sys

from sdk.cli.main import main

sys.exit(main())
