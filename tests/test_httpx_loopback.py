"""HttpxAuth against the real loopback FakeMercadoLibre (the pytest plugin's fixtures):
bodies re-sent after a 401, streams that cannot be, redirects, trio, and concurrent tasks."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio

from mlauth.httpx import HttpxAuth
from mlauth.stores.envfile import read_env_file, update_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.httpx_calls import MODES, Hop, Mode, request

DEAD_ACCESS = "APP_USR-1234-010101-deadbeef-8035443"
PAYLOAD = b"line one\nline two \xe2\x9c\x93\n" * 50


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Mode:
    value: Mode = request.param
    return value


@pytest.fixture
def stale_env(fake_ml: FakeMercadoLibre, fake_ml_env: Path) -> Path:
    """A .env whose access token the server no longer accepts; its refresh token is live."""
    update_env_file(fake_ml_env, {"ML_ACCESS_TOKEN": DEAD_ACCESS})
    return fake_ml_env


@pytest.fixture
def auth(stale_env: Path) -> HttpxAuth:
    return HttpxAuth.from_env(stale_env)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_resent_once(
    response: httpx.Response, fake: FakeMercadoLibre, hops: list[Hop]
) -> dict[str, Any]:
    """One 401, one refresh, and the re-send carried the same body headers as the first try."""
    assert response.status_code == 200, response.text
    assert [r.status_code for r in response.history] == [401]
    assert fake.stats()["refreshes"] == 1
    first, second = hops
    assert first.authorization == f"Bearer {DEAD_ACCESS}"
    assert second.authorization not in (None, first.authorization)
    assert first.content_length == second.content_length
    assert first.content_type == second.content_type
    echo: dict[str, Any] = response.json()
    assert echo["body_length"] == int(second.content_length or 0)
    assert echo["content_type"] == second.content_type
    return echo


def rendered(response: httpx.Response) -> bytes:
    """The body the request's stream renders now (a multipart body keeps its boundary)."""
    return b"".join(response.request.stream)  # type: ignore[arg-type]


# -- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"content": PAYLOAD}, PAYLOAD),
        ({"content": PAYLOAD.decode()}, PAYLOAD),
        ({"json": {"title": "Mate ✓", "price": 10}}, None),
        ({"data": {"a": "1", "b": "two words"}}, b"a=1&b=two+words"),
        ({"files": {"picture": ("p.jpg", PAYLOAD, "image/jpeg")}, "data": {"x": "1"}}, None),
    ],
    ids=["bytes", "str", "json", "form", "multipart"],
)
def test_in_memory_bodies_are_resent_identical(
    mode: Mode,
    auth: HttpxAuth,
    fake_ml: FakeMercadoLibre,
    kwargs: dict[str, Any],
    expected: bytes | None,
) -> None:
    hops: list[Hop] = []
    response = request(mode, auth, "POST", f"{fake_ml.base_url}/items", hops=hops, **kwargs)
    echo = assert_resent_once(response, fake_ml, hops)
    body = rendered(response)
    assert echo["body_sha256"] == sha(expected if expected is not None else body)
    assert echo["body_length"] == len(body) > 0


def test_multipart_with_an_open_file_is_resent_identical(
    mode: Mode, auth: HttpxAuth, fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    path = tmp_path / "picture.jpg"
    path.write_bytes(PAYLOAD)
    hops: list[Hop] = []
    with path.open("rb") as handle:
        files = {"picture": ("p.jpg", handle, "image/jpeg")}
        response = request(mode, auth, "POST", f"{fake_ml.base_url}/items", hops=hops, files=files)
        body = rendered(response)
    echo = assert_resent_once(response, fake_ml, hops)
    assert PAYLOAD in body
    assert echo["body_sha256"] == sha(body)


@pytest.mark.parametrize("kind", ["file", "bytesio"])
def test_a_seekable_content_stream_is_rewound(
    auth: HttpxAuth, fake_ml: FakeMercadoLibre, tmp_path: Path, kind: str
) -> None:
    # httpx.Client only: AsyncClient refuses a sync stream. Without the rewind the re-send
    # would declare the length and send nothing.
    path = tmp_path / "upload.bin"
    path.write_bytes(PAYLOAD)
    hops: list[Hop] = []
    with path.open("rb") if kind == "file" else io.BytesIO(PAYLOAD) as handle:
        response = request(
            "sync", auth, "PUT", f"{fake_ml.base_url}/items/1", hops=hops, content=handle
        )
    echo = assert_resent_once(response, fake_ml, hops)
    assert echo["body_sha256"] == sha(PAYLOAD)
    assert echo["body_length"] == len(PAYLOAD)


def sync_chunks() -> Iterator[bytes]:
    yield b"part one, "
    yield b"part two"


async def async_chunks() -> AsyncIterator[bytes]:
    yield b"part one, "
    yield b"part two"


def test_a_generator_body_is_never_resent_and_the_token_is_refreshed(
    mode: Mode,
    auth: HttpxAuth,
    fake_ml: FakeMercadoLibre,
    stale_env: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chunks = sync_chunks if mode == "sync" else async_chunks
    before = read_env_file(stale_env)["ML_REFRESH_TOKEN"]
    url = f"{fake_ml.base_url}/items"
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        response = request(mode, auth, "POST", url, content=chunks())
    # The 401 comes back as it is; the body went out once, never a second time empty.
    assert response.status_code == 401
    assert response.history == []
    assert fake_ml.stats()["api_calls"] == 1
    assert "got a 401 on POST /items" in caplog.text
    assert "the body cannot be sent again" in caplog.text
    # But the token was refreshed and saved: the next call just works.
    assert fake_ml.stats()["refreshes"] == 1
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] != before
    again = request(mode, auth, "POST", url, content=chunks())
    assert again.status_code == 200 and again.history == []
    assert again.json()["body_sha256"] == sha(b"part one, part two")
    assert fake_ml.stats()["refreshes"] == 1


def test_an_async_file_body_is_never_resent_empty(
    auth: HttpxAuth, fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An async file (anyio's, aiofiles') seeks and tells with coroutines: the auth flow
    # cannot rewind it, so it must not re-send it (it went out empty, answered 200).
    path = tmp_path / "upload.bin"
    path.write_bytes(PAYLOAD)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(auth=auth) as client, await anyio.open_file(path, "rb") as f:
            return await client.put(f"{fake_ml.base_url}/items/1", content=f)

    with caplog.at_level(logging.WARNING, logger="mlauth"):
        response = anyio.run(main)
    assert response.status_code == 401
    assert response.history == []
    assert fake_ml.stats()["api_calls"] == 1
    assert fake_ml.stats()["refreshes"] == 1
    assert "the body cannot be sent again" in caplog.text


def test_the_refresh_is_persisted_for_the_next_process(
    mode: Mode, auth: HttpxAuth, stale_env: Path, fake_ml: FakeMercadoLibre
) -> None:
    before = read_env_file(stale_env)
    response = request(mode, auth, "GET", f"{fake_ml.base_url}/users/me")
    assert response.status_code == 200
    after = read_env_file(stale_env)
    assert after["ML_REFRESH_TOKEN"] != before["ML_REFRESH_TOKEN"]
    assert fake_ml.is_live(after["ML_REFRESH_TOKEN"])
    fresh = request(mode, HttpxAuth.from_env(stale_env), "GET", f"{fake_ml.base_url}/users/me")
    assert fresh.status_code == 200 and fresh.history == []
    assert fake_ml.stats()["refreshes"] == 1


# -- redirects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("listed", [False, True], ids=["not-allowed", "allowed"])
def test_redirect_to_another_host_that_answers_401_gets_no_token_and_no_refresh(
    mode: Mode,
    fake_ml: FakeMercadoLibre,
    fake_ml_env: Path,
    other_host: tuple[str, list[str | None]],
    listed: bool,
) -> None:
    """Allowed or not, another origin's hop carries no token: httpx strips it, and we never
    put it back; so its 401 is not about our token, and nothing is refreshed."""
    other_url, seen = other_host
    hosts = [fake_ml.host, other_url.removeprefix("http://")] if listed else [fake_ml.host]
    auth = HttpxAuth.from_env(fake_ml_env, hosts=hosts)
    assert auth.handles(f"{other_url}/steal") is listed  # a request sent there would carry it
    hops: list[Hop] = []
    response = request(
        mode,
        auth,
        "GET",
        f"{fake_ml.base_url}/redirect?to={other_url}/steal",
        hops=hops,
        follow_redirects=True,
    )
    assert response.status_code == 401
    assert [r.status_code for r in response.history] == [302]
    assert hops[0].authorization is not None  # the API hop carried it; the next did not
    assert [hop.url.startswith(other_url) for hop in hops] == [False, True]
    assert seen == [None]
    assert fake_ml.stats()["token_requests"] == 0


@pytest.mark.parametrize("how", ["killed", "expired"])
def test_redirect_within_the_api_host_after_an_expiry_refreshes_once(
    mode: Mode, fake_ml: FakeMercadoLibre, stale_env: Path, how: str
) -> None:
    # killed: the server rejects the token (a 401 on the redirect's target); expired: the
    # .env says so and the token is refreshed before the first hop.
    if how == "expired":
        update_env_file(stale_env, {"ML_TOKEN_EXPIRES_AT": "1000"})
    target = f"{fake_ml.base_url}/users/me"
    response = request(
        mode,
        HttpxAuth.from_env(stale_env),
        "GET",
        f"{fake_ml.base_url}/redirect?to={target}",
        follow_redirects=True,
    )
    assert response.status_code == 200
    assert response.json()["path"] == "/users/me"
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["invalid_grant"] == 0
    assert fake_ml.stats()["api_401"] == (1 if how == "killed" else 0)


# -- event loops ---------------------------------------------------------------------------


def test_one_async_request_with_a_refresh_under_trio(
    auth: HttpxAuth, fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    before = read_env_file(stale_env)["ML_REFRESH_TOKEN"]

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(auth=auth) as client:
            return await client.post(f"{fake_ml.base_url}/items", json={"a": 1})

    response = trio.run(main)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert fake_ml.stats()["refreshes"] == 1
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] != before


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_fifty_concurrent_tasks_on_a_killed_token_refresh_once(
    auth: HttpxAuth, fake_ml: FakeMercadoLibre, backend: str
) -> None:
    statuses: list[int] = []

    async def one(client: httpx.AsyncClient, n: int) -> None:
        response = await client.get(f"{fake_ml.base_url}/items/{n}")
        statuses.append(response.status_code)

    async def main() -> None:
        async with (
            httpx.AsyncClient(auth=auth, timeout=30.0) as client,
            anyio.create_task_group() as tasks,
        ):
            for n in range(50):
                tasks.start_soon(one, client, n)

    anyio.run(main, backend=backend)
    assert statuses == [200] * 50
    stats = fake_ml.stats()
    assert stats["refreshes"] == 1
    assert stats["invalid_grant"] == 0
    assert 1 <= stats["api_401"] <= 50  # each task sent the dead token at most once
    assert stats["api_ok"] == 50


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cancelled_task_stops_waiting_and_the_refresh_is_still_saved(
    auth: HttpxAuth,
    fake_ml: FakeMercadoLibre,
    stale_env: Path,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The token POST is held at a gate: the task is cancelled while its refresh is in there.
    entered, gate = threading.Event(), threading.Event()
    endpoint = auth._engine._endpoint
    real_refresh = endpoint.refresh

    def gated_refresh(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert gate.wait(30)
        return real_refresh(*args, **kwargs)

    monkeypatch.setattr(endpoint, "refresh", gated_refresh)
    before = read_env_file(stale_env)["ML_REFRESH_TOKEN"]

    async def main() -> bool:
        async with httpx.AsyncClient(auth=auth) as client:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(client.get, f"{fake_ml.base_url}/users/me")
                    assert await anyio.to_thread.run_sync(entered.wait, 10)
                    scope.cancel()
            return scope.cancelled_caught

    try:
        assert anyio.run(main, backend=backend)
        # Back from the cancel while the refresh is still held at the gate: nobody waited.
        assert fake_ml.stats()["token_requests"] == 0
    finally:
        gate.set()
    deadline = time.monotonic() + 20
    while read_env_file(stale_env)["ML_REFRESH_TOKEN"] == before:
        assert time.monotonic() < deadline, "the abandoned refresh was never saved"
        time.sleep(0.01)
    assert fake_ml.stats()["refreshes"] == 1
    again = request("sync", HttpxAuth.from_env(stale_env), "GET", f"{fake_ml.base_url}/users/me")
    assert again.status_code == 200 and again.history == []
    assert fake_ml.stats()["refreshes"] == 1
