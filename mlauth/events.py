"""What mlauth did, as typed events: one stream from the engine and the adapters.

A pipeline that runs for weeks is watched by people who do not read its logs. Each thing
worth counting or alerting on is an :class:`Event` (a frozen dataclass, never a secret in
it: stores are named by their redacted location, tokens not at all), and
:func:`subscribe` is the one call that receives them::

    import mlauth

    seen = []
    with mlauth.subscribe(seen.append):  # or keep the Subscription and .cancel() it
        ...

Delivery never delays or breaks a request: :func:`emit` only appends the event to a bounded
queue, and one daemon thread per process calls the subscribers in order. A subscriber that
raises is logged (once per subscriber) and keeps receiving; one that is slow holds up only
the subscribers after it. A full queue (:data:`QUEUE_LIMIT`: a subscriber stuck for good)
drops new events and counts them (:func:`dropped`). At exit the queue is drained for up to
:data:`EXIT_FLUSH` seconds, so a cron job that refreshed and exits still reports it;
:func:`flush` does the same on demand. A forked child starts with an empty queue: the
parent's pending events are the parent's to deliver.

Every event is also logged at INFO on the ``mlauth.events`` logger, its fields in the
record's ``mlauth_event`` attribute (``MLAUTH_LOG_FORMAT=json`` prints them as they are).
Nothing here runs per request: events come from refreshes, 401s and lock waits.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import ClassVar

from .terminal import printable

__all__ = [
    "KINDS",
    "Adopted",
    "Event",
    "LockWaited",
    "ReauthorizationRequired",
    "RefreshFailed",
    "Refreshed",
    "StoreBack",
    "StoreUnavailable",
    "Subscription",
    "UnauthorizedAbsorbed",
    "UnauthorizedReturned",
    "dropped",
    "emit",
    "flush",
    "store_answered",
    "store_failed",
    "subscribe",
]

log = logging.getLogger("mlauth.events")

#: Events waiting for the dispatcher beyond this many are dropped (and counted).
QUEUE_LIMIT = 10_000
#: The longest the interpreter's exit waits for pending events to be delivered.
EXIT_FLUSH = 2.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """Something mlauth did or met on one token chain.

    ``store``: where the chain is kept (the ``.env``'s path, the Redis URL without its
    password, the sellers' database); ``seller``: whose chain it is, in a store of many
    sellers (the user id; None for a one-seller store); ``at``: when (``time.time()``);
    ``pid``: which process.
    """

    kind: ClassVar[str] = "event"

    store: str
    # A user id is no secret (MercadoLibre's public item data carries it as seller_id).
    seller: str | None = None
    at: float = dataclasses.field(default_factory=time.time)
    pid: int = dataclasses.field(default_factory=os.getpid)

    def fields(self) -> dict[str, object]:
        """The event as a flat dict of JSON-safe values, ``kind`` first."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Refreshed(Event):
    """This process spent the refresh token and saved its successor."""

    kind: ClassVar[str] = "refreshed"
    duration_s: float  # from taking the turn to the save, the lock wait included
    reason: str  # expired, ahead of expiry, after a 401, forced...
    by: str  # pid N@host


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adopted(Event):
    """An auth took up a token it did not refresh: another process's, another auth's of this
    process, or a lock-free writer's."""

    kind: ClassVar[str] = "adopted"
    by: str | None  # who refreshed it, as the store says; None if it does not say


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnauthorizedAbsorbed(Event):
    """A request got a 401 and was sent again with a newer token: the caller saw no 401."""

    kind: ClassVar[str] = "unauthorized_absorbed"
    method: str
    host: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnauthorizedReturned(Event):
    """A request's 401 went back to the caller.

    ``reason``: ``genuine`` (the token was not expired: refreshed moments ago, so the 401 is
    about something else) or ``not_resendable`` (a newer token is there, but the body was a
    stream that cannot be sent again).
    """

    kind: ClassVar[str] = "unauthorized_returned"
    method: str
    host: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class LockWaited(Event):
    """This process waited for another holder of the refresh lock (at least 1 ms)."""

    kind: ClassVar[str] = "lock_waited"
    waited_ms: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefreshFailed(Event):
    """A refresh failed. ``retry_at``: when this process tries again at the earliest (a
    ``time.time()``), None if it will not (the token is dead)."""

    kind: ClassVar[str] = "refresh_failed"
    error: str  # the exception's class name
    reason: str  # its message, tokens fingerprinted
    retry_at: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReauthorizationRequired(Event):
    """The refresh token is dead (``invalid_grant``): the seller must authorize the app
    again (``mlauth login``). Once per process and dead chain."""

    kind: ClassVar[str] = "reauthorization_required"
    reason: str
    chain: str  # the dead refresh token's fingerprint (``sha256:1a2b3c4d``): which chain died


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreUnavailable(Event):
    """The token store could not be read or written (once, until it is back)."""

    kind: ClassVar[str] = "store_unavailable"
    error: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreBack(Event):
    """The token store answered again after :class:`StoreUnavailable`."""

    kind: ClassVar[str] = "store_back"
    down_s: float


#: Every event kind, for subscribers that filter and metrics that pre-declare.
KINDS: tuple[str, ...] = tuple(
    cls.kind
    for cls in (
        Refreshed,
        Adopted,
        UnauthorizedAbsorbed,
        UnauthorizedReturned,
        LockWaited,
        RefreshFailed,
        ReauthorizationRequired,
        StoreUnavailable,
        StoreBack,
    )
)

Subscriber = Callable[[Event], object]


class Subscription:
    """A subscriber's place in the stream: :meth:`cancel` (or leave the ``with`` block) to
    stop receiving."""

    def __init__(self, callback: Subscriber, kinds: frozenset[str] | None) -> None:
        self.callback = callback
        self.kinds = kinds
        self.failed = False  # logged once: a subscriber raising on every event would flood

    def cancel(self) -> None:
        _bus.remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __repr__(self) -> str:
        return f"Subscription({self.callback!r}, kinds={sorted(self.kinds or KINDS)})"


class _Bus:
    """The subscribers of this process and the queue one daemon thread delivers from."""

    def __init__(self) -> None:
        self.subscriptions: tuple[Subscription, ...] = ()  # swapped whole: read without a lock
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._pending: collections.deque[Event] = collections.deque()
        self._busy = False
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def add(self, subscription: Subscription) -> None:
        with self._cond:
            self.subscriptions = (*self.subscriptions, subscription)

    def remove(self, subscription: Subscription) -> None:
        with self._cond:
            self.subscriptions = tuple(s for s in self.subscriptions if s is not subscription)

    def put(self, event: Event) -> None:
        with self._cond:
            if len(self._pending) >= QUEUE_LIMIT:
                self.dropped += 1
                return
            self._pending.append(event)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mlauth-events", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        cond = self._cond  # a fork replaces it; this thread then no longer exists anyway
        while True:
            with cond:
                while not self._pending:
                    cond.wait()
                event = self._pending.popleft()
                self._busy = True
            try:
                for subscription in self.subscriptions:
                    _deliver(subscription, event)
            finally:
                with cond:
                    self._busy = False
                    cond.notify_all()

    def flush(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)


def _deliver(subscription: Subscription, event: Event) -> None:
    if subscription.kinds is not None and event.kind not in subscription.kinds:
        return
    try:
        subscription.callback(event)
    except Exception:  # a subscriber's bug must not stop the others
        if not subscription.failed:
            subscription.failed = True
            log.warning("event subscriber %r failed (logged once)", subscription, exc_info=True)


_bus = _Bus()
os.register_at_fork(after_in_child=_bus._reset)
atexit.register(lambda: _bus.flush(EXIT_FLUSH))


def subscribe(callback: Subscriber, kinds: Iterable[str] | None = None) -> Subscription:
    """Call ``callback(event)`` for every event of this process from now on (of ``kinds``
    only, if given: see :data:`KINDS`), from mlauth's event thread. Returns the
    :class:`Subscription`; a ``with`` block cancels it on the way out."""
    wanted = None if kinds is None else frozenset(kinds)
    unknown = sorted((wanted or frozenset()) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown event kinds {unknown}; the kinds are {list(KINDS)}")
    subscription = Subscription(callback, wanted)
    _bus.add(subscription)
    return subscription


def emit(event: Event) -> None:
    """Log ``event`` and queue it for the subscribers; never blocks, never raises.

    Called where a refresh or a 401 is under way: whatever fails here (a handler, a thread
    that cannot start at interpreter shutdown) costs the event, counted as dropped, never the
    refresh.
    """
    try:
        if log.isEnabledFor(logging.INFO):
            fields = event.fields()
            details = " ".join(
                f"{k}={v}"
                for k, v in fields.items()
                # A one-seller store's lines read as they always did; JSON has seller: null.
                if k not in ("kind", "at") and not (k == "seller" and v is None)
            )
            # Escaped: a reason quotes a server's text, and a handler may print it raw.
            log.info("event %s: %s", event.kind, printable(details), extra={"mlauth_event": fields})
        if _bus.subscriptions:
            _bus.put(event)
    except Exception:  # noqa: BLE001 (see above)
        _bus.dropped += 1


# Stores this process found unavailable (location -> since, monotonic): the engines and the
# stores that watch themselves (Redis) tell it once between them, until one sees it answer.
_down: dict[str, float] = {}
_down_lock = threading.Lock()


def store_failed(
    store: str, error: BaseException, reason: str, *, seller: str | None = None
) -> None:
    """:class:`StoreUnavailable` for ``store``, unless this process said so already;
    ``reason``: the error's message with its secrets masked; ``seller``: whose chain met it.

    Once per store *location*, not per seller: the sellers of one database go down together,
    and a process holding a thousand of them must say so once, not a thousand times."""
    with _down_lock:
        if store in _down:
            return
        _down[store] = time.monotonic()
    emit(StoreUnavailable(store=store, seller=seller, error=type(error).__name__, reason=reason))


def store_answered(store: str, *, seller: str | None = None) -> None:
    """:class:`StoreBack` for ``store`` if it was unavailable (``seller``: whose chain saw it
    answer); a dict lookup otherwise."""
    if store not in _down:
        return
    with _down_lock:
        since = _down.pop(store, None)
    if since is not None:
        emit(StoreBack(store=store, seller=seller, down_s=round(time.monotonic() - since, 3)))


def flush(timeout: float = EXIT_FLUSH) -> bool:
    """Wait up to ``timeout`` seconds until every queued event was delivered; whether it
    was. For a program about to leave through ``os._exit`` (exit handlers do it otherwise)."""
    return _bus.flush(timeout)


def dropped() -> int:
    """How many events this process dropped because its queue was full."""
    return _bus.dropped
