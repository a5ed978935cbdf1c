"""What an event loop and the rest of the app can count on from HttpxAuth.

- one trip to a worker thread per loop and auth, however many tasks need a token: anyio's
  thread pool is shared with the app, and a refresh must not fill it;
- a store is asked for its stamp on the loop only when it has it at hand, decided in one call
  (the Redis check interval can end between two);
- only MLAuthErrors leave a request, even when the adapter's own steps fail;
- errors cross process boundaries (pickle) as the plain mlauth error, without the request.
"""

from __future__ import annotations

import copy
import fcntl
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import requests

from mlauth import InvalidGrantError, LockTimeoutError, MLAuthError, UnexpectedError
from mlauth.httpx import HttpxAuth
from mlauth.integrations.httpx_auth import _as_http_error, _hops
from mlauth.secret import Secret
from mlauth.stores.base import NOT_LOCAL, TokenStore
from mlauth.stores.envfile import EnvFileStore
from mlauth.stores.redis import RedisStore
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.httpx_calls import wait_until

DEADLINE = 60.0
BACKENDS = ["asyncio", "trio"]


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call sent to anyio's worker threads: the adapter's trips and any other."""
    sent: list[str] = []
    real = anyio.to_thread.run_sync

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        sent.append(threading.current_thread().name)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    return sent


@pytest.mark.parametrize("backend", BACKENDS)
def test_thirty_tasks_waiting_for_a_refresh_make_one_trip_and_leave_the_pool_free(
    fake_ml: FakeMercadoLibre, tmp_path: Path, backend: str, trips: list[str]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    fake_ml.token_delay = 2.0  # the POST is in flight long enough to look at the pool
    auth = HttpxAuth.from_env(env)
    statuses: list[int] = []
    seen: dict[str, bool] = {}

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth, timeout=DEADLINE) as client:

            async def call() -> None:
                statuses.append((await client.get(f"{fake_ml.base_url}/users/me")).status_code)

            # A pool smaller than the tasks, so that one thread per waiting task would fill it.
            anyio.to_thread.current_default_thread_limiter().total_tokens = 5
            async with anyio.create_task_group() as group:
                for _ in range(30):
                    group.start_soon(call)
                await wait_until(fake_ml.token_requests_in_flight.is_set, "the token POST")
                # The app's own work in a worker thread is not queued behind the refresh.
                await anyio.to_thread.run_sync(lambda: None)
                seen["pool_free_during_the_post"] = fake_ml.token_requests_in_flight.is_set()

    anyio.run(main, backend=backend)
    assert statuses == [200] * 30
    assert fake_ml.stats()["refreshes"] == 1
    assert seen["pool_free_during_the_post"] is True
    assert len(trips) == 2  # the adapter's one trip, and the app's own call


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cancelled_trip_is_followed_by_one_more_not_one_per_waiter(
    fake_ml: FakeMercadoLibre, tmp_path: Path, backend: str, trips: list[str]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    fake_ml.token_delay = 2.0
    auth = HttpxAuth.from_env(env)
    statuses: list[int] = []

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth, timeout=DEADLINE) as client:

            async def call() -> None:
                statuses.append((await client.get(f"{fake_ml.base_url}/users/me")).status_code)

            async with anyio.create_task_group() as group:
                victim = anyio.CancelScope()

                async def cancelled_call() -> None:
                    with victim:
                        await call()

                group.start_soon(cancelled_call)  # it makes the trip: the POST is its
                await wait_until(fake_ml.token_requests_in_flight.is_set, "the token POST")
                for _ in range(20):
                    group.start_soon(call)
                turn = _hops(auth._engine).lock
                await wait_until(lambda: turn.statistics().tasks_waiting == 20, "20 waiting")
                victim.cancel()

    anyio.run(main, backend=backend)
    assert statuses == [200] * 20
    assert fake_ml.stats()["refreshes"] == 1
    # The victim's trip, and one more by the waiter next in turn; the others take its answer.
    assert len(trips) == 2


def test_a_redis_stamp_is_never_fetched_by_local_stamp(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, check_interval=0.05)
    store.bind_client("1234567890123456")
    asked: list[str] = []
    probe = store._probe
    real = probe.hmget

    def hmget(*args: Any, **kwargs: Any) -> Any:
        asked.append(threading.current_thread().name)
        return real(*args, **kwargs)

    probe.hmget = hmget  # type: ignore[method-assign]
    store.stamp()  # a look at Redis: known for check_interval
    assert asked and store.local_stamp() is not NOT_LOCAL
    looks = len(asked)
    deadline = time.monotonic() + DEADLINE
    while store.local_stamp() is not NOT_LOCAL:  # a poll on the store's own clock
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(50):  # once the interval is over, only stamp() looks, never local_stamp()
        assert store.local_stamp() is NOT_LOCAL
    assert len(asked) == looks
    store.stamp()
    assert len(asked) == looks + 1


class RemoteStampStore(EnvFileStore):
    """A custom store as one written before local_stamp() existed: the contract's default."""

    local_stamp = TokenStore.local_stamp


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_custom_store_is_asked_for_its_stamp_off_the_loop_only(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path, backend: str, trips: list[str]
) -> None:
    store = RemoteStampStore(fake_ml_env)
    auth = HttpxAuth.from_env(fake_ml_env, store=store)
    assert auth._engine.fresh_token() is None  # the default fails closed

    async def main() -> list[int]:
        async with httpx.AsyncClient(auth=auth) as client:
            return [(await client.get(f"{fake_ml.base_url}/users/me")).status_code]

    assert anyio.run(main, backend=backend) == [200]
    assert len(trips) == 1


def test_an_httpx_error_pickles_as_the_plain_mlauth_error_without_the_request(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)  # the request refreshes first
    fake_ml.revoke_refresh_tokens()
    auth = HttpxAuth.from_env(env, max_attempts=1)
    with pytest.raises(InvalidGrantError) as caught, httpx.Client(auth=auth) as client:
        client.get(f"{fake_ml.base_url}/users/me")
    error = caught.value
    assert isinstance(error, httpx.HTTPError)
    assert error.request.url.path == "/users/me"  # the API request, not the token POST
    data = pickle.dumps(error)
    assert b"Bearer" not in data and b"APP_USR" not in data
    copy = pickle.loads(data)  # noqa: S301 (our own bytes)
    assert type(copy) is InvalidGrantError and not isinstance(copy, httpx.HTTPError)
    assert (str(copy), copy.status_code, copy.error) == (str(error), 400, "invalid_grant")


def test_every_mlauth_error_pickles_with_its_fields() -> None:
    error = LockTimeoutError("the lock is busy", lock_path="/tmp/x.lock")
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)
    assert type(copy) is LockTimeoutError
    assert (str(copy), copy.lock_path) == ("the lock is busy", "/tmp/x.lock")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_thread_that_cannot_start_is_an_mlauth_error(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)  # the request needs a trip
    auth = HttpxAuth.from_env(env)

    async def no_threads(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth) as client:
            await client.get(f"{fake_ml.base_url}/users/me")

    with pytest.raises(UnexpectedError) as caught:
        anyio.run(main, backend=backend)
    assert isinstance(caught.value, httpx.HTTPError)
    assert isinstance(caught.value, requests.RequestException)
    assert type(caught.value.__cause__) is RuntimeError
    assert "can't start new thread" in str(caught.value)


class Pretender:
    """A body that looks like a file and fails like no file should."""

    def __iter__(self) -> Iterator[bytes]:
        return iter([b"x"])

    def read(self, size: int = -1) -> bytes:
        return b""

    def seekable(self) -> bool:
        return True

    def __init__(self) -> None:
        self.tells = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        self.tells += 1
        if self.tells > 1:  # httpx's own look at the length goes first, and works
            raise TypeError("tell() of a pretender")
        return 0


def test_a_body_whose_tell_fails_oddly_is_an_mlauth_error(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    auth = HttpxAuth.from_env(fake_ml_env)
    with pytest.raises(MLAuthError) as caught, httpx.Client(auth=auth) as client:
        client.post(f"{fake_ml.base_url}/items", content=Pretender())  # type: ignore[arg-type]
    assert isinstance(caught.value, UnexpectedError)
    assert isinstance(caught.value, httpx.HTTPError)
    assert type(caught.value.__cause__) is TypeError


@pytest.mark.parametrize("backend", BACKENDS)
def test_tasks_queued_behind_a_failed_trip_get_its_error_without_waiting_again(
    fake_ml: FakeMercadoLibre, tmp_path: Path, backend: str, trips: list[str]
) -> None:
    """A stuck peer holds the refresh lock: the first trip waits out its timeout; the tasks
    queued behind it raise the same error at once, not one timeout after another."""
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    auth = HttpxAuth.from_env(env, lock_timeout=0.5)
    peer = os.open(tmp_path / ".env.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(peer, fcntl.LOCK_EX)  # another open file: flock excludes it like a process
    errors: list[BaseException] = []

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth) as client:

            async def call() -> None:
                try:
                    await client.get(f"{fake_ml.base_url}/users/me")
                except LockTimeoutError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(call)

    try:
        anyio.run(main, backend=backend)
    finally:
        os.close(peer)
    assert len(errors) == 4
    assert len({id(error) for error in errors}) == 4  # each task its own copy
    assert all(isinstance(error, httpx.HTTPError) for error in errors)
    assert len(trips) == 1  # one wait for the lock, not four in a row
    assert fake_ml.stats()["token_requests"] == 0


class RemoteStamp(EnvFileStore):
    local_stamp = TokenStore.local_stamp


def test_a_task_queued_behind_a_401_trip_takes_its_new_token(tmp_path: Path) -> None:
    """A's trip brings T1; D, queued next, finds T1 dead (a 401) and brings T2; B, queued
    behind both while A's trip ran, must take T2, not A's T1."""
    env = tmp_path / ".env"
    with FakeMercadoLibre() as fake:
        fake.write_env(env)
        auth = HttpxAuth.from_env(env, store=RemoteStamp(env))  # every token needs a trip
    engine = auth._engine
    release = threading.Event()
    old, new = Secret("T1-old"), Secret("T2-new")
    current = [old]

    def token_for_request() -> Secret:
        release.wait(DEADLINE)
        return current[0]

    def after_401(failed: Secret) -> Secret:
        current[0] = new
        return new

    engine.token_for_request = token_for_request  # type: ignore[method-assign]
    engine.after_401 = after_401  # type: ignore[method-assign]
    got: dict[str, Secret | None] = {}

    async def main() -> None:
        turn = _hops(engine).lock

        async def a() -> None:
            got["A"] = await auth._token_off_loop()

        async def d() -> None:
            got["D"] = await auth._after_401_off_loop(old)

        async def b() -> None:
            got["B"] = await auth._token_off_loop()

        async with anyio.create_task_group() as group:
            group.start_soon(a)
            await wait_until(turn.locked, "A's trip")
            group.start_soon(d)
            await wait_until(lambda: turn.statistics().tasks_waiting == 1, "D queued")
            group.start_soon(b)
            await wait_until(lambda: turn.statistics().tasks_waiting == 2, "B queued")
            release.set()

    anyio.run(main)
    assert (got["A"], got["D"], got["B"]) == (old, new, new)


def test_a_copy_of_an_httpx_error_keeps_its_class_and_request() -> None:
    request = httpx.Request("GET", "https://api.mercadolibre.com/users/me")
    auth_error = InvalidGrantError("the refresh token is dead", status_code=400)
    flavoured = _as_http_error(auth_error, request)
    for copied in (copy.copy(flavoured), copy.deepcopy(flavoured)):
        assert type(copied) is type(flavoured) and isinstance(copied, httpx.HTTPError)
        assert copied.request is request and copied.status_code == 400
