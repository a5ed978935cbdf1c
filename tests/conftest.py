"""Shared fixtures: a fake .env with obviously fake credentials, an MLAuth built on it, a Redis
server, and another loopback host to redirect to."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mlauth
from mlauth.testing.redis_server import RedisServer

TOKEN_URL = "https://api.mercadolibre.com/oauth/token"
API = "https://api.mercadolibre.com"
CLIENT_ID = "1234567890123456"
CLIENT_SECRET = "fake-secret-for-tests-only"
ACCESS_1 = "APP_USR-1234567890123456-010101-fakeaccess0000000000000000000001-8035443"
REFRESH_1 = "TG-fakerefresh000000000000001-8035443"
ACCESS_2 = "APP_USR-1234567890123456-010101-fakeaccess0000000000000000000002-8035443"
REFRESH_2 = "TG-fakerefresh000000000000002-8035443"


def env_text(**overrides: str | None) -> str:
    values: dict[str, str | None] = {
        "ML_CLIENT_ID": CLIENT_ID,
        "ML_CLIENT_SECRET": CLIENT_SECRET,
        "ML_ACCESS_TOKEN": ACCESS_1,
        "ML_REFRESH_TOKEN": REFRESH_1,
        "ML_TOKEN_EXPIRES_AT": str(int(time.time()) + 6 * 3600),
    }
    values.update(overrides)
    body = "".join(f"{k}={v}\n" for k, v in values.items() if v is not None)
    return "# pipeline settings\nOTHER_SETTING=keep me\n" + body


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


def token_answer(
    access: str = ACCESS_2, refresh: str | None = REFRESH_2, **extra: object
) -> dict[str, object]:
    answer: dict[str, object] = {
        "access_token": access,
        "token_type": "bearer",
        "expires_in": 21600,
        "scope": "offline_access read write",
        "user_id": 8035443,
    }
    if refresh is not None:
        answer["refresh_token"] = refresh
    answer.update(extra)
    return answer


def run_threads(target: Callable[[], None], count: int) -> None:
    """Run ``target`` in ``count`` threads at once and wait for all of them."""
    workers = [threading.Thread(target=target) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


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


def refresh_turn_is_free(auth: mlauth.MLAuth, within: float = 20.0) -> bool:
    """Whether another thread can take the auth's refresh turn now (its in-process lock and
    the store's lock), seen from outside: a ``refresh(force=False)`` of a token refreshed
    moments ago takes both and spends nothing. False if it did not finish ``within`` seconds.
    """
    done: list[mlauth.TokenSet] = []
    thread = threading.Thread(target=lambda: done.append(auth.refresh(force=False)), daemon=True)
    thread.start()
    thread.join(within)
    return bool(done)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Another host: records the Authorization header it gets and answers 401."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.seen.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        body = b'{"message":"invalid_token","status":401}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_host() -> Iterator[tuple[str, list[str | None]]]:
    """Another origin on loopback (127.0.0.2): its URL, and the Authorization headers it got.

    requests and httpx both strip the header on a redirect to it; it answers 401.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}", server.seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
