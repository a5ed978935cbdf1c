"""A real Sentry client, as a pipeline would set it up, sends no secret when a token call fails.

Sentry's Python SDK sends the local variables of every frame of a captured exception (the
default, ``include_local_variables=True``), turns log records into breadcrumbs and events,
and records HTTP calls. Its transport here keeps the envelopes in memory: nothing leaves the
machine. The failures are those of test_secrets_frames.py, on real loopback servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

import mlauth
from mlauth.cli.login import complete_login
from mlauth.httpx import HttpxAuth
from mlauth.stores.envfile import update_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.leaks import (
    ECHOES,
    FAILURES,
    NEW_ACCESS,
    NEW_REFRESH,
    ODD_SECRET,
    arrange,
    assert_no_secret,
    echo_server,
    failure,
)

REDIRECT = "https://example.com/callback"


class MemoryTransport(Transport):
    """Keeps what the client would send, as it would send it (serialized envelopes)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.sent.append(envelope.serialize())

    def events(self) -> list[dict[str, Any]]:
        found = []
        for raw in self.sent:
            for item in Envelope.deserialize(raw).items:
                payload = item.payload.json
                if item.type == "event" and payload is not None:
                    found.append(payload)
        return found

    def text(self) -> str:
        return b"\n".join(self.sent).decode("utf-8")


@pytest.fixture
def sentry() -> Iterator[MemoryTransport]:
    transport = MemoryTransport()
    sentry_sdk.init(
        dsn="https://public@sentry.invalid/1",  # never contacted: the transport keeps all
        transport=transport,
        include_local_variables=True,  # the default, said outright
        # DEBUG lines as breadcrumbs, WARNING and above as events of their own.
        integrations=[LoggingIntegration(level=logging.DEBUG, event_level=logging.WARNING)],
        max_breadcrumbs=500,
    )
    try:
        yield transport
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.Scope.get_global_scope().set_client(None)  # back to no client


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(client_secret=ODD_SECRET) as server:
        yield server


def frames_with_locals(event: dict[str, Any]) -> int:
    return sum(
        1
        for value in (event.get("exception") or {}).get("values", [])
        for frame in (value.get("stacktrace") or {}).get("frames", [])
        if frame.get("vars")
    )


def report(error: BaseException, sentry: MemoryTransport) -> list[dict[str, Any]]:
    """Send ``error`` as a pipeline's ``except`` clause would; every event sent so far."""
    sentry_sdk.capture_exception(error)
    sentry_sdk.flush()
    events = sentry.events()
    assert any(frames_with_locals(event) for event in events), "no frame's locals were sent"
    return events


@pytest.mark.parametrize("how", FAILURES)
def test_no_secret_reaches_sentry_from_a_failed_refresh(
    how: str,
    fake: FakeMercadoLibre,
    sentry: MemoryTransport,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = tmp_path / ".env"
    first = fake.write_env(env, expires_at=time.time() - 1)
    caplog.set_level(logging.DEBUG)  # the records reach Sentry's handler at every level

    def call() -> None:
        with requests.Session() as session:
            session.auth = mlauth.MLAuth.from_env(env, backoff=0.001, max_attempts=2, **options)
            session.get(f"{fake.base_url}/users/me")

    with contextlib.ExitStack() as stack:
        options = arrange(how, fake, stack)
        error = failure(call)
    assert isinstance(error, mlauth.RefreshError), repr(error)
    report(error, sentry)
    found = [ODD_SECRET, str(first["refresh_token"]), str(first["access_token"])]
    assert_no_secret(sentry.text(), [*found, NEW_ACCESS, NEW_REFRESH], "a Sentry event")


def test_no_secret_reaches_sentry_through_an_async_client(
    fake: FakeMercadoLibre, sentry: MemoryTransport, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    first = fake.write_env(env, expires_at=time.time() - 1)
    with echo_server(ECHOES["4xx echoing the body"]) as url:
        auth = HttpxAuth.from_env(env, token_url=url)

        async def main() -> None:
            async with httpx.AsyncClient(auth=auth) as client:
                await client.get(f"{fake.base_url}/users/me")

        error = failure(lambda: asyncio.run(main()))
    assert isinstance(error, mlauth.RefreshError), repr(error)
    report(error, sentry)
    found = [ODD_SECRET, str(first["refresh_token"]), str(first["access_token"])]
    assert_no_secret(sentry.text(), found, "a Sentry event")


def test_no_secret_reaches_sentry_from_a_failed_code_exchange(
    fake: FakeMercadoLibre, sentry: MemoryTransport, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake.write_env(env)
    code = mlauth.Secret(fake.issue_authorization_code(REDIRECT))
    with echo_server(ECHOES["4xx echoing the body"]) as url:
        update_env_file(env, {"ML_TOKEN_URL": url})
        error = failure(
            lambda: complete_login(
                str(env), mlauth.EnvFileStore(env), code=code, redirect_uri=REDIRECT
            )
        )
    assert isinstance(error, mlauth.RefreshError), repr(error)
    report(error, sentry)
    assert_no_secret(sentry.text(), [ODD_SECRET, code.reveal()], "a Sentry event")


def test_a_warning_sent_to_sentry_holds_no_secret(
    fake: FakeMercadoLibre,
    sentry: MemoryTransport,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = tmp_path / ".env"
    first = fake.write_env(env, expires_at=time.time() + 60)  # refreshed ahead of expiry
    caplog.set_level(logging.DEBUG)
    with echo_server(ECHOES["4xx echoing the values"]) as url:
        auth = mlauth.MLAuth.from_env(env, token_url=url)
        assert requests.get(f"{fake.base_url}/users/me", auth=auth).status_code == 200
    sentry_sdk.flush()
    messages = [json.dumps(event.get("logentry")) for event in sentry.events()]
    assert any("refresh ahead of expiry failed" in line for line in messages), messages
    found = [ODD_SECRET, str(first["refresh_token"]), str(first["access_token"])]
    assert_no_secret(sentry.text(), found, "a Sentry event")
