"""A real process that holds a .env store's refresh lock while a test looks from outside."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def lock_held_by_another_process(env: Path) -> Iterator[None]:
    """A real process holds ``env``'s refresh lock for the duration of the block."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, mlauth\n"
            f"with mlauth.EnvFileStore({str(env)!r}).lock(5):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("done\n", timeout=30)
    assert holder.returncode == 0
