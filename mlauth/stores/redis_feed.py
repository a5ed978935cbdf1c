"""The change feed of the Redis store of many sellers (:mod:`.feed`): which sellers' hashes
changed since a time, in one round trip (two when a seller this process holds changed).

Every script that writes a seller's version (a commit, a seed, a put-back) and a removal also
add the seller to the sorted set ``<prefix>:changes``, scored by Redis's own ``TIME`` in
milliseconds (the one clock every machine on the Redis shares), and drop the entries older
than :data:`KEPT_MS`: the set holds at most the sellers written in the last hour.

Needs Redis 5 or newer (scripts replicated by their effects: a script may write after
reading ``TIME``).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable

try:
    import redis
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover (as in mlauth.stores.redis)
    raise ImportError(
        "mlauth's Redis store needs the redis package: pip install 'mlauth[redis]'"
    ) from None

from mlauth.errors import StoreError

from .feed import CHANGED_ODDLY, ChangeFeed, Found
from .redis import _generation, unreachable

__all__ = ["KEPT_MS", "RedisFeed"]

#: How long (ms) a change stays in the sorted set: far longer than any look's overlap.
KEPT_MS = 3_600_000


class RedisFeed(ChangeFeed):
    """The feed of one :class:`~.redis_sellers.RedisSellers` in one process, on its
    freshness-check client (``probe``: a short timeout, no retry). ``changes`` is the sorted
    set's key, ``key`` gives a seller's hash."""

    def __init__(
        self,
        probe: redis.Redis,
        url: str,
        location: str,
        check_interval: float,
        loaded: Container[str],
        *,
        changes: str,
        key: Callable[[str], str],
    ) -> None:
        super().__init__(location, check_interval, loaded)
        self._probe = probe
        self._url = url
        self.changes_key = changes
        self._key = key

    def clock(self) -> float:
        try:
            seconds, micros = self._probe.time()
        except RedisError as exc:
            raise unreachable(exc, "read the time of", self._url) from None
        return seconds + micros / 1e6

    def changes(self, since: float | None, loaded: Container[str]) -> Found:
        low = "-inf" if since is None else f"({since * 1000.0!r}"
        try:
            with self._probe.pipeline(transaction=False) as pipe:
                pipe.time()
                pipe.zrangebyscore(self.changes_key, low, "+inf")
                (seconds, micros), members = pipe.execute()
        except UnicodeDecodeError:
            raise StoreError(
                f"Redis at {self.location}: the sorted set {self.changes_key!r} holds a "
                f"member that is no UTF-8 text, which mlauth never writes; delete the key "
                f"(DEL {self.changes_key}): mlauth makes it again at the next write."
            ) from None
        except RedisError as exc:
            raise unreachable(exc, "read", self._url) from None
        at = seconds + micros / 1e6
        wanted = [user_id for user_id in members if user_id in loaded]
        if not wanted:
            return at, []
        try:
            with self._probe.pipeline(transaction=False) as pipe:
                for user_id in wanted:
                    pipe.hmget(self._key(user_id), ["chain", "generation"])
                answers = pipe.execute()
        except UnicodeDecodeError:
            # A hand edit spoils the whole reply: those sellers read their hash again, and
            # the one at fault says which field.
            return at, [(user_id, CHANGED_ODDLY) for user_id in wanted]
        except RedisError as exc:
            raise unreachable(exc, "read", self._url) from None
        return at, [
            (user_id, self._version(user_id, chain, generation))
            for user_id, (chain, generation) in zip(wanted, answers, strict=True)
        ]

    def _version(self, user_id: str, chain: str | None, generation: str | None) -> Hashable:
        if chain is None:
            return None  # removed, or lost: the seller's load() says which
        try:
            return (chain, _generation(generation, self._key(user_id), self.location))
        except StoreError:
            return CHANGED_ODDLY
