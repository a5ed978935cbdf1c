"""The Redis token store: one token chain shared by processes on several machines.

The tokens live in one Redis hash; refreshes are serialized by a redis-py :class:`~redis.lock.Lock`
with a timeout, so a holder killed mid-refresh blocks its peers for at most ``lock_timeout``
seconds. A lock that can expire is not a fence, though: a holder that stalled past the timeout
(on a slow token endpoint) may still come back with new tokens while a peer holds the lock.
So every commit is a compare-and-set on a generation number, in one Lua script: a save lands
only over the version the saving thread last read, and a stale holder's commit is refused
(:class:`StaleCommitError`) instead of putting a dead chain over a live one.

The raw bytes of a 2xx answer are kept in the hash's ``answer`` field (with the version they
follow) before anything reads them, and every commit clears it (the script replaces the hash
whole). A holder that died before committing leaves it there: the next holder reads it as the
endpoint would and commits its usable tokens with the same fence (:class:`RedisRefresh`);
an answer with no usable refresh token stays there for a human until the next commit.

A hash that mlauth cannot have written (a generation or a time that is no number, a token
that cannot be one) is a :class:`StoreError` naming the key and the fix.

Needs the ``redis`` package: ``pip install 'mlauth[redis]'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, cast

try:
    import redis
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.exceptions import LockError, LockNotOwnedError, NoScriptError, RedisError
    from redis.lock import Lock
    from redis.retry import Retry
except ImportError:  # pragma: no cover (exercised in a test by hiding the package)
    raise ImportError(
        "mlauth's Redis store needs the redis package: pip install 'mlauth[redis]'"
    ) from None

from mlauth import events
from mlauth.answers import tokens_of
from mlauth.errors import (
    REAUTHORIZE,
    ConfigError,
    InvalidGrantError,
    LockLostError,
    LockTimeoutError,
    RefreshError,
    StaleCommitError,
    StoreError,
    WrongSellerError,
    sealed,
)
from mlauth.secret import Secret, fingerprint, mask, quotes_url_secret, redact_url, url_scheme
from mlauth.tokens import LATEST_TIME, TokenSet, this_process, token_problem

from .base import (
    NOT_LOCAL,
    RefreshTransaction,
    TokenStore,
    check_seller,
    savable,
)
from .feed import ChangeFeed, Read
from .incidents import Incidents
from .journal import kept_note
from .lock import POLL_INTERVAL
from .recovery import FencedRefresh, answer_follows

__all__ = ["RedisRefresh", "RedisStore", "redact_url"]

log = logging.getLogger("mlauth")

# After a freshness check found Redis unreachable (or hanging), API calls go on with the
# cached token for this long before the next check, so a Redis that accepts connections but
# never answers costs one short timeout per PROBE_BACKOFF, not one per check_interval.
PROBE_BACKOFF = 30.0
# The freshness check's own timeout: it only looks for a peer's commit, which a 401 would
# find anyway, so it must never hold an API call for long.
PROBE_TIMEOUT = 1.0

_FIELDS = ("access_token", "refresh_token", "expires_at", "refreshed_at", "refreshed_by")

# A seller's hash in a store of many sellers (mlauth.stores.redis_sellers) comes with three
# more keys: KEYS[2] the set that lists the sellers, KEYS[3] the mark `sellers remove` leaves,
# KEYS[4] the sorted set of changes (mlauth.stores.redis_feed). The scripts that write tokens
# then refuse (-3) once the seller was removed, so a process still holding its chain in
# memory cannot bring it back, and list the seller in the same step, so the set and the
# hashes never disagree (after Redis lost both, a put-back lists it again); and they record
# the change with Redis's time, for the other processes' change feeds, dropping changes
# older than an hour. The seller's id is the last argument: the field pairs end with
# ('seller', id).
_SELLER_REMOVED = """
if #KEYS > 1 and redis.call('EXISTS', KEYS[3]) == 1 then
  return -3
end
"""
_SELLER_LISTED = """
if #KEYS > 1 then
  redis.call('SADD', KEYS[2], ARGV[#ARGV])
end
if #KEYS > 3 then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('ZADD', KEYS[4], ms, ARGV[#ARGV])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (ms - 3600000))
end
"""
REMOVED = -3  # what the scripts return for a seller removed from the store

# Commit over the version the caller read: refused if another chain is there or a newer
# generation of ours. A missing key or an older generation (Redis lost its data and a peer put
# back an older link) is not a conflict: our tokens are then the newest copy of the chain, so
# they are written as the next generation. Returns it, or -1 when somebody committed first.
# ARGV[3] is a nonce kept in the hash: when redis-py re-sends the script after a lost reply,
# the commit that already landed is recognized and reported, not mistaken for a peer's.
_COMMIT = (
    """
local chain = redis.call('HGET', KEYS[1], 'chain')
local gen = tonumber(redis.call('HGET', KEYS[1], 'generation') or '-1')
if chain == ARGV[1] and redis.call('HGET', KEYS[1], 'commit') == ARGV[3] then
  return gen
end
if chain and (chain ~= ARGV[1] or gen > tonumber(ARGV[2])) then
  return -1
end
"""
    + _SELLER_REMOVED
    + """
redis.call('DEL', KEYS[1])
local new = tonumber(ARGV[2]) + 1
redis.call('HSET', KEYS[1], 'chain', ARGV[1], 'generation', new, 'commit', ARGV[3],
  unpack(ARGV, 4))
"""
    + _SELLER_LISTED
    + """
return new
"""
)

# Put back what Redis lost: write only where the key is gone or holds an older generation
# (a peer re-seeded an older link than ours from its memory). Generations go on across chains
# (a migration with --force seeds the next one), so an older generation of a replaced chain
# is overwritten too, while a newer generation of any chain is never touched. Returns 1 when
# it wrote.
_RESEED = (
    _SELLER_REMOVED
    + """
local gen = redis.call('HGET', KEYS[1], 'generation')
if gen and tonumber(gen) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'chain', ARGV[1], 'generation', ARGV[2], unpack(ARGV, 3))
"""
    + _SELLER_LISTED
    + """
return 1
"""
)

# Keep a raw answer in the hash, fenced like a commit: only over the version the refresh read
# (ARGV[1] chain, ARGV[2] generation, a missing one read as 0 like _generation does; an empty
# chain for a login into an empty key). A holder
# whose lock lapsed while its POST hung must not overwrite the answer of the peer that holds
# the lock now (its only copy until it commits), nor create a hash of an answer alone where
# Redis lost the tokens. Returns 1 when it wrote.
_KEEP = """
local chain = redis.call('HGET', KEYS[1], 'chain')
if ARGV[1] == '' then
  if chain then return 0 end
elseif chain ~= ARGV[1]
    or tonumber(redis.call('HGET', KEYS[1], 'generation') or '0') ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return 1
"""

# Record why refreshes of the version read (ARGV[1] chain, ARGV[2] generation) fail: the
# field pairs from ARGV[4] on ('dead' after invalid_grant, or 'failure'), and 'failing_since'
# (ARGV[3]) unless an earlier failure set it. Fenced like _KEEP: a commit or a seed since
# (which replace the hash whole, so clear them) is never marked by a failure that came
# before it. Returns 1 when it wrote.
_MARK = """
if redis.call('HGET', KEYS[1], 'chain') ~= ARGV[1]
    or tonumber(redis.call('HGET', KEYS[1], 'generation') or '0') ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] ~= '' then
  redis.call('HSETNX', KEYS[1], 'failing_since', ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
return 1
"""

# Start a chain (a migration): into an empty key, or over anything when ARGV[2] is '1'. The
# generation goes on from the old one, so no process takes the new chain for an older link.
# Returns the new generation, -1 when a chain is there and replacing was not asked, or -2 when
# the old generation is no number or could not grow (ARGV[3], MAX_GENERATION). The
# chain id is new with each call, so finding it means a re-sent script: the seed landed.
_SEED = (
    """
if redis.call('HGET', KEYS[1], 'chain') == ARGV[1] then
  return tonumber(redis.call('HGET', KEYS[1], 'generation'))
end
local old = redis.call('HGET', KEYS[1], 'generation')
if old and ARGV[2] ~= '1' then
  return -1
end
local previous = tonumber(old or '0')
if previous == nil or previous >= tonumber(ARGV[3]) then
  return -2
end
local new = previous + 1
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'chain', ARGV[1], 'generation', new, unpack(ARGV, 4))
if #KEYS > 1 then
  redis.call('DEL', KEYS[3])  -- a seller added again after a removal
end
"""
    + _SELLER_LISTED
    + """
return new
"""
)


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(value)


ANSWER_FIELD = "answer"  # the raw answer of a refresh that has not committed yet
# Why the chain is dead (invalid_grant), naming the refresh token it is about; and since when,
# and why, refreshes fail otherwise. Every commit and seed replaces the hash, so clears them.
DEAD_FIELD = "dead"
FAILING_SINCE_FIELD = "failing_since"
FAILURE_FIELD = "failure"
FAILURE_LIMIT = 500  # characters of a failure's reason kept in the hash
_GENERATION = re.compile(r"[0-9]{1,15}")  # what the scripts write; Lua counts in doubles
# A commit writes generation + 1, which from here would have 16 digits: a refresh from it is
# refused before anything is spent (a generation this large was set by hand).
MAX_GENERATION = 10**15 - 1


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def _odd(key: str, where: str, field: str, problem: str, fix: str) -> StoreError:
    return StoreError(
        f"Redis at {where}: the hash {key!r} has {_article(field)} {field} that {problem}, "
        f"which mlauth never writes (edited by hand, or another program uses the key?); its "
        f"value is not shown. {fix}"
    )


def not_text(key: str, where: str) -> StoreError:
    # redis-py decodes every value it reads (decode_responses): one that is no UTF-8 fails
    # the whole read, and which field it was is not known.
    return _odd(
        key,
        where,
        "field",
        "is no UTF-8 text",
        f"Find it with HGETALL {key} and delete it (HDEL {key} FIELD), or move the tokens "
        "there again with `mlauth migrate --to URL --force`.",
    )


def _generation(raw: str | None, key: str, where: str) -> int:
    """The hash's generation (0 when it has none); StoreError for anything else (an empty
    one too: the commit script cannot compare it, so no commit would ever land)."""
    if raw is None:
        return 0
    if _GENERATION.fullmatch(raw) is None:
        raise _odd(
            key,
            where,
            "generation",
            "is no whole number of at most 15 digits",
            f"Put back the last generation `mlauth status` showed (HSET {key} generation N), "
            "or move the tokens there again with `mlauth migrate --to URL --force`.",
        )
    return int(raw)


def _generation_at_limit(key: str, where: str, done: str) -> StoreError:
    return StoreError(
        f"Redis at {where}: the hash {key!r} has a generation that is no number or is the "
        f"largest mlauth counts to ({MAX_GENERATION}; set by hand?), so the next one could not "
        f"be read back; {done}. Set it back to the generation it had (HSET {key} generation N)."
    )


def _float(values: dict[str, str], field: str, key: str, where: str) -> float | None:
    raw = values.get(field)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    # inf, nan or a time past the year 9999 break the freshness arithmetic and `mlauth status`.
    if not 0 <= value <= LATEST_TIME:
        raise _odd(
            key,
            where,
            field,
            "is no unix time in seconds",
            f"Delete it (HDEL {key} {field}): mlauth writes it again at the next refresh.",
        )
    return value


def url_detail(exc: Exception, url: str) -> str:
    """redis-py's words about ``url``, unless they quote a piece of its password: one with an
    unencoded '/', '#', '?' or '@' is cut there and read as a port or a host."""
    if quotes_url_secret(str(exc), url):
        return (
            "not shown, it quotes the URL's credentials; percent-encode '/', '#', '?', "
            "'@', ':' and '%' in a password, e.g. '/' as %2F"
        )
    return str(exc)


def unreachable(exc: Exception, doing: str, url: str) -> StoreError:
    """The error for Redis at ``url`` failing while ``doing`` something."""
    # Only the fact and the fix: the same text reaches `mlauth token` (which then has no
    # token to print) and a request whose token expired. Where a cached token does go on
    # being used, the line that says so adds it (stamp(), the engine's refresh ahead).
    return StoreError(
        f"cannot {doing} Redis at {redact_url(url)} ({type(exc).__name__}: "
        f"{url_detail(exc, url)}). Check that redis-server runs there and that ML_TOKEN_STORE "
        "names it."
    )


def check_url(url: object) -> str:
    """``url`` if it names Redis; ConfigError (never quoting a password) if not."""
    if not isinstance(url, str) or url_scheme(url) not in ("redis", "rediss", "unix"):
        shown = redact_url(url) if isinstance(url, str) else type(url).__name__
        raise ConfigError(
            f"{shown!r} is not a Redis URL; write redis://HOST:PORT/DB (or rediss:// for TLS)"
        )
    return url


def connect(url: str, socket_timeout: float = 5.0) -> tuple[redis.Redis, redis.Redis]:
    """The client for reads, writes and the lock, and the one the freshness check uses: each
    a pool of connections, which every store given them shares (redis-py makes the pool
    anew in a forked child)."""
    try:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # A restart of Redis leaves dead sockets in the pool: retry on a new one.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        )
        # The freshness check: a short timeout and no retry after one (see
        # PROBE_TIMEOUT); only a pooled socket a restart closed is retried, at once.
        probe = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=min(socket_timeout, PROBE_TIMEOUT),
            socket_connect_timeout=min(socket_timeout, PROBE_TIMEOUT),
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
    except ValueError as exc:
        raise ConfigError(
            f"{redact_url(url)} is not a usable Redis URL: {url_detail(exc, url)}"
        ) from None
    return client, probe


class LuaScript:
    """A Lua script run by its SHA1 (loaded on a server that does not know it yet).

    redis-py's ``register_script`` binds a script object to one client; these are made once
    per process and run on whichever client a store has, so the stores of many sellers that
    share a client hold no script objects of their own."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()  # noqa: S324 (Redis's name for it)

    def __call__(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted server, or one this process has not used yet
            client.script_load(self.text)
            return client.evalsha(self.sha, len(keys), *keys, *args)


_COMMIT_SCRIPT, _RESEED_SCRIPT, _SEED_SCRIPT, _KEEP_SCRIPT, _MARK_SCRIPT = (
    LuaScript(text) for text in (_COMMIT, _RESEED, _SEED, _KEEP, _MARK)
)


_warned_access: set[tuple[str, str]] = set()


def _masked_by(values: dict[str, str]) -> str | None:
    by = values.get("refreshed_by")
    if not by:
        return None
    return mask(
        by, [Secret(values[name]) for name in ("access_token", "refresh_token") if values.get(name)]
    )


def tokens_of_hash(values: dict[str, str], key: str, where: str) -> TokenSet:
    """The tokens a hash holds; StoreError for a field mlauth cannot have written.

    An access token that cannot be one is not sent but refreshed (a WARNING says so): the
    refresh token is all the next refresh needs. A refresh token that cannot be one stops
    everything, with the fix.
    """
    refresh = values.get("refresh_token") or None
    problem = token_problem(refresh) if refresh else None
    if problem is not None:
        raise _odd(
            key,
            where,
            "refresh_token",
            problem,
            f"Put the refresh token back as MercadoLibre gave it (HSET {key} refresh_token ...), "
            "or run `mlauth login` to authorize again.",
        )
    access = values.get("access_token") or None
    problem = token_problem(access) if access else None
    if access is not None and problem is not None:
        if (key, fingerprint(access)) not in _warned_access:
            _warned_access.add((key, fingerprint(access)))
            log.warning(
                "Redis at %s: the access_token in %r %s; it is not sent, and the next request "
                "refreshes it",
                where,
                key,
                problem,
            )
        access = None
    return TokenSet(
        access_token=Secret(access) if access else None,
        refresh_token=Secret(refresh) if refresh else None,
        expires_at=_float(values, "expires_at", key, where),
        refreshed_at=_float(values, "refreshed_at", key, where),
        # Shown by status, and by the repr of these tokens in any frame: a token there shows
        # as its fingerprint.
        refreshed_by=_masked_by(values),
    )


class RedisStore(TokenStore):
    """Tokens in a Redis hash, refreshes serialized by a Redis lock, commits fenced.

    ``url`` is a redis-py URL (``redis://host:6379/0``, ``rediss://...``, ``unix:///path``).
    ``key`` is the hash holding the tokens; by default ``mlauth:<client_id>:tokens``, the
    client id coming from ``client_id`` or from the :class:`~mlauth.MLAuth` the store is given
    to. ``lock_timeout`` is how long a holder that died keeps its peers waiting; it must be
    longer than one token call (connect + read timeout, 20 s by default), since the lock is
    renewed before each attempt. ``check_interval`` bounds how often the store asks Redis
    whether a peer committed: reads in between cost no round trip, and a 401 re-reads anyway.

    A store of many sellers (:class:`~mlauth.stores.redis_sellers.RedisSellers`) makes one per
    seller: ``seller`` is the user id whose chain the hash holds (a save of another seller's
    tokens is refused), ``index`` the set that lists the sellers (written with the hash, in
    one script), ``client`` and ``probe`` the connections all its sellers share, and ``feed``
    the change feed they share (:mod:`.redis_feed`): whether a peer committed is then asked
    once per ``check_interval`` for all the sellers of the process, not for each.
    """

    def __init__(
        self,
        url: str,
        *,
        key: str | None = None,
        client_id: str | None = None,
        lock_timeout: float = 30.0,
        check_interval: float = 1.0,
        socket_timeout: float = 5.0,
        client: redis.Redis | None = None,
        seller: str | None = None,
        index: str | None = None,
        probe: redis.Redis | None = None,
        feed: ChangeFeed | None = None,
        changes: str | None = None,
    ) -> None:
        url = check_url(url)
        if lock_timeout <= 0 or check_interval < 0:
            raise ConfigError("RedisStore: lock_timeout must be > 0 and check_interval >= 0")
        if index is not None and (seller is None or key is None):
            raise ConfigError("RedisStore: index= is for a seller's hash: give seller= and key=")
        if (feed is not None or changes is not None) and (index is None or seller is None):
            raise ConfigError("RedisStore: feed= and changes= are for a seller's hash: give index=")
        self.url = url
        self.location = redact_url(url)
        self.lock_timeout = float(lock_timeout)
        self.check_interval = float(check_interval)
        self.seller = seller
        self.index = index
        if client is None:
            client, probe = self._connect(url, socket_timeout)
        self._client = client
        self._probe = client if probe is None else probe
        self.key = ""
        if key is not None:
            self.key = key
        elif client_id is not None:
            self.bind_client(client_id)
        self._local = threading.local()  # per thread: the lock it holds, for check_writable
        # The newest tokens this process has seen, to put back if Redis loses them.
        self._known: tuple[TokenSet, str, int] | None = None
        self._seen: Hashable = None  # the stamp of the version last read or written
        self._checked_at = -float("inf")  # monotonic time of the last look at Redis
        self._quiet_until = -float("inf")  # after a failed look: no other before this time
        # A seller's hash: the feed looks for all sellers (what this store read last, and
        # the feed's look then); its own look only once after wait_unlocked().
        self._feed = feed
        self._changes = changes
        self._last: Read = (None, 0)
        self._alone = False

    def _connect(self, url: str, socket_timeout: float) -> tuple[redis.Redis, redis.Redis]:
        return connect(url, socket_timeout)

    def bind_client(self, client_id: str) -> None:
        """Derive the default key from the app's client id (MLAuth calls this)."""
        if not self.key:
            self.key = f"mlauth:{client_id}:tokens"

    @property
    def lock_key(self) -> str:
        return f"{self._key()}:lock"

    def __repr__(self) -> str:
        return f"RedisStore({self.location!r}, key={self.key!r})"

    def _script_keys(self) -> list[str]:
        """The keys a script that writes tokens is given: the hash, and for a seller's hash
        the sellers' set and the seller's removal mark (see ``_SELLER_REMOVED``)."""
        key = self._key()
        if self.index is None:
            return [key]
        keys = [key, self.index, f"{key}:removed"]
        return keys if self._changes is None else [*keys, self._changes]

    def _removed(self) -> str:
        return (
            f"seller {self.seller} was removed from Redis at {self.location} (`mlauth sellers "
            "remove`); add the seller again with `mlauth sellers add` or `mlauth login`"
        )

    def _key(self) -> str:
        if not self.key:
            raise ConfigError(
                "RedisStore has no key: pass key= or client_id=, or give it to an MLAuth"
            )
        return self.key

    def _unreachable(self, exc: Exception, doing: str) -> StoreError:
        return unreachable(exc, doing, self.url)

    # -- reading ---------------------------------------------------------------------------

    def local_stamp(self) -> Hashable:
        # Between two looks at Redis, stamp() answers from memory. One clock reading decides.
        feed = self._feed
        if feed is not None:
            return feed.local_stamp(self.seller or "", self._last)
        now = time.monotonic()
        if now - self._checked_at < self.check_interval or now < self._quiet_until:
            return self._seen
        return NOT_LOCAL

    def stamp(self) -> Hashable:
        # One round trip per check_interval at most, whatever the call rate (a seller's
        # hash: for all the process's sellers); in between the version last seen is
        # reported, so no change shows. A 401 re-reads under the lock.
        feed = self._feed
        now = time.monotonic()
        if feed is not None:
            if not self._alone:
                return feed.stamp(self.seller or "", self._last_read)
            self._alone = False
        elif now - self._checked_at < self.check_interval or now < self._quiet_until:
            return self._seen
        self._checked_at = now
        try:
            chain, gen = self._probe.hmget(self._key(), ["chain", "generation"])
        except UnicodeDecodeError:
            raise not_text(self._key(), self.location) from None
        except RedisError as exc:
            return self._look_failed(exc, now)
        events.store_answered(self.location, seller=self.seller)
        if chain is None:
            return None
        return (chain, _generation(cast("str | None", gen), self._key(), self.location))

    def _last_read(self) -> Read:
        return self._last

    def _look_failed(self, exc: RedisError, now: float) -> Hashable:
        # Back off: a Redis that hangs would otherwise cost every check its timeout. A
        # successful load() (a 401 or an expiry re-reads under the lock) ends this early.
        unreachable = self._unreachable(exc, "read")
        if self._feed is not None:
            self._feed.failed(unreachable, self.seller)
            return self._last[0]
        self._quiet_until = now + PROBE_BACKOFF
        log.warning("%s; using the cached token, next look in %gs", unreachable, PROBE_BACKOFF)
        events.store_failed(self.location, exc, str(unreachable), seller=self.seller)
        return self._seen

    # Sealed (mlauth.errors.sealed): the hash's values (the tokens) and the raw answer kept
    # beside them are locals here and below, on the traceback of any error raised through.
    @sealed
    def load(self) -> tuple[TokenSet, Hashable]:
        key = self._key()
        seq = self._seq()  # before the read: a look of the feed begun after it may know better
        self._local.answer = self._local.dead = None
        try:
            values = self._read(key)
            # Kept for a refresh transaction opened on this read (RedisRefresh), per thread.
            self._local.answer = values.get(ANSWER_FIELD)
            self._local.dead = values.get(DEAD_FIELD)
            if not values.get("chain") or self._behind(values):
                values = self._put_back(key)
        except UnicodeDecodeError:
            raise not_text(key, self.location) from None
        except RedisError as exc:
            raise self._unreachable(exc, "read the tokens from") from None
        chain, gen = values["chain"], _generation(values.get("generation"), key, self.location)
        tokens = tokens_of_hash(values, key, self.location)
        self._remember(tokens, chain, gen, seq)
        return tokens, (chain, gen)

    def dead_read(self) -> str | None:
        """The :data:`DEAD_FIELD` the hash held at this thread's last :meth:`load`, if any."""
        return cast("str | None", getattr(self._local, "dead", None))

    def answer_read(self) -> dict[str, Any] | None:
        """The raw answer record the hash held at this thread's last :meth:`load`, if any."""
        return _answer_record(getattr(self._local, "answer", None), self.location)

    def keep_answer(self, record: dict[str, Any]) -> bool:
        """Put a raw answer record in the hash before it is read, if the hash still holds the
        version the record follows (its ``chain`` and ``generation``; see ``_KEEP``). False,
        and an ERROR, if Redis refused or the chain moved on: the answer is read and
        committed all the same (a commit over a moved chain is refused as stale)."""
        chain, gen = record.get("chain"), record.get("generation")
        fence: list[str | int] = ["", 0]  # a login into an empty key
        if isinstance(chain, str) and isinstance(gen, int):
            fence = [chain, gen]
        try:
            args = [*fence, ANSWER_FIELD, json.dumps(record)]
            kept = _KEEP_SCRIPT(self._client, keys=[self._key()], args=args)
        except RedisError as exc:
            problem = str(exc)
        else:
            if kept == 1:
                return True
            problem = "the tokens there moved on while the token endpoint answered"
        log.error(
            "could not keep the raw token answer in %s at %s (%s); reading it all the "
            "same, but a crash before the commit would lose it",
            self._key(),
            self.location,
            problem,
        )
        return False

    def _read(self, key: str) -> dict[str, str]:
        return cast("dict[str, str]", self._client.hgetall(key))  # decode_responses=True

    def _behind(self, values: dict[str, str]) -> bool:
        """Whether Redis holds an older generation than this process has seen.

        That happens only after Redis lost its data and a peer that knew an older link put it
        back: adopting it would roll this process back to a refresh token already spent, and
        lose the live one, which may exist only in this process's memory.
        """
        known = self._known
        generation = _generation(values.get("generation"), self._key(), self.location)
        return known is not None and generation < known[2]

    def _put_back(self, key: str) -> dict[str, str]:
        """Re-seed a lost (or rolled back) key from the newest tokens this process has seen,
        and re-read."""
        known = self._known
        if known is None:
            raise ConfigError(
                f"Redis at {self.location} holds no tokens under {key!r}. Move them there "
                "with `mlauth migrate --to URL` (mlauth.cli.migrate.migrate_to_redis), authorize "
                "into it with `mlauth login`, or check ML_TOKEN_STORE (host, port and "
                "database number) and ML_TOKEN_KEY."
            )
        tokens, chain, gen = known
        args = [chain, gen, *self._pairs(tokens)]
        wrote = int(_RESEED_SCRIPT(self._client, keys=self._script_keys(), args=args))
        if wrote == REMOVED:
            raise ConfigError(f"{self._removed()}; its chain is not put back")
        if wrote:
            log.warning(
                "Redis at %s had lost the tokens or held an older generation of them "
                "(restarted without persistence?); put back generation %d, the newest this "
                "process had: %s",
                self.location,
                gen,
                tokens.describe(),
            )
        values = self._read(key)
        if not values.get("chain"):
            raise StoreError(f"Redis at {self.location} dropped {key!r} again right after a write")
        return values

    def _seq(self) -> int:
        return 0 if self._feed is None else self._feed.seq

    def _remember(self, tokens: TokenSet, chain: str, gen: int, seq: int) -> None:
        self._seen = (chain, gen)
        self._checked_at = time.monotonic()
        self._quiet_until = -float("inf")  # Redis answered
        self._known = (tokens, chain, gen)
        if self._feed is not None:
            self._last = ((chain, gen), seq)
            self._feed.answered()

    # -- writing ---------------------------------------------------------------------------

    def _pairs(self, tokens: TokenSet) -> list[str]:
        tokens = savable(tokens, f"{self.location} {self.key}")
        values = (
            tokens.access_token.reveal() if tokens.access_token else "",
            tokens.refresh_token.reveal() if tokens.refresh_token else "",
            _fmt(tokens.expires_at),
            _fmt(tokens.refreshed_at),
            tokens.refreshed_by or "",
        )
        pairs = [item for pair in zip(_FIELDS, values, strict=True) for item in pair]
        if self.seller is not None:
            # Last: the scripts list the seller in the index under ARGV[#ARGV].
            pairs += ["seller", self.seller]
        return pairs

    def check_writable(self) -> None:
        """Renew the lock this thread holds; raise :class:`LockLostError` if it expired.

        Called before every attempt to spend the refresh token: a lock that lapsed may now be
        held by a peer spending the same token, so nothing may be spent without it.
        """
        held: Lock | None = getattr(self._local, "lock", None)
        try:
            if held is None:
                self._client.ping()
                return
            held.reacquire()  # back to the full lock_timeout, atomically, only if still ours
        except LockNotOwnedError:
            raise LockLostError(
                f"the refresh lock {self.lock_key} at {self.location} expired before the "
                f"refresh token was spent (held over {self.lock_timeout:g}s); nothing was "
                "spent. Raise lock_timeout (ML_TOKEN_LOCK_TIMEOUT) above the token call's time.",
                lock_path=f"{self.location} {self.lock_key}",
            ) from None
        except RedisError as exc:
            doing = "reach" if held is None else "renew the refresh lock at"
            raise self._unreachable(exc, doing) from None

    @sealed  # the script's arguments are the tokens
    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        """Commit over the version ``replaces`` (as :meth:`load` returned it); raise
        :class:`StaleCommitError` if a peer committed since.

        ``replaces`` None (``mlauth login`` into an empty key, whose load found no tokens)
        starts a new chain, and only into an empty key.
        """
        check_seller(self, tokens)  # another seller's tokens never reach this hash
        if replaces is None:
            return self.seed(tokens)
        if not (isinstance(replaces, tuple) and len(replaces) == 2):
            raise TypeError(f"replaces must be a version load() returned, not {replaces!r}")
        chain, gen = replaces
        seq = self._seq()
        try:
            nonce = secrets.token_hex(8)
            args: list[str | int] = [chain, gen, nonce, *self._pairs(tokens)]
            new = int(_COMMIT_SCRIPT(self._client, keys=self._script_keys(), args=args))
        except RedisError as exc:
            raise self._unreachable(exc, "save the tokens to") from None
        if new == REMOVED:
            raise StoreError(f"{self._removed()}; its new tokens were not written")
        if new < 0:
            raise StaleCommitError(
                f"a peer committed newer tokens to {self.location} after this process read "
                f"generation {gen}; ours were not written (the newer ones win)"
            )
        self._remember(tokens, chain, new, seq)
        return (chain, new)

    @sealed
    def seed(self, tokens: TokenSet, *, replace: bool = False) -> Hashable:
        """Start a chain here (a migration): only into an empty key unless ``replace``.

        A new chain id makes every process that knew the old chain adopt this one rather than
        put its own back. Returns the stamp, or raises :class:`StaleCommitError` if a chain is
        already there and ``replace`` is False.
        """
        check_seller(self, tokens)
        key = self._key()
        chain = secrets.token_hex(8)
        args = [chain, "1" if replace else "0", MAX_GENERATION, *self._pairs(tokens)]
        seq = self._seq()
        try:
            gen = int(_SEED_SCRIPT(self._client, keys=self._script_keys(), args=args))
        except RedisError as exc:
            raise self._unreachable(exc, "write the tokens to") from None
        if gen == -2:
            raise _generation_at_limit(key, self.location, "nothing was written")
        if gen < 0:
            raise StaleCommitError(f"{self.location} already holds tokens under {key!r}")
        self._remember(tokens, chain, gen, seq)
        return (chain, gen)

    def peek(self) -> TokenSet | None:
        """The stored tokens, or None when the key is empty (never re-seeds)."""
        try:
            exists = self._client.exists(self._key())
        except RedisError as exc:
            raise self._unreachable(exc, "read") from None
        return self.load()[0] if exists else None

    # -- what failed: read by `mlauth status`, `check` and `sellers` ---------------------------

    def mark(self, version: Hashable, pairs: list[str], *, failing_since: float | None) -> bool:
        """Write ``pairs`` (:data:`DEAD_FIELD` or :data:`FAILURE_FIELD` and its value) into
        the hash if it still holds ``version``, and :data:`FAILING_SINCE_FIELD` unless set;
        False, and a WARNING, if it could not (the error itself is raised all the same)."""
        if not isinstance(version, tuple):
            return False
        since = "" if failing_since is None else repr(failing_since)
        try:
            args = [*version, since, *pairs]
            return bool(_MARK_SCRIPT(self._client, keys=[self._key()], args=args))
        except RedisError as exc:
            log.warning("could not record the failed refresh in %s: %s", self.key, exc)
            return False

    def dead_note(self, raw: str | None, refresh: str | None) -> str | None:
        """Why the chain is dead, if the :data:`DEAD_FIELD` record ``raw`` names the refresh
        token the hash holds (``refresh``); else None."""
        return dead_note(raw, refresh, self._key(), self.location, self.seller)

    def reauthorization_required(self) -> str | None:
        """Why the seller must authorize again: an ``invalid_grant`` (or a refresh spent for
        another seller) marked the refresh token the hash holds; None if nothing did."""
        try:
            raw, refresh = self._client.hmget(self._key(), [DEAD_FIELD, "refresh_token"])
        except UnicodeDecodeError:
            raise not_text(self._key(), self.location) from None
        except RedisError as exc:
            raise self._unreachable(exc, "read") from None
        return self.dead_note(cast("str | None", raw), cast("str | None", refresh))

    def clear_reauthorization(self) -> None:
        """A login saved a new chain: its commit replaced the hash, marker and all; this
        removes one a hand edit may have put back."""
        try:
            self._client.hdel(self._key(), DEAD_FIELD)
        except RedisError as exc:
            log.warning("could not remove the dead-chain marker from %s: %s", self.key, exc)

    # -- for `mlauth status` ---------------------------------------------------------------

    @property
    def lock_expiry(self) -> float:
        return self.lock_timeout

    def refresh_in_progress(self) -> bool:
        """Whether some process holds the refresh lock now.

        A holder that died still counts until its lock expires (``lock_timeout``).
        """
        try:
            return bool(self._client.exists(self.lock_key))
        except RedisError as exc:
            raise self._unreachable(exc, "read the refresh lock at") from None

    @sealed  # recovery reads the raw answer kept in the hash
    def transaction(self, *, login: bool = False) -> RefreshTransaction:
        return RedisRefresh(self, login=login)

    def incidents(self) -> Incidents:
        """Keys beside the tokens' hash (``<key>:incident:<name>``), set with ``NX``: one
        process of the whole fleet opens each incident."""
        return _RedisIncidents(self)

    @sealed
    def status_details(self) -> list[tuple[str, str]]:
        """Rows for ``mlauth status``: the key, the chain's generation last read, and a raw
        answer the hash keeps (one to replay, or one with no usable refresh token)."""
        rows = [("key", self._key())]
        seen = self._seen
        if isinstance(seen, tuple):
            rows.append(("generation", f"{seen[1]} (chain {seen[0]})"))
        try:
            raw, since, failure = self._client.hmget(
                self._key(), [ANSWER_FIELD, FAILING_SINCE_FIELD, FAILURE_FIELD]
            )
        except UnicodeDecodeError:
            raise not_text(self._key(), self.location) from None
        except RedisError as exc:
            raise self._unreachable(exc, "read") from None
        failing = failing_note(cast("str | None", since), cast("str | None", failure))
        if failing is not None:
            rows.append(("refresh failing", failing))
        record = _answer_record(cast("str | None", raw), self.location)
        if record is not None and isinstance(seen, tuple) and answer_follows(record) == seen:
            found = tokens_of(record, None)
            rows.append(
                (
                    "answer",
                    f"an unsaved answer to generation {record['generation']}, replayed at the "
                    "next refresh"
                    if isinstance(found, TokenSet)
                    else kept_note(record, found, f"{self._key()} {ANSWER_FIELD}")
                    + ": if refreshes fail with invalid_grant, run `mlauth login`",
                )
            )
        return rows

    def wait_unlocked(self, timeout: float) -> bool:
        """Poll (every 5 ms, like the lock) until nobody holds the refresh lock, without
        taking it; False after ``timeout``. Redis has no blocking wait for a key to go.

        Its stamp is coarse (one look per ``check_interval``): once the lock is free, the
        next :meth:`stamp` looks at Redis again, so a waiter sees what the holder saved (the
        store contract, :meth:`~mlauth.stores.base.TokenStore.wait_unlocked`)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            if self._client.exists(self.lock_key):
                log.debug(
                    "waiting for refresh lock %s at %s to be released", self.lock_key, self.location
                )
            while self._client.exists(self.lock_key):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_INTERVAL)
        except RedisError as exc:
            raise self._unreachable(exc, "read the refresh lock at") from None
        self._checked_at = -float("inf")  # the next stamp() is a real look
        self._alone = True  # of this hash, not the feed's
        return True

    # -- the lock --------------------------------------------------------------------------

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return self._hold(timeout)

    @contextmanager
    def _hold(self, timeout: float) -> Iterator[None]:
        lock = Lock(
            self._client,
            self.lock_key,
            timeout=self.lock_timeout,  # a dead holder blocks the others this long at most
            # Polled like the file lock (5 ms): a peer's refresh takes a few milliseconds, and
            # redis-py's 0.1 s default (or 50 ms) would make every waiter wait that long.
            sleep=POLL_INTERVAL,
            thread_local=False,  # one Lock object per hold, kept per thread below
        )
        log.debug("waiting for refresh lock %s at %s", self.lock_key, self.location)
        try:
            got = lock.acquire(blocking=timeout > 0, blocking_timeout=max(timeout, 0.0))
        except (RedisError, LockError) as exc:
            raise self._unreachable(exc, "take the refresh lock at") from None
        if not got:
            raise LockTimeoutError(
                f"could not take the refresh lock {self.lock_key} at {self.location} within "
                f"{timeout:g}s: another process is refreshing. No refresh was attempted. A "
                f"holder that died frees it after lock_timeout ({self.lock_timeout:g}s).",
                lock_path=f"{self.location} {self.lock_key}",
            )
        log.debug("took refresh lock %s", self.lock_key)
        self._local.lock = lock
        try:
            yield
        finally:
            self._local.lock = None
            try:
                lock.release()
            except LockNotOwnedError:
                log.warning(
                    "the refresh lock %s expired while held (over %gs); the commit was still "
                    "fenced by the generation check",
                    self.lock_key,
                    self.lock_timeout,
                )
            except RedisError as exc:
                # It expires by itself after lock_timeout; the refresh outcome matters more.
                log.warning("could not release the refresh lock %s: %s", self.lock_key, exc)


def _utc(at: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    except (OverflowError, OSError, ValueError):
        return "an unknown time"


def failing_note(since: str | None, failure: str | None) -> str | None:
    """Since when and why refreshes fail, from the hash's fields; None if they do not."""
    if not since and not failure:
        return None
    try:
        at = float(since or "")
    except ValueError:
        at = float("nan")
    when = f"since {_utc(at)}" if 0 <= at <= LATEST_TIME else "since an unknown time"
    # Masked again on the way out: whoever can write the hash chooses this text.
    return f"{when}: {mask(failure or 'no reason recorded')[:FAILURE_LIMIT]}"


def dead_note(
    raw: str | None, refresh: str | None, key: str, where: str, seller: str | None
) -> str | None:
    """Why the chain in ``key`` is dead, if the :data:`DEAD_FIELD` record ``raw`` names the
    refresh token the hash holds (``refresh``); else None (a marker about another token is
    moot: a new chain was saved over it)."""
    record = _answer_record(raw, where)
    if record is None or not refresh or record.get("refresh_token") != fingerprint(refresh):
        return None
    at = record.get("at")
    when = _utc(at) if isinstance(at, (int, float)) else "an unknown time"
    by, reason = record.get("by"), record.get("reason")
    fix = REAUTHORIZE
    if seller is not None:
        fix = (
            f"Re-authorization required: seller {seller} must authorize the app again "
            "(`mlauth login` saves the chain of the seller who authorizes)."
        )
    # Masked: whoever can write the hash chooses these words.
    return mask(
        f"the refresh token {fingerprint(refresh)} in {key} at {where} "
        f"{reason if isinstance(reason, str) else _REFUSED} (seen by "
        f"{by if isinstance(by, str) else 'a process'} at {when}). {fix}"
    )


def _answer_record(raw: str | None, where: str) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        log.warning("ignoring an unreadable answer field in the tokens' hash at %s", where)
        return None
    return record if isinstance(record, dict) else None


_REFUSED = "was refused by MercadoLibre (invalid_grant)"


def _spent_for_another(error: WrongSellerError) -> str:
    return (
        f"was spent for user {error.found}'s chain, not seller {error.expected}'s (filed under "
        "the wrong seller); the answer is kept in the hash"
    )


class RedisRefresh(FencedRefresh):
    """The refresh transaction of the Redis store: the raw answer in the hash, then the
    fenced commit (which clears it).

    Opening it finishes what a holder that died left: a raw answer that follows the version
    read is committed over it with the fence (a usable one), or kept and shown (one with no
    usable refresh token: the stored token is then tried once). A usable one that cannot be
    committed stops the refresh: the stored token was spent for it.
    """

    held_in = "hash"

    def __init__(self, store: RedisStore, *, login: bool = False) -> None:
        try:
            super().__init__(store, login=login)
        except ConfigError:
            # An empty key: a login that died before its commit may have left its answer.
            record = store.answer_read()
            if record is None or record.get("chain") is not None:
                raise
            super().__init__(store, login=True)
        self._store = store
        self.recover(store.answer_read(), login=login)

    def other_seller(self, exc: WrongSellerError, stored: Secret | None) -> None:
        # Another seller's answer: never into this chain. Its refresh token was spent for
        # it, so the chain is dead; the answer stays for a human until a login.
        self._mark_dead(stored, _spent_for_another(exc))
        self.kept = f"{self._store.key} {ANSWER_FIELD} holds an answer for user {exc.found}"
        self.possibly_spent = self.kept
        log.error("%s", exc)

    def begin(self, spent: Secret) -> None:
        self._check_generation()
        stored = self.tokens.refresh_token
        if stored is not None and stored == spent:
            message = self._store.dead_note(self._store.dead_read(), spent.reveal())
            if message is not None:  # known dead: not sent again, by any process
                raise InvalidGrantError(
                    f"not sent: {message}", status_code=400, error="invalid_grant"
                )
        super().begin(spent)

    def begin_login(self) -> None:
        self._check_generation()
        super().begin_login()

    def _check_generation(self) -> None:
        if isinstance(self.version, tuple) and self.version[1] >= MAX_GENERATION:
            raise _generation_at_limit(self._store.key, self._store.location, "nothing was sent")

    def _mark_dead(self, spent: Secret | None, reason: str) -> None:
        """Record in the hash that ``spent``, the token it holds, cannot be used again: every
        process then refuses to send it (:meth:`begin`), and status shows it."""
        record = {
            "refresh_token": fingerprint(spent.reveal() if spent else None),
            "at": time.time(),
            "by": this_process(),
            "reason": reason,
        }
        self._store.mark(self.version, [DEAD_FIELD, json.dumps(record)], failing_since=None)

    @property
    def raw_place(self) -> str:
        return f"the {ANSWER_FIELD} field of {self._store.key}"

    def keep_raw(self, record: dict[str, Any]) -> str | None:
        version = self.version if isinstance(self.version, tuple) else (None, None)
        record["chain"], record["generation"] = version
        return self.raw_place if self._store.keep_answer(record) else None

    def abort(self, spent: Secret, error: RefreshError) -> RefreshError:
        if self._grant == "refresh_token":  # a login's refused code kills no chain
            if isinstance(error, InvalidGrantError):
                before = f"; possibly spent before: {self.possibly_spent}"
                self._mark_dead(spent, _REFUSED + (before if self.possibly_spent else ""))
            elif isinstance(error, WrongSellerError):
                self._mark_dead(spent, _spent_for_another(error))
            else:
                known = [spent, self.tokens.access_token, self.tokens.refresh_token]
                failure = mask(str(error), known)[:FAILURE_LIMIT]
                self._store.mark(self.version, [FAILURE_FIELD, failure], failing_since=time.time())
        return self.raw_note(
            error,
            where=f"the {ANSWER_FIELD} field of {self._store.key} at {self._store.location}",
            until="until the next commit",
        )


INCIDENT_EXPIRY = 2 * 24 * 3600  # seconds; alerts remind daily of an incident still open


class _RedisIncidents:
    """A store's incidents as Redis keys; a Redis that cannot be reached raises (the alert
    then falls back to this process alone: see :mod:`mlauth.alerts`)."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    def _name(self, name: str) -> str:
        return f"{self._store._key()}:incident:{name}"

    def open(self, name: str, value: str) -> tuple[bool, str]:
        client = self._store._client
        # Expiring, so a key whose incident nobody saw end does not outlive its reminder.
        if client.set(self._name(name), value, nx=True, ex=INCIDENT_EXPIRY):
            return True, value
        held = client.get(self._name(name))
        return False, value if held is None else str(held)

    def close(self, name: str) -> None:
        self._store._client.delete(self._name(name))
