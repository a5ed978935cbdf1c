"""The SQL store of many sellers under test: which database (a SQLite file, or a PostgreSQL
database), another "process" on it (a second :class:`SqlSellers`), sellers seeded from the
fake, rows written behind mlauth's back, and worker processes (scripts/sql_worker.py) that
can be frozen at a phase of a refresh and killed."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mlauth.secret import Secret
from mlauth.stores.sql import SqlSellers
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import TokenSet
from tests.support import SCRIPTS

SQL_WORKER = SCRIPTS / "sql_worker.py"


class Db:
    """One database the SQL store runs on: ``kind`` "sqlite" (``spec`` a file's path) or
    "postgresql" (``spec`` its URL)."""

    def __init__(self, kind: str, spec: str) -> None:
        self.kind = kind
        self.spec = spec

    def __repr__(self) -> str:
        return f"Db({self.kind})"

    def open(self, client_id: str | None, **options: Any) -> SqlSellers:
        """A new SqlSellers on it: what another process of the app would make."""
        if self.kind == "sqlite":
            return SqlSellers.sqlite(self.spec, client_id=client_id, **options)
        return SqlSellers.postgresql(self.spec, client_id=client_id, **options)

    def execute(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``statement`` (``?`` placeholders) behind mlauth's back, as a person would."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.spec, isolation_level=None) as connection:
                rows = connection.execute(statement, params).fetchall()
            connection.close()
            return rows
        import psycopg  # type: ignore[import-not-found,unused-ignore]

        with psycopg.connect(self.spec, autocommit=True) as connection:
            cursor = connection.execute(statement.replace("?", "%s"), params)
            return list(cursor.fetchall()) if cursor.description else []

    def row(self, user_id: str, *columns: str) -> tuple[Any, ...]:
        found = self.execute(
            f"SELECT {', '.join(columns)} FROM mlauth_sellers WHERE user_id = ?",  # noqa: S608
            (user_id,),
        )
        assert len(found) == 1, found
        return tuple(found[0])

    def edit(self, user_id: str, column: str, value: object) -> bool:
        """Write ``value`` into a column of a seller's row; False when the database refuses
        it (PostgreSQL's columns are typed: no text in a number, no bytes in a text)."""
        statement = f"UPDATE mlauth_sellers SET {column} = ? WHERE user_id = ?"  # noqa: S608
        if self.kind == "sqlite":
            try:
                self.execute(statement, (value, user_id))
            except sqlite3.IntegrityError:
                return False  # NULL where it is NOT NULL
            return True
        import psycopg  # type: ignore[import-not-found,unused-ignore]

        try:
            self.execute(statement, (value, user_id))
        except (psycopg.DataError, psycopg.ProgrammingError, psycopg.IntegrityError):
            return False  # a type the column cannot hold, or NULL where it is NOT NULL
        return True


def tokens_of(issued: dict[str, object], *, expires_at: float | None = None) -> TokenSet:
    """What the fake issued, as the TokenSet a seller is added with."""
    return TokenSet(
        Secret(str(issued["access_token"])),
        Secret(str(issued["refresh_token"])),
        expires_at=expires_at,
    )


def seed(
    sellers: SqlSellers, fake: FakeMercadoLibre, user_id: int, *, expires_at: float | None = None
) -> dict[str, object]:
    """Add seller ``user_id`` with a chain the fake just issued; returns the tokens."""
    issued = fake.issue_tokens(user_id=user_id)
    when = time.time() + 3600 if expires_at is None else expires_at
    sellers.add(str(user_id), tokens_of(issued, expires_at=when))
    return issued


def start_worker(
    db: Db,
    fake: FakeMercadoLibre,
    user_id: int,
    log: Path,
    *,
    threads: int = 1,
    requests: int = 1,
    phase: str | None = None,
    go: Path | None = None,
    lock_timeout: float = 20.0,
    lease: float = 600.0,
) -> subprocess.Popen[str]:
    """A process making ``requests`` API calls per thread as seller ``user_id``; frozen at
    ``phase`` (it then creates ``log`` with the suffix ``.paused`` and waits to be killed);
    with ``go``, its threads start together once that file exists.

    ``lease`` is the store's lease (long: a holder that died here must be taken over at
    once, not after it lapses) and ``lock_timeout`` how long a request waits for it: a
    peer that could not take over a dead holder's lease fails instead of passing late."""
    environ = dict(os.environ)
    if phase is not None:
        environ["MLAUTH_TEST_PAUSE_AT"] = phase
        environ["MLAUTH_TEST_PAUSE_MARKER"] = str(log.with_suffix(".paused"))
    config = {
        "kind": db.kind,
        "spec": db.spec,
        "user_id": str(user_id),
        "base_url": fake.base_url,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "threads": threads,
        "requests": requests,
        "go": str(go) if go else None,
        "lock_timeout": lock_timeout,
        "lease": lease,
    }
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, str(SQL_WORKER), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=environ,
        )


def finished(proc: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# -- a fork pool on one seller --------------------------------------------------------------

# Built in the parent before a fork pool starts, and used there first: what a pipeline's
# module-level set-up does before a Pool or a prefork server forks its workers.
_POOL_AUTH: list[Any] = []


def build_before_fork(sellers: SqlSellers, fake: FakeMercadoLibre, user_id: int) -> Any:
    import mlauth

    auth = mlauth.MLAuth(
        fake.client_id,
        fake.client_secret,
        store=sellers.store(str(user_id)),
        token_url=fake.token_url,
        hosts=[fake.host],
        backoff=0.01,
    )
    _POOL_AUTH[:] = [auth]
    return auth


def pool_calls(url: str, seconds: float) -> dict[str, Any]:
    """A fork pool worker's calls through the auth its parent built, until the deadline."""
    import requests

    (auth,) = _POOL_AUTH
    statuses: dict[int, int] = {}
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < deadline:
            try:
                status = session.get(f"{url}/users/me", auth=auth, timeout=30).status_code
                statuses[status] = statuses.get(status, 0) + 1
            except requests.RequestException as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"pid": os.getpid(), "statuses": statuses, "errors": errors[:5]}
