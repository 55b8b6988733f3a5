"""``python -m apportion``: the same as the ``apportion`` command."""

import sys

from .cli import main

sys.exit(main())
