"""The change feed of a store of many sellers: one look per ``check_interval`` for all the
sellers a process holds, not one per seller.

A seller's store may answer "has a peer committed?" from memory between two looks at the
database (``check_interval``, a second by default). Were each seller's store to look on its
own, a process whose calls are spread over a thousand sellers would make almost every call
the first for its seller in the last second: a query per call. So every write of a seller's
version also records *when* it changed, on the store's clock (a ``changed_at`` column, a
sorted set scored by Redis's ``TIME``), and one :class:`ChangeFeed` per store and process
asks, once per ``check_interval``, which sellers changed since its last look: one query or
round trip, whatever the number of sellers.

The look starts :data:`OVERLAP` seconds before the previous one: a commit stamped just
before a look but visible only after it (a transaction that committed late, a clock a little
behind) is still seen by the next. Seeing a change twice costs nothing: its version is the
one the store holds.

A seller's store keeps what it last read or wrote with the number of the look current then
(:attr:`ChangeFeed.seq`, taken before the read). The feed's version of that seller wins only
when a later look saw it: so a store never takes an older version the feed saw for the one it
wrote itself, and a change seen by a look that overlapped the store's own read costs at most
one more read.

Only the sellers this process holds are kept (:attr:`ChangeFeed.changed`): memory follows
what is used, not the size of the store.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Container, Hashable

from mlauth import events
from mlauth.errors import StoreError

from .base import NOT_LOCAL

__all__ = ["CHANGED_ODDLY", "OVERLAP", "PROBE_BACKOFF", "ChangeFeed", "Read"]

log = logging.getLogger("mlauth")

#: Seconds each look reaches back before the previous one's time on the store's clock.
OVERLAP = 2.0
#: After a look found the store unreachable, API calls go on with the cached tokens this long
#: before the next look (a store that hangs would otherwise cost every look its timeout).
PROBE_BACKOFF = 30.0


class _Oddly:
    """A version no load ever returns: a seller whose row a look could not read (a hand
    edit) is read again through ``load()``, which names the row and the fix."""

    def __repr__(self) -> str:
        return "CHANGED_ODDLY"


CHANGED_ODDLY: Hashable = _Oddly()

#: What a seller's store read or wrote last: (version, the feed's :attr:`~ChangeFeed.seq`
#: taken before the read).
Read = tuple[Hashable, int]

#: What a look found: the store's time at the look (seconds), and (user id, version) of the
#: sellers that changed since the time given (version None: the seller is gone).
Found = tuple[float, list[tuple[str, Hashable]]]


class ChangeFeed(abc.ABC):
    """Which of a process's sellers changed, looked up once per ``check_interval`` for all.

    ``loaded`` holds the user ids this process has a store for (only theirs are kept).
    A subclass says how to read the store's clock (:meth:`clock`) and what changed since a
    time (:meth:`changes`), each in one query or round trip.
    """

    def __init__(self, location: str, check_interval: float, loaded: Container[str]) -> None:
        self.location = location
        self.check_interval = check_interval
        self._loaded = loaded
        #: monotonic time of the last look (set when it starts: others answer from memory)
        self.looked_at = -math.inf
        #: after a failed look: no other before this monotonic time
        self.quiet_until = -math.inf
        #: the number of looks begun; a store's read records it (:data:`Read`)
        self.seq = 0
        #: user id -> (version, the look that saw it), for loaded sellers only
        self.changed: dict[str, Read] = {}
        self._cursor: float | None = None  # the store's time of the last look
        self._lock = threading.Lock()  # one thread looks, the others answer from memory
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    # -- what a subclass implements ---------------------------------------------------------

    @abc.abstractmethod
    def clock(self) -> float:
        """The store's time now, in seconds (StoreError if it cannot be read)."""

    @abc.abstractmethod
    def changes(self, since: float | None, loaded: Container[str]) -> Found:
        """The store's time and the versions of the sellers (among ``loaded``, at least)
        whose version changed after ``since`` (all, if None); StoreError if the store
        cannot be read."""

    # -- for the sellers' stores --------------------------------------------------------------

    def start(self) -> None:
        """Take the store's time as the first look's starting point, if none was taken: a
        store made now reads its version after it, so no later change is missed. If the store
        cannot be reached, the first look reads every seller's version instead."""
        if self._cursor is not None:
            return
        try:
            self._cursor = self.clock()
        except StoreError as exc:
            log.debug("%s: the change feed starts without a time (%s)", self.location, exc)

    def local_stamp(self, seller: str, read: Read) -> Hashable:
        """The version of ``seller`` (whose store last read ``read``) if the last look is
        recent enough to answer from memory; else :data:`NOT_LOCAL`."""
        now = time.monotonic()
        if now - self.looked_at < self.check_interval or now < self.quiet_until:
            found = self.changed.get(seller)
            return found[0] if found is not None and found[1] > read[1] else read[0]
        return NOT_LOCAL

    def stamp(self, seller: str, read: Callable[[], Read]) -> Hashable:
        """The version of ``seller``: from memory within ``check_interval`` of the last look;
        past it, after one look for all sellers (a thread that finds another looking answers
        from memory). ``read`` gives what the seller's store read last, after the look."""
        if not self._recent(time.monotonic()):
            if self._pid != os.getpid():
                # Forked while another thread held it: that thread does not exist here. What
                # was seen stays true in the child; only the lock is the parent's.
                self._lock, self._pid = threading.Lock(), os.getpid()
            if self._lock.acquire(blocking=False):
                try:
                    if not self._recent(time.monotonic()):
                        self._look(seller)
                finally:
                    self._lock.release()
        last = read()
        found = self.changed.get(seller)
        return found[0] if found is not None and found[1] > last[1] else last[0]

    def answered(self) -> None:
        """A seller's store read the store: it is there, so a back-off after a failed look
        ends (the next call past ``check_interval`` looks again)."""
        if self.quiet_until != -math.inf:
            self.quiet_until = -math.inf

    def failed(self, exc: StoreError, seller: str | None) -> None:
        """A look (the feed's, or a seller's own) found the store unreachable: answer from
        memory for :data:`PROBE_BACKOFF`, and say so once."""
        self.quiet_until = time.monotonic() + PROBE_BACKOFF
        log.warning("%s; using the cached tokens, next look in %gs", exc, PROBE_BACKOFF)
        events.store_failed(self.location, exc, str(exc), seller=seller)

    def forget(self, seller: str) -> None:
        """``seller``'s store was let go of (removed by this process): keep nothing of it."""
        self.changed.pop(seller, None)

    # -- the look -----------------------------------------------------------------------------

    def _recent(self, now: float) -> bool:
        return now - self.looked_at < self.check_interval or now < self.quiet_until

    def _look(self, seller: str) -> None:
        self.looked_at = time.monotonic()
        self.seq += 1
        seq = self.seq
        since = None if self._cursor is None else self._cursor - OVERLAP
        try:
            at, found = self.changes(since, self._loaded)
        except StoreError as exc:
            self.failed(exc, seller)
            return
        events.store_answered(self.location, seller=seller)
        self._cursor = at
        loaded = self._loaded
        for user_id, version in found:
            if user_id in loaded:
                self.changed[user_id] = (version, seq)
