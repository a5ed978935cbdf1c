"""A ``.env`` bind-mounted as a single file: locked on its own inode and written in place.

``docker run -v ./.env:/app/.env``, a compose ``volumes: - ./.env:/app/.env`` and a
Kubernetes ``subPath`` mount put one host file into a container. Three things the folder
layout relies on do not hold there:

- ``rename()`` onto a mount point fails with ``EBUSY``, so the temp-file-plus-``os.replace``
  save cannot work; and a host process that *did* replace the file would leave every
  container reading the old inode for ever. The file is written in place instead
  (:func:`write_in_place`), which keeps the inode every mount pins.
- A sibling ``.env.lock`` is in each container's own folder, so it excludes nobody in the
  other containers. The only thing they share is the mounted file's inode, so the locks are
  taken on it (:class:`InodeLock`): open-file-description (OFD) byte-range locks, which
  work across containers on one kernel, are released by the kernel when the holder dies
  (even on ``kill -9``), and, unlike POSIX ``lockf`` locks, are not dropped when the same
  process closes another descriptor of the file (python-dotenv opens and closes it).
- Readers no longer see an atomic swap, so a write in place is fenced from them: the
  *content* range of the lock is held shared by every read and exclusively by every write.
  The refresh lock is a single byte far past the end of any ``.env``, so a refresh in
  progress never blocks a read.

A write in place is one ``pwrite`` of the whole new content, padded with newlines to at
least the old length so that a process killed between the write and the final
``ftruncate`` leaves trailing blank lines, never a fragment of the old file. The kernel
copies a write of up to one page in one piece, so a ``kill -9`` leaves the old or the new
content, not a mix; a larger file could be cut between pages, so it is refused before any
refresh token is spent (:func:`check_size`).

The journal and the re-authorization marker live in extended attributes of the inode
(:class:`InodeJournal`), and so does a mark that the file is written in place
(:func:`mark_in_place`), which makes every process that opens it later do the same.

Linux only (OFD locks, ``/proc/self/mountinfo``); elsewhere nothing is detected as a mount and
asking for the in-place mode is a configuration error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

from mlauth.answers import raw_of, read_answer
from mlauth.errors import LockTimeoutError, StoreError

from .journal import Journal
from .lock import ReleaseWatch, describe_wait, fork_bound

__all__ = [
    "MODE_ATTR",
    "REFRESH_BYTE",
    "SAVE_FIX",
    "InodeJournal",
    "InodeLock",
    "check_size",
    "fix_for",
    "is_mount_point",
    "mark_in_place",
    "marked_in_place",
    "ofd_supported",
    "probe_in_place",
    "read_locked",
    "why_unsaved",
    "write_in_place",
]

log = logging.getLogger("mlauth")

_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)
# One byte far past the end of any .env: the refresh lock. Bytes below it are the content.
REFRESH_BYTE = 1 << 62
POLL_INTERVAL = 0.005  # as for the sibling lock file (mlauth.stores.lock)
PAGE_SIZE = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
SIZE_HEADROOM = 512
# The inode's mark that it is written in place (see mark_in_place).
MODE_ATTR = "user.mlauth.write"
IN_PLACE = b"in-place"

# The fix for a .env that cannot take a save, in every error that says so.
SAVE_FIX = (
    "Give this user a writable .env: a read-write mount of its folder or of the file (not "
    ":ro, not a Kubernetes Secret volume), no `chattr +i`; or keep the tokens in Redis "
    "(`mlauth migrate --to redis://...`)."
)


def why_unsaved(exc: OSError, *, in_place: bool) -> str:
    """Why a save (or its probe) failed, for a message that goes on to name the fix."""
    return f"{_reason(exc, in_place)} ({exc.strerror or exc})"


def _reason(exc: OSError, in_place: bool) -> str:
    code = exc.errno
    if code == errno.EBUSY and not in_place:
        return (
            "it is a mount point (a file bind-mounted alone?) that cannot be replaced; set "
            "ML_ENV_WRITE=in-place in it, or mount its folder"
        )
    if code == errno.EROFS:
        return "it is on a read-only filesystem or mount"
    if code == errno.EPERM:
        return "the file or its folder refuses changes (immutable or append-only, `chattr`)"
    if code in (errno.EACCES,):
        return "this user may not write the file or its folder"
    if code == errno.ENOSPC:
        return "the disk is full"
    if code == errno.EFBIG:
        return "it is too large to be written in place"
    if code in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return (
            "its filesystem keeps no user extended attributes, where a .env mounted alone "
            "keeps its refresh journal (ext4, xfs and btrfs do)"
        )
    return "the save failed"


def fix_for(exc: OSError) -> str:
    """The fix to name after :func:`why_unsaved`."""
    if exc.errno == errno.ENOSPC:
        return "free disk space, then try again."
    if exc.errno in (errno.EFBIG, errno.ENOTSUP, errno.EOPNOTSUPP):
        return "mount the .env's folder instead of the file alone, or use the Redis store."
    return SAVE_FIX


def ofd_supported() -> bool:
    return _SETLK is not None and _SETLKW is not None


def _flock(kind: int, start: int, length: int) -> bytes:
    # struct flock on 64-bit Linux: short l_type, short l_whence, (pad) off_t l_start,
    # off_t l_len, pid_t l_pid (must be 0 for OFD locks), (pad): 32 bytes.
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)


def _lock(fd: int, kind: int, start: int, length: int, *, wait: bool) -> bool:
    """Take (or with F_UNLCK drop) an OFD lock; False if ``wait`` is off and it is held."""
    command = _SETLKW if wait else _SETLK
    assert command is not None
    try:
        fcntl.fcntl(fd, command, _flock(kind, start, length))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES) and not wait:
            return False
        raise
    return True


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


class _ContentHolders:
    """Descriptors holding a content lock now, so a forked child can drop its copies.

    A child forked while a thread of the parent writes in place inherits the descriptor, and
    with it the lock (it belongs to the open file description): had the parent then died,
    the child would keep every reader in every container waiting until it exited.
    """

    def __init__(self) -> None:
        self.fds: set[int] = set()
        self.mutex = threading.Lock()
        fork_bound.add(self)

    def _after_fork_in_child(self) -> None:
        self.mutex = threading.Lock()  # first: a parent thread may have held the old one
        fds, self.fds = self.fds, set()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # never unlock: the lock is the parent's


_holders = _ContentHolders()


@contextlib.contextmanager
def _content(path: str, kind: int) -> Iterator[int]:
    """A descriptor of ``path`` holding the content lock (shared to read, exclusive to write).

    Blocks without a timeout: a writer holds it for one pwrite and an fsync, and the kernel
    drops it if the holder dies.
    """
    fd = os.open(path, os.O_RDWR if kind == fcntl.F_WRLCK else os.O_RDONLY)
    try:
        with _holders.mutex:
            _holders.fds.add(fd)
        _lock(fd, kind, 0, REFRESH_BYTE, wait=True)
        try:
            yield fd
        finally:
            _lock(fd, fcntl.F_UNLCK, 0, REFRESH_BYTE, wait=True)
    finally:
        with _holders.mutex:
            _holders.fds.discard(fd)
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_locked(path: str) -> bytes:
    """The file's bytes, read while no write in place is under way."""
    if ofd_supported():
        try:
            with _content(path, fcntl.F_RDLCK) as fd:
                return _read_all(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # A filesystem without these locks (some FUSE and network ones) can hold no file
            # written in place either (its InodeLock fails first): a plain read is safe there.
    with open(path, "rb") as handle:
        return handle.read()


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
    with _content(path, fcntl.F_WRLCK) as fd:
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


class InodeLock(ReleaseWatch):
    """The refresh lock of a mounted ``.env``: one byte of its own inode, locked OFD-style.

    Every process that reaches the inode takes the same lock, through any mount, in any
    container on this kernel. Each ``hold`` opens its own descriptor, so two threads of one
    process exclude each other too. :meth:`wait_released` waits for a holder with a blocking
    OFD *read* lock on the same byte (see :class:`~mlauth.stores.lock.ReleaseWatch`).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = os.path.realpath(path)
        # The descriptors holding the lock now, for the fork handler: a child must not keep them.
        self._fds: set[int] = set()
        self._fds_lock = threading.Lock()
        fork_bound.add(self)

    def _open(self) -> int:
        # A write lock needs a descriptor open for writing.
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            # A .env mounted alone is locked on itself: what refuses the lock refuses the save.
            raise StoreError(
                f"cannot lock {self.path} for a refresh: {why_unsaved(exc, in_place=True)}. "
                f"Refusing to spend the refresh token: {fix_for(exc)}"
            ) from exc
        with self._fds_lock:
            self._fds.add(fd)
        return fd

    def _close(self, fd: int) -> None:
        with self._fds_lock:
            self._fds.discard(fd)
        os.close(fd)  # releases the lock: it belongs to this open file description

    def busy(self) -> bool:
        """Whether another process (or thread) holds the refresh lock now; never waits."""
        fd = self._open()
        try:
            return not _lock(fd, fcntl.F_WRLCK, REFRESH_BYTE, 1, wait=False)
        finally:
            self._close(fd)

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        fd = self._open()
        try:
            log.debug(
                "waiting for refresh lock on the inode of %s (pid %d)", self.path, os.getpid()
            )
            deadline = time.monotonic() + timeout
            while not _lock(fd, fcntl.F_WRLCK, REFRESH_BYTE, 1, wait=False):
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"could not take the refresh lock on {self.path} {describe_wait(timeout)}: "
                        "another process (perhaps in another container) is refreshing and has "
                        "not finished. No refresh was attempted; raise lock_timeout if "
                        "refreshes are genuinely slow.",
                        lock_path=self.path,
                    )
                time.sleep(POLL_INTERVAL)
            log.debug("took the refresh lock on the inode of %s (pid %d)", self.path, os.getpid())
            yield
        finally:
            self._close(fd)

    def _after_fork_in_child(self) -> None:
        # The descriptors belong to threads of the parent that do not exist here. Closing our
        # copies (never unlocking: the lock is the parent's, on a shared description) makes
        # sure a parent killed while holding it does not leave the lock held by this child.
        # A new mutex first: a parent thread may have held the old one at the fork.
        self._fds_lock = threading.Lock()
        fds, self._fds = self._fds, set()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._forget_watches_in_child()

    def _open_to_watch(self) -> int | None:
        # A read lock needs only a descriptor open for reading. The file is the store itself:
        # a missing one gets its own error at the read.
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc) from exc

    def _take_shared(self, fd: int, *, wait: bool) -> bool:
        return _lock(fd, fcntl.F_RDLCK, REFRESH_BYTE, 1, wait=wait)

    def _drop_shared(self, fd: int) -> None:
        _lock(fd, fcntl.F_UNLCK, REFRESH_BYTE, 1, wait=True)

    def _describe(self) -> str:
        return f"on the inode of {self.path}"


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
        self.path = f"{real_path} (extended attribute {JOURNAL_ATTR})"
        self.reauth_path = f"{real_path} (extended attribute {REAUTH_ATTR})"
        self.write_fix = (
            "a .env mounted as a single file keeps its journal in the file's extended "
            "attributes, so its filesystem must support user xattrs (ext4, xfs and btrfs do) "
            "and the mount must be writable; or mount the folder instead, or use the Redis "
            "store."
        )

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
                log.warning("could not empty the refresh journal %s: %s", self.path, exc)

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
