"""The fake MercadoLibre behaves like the real one where mlauth depends on it.

Every test talks to a real loopback server over real sockets with plain ``requests``: the
other test suites trust this fake, so its rules (single-use refresh tokens, dying access
tokens, varying 401 bodies, injected faults) are proven here first.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import stat
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from mlauth.testing import FakeMercadoLibre

INVALID_GRANT = {
    "error_description": "Error validating grant. Your authorization code or refresh token "
    "may be expired or it was already used",
    "error": "invalid_grant",
    "status": 400,
    "cause": [],
}
UNAUTHORIZED_SHAPES = [
    {"code": "unauthorized", "message": "invalid access token"},
    {"message": "invalid_token", "cause": [], "error": "not_found", "status": 401},
    {"message": "expired_token", "cause": [], "error": "not_found", "status": 401},
    {"message": "invalid access token", "error": "not_found", "status": 401},
]
ACCESS_RE = re.compile(r"APP_USR-1234567890123456-\d{6}-[0-9a-f]{32}-8035443")
REFRESH_RE = re.compile(r"TG-[0-9a-f]{24}-8035443")


def refresh(fake: FakeMercadoLibre, token: object, **overrides: str) -> requests.Response:
    data = {
        "grant_type": "refresh_token",
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "refresh_token": str(token),
        **overrides,
    }
    return requests.post(fake.token_url, data=data, timeout=10)


def exchange(fake: FakeMercadoLibre, code: str, **overrides: str) -> requests.Response:
    data = {
        "grant_type": "authorization_code",
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "code": code,
        "redirect_uri": "https://example.invalid/cb",
        **overrides,
    }
    return requests.post(fake.token_url, data=data, timeout=10)


def api(fake: FakeMercadoLibre, token: object, path: str = "/users/me") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return requests.get(fake.base_url + path, headers=headers, timeout=10)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until ``condition`` holds; False if the deadline passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def connect(fake: FakeMercadoLibre) -> socket.socket:
    """A raw client socket, for what requests cannot do: hang up mid-request, send half."""
    host, port = fake.host.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def raw_refresh_request(fake: FakeMercadoLibre, token: object) -> bytes:
    body = (
        f"grant_type=refresh_token&client_id={fake.client_id}"
        f"&client_secret={fake.client_secret}&refresh_token={token}"
    ).encode()
    head = (
        f"POST /oauth/token HTTP/1.1\r\nHost: {fake.host}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.fixture
def short_lived() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=0.3) as fake:
        yield fake


def test_refresh_rotates_and_old_refresh_token_gets_invalid_grant(
    fake_ml: FakeMercadoLibre,
) -> None:
    first = fake_ml.issue_tokens()
    answer = refresh(fake_ml, first["refresh_token"])
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert set(body) == {
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "user_id",
        "refresh_token",
    }
    assert ACCESS_RE.fullmatch(body["access_token"])
    assert REFRESH_RE.fullmatch(body["refresh_token"])
    assert body["refresh_token"] != first["refresh_token"]
    assert body["expires_in"] == 21600
    assert isinstance(body["expires_in"], int)
    assert (body["token_type"], body["scope"], body["user_id"]) == (
        "bearer",
        "offline_access read write",
        8035443,
    )

    reused = refresh(fake_ml, first["refresh_token"])
    assert reused.status_code == 400
    assert reused.json() == INVALID_GRANT
    assert refresh(fake_ml, body["refresh_token"]).status_code == 200


def test_issue_tokens_mints_a_working_pair_without_counting_a_refresh(
    fake_ml: FakeMercadoLibre,
) -> None:
    tokens = fake_ml.issue_tokens(lifetime=60)
    assert tokens["expires_in"] == 60
    assert api(fake_ml, tokens["access_token"]).status_code == 200
    assert fake_ml.stats()["refreshes"] == 0
    assert fake_ml.refresh_times() == []


@pytest.mark.parametrize("kill", [True, False])
def test_old_access_token_dies_at_rotation_unless_disabled(
    fake_ml: FakeMercadoLibre, kill: bool
) -> None:
    fake_ml.kill_old_access_on_refresh = kill
    first = fake_ml.issue_tokens()
    assert api(fake_ml, first["access_token"]).status_code == 200
    second = refresh(fake_ml, first["refresh_token"]).json()

    assert api(fake_ml, first["access_token"]).status_code == (401 if kill else 200)
    assert api(fake_ml, second["access_token"]).status_code == 200


def test_access_token_expires_after_its_lifetime(short_lived: FakeMercadoLibre) -> None:
    fake = short_lived
    short = refresh(fake, fake.issue_tokens()["refresh_token"]).json()
    assert short["expires_in"] == 0.3
    control = fake.issue_tokens(lifetime=3600)

    assert wait_for(lambda: api(fake, short["access_token"]).status_code == 401)
    # Same server, same moment: only the lifetime differs, so expiry is what killed it.
    assert api(fake, control["access_token"]).status_code == 200


def test_401_bodies_rotate_through_every_known_shape(fake_ml: FakeMercadoLibre) -> None:
    answers = [api(fake_ml, "APP_USR-not-a-token") for _ in range(2 * len(UNAUTHORIZED_SHAPES))]
    answers.append(requests.get(fake_ml.base_url + "/users/me", timeout=10))  # no header

    assert all(answer.status_code == 401 for answer in answers)
    assert all("WWW-Authenticate" not in answer.headers for answer in answers)
    assert all(answer.headers["Content-Type"] == "application/json" for answer in answers)
    bodies = [answer.json() for answer in answers]
    assert all(shape in bodies for shape in UNAUTHORIZED_SHAPES)
    assert all(body in UNAUTHORIZED_SHAPES for body in bodies)
    assert fake_ml.stats()["api_401"] == len(answers)


def test_token_in_query_string_is_rejected(fake_ml: FakeMercadoLibre) -> None:
    token = fake_ml.issue_tokens()["access_token"]
    url = fake_ml.base_url + "/users/me"
    assert requests.get(url, params={"access_token": token}, timeout=10).status_code == 401
    both = requests.get(
        url,
        params={"access_token": token},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert both.status_code == 401
    assert api(fake_ml, token).status_code == 200


def test_wrong_client_secret_is_invalid_client_and_spends_nothing(
    fake_ml: FakeMercadoLibre,
) -> None:
    tokens = fake_ml.issue_tokens()
    answer = refresh(fake_ml, tokens["refresh_token"], client_secret="wrong")
    assert answer.status_code == 401
    assert answer.json() == {
        "message": "invalid client_id or client_secret",
        "error": "invalid_client",
        "status": 401,
        "cause": [],
    }
    assert fake_ml.stats()["invalid_client"] == 1
    assert refresh(fake_ml, tokens["refresh_token"]).status_code == 200


def test_bad_requests_get_oauth_errors(fake_ml: FakeMercadoLibre) -> None:
    tokens = fake_ml.issue_tokens()
    unsupported = refresh(fake_ml, tokens["refresh_token"], grant_type="password")
    assert (unsupported.status_code, unsupported.json()["error"]) == (
        400,
        "unsupported_grant_type",
    )
    missing = refresh(fake_ml, "", grant_type="refresh_token")
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_request")
    assert refresh(fake_ml, tokens["refresh_token"]).status_code == 200


def test_injected_503_with_retry_after_then_success(fake_ml: FakeMercadoLibre) -> None:
    tokens = fake_ml.issue_tokens()
    fake_ml.fail_next_token_requests(1, retry_after=2)

    failed = refresh(fake_ml, tokens["refresh_token"])
    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "2"
    assert failed.json() == {
        "message": "Service Unavailable",
        "error": "server_error",
        "status": 503,
        "cause": [],
    }
    # Not consumed: the same refresh token works on the retry.
    assert refresh(fake_ml, tokens["refresh_token"]).status_code == 200
    assert fake_ml.stats()["faults"] == 1


def test_consuming_fault_spends_the_refresh_token(fake_ml: FakeMercadoLibre) -> None:
    tokens = fake_ml.issue_tokens()
    fake_ml.fail_next_token_requests(1, status=502, error="bad_gateway", consume=True)

    failed = refresh(fake_ml, tokens["refresh_token"])
    assert failed.status_code == 502
    assert "Retry-After" not in failed.headers
    retried = refresh(fake_ml, tokens["refresh_token"])
    assert retried.status_code == 400
    assert retried.json() == INVALID_GRANT


def test_reset_drops_the_connection_without_answer(fake_ml: FakeMercadoLibre) -> None:
    tokens = fake_ml.issue_tokens()
    fake_ml.reset_next_token_requests(2)

    for _ in range(2):
        with pytest.raises(requests.ConnectionError):
            refresh(fake_ml, tokens["refresh_token"])
    assert refresh(fake_ml, tokens["refresh_token"]).status_code == 200
    assert fake_ml.stats()["faults"] == 2


def test_fault_with_raw_body_is_not_json(fake_ml: FakeMercadoLibre) -> None:
    fake_ml.fail_next_token_requests(1, status=500, body="<html>not json</html>")
    answer = refresh(fake_ml, fake_ml.issue_tokens()["refresh_token"])
    assert answer.status_code == 500
    assert answer.text == "<html>not json</html>"
    with pytest.raises(requests.JSONDecodeError):
        answer.json()


def test_redirect_needs_no_token(fake_ml: FakeMercadoLibre) -> None:
    target = "https://cdn.example.invalid/image.jpg"
    answer = requests.get(
        fake_ml.base_url + "/redirect",
        params={"to": target},
        allow_redirects=False,  # never follow: the target is not on loopback
        timeout=10,
    )
    assert answer.status_code == 302
    assert answer.headers["Location"] == target


def test_forbidden_is_403_with_policy_body(fake_ml: FakeMercadoLibre) -> None:
    token = fake_ml.issue_tokens()["access_token"]
    answer = api(fake_ml, token, "/forbidden")
    assert answer.status_code == 403
    assert answer.json()["code"] == "PA_UNAUTHORIZED_RESULT_FROM_POLICIES"
    assert answer.json()["blocked_by"] == "PolicyAgent"
    assert api(fake_ml, "bad", "/forbidden").status_code == 401  # auth comes first
    assert fake_ml.stats()["api_403"] == 1


def test_set_cookie_comes_back_in_the_echo(fake_ml: FakeMercadoLibre) -> None:
    headers = {"Authorization": f"Bearer {fake_ml.issue_tokens()['access_token']}"}
    with requests.Session() as session:
        setter = session.get(fake_ml.base_url + "/set-cookie?session=abc", headers=headers)
        assert setter.headers["Set-Cookie"] == "session=abc; Path=/"
        echo = session.get(fake_ml.base_url + "/items", headers=headers).json()
    assert echo["cookie"] == "session=abc"


def test_echo_reports_chunked_and_sized_bodies(fake_ml: FakeMercadoLibre) -> None:
    headers = {"Authorization": f"Bearer {fake_ml.issue_tokens()['access_token']}"}
    parts = [b"first part,", b"", b"second part", b"x" * 70000]
    payload = b"".join(parts)
    with requests.Session() as session:  # one keep-alive connection: framing must hold
        chunked = session.post(
            fake_ml.base_url + "/items?site=MLA", data=iter(parts), headers=headers
        )
        sized = session.put(
            fake_ml.base_url + "/items/1",
            data=payload,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
    assert chunked.request.headers["Transfer-Encoding"] == "chunked"
    assert chunked.json() == {
        "method": "POST",
        "path": "/items?site=MLA",
        "user_id": 8035443,
        "body_length": len(payload),
        "body_sha256": hashlib.sha256(payload).hexdigest(),
        "content_type": None,
        "cookie": None,
    }
    assert sized.json()["method"] == "PUT"
    assert sized.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert sized.json()["content_type"] == "application/octet-stream"


def test_authorization_code_is_single_use_and_checks_redirect_uri(
    fake_ml: FakeMercadoLibre,
) -> None:
    code = fake_ml.issue_authorization_code("https://example.invalid/cb")
    assert REFRESH_RE.fullmatch(code)
    assert exchange(fake_ml, code, redirect_uri="https://example.invalid/other").json() == (
        INVALID_GRANT
    )
    answer = exchange(fake_ml, code)
    assert answer.status_code == 200
    assert api(fake_ml, answer.json()["access_token"]).status_code == 200
    assert refresh(fake_ml, answer.json()["refresh_token"]).status_code == 200
    assert exchange(fake_ml, code).status_code == 400
    assert fake_ml.stats()["code_exchanges"] == 1


def test_authorization_code_with_pkce_needs_the_matching_verifier(
    fake_ml: FakeMercadoLibre,
) -> None:
    verifier = "a-verifier-that-is-long-enough-for-pkce-0123456789abcdef"
    digest = hashlib.sha256(verifier.encode()).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    code = fake_ml.issue_authorization_code("https://example.invalid/cb", challenge)

    assert exchange(fake_ml, code).status_code == 400  # verifier missing
    assert exchange(fake_ml, code, code_verifier="wrong").status_code == 400
    assert exchange(fake_ml, code, code_verifier=verifier).status_code == 200
    assert fake_ml.stats()["code_exchanges"] == 1
    assert fake_ml.stats()["invalid_grant"] == 2


def test_write_env_writes_every_key_with_mode_0600(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    path = tmp_path / ".env"
    tokens = fake_ml.write_env(path, expires_at=1700000000.5, extra={"OTHER": "kept"})

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines() == [
        f"ML_CLIENT_ID={fake_ml.client_id}",
        f"ML_CLIENT_SECRET={fake_ml.client_secret}",
        f"ML_ACCESS_TOKEN={tokens['access_token']}",
        f"ML_REFRESH_TOKEN={tokens['refresh_token']}",
        f"ML_TOKEN_URL={fake_ml.token_url}",
        f"ML_API_HOSTS={fake_ml.host}",
        "ML_TOKEN_EXPIRES_AT=1700000000.5",
        "OTHER=kept",
    ]
    assert api(fake_ml, tokens["access_token"]).status_code == 200


def test_write_env_without_access_token(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("OLD=1\n")
    path.chmod(0o644)
    tokens = fake_ml.write_env(path, include_access=False)
    text = path.read_text()
    assert "ML_ACCESS_TOKEN" not in text
    assert "ML_TOKEN_EXPIRES_AT" not in text
    assert "OLD" not in text
    assert f"ML_REFRESH_TOKEN={tokens['refresh_token']}\n" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_fake_ml_env_fixture_points_at_the_fake(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    values = dict(line.split("=", 1) for line in fake_ml_env.read_text().splitlines())
    assert values["ML_TOKEN_URL"] == fake_ml.token_url
    assert values["ML_API_HOSTS"] == fake_ml.host
    assert refresh(fake_ml, values["ML_REFRESH_TOKEN"]).status_code == 200


def test_client_gone_during_token_delay_is_abandoned_and_spends_nothing(
    fake_ml: FakeMercadoLibre,
) -> None:
    tokens = fake_ml.issue_tokens()
    request = raw_refresh_request(fake_ml, tokens["refresh_token"])
    # Long enough that closing the socket right after the server starts waiting always
    # lands inside the delay; the Event, not a sleep, tells the test when to close.
    fake_ml.token_delay = 1.0
    with connect(fake_ml) as client:
        client.sendall(request)
        assert fake_ml.token_requests_in_flight.wait(10)
    assert wait_for(lambda: fake_ml.stats()["abandoned"] == 1)
    assert wait_for(lambda: not fake_ml.token_requests_in_flight.is_set())

    stats = fake_ml.stats()
    assert (stats["token_requests"], stats["refreshes"], stats["invalid_grant"]) == (1, 0, 0)
    # A client that stays connected through the delay gets its answer, with the same token.
    fake_ml.token_delay = 0.2
    assert refresh(fake_ml, tokens["refresh_token"]).status_code == 200
    assert fake_ml.stats()["abandoned"] == 1


def test_in_flight_event_stays_set_until_the_last_token_request_ends(
    fake_ml: FakeMercadoLibre,
) -> None:
    slow, fast = fake_ml.issue_tokens(), fake_ml.issue_tokens()
    request = raw_refresh_request(fake_ml, slow["refresh_token"])
    assert not fake_ml.token_requests_in_flight.is_set()
    with connect(fake_ml) as client:
        # Half the body: the server holds this request open until the rest arrives, so the
        # overlap is certain rather than a matter of timing.
        client.sendall(request[:-5])
        assert fake_ml.token_requests_in_flight.wait(10)
        assert refresh(fake_ml, fast["refresh_token"]).status_code == 200
        assert fake_ml.token_requests_in_flight.is_set()  # the slow one is still in progress

        client.sendall(request[-5:])
        assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert wait_for(lambda: not fake_ml.token_requests_in_flight.is_set())
    assert fake_ml.stats()["refreshes"] == 2


def test_concurrent_refreshes_with_one_token_have_one_winner(fake_ml: FakeMercadoLibre) -> None:
    token = fake_ml.issue_tokens()["refresh_token"]
    barrier = threading.Barrier(8)
    statuses: list[int] = []

    def spend() -> None:
        barrier.wait(10)
        statuses.append(refresh(fake_ml, token).status_code)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(statuses) == [200] + [400] * 7
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["invalid_grant"] == 7


def test_revoked_refresh_tokens_get_invalid_grant(fake_ml: FakeMercadoLibre) -> None:
    tokens = fake_ml.issue_tokens()
    fake_ml.revoke_refresh_tokens()
    assert refresh(fake_ml, tokens["refresh_token"]).json() == INVALID_GRANT
    assert api(fake_ml, tokens["access_token"]).status_code == 200


def test_stats_count_each_kind_of_request(fake_ml: FakeMercadoLibre) -> None:
    tokens = fake_ml.issue_tokens()
    api(fake_ml, tokens["access_token"])
    api(fake_ml, "bad")
    api(fake_ml, tokens["access_token"], "/forbidden")
    new = refresh(fake_ml, tokens["refresh_token"]).json()
    refresh(fake_ml, tokens["refresh_token"])
    refresh(fake_ml, new["refresh_token"], client_id="other")
    fake_ml.fail_next_token_requests(1)
    refresh(fake_ml, new["refresh_token"])

    snapshot = fake_ml.stats()
    assert snapshot == {
        "api_calls": 3,
        "api_ok": 1,
        "api_401": 1,
        "api_403": 1,
        "token_requests": 4,
        "refreshes": 1,
        "code_exchanges": 0,
        "invalid_grant": 1,
        "invalid_client": 1,
        "faults": 1,
        "abandoned": 0,
    }
    times = fake_ml.refresh_times()
    assert len(times) == 1
    snapshot["api_calls"] = 99
    times.append(0.0)
    assert fake_ml.stats()["api_calls"] == 3  # a copy, not the live counters
    assert len(fake_ml.refresh_times()) == 1

    fake_ml.reset_stats()
    assert set(fake_ml.stats().values()) == {0}
    assert fake_ml.refresh_times() == []


def test_server_survives_a_client_killed_mid_request(fake_ml: FakeMercadoLibre) -> None:
    with connect(fake_ml) as client:
        # Promise a body and die without sending it, with a reset instead of a clean close.
        client.sendall(b"PUT /items HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_for(lambda: fake_ml.stats()["api_calls"] == 1)
    assert api(fake_ml, fake_ml.issue_tokens()["access_token"]).status_code == 200


def test_stop_is_idempotent_and_closes_the_port() -> None:
    fake = FakeMercadoLibre().start()
    url = fake.base_url
    with requests.Session() as session:
        assert session.get(url + "/users/me", timeout=10).status_code == 401
        fake.stop()
        fake.stop()
        with pytest.raises(requests.ConnectionError):
            session.get(url + "/users/me", timeout=10)
    with pytest.raises(RuntimeError):
        fake.start()


def test_the_authorization_page_redirects_with_a_code_and_the_state(
    fake_ml: FakeMercadoLibre,
) -> None:
    page = f"{fake_ml.base_url}/authorization"
    redirect = "https://example.test/callback?keep=1"
    query = {
        "response_type": "code",
        "client_id": fake_ml.client_id,
        "redirect_uri": redirect,
        "state": "s-1",
    }
    answer = requests.get(page, params=query, allow_redirects=False, timeout=10)
    assert answer.status_code == 302
    location = urllib.parse.urlsplit(answer.headers["Location"])
    got = urllib.parse.parse_qs(location.query)
    assert location.netloc == "example.test" and got["keep"] == ["1"]
    assert got["state"] == ["s-1"]
    (code,) = got["code"]
    exchange = {
        "grant_type": "authorization_code",
        "client_id": fake_ml.client_id,
        "client_secret": fake_ml.client_secret,
        "code": code,
        "redirect_uri": redirect,
    }
    assert requests.post(fake_ml.token_url, data=exchange, timeout=10).status_code == 200
    # Single use, like a real code.
    assert requests.post(fake_ml.token_url, data=exchange, timeout=10).status_code == 400


def test_the_authorization_page_refuses_an_unknown_app_and_a_bad_request(
    fake_ml: FakeMercadoLibre,
) -> None:
    page = f"{fake_ml.base_url}/authorization"
    base = {"response_type": "code", "redirect_uri": "https://example.test/cb", "state": "s"}
    unknown = requests.get(page, params={**base, "client_id": "999"}, allow_redirects=False)
    assert unknown.status_code == 400 and "Location" not in unknown.headers
    token = requests.get(
        page,
        params={**base, "client_id": fake_ml.client_id, "response_type": "token"},
        allow_redirects=False,
    )
    assert token.status_code == 302
    got = urllib.parse.parse_qs(urllib.parse.urlsplit(token.headers["Location"]).query)
    assert got["error"] == ["unsupported_response_type"] and "code" not in got
    assert fake_ml.stats()["code_exchanges"] == 0
