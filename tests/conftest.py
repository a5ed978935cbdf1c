"""Shared fixtures (only fixtures: the helpers tests share are in tests/support/): a fake .env
with obviously fake credentials, an MLAuth built on it, a Redis server, a PostgreSQL server
(one per session, a fresh database per test), the database of the SQL sellers store (SQLite
and PostgreSQL), and another loopback host to redirect to."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mlauth
from mlauth import alerts
from mlauth.testing.postgres_server import PostgresServer
from mlauth.testing.redis_server import RedisServer
from tests.support.fake_tokens import env_text
from tests.support.other_host import AuthorizationRecorder
from tests.support.sql_sellers import Db


@pytest.fixture(autouse=True)
def _no_alert_outlives_its_test() -> Iterator[None]:
    """The alert a test's .env set up (mlauth.alerts.watch, made by the auth itself) ends with
    the test: a command's subscriber the test added goes, and so do the chains the test
    added to one that was there; subscriptions a test makes itself, it cancels itself."""
    before = {
        command: (set(watching.chains), set(watching.stores))
        for command, watching in alerts._watching.items()
    }
    yield
    with alerts._watching_lock:
        for command, watching in list(alerts._watching.items()):
            if command not in before:
                watching.subscription.cancel()
                del alerts._watching[command]
                continue
            chains, stores = before[command]
            for chain in set(watching.chains) - chains:
                del watching.chains[chain]
            for store in set(watching.stores) - stores:
                del watching.stores[store]


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    path.write_text(env_text())
    path.chmod(0o600)
    return path


@pytest.fixture
def make_auth(env_file: Path) -> Callable[..., mlauth.MLAuth]:
    def make(**kwargs: object) -> mlauth.MLAuth:
        kwargs.setdefault("backoff", 0.001)
        return mlauth.MLAuth.from_env(env_file, **kwargs)

    return make


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, without persistence (a restart loses all)."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server that fsyncs every write to its append-only file."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder, persistent=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (about 1 s to make and start), on a free
    loopback port and a unix socket in a folder of its own; tests take a fresh database each
    (``postgres_url``). Stopped at the end of the session (and at exit, if the session dies)."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new, empty database on the session's server, for this test alone (its URL); dropped
    after the test, whoever is still connected to it."""
    with postgres_server.fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    """The database the SQL store of many sellers runs on: a SQLite file in the test's
    folder, or a fresh PostgreSQL database on the session's server."""
    if request.param == "sqlite":
        return Db("sqlite", str(tmp_path / "sellers.db"))
    return Db("postgresql", request.getfixturevalue("postgres_url"))


@pytest.fixture
def other_host() -> Iterator[tuple[str, list[str | None]]]:
    """Another origin on loopback (127.0.0.2): its URL, and the Authorization headers it got.

    requests and httpx both strip the header on a redirect to it; it answers 401.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), AuthorizationRecorder)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}", server.seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
