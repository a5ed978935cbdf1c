"""The refresh journal of a ``.env`` mounted alone, in extended attributes of its own inode.

A journal file beside the mount point would be in one container's folder, invisible to a
refresher in another container that must replay it; the inode is what they share (see
:mod:`.inplace`). The records are those of :class:`~mlauth.stores.journal.Journal`; only
where they are kept differs, and how much fits there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any

from mlauth.answers import raw_of, read_answer

from .journal import Journal

__all__ = ["JOURNAL_ATTR", "JOURNAL_BUDGET", "REAUTH_ATTR", "InodeJournal"]

log = logging.getLogger("mlauth")

JOURNAL_ATTR = "user.mlauth.journal"
REAUTH_ATTR = "user.mlauth.reauth"
# getxattr on a file that has no such attribute, or a filesystem that keeps none.
_ABSENT = (errno.ENODATA, errno.ENOTSUP, getattr(errno, "ENOATTR", errno.ENODATA))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# An attribute holds little: ext4 keeps all of an inode's attributes in one 4 KiB block (and
# the mode mark and the re-authorization marker share it). The journal keeps under this, and
# a raw answer over RAW_IN_ATTRIBUTE bytes keeps its essentials (mlauth.answers.essentials).
JOURNAL_BUDGET = 3072
RAW_IN_ATTRIBUTE = 1536


def _holds_token(record: dict[str, object]) -> bool:
    """Whether a raw answer holds a usable access or refresh token."""
    raw = raw_of(record)
    if raw is None:
        return False
    reading = read_answer(raw)
    return reading.access_token is not None or reading.refresh_token is not None


def _size(records: list[dict[str, object]]) -> int:
    return sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in records)


def _compact(
    records: list[dict[str, object]], budget: int | None = None
) -> list[dict[str, object]]:
    """Drop the records a later one makes moot, then the least useful until under ``budget``.

    A long outage appends an intent and an "unanswered" per attempt with the same token, and
    a broken endpoint a raw answer per attempt: of those only the last says anything. Never
    dropped: parsed answers, raw answers that hold a usable token, and the newest raw answer.
    """
    kept: list[dict[str, object]] = []
    marks: set[str] = set()  # tokens whose newest intent/abort is kept
    raws: set[str] = set()  # tokens whose newest raw answer is kept
    for record in reversed(records):
        spent, kind = str(record.get("spent")), record.get("kind")
        if kind == "raw":
            if spent in raws and not _holds_token(record):
                continue
            raws.add(spent)
        elif kind != "answer":
            if spent in marks:
                continue
            marks.add(spent)
        kept.append(record)
    kept.reverse()
    return kept if budget is None else _within(kept, budget)


def _within(records: list[dict[str, object]], budget: int) -> list[dict[str, object]]:
    """The oldest records that hold no token go first, until the rest fits ``budget``."""
    newest_raw = max((i for i, r in enumerate(records) if r.get("kind") == "raw"), default=-1)
    size = _size(records)
    dropped: set[int] = set()
    for index, record in enumerate(records[:-1]):  # the record being added stays
        if size <= budget:
            break
        protected = (
            index == newest_raw
            or record.get("kind") == "answer"
            or (record.get("kind") == "raw" and _holds_token(record))
        )
        if not protected:
            dropped.add(index)
            size -= _size([record])
    return [record for index, record in enumerate(records) if index not in dropped]


class InodeJournal(Journal):
    """The refresh journal of a mounted ``.env``, in extended attributes of its own inode.

    A journal file beside the mount point would be in one container's folder, invisible to a
    refresher in another container that must replay it; the inode is what they share. An
    attribute is replaced whole and atomically by the kernel, and the file's fsync makes it
    durable. The re-authorization marker lives there too.
    """

    def __init__(self, real_path: str) -> None:
        super().__init__(real_path)
        # The file whose attributes hold them, and the attributes' names.
        self.path = self.reauth_path = real_path
        self.attribute, self.reauth_attribute = JOURNAL_ATTR, REAUTH_ATTR
        self.where = f"{real_path} (extended attribute {JOURNAL_ATTR})"
        self.reauth_where = f"{real_path} (extended attribute {REAUTH_ATTR})"
        self.write_fix = (
            "a .env mounted as a single file keeps its journal in the file's extended "
            "attributes, so its filesystem must support user xattrs (ext4, xfs and btrfs do) "
            "and the mount must be writable; or mount the folder instead, or use the Redis "
            "store."
        )

    def __repr__(self) -> str:
        return f"InodeJournal({self.path!r})"

    def check_files(self) -> None:
        """Nothing to check: the attributes are the store's own inode's, never a planted file."""

    def _get(self, name: str) -> bytes | None:
        try:
            return os.getxattr(self.store_path, name)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise

    def _set(self, name: str, data: bytes) -> None:
        os.setxattr(self.store_path, name, data)
        _fsync_path(self.store_path)

    def _read_log(self) -> bytes:
        return self._get(JOURNAL_ATTR) or b""

    raw_limit = RAW_IN_ATTRIBUTE

    def _append(self, record: dict[str, Any]) -> None:
        records = _compact([*self.records(), record], JOURNAL_BUDGET)
        data = b"".join(
            (json.dumps(r, separators=(",", ":")) + "\n").encode("utf-8") for r in records
        )
        self._set(JOURNAL_ATTR, data)

    def commit(self) -> None:
        try:
            os.removexattr(self.store_path, JOURNAL_ATTR)
            _fsync_path(self.store_path)
        except OSError as exc:
            if exc.errno not in _ABSENT:
                # Harmless: recovery finds the store already holds the answer and empties it.
                log.warning("could not empty the refresh journal %s: %s", self.where, exc)

    def _write_marker(self, data: bytes) -> None:
        self._set(REAUTH_ATTR, data)

    def _read_marker(self) -> bytes | None:
        return self._get(REAUTH_ATTR)

    def _remove_marker(self) -> None:
        try:
            os.removexattr(self.store_path, REAUTH_ATTR)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return
            raise
        _fsync_path(self.store_path)
