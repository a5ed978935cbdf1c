"""``python -m mlauth``: the same as the ``mlauth`` command."""

from __future__ import annotations

import sys

from .cli.commands import main

sys.exit(main())
