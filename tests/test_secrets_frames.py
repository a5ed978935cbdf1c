"""No secret in any frame, message, pickle or log line, whichever way a token call fails.

Crash reporters (Sentry's Python SDK sends every frame's locals by default), ``pytest -l`` and
``traceback.TracebackException(capture_locals=True)`` show what an error's traceback and its
chain hold; a token endpoint or a proxy may echo the request body into its error answer. Each
case runs against real loopback servers, so requests', urllib3's and httpx's own frames are
part of it. test_secrets_sentry.py sends the same failures through a real Sentry client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

import mlauth
from mlauth.cli.login import complete_login
from mlauth.httpx import HttpxAuth
from mlauth.stores.envfile import update_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.leaks import (
    BROKEN_200,
    FAILURES,
    NEW_ACCESS,
    NEW_REFRESH,
    ODD_SECRET,
    QUOTED,
    arrange,
    assert_no_secret,
    echo_server,
    everything_said,
    failure,
    json_answer,
    logged,
    refusing_port,
)

CLIENTS = ["requests", "httpx", "httpx async"]
REDIRECT = "https://example.com/callback"


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(client_secret=ODD_SECRET) as server:
        yield server


def fail_a_request(client: str, env: Path, url: str, **options: Any) -> BaseException:
    """What one API call through ``client``'s auth raises."""
    options.setdefault("backoff", 0.001)
    options.setdefault("max_attempts", 2)  # a retry, and its DEBUG line, where one is due
    if client == "requests":

        def call() -> None:
            with requests.Session() as session:
                session.auth = mlauth.MLAuth.from_env(env, **options)
                session.get(url)

        return failure(call)
    auth = HttpxAuth.from_env(env, **options)
    if client == "httpx":

        def sync() -> None:
            with httpx.Client(auth=auth) as session:
                session.get(url)

        return failure(sync)

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth) as session:
            await session.get(url)

    return failure(lambda: asyncio.run(main()))


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("how", FAILURES)
def test_a_failed_refresh_shows_no_secret_anywhere(
    how: str,
    client: str,
    fake: FakeMercadoLibre,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = tmp_path / ".env"
    first = fake.write_env(env, expires_at=time.time() - 1)  # expired: the call refreshes
    caplog.set_level(logging.DEBUG)  # every logger: mlauth, urllib3, httpx, httpcore
    with contextlib.ExitStack() as stack:
        options = arrange(how, fake, stack)
        error = fail_a_request(client, env, f"{fake.base_url}/users/me", **options)

    assert isinstance(error, mlauth.RefreshError), repr(error)
    found = [ODD_SECRET, str(first["refresh_token"]), str(first["access_token"])]
    found += [NEW_ACCESS, NEW_REFRESH]  # in the broken 200's body
    assert_no_secret(everything_said(error), found, "the error")
    assert_no_secret(logged(caplog.records), found, "the log")
    if how in QUOTED:  # the echo is in the message, masked
        refresh = mlauth.fingerprint(str(first["refresh_token"]))
        assert refresh in str(error), str(error)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_401_whose_refresh_fails_shows_not_the_token_that_got_it(
    client: str, fake: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = tmp_path / ".env"
    first = fake.write_env(env)  # valid for hours: only the 401 makes the auth refresh
    # A token the server does not know, and not shaped like ML's: only a masked holder hides it.
    unknown = "opaque-access-token-fake-0001"
    update_env_file(env, {"ML_ACCESS_TOKEN": unknown})
    caplog.set_level(logging.DEBUG)
    with refusing_port() as port:
        error = fail_a_request(
            client,
            env,
            f"{fake.base_url}/users/me",
            token_url=f"http://127.0.0.1:{port}/oauth/token",
        )

    assert isinstance(error, mlauth.RefreshError), repr(error)
    assert fake.stats()["api_401"] == 1
    found = [unknown, ODD_SECRET, str(first["refresh_token"])]
    assert_no_secret(everything_said(error), found, "the error")
    assert_no_secret(logged(caplog.records), found, "the log")


def test_a_failed_refresh_ahead_of_expiry_logs_no_secret(
    fake: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = tmp_path / ".env"
    # Within the refresh margin: refreshed ahead, and on failure the current token is used.
    first = fake.write_env(env, expires_at=time.time() + 60)
    caplog.set_level(logging.DEBUG)
    with echo_server(
        lambda form, body: json_answer(
            400, {"error": "invalid_request", "error_description": body.decode()}
        )
    ) as url:
        auth = mlauth.MLAuth.from_env(env, token_url=url)
        assert requests.get(f"{fake.base_url}/users/me", auth=auth).status_code == 200

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("refresh ahead of expiry failed" in line for line in warnings), warnings
    assert any(mlauth.fingerprint(ODD_SECRET) in line for line in warnings), warnings
    found = [ODD_SECRET, str(first["refresh_token"]), str(first["access_token"])]
    assert_no_secret(logged(caplog.records), found, "the log")


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize("how", [h for h in FAILURES if "timeout" not in h])
def test_a_failed_code_exchange_shows_no_secret_anywhere(
    how: str, fake: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # (The timeouts are left out: `mlauth login` uses the default ones, 15 s to read. The
    # exchange goes through the same calls as the refresh, which the test above times out.)
    env = tmp_path / ".env"
    fake.write_env(env)
    # Held as Secrets from the start: the call below runs in a frame that holds them.
    verifier = mlauth.Secret(secrets.token_urlsafe(64))
    code = mlauth.Secret(fake.issue_authorization_code(REDIRECT, _s256(verifier.reveal())))
    if how == "invalid_grant":
        code = mlauth.Secret(f"TG-{secrets.token_hex(12)}-8035443")  # never issued
    caplog.set_level(logging.DEBUG)
    with contextlib.ExitStack() as stack:
        update_env_file(env, {"ML_TOKEN_URL": arrange(how, fake, stack)["token_url"]})
        error = failure(
            lambda: complete_login(
                str(env),
                mlauth.EnvFileStore(env),
                code=code,
                redirect_uri=REDIRECT,
                code_verifier=verifier,
            )
        )

    assert isinstance(error, mlauth.RefreshError), repr(error)
    found = [ODD_SECRET, code.reveal(), verifier.reveal(), NEW_ACCESS, NEW_REFRESH]
    assert_no_secret(everything_said(error), found, "the error")
    assert_no_secret(logged(caplog.records), found, "the log")
    if how in QUOTED:
        assert code.fingerprint in str(error), str(error)


def test_the_broken_200_body_is_what_the_server_sent(fake: FakeMercadoLibre) -> None:
    # The broken-answer case above must really carry the new tokens on the wire.
    fake.fail_next_token_requests(1, status=200, body=BROKEN_200)
    answer = requests.post(fake.token_url, data={"grant_type": "refresh_token"}, timeout=5)
    assert answer.status_code == 200 and NEW_REFRESH in answer.text


@pytest.mark.parametrize(
    "broken",
    [
        {"ML_TOKEN_URL": "http://evil.example/oauth/token"},  # refused: plain http
        {"ML_REFRESH_TOKEN": None},  # no refresh token: refused before any request
    ],
    ids=["token URL", "no refresh token"],
)
def test_a_configuration_error_shows_no_secret_in_its_frames(
    broken: dict[str, str | None], fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    first = fake.write_env(env)
    update_env_file(env, broken)
    error = failure(lambda: mlauth.MLAuth.from_env(env))
    assert isinstance(error, mlauth.ConfigError), repr(error)
    found = [ODD_SECRET, str(first["access_token"])]
    if "ML_REFRESH_TOKEN" not in broken:
        found.append(str(first["refresh_token"]))
    assert_no_secret(everything_said(error), found, "the error")


def test_a_secret_passed_as_a_str_leaves_no_frame_of_a_failed_construction(
    tmp_path: Path,
) -> None:
    env = tmp_path / ".env"
    env.write_text("ML_CLIENT_ID=1234567890123456\n")  # no tokens: the engine refuses
    store = mlauth.EnvFileStore(env)
    error = failure(lambda: mlauth.MLAuth("1234567890123456", ODD_SECRET, store))
    assert isinstance(error, mlauth.ConfigError), repr(error)
    assert_no_secret(everything_said(error), [ODD_SECRET], "the error")
