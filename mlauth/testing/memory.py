"""MemoryStore: a token store in memory that keeps the whole store contract, for tests.

Use it to test code built on mlauth without a ``.env``, Redis or a second process: it has a
stamp that moves on every write, a commit fenced on the version read, a real lock (threads
wait on it and time out), and a few hooks a test needs to play the parts of the world
around a refresh: a save that fails, a lock that lapses, a writer that takes no lock.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager

from mlauth.errors import ConfigError, LockLostError, LockTimeoutError, StaleCommitError, StoreError
from mlauth.stores.base import TokenStore, savable
from mlauth.tokens import TokenSet

__all__ = ["MemoryStore"]


class MemoryStore(TokenStore):
    """A :class:`~mlauth.stores.base.TokenStore` that keeps one token chain in memory.

    Every part of the contract is honoured: :meth:`stamp` (also :meth:`local_stamp`) is a
    generation number bumped by every write; :meth:`save` writes only over the version it is
    told it ``replaces`` and raises :class:`~mlauth.StaleCommitError` when somebody wrote
    since; :meth:`lock` is a lock threads really wait for, raising
    :class:`~mlauth.LockTimeoutError` after ``timeout``; :meth:`wait_unlocked` waits for it
    to be let go without taking it.

    Hooks for tests: :meth:`fail_saves` (the next saves raise :class:`~mlauth.StoreError`
    after :meth:`check_writable` said yes: a disk that filled up meanwhile),
    :attr:`read_only` (:meth:`check_writable` refuses too), :meth:`lapse_lock` (the holder's
    lock expires, as a Redis lock does; its next :meth:`check_writable` raises
    :class:`~mlauth.LockLostError`), :meth:`put` (write tokens as a process that takes
    no lock would: a legacy script, an editor) and :meth:`wait_for_waiters` (know that
    threads are queued for the lock). :attr:`saves` lists what :meth:`save`
    wrote, :attr:`loads` counts the reads.

    >>> from mlauth import Secret, TokenSet
    >>> from mlauth.testing import MemoryStore
    >>> store = MemoryStore(TokenSet(Secret("APP_USR-not-real"), Secret("TG-not-real-1")))
    >>> tokens, version = store.load()
    >>> with store.lock(timeout=1.0):
    ...     store.save(TokenSet(Secret("APP_USR-new"), Secret("TG-not-real-2")), replaces=version)
    2
    >>> store.put(TokenSet(None, Secret("TG-not-real-3")))  # a writer that takes no lock
    >>> store.save(TokenSet(None, Secret("TG-not-real-4")), replaces=version)
    Traceback (most recent call last):
    ...
    mlauth.errors.StaleCommitError: memory: ...
    """

    def __init__(self, tokens: TokenSet | None = None, *, location: str = "memory") -> None:
        self.location = location
        self._tokens = tokens
        self._generation = 0 if tokens is None else 1
        self._cond = threading.Condition()  # guards everything below; the lock is _holder
        self._holder: object | None = None
        self._mine = threading.local()  # this thread's hold, to tell a lapsed one
        self._failing = 0
        self._waiting = 0  # threads waiting in lock() or wait_unlocked()
        #: When true, :meth:`check_writable` and :meth:`save` raise StoreError.
        self.read_only = False
        #: Every TokenSet :meth:`save` wrote, oldest first (not those of :meth:`put`).
        self.saves: list[TokenSet] = []
        #: How many times :meth:`load` read the store.
        self.loads = 0

    def __repr__(self) -> str:
        return f"MemoryStore({self.location!r}, generation {self._generation})"

    # -- the contract ----------------------------------------------------------------------

    def stamp(self) -> Hashable:
        return self._generation

    def local_stamp(self) -> Hashable:
        return self._generation  # memory: never a wait

    def load(self) -> tuple[TokenSet, Hashable]:
        with self._cond:
            self.loads += 1
            if self._tokens is None:
                raise ConfigError(f"{self.location}: no tokens stored yet; run `mlauth login`")
            return self._tokens, self._generation

    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        tokens = savable(tokens, self.location)
        with self._cond:
            if self.read_only or self._failing:
                self._failing = max(self._failing - 1, 0)
                raise StoreError(f"{self.location}: this save was made to fail (MemoryStore)")
            if replaces is not None and replaces != self._generation:
                raise StaleCommitError(
                    f"{self.location}: a peer committed generation {self._generation} after "
                    f"this process read generation {replaces}; ours were not written"
                )
            self._write(tokens)
            self.saves.append(tokens)
            return self._generation

    def check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.location} is read-only (MemoryStore.read_only)")
        hold = getattr(self._mine, "hold", None)
        if hold is not None and hold is not self._holder:
            raise LockLostError(
                f"{self.location}: the refresh lock lapsed before the refresh token was spent",
                lock_path=self.location,
            )

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return self._hold(timeout)

    def _held_here(self) -> bool:
        mine = getattr(self._mine, "hold", None)
        return mine is not None and self._holder is mine

    @contextmanager
    def _hold(self, timeout: float) -> Iterator[None]:
        if self._held_here():
            yield  # re-entrant for its holder, as the .env store's lock is
            return
        me = object()
        with self._cond:
            if not self._wait_free(timeout):
                raise LockTimeoutError(
                    f"{self.location}: the refresh lock is held by another thread (waited "
                    f"{timeout:g}s)",
                    lock_path=self.location,
                )
            self._holder = me
        self._mine.hold = me
        try:
            yield
        finally:
            self._mine.hold = None
            with self._cond:
                if self._holder is me:  # not if it lapsed and another took it since
                    self._holder = None
                    self._cond.notify_all()

    def wait_unlocked(self, timeout: float) -> bool:
        if self._held_here():
            return True  # its holder would wait for itself
        with self._cond:
            return self._wait_free(timeout)

    def _wait_free(self, timeout: float) -> bool:
        """With ``_cond`` held: wait until nobody holds the lock (False after ``timeout``)."""
        if self._holder is None:
            return True
        self._waiting += 1
        self._cond.notify_all()  # wakes wait_for_waiters()
        try:
            return self._cond.wait_for(lambda: self._holder is None, max(timeout, 0.0))
        finally:
            self._waiting -= 1

    def refresh_in_progress(self) -> bool | None:
        return self._holder is not None

    # -- hooks for tests -------------------------------------------------------------------

    @property
    def tokens(self) -> TokenSet | None:
        """What the store holds now (None: nothing yet)."""
        return self._tokens

    def put(self, tokens: TokenSet) -> None:
        """Write ``tokens`` as a writer that takes no lock and no fence would."""
        with self._cond:
            self._write(tokens)

    def fail_saves(self, count: int = 1) -> None:
        """Make the next ``count`` saves raise StoreError (check_writable still passes)."""
        with self._cond:
            self._failing = count

    def wait_for_waiters(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` threads wait for the lock to be let go (in :meth:`lock` or
        :meth:`wait_unlocked`): a test's way to know they are queued, without sleeping."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting >= count, timeout)

    def lapse_lock(self) -> None:
        """Let the lock go as if it had expired under its holder (a Redis lock's timeout):
        another thread may take it, and the holder's commit is fenced."""
        with self._cond:
            self._holder = None
            self._cond.notify_all()

    def _write(self, tokens: TokenSet) -> None:
        self._tokens = tokens
        self._generation += 1
