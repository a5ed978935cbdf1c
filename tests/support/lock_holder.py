"""A real process that holds a lock while a test looks from outside: a .env store's refresh
lock, or a plain ``flock`` on any file (the metrics' textfile lock)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def lock_held_by_another_process(env: Path) -> Iterator[None]:
    """A real process holds ``env``'s refresh lock for the duration of the block."""
    with _held(
        "import sys, mlauth\n"
        f"with mlauth.EnvFileStore({str(env)!r}).lock(5):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n"
    ):
        yield


@contextlib.contextmanager
def flock_held_by_another_process(path: Path) -> Iterator[None]:
    """A real process holds an exclusive ``flock`` on ``path`` (made if missing) meanwhile."""
    with _held(
        "import fcntl, os, sys\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
    ):
        yield


@contextlib.contextmanager
def _held(program: str) -> Iterator[None]:
    """``program`` runs until the block ends: it prints ``held`` once it holds its lock,
    then waits for a line on stdin."""
    holder = subprocess.Popen(
        [sys.executable, "-c", program],
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
