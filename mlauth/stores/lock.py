"""The cross-process refresh lock for stores that live in a file."""

from __future__ import annotations

import contextlib
import fcntl
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

from .private import check_own_fd, denied, open_own, why_refused

__all__ = ["ProcessLock", "ReleaseWatch", "fork_bound"]

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


def describe_wait(timeout: float) -> str:
    """How long a lock was waited for, for its timeout message."""
    return f"within {timeout:g}s" if timeout > 0 else "at once"


class _Watch:
    """One blocking wait for a shared lock, run by a daemon thread for every caller in a process."""

    def __init__(self, fd: int, identity: tuple[int, int]) -> None:
        self.fd = fd
        self.identity = identity  # (device, inode), for the fork handler
        self.seen = False  # the shared lock was granted: the holder had let go
        self.error: OSError | None = None
        self.done = threading.Event()


class ReleaseWatch:
    """Waits until a lock's holder lets go, without taking the lock and without polling.

    A lock is released when no one holds it exclusively: a waiter asks the kernel for a
    *shared* lock on the same object and blocks (``flock(LOCK_SH)`` on the sibling lock file,
    an OFD read lock on the inode's refresh byte). The kernel wakes every such waiter of every
    process together the moment the holder's exclusive lock goes and grants them all at once;
    each drops it at once. Nobody polls, and nobody queues behind anybody else.

    A blocking lock call cannot time out, so it runs in a daemon thread that the caller waits
    for with a timeout (a :class:`threading.Event`). One such thread per lock object at a time
    serves every thread of the process; a caller that gives up leaves it blocked, and it drops
    the shared lock the instant it gets it, so nothing is ever left held. Lock kinds subclass
    this and say how to open a descriptor and take or drop the shared lock.
    """

    def __init__(self) -> None:
        self._watch: _Watch | None = None  # the watch a new caller joins, if still waiting
        self._watching: set[_Watch] = set()  # every watch whose thread has a descriptor open
        self._watch_mutex = threading.Lock()

    # -- what a lock kind provides ----------------------------------------------------------

    def _open_to_watch(self) -> int | None:
        """A new descriptor to take the shared lock through; None when no one can hold it."""
        raise NotImplementedError

    def _take_shared(self, fd: int, *, wait: bool) -> bool:
        """Take the shared lock (blocking if ``wait``); False if it is held exclusively."""
        raise NotImplementedError

    def _drop_shared(self, fd: int) -> None:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    # -- the wait -----------------------------------------------------------------------------

    def wait_released(self, timeout: float) -> bool:
        """Wait until nobody holds the lock exclusively, for at most ``timeout`` seconds.

        True once the lock was seen free (at once if it is free now), False on timeout. The
        lock is never taken exclusively and is never left held. True says only that the
        holder this caller found has let go: a peer may take the lock again at once, so a
        caller must still take the lock before it decides anything that needs it. A thread
        that holds the lock itself waits for itself (False after ``timeout``). Raises
        :class:`~mlauth.StoreError` if the lock cannot be opened or waited for.
        """
        fd = self._open_to_watch()
        if fd is None:
            return True
        try:
            free = self._take_shared(fd, wait=False)  # the common case: one syscall
            if free:
                self._drop_shared(fd)
            else:
                info = os.fstat(fd)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise self._error(exc) from exc
            raise
        if free:
            os.close(fd)
            return True
        log.debug(
            "waiting for refresh lock %s to be released (pid %d)", self._describe(), os.getpid()
        )
        started = time.monotonic()
        watch = self._join_or_start(fd, (info.st_dev, info.st_ino))
        # Event.wait refuses a timeout past TIMEOUT_MAX (OverflowError): wait without one.
        limit = None if timeout >= threading.TIMEOUT_MAX else max(timeout, 0.0)
        released = watch.done.wait(limit)
        waited = time.monotonic() - started
        if not released:
            log.debug(
                "gave up waiting for refresh lock %s to be released after %.3fs (pid %d)",
                self._describe(),
                waited,
                os.getpid(),
            )
            return False
        if watch.error is not None:
            raise self._error(watch.error)
        log.debug(
            "waited %.3fs for refresh lock %s to be released (pid %d)",
            waited,
            self._describe(),
            os.getpid(),
        )
        return True

    def _join_or_start(self, fd: int, identity: tuple[int, int]) -> _Watch:
        """The watch under way, or a new one on ``fd``; ``fd`` is closed or handed over."""
        with self._watch_mutex:
            watch = self._watch
            # A watch that has already seen the lock free does not answer a caller who found
            # it held since: ``seen`` is set while the shared lock is still held, so the
            # holder that refused this caller came after it.
            if watch is not None and not watch.seen:
                os.close(fd)
                return watch
            watch = self._watch = _Watch(fd, identity)
            self._watching.add(watch)
            try:
                threading.Thread(
                    target=self._run_watch, args=(watch,), name="mlauth-wait-released", daemon=True
                ).start()
            except BaseException:
                self._watch = None
                self._watching.discard(watch)
                os.close(fd)
                raise
            return watch

    def _run_watch(self, watch: _Watch) -> None:
        try:
            self._take_shared(watch.fd, wait=True)
        except OSError as exc:
            watch.error = exc
        else:
            try:
                with self._watch_mutex:
                    watch.seen = True
            finally:
                # Unlocked, never just closed: a child forked meanwhile shares this open file
                # description through its copy of the descriptor, which would keep it held.
                self._drop_shared(watch.fd)
        finally:
            with self._watch_mutex:
                if self._watch is watch:
                    self._watch = None
                self._watching.discard(watch)
            os.close(watch.fd)
            watch.done.set()

    def _error(self, exc: OSError) -> StoreError:
        return StoreError(
            f"cannot wait for the refresh lock {self._describe()}: {exc.strerror or exc}"
        )

    def _forget_watches_in_child(self) -> None:
        """In a forked child: the watch threads are the parent's; close our copies of their fds.

        Never unlocked here (the description and any lock on it are the parent's), and closed
        only if the number still names the same file.
        """
        watching, self._watching, self._watch = self._watching, set(), None
        self._watch_mutex = threading.Lock()  # a parent thread may have held the old one
        for watch in watching:
            with contextlib.suppress(OSError):
                info = os.fstat(watch.fd)
                if (info.st_dev, info.st_ino) == watch.identity:
                    os.close(watch.fd)


class ProcessLock(ReleaseWatch):
    """An ``flock`` on a sibling lock file, shared by every process on this machine.

    The lock file is never deleted and is never the ``.env`` itself: the ``.env`` is replaced
    by ``os.replace`` on every save, which swaps its inode, and unlinking a lock file lets two
    processes lock two different inodes under one name. ``flock`` is released by the kernel
    when the holder dies, even on ``kill -9``, so a crashed refresher never blocks its peers.
    It does not exclude across NFS clients: several machines need a networked store.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
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

    def wait_released(self, timeout: float) -> bool:
        # The thread that holds the lock (code that took store.lock() and calls the API
        # inside) would wait for itself: nobody else holds it.
        if threading.get_ident() in self._held:
            return True
        return super().wait_released(timeout)

    def _note_held(self, fd: int) -> None:
        # Checked on the descriptor filelock locked (opened with O_NOFOLLOW): a lock file
        # planted by another user could be swapped for a second inode while held, and two
        # processes would refresh at once. Raising here makes filelock let go of it.
        info = check_own_fd(fd, self.path, "refresh lock")
        self._held[threading.get_ident()] = (fd, info.st_dev, info.st_ino)

    def _after_fork_in_child(self) -> None:
        """Give the child a lock object of its own; called in every forked child.

        A thread of the parent may hold the flock at fork time. The lock belongs to the open
        file description, which the child shares through its copy of the descriptor: the
        child must close that copy, never unlock it (``LOCK_UN`` on the shared description
        would release the parent's lock), or the lock would outlive a parent killed later and
        the child would wait for itself. filelock (4.0 on) closes it too; this check keeps that
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
        self._forget_watches_in_child()

    def _open_to_watch(self) -> int | None:
        try:
            # Read-only is enough for flock; no O_CREAT: a missing file was never locked.
            return open_own(self.path, os.O_RDONLY, "refresh lock")
        except FileNotFoundError:
            return None
        except StoreError:
            raise
        except OSError as exc:
            raise self._error(exc) from exc

    def _take_shared(self, fd: int, *, wait: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if wait else fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _drop_shared(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def _describe(self) -> str:
        return self.path

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
        except StoreError:
            raise  # refused by _note_held: it names the file and the fix
        except OSError as exc:
            raise (
                why_refused(self.path, "refresh lock")
                or denied(self.path, "refresh lock", exc)
                or StoreError(f"cannot open the refresh lock {self.path}: {exc}")
            ) from exc
        self._lock.release()
        if not self._lock.is_locked:  # not if this very thread holds it (a nested look)
            self._held.pop(threading.get_ident(), None)
        return False

    def _make(self) -> None:
        """Make the missing lock file here rather than in filelock: made by mlauth's own
        exclusive open, it is given to the ``.env``'s owner when root makes it
        (:func:`~mlauth.stores.private.check_own_fd`). Any failure is left to filelock's
        own open, which reports it."""
        with contextlib.suppress(StoreError, OSError):
            os.close(open_own(self.path, os.O_RDONLY, "refresh lock", create=True))

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        started = time.monotonic()
        log.debug("waiting for refresh lock %s (pid %d)", self.path, os.getpid())
        if not os.path.lexists(self.path):
            self._make()
        try:
            self._lock.acquire(timeout=timeout, poll_interval=POLL_INTERVAL)
        except filelock.Timeout:
            raise LockTimeoutError(
                f"could not take the refresh lock {self.path} {describe_wait(timeout)}: another "
                "process is refreshing and has not finished. No refresh was attempted. If no "
                "mlauth process is running, check what holds it with `fuser -v "
                f"{self.path}`; raise lock_timeout if refreshes are genuinely slow.",
                lock_path=self.path,
            ) from None
        except StoreError:
            raise  # refused by _note_held: it names the file and the fix
        except OSError as exc:
            # A link planted under its name, or a lock file a run as root left
            refused = why_refused(self.path, "refresh lock") or denied(
                self.path, "refresh lock", exc
            )
            if refused is not None:
                raise refused from exc
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
            # Only when this thread's outermost hold let go: a nested hold released inside
            # another must leave the record, or the holder would wait for itself.
            if not self._lock.is_locked:
                self._held.pop(threading.get_ident(), None)
