"""The cross-process refresh lock for stores that live in a file."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import filelock

from .errors import LockTimeoutError, StoreError

__all__ = ["ProcessLock"]

log = logging.getLogger("mlauth")

# filelock polls a non-blocking flock, 50 ms apart by default. A process waiting for a peer's
# refresh (a couple of ms on a fast endpoint) then waits a whole 50 ms step, often several:
# the scale benchmark measured 50-100 ms added to every call that met an expiry. Waits are
# rare and short, so polling more often costs next to nothing.
POLL_INTERVAL = 0.005


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
        # preserve_lock_file keeps the path on release and turns off filelock's fallback to a
        # marker-file lock, which a killed holder would leave behind. thread_local stays True:
        # with False every thread of a process would hold the lock at once.
        self._lock = filelock.FileLock(
            path, mode=0o600, preserve_lock_file=True, fallback_to_soft=False
        )

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
            self._lock.release()
