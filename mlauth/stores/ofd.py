"""Open-file-description (OFD) locks on a file's own inode: the lock of a ``.env`` mounted alone.

A ``.env`` bind-mounted as a single file shares only its inode with the other containers, so
its locks are taken on it: OFD byte-range locks work across containers on one kernel, are
released by the kernel when the holder dies (even on ``kill -9``), and, unlike POSIX ``lockf``
locks, are not dropped when the same process closes another descriptor of the file
(python-dotenv opens and closes it).

Two ranges: the *content* (every byte below :data:`REFRESH_BYTE`), held shared by every read
and exclusively by every write in place (:mod:`.inplace`), so a reader never sees half a
write; and the refresh lock (:class:`InodeLock`), one byte far past the end of any ``.env``, so
a refresh in progress never blocks a read. Linux only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator

from mlauth.errors import LockTimeoutError, StoreError

from .lock import ReleaseWatch, describe_wait, fork_bound
from .unsaved import common_fix, common_reason

__all__ = [
    "REFRESH_BYTE",
    "InodeLock",
    "content_locked",
    "lock_range",
    "ofd_supported",
    "read_fenced",
]

log = logging.getLogger("mlauth")

_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)
# One byte far past the end of any .env: the refresh lock. Bytes below it are the content.
REFRESH_BYTE = 1 << 62
POLL_INTERVAL = 0.005  # as for the sibling lock file (mlauth.stores.lock)


def ofd_supported() -> bool:
    return _SETLK is not None and _SETLKW is not None


def _flock(kind: int, start: int, length: int) -> bytes:
    # struct flock on 64-bit Linux: short l_type, short l_whence, (pad) off_t l_start,
    # off_t l_len, pid_t l_pid (must be 0 for OFD locks), (pad): 32 bytes.
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)


def lock_range(fd: int, kind: int, start: int, length: int, *, wait: bool) -> bool:
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
def content_locked(path: str, kind: int) -> Iterator[int]:
    """A descriptor of ``path`` holding the content lock (shared to read, exclusive to write).

    Blocks without a timeout: a writer holds it for one pwrite and an fsync, and the kernel
    drops it if the holder dies.
    """
    fd = os.open(path, os.O_RDWR if kind == fcntl.F_WRLCK else os.O_RDONLY)
    try:
        with _holders.mutex:
            _holders.fds.add(fd)
        lock_range(fd, kind, 0, REFRESH_BYTE, wait=True)
        try:
            yield fd
        finally:
            lock_range(fd, fcntl.F_UNLCK, 0, REFRESH_BYTE, wait=True)
    finally:
        with _holders.mutex:
            _holders.fds.discard(fd)
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_fenced(path: str) -> tuple[bytes, os.stat_result]:
    """The file's bytes, read while no write in place is under way, and its ``fstat`` (taken
    before the read, under the same shared lock)."""
    if ofd_supported():
        try:
            with content_locked(path, fcntl.F_RDLCK) as fd:
                info = os.fstat(fd)
                return _read_all(fd), info
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # A filesystem without these locks (some FUSE and network ones) can hold no file
            # written in place either (its InodeLock fails first): a plain read is safe there.
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        return handle.read(), info


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
                f"cannot lock {self.path} for a refresh: {common_reason(exc)} "
                f"({exc.strerror or exc}). Refusing to spend the refresh token: "
                f"{common_fix(exc)}"
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
            return not lock_range(fd, fcntl.F_WRLCK, REFRESH_BYTE, 1, wait=False)
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
            while not lock_range(fd, fcntl.F_WRLCK, REFRESH_BYTE, 1, wait=False):
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
        return lock_range(fd, fcntl.F_RDLCK, REFRESH_BYTE, 1, wait=wait)

    def _drop_shared(self, fd: int) -> None:
        lock_range(fd, fcntl.F_UNLCK, REFRESH_BYTE, 1, wait=True)

    def _describe(self) -> str:
        return f"on the inode of {self.path}"
