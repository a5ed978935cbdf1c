"""The Redis store of many sellers: one hash per seller, and a set that lists them.

Seller ``123``'s chain is the hash ``mlauth:<client_id>:seller:123`` (or ``<prefix>:seller:123``),
kept by a :class:`~mlauth.stores.redis.RedisStore` of its own: its own lock (``...:lock``),
the raw answer kept beside the tokens, fenced commits, recovery of a dead holder's answer, as
for one seller; one seller's refresh never waits for another's. The set
``mlauth:<client_id>:sellers`` lists the user ids. The scripts that write a seller's hash list
the seller in the same step, and refuse once ``remove()`` left its mark
(``...:seller:123:removed``), so the set and the hashes never disagree and a process still
holding a removed seller's chain in memory cannot put it back.

Every seller's store shares one pair of connection pools: an app of 10,000 sellers opens as
many connections as one of a single seller, and a process holds a store only for the sellers
it touched (:meth:`RedisSellers.store` makes it on first use). ``rows()`` reads every seller
in pipelines of :data:`ROWS_BATCH` hashes: one round trip per batch, never one per seller.

Needs the ``redis`` package: ``pip install 'mlauth[redis]'``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from typing import cast

try:
    import redis
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover (as in mlauth.stores.redis)
    raise ImportError(
        "mlauth's Redis store needs the redis package: pip install 'mlauth[redis]'"
    ) from None

from mlauth.errors import ConfigError, StaleCommitError, StoreError
from mlauth.secret import Secret, mask, redact_url
from mlauth.tokens import TokenSet, this_process

from .redis import (
    DEAD_FIELD,
    FAILING_SINCE_FIELD,
    FAILURE_FIELD,
    LuaScript,
    RedisStore,
    check_url,
    connect,
    dead_note,
    failing_note,
    not_text,
    tokens_of_hash,
    unreachable,
)
from .redis_feed import RedisFeed
from .sellers_base import FAILING, OK, REAUTHORIZE, SellerRow, SellerStores, check_user_id

__all__ = ["ROWS_BATCH", "RedisSellers", "redis_sellers_held"]

#: How many hashes one pipeline of :meth:`RedisSellers.rows` reads.
ROWS_BATCH = 1000
#: Sellers a ConfigError for an unknown one names.
NAMED = 10

# Forget a seller, under its lock: the hash, its place in the set, and a mark that stops the
# token scripts (mlauth.stores.redis, _SELLER_REMOVED) from writing the hash again; and tell
# the other processes' change feeds (KEYS[4], as the token scripts do). Returns 1 if the
# seller was held (listed or with a hash).
_REMOVE = LuaScript(
    """
local held = redis.call('DEL', KEYS[1]) + redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[4], ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (ms - 3600000))
if held > 0 then return 1 end
return 0
"""
)

# What rows() reads of each hash: never a token into a row (the tokens only mask
# refreshed_by, as the one-seller store's status does).
_ROW_FIELDS = (
    "chain",
    "access_token",
    "refresh_token",
    "expires_at",
    "refreshed_at",
    "refreshed_by",
    DEAD_FIELD,
    FAILING_SINCE_FIELD,
    FAILURE_FIELD,
)


def _numeric(user_ids: Sequence[str]) -> list[str]:
    return sorted(user_ids, key=lambda user_id: (len(user_id), user_id))


class RedisSellers(SellerStores):
    """The chains of many sellers in one Redis, a hash each.

    ``url`` is a redis-py URL; the keys start with ``prefix`` (by default ``mlauth:<client
    id>``, the client id from ``client_id`` or :meth:`bind_client`). ``lock_timeout``,
    ``check_interval`` and ``socket_timeout`` are each seller's store's (see
    :class:`~mlauth.stores.redis.RedisStore`). ``client``: a redis-py client to use instead of
    making one (``decode_responses=True``).
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        prefix: str | None = None,
        lock_timeout: float = 30.0,
        check_interval: float = 1.0,
        socket_timeout: float = 5.0,
        client: redis.Redis | None = None,
    ) -> None:
        self.url = check_url(url)
        self.location = redact_url(url)
        if lock_timeout <= 0 or check_interval < 0:
            raise ConfigError("RedisSellers: lock_timeout must be > 0 and check_interval >= 0")
        self.lock_timeout = float(lock_timeout)
        self.check_interval = float(check_interval)
        if client is None:
            self._client, self._probe = connect(url, socket_timeout)
        else:
            self._client = self._probe = client
        self.prefix = prefix or ""
        if not prefix and client_id is not None:
            self.bind_client(client_id)
        self._stores: dict[str, RedisStore] = {}
        self._mutex = threading.Lock()  # threads making a seller's store make one
        self._pid = os.getpid()
        self._feed: RedisFeed | None = None

    def bind_client(self, client_id: str) -> None:
        """Derive the keys' prefix from the app's client id, unless one was given."""
        if not self.prefix:
            self.prefix = f"mlauth:{client_id}"

    # -- keys ------------------------------------------------------------------------------

    def _prefix(self) -> str:
        if not self.prefix:
            raise ConfigError(
                "RedisSellers has no key prefix: pass client_id= or prefix=, or bind_client()"
            )
        return self.prefix

    @property
    def index(self) -> str:
        """The set that lists the sellers' user ids."""
        return f"{self._prefix()}:sellers"

    def key(self, user_id: str) -> str:
        """The hash of seller ``user_id``'s chain."""
        return f"{self._prefix()}:seller:{user_id}"

    @property
    def changes(self) -> str:
        """The sorted set of the sellers written in the last hour, by Redis's time."""
        return f"{self._prefix()}:changes"

    @property
    def feed(self) -> RedisFeed:
        """What this process's sellers ask whether a peer committed (:mod:`.redis_feed`)."""
        feed = self._feed
        if feed is None:
            with self._mutex:
                if self._feed is None:
                    self._feed = RedisFeed(
                        self._probe,
                        self.url,
                        self.location,
                        self.check_interval,
                        self._stores,  # only the sellers this process holds are kept
                        changes=self.changes,
                        key=self.key,
                    )
                feed = self._feed
        return feed

    def _unreachable(self, exc: Exception, doing: str) -> StoreError:
        return unreachable(exc, doing, self.url)

    # -- the contract ----------------------------------------------------------------------

    def sellers(self) -> list[str]:
        try:
            members = cast("set[str]", self._client.smembers(self.index))
        except RedisError as exc:
            raise self._unreachable(exc, "list the sellers in") from None
        return _numeric(list(members))

    def store(self, user_id: str) -> RedisStore:
        """Seller ``user_id``'s store: made on first use (one look at the set), then the
        same object; ConfigError naming up to :data:`NAMED` sellers held if it is not one."""
        found = self._stores.get(user_id)  # one dict lookup per call after the first
        if found is not None:
            return found
        user_id = check_user_id(user_id, f"Redis at {self.location}")
        try:
            listed = self._client.sismember(self.index, user_id)
        except RedisError as exc:
            raise self._unreachable(exc, "look up the seller in") from None
        if not listed:
            raise ConfigError(self._unknown(user_id))
        return self._store_of(user_id)

    def _store_of(self, user_id: str) -> RedisStore:
        if self._pid != os.getpid():
            # Forked while another thread held it: that thread does not exist in the child.
            self._mutex, self._pid = threading.Lock(), os.getpid()
        found = self._stores.get(user_id)
        if found is not None:
            return found
        feed = self.feed
        feed.start()  # before the store reads its hash: no later change is missed
        with self._mutex:
            found = self._stores.get(user_id)
            if found is None:
                found = self._stores[user_id] = RedisStore(
                    self.url,
                    key=self.key(user_id),
                    seller=user_id,
                    index=self.index,
                    lock_timeout=self.lock_timeout,
                    check_interval=self.check_interval,
                    client=self._client,
                    probe=self._probe,
                    feed=feed,
                    changes=self.changes,
                )
            return found

    def _unknown(self, user_id: str) -> str:
        held = self.sellers()
        if not held:
            return (
                f"Redis at {self.location} holds no seller under {self.index!r}: add seller "
                f"{user_id} with `mlauth sellers add` or `mlauth login`"
            )
        named = ", ".join(held[:NAMED]) + (
            f" and {len(held) - NAMED} more" if len(held) > NAMED else ""
        )
        return (
            f"Redis at {self.location} holds no seller {user_id}; it holds {named}. Add it "
            "with `mlauth sellers add` or `mlauth login`"
        )

    def add(self, user_id: str, tokens: TokenSet, *, replace: bool = False) -> RedisStore:
        user_id = check_user_id(user_id, f"Redis at {self.location}")
        store = self._store_of(user_id)
        with store.lock(self.lock_timeout):  # a refresher of this seller finishes first
            try:
                store.seed(tokens, replace=replace)  # refuses another seller's tokens
            except StaleCommitError:
                raise ConfigError(
                    f"Redis at {self.location} holds seller {user_id} already; replace its "
                    "chain with replace=True (`mlauth login` does), or remove it first "
                    "(`mlauth sellers remove`)"
                ) from None
        return store

    def remove(self, user_id: str, *, held: bool = False) -> bool:
        user_id = check_user_id(user_id, f"Redis at {self.location}")
        store = self._store_of(user_id)
        key = self.key(user_id)
        # Never under a refresher's feet: under the lock, taken here or by the caller.
        with contextlib.nullcontext() if held else store.lock(self.lock_timeout):
            try:
                held = _REMOVE(
                    self._client,
                    keys=[key, self.index, f"{key}:removed", self.changes],
                    args=[user_id, f"{time.time()!r} {this_process()}"],
                )
            except RedisError as exc:
                raise self._unreachable(exc, "remove the seller from") from None
        with self._mutex:
            self._stores.pop(user_id, None)
        self.feed.forget(user_id)
        return bool(held)

    def rows(self, user_ids: Sequence[str] | None = None) -> list[SellerRow]:
        if user_ids is None:
            wanted = self.sellers()
        else:
            where = f"Redis at {self.location}"
            wanted = _numeric([check_user_id(user_id, where) for user_id in user_ids])
        rows: list[SellerRow] = []
        for start in range(0, len(wanted), ROWS_BATCH):
            batch = wanted[start : start + ROWS_BATCH]
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for user_id in batch:
                        pipe.hmget(self.key(user_id), list(_ROW_FIELDS))
                    answers = pipe.execute()
            except UnicodeDecodeError:
                # A value mlauth never writes spoils the whole reply: that batch is read
                # again a hash at a time, so only its row says so.
                rows += [self._row_alone(user_id) for user_id in batch]
                continue
            except RedisError as exc:
                raise self._unreachable(exc, "read the sellers from") from None
            rows += [self._row(uid, answer) for uid, answer in zip(batch, answers, strict=True)]
        return rows

    def _row_alone(self, user_id: str) -> SellerRow:
        key = self.key(user_id)
        try:
            answer = cast("list[str | None]", self._client.hmget(key, list(_ROW_FIELDS)))
        except UnicodeDecodeError:
            return SellerRow(user_id, None, None, None, FAILING, str(not_text(key, self.location)))
        except RedisError as exc:
            raise self._unreachable(exc, "read the sellers from") from None
        return self._row(user_id, answer)

    def _row(self, user_id: str, answer: list[str | None]) -> SellerRow:
        values = {field: value for field, value in zip(_ROW_FIELDS, answer, strict=True) if value}
        key = self.key(user_id)
        if not values.get("chain"):
            return SellerRow(
                user_id, None, None, None, REAUTHORIZE, f"Redis holds no tokens under {key!r}"
            )
        try:
            tokens = tokens_of_hash(values, key, self.location)
        except StoreError as exc:  # a field mlauth never writes: this row says so, not all
            return SellerRow(user_id, None, None, None, FAILING, str(exc))
        state, detail = self._state(user_id, values, tokens)
        return SellerRow(
            user_id, tokens.expires_at, tokens.refreshed_at, tokens.refreshed_by, state, detail
        )

    def _state(
        self, user_id: str, values: dict[str, str], tokens: TokenSet
    ) -> tuple[str, str | None]:
        if tokens.refresh_token is None:
            return REAUTHORIZE, "no refresh token is stored"
        refresh = tokens.refresh_token.reveal()
        note = dead_note(values.get(DEAD_FIELD), refresh, self.key(user_id), self.location, user_id)
        if note is not None:
            return REAUTHORIZE, note
        failing = failing_note(values.get(FAILING_SINCE_FIELD), values.get(FAILURE_FIELD))
        if failing is not None:
            known: list[Secret | None] = [tokens.access_token, tokens.refresh_token]
            return FAILING, mask(failing, known)
        return OK, None

    def close(self) -> None:
        self._client.close()
        if self._probe is not self._client:
            self._probe.close()


def redis_sellers_held(url: str, client_id: str, *, key: str | None = None) -> bool:
    """Whether the Redis at ``url`` is, for this app, a store of many sellers: its one-seller
    hash (``key``, by default ``mlauth:<client_id>:tokens``) is empty and its set of sellers
    is not. One round trip; ConfigError or StoreError as a store's would be."""
    client, probe = connect(check_url(url), 5.0)
    probe.close()
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.exists(key or f"mlauth:{client_id}:tokens")
            pipe.scard(f"mlauth:{client_id}:sellers")
            one, many = pipe.execute()
    except RedisError as exc:
        raise unreachable(exc, "read", url) from None
    finally:
        client.close()
    return not one and bool(many)
