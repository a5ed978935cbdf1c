"""What the kernel's table of locks (``/proc/locks``) says about a lock file: who holds it,
and who is blocked waiting for it. Observes processes, never synchronizes them."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

DEADLINE = 60.0  # for a poll or an answer; generous, the machine is shared and noisy


def locks_on(path: Path) -> list[tuple[bool, str, str]]:
    """``/proc/locks`` entries on ``path``'s inode: (blocked waiter?, FLOCK/OFDLCK, READ/WRITE)."""
    info = os.stat(path)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()[1:]  # drop "N:"
        blocked = fields[0] == "->"
        if blocked:
            fields = fields[1:]
        # kind, ADVISORY, READ/WRITE, pid, maj:min:inode, start, end
        if len(fields) >= 5 and fields[4] == device:
            found.append((blocked, fields[0], fields[2]))
    return found


def poll_until(what: str, check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds; fail after DEADLINE. Observes, never synchronizes."""
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def blocked_readers(path: Path) -> int:
    return sum(1 for blocked, _, mode in locks_on(path) if blocked and mode == "READ")
