"""A ``.env`` bind-mounted as a single file: written in place.

``docker run -v ./.env:/app/.env``, a compose ``volumes: - ./.env:/app/.env`` and a
Kubernetes ``subPath`` mount put one host file into a container. ``rename()`` onto a mount
point fails with ``EBUSY``, so the temp-file-plus-``os.replace`` save cannot work; and a host
process that *did* replace the file would leave every container reading the old inode for
ever. The file is written in place instead (:func:`write_in_place`), which keeps the inode
every mount pins; its lock is on that inode (:class:`~mlauth.stores.ofd.InodeLock`) and so is
its journal (:class:`~mlauth.stores.xattr_journal.InodeJournal`).

A write in place is one ``pwrite`` of the whole new content, padded with newlines to at
least the old length so that a process killed between the write and the final
``ftruncate`` leaves trailing blank lines, never a fragment of the old file. The kernel
copies a write of up to one page in one piece, so a ``kill -9`` leaves the old or the new
content, not a mix; a larger file could be cut between pages, so it is refused before any
refresh token is spent (:func:`check_size`). Readers are fenced from it by the content
lock (:func:`~mlauth.stores.ofd.read_fenced`).

A mark on the inode (:func:`mark_in_place`) makes every process that opens it later write it
in place too. Linux only (OFD locks, ``/proc/self/mountinfo``); elsewhere nothing is detected
as a mount and asking for the in-place mode is a configuration error.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Hashable

from mlauth.errors import StoreError

from .ofd import content_locked, read_fenced
from .unsaved import SAVE_FIX, common_fix, common_reason
from .writer import Writer

__all__ = [
    "MODE_ATTR",
    "InPlaceWriter",
    "check_size",
    "is_mount_point",
    "mark_in_place",
    "marked_in_place",
    "probe_in_place",
    "write_in_place",
]

PAGE_SIZE = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
SIZE_HEADROOM = 512
# The inode's mark that it is written in place (see mark_in_place).
MODE_ATTR = "user.mlauth.write"
IN_PLACE = b"in-place"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mount_point(path: str) -> bool:
    """Whether ``path`` (a file) is itself a mount point, as a file bind-mounted alone is.

    Read from ``/proc/self/mountinfo``, the only place that tells: a bind mount from the same
    filesystem has the same ``st_dev`` as its folder. False where there is no such file.
    """
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split(" ", 5)
                if len(fields) > 4 and _unescape(fields[4]) == real:
                    return True
    except OSError:
        return False
    return False


def check_size(size: int) -> None:
    """OSError(EFBIG) unless a file of ``size`` bytes can be written in place in one piece.

    The kernel copies a write into the page cache a page at a time and lets a fatal signal
    in between pages: a ``.env`` over one page, written in place, could be cut between its
    pages by a ``kill -9`` (and its token lines garbled). The headroom covers the keys a
    first refresh adds and tokens that grow.
    """
    if size + SIZE_HEADROOM > PAGE_SIZE:
        raise OSError(
            errno.EFBIG,
            f"it has {size} bytes, and a .env mounted alone is written in place, which is "
            f"atomic only up to {PAGE_SIZE - SIZE_HEADROOM} bytes (one page, less room for "
            "the token keys): move other settings to another file",
        )


def write_in_place(path: str, data: bytes) -> None:
    """Overwrite ``path`` with ``data`` in place, durably, never showing a reader half of it.

    The inode stays: every bind mount of the file sees the new content. One ``pwrite`` at
    offset 0 of at most one page: a ``kill -9`` leaves the old or the new bytes, not a mix.
    Raises OSError.
    """
    with content_locked(path, fcntl.F_WRLCK) as fd:
        old_size = os.fstat(fd).st_size
        padded = data + b"\n" * max(0, old_size - len(data))
        if len(padded) > PAGE_SIZE:
            check_size(len(padded))
        view, offset = memoryview(padded), 0
        while offset < len(padded):
            offset += os.pwrite(fd, view[offset:], offset)
        os.fsync(fd)
        if len(padded) != len(data):
            os.ftruncate(fd, len(data))
            os.fsync(fd)


def probe_in_place(path: str) -> None:
    """Raise OSError unless :func:`write_in_place` and the journal could do their work.

    Opening for writing is what an immutable file (``chattr +i``) or a read-only mount
    (``:ro``, a Kubernetes Secret) refuses; the size is checked against one page; and the
    mode mark (an extended attribute, see :func:`mark_in_place`) proves the filesystem keeps
    the attributes the journal lives in. Nothing a reader could see changes.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        check_size(os.fstat(fd).st_size)
    finally:
        os.close(fd)
    mark_in_place(path)


def marked_in_place(path: str) -> bool:
    """Whether some process wrote this file in place (its inode carries the mark)."""
    try:
        return os.getxattr(path, MODE_ATTR) == IN_PLACE
    except OSError:
        return False


def mark_in_place(path: str) -> None:
    """Mark the inode as written in place, so every process that opens it does the same.

    A host process that replaced the file (its usual way) would leave every container on the
    old inode, whose refresh token it just spent. The mark is what tells a host process that
    starts later; one already running finds it under the lock and stops before spending.
    """
    if not marked_in_place(path):
        os.setxattr(path, MODE_ATTR, IN_PLACE)


class InPlaceWriter(Writer):
    """Writes the file in place, under the exclusive content lock; reads under the shared one."""

    in_place = True

    def read(self, path: str) -> tuple[bytes, os.stat_result]:
        return read_fenced(path)

    def stamp_of(self, info: os.stat_result) -> Hashable:
        # A write in place keeps the inode; its mtime and ctime move.
        return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)

    def write(self, real: str, data: bytes, before: os.stat_result) -> None:
        try:
            write_in_place(real, data)
        except OSError as exc:
            raise StoreError(
                f"cannot write {real} in place: {exc.strerror or exc}. {SAVE_FIX}"
            ) from exc

    def probe(self, real: str, before: os.stat_result) -> None:
        probe_in_place(real)

    def reason(self, exc: OSError) -> str:
        if exc.errno == errno.EFBIG:
            return "it is too large to be written in place"
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return (
                "its filesystem keeps no user extended attributes, where a .env mounted alone "
                "keeps its refresh journal (ext4, xfs and btrfs do)"
            )
        return common_reason(exc)

    def fix(self, exc: OSError) -> str:
        if exc.errno in (errno.EFBIG, errno.ENOTSUP, errno.EOPNOTSUPP):
            return "mount the .env's folder instead of the file alone, or use the Redis store."
        return common_fix(exc)

    def check_peers(self, real: str) -> None:
        # Seen from inside a container: the host replaced the file (an editor, a process
        # without the in-place mode), and the mount still shows the old inode, now unlinked,
        # whose refresh token the host has spent.
        try:
            replaced = os.stat(real).st_nlink == 0
        except OSError:
            replaced = False  # a missing file gets its own error at the read
        if replaced:
            raise StoreError(
                f"{real} was replaced on the host (by an editor, or a process that does "
                "not write it in place), and this mount still shows the old file: "
                "refusing to refresh from it. Restart the container; on the host, edit "
                "the file in place and put ML_ENV_WRITE=in-place in it."
            )

    def status_rows(self) -> list[tuple[str, str]]:
        return [("written", "in place, for single-file mounts; lock and journal on its inode")]
