"""A real Sentry client, as a pipeline would set it up, sends no secret when a token call fails.

Sentry's Python SDK sends the local variables of every frame of a captured exception (by
default, in 2.x and 3.x alike), turns log records into breadcrumbs and events (with the stack
they were logged from), and records HTTP calls; tests/support/crash_reporter.py sets that up
as the installed major spells it. Its transport here keeps the envelopes in memory: nothing
leaves the machine. The failures are those of test_secrets_frames.py, on real loopback servers.
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
from sentry_sdk.transport import Transport

import mlauth
from mlauth.cli.login import complete_login
from mlauth.httpx import HttpxAuth
from mlauth.stores.envfile import update_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.crash_reporter import sentry_options
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
NOT_ANSWERED = {"refused", "connect timeout", "read timeout"}  # of FAILURES


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
        max_breadcrumbs=500,
        **sentry_options(),  # frame locals, log records, HTTP calls: as 2.x or 3.x spells it
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


def write_env(fake: FakeMercadoLibre, env: Path, expires_at: float) -> dict[str, mlauth.Secret]:
    """``fake.write_env``, its tokens held masked: the test's own frame is on the stack an
    event from a log record carries, and its locals go with it."""
    tokens = fake.write_env(env, expires_at=expires_at)
    return {name: mlauth.Secret(str(tokens[name])) for name in ("access_token", "refresh_token")}


def frames(event: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The frames of an event's exceptions and of the stack attached to it."""
    for key in ("exception", "threads"):
        for value in (event.get(key) or {}).get("values", []):
            yield from (value.get("stacktrace") or {}).get("frames", [])


def assert_mlauth_frames_sent_with_locals(events: list[dict[str, Any]]) -> None:
    """The control: were frame locals not collected, no secret could be found in them."""
    sent = [f for event in events for f in frames(event) if f.get("vars")]
    modules = {str(frame.get("module")) for frame in sent}
    assert any(module.startswith("mlauth.") for module in modules), sorted(modules)


def assert_breadcrumbs_sent(events: list[dict[str, Any]], *, answered: bool = True) -> None:
    """The control: mlauth's DEBUG records were breadcrumbs, and so were the HTTP calls made
    where an answer came (a call that got none is not recorded by every version)."""
    crumbs = [
        crumb for event in events for crumb in (event.get("breadcrumbs") or {}).get("values", [])
    ]
    kinds = {(crumb.get("type"), crumb.get("level")) for crumb in crumbs}
    logged = {crumb.get("category") for crumb in crumbs if crumb.get("type") == "log"}
    assert ("log", "debug") in kinds and "mlauth" in logged, (kinds, logged)
    assert any(kind == "http" for kind, _ in kinds) or not answered, kinds


def report(
    error: BaseException, sentry: MemoryTransport, *, answered: bool = True
) -> list[dict[str, Any]]:
    """Send ``error`` as a pipeline's ``except`` clause would; every event sent so far."""
    sentry_sdk.capture_exception(error)
    sentry_sdk.flush()
    events = sentry.events()
    assert_mlauth_frames_sent_with_locals(events)
    assert_breadcrumbs_sent(events, answered=answered)
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
    first = write_env(fake, env, expires_at=time.time() - 1)
    caplog.set_level(logging.DEBUG)  # the records reach Sentry's handler at every level

    def call() -> None:
        with requests.Session() as session:
            session.auth = mlauth.MLAuth.from_env(env, backoff=0.001, max_attempts=2, **options)
            session.get(f"{fake.base_url}/users/me")

    with contextlib.ExitStack() as stack:
        options = arrange(how, fake, stack)
        error = failure(call)
    assert isinstance(error, mlauth.RefreshError), repr(error)
    report(error, sentry, answered=how not in NOT_ANSWERED)
    found = [ODD_SECRET, first["refresh_token"].reveal(), first["access_token"].reveal()]
    assert_no_secret(sentry.text(), [*found, NEW_ACCESS, NEW_REFRESH], "a Sentry event")


def test_no_secret_reaches_sentry_through_an_async_client(
    fake: FakeMercadoLibre, sentry: MemoryTransport, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    first = write_env(fake, env, expires_at=time.time() - 1)
    with echo_server(ECHOES["4xx echoing the body"]) as url:
        auth = HttpxAuth.from_env(env, token_url=url)

        async def main() -> None:
            async with httpx.AsyncClient(auth=auth) as client:
                await client.get(f"{fake.base_url}/users/me")

        error = failure(lambda: asyncio.run(main()))
    assert isinstance(error, mlauth.RefreshError), repr(error)
    report(error, sentry)
    found = [ODD_SECRET, first["refresh_token"].reveal(), first["access_token"].reveal()]
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
    first = write_env(fake, env, expires_at=time.time() + 60)  # refreshed ahead of expiry
    caplog.set_level(logging.DEBUG)
    with echo_server(ECHOES["4xx echoing the values"]) as url:
        auth = mlauth.MLAuth.from_env(env, token_url=url)
        assert requests.get(f"{fake.base_url}/users/me", auth=auth).status_code == 200
    sentry_sdk.flush()
    events = sentry.events()
    messages = [json.dumps(event.get("logentry")) for event in events]
    warned = [
        event
        for event, line in zip(events, messages, strict=True)
        if "ahead of expiry failed" in line
    ]
    assert warned, messages
    assert_mlauth_frames_sent_with_locals(warned)  # the stack it was logged from, with locals
    assert_breadcrumbs_sent(events)
    found = [ODD_SECRET, first["refresh_token"].reveal(), first["access_token"].reveal()]
    assert_no_secret(sentry.text(), found, "a Sentry event")
