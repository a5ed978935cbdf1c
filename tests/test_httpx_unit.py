"""HttpxAuth, one request's shape (httpx.MockTransport; the token POST through requests-mock):
headers, host rules, 401 handling, errors, options, and what runs on the event loop."""

from __future__ import annotations

import inspect
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import httpx
import pytest
import requests
import requests_mock

import mlauth
from mlauth.cli.migrate import migrate_to_redis
from mlauth.httpx import HttpxAuth
from mlauth.stores.base import NOT_LOCAL
from mlauth.stores.envfile import EnvFileStore, read_env_file
from mlauth.stores.lock import ProcessLock
from mlauth.stores.redis import RedisStore
from mlauth.testing.redis_server import RedisServer
from tests.support.fake_tokens import (
    ACCESS_1,
    ACCESS_2,
    API,
    CLIENT_ID,
    CLIENT_SECRET,
    REFRESH_1,
    REFRESH_2,
    TOKEN_URL,
    env_text,
    token_answer,
)
from tests.support.httpx_calls import MODES, Mode, ScriptedApi, request

ME = f"{API}/users/me"
INVALID_GRANT = {
    "error": "invalid_grant",
    "error_description": "Error validating grant.",
    "status": 400,
}


def bearer(token: str) -> str:
    return f"Bearer {token}"


def token_calls(m: requests_mock.Mocker) -> list[Any]:
    return [r for r in m.request_history if r.url == TOKEN_URL]


def expire_now(env_file: Path) -> None:
    env_file.write_text(env_text(ML_TOKEN_EXPIRES_AT=str(int(time.time()) - 5)))


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Mode:
    """httpx.Client or httpx.AsyncClient: every case must hold for both flows."""
    value: Mode = request.param
    return value


@pytest.fixture
def auth(env_file: Path) -> HttpxAuth:
    return HttpxAuth.from_env(env_file, backoff=0.001)


# -- header injection and host rules ------------------------------------------------------


def test_bearer_header_is_injected_for_the_api_host(mode: Mode, auth: HttpxAuth) -> None:
    api = ScriptedApi(200)
    response = request(mode, auth, "GET", ME, transport=api.transport)
    assert response.status_code == 200
    assert api.sent_tokens() == [bearer(ACCESS_1)]


def test_stale_authorization_header_from_the_caller_is_replaced(
    mode: Mode, auth: HttpxAuth
) -> None:
    api = ScriptedApi(200)
    headers = {"Authorization": "Bearer STALE-legacy"}
    request(mode, auth, "GET", ME, transport=api.transport, headers=headers)
    assert api.sent_tokens() == [bearer(ACCESS_1)]


def test_other_hosts_get_no_token_and_keep_their_own_header(mode: Mode, auth: HttpxAuth) -> None:
    api = ScriptedApi(200)
    request(mode, auth, "GET", "https://http2.mlstatic.com/img.jpg", transport=api.transport)
    headers = {"Authorization": "Basic abc"}
    request(mode, auth, "GET", "https://example.com/x", transport=api.transport, headers=headers)
    assert api.sent_tokens() == [None, "Basic abc"]


def test_plain_http_to_a_non_loopback_allowed_host_gets_no_token(
    mode: Mode, auth: HttpxAuth
) -> None:
    api = ScriptedApi(200)
    request(mode, auth, "GET", "http://api.mercadolibre.com/users/me", transport=api.transport)
    assert api.sent_tokens() == [None]


HOST_CASES = [
    ("https://api.mercadolibre.com:8443/a", True),
    ("https://api.mercadolibre.com/a", False),  # port 443 is not 8443
    ("http://127.0.0.1:5000/a", True),  # loopback: http allowed, any port
    ("http://[::1]:5000/a", True),  # IPv6 loopback: httpx gives the host without brackets
    ("http://localhost:5000/a", False),  # loopback, but not an allowed host
    ("https://API.MercadoPago.com/a", True),  # host names are case-insensitive
    ("https://api.mercadopago.com:443/a", True),  # the default port, written out
    ("http://api.mercadopago.com/a", False),  # plain http off loopback
    ("https://api.mercadopago.com.evil.example/a", False),
    ("https://evil.example/?u=https://api.mercadopago.com/", False),
    ("https://api.mercadopago.com@evil.example/a", False),  # userinfo, not the host
]


def test_host_rules_match_names_and_ports(mode: Mode, env_file: Path) -> None:
    auth = HttpxAuth.from_env(
        env_file, hosts=["api.mercadolibre.com:8443", "127.0.0.1", "[::1]", "api.mercadopago.com"]
    )
    api = ScriptedApi(200)
    for url, expected in HOST_CASES:
        request(mode, auth, "GET", url, transport=api.transport)
        assert (api.calls[-1].authorization == bearer(ACCESS_1)) is expected, url
        assert auth.handles(url) is expected, url  # the string check agrees with httpx's parse
    assert len(api.calls) == len(HOST_CASES)


# -- 401 handling ---------------------------------------------------------------------------


def test_401_refreshes_persists_and_resends_once(
    mode: Mode, auth: HttpxAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    api = ScriptedApi(401, 200)
    before = time.time()
    response = request(mode, auth, "GET", ME, transport=api.transport)

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert api.sent_tokens() == [bearer(ACCESS_1), bearer(ACCESS_2)]
    assert response.request.headers["Authorization"] == bearer(ACCESS_2)
    # The engine made the POST, through its own requests session, not through httpx.
    (token_call,) = token_calls(requests_mock)
    assert parse_qs(token_call.text) == {
        "grant_type": ["refresh_token"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
        "refresh_token": [REFRESH_1],
    }
    assert "Authorization" not in token_call.headers
    stored = read_env_file(env_file)
    assert stored["ML_ACCESS_TOKEN"] == ACCESS_2
    assert stored["ML_REFRESH_TOKEN"] == REFRESH_2
    assert stored["OTHER_SETTING"] == "keep me"
    assert before + 21600 <= float(stored["ML_TOKEN_EXPIRES_AT"] or 0) <= time.time() + 21600


def test_403_never_refreshes(
    mode: Mode, auth: HttpxAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    api = ScriptedApi(403)
    response = request(mode, auth, "GET", ME, transport=api.transport)
    assert response.status_code == 403
    assert len(api.calls) == 1
    assert token_calls(requests_mock) == []


def test_401_from_another_host_is_left_alone(
    mode: Mode, auth: HttpxAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    api = ScriptedApi(401)
    response = request(mode, auth, "GET", "https://example.com/x", transport=api.transport)
    assert response.status_code == 401
    assert response.history == []
    assert token_calls(requests_mock) == []


def test_401_after_the_resend_is_returned_without_a_loop(
    mode: Mode, auth: HttpxAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    api = ScriptedApi(401)
    response = request(mode, auth, "GET", ME, transport=api.transport)
    assert response.status_code == 401
    assert [r.status_code for r in response.history] == [401]
    assert len(api.calls) == 2  # the first try and one re-send
    assert len(token_calls(requests_mock)) == 1


def test_401_on_a_token_refreshed_seconds_ago_is_genuine(
    mode: Mode, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    now = time.time()
    env_file.write_text(
        env_text(ML_TOKEN_REFRESHED_AT=str(now - 2), ML_TOKEN_EXPIRES_AT=str(now + 21598))
    )
    requests_mock.post(TOKEN_URL, json=token_answer())
    api = ScriptedApi(401)
    response = request(mode, HttpxAuth.from_env(env_file), "GET", ME, transport=api.transport)
    assert response.status_code == 401
    assert response.history == []
    assert len(api.calls) == 1
    assert token_calls(requests_mock) == []


def test_redirect_within_the_api_host_after_a_401_refreshes_once(
    mode: Mode, auth: HttpxAuth, requests_mock: requests_mock.Mocker
) -> None:
    # /a redirects to /b, which takes only the new token: the re-send of /a follows the
    # redirect again with it, and no hop refreshes a second time.
    requests_mock.post(TOKEN_URL, [{"json": token_answer()}, {"json": token_answer("APP_USR-3")}])
    seen: list[tuple[str, str | None]] = []

    def api(r: httpx.Request) -> httpx.Response:
        token = r.headers.get("Authorization")
        seen.append((r.url.path, token))
        if r.url.path == "/a":
            return httpx.Response(302, headers={"Location": f"{API}/b"})
        return httpx.Response(200 if token == bearer(ACCESS_2) else 401)

    response = request(
        mode, auth, "GET", f"{API}/a", transport=httpx.MockTransport(api), follow_redirects=True
    )
    assert response.status_code == 200
    assert len(token_calls(requests_mock)) == 1
    assert seen == [
        ("/a", bearer(ACCESS_1)),
        ("/b", bearer(ACCESS_1)),
        ("/a", bearer(ACCESS_2)),
        ("/b", bearer(ACCESS_2)),
    ]


# -- errors ---------------------------------------------------------------------------------


def test_invalid_grant_is_an_httpx_error_with_the_api_request(
    mode: Mode, auth: HttpxAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    before = env_file.read_bytes()
    requests_mock.post(TOKEN_URL, status_code=400, json=INVALID_GRANT)
    api = ScriptedApi(401)
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        request(mode, auth, "POST", ME, transport=api.transport, json={"a": 1})
    exc = caught.value
    assert isinstance(exc, httpx.HTTPError)
    assert isinstance(exc, mlauth.MLAuthError)
    assert isinstance(exc, requests.RequestException)
    assert (type(exc).__name__, type(exc).__module__) == ("InvalidGrantError", "mlauth.errors")
    # .request is the API call that failed, never the token POST (its body holds secrets).
    assert (exc.request.method, exc.request.url) == ("POST", httpx.URL(ME))
    assert exc.status_code == 400 and exc.error == "invalid_grant"
    assert "authorize the app again" in str(exc)
    assert env_file.read_bytes() == before
    assert len(token_calls(requests_mock)) == 1  # never retried
    assert len(api.calls) == 1


def test_transport_error_handlers_do_not_catch_a_refresh_failure(
    mode: Mode, auth: HttpxAuth, requests_mock: requests_mock.Mocker
) -> None:
    # Retry helpers catch httpx.TransportError: a dead grant must not be retried by them.
    requests_mock.post(TOKEN_URL, status_code=400, json=INVALID_GRANT)
    api = ScriptedApi(401)
    caught: list[httpx.HTTPError] = []
    try:
        try:
            request(mode, auth, "GET", ME, transport=api.transport)
        except httpx.TransportError:
            pytest.fail("an InvalidGrantError was caught as httpx.TransportError")
    except httpx.HTTPError as exc:
        caught.append(exc)
    assert len(caught) == 1
    assert isinstance(caught[0], mlauth.InvalidGrantError)


def test_failed_refresh_of_an_expired_token_is_an_httpx_error(
    mode: Mode, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    expire_now(env_file)
    requests_mock.post(TOKEN_URL, status_code=503, json={"error": "server_error"})
    api = ScriptedApi(200)
    auth = HttpxAuth.from_env(env_file, max_attempts=2, backoff=0.001)
    with pytest.raises(mlauth.RefreshError, match="after 2 attempts") as caught:
        request(mode, auth, "GET", ME, transport=api.transport)
    assert isinstance(caught.value, httpx.HTTPError)
    assert caught.value.request.url == httpx.URL(ME)
    assert api.calls == []  # nothing was sent without a valid token


@pytest.fixture
def held_lock(env_file: Path) -> Iterator[None]:
    """The .env's refresh lock held by another open file description, as a peer would."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ProcessLock(f"{env_file}.lock").hold(timeout=5):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(5)
        yield
    finally:
        release.set()
        thread.join()


def test_lock_timeout_during_a_request_is_an_httpx_error(
    mode: Mode, env_file: Path, requests_mock: requests_mock.Mocker, held_lock: None
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    api = ScriptedApi(401)
    auth = HttpxAuth.from_env(env_file, lock_timeout=0.2)
    with pytest.raises(mlauth.LockTimeoutError, match="No refresh was attempted") as caught:
        request(mode, auth, "GET", ME, transport=api.transport)
    assert isinstance(caught.value, httpx.HTTPError)
    assert caught.value.request.url == httpx.URL(ME)
    assert token_calls(requests_mock) == []


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"client_id": ""}, "client_id is empty"),
        ({"client_secret": "  "}, "client_secret is empty"),
        ({"store": "tokens.env"}, "must be a TokenStore"),
        ({"refresh_margin": -1}, "must be >= 0"),
        ({"lock_timeout": 0}, "lock_timeout > 0"),
    ],
)
def test_construction_errors_are_plain_mlauth_errors(
    env_file: Path, override: dict[str, object], match: str
) -> None:
    options: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "store": EnvFileStore(env_file),
        **override,
    }
    with pytest.raises(mlauth.ConfigError, match=match) as caught:
        HttpxAuth(**options)
    assert type(caught.value) is mlauth.ConfigError  # no httpx flavour outside a request
    assert not isinstance(caught.value, httpx.HTTPError)


def test_from_env_refresh_and_valid_tokens_raise_plain_mlauth_errors(
    env_file: Path, tmp_path: Path, requests_mock: requests_mock.Mocker
) -> None:
    with pytest.raises(mlauth.ConfigError) as missing:
        HttpxAuth.from_env(tmp_path / "missing.env")
    assert type(missing.value) is mlauth.ConfigError
    requests_mock.post(TOKEN_URL, status_code=400, json=INVALID_GRANT)
    auth = HttpxAuth.from_env(env_file)
    with pytest.raises(mlauth.InvalidGrantError) as refresh:
        auth.refresh()
    assert type(refresh.value) is mlauth.InvalidGrantError
    expire_now(env_file)
    with pytest.raises(mlauth.InvalidGrantError) as valid:
        HttpxAuth.from_env(env_file).valid_tokens()
    assert type(valid.value) is mlauth.InvalidGrantError


# -- the same options as MLAuth, and nothing secret shown -----------------------------------


def test_constructor_and_from_env_take_exactly_the_options_of_mlauth() -> None:
    init = inspect.signature(HttpxAuth)
    assert init == inspect.signature(mlauth.MLAuth)
    assert {"client_id", "store", "hosts", "refresh_margin", "on_refresh"} <= set(init.parameters)
    assert inspect.signature(HttpxAuth.from_env) == inspect.signature(mlauth.MLAuth.from_env)


def test_the_same_env_keys_build_the_same_auth_as_mlauth(env_file: Path) -> None:
    env_file.write_text(
        env_text(
            ML_TOKEN_URL="https://auth.example.test/oauth/token",
            ML_API_HOSTS="api.mercadolibre.com, api.mercadopago.com:8443",
        )
    )
    ours, theirs = HttpxAuth.from_env(env_file), mlauth.MLAuth.from_env(env_file)
    assert (ours.client_id, ours.token_url) == (CLIENT_ID, "https://auth.example.test/oauth/token")
    assert (ours.client_id, ours.token_url) == (theirs.client_id, theirs.token_url)
    assert ours.store.location == theirs.store.location
    assert ours.tokens.describe() == theirs.tokens.describe()
    assert repr(ours) == "Httpx" + repr(theirs).removeprefix("ML")
    for url in ["https://api.mercadopago.com:8443/x", "https://api.mercadopago.com/x", ME]:
        assert ours.handles(url) == theirs.handles(url), url


def test_repr_vars_and_errors_never_show_a_token_or_the_secret(
    mode: Mode, auth: HttpxAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, status_code=400, json={"error": "invalid_grant"})
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        request(mode, auth, "GET", ME, transport=ScriptedApi(401).transport)
    shown = " ".join(
        [repr(auth), str(vars(auth)), repr(auth.tokens), str(caught.value), repr(caught.value)]
    )
    for secret in (ACCESS_1, REFRESH_1, CLIENT_SECRET):
        assert secret not in shown
    assert mlauth.fingerprint(ACCESS_1) in repr(auth)
    assert str(caught.value)  # a message, masked, not an empty one


def test_pickling_is_refused_naming_httpx_auth(auth: HttpxAuth) -> None:
    with pytest.raises(TypeError, match=r"an HttpxAuth cannot be pickled.*HttpxAuth\.from_env"):
        pickle.dumps(auth)


# -- what runs on the event loop -----------------------------------------------------------

ENGINE_CALLS = ("fresh_token", "token_for_request", "after_401")


def spy_engine(auth: HttpxAuth) -> list[tuple[str, int]]:
    """Record (engine method, thread) for each call the adapter makes to its engine."""
    calls: list[tuple[str, int]] = []
    engine = auth._engine
    for name in ENGINE_CALLS:
        real = getattr(engine, name)

        def spy(*args: Any, _name: str = name, _real: Callable[..., Any] = real) -> Any:
            calls.append((_name, threading.get_ident()))
            return _real(*args)

        setattr(engine, name, spy)
    return calls


@pytest.fixture
def hops_to_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions sent to a worker thread through anyio (the innermost, when
    the function sent is a wrapper that calls another it was given)."""
    sent: list[str] = []
    real = anyio.to_thread.run_sync

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        innermost = [f for f in (func, *args) if callable(f)][-1]
        sent.append(getattr(innermost, "__name__", repr(innermost)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    return sent


def run_async_get(
    auth: HttpxAuth, api: ScriptedApi, backend: str, count: int = 1
) -> tuple[list[httpx.Response], int]:
    """``count`` GETs in one AsyncClient under ``backend``; returns them and the loop's thread."""
    loop_thread: list[int] = []

    async def main() -> list[httpx.Response]:
        loop_thread.append(threading.get_ident())
        async with httpx.AsyncClient(auth=auth, transport=api.transport) as client:
            return [await client.get(ME) for _ in range(count)]

    responses = anyio.run(main, backend=backend)
    return responses, loop_thread[0]


BACKENDS = ["asyncio", "trio"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fresh_token_is_served_on_the_loop_without_a_thread_hop(
    auth: HttpxAuth, backend: str, hops_to_threads: list[str]
) -> None:
    calls = spy_engine(auth)
    api = ScriptedApi(200)
    responses, loop = run_async_get(auth, api, backend, count=3)
    assert [r.status_code for r in responses] == [200] * 3
    assert api.sent_tokens() == [bearer(ACCESS_1)] * 3
    assert calls == [("fresh_token", loop)] * 3
    assert hops_to_threads == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refresh_due_runs_the_engine_off_the_loop(
    auth: HttpxAuth,
    env_file: Path,
    backend: str,
    requests_mock: requests_mock.Mocker,
    hops_to_threads: list[str],
) -> None:
    expire_now(env_file)
    post_threads: list[int] = []

    def answer(r: object, context: object) -> dict[str, object]:
        post_threads.append(threading.get_ident())
        return token_answer()

    requests_mock.post(TOKEN_URL, json=answer)
    calls = spy_engine(auth)
    api = ScriptedApi(200)
    _, loop = run_async_get(auth, api, backend)
    assert api.sent_tokens() == [bearer(ACCESS_2)]
    # fresh_token again once the task holds its loop's turn to go to a thread: none needed if
    # another task's trip has just brought a token.
    assert [name for name, _ in calls] == ["fresh_token", "fresh_token", "token_for_request"]
    (_, on_loop), (_, again_on_loop), (_, worker) = calls
    assert on_loop == again_on_loop == loop and worker != loop
    assert post_threads == [worker]  # the POST, lock and fsync ran in the worker thread
    assert hops_to_threads == ["spy"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_401_is_handled_off_the_loop(
    auth: HttpxAuth, backend: str, requests_mock: requests_mock.Mocker
) -> None:
    post_threads: list[int] = []

    def answer(r: object, context: object) -> dict[str, object]:
        post_threads.append(threading.get_ident())
        return token_answer()

    requests_mock.post(TOKEN_URL, json=answer)
    calls = spy_engine(auth)
    api = ScriptedApi(401, 200)
    (response,), loop = run_async_get(auth, api, backend)
    assert response.status_code == 200
    assert api.sent_tokens() == [bearer(ACCESS_1), bearer(ACCESS_2)]
    # After the 401, fresh_token on the loop first: its token is the one that failed.
    assert [name for name, _ in calls] == ["fresh_token", "fresh_token", "after_401"]
    assert calls[0][1] == calls[1][1] == loop and calls[2][1] != loop
    assert post_threads == [calls[2][1]]


# -- a Redis store ---------------------------------------------------------------------------


@pytest.fixture
def redis_env(env_file: Path, redis_server: RedisServer) -> Path:
    """The conftest .env with its tokens moved into a real redis-server."""
    migrate_to_redis(env_file, redis_server.url)
    return env_file


def test_redis_backed_httpx_auth_refreshes_into_redis(
    mode: Mode,
    redis_env: Path,
    redis_server: RedisServer,
    requests_mock: requests_mock.Mocker,
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    auth = HttpxAuth.from_env(redis_env)
    assert isinstance(auth.store, RedisStore)
    api = ScriptedApi(401, 200)
    response = request(mode, auth, "GET", ME, transport=api.transport)
    assert response.status_code == 200
    assert api.sent_tokens() == [bearer(ACCESS_1), bearer(ACCESS_2)]
    with redis_server.client() as client:
        stored = client.hgetall(f"mlauth:{CLIENT_ID}:tokens")
    assert (stored["access_token"], stored["refresh_token"]) == (ACCESS_2, REFRESH_2)
    assert "ML_ACCESS_TOKEN" not in read_env_file(redis_env)  # the file keeps no tokens


def test_redis_stamp_is_never_fetched_on_the_loop(
    redis_env: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(redis_server.url, check_interval=0.05)
    auth = HttpxAuth.from_env(redis_env, store=store)
    assert store.local_stamp() is not NOT_LOCAL  # just read: known for check_interval
    deadline = time.monotonic() + 10
    while store.local_stamp() is not NOT_LOCAL:  # a poll on the store's own clock
        assert time.monotonic() < deadline, "local_stamp() stayed local past its interval"
        time.sleep(0.01)
    stamps: list[tuple[int, bool]] = []  # (thread, whether it could answer from memory)
    real_stamp = store.stamp

    def stamp() -> object:
        stamps.append((threading.get_ident(), store.local_stamp() is not NOT_LOCAL))
        return real_stamp()

    monkeypatch.setattr(store, "stamp", stamp)
    calls = spy_engine(auth)
    api = ScriptedApi(200)
    _, loop = run_async_get(auth, api, "asyncio")
    assert api.sent_tokens() == [bearer(ACCESS_1)]
    assert [name for name, _ in calls] == ["fresh_token", "fresh_token", "token_for_request"]
    assert stamps, "the expired interval's stamp was never asked"
    assert all(thread != loop for thread, _ in stamps)  # never stamp() on the loop
    assert any(not local for _, local in stamps)  # the round trip, in the worker thread
