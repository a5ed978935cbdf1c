"""The SQL store of many sellers: SQLite on one machine, PostgreSQL for a fleet.

One row per seller (``mlauth_sellers``, keyed by the app's client id and the seller's user
id) holds the tokens, the version they are (a chain id and a generation), the raw answer of a
refresh not committed yet, and what went wrong last (``dead`` after an ``invalid_grant``,
``failing_since`` and a masked reason after any other failure). Every commit is one fenced
``UPDATE`` over the version the refresh read, which also clears the answer and the failure.

Refreshes of one seller are serialized by a lease: a row of ``mlauth_leases`` with an owner
unique to each hold and an expiry (``lock_timeout``), renewed before every token POST
(:meth:`SqlSellerStore.check_writable`). No database lock is held across the POST, so one
seller's slow token call never holds up another seller, nor any reader. A lease can lapse
(a holder stalled past its expiry): the fence on the commit is what keeps a stale holder's
tokens from ever replacing newer ones. A holder on this host whose process is gone is taken
over at once, so a ``kill -9`` does not cost the others ``lock_timeout``.

The raw bytes of a 2xx answer go to the row (their own statement, fenced like a commit)
before anything reads them. A holder that died before committing leaves them there: the next
holder reads them as the engine would and commits them (:class:`SqlRefresh`), unless they
name another seller, which stays kept and is reported, never written into anyone's chain.

A row mlauth cannot have written (a generation or a time that is no number, a token that
cannot be one: SQLite takes any value in any column) is a :class:`StoreError` naming the
row and the fix, never a crash, and never showing the value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from mlauth import events
from mlauth.answers import tokens_of
from mlauth.errors import (
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
from mlauth.secret import Secret, mask, redact_url, url_scheme
from mlauth.tokens import LATEST_TIME, USER_ID, TokenSet, this_process, token_problem

from . import sql_db
from .base import (
    RefreshTransaction,
    TokenStore,
    check_seller,
    savable,
)
from .feed import Read
from .incidents import Incidents
from .journal import kept_note
from .lock import POLL_INTERVAL
from .recovery import FencedRefresh, answer_follows
from .sellers_base import FAILING, OK, REAUTHORIZE, SellerRow, SellerStores, check_user_id
from .sql_db import Database
from .sql_feed import SqlFeed

__all__ = ["SqlRefresh", "SqlSellerStore", "SqlSellers"]

log = logging.getLogger("mlauth")

# A commit writes generation + 1: a generation this large was set by hand, and is refused
# before anything is spent (both databases count in 64-bit integers).
MAX_GENERATION = 2**62
# Start a seller's chain where it has none; or (_REPLACE) over the one it has, the generation
# going on from the old one so that no process takes the new chain for an older link.
# Every statement that writes a version sets changed_at to the database's time, for the
# change feed (.sql_feed).
_SEED = (
    "INSERT INTO mlauth_sellers (client_id, user_id, chain, generation, access_token, "
    "refresh_token, expires_at, refreshed_at, refreshed_by, changed_at) "
    "VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, {now}) "
    "ON CONFLICT (client_id, user_id) DO NOTHING RETURNING generation"
)
_REPLACE = (
    "INSERT INTO mlauth_sellers (client_id, user_id, chain, generation, access_token, "
    "refresh_token, expires_at, refreshed_at, refreshed_by, changed_at) "
    "VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, {now}) "
    "ON CONFLICT (client_id, user_id) DO UPDATE SET chain = excluded.chain, "
    "generation = mlauth_sellers.generation + 1, access_token = excluded.access_token, "
    "refresh_token = excluded.refresh_token, expires_at = excluded.expires_at, "
    "refreshed_at = excluded.refreshed_at, refreshed_by = excluded.refreshed_by, "
    "answer = NULL, dead = NULL, failing_since = NULL, failing_reason = NULL, "
    "changed_at = excluded.changed_at RETURNING generation"
)
_SHOWN = 10  # sellers named in a message; the rest are counted
_REASON_LIMIT = 500  # characters of a failure's reason kept in the row


def _host() -> str:
    """This machine, as a lease records it: the host name, the boot and the pid namespace,
    so that a process of another container on the same host (whose pids are not ours), or of
    another machine with the same name (cloned VMs), or of an earlier boot, is never judged
    dead by a pid we cannot see. The initial pid namespace has the same inode on every Linux
    host: the boot id tells two such machines apart."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "-"
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            boot = file.read(64).strip() or "-"
    except OSError:
        boot = "-"
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _gone(pid: int) -> bool:
    """Whether process ``pid`` of this machine no longer runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists, as another user's
    try:
        with open(f"/proc/{pid}/stat", "rb") as status:
            return status.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_version(chain: object, generation: object) -> bool:
    """Whether (chain, generation) is a version mlauth can have written (see ``_version``)."""
    return (
        isinstance(chain, str)
        and bool(chain)
        and isinstance(generation, int)
        and not isinstance(generation, bool)
        and 0 <= generation <= MAX_GENERATION
    )


class _Row:
    """What :meth:`SqlSellerStore.load` read beside the tokens, kept per thread for the
    refresh transaction opened on it."""

    __slots__ = ("answer", "dead")

    def __init__(self, answer: object = None, dead: object = None) -> None:
        self.answer = answer
        self.dead = dead


class SqlSellerStore(TokenStore):
    """One seller's chain in a :class:`SqlSellers`: its row, its lease, its fenced commits.

    Made by :meth:`SqlSellers.store` (once per seller and process). Whether a peer
    committed is asked of the database at most once per ``check_interval`` for all the
    sellers of the process together (the change feed, :mod:`.sql_feed`): requests in between
    cost no query, and a 401 re-reads under the lease anyway.
    """

    def __init__(self, sellers: SqlSellers, user_id: str) -> None:
        self._sellers = sellers
        self._db: Database = sellers.db
        self.seller = user_id
        self.client_id = sellers.client_id
        self.location = f"{sellers.location} (seller {user_id})"
        self.lock_timeout = sellers.lock_timeout
        self.check_interval = sellers.check_interval
        self._local = threading.local()  # per thread: the lease it holds, what load read
        self._user_id = user_id
        self._feed = sellers.feed
        self._read: Read = (None, 0)  # the version last read or written, and the feed's look
        self._alone = False  # the next stamp() looks at this row itself (after a wait)

    def __repr__(self) -> str:
        return f"SqlSellerStore({self._sellers.location!r}, seller={self.seller!r})"

    def bind_client(self, client_id: str) -> None:
        if client_id != self.client_id:
            raise ConfigError(
                f"{self.location} holds app {self.client_id}'s sellers, and is given to an "
                f"MLAuth of app {client_id}: give each app its own store from its own .env"
            )

    def _key(self) -> tuple[str, str]:
        return (self.client_id, self.seller or "")

    def _odd(self, field: str, problem: str, fix: str) -> StoreError:
        return StoreError(
            f"{self._db.dialect.name} at {self._sellers.location}: the row of seller "
            f"{self.seller} (client {self.client_id}) in mlauth_sellers has a {field} that "
            f"{problem}, which mlauth never writes (edited by hand, or another program uses "
            f"the table?); its value is not shown. {fix}"
        )

    # -- reading ---------------------------------------------------------------------------

    def local_stamp(self) -> Hashable:
        # Within check_interval of the feed's last look: from memory, one clock reading.
        return self._feed.local_stamp(self._user_id, self._read)

    def stamp(self) -> Hashable:
        # One query per check_interval at most for all the process's sellers, whatever the
        # call rate and the number of sellers; this row alone once after wait_unlocked().
        if self._alone:
            self._alone = False
            return self._look_alone()
        return self._feed.stamp(self._user_id, self._last_read)

    def _last_read(self) -> Read:
        return self._read

    def _look_alone(self) -> Hashable:
        try:
            rows, _ = self._db.run(
                "SELECT chain, generation FROM mlauth_sellers WHERE client_id = ? AND user_id = ?",
                self._key(),
                "read",
            )
        except StoreError as exc:
            self._feed.failed(exc, self.seller)
            return self._read[0]
        events.store_answered(self._feed.location, seller=self.seller)
        if not rows:
            return None
        return self._version(rows[0][0], rows[0][1])

    def _version(self, chain: object, generation: object) -> tuple[str, int]:
        if not isinstance(chain, str) or not chain:
            raise self._odd(
                "chain",
                "is no text",
                "Give the seller a chain again: `mlauth login --seller "
                f"{self.seller}`, or `mlauth sellers remove` it and `mlauth sellers add` it.",
            )
        if (
            not isinstance(generation, int)
            or isinstance(generation, bool)
            or not (0 <= generation <= MAX_GENERATION)
        ):
            raise self._odd(
                "generation",
                f"is no whole number from 0 to {MAX_GENERATION}",
                f"Set it back to the generation `mlauth status --seller {self.seller}` showed "
                "(in the generation column of its row).",
            )
        return (chain, generation)

    @sealed  # the row's values (the tokens) are locals here
    def load(self) -> tuple[TokenSet, Hashable]:
        self._local.row = _Row()
        seq = self._feed.seq  # before the read: a look begun after it may know better
        rows, _ = self._db.run(
            "SELECT chain, generation, access_token, refresh_token, expires_at, refreshed_at, "
            "refreshed_by, answer, dead FROM mlauth_sellers WHERE client_id = ? AND user_id = ?",
            self._key(),
            "read",
        )
        if not rows:
            raise ConfigError(
                f"{self._sellers.location} holds no seller {self.seller} for app "
                f"{self.client_id} (removed?). Add it with `mlauth login --seller "
                f"{self.seller}` or `mlauth sellers add` (a refresh token on stdin)."
            )
        chain, generation, *values, answer, dead = rows[0]
        version = self._version(chain, generation)
        tokens = self._tokens(values)
        self._local.row = _Row(answer, dead)
        self._remember(version, seq)
        return tokens, version

    def _tokens(self, values: Sequence[object]) -> TokenSet:
        access, refresh, expires_at, refreshed_at, by = values
        if refresh is not None and refresh != "":
            problem = token_problem(refresh)
            if problem is not None:
                raise self._odd(
                    "refresh_token",
                    problem,
                    f"Authorize the seller again (`mlauth login --seller {self.seller}`).",
                )
        if access is not None and access != "" and token_problem(access) is not None:
            log.warning(
                "%s: the access_token of seller %s cannot be one; it is not sent, and the "
                "next request refreshes it",
                self._sellers.location,
                self.seller,
            )
            access = None
        return TokenSet(
            access_token=Secret(access) if isinstance(access, str) and access else None,
            refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
            expires_at=self._time(expires_at, "expires_at"),
            refreshed_at=self._time(refreshed_at, "refreshed_at"),
            refreshed_by=_masked_by(by, access, refresh),
        )

    def _time(self, value: object, field: str) -> float | None:
        if value is None:
            return None
        if not _number(value) or not 0 <= float(value) <= LATEST_TIME:  # type: ignore[arg-type]
            raise self._odd(
                field,
                "is no unix time in seconds",
                f"Empty it (set {field} to NULL in that row): mlauth writes it again at the "
                "next refresh.",
            )
        return float(value)  # type: ignore[arg-type]

    def _remember(self, version: tuple[str, int], seq: int) -> None:
        """This process read or wrote ``version``; ``seq``: the feed's look before it."""
        self._read = (version, seq)
        self._feed.answered()

    def row_read(self) -> _Row:
        """What this thread's last :meth:`load` read beside the tokens."""
        row = getattr(self._local, "row", None)
        return row if isinstance(row, _Row) else _Row()

    # -- writing ---------------------------------------------------------------------------

    def _values(self, tokens: TokenSet) -> tuple[object, ...]:
        tokens = savable(tokens, self.location)
        return (
            tokens.access_token.reveal() if tokens.access_token else None,
            tokens.refresh_token.reveal() if tokens.refresh_token else None,
            tokens.expires_at,
            tokens.refreshed_at,
            tokens.refreshed_by,
        )

    @sealed  # the statement's parameters are the tokens
    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        """Commit over the version ``replaces`` (as :meth:`load` returned it); raise
        :class:`StaleCommitError` if a peer committed since. None starts the seller's chain
        (only where the seller has none)."""
        check_seller(self, tokens)
        if replaces is None:
            return self.seed(tokens)
        if not (isinstance(replaces, tuple) and len(replaces) == 2):
            raise TypeError(f"replaces must be a version load() returned, not {replaces!r}")
        chain, gen = replaces
        seq = self._feed.seq
        _, count = self._db.run(
            "UPDATE mlauth_sellers SET generation = generation + 1, access_token = ?, "
            "refresh_token = ?, expires_at = ?, refreshed_at = ?, refreshed_by = ?, "
            "answer = NULL, dead = NULL, failing_since = NULL, failing_reason = NULL, "
            "changed_at = {now} "
            "WHERE client_id = ? AND user_id = ? AND chain = ? AND generation = ?",
            (*self._values(tokens), *self._key(), chain, gen),
            "save the tokens to",
        )
        if count != 1:
            raise StaleCommitError(
                f"a peer committed newer tokens to {self.location} after this process read "
                f"generation {gen}; ours were not written (the newer ones win)"
            )
        self._remember((chain, gen + 1), seq)
        return (chain, gen + 1)

    @sealed
    def seed(self, tokens: TokenSet, *, replace: bool = False) -> Hashable:
        """Start this seller's chain (``mlauth login``, ``sellers add``, a migration): only
        where it has none unless ``replace``. A new chain id makes every process that knew
        the old chain adopt this one; the generation goes on from the old one."""
        check_seller(self, tokens)
        chain = secrets.token_hex(8)
        seq = self._feed.seq
        rows, _ = self._db.run(
            _REPLACE if replace else _SEED,
            (*self._key(), chain, *self._values(tokens)),
            "write the tokens to",
        )
        if not rows:
            raise StaleCommitError(f"{self.location} already holds a chain")
        version = self._version(chain, rows[0][0])
        self._remember(version, seq)
        return version

    @sealed  # the record is the raw answer: the tokens
    def keep_answer(self, record: dict[str, Any]) -> bool:
        """Put a raw answer record in the row before it is read, if the row still holds the
        version it follows; False, and an ERROR, if not (it is read all the same)."""
        chain, gen = record.get("chain"), record.get("generation")
        try:
            _, count = self._db.run(
                "UPDATE mlauth_sellers SET answer = ? "
                "WHERE client_id = ? AND user_id = ? AND chain = ? AND generation = ?",
                (json.dumps(record), *self._key(), chain, gen),
                "keep the raw answer in",
            )
        except StoreError as exc:
            problem = str(exc)
        else:
            if count == 1:
                return True
            problem = "the row moved on while the token endpoint answered, or is gone"
        log.error(
            "could not keep the raw token answer in the row of seller %s at %s (%s); reading "
            "it all the same, but a crash before the commit would lose it",
            self.seller,
            self._sellers.location,
            problem,
        )
        return False

    def mark(
        self, version: Hashable, *, dead: str | None = None, failing: str | None = None
    ) -> None:
        """Record a failed refresh of ``version``: ``dead`` (a JSON record, after
        ``invalid_grant``) or ``failing`` (the masked reason); never over a newer version."""
        if not isinstance(version, tuple):
            return
        if dead is not None:
            text = (
                "UPDATE mlauth_sellers SET dead = ? "
                "WHERE client_id = ? AND user_id = ? AND chain = ? AND generation = ?"
            )
            params: tuple[object, ...] = (dead, *self._key(), *version)
        else:
            text = (
                "UPDATE mlauth_sellers SET failing_since = COALESCE(failing_since, ?), "
                "failing_reason = ? "
                "WHERE client_id = ? AND user_id = ? AND chain = ? AND generation = ?"
            )
            params = (time.time(), (failing or "")[:_REASON_LIMIT], *self._key(), *version)
        try:
            self._db.run(text, params, "record the failed refresh in")
        except StoreError as exc:
            log.warning("%s", exc)

    def check_writable(self) -> None:
        """Renew the lease this thread holds; :class:`LockLostError` if it lapsed (a peer
        may hold it now and be spending the same token)."""
        owner = getattr(self._local, "owner", None)
        if owner is None:
            self._db.run(
                "SELECT 1 FROM mlauth_sellers WHERE client_id = ? AND user_id = ?",
                self._key(),
                "reach",
            )
            return
        _, count = self._db.run(
            "UPDATE mlauth_leases SET expires = {now} + ? "
            "WHERE client_id = ? AND user_id = ? AND owner = ?",
            (self.lock_timeout, *self._key(), owner),
            "renew the refresh lease at",
        )
        if count != 1:
            raise LockLostError(
                f"the refresh lease of seller {self.seller} at {self._sellers.location} "
                f"expired before the refresh token was spent (held over {self.lock_timeout:g}s)"
                "; nothing was spent. Raise lock_timeout (ML_TOKEN_LOCK_TIMEOUT) above the "
                "token call's time.",
                lock_path=f"{self.location} lease",
            )

    # -- the lease -------------------------------------------------------------------------

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        return self._hold(timeout)

    @contextmanager
    def _hold(self, timeout: float) -> Iterator[None]:
        owner = secrets.token_hex(16)
        deadline = time.monotonic() + max(timeout, 0.0)
        told = False
        while not self._take(owner):
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"could not take the refresh lease of seller {self.seller} at "
                    f"{self._sellers.location} within {timeout:g}s: another process is "
                    "refreshing. No refresh was attempted. A holder that died frees it after "
                    f"lock_timeout ({self.lock_timeout:g}s), or at once if it ran here.",
                    lock_path=f"{self.location} lease",
                )
            if not told:
                log.debug("waiting for refresh lock of seller %s at %s", self.seller, self.location)
                told = True
            time.sleep(POLL_INTERVAL)
        self._local.owner = owner
        try:
            yield
        finally:
            self._local.owner = None
            self._release(owner)

    def _take(self, owner: str) -> bool:
        """One try at the lease: free, lapsed, or held by a dead process of this machine."""
        held = self._holder()
        mine = (self.lock_timeout, this_process(), _HOST, os.getpid())
        if held is None:
            _, count = self._db.run(
                "INSERT INTO mlauth_leases (client_id, user_id, owner, expires, holder, host, pid) "
                "VALUES (?, ?, ?, {now} + ?, ?, ?, ?) ON CONFLICT (client_id, user_id) "
                "DO NOTHING",
                (*self._key(), owner, *mine),
                "take the refresh lease at",
            )
            return count == 1
        if not self._takeable(held):
            return False
        _, count = self._db.run(
            "UPDATE mlauth_leases SET owner = ?, expires = {now} + ?, holder = ?, host = ?, "
            "pid = ? WHERE client_id = ? AND user_id = ? AND owner = ?",
            (owner, *mine, *self._key(), held[0]),
            "take the refresh lease at",
        )
        if count == 1:
            log.warning(
                "took over the refresh lease of seller %s from %s, %s",
                self.seller,
                held[3] if isinstance(held[3], str) else "an unknown process",
                "which is gone" if self._dead_here(held) else "whose lease had expired",
            )
        return count == 1

    def _holder(self) -> tuple[object, ...] | None:
        """(owner, seconds left, host, holder, pid) of the lease, or None when it is free."""
        rows, _ = self._db.run(
            "SELECT owner, expires - {now}, host, holder, pid FROM mlauth_leases "
            "WHERE client_id = ? AND user_id = ?",
            self._key(),
            "read the refresh lease at",
        )
        return tuple(rows[0]) if rows else None

    def _dead_here(self, held: tuple[object, ...]) -> bool:
        pid = held[4]
        return (
            held[2] == _HOST
            and isinstance(pid, int)
            and pid > 0
            and pid != os.getpid()
            and _gone(pid)
        )

    def _takeable(self, held: tuple[object, ...]) -> bool:
        left = held[1]
        # A lease row edited by hand (no number left) counts as lapsed: nobody holds it.
        return not _number(left) or float(left) <= 0 or self._dead_here(held)  # type: ignore[arg-type]

    def _release(self, owner: str) -> None:
        try:
            self._db.run(
                "DELETE FROM mlauth_leases WHERE client_id = ? AND user_id = ? AND owner = ?",
                (*self._key(), owner),
                "release the refresh lease at",
            )
        except StoreError as exc:
            # It lapses by itself after lock_timeout; the refresh's outcome matters more.
            log.warning("%s", exc)

    def refresh_in_progress(self) -> bool:
        """Whether some live process holds this seller's lease now."""
        held = self._holder()
        return held is not None and not self._takeable(held)

    def wait_unlocked(self, timeout: float) -> bool:
        """Poll (every 5 ms, like the lease) until nobody holds the lease, without taking
        it; False after ``timeout``. The next :meth:`stamp` is then a real look."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while self.refresh_in_progress():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        self._alone = True
        return True

    @property
    def lock_expiry(self) -> float:
        return self.lock_timeout

    # -- the rest of the contract ----------------------------------------------------------

    @sealed  # recovery reads the raw answer kept in the row
    def transaction(self, *, login: bool = False) -> RefreshTransaction:
        return SqlRefresh(self, login=login)

    @sealed  # the row's refresh token is a local
    def reauthorization_required(self) -> str | None:
        rows, _ = self._db.run(
            "SELECT refresh_token, dead FROM mlauth_sellers WHERE client_id = ? AND user_id = ?",
            self._key(),
            "read",
        )
        if not rows:
            return None
        refresh, dead = rows[0]
        stored = Secret(refresh) if isinstance(refresh, str) and refresh else None
        return self.dead_message(dead, stored)

    def dead_message(self, dead: object, stored: Secret | None) -> str | None:
        """The message if ``dead`` (the row's record) names ``stored``, else None."""
        record = _json_object(dead)
        if record is None or stored is None or record.get("refresh_token") != stored.fingerprint:
            return None
        reason = record.get("reason") if isinstance(record.get("reason"), str) else None
        return (
            f"the refresh token {stored.fingerprint} of seller {self.seller} at "
            f"{self._sellers.location} was refused by MercadoLibre ({reason or 'invalid_grant'}"
            f"; seen by {_text(record.get('by'))} at {_when(record.get('at'))}). "
            f"Re-authorization required: run `mlauth login --seller {self.seller}` (or give "
            f"`mlauth sellers remove {self.seller}`, then `mlauth sellers add` a refresh "
            "token from a new authorization)."
        )

    def clear_reauthorization(self) -> None:
        self._db.run(
            "UPDATE mlauth_sellers SET dead = NULL, failing_since = NULL, failing_reason = NULL "
            "WHERE client_id = ? AND user_id = ?",
            self._key(),
            "write to",
        )

    @sealed
    def status_details(self) -> list[tuple[str, str]]:
        """Rows for ``mlauth status``: the row, the generation last read, a raw answer kept
        in it, and a failing refresh."""
        details = [("row", f"mlauth_sellers: client {self.client_id}, seller {self.seller}")]
        seen = self._read[0]
        if isinstance(seen, tuple):
            details.append(("generation", f"{seen[1]} (chain {seen[0]})"))
        rows, _ = self._db.run(
            "SELECT chain, generation, answer, failing_since, failing_reason FROM mlauth_sellers "
            "WHERE client_id = ? AND user_id = ?",
            self._key(),
            "read",
        )
        if not rows:
            return details
        chain, gen, answer, since, reason = rows[0]
        record = _json_object(answer)
        if record is not None and answer_follows(record) == (chain, gen):
            found = tokens_of(record, None)
            details.append(
                (
                    "answer",
                    f"an unsaved answer to generation {gen}, replayed at the next refresh"
                    if isinstance(found, TokenSet)
                    else kept_note(record, found, f"the answer column of {self.seller}'s row")
                    + ": if refreshes fail with invalid_grant, run `mlauth login --seller "
                    f"{self.seller}`",
                )
            )
        if _number(since):
            details.append(("failing", f"since {_when(since)}: {_text(reason)}"))
        return details

    def incidents(self) -> Incidents:
        """Rows of ``mlauth_incidents``, made with ``ON CONFLICT DO NOTHING``: one process
        of the whole fleet opens each incident."""
        return _SqlIncidents(self)


_HOST = _host()


# What mlauth writes as refreshed_by (mlauth.tokens.this_process): such a value holds no
# token, bar one shaped like a host name, which mask() fingerprints by its shape.
_WRITER = re.compile(r"pid [0-9]{1,10}@[A-Za-z0-9.-]{0,253}")


def _masked_by(by: object, *tokens: object) -> str | None:
    """``refreshed_by`` fit to show: a token in it (a row edited by hand) fingerprinted.
    Masking every spelling of the row's tokens costs a regex compile, so only a value that
    mlauth cannot have written pays it: `mlauth sellers` reads 10,000 rows at once."""
    if not isinstance(by, str) or not by:
        return None
    if _WRITER.fullmatch(by):
        return mask(by)
    return mask(by, [Secret(token) for token in tokens if isinstance(token, str) and token])


def _json_object(value: object) -> dict[str, Any] | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        found = json.loads(value)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _text(value: object) -> str:
    return value if isinstance(value, str) else "an unknown process"


def _when(at: object) -> str:
    if not _number(at):
        return "an unknown time"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(at)))  # type: ignore[arg-type]
    except (OverflowError, OSError, ValueError):
        return "an unknown time"


class SqlRefresh(FencedRefresh):
    """The refresh transaction of the SQL store: the raw answer in the row, then the fenced
    commit (which clears it); a failure recorded in the row (``dead`` or ``failing``).

    Opening it finishes what a holder that died left: a raw answer that follows the version
    read is committed over it with the fence (a usable one), or kept and shown (one with no
    usable refresh token: the stored token is then tried once). One that names another
    seller is never committed: it stays kept, and the refresh stops with
    :class:`~mlauth.WrongSellerError` (the stored token was spent for it).
    """

    held_in = "row"

    def __init__(self, store: SqlSellerStore, *, login: bool = False) -> None:
        super().__init__(store, login=login)
        self._store = store
        row = store.row_read()
        self._dead = row.dead
        self.recover(_json_object(row.answer), login=login)

    @property
    def raw_place(self) -> str:
        return f"the answer column of seller {self._store.seller}'s row"

    def other_seller(self, exc: WrongSellerError, stored: Secret | None) -> None:
        raise self._other_seller(exc) from None

    def _other_seller(self, exc: WrongSellerError) -> WrongSellerError:
        seller = self._store.seller
        return WrongSellerError(
            f"{self.raw_place} at {self._store.location} keeps the answer of a refresh that "
            f"was not committed, and it is user {exc.found}'s, not seller {seller}'s: it was "
            f"not written to either chain, and stays kept there for you to inspect "
            f"(`mlauth status --seller {seller}`). Seller {seller}'s stored refresh token was "
            f"spent for it, so nothing was sent. Run `mlauth login --seller {seller}`.",
            expected=exc.expected,
            found=exc.found,
            status_code=exc.status_code,
            error=exc.error,
            description=exc.description,
        )

    def begin(self, spent: Secret) -> None:
        self._refuse_dead(spent)
        self._check_generation()
        super().begin(spent)

    def begin_login(self) -> None:
        self._check_generation()
        super().begin_login()

    def _refuse_dead(self, spent: Secret) -> None:
        message = self._store.dead_message(self._dead, spent)
        if message is not None:  # known dead: not sent again
            raise InvalidGrantError(f"not sent: {message}", status_code=400, error="invalid_grant")

    def _check_generation(self) -> None:
        if isinstance(self.version, tuple) and self.version[1] >= MAX_GENERATION:
            raise self._store._odd(
                "generation",
                "is the largest mlauth counts to (set by hand?); nothing was sent",
                "Set it back to the generation `mlauth status` showed.",
            )

    def keep_raw(self, record: dict[str, Any]) -> str | None:
        version = self.version if isinstance(self.version, tuple) else (None, None)
        record["chain"], record["generation"] = version
        return self.raw_place if self._store.keep_answer(record) else None

    def abort(self, spent: Secret, error: RefreshError) -> RefreshError:
        if self._grant == "refresh_token":
            if isinstance(error, (InvalidGrantError, WrongSellerError)):
                reason = "invalid_grant"
                if isinstance(error, WrongSellerError):
                    reason = f"spent for user {error.found}'s answer, kept in the row"
                record = {
                    "refresh_token": spent.fingerprint,
                    "at": time.time(),
                    "by": this_process(),
                    "reason": reason,
                }
                self._store.mark(self.version, dead=json.dumps(record))
            else:
                known = [spent, self.tokens.access_token, self.tokens.refresh_token]
                self._store.mark(self.version, failing=mask(str(error), known))
        return self.raw_note(
            error,
            where=f"{self.raw_place} at {self._store.location}",
            until="until the next commit",
        )


class _SqlIncidents:
    """A seller's open incidents as rows; a database that fails raises (the alert then
    falls back to this process alone: see :mod:`mlauth.alerts`)."""

    def __init__(self, store: SqlSellerStore) -> None:
        self._store = store

    def open(self, name: str, value: str) -> tuple[bool, str]:
        store = self._store
        key = store._key()
        _, count = store._db.run(
            "INSERT INTO mlauth_incidents (client_id, user_id, name, value) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (client_id, user_id, name) DO NOTHING",
            (*key, name, value),
            "open an incident in",
        )
        if count == 1:
            return True, value
        rows, _ = store._db.run(
            "SELECT value FROM mlauth_incidents WHERE client_id = ? AND user_id = ? AND name = ?",
            (*key, name),
            "read",
        )
        held = rows[0][0] if rows else None
        return False, held if isinstance(held, str) else value

    def close(self, name: str) -> None:
        self._store._db.run(
            "DELETE FROM mlauth_incidents WHERE client_id = ? AND user_id = ? AND name = ?",
            (*self._store._key(), name),
            "close an incident in",
        )


class SqlSellers(SellerStores):
    """The chains of many sellers in one SQL database: :meth:`sqlite` or :meth:`postgresql`.

    ``client_id`` (else :meth:`bind_client`) names the app whose rows these are: one database
    may serve several apps. ``lock_timeout`` is how long a holder that died elsewhere keeps
    a seller's peers waiting (one on this machine is taken over at once); it must be longer
    than one token call. ``check_interval``: see :class:`SqlSellerStore`.
    """

    def __init__(
        self,
        db: Database,
        location: str,
        *,
        client_id: str | None = None,
        lock_timeout: float = 30.0,
        check_interval: float = 1.0,
    ) -> None:
        if not lock_timeout > 0 or not check_interval >= 0:
            raise ConfigError("SqlSellers: lock_timeout must be > 0 and check_interval >= 0")
        self.db = db
        self.location = location
        self.lock_timeout = float(lock_timeout)
        self.check_interval = float(check_interval)
        self._client_id = client_id
        self._stores: dict[str, SqlSellerStore] = {}
        self._stores_lock = threading.Lock()
        #: What this process's sellers ask whether a peer committed (:mod:`.sql_feed`).
        self.feed = SqlFeed(
            db,
            location,
            self.check_interval,
            self._stores,  # only the sellers this process holds are kept
            client_id=lambda: self.client_id,
            valid=_is_version,
        )

    @classmethod
    def sqlite(cls, path: str | os.PathLike[str], **options: Any) -> SqlSellers:
        """Sellers in the SQLite database at ``path`` (made, 0600, if missing)."""
        where = os.path.abspath(os.fspath(path))
        return cls(Database(sql_db.sqlite(where), where), where, **options)

    @classmethod
    def postgresql(cls, url: str, **options: Any) -> SqlSellers:
        """Sellers in the PostgreSQL database ``url`` names (``postgresql://`` or
        ``postgres://``); needs psycopg 3 (``pip install 'mlauth[postgresql]'``)."""
        shown = redact_url(url) if isinstance(url, str) else type(url).__name__
        if not isinstance(url, str) or url_scheme(url) not in ("postgresql", "postgres"):
            raise ConfigError(f"{shown!r} is not a PostgreSQL URL; write postgresql://USER@HOST/DB")
        return cls(Database(sql_db.postgresql(url), shown), shown, **options)

    @property
    def client_id(self) -> str:
        if not self._client_id:
            raise ConfigError(
                f"{self!r} has no client id: pass client_id=, or call bind_client(ML_CLIENT_ID)"
            )
        return self._client_id

    def bind_client(self, client_id: str) -> None:
        if self._client_id and self._client_id != client_id:
            raise ConfigError(
                f"{self.location} is bound to app {self._client_id}, not {client_id}: give "
                "each app its own SqlSellers"
            )
        self._client_id = client_id

    def sellers(self) -> list[str]:
        rows, _ = self.db.run(
            "SELECT user_id FROM mlauth_sellers WHERE client_id = ?", (self.client_id,), "read"
        )
        held = [row[0] for row in rows if isinstance(row[0], str) and USER_ID.match(row[0])]
        return sorted(held, key=lambda user_id: (len(user_id), user_id))

    def _made(self, user_id: str) -> SqlSellerStore:
        with self._stores_lock:
            store = self._stores.get(user_id)
        if store is not None:
            return store
        self.feed.start()  # before the store reads its row: no later change is missed
        with self._stores_lock:
            store = self._stores.get(user_id)
            if store is None:
                store = self._stores[user_id] = SqlSellerStore(self, user_id)
            return store

    def store(self, user_id: str) -> TokenStore:
        user_id = check_user_id(user_id, self.location)
        with self._stores_lock:
            cached = self._stores.get(user_id)
        if cached is not None:
            return cached
        rows, _ = self.db.run(
            "SELECT 1 FROM mlauth_sellers WHERE client_id = ? AND user_id = ?",
            (self.client_id, user_id),
            "read",
        )
        if not rows:
            held = self.sellers()
            shown = ", ".join(held[:_SHOWN]) + (
                f" and {len(held) - _SHOWN} more" if len(held) > _SHOWN else ""
            )
            raise ConfigError(
                f"{self.location} holds no seller {user_id} for app {self.client_id}; it holds "
                + (f"{len(held)}: {shown}" if held else "none yet")
                + f". Add it with `mlauth login --seller {user_id}` or `mlauth sellers add`."
            )
        return self._made(user_id)

    def add(self, user_id: str, tokens: TokenSet, *, replace: bool = False) -> TokenStore:
        user_id = check_user_id(user_id, self.location)
        store = self._made(user_id)
        check_seller(store, tokens)
        with store.lock(self.lock_timeout):
            try:
                store.seed(tokens, replace=replace)
            except StaleCommitError:
                raise ConfigError(
                    f"{self.location} holds seller {user_id} already; replace its chain with "
                    "replace=True (`mlauth login` does), or remove it first "
                    "(`mlauth sellers remove`)"
                ) from None
            if replace:
                store.clear_reauthorization()
        return store

    def remove(self, user_id: str, *, held: bool = False) -> bool:
        user_id = check_user_id(user_id, self.location)
        store = self._made(user_id)
        with contextlib.nullcontext() if held else store.lock(self.lock_timeout):
            # For the change feed of every process that holds the seller (.sql_feed); first,
            # so that a removal cut short is still told (a row found there wins over it).
            self.db.run(
                "INSERT INTO mlauth_removals (client_id, user_id, removed_at) "
                "VALUES (?, ?, {now}) ON CONFLICT (client_id, user_id) "
                "DO UPDATE SET removed_at = excluded.removed_at",
                (self.client_id, user_id),
                "remove from",
            )
            _, count = self.db.run(
                "DELETE FROM mlauth_sellers WHERE client_id = ? AND user_id = ?",
                (self.client_id, user_id),
                "remove from",
            )
            self.db.run(
                "DELETE FROM mlauth_incidents WHERE client_id = ? AND user_id = ?",
                (self.client_id, user_id),
                "remove from",
            )
        with self._stores_lock:
            self._stores.pop(user_id, None)
        self.feed.forget(user_id)
        return count == 1

    @sealed  # the rows' tokens are read to mask them in refreshed_by
    def rows(self, user_ids: Sequence[str] | None = None) -> list[SellerRow]:
        text = (
            "SELECT user_id, access_token, refresh_token, expires_at, refreshed_at, "
            "refreshed_by, dead, failing_since, failing_reason FROM mlauth_sellers "
            "WHERE client_id = ?"
        )
        wanted = None if user_ids is None else {check_user_id(u, self.location) for u in user_ids}
        params: list[object] = [self.client_id]
        if wanted is not None and len(wanted) <= 500:
            text += f" AND user_id IN ({', '.join('?' * len(wanted))})" if wanted else " AND 0 = 1"
            params += sorted(wanted)
        found, _ = self.db.run(text, params, "read")
        out = [
            self._row(row)
            for row in found
            if isinstance(row[0], str)
            and USER_ID.match(row[0])
            and (wanted is None or row[0] in wanted)
        ]
        return sorted(out, key=lambda row: (len(row.user_id), row.user_id))

    def _row(self, row: Sequence[object]) -> SellerRow:
        user_id = str(row[0])
        store = SqlSellerStore(self, user_id)  # not cached: only for its checks and words
        try:
            tokens = store._tokens(row[1:6])
        except StoreError as exc:
            return SellerRow(user_id, None, None, None, FAILING, str(exc))
        dead, since, reason = row[6:9]
        message = store.dead_message(dead, tokens.refresh_token)
        if message is not None:
            state, detail = REAUTHORIZE, message
        elif tokens.refresh_token is None:
            state, detail = REAUTHORIZE, "no refresh token"
        elif _number(since):
            state, detail = FAILING, f"since {_when(since)}: {_text(reason)}"
        else:
            state, detail = OK, None
        return SellerRow(
            user_id, tokens.expires_at, tokens.refreshed_at, tokens.refreshed_by, state, detail
        )

    def close(self) -> None:
        self.db.close()
