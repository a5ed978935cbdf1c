"""The cross-process refresh lock for stores that live in a file."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import filelock

from mlauth.errors import LockTimeoutError, StoreError

__all__ = ["ProcessLock", "fork_bound"]

log = logging.getLogger("mlauth")

# filelock polls a non-blocking flock, 50 ms apart by default. A process waiting for a peer's
# refresh (a couple of ms on a fast endpoint) then waits a whole 50 ms step, often several:
# the scale benchmark measured 50-100 ms added to every call that met an expiry. Waits are
# rare and short, so polling more often costs next to nothing.
POLL_INTERVAL = 0.005


class _ForkBound(Protocol):
    def _after_fork_in_child(self) -> None: ...


# Every lock object of this process that must be rebuilt in a forked child. A lock kind is
# registered by adding its instances here and giving it an ``_after_fork_in_child()`` method.
fork_bound: weakref.WeakSet[_ForkBound] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # filelock >= 4 refuses a lock object inherited across fork (RuntimeError on acquire), so
    # a pool worker, a gunicorn/Celery prefork child or a ProcessPoolExecutor worker would
    # fail on its first refresh. The parent's object is replaced by a new one in the child.
    for lock in list(fork_bound):
        lock._after_fork_in_child()


# filelock registered its own hook when it was imported above, so it runs before ours.
os.register_at_fork(after_in_child=_after_fork_in_child)


class ProcessLock:
    """An ``flock`` on a sibling lock file, shared by every process on this machine.

    The lock file is never deleted and is never the ``.env`` itself: the ``.env`` is replaced
    by ``os.replace`` on every save, which swaps its inode, and unlinking a lock file lets two
    processes lock two different inodes under one name. ``flock`` is released by the kernel
    when the holder dies, even on ``kill -9``, so a crashed refresher never blocks its peers.
    It does not exclude across NFS clients: several machines need a networked store.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # The descriptor each thread holds the flock through (thread id -> fd, device, inode),
        # so that a child forked while one is held can close its copy; see _after_fork_in_child.
        self._held: dict[int, tuple[int, int, int]] = {}
        self._lock = self._new_lock()
        fork_bound.add(self)

    def _new_lock(self) -> filelock.FileLock:
        # preserve_lock_file keeps the path on release and turns off filelock's fallback to a
        # marker-file lock, which a killed holder would leave behind. thread_local stays True:
        # with False every thread of a process would hold the lock at once.
        return filelock.FileLock(
            self.path,
            mode=0o600,
            preserve_lock_file=True,
            fallback_to_soft=False,
            on_acquired=self._note_held,
        )

    def _note_held(self, fd: int) -> None:
        info = os.fstat(fd)
        self._held[threading.get_ident()] = (fd, info.st_dev, info.st_ino)

    def _after_fork_in_child(self) -> None:
        """Give the child a lock object of its own; called in every forked child.

        A thread of the parent may hold the flock at fork time. The lock belongs to the open
        file description, which the child shares through its copy of the descriptor: the
        child must close that copy, never unlock it (``LOCK_UN`` on the shared description
        would release the parent's lock), or the lock would outlive a parent killed later and
        the child would wait for itself. filelock 4.3 closes it too; this check keeps that
        true whatever filelock does, and the inode test keeps a reused number untouched.
        """
        held, self._held = self._held, {}
        for fd, device, inode in held.values():
            try:
                info = os.fstat(fd)
            except OSError:
                continue  # already closed (by filelock's own fork hook)
            if (info.st_dev, info.st_ino) == (device, inode):
                os.close(fd)
        self._lock = self._new_lock()

    def busy(self) -> bool:
        """Whether another process (or thread) holds the lock now; never waits.

        A missing lock file means nobody ever locked it: it is not created just to look.
        """
        if not os.path.exists(self.path):
            return False
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            return True
        except OSError as exc:
            raise StoreError(f"cannot open the refresh lock {self.path}: {exc}") from exc
        self._held.pop(threading.get_ident(), None)
        self._lock.release()
        return False

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        started = time.monotonic()
        log.debug("waiting for refresh lock %s (pid %d)", self.path, os.getpid())
        try:
            self._lock.acquire(timeout=timeout, poll_interval=POLL_INTERVAL)
        except filelock.Timeout:
            raise LockTimeoutError(
                f"could not take the refresh lock {self.path} within {timeout:g}s: another "
                "process is refreshing and has not finished. No refresh was attempted. If no "
                "mlauth process is running, check what holds it with `fuser -v "
                f"{self.path}`; raise lock_timeout if refreshes are genuinely slow.",
                lock_path=self.path,
            ) from None
        except OSError as exc:
            raise StoreError(
                f"cannot open the refresh lock {self.path}: {exc.strerror or exc}. The folder "
                "must be writable by this user, on a local disk that supports flock."
            ) from exc
        log.debug(
            "took refresh lock %s after %.3fs (pid %d)",
            self.path,
            time.monotonic() - started,
            os.getpid(),
        )
        try:
            yield
        finally:
            self._held.pop(threading.get_ident(), None)
            self._lock.release()
