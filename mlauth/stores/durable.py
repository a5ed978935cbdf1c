"""Making a write survive a crash: the helper the `.env` writer and the journal share."""

from __future__ import annotations

import os

__all__ = ["fsync_dir"]


def fsync_dir(folder: str) -> None:
    """Flush ``folder``'s entries, so a file just renamed or created in it survives power loss."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
