"""The parts a ``.env`` store is made of, chosen once per file: writer, lock and journal.

A file in a folder of its own is replaced on every save (:class:`.replace.ReplaceWriter`),
locked with ``flock`` on a sibling ``<file>.lock`` (:class:`.lock.ProcessLock`) and journaled
in a sibling ``<file>.journal`` (:class:`.journal.Journal`). A file bind-mounted alone (or
marked so, or with ``ML_ENV_WRITE=in-place``) shares only its inode with its peers: it is
written in place (:class:`.inplace.InPlaceWriter`), locked with OFD ranges on the inode
(:class:`.ofd.InodeLock`) and journaled in its extended attributes
(:class:`.xattr_journal.InodeJournal`). This is the one place that tells the two apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import NamedTuple

from mlauth.errors import ConfigError

from .inplace import InPlaceWriter, is_mount_point, mark_in_place, marked_in_place
from .journal import Journal
from .lock import ProcessLock
from .ofd import InodeLock, ofd_supported
from .replace import ReplaceWriter
from .watch import COUNTER_SUFFIX
from .writer import Writer
from .xattr_journal import InodeJournal

__all__ = ["WRITE_KEY", "Parts", "parts_for", "wants_in_place", "writer_for"]

# How the file is written: "auto" (in place when it is a mount point, else replaced) or
# "in-place" (for a host process sharing a file that containers mount alone).
WRITE_KEY = "ML_ENV_WRITE"


class Parts(NamedTuple):
    writer: Writer
    lock: ProcessLock | InodeLock
    #: The path the lock is taken on (the sibling lock file, or the file itself).
    lock_path: str
    journal: Journal
    #: The save counter beside the file (:mod:`.watch`), or None where the processes that
    #: share the file share no folder to keep one in (a file mounted alone).
    counter_path: str | None


def wants_in_place(real: str, values: Mapping[str, str | None]) -> bool:
    """Whether ``real`` (with these values) is written in place and locked on itself.

    Yes when it is a mount point (a file bind-mounted alone) or its ``ML_ENV_WRITE`` says
    ``in-place``; ConfigError for another value (raised with the file's secrets masked by the
    caller), or where the platform cannot do it.
    """
    written = (values.get(WRITE_KEY) or "auto").strip().lower()
    if written not in ("auto", "in-place"):
        raise ConfigError(
            f"{real}: {WRITE_KEY}={(values.get(WRITE_KEY) or '').strip()!r} is not a write mode; "
            "write in-place (a file that containers mount alone and host processes share) or "
            "delete the line"
        )
    # The mark: a process that found the file mounted alone wrote it in place, so this one
    # (a host process, say) must do the same or leave the containers on a dead inode.
    wanted = written == "in-place" or is_mount_point(real) or marked_in_place(real)
    if wanted and not ofd_supported():
        raise ConfigError(
            f"{real} is mounted as a single file (or {WRITE_KEY}=in-place), which needs Linux "
            "open-file-description locks; mount the folder instead"
        )
    return wanted


def writer_for(in_place: bool) -> Writer:
    return InPlaceWriter() if in_place else ReplaceWriter()


def parts_for(real: str, in_place: bool) -> Parts:
    """The parts of the store of ``real``; ``in_place`` from :func:`wants_in_place`."""
    writer = writer_for(in_place)
    if in_place:
        with contextlib.suppress(OSError):  # the save probe reports why, before spending
            mark_in_place(real)
        return Parts(writer, InodeLock(real), real, InodeJournal(real), None)
    journal = Journal(real)
    journal.tidy = lambda: writer.tidy(real)
    lock_path = real + ".lock"
    return Parts(writer, ProcessLock(lock_path), lock_path, journal, real + COUNTER_SUFFIX)
