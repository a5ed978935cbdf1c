"""Whatever a dependency raises, only an MLAuthError leaves the auth's request path.

Callers write ``except requests.RequestException`` (or ``except httpx.HTTPError``); anything
else escaping from a request (a ``RuntimeError`` from a lock library, a ``KeyError`` from a
store) would slip past it. Every case runs through requests, httpx.Client and
httpx.AsyncClient: the adapters differ, the boundary must not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import httpx
import pytest
import requests

import mlauth
from mlauth import MLAuth, MLAuthError, UnexpectedError
from mlauth.endpoint import TokenEndpoint
from mlauth.httpx import HttpxAuth
from mlauth.integrations.adapter import AuthAdapter
from mlauth.stores.envfile import read_env_file
from mlauth.stores.journal import Journal
from mlauth.testing import FakeMercadoLibre

KINDS: list[type[Exception]] = [RuntimeError, OSError, ValueError, KeyError]

# Where a dependency fails: a name and how to make it raise ``error`` (given the auth).
TARGETS: dict[str, Callable[[pytest.MonkeyPatch, MLAuth, Callable[..., None]], None]] = {
    "store.load": lambda mp, auth, boom: mp.setattr(auth.store, "load", boom),
    "store.stamp": lambda mp, auth, boom: mp.setattr(auth.store, "stamp", boom),
    "store.save": lambda mp, auth, boom: mp.setattr(auth.store, "save", boom),
    "store.lock": lambda mp, auth, boom: mp.setattr(auth.store, "lock", boom),
    "store.check_writable": lambda mp, auth, boom: mp.setattr(auth.store, "check_writable", boom),
    "token POST": lambda mp, auth, boom: mp.setattr(TokenEndpoint, "_post", boom),
    "filelock acquire": lambda mp, auth, boom: mp.setattr(filelock.FileLock, "acquire", boom),
    "journal append": lambda mp, auth, boom: mp.setattr(Journal, "_append", boom),
    "os.replace": lambda mp, auth, boom: mp.setattr(os, "replace", boom),
    "os.fsync": lambda mp, auth, boom: mp.setattr(os, "fsync", boom),
}


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


CLIENTS = ["requests", "httpx", "httpx-async"]


def auth_for(fake: FakeMercadoLibre, env: Path, path: str, client: str = "requests") -> Any:
    """An auth whose next request takes ``path``: "expired" (refresh before sending), "401"
    (a dead token the server refuses, refreshed in the response hook) or "ahead" (a valid
    token inside the refresh margin, refreshed on the advisory path)."""
    expires_at = {"expired": time.time() - 10, "401": time.time() + 3000}.get(
        path, time.time() + 60
    )
    fake.write_env(env, expires_at=expires_at)
    if path == "401":
        text = env.read_text().replace("ML_ACCESS_TOKEN=APP_USR-", "ML_ACCESS_TOKEN=APP_USR-dead")
        env.write_text(text)
    kind: type[AuthAdapter] = MLAuth if client == "requests" else HttpxAuth
    return kind.from_env(env, backoff=0.001, max_attempts=1)


def get(client: str, auth: Any, url: str) -> int:
    """GET ``url`` with ``auth`` through ``client``; the status code."""
    if client == "requests":
        with requests.Session() as session:
            session.auth = auth
            return session.get(url, timeout=30).status_code
    if client == "httpx":
        with httpx.Client(auth=auth, timeout=30) as sync_client:
            return sync_client.get(url).status_code

    async def go() -> int:
        async with httpx.AsyncClient(auth=auth, timeout=30) as async_client:
            return (await async_client.get(url)).status_code

    return asyncio.run(go())


def absorbed(target: str, kind: type[Exception]) -> bool:
    """Failures to save the new tokens are absorbed by design: they are kept in memory, the
    request goes on with them, and saving is retried (see RefreshEngine._sync). A failing
    ``os.replace`` is not among them: the save probe renames too, so it is found out before
    the refresh token is spent (a StoreError)."""
    return target == "store.save"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("path", ["expired", "401"])
@pytest.mark.parametrize("client", CLIENTS)
def test_only_mlauth_errors_reach_the_caller(
    client: str,
    path: str,
    target: str,
    kind: type[Exception],
    fake: FakeMercadoLibre,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = auth_for(fake, tmp_path / ".env", path, client)
    marker = f"boom-{kind.__name__}-in-{target}"

    def boom(*args: object, **kwargs: object) -> None:
        raise kind(marker)

    TARGETS[target](monkeypatch, auth, boom)
    url = f"{fake.base_url}/users/me"
    if absorbed(target, kind):
        assert get(client, auth, url) == 200
        # The refreshed tokens wait in memory: the file still holds the spent token.
        new = auth.tokens.refresh_token
        assert new is not None
        assert read_env_file(tmp_path / ".env")["ML_REFRESH_TOKEN"] != new.reveal()
        return
    with pytest.raises(MLAuthError) as caught:
        get(client, auth, url)
    assert isinstance(caught.value, requests.RequestException)
    if client != "requests":
        assert isinstance(caught.value, httpx.HTTPError)
    assert marker in str(caught.value)
    if isinstance(caught.value, UnexpectedError):
        assert type(caught.value.__cause__) is kind


def test_tokens_in_a_dependencys_message_are_masked(
    fake: FakeMercadoLibre, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = auth_for(fake, tmp_path / ".env", "expired")
    refresh = auth.tokens.refresh_token
    assert refresh is not None
    stranger = "APP_USR-1234567890123456-010101-notknownbythisprocess0000-8035443"

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyError(f"{refresh.reveal()} and {stranger} and {fake.client_secret}")

    monkeypatch.setattr(auth.store, "lock", boom)
    with pytest.raises(UnexpectedError) as caught:
        requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)
    message = str(caught.value)
    assert "KeyError" in message and refresh.fingerprint in message
    for value in (refresh.reveal(), stranger, fake.client_secret, "APP_USR", "TG-"):
        assert value not in message


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, mlauth.StoreError])
@pytest.mark.parametrize("client", CLIENTS)
def test_interrupts_and_mlauth_errors_pass_unwrapped(
    client: str,
    kind: type[BaseException],
    fake: FakeMercadoLibre,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raised = kind("stop")

    def boom(*args: object, **kwargs: object) -> None:
        raise raised

    for path in ("expired", "401"):
        auth = auth_for(fake, tmp_path / ".env", path, client)
        monkeypatch.setattr(auth.store, "lock", boom)
        with pytest.raises(kind) as caught:
            get(client, auth, f"{fake.base_url}/users/me")
        if client == "requests" or not isinstance(raised, MLAuthError):
            assert caught.value is raised
        else:  # the same error, made an httpx.HTTPError too: its class, message and fields
            assert type(caught.value).__mro__[1] is kind
            assert str(caught.value) == str(raised)
            assert vars(raised).items() <= vars(caught.value).items()


def test_an_unexpected_failure_ahead_of_expiry_keeps_the_valid_token(
    fake: FakeMercadoLibre,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = auth_for(fake, tmp_path / ".env", "ahead")

    def boom(timeout: float) -> None:
        raise ValueError("x")

    monkeypatch.setattr(auth.store, "lock", boom)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        response = requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)
    assert response.status_code == 200
    assert fake.stats()["refreshes"] == 0
    (record,) = [r for r in caplog.records if "ahead of expiry failed" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "unexpectedly while refreshing ahead of expiry: ValueError: x" in record.getMessage()
