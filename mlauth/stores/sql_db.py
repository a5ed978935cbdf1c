"""The database under the SQL store of many sellers: its two dialects, its connections and
its tables.

One store class (:mod:`.sql`) speaks to SQLite and PostgreSQL alike; the statements differ in
a few words only, which a :class:`Dialect` holds: the placeholder, the name of a double, and
"now" in unix seconds (leases count on the database's clock, the one clock every machine on
a shared PostgreSQL agrees on). Upserts are written once: ``INSERT ... ON CONFLICT`` is the
same in both.

Drivers: the standard library's ``sqlite3``, and psycopg 3 (``pip install
'mlauth[postgresql]'``), imported only when a PostgreSQL URL is used. Plain DB-API drivers
rather than SQLAlchemy: mlauth runs a dozen fixed statements, and an app that already has
SQLAlchemy gains nothing from mlauth pulling it in for them.

Connections belong to a thread of a process: each thread gets its own (SQLite's are not
shared between threads, and a statement of one seller never queues behind another seller's
on a shared socket), and a child made by ``fork`` makes new ones. The parent's are left
alone there, never closed: closing an inherited PostgreSQL connection would end the
parent's session on the shared socket.

Every statement runs on its own (autocommit): the fence is in the ``WHERE`` of the one
statement that writes, so no transaction is ever held open, across a token POST or at all.
"""

from __future__ import annotations

import importlib
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from mlauth.errors import ConfigError, StoreError
from mlauth.secret import mask, quotes_url_secret

from .private import check_own_name, open_own

__all__ = ["SCHEMA_VERSION", "Database", "Dialect", "postgresql", "sqlite"]

log = logging.getLogger("mlauth")

#: The version of the tables below; a database made by a newer mlauth is refused.
SCHEMA_VERSION = 1

SELLERS = "mlauth_sellers"
LEASES = "mlauth_leases"
INCIDENTS = "mlauth_incidents"
REMOVALS = "mlauth_removals"
META = "mlauth_schema"

# Kept apart from the tokens: a lease is written and deleted at each refresh, and a waiter
# polls it; the tokens' row is written once per refresh, fenced.
_TABLES = (
    f"""CREATE TABLE IF NOT EXISTS {META} (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS {SELLERS} (
        client_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        chain TEXT NOT NULL,
        generation {{integer}} NOT NULL,
        access_token TEXT,
        refresh_token TEXT,
        expires_at {{real}},
        refreshed_at {{real}},
        refreshed_by TEXT,
        answer TEXT,
        dead TEXT,
        failing_since {{real}},
        failing_reason TEXT,
        changed_at {{real}},
        PRIMARY KEY (client_id, user_id))""",
    # The change feed (.sql_feed) reads the rows written since its last look, by this index.
    f"""CREATE INDEX IF NOT EXISTS {SELLERS}_changed ON {SELLERS} (client_id, changed_at)""",
    f"""CREATE TABLE IF NOT EXISTS {LEASES} (
        client_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        expires {{real}} NOT NULL,
        holder TEXT,
        host TEXT,
        pid INTEGER,
        PRIMARY KEY (client_id, user_id))""",
    f"""CREATE TABLE IF NOT EXISTS {INCIDENTS} (
        client_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (client_id, user_id, name))""",
    # When a seller was removed (its row is gone): for the change feed. One row per seller
    # ever removed, replaced if removed again.
    f"""CREATE TABLE IF NOT EXISTS {REMOVALS} (
        client_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        removed_at {{real}} NOT NULL,
        PRIMARY KEY (client_id, user_id))""",
)


class Dialect:
    """What differs between the two databases: a few words, and how to connect."""

    name: str
    #: SQL for the time now, in unix seconds (a float), on the database's clock
    now: str
    real: str
    integer: str
    placeholder = "?"
    #: The driver's error classes: each becomes a StoreError naming the database.
    errors: tuple[type[Exception], ...] = ()

    def sql(self, text: str) -> str:
        """``text`` with its ``?`` placeholders and ``{now}`` spelled for this database."""
        text = text.replace("{now}", self.now)
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def connect(self) -> Any:
        raise NotImplementedError

    def begin_schema(self, connection: Any) -> None:
        """Start the transaction that makes the tables, excluding peers doing the same."""
        raise NotImplementedError

    def broken(self, connection: Any) -> bool:
        """Whether ``connection`` can no longer be used (the server went away)."""
        return False

    def detail(self, exc: Exception) -> str:
        """The driver's words about ``exc``, fit for a message: the first line only (a
        PostgreSQL error's DETAIL quotes the failing row, tokens and all), token-shaped
        values masked."""
        lines = str(exc).strip().splitlines()
        return mask(lines[0] if lines else type(exc).__name__)


class _SQLite(Dialect):
    name = "SQLite"
    # julianday counts days since noon, 24 November 4714 BC; 2440587.5 is 1970-01-01.
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    real = "REAL"
    integer = "INTEGER"
    errors = (sqlite3.Error,)
    # Statements are a few microseconds each; one that finds the database written by a
    # peer waits this long for it before it fails (SQLite's busy handler).
    busy_ms = 10_000

    def __init__(self, path: str) -> None:
        self.path = path

    def connect(self) -> Any:
        check_files(self.path)
        connection = sqlite3.connect(
            # One thread uses it; another may close it (close()), which the check forbids.
            self.path,
            timeout=self.busy_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            # WAL: readers never wait for the writer, and a commit is one append. The mode is
            # kept in the file; synchronous=FULL fsyncs the log at every commit, so a
            # committed rotation survives a power cut, not only a kill.
            connection.execute(f"PRAGMA busy_timeout={self.busy_ms}")
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def begin_schema(self, connection: Any) -> None:
        connection.execute("BEGIN IMMEDIATE")


class _PostgreSQL(Dialect):
    name = "PostgreSQL"
    now = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
    real = "DOUBLE PRECISION"
    integer = "BIGINT"
    placeholder = "%s"

    def __init__(self, url: str, connect_timeout: float) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._psycopg: Any = None

    def driver(self) -> Any:
        if self._psycopg is None:
            try:
                # By name: the driver is an optional extra, and mypy need not have it.
                self._psycopg = importlib.import_module("psycopg")
            except ImportError:
                raise ConfigError(
                    "mlauth's PostgreSQL store needs psycopg 3: pip install 'mlauth[postgresql]'"
                ) from None
            self.errors = (self._psycopg.Error,)
        return self._psycopg

    def connect(self) -> Any:
        psycopg = self.driver()
        return psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name="mlauth",
        )

    def begin_schema(self, connection: Any) -> None:
        connection.execute("BEGIN")
        # CREATE TABLE IF NOT EXISTS is not safe against a peer doing the same at once
        # (a unique violation in the catalog): the first process makes them, the rest wait.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('mlauth_schema'))")

    def broken(self, connection: Any) -> bool:
        return bool(connection.closed or connection.broken)

    def detail(self, exc: Exception) -> str:
        text = super().detail(exc)
        if quotes_url_secret(str(exc), self.url):
            return "not shown: it quotes the URL's credentials"
        return text


def sqlite(path: str) -> Dialect:
    return _SQLite(path)


def postgresql(url: str, *, connect_timeout: float = 5.0) -> Dialect:
    dialect = _PostgreSQL(url, connect_timeout)
    dialect.driver()
    return dialect


def check_files(path: str) -> None:
    """StoreError if the database or its ``-wal``/``-shm`` is a planted link or another
    user's file; the database is made (0600) if it is missing.

    SQLite opens the files itself, by name, and cannot be handed a descriptor opened with
    ``O_NOFOLLOW``: so they are looked at before every connection is made (one per thread),
    and the database is created here, private, rather than by SQLite with the umask's mode.
    They are looked at by name and never opened once they exist: closing a descriptor of
    the file would drop the POSIX locks this process's other connections hold on it (SQLite's
    own locking, WAL's included), and a peer process could then write under their reads.
    """
    try:  # a new database: made here, private, and given as the rules say under root
        fd = open_own(path, os.O_RDWR | os.O_EXCL, "SQLite database", create=True)
    except FileExistsError:
        pass
    except StoreError:  # a planted link, another user's file: named as such (an OSError too)
        raise
    except OSError as exc:  # no such folder, or one this user may not write
        raise StoreError(
            f"cannot create the SQLite database {path} ({exc.strerror}): create its folder, "
            "or let this user write there, or point ML_TOKEN_STORE elsewhere"
        ) from None
    else:
        os.close(fd)  # a file this call made: no connection of this process has it open
    for name, what in (
        (path, "SQLite database"),
        (f"{path}-wal", "SQLite database's wal file"),
        (f"{path}-shm", "SQLite database's shm file"),
    ):
        info = check_own_name(name, what)
        if name == path and info is not None and info.st_mode & 0o077:
            # The rows hold live tokens: a file made loose (by hand, by a tool's umask) is
            # made private before mlauth writes any (SQLite gives -wal and -shm its mode).
            # By name: chmod follows a link swapped in since the look, but changes only a
            # file of this user's, and only to make it private.
            os.chmod(path, 0o600)


class _Held:
    """One thread's connection. Closed when the thread ends (CPython drops a thread's
    ``threading.local`` values then), so a server whose threads come and go leaves no
    connection behind; never closed in another process than the one that made it."""

    __slots__ = ("__weakref__", "connection", "pid")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pid = os.getpid()

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is None or self.pid != os.getpid():
            return
        try:
            connection.close()
        except Exception as exc:  # noqa: BLE001 (closing what is let go of)
            log.debug("closing a database connection: %s", exc)

    def __del__(self) -> None:
        self.close()


# Every Database of this process, so a forked child can set their connections aside.
_databases: weakref.WeakSet[Database] = weakref.WeakSet()
# A parent's connections, in a forked child: kept for ever, never used, closed or collected.
# Closing an inherited SQLite connection would close its descriptors, and with them every
# POSIX lock this process holds on the file, the child's own connection's included; an
# inherited PostgreSQL socket is the parent's session.
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    for database in list(_databases):
        _inherited.append((database._local, list(database._made)))
        database._local = threading.local()
        database._made = weakref.WeakSet()
        database._schema_pid = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class Database:
    """Connections to one database, one per thread of each process, and the statements run on
    them; every driver error is a StoreError naming the database (never its password)."""

    def __init__(self, dialect: Dialect, location: str) -> None:
        self.dialect = dialect
        self.location = location
        self._local = threading.local()
        self._made: weakref.WeakSet[_Held] = weakref.WeakSet()  # for close()
        self._schema_pid: int | None = None  # the process that made sure of the tables
        _databases.add(self)

    def __repr__(self) -> str:
        return f"Database({self.dialect.name}, {self.location!r})"

    def _connection(self) -> Any:
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None and held.connection is not None:
            if not self.dialect.broken(held.connection):
                return held.connection
            held.close()
        held = _Held(self.dialect.connect())
        self._local.held = held
        self._made.add(held)
        if self._schema_pid != os.getpid():
            self._ensure_schema(held.connection)
            self._schema_pid = os.getpid()
        return held.connection

    def _ensure_schema(self, connection: Any) -> None:
        dialect = self.dialect
        found = self._version(connection)
        if found is None:
            dialect.begin_schema(connection)
            try:
                for statement in _TABLES:
                    connection.execute(statement.format(real=dialect.real, integer=dialect.integer))
                connection.execute(
                    dialect.sql(
                        "INSERT INTO mlauth_schema (name, version) VALUES ('sellers', ?) "
                        "ON CONFLICT (name) DO NOTHING"
                    ),
                    (SCHEMA_VERSION,),
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            found = self._version(connection)
        if found != SCHEMA_VERSION:
            raise StoreError(
                f"{dialect.name} at {self.location} holds mlauth's tables at schema version "
                f"{found!r}, and this mlauth knows version {SCHEMA_VERSION}: it was made or "
                "changed by another version of mlauth. Upgrade mlauth to the newest version on "
                "every machine that uses it."
            )

    def _version(self, connection: Any) -> object:
        try:
            rows = connection.execute(
                "SELECT version FROM mlauth_schema WHERE name = 'sellers'"
            ).fetchall()
        except self.dialect.errors:
            return None  # no such table yet
        return rows[0][0] if rows else None

    def run(
        self, text: str, params: Sequence[object] = (), doing: str = "use"
    ) -> tuple[list[Any], int]:
        """Run one statement (``?`` placeholders, ``{now}``); its rows and its row count."""
        try:
            connection = self._connection()
            cursor = connection.execute(self.dialect.sql(text), tuple(params))
            rows = cursor.fetchall() if cursor.description is not None else []
            return rows, cursor.rowcount
        except self.dialect.errors as exc:
            raise self.failed(exc, doing) from None

    def failed(self, exc: Exception, doing: str) -> StoreError:
        held: _Held | None = getattr(self._local, "held", None)
        if (
            held is not None
            and held.connection is not None
            and self.dialect.broken(held.connection)
        ):
            held.close()  # the next statement connects again
        return StoreError(
            f"cannot {doing} {self.dialect.name} at {self.location} ({type(exc).__name__}: "
            f"{self.dialect.detail(exc)}). Check that the database is there and that "
            "ML_TOKEN_STORE names it."
        )

    def close(self) -> None:
        """Close this process's connections, every thread's (the next statement of any
        thread connects again)."""
        for held in list(self._made):
            held.close()
