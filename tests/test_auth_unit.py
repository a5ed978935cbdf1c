"""One request's shape (requests-mock): headers, host rules, 401 handling, error mapping."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import requests
import requests_mock

import mlauth
from mlauth.stores.envfile import EnvFileStore, read_env_file
from mlauth.stores.lock import ProcessLock
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

MakeAuth = Callable[..., mlauth.MLAuth]
ME = f"{API}/users/me"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def only_token_calls(m: requests_mock.Mocker) -> list[requests_mock.request._RequestObjectProxy]:
    return [r for r in m.request_history if r.url == TOKEN_URL]


def expire_now(env_file: Path) -> None:
    env_file.write_text(env_text(ML_TOKEN_EXPIRES_AT=str(int(time.time()) - 5)))


# -- header injection and host rules ------------------------------------------------------


def test_bearer_header_is_injected_for_the_api_host(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.get(ME, json={"id": 1})
    session = requests.Session()
    session.auth = make_auth()
    session.get(ME)
    assert requests_mock.last_request.headers["Authorization"] == bearer(ACCESS_1)


def test_stale_authorization_header_from_the_caller_is_replaced(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.get(ME, json={})
    requests.get(ME, headers={"Authorization": "Bearer STALE-legacy"}, auth=make_auth())
    assert requests_mock.last_request.headers["Authorization"] == bearer(ACCESS_1)


def test_other_hosts_get_no_token_and_keep_their_own_header(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.get("https://http2.mlstatic.com/img.jpg", content=b"jpg")
    requests_mock.get("https://example.com/x", content=b"")
    auth = make_auth()
    requests.get("https://http2.mlstatic.com/img.jpg", auth=auth)
    assert "Authorization" not in requests_mock.last_request.headers
    requests.get("https://example.com/x", headers={"Authorization": "Basic abc"}, auth=auth)
    assert requests_mock.last_request.headers["Authorization"] == "Basic abc"


def test_plain_http_to_the_api_host_gets_no_token(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.get("http://api.mercadolibre.com/users/me", json={})
    requests.get("http://api.mercadolibre.com/users/me", auth=make_auth())
    assert "Authorization" not in requests_mock.last_request.headers


def test_host_rules_match_names_and_ports(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    auth = make_auth(hosts=["api.mercadolibre.com:8443", "127.0.0.1", "api.mercadopago.com"])
    for url, expected in [
        ("https://api.mercadolibre.com:8443/a", True),
        ("https://api.mercadolibre.com/a", False),  # port 443 is not 8443
        ("http://127.0.0.1:5000/a", True),  # loopback: http allowed, any port
        ("https://API.MercadoPago.com/a", True),  # host names are case-insensitive
        ("https://api.mercadopago.com.evil.example/a", False),
        ("https://evil.example/?u=https://api.mercadopago.com/", False),
    ]:
        requests_mock.get(url, json={})
        requests.get(url, auth=auth)
        sent = requests_mock.last_request.headers.get("Authorization")
        assert (sent == bearer(ACCESS_1)) is expected, url


# -- 401 handling ---------------------------------------------------------------------------


def test_401_refreshes_persists_and_resends_once(
    make_auth: MakeAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(
        ME,
        [
            {
                "status_code": 401,
                "json": {"code": "unauthorized", "message": "invalid access token"},
            },
            {"status_code": 200, "json": {"id": 8035443}},
        ],
    )
    before = time.time()
    response = requests.get(ME, auth=make_auth())

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert response.request.headers["Authorization"] == bearer(ACCESS_2)
    assert response.history[0].request.headers["Authorization"] == bearer(ACCESS_1)
    (token_call,) = only_token_calls(requests_mock)
    assert parse_qs(token_call.text) == {
        "grant_type": ["refresh_token"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
        "refresh_token": [REFRESH_1],
    }
    assert token_call.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in token_call.headers  # the POST does not go through the auth
    assert "refresh_token" not in token_call.url  # secrets in the body, never the URL
    stored = read_env_file(env_file)
    assert stored["ML_ACCESS_TOKEN"] == ACCESS_2
    assert stored["ML_REFRESH_TOKEN"] == REFRESH_2
    assert stored["OTHER_SETTING"] == "keep me"
    expires_at = float(stored["ML_TOKEN_EXPIRES_AT"] or 0)
    assert before + 21600 <= expires_at <= time.time() + 21600


def test_403_never_refreshes(make_auth: MakeAuth, requests_mock: requests_mock.Mocker) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, status_code=403, json={"message": "forbidden", "error": "forbidden"})
    response = requests.get(ME, auth=make_auth())
    assert response.status_code == 403
    assert only_token_calls(requests_mock) == []


def test_401_from_another_host_is_left_alone(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get("https://example.com/x", status_code=401)
    response = requests.get("https://example.com/x", auth=make_auth())
    assert response.status_code == 401
    assert only_token_calls(requests_mock) == []


def test_401_after_the_resend_is_returned_without_a_loop(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, status_code=401, json={"message": "invalid_token"})
    response = requests.get(ME, auth=make_auth())
    assert response.status_code == 401
    assert len(response.history) == 1
    assert len(only_token_calls(requests_mock)) == 1
    assert requests_mock.call_count == 3  # first try, refresh, one re-send


def test_401_on_a_token_refreshed_seconds_ago_is_genuine(
    env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    now = time.time()
    env_file.write_text(
        env_text(ML_TOKEN_REFRESHED_AT=str(now - 2), ML_TOKEN_EXPIRES_AT=str(now + 21598))
    )
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, status_code=401, json={"message": "invalid_token"})
    response = requests.get(ME, auth=mlauth.MLAuth.from_env(env_file))
    assert response.status_code == 401
    assert response.history == []
    assert only_token_calls(requests_mock) == []


def test_401_when_another_thread_already_moved_on_resends_without_refresh(
    make_auth: MakeAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    auth = make_auth()
    # A peer rotated the tokens after this request was prepared with ACCESS_1.
    requests_mock.get(
        ME,
        [{"status_code": 401}, {"status_code": 200, "json": {}}],
    )
    requests_mock.post(TOKEN_URL, json=token_answer(access="APP_USR-should-not-be-used"))

    def rotate(request: requests.PreparedRequest) -> requests.PreparedRequest:
        env_file.write_text(env_text(ML_ACCESS_TOKEN=ACCESS_2, ML_REFRESH_TOKEN=REFRESH_2))
        return request

    session = requests.Session()
    session.auth = auth
    response = session.get(ME, hooks={"response": []}, auth=lambda r: rotate(auth(r)))
    assert response.status_code == 200
    assert response.request.headers["Authorization"] == bearer(ACCESS_2)
    assert only_token_calls(requests_mock) == []


def _near_expiry_peer(left: float = 60.0) -> str:
    """A .env a peer wrote: a 6-hour token with ``left`` seconds to go (negative: expired)."""
    now = time.time()
    return env_text(
        ML_ACCESS_TOKEN=ACCESS_2,
        ML_REFRESH_TOKEN=REFRESH_2,
        ML_TOKEN_EXPIRES_AT=str(now + left),
        ML_TOKEN_REFRESHED_AT=str(now + left - 6 * 3600),
    )


@pytest.mark.parametrize(
    "peer_left",
    [
        # The store moved on while this request was out (or while we waited a long time for
        # the lock), but the token it holds now has expired too.
        pytest.param(-60.0, id="expired"),
        # Not expired yet, but within the 300 s margin every request refreshes ahead of: a
        # token that close to its end is what a second 401 is made of.
        pytest.param(60.0, id="inside-the-margin"),
    ],
)
def test_401_never_resends_with_a_peers_token_that_is_about_to_fail(
    env_file: Path, make_auth: MakeAuth, requests_mock: requests_mock.Mocker, peer_left: float
) -> None:
    # Refresh with the peer's refresh token rather than re-send with a token that can only
    # get (or is about to get) a second 401.
    access_3 = ACCESS_2.replace("0002", "0003")

    def api(request: requests_mock.request._RequestObjectProxy, context: object) -> str:
        token = request.headers["Authorization"]
        if token == bearer(ACCESS_1):
            env_file.write_text(_near_expiry_peer(peer_left))  # a peer rotated meanwhile
        context.status_code = 200 if token == bearer(access_3) else 401  # type: ignore[attr-defined]
        return "{}"

    requests_mock.get(ME, text=api)
    requests_mock.post(TOKEN_URL, json=token_answer(access=access_3, refresh="TG-fake-3"))
    auth = make_auth()

    response = requests.get(ME, auth=auth)

    assert response.status_code == 200
    (refresh,) = only_token_calls(requests_mock)
    assert parse_qs(refresh.text)["refresh_token"] == [REFRESH_2]
    sent = [r.headers["Authorization"] for r in requests_mock.request_history if r.url == ME]
    assert sent == [bearer(ACCESS_1), bearer(access_3)]


def test_401_after_waiting_for_the_lock_refreshes_a_peers_token_inside_the_margin(
    env_file: Path, make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    # The peer's write lands while this thread waits for the lock (after its first look at
    # the store), so it is the re-read under the lock that must judge the token's time left.
    access_3 = ACCESS_2.replace("0002", "0003")
    requests_mock.get(
        ME,
        [{"status_code": 401, "text": "{}"}, {"status_code": 200, "text": "{}"}],
    )
    requests_mock.post(TOKEN_URL, json=token_answer(access=access_3, refresh="TG-fake-3"))
    auth = make_auth()
    real_lock = auth.store.lock
    writes = []

    @contextlib.contextmanager
    def lock_after_a_peer(timeout: float) -> Iterator[None]:
        if not writes:  # the peer got the lock first and rotated to a short-lived token
            env_file.write_text(_near_expiry_peer())
            writes.append(1)
        with real_lock(timeout):
            yield

    auth.store.lock = lock_after_a_peer  # type: ignore[method-assign]

    response = requests.get(ME, auth=auth)

    assert response.status_code == 200
    (refresh,) = only_token_calls(requests_mock)
    assert parse_qs(refresh.text)["refresh_token"] == [REFRESH_2]
    sent = [r.headers["Authorization"] for r in requests_mock.request_history if r.url == ME]
    assert sent == [bearer(ACCESS_1), bearer(access_3)]


def test_401_adopts_a_token_a_peer_refreshed_moments_ago_without_a_post(
    env_file: Path, make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    # The other side of the margin rule: a peer's fresh 6-hour token is far from expiry, so
    # the 401 is answered by re-sending with it and no refresh token is spent.
    now = time.time()
    fresh_peer = env_text(
        ML_ACCESS_TOKEN=ACCESS_2,
        ML_REFRESH_TOKEN=REFRESH_2,
        ML_TOKEN_EXPIRES_AT=str(now + 6 * 3600 - 1),
        ML_TOKEN_REFRESHED_AT=str(now - 1),
    )
    requests_mock.get(
        ME,
        [{"status_code": 401, "text": "{}"}, {"status_code": 200, "text": "{}"}],
    )
    requests_mock.post(TOKEN_URL, status_code=500)
    auth = make_auth()
    real_lock = auth.store.lock

    @contextlib.contextmanager
    def lock_after_a_peer(timeout: float) -> Iterator[None]:
        env_file.write_text(fresh_peer)
        with real_lock(timeout):
            yield

    auth.store.lock = lock_after_a_peer  # type: ignore[method-assign]

    response = requests.get(ME, auth=auth)

    assert response.status_code == 200
    assert only_token_calls(requests_mock) == []
    sent = [r.headers["Authorization"] for r in requests_mock.request_history if r.url == ME]
    assert sent == [bearer(ACCESS_1), bearer(ACCESS_2)]


def test_proactive_refresh_happens_before_the_request(
    env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    env_file.write_text(env_text(ML_TOKEN_EXPIRES_AT=str(int(time.time()) + 60)))
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, json={})
    response = requests.get(ME, auth=mlauth.MLAuth.from_env(env_file, refresh_margin=300))
    assert response.history == []
    assert response.request.headers["Authorization"] == bearer(ACCESS_2)
    assert len(only_token_calls(requests_mock)) == 1


def test_failed_refresh_ahead_of_expiry_keeps_the_valid_token(
    env_file: Path, requests_mock: requests_mock.Mocker, caplog: pytest.LogCaptureFixture
) -> None:
    env_file.write_text(env_text(ML_TOKEN_EXPIRES_AT=str(int(time.time()) + 60)))
    requests_mock.post(TOKEN_URL, status_code=503, json={"error": "server_error"})
    requests_mock.get(ME, json={})
    auth = mlauth.MLAuth.from_env(env_file, max_attempts=2, backoff=0.001)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        first = requests.get(ME, auth=auth)
        second = requests.get(ME, auth=auth)
    assert first.status_code == second.status_code == 200
    assert second.request.headers["Authorization"] == bearer(ACCESS_1)
    # One attempt (the token still works, so the request is not held up by retries), and the
    # second call does not hammer the endpoint again.
    assert len(only_token_calls(requests_mock)) == 1
    assert "using the current token" in caplog.text


def test_expired_token_refreshes_or_raises(
    env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    expire_now(env_file)
    requests_mock.post(TOKEN_URL, status_code=503, json={"error": "server_error"})
    auth = mlauth.MLAuth.from_env(env_file, max_attempts=2, backoff=0.001)
    with pytest.raises(mlauth.RefreshError, match="after 2 attempts"):
        requests.get(ME, auth=auth)


def test_missing_access_token_is_fetched_before_the_first_call(
    env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    env_file.write_text(env_text(ML_ACCESS_TOKEN=None, ML_TOKEN_EXPIRES_AT=None))
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, json={})
    response = requests.get(ME, auth=mlauth.MLAuth.from_env(env_file))
    assert response.request.headers["Authorization"] == bearer(ACCESS_2)


def test_on_refresh_gets_the_new_tokens(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    seen: list[mlauth.TokenSet] = []
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, [{"status_code": 401}, {"status_code": 200}])
    requests.get(ME, auth=make_auth(on_refresh=seen.append))
    assert len(seen) == 1
    assert seen[0].access_token == mlauth.Secret(ACCESS_2)


# -- failures of the token endpoint ----------------------------------------------------------


def test_invalid_grant_raises_and_leaves_the_store_untouched(
    make_auth: MakeAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    before = env_file.read_bytes()
    requests_mock.post(
        TOKEN_URL,
        status_code=400,
        json={
            "error": "invalid_grant",
            "error_description": "Error validating grant.",
            "status": 400,
        },
    )
    requests_mock.get(ME, status_code=401)
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        requests.get(ME, auth=make_auth())
    assert isinstance(caught.value, requests.RequestException)
    assert caught.value.error == "invalid_grant"
    assert "authorize the app again" in str(caught.value)
    assert caught.value.response is None and caught.value.request is None
    assert env_file.read_bytes() == before
    assert len(only_token_calls(requests_mock)) == 1  # never retried


def test_invalid_grant_adopts_a_token_rotated_outside_the_lock(
    make_auth: MakeAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    def legacy_rotated_first(request: object, context: object) -> dict[str, object]:
        # A legacy script that takes no lock spent the token just before us.
        env_file.write_text(env_text(ML_ACCESS_TOKEN=ACCESS_2, ML_REFRESH_TOKEN=REFRESH_2))
        context.status_code = 400  # type: ignore[attr-defined]
        return {"error": "invalid_grant", "message": "already used"}

    requests_mock.post(TOKEN_URL, json=legacy_rotated_first)
    requests_mock.get(ME, [{"status_code": 401}, {"status_code": 200}])
    response = requests.get(ME, auth=make_auth())
    assert response.status_code == 200
    assert response.request.headers["Authorization"] == bearer(ACCESS_2)


def test_invalid_client_is_not_retried(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(
        TOKEN_URL, status_code=401, json={"error": "invalid_client", "message": "bad secret"}
    )
    requests_mock.get(ME, status_code=401)
    with pytest.raises(mlauth.RefreshError, match="ML_CLIENT_SECRET") as caught:
        requests.get(ME, auth=make_auth())
    assert not isinstance(caught.value, mlauth.InvalidGrantError)
    assert caught.value.error == "invalid_client"
    assert len(only_token_calls(requests_mock)) == 1


@pytest.mark.parametrize(
    "failure",
    [
        {"status_code": 503, "json": {"error": "server_error"}},
        {"status_code": 500, "text": "<html>oops</html>"},
        {"status_code": 429, "json": {"error": "local_rate_limited"}},
        {"exc": requests.exceptions.ConnectTimeout},
        {"exc": requests.exceptions.ConnectionError},
        {"exc": requests.exceptions.ReadTimeout},
    ],
)
def test_transient_failures_are_retried_then_succeed(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker, failure: dict[str, object]
) -> None:
    requests_mock.post(TOKEN_URL, [failure, failure, {"json": token_answer()}])
    requests_mock.get(ME, [{"status_code": 401}, {"status_code": 200}])
    response = requests.get(ME, auth=make_auth(max_attempts=3))
    assert response.status_code == 200
    assert len(only_token_calls(requests_mock)) == 3


def test_expiry_counts_from_the_first_post_not_from_the_store_check(
    env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    # The store's check fsyncs a scratch file (or asks Redis): slow under load. Counting the
    # token's life from before it would make the next refresh come early by that much.
    checks: list[float] = []
    posts: list[float] = []

    class TimedStore(mlauth.EnvFileStore):
        def check_writable(self) -> None:
            super().check_writable()
            checks.append(time.time())

    def answer(request: object, context: object) -> dict[str, object]:
        posts.append(time.time())
        return token_answer()

    requests_mock.post(TOKEN_URL, [{"status_code": 503}, {"json": answer}])
    auth = mlauth.MLAuth.from_env(env_file, store=TimedStore(env_file), backoff=0.001)
    checks.clear()  # from_env's start-up check: not part of the refresh
    new = auth.refresh()

    assert len(checks) == 2 and len(posts) == 1  # checked before each of the two attempts
    assert new.refreshed_at is not None and new.expires_at is not None
    assert checks[0] <= new.refreshed_at <= checks[1] <= posts[0]
    assert new.expires_at == new.refreshed_at + 21600


def test_retry_after_is_honoured(requests_mock: requests_mock.Mocker) -> None:
    from mlauth.endpoint import TokenEndpoint

    slept: list[float] = []
    endpoint = TokenEndpoint(
        TOKEN_URL, CLIENT_ID, mlauth.Secret(CLIENT_SECRET), sleep=slept.append, backoff=0.01
    )
    requests_mock.post(
        TOKEN_URL,
        [
            {"status_code": 429, "headers": {"Retry-After": "7"}, "json": {"error": "x"}},
            {"json": token_answer()},
        ],
    )
    answer = endpoint.refresh(mlauth.Secret(REFRESH_1))
    assert answer.access_token == mlauth.Secret(ACCESS_2)
    assert len(slept) == 1 and 7 <= slept[0] < 7.01


def test_retries_are_bounded_and_say_what_happened(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, status_code=502, text="bad gateway")
    requests_mock.get(ME, status_code=401)
    with pytest.raises(mlauth.RefreshError) as caught:
        requests.get(ME, auth=make_auth(max_attempts=3))
    assert "after 3 attempts" in str(caught.value)
    assert "may have reached the server" in str(caught.value)
    assert len(only_token_calls(requests_mock)) == 3


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("not json at all", "unusable body"),
        ('{"token_type": "bearer"}', "access_token is missing"),
        # Odd but usable fields keep the tokens: tests/test_hostile_answers.py.
        ('{"access_token": "APP_USR-x", "refresh_token": ""}', "refresh_token is empty"),
    ],
)
def test_malformed_success_answers_are_clear_errors(
    make_auth: MakeAuth,
    env_file: Path,
    requests_mock: requests_mock.Mocker,
    body: str,
    problem: str,
) -> None:
    before = env_file.read_bytes()
    requests_mock.post(TOKEN_URL, text=body)
    requests_mock.get(ME, status_code=401)
    with pytest.raises(mlauth.RefreshError, match=problem):
        requests.get(ME, auth=make_auth())
    assert env_file.read_bytes() == before


def test_expires_in_as_string_and_bearer_capitalised_are_accepted(
    make_auth: MakeAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer(expires_in="10800", token_type="Bearer"))
    requests_mock.get(ME, [{"status_code": 401}, {"status_code": 200}])
    before = time.time()
    requests.get(ME, auth=make_auth())
    expires_at = float(read_env_file(env_file)["ML_TOKEN_EXPIRES_AT"] or 0)
    assert before + 10800 <= expires_at <= time.time() + 10800


@pytest.mark.parametrize("expires_in", ["1e400", "Infinity", "1e12"])
def test_an_absurd_expires_in_keeps_the_tokens_with_expiry_unknown(
    make_auth: MakeAuth, env_file: Path, requests_mock: requests_mock.Mocker, expires_in: str
) -> None:
    # The refresh token is spent by now: refusing the answer would lose the new one.
    body = json.dumps(token_answer(expires_in=0))
    body = body.replace('"expires_in": 0', f'"expires_in": {expires_in}')
    requests_mock.post(TOKEN_URL, text=body)
    requests_mock.get(ME, [{"status_code": 401}, {"status_code": 200}])
    assert requests.get(ME, auth=make_auth()).status_code == 200
    values = read_env_file(env_file)
    assert values["ML_REFRESH_TOKEN"] == REFRESH_2
    assert not values.get("ML_TOKEN_EXPIRES_AT")
    EnvFileStore(env_file).load()  # and the file stays readable


def test_missing_refresh_token_in_the_answer_keeps_the_old_one(
    make_auth: MakeAuth,
    env_file: Path,
    requests_mock: requests_mock.Mocker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer(refresh=None))
    requests_mock.get(ME, [{"status_code": 401}, {"status_code": 200}])
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        requests.get(ME, auth=make_auth())
    stored = read_env_file(env_file)
    assert stored["ML_ACCESS_TOKEN"] == ACCESS_2
    assert stored["ML_REFRESH_TOKEN"] == REFRESH_1
    assert "offline_access" in caplog.text


def test_lock_held_elsewhere_times_out_without_refreshing(
    make_auth: MakeAuth, env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, status_code=401)
    auth = make_auth(lock_timeout=0.2)
    # A second flock on the same file, from another open file description, conflicts exactly
    # as another process's would.
    holder = ProcessLock(f"{env_file}.lock")
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with holder.hold(timeout=5):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(5)
        with pytest.raises(mlauth.LockTimeoutError, match="No refresh was attempted"):
            requests.get(ME, auth=auth)
    finally:
        release.set()
        thread.join()
    assert only_token_calls(requests_mock) == []


def test_unwritable_store_refuses_before_spending_the_token(
    make_auth: MakeAuth,
    env_file: Path,
    requests_mock: requests_mock.Mocker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    import mlauth.stores.private

    auth = make_auth()

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    # Root ignores permission bits, so a read-only folder is simulated at the syscall edge.
    monkeypatch.setattr(mlauth.stores.private.tempfile, "mkstemp", read_only)
    requests_mock.post(TOKEN_URL, json=token_answer())
    requests_mock.get(ME, status_code=401)
    with pytest.raises(mlauth.StoreError, match="Refusing to spend the refresh token"):
        requests.get(ME, auth=auth)
    assert only_token_calls(requests_mock) == []
    assert read_env_file(env_file)["ML_REFRESH_TOKEN"] == REFRESH_1


# -- masking --------------------------------------------------------------------------------


def test_repr_vars_and_errors_never_show_a_token_or_the_secret(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    auth = make_auth()
    requests_mock.post(TOKEN_URL, status_code=400, json={"error": "invalid_grant"})
    requests_mock.get(ME, status_code=401)
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        requests.get(ME, auth=auth)
    shown = " ".join(
        [repr(auth), str(vars(auth)), repr(auth.tokens), str(caught.value), repr(caught.value)]
    )
    for secret in (ACCESS_1, REFRESH_1, CLIENT_SECRET):
        assert secret not in shown
    assert mlauth.fingerprint(ACCESS_1) in repr(auth)


def test_redirect_rebuilt_with_the_stale_token_does_not_refresh_twice(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    # requests rebuilds each redirect from the *original* request, stale token and all; the
    # second 401 must be answered with the current token, not with a second refresh.
    requests_mock.post(TOKEN_URL, [{"json": token_answer()}, {"json": token_answer("APP_USR-3")}])

    def target(request: requests.PreparedRequest, context: object) -> dict[str, object]:
        fresh = request.headers.get("Authorization") == bearer(ACCESS_2)
        context.status_code = 200 if fresh else 401  # type: ignore[attr-defined]
        return {}

    requests_mock.get(
        f"{API}/a",
        [{"status_code": 401}, {"status_code": 302, "headers": {"Location": f"{API}/b"}}],
    )
    requests_mock.get(f"{API}/b", json=target)
    response = requests.get(f"{API}/a", auth=make_auth())
    assert response.status_code == 200
    assert len(only_token_calls(requests_mock)) == 1


def test_unusable_token_url_error_keeps_no_request_with_secrets(
    make_auth: MakeAuth, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.post(TOKEN_URL, exc=requests.exceptions.InvalidSchema("no adapter"))
    requests_mock.get(ME, status_code=401)
    with pytest.raises(mlauth.RefreshError, match="Check ML_TOKEN_URL") as caught:
        requests.get(ME, auth=make_auth())
    assert caught.value.__context__ is None and caught.value.__cause__ is None
