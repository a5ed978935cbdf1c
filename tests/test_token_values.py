"""Token values are checked before they are sent or saved, wherever they come from.

A token with CR, LF, NUL or a character outside latin-1 breaks the request that carries it
(requests and httpx raise errors that quote the whole header), and nothing would ever
refresh it. So: a stored access token that cannot be one is not sent but refreshed (the
refresh token is all a refresh needs); a stored refresh token that cannot be one stops
everything with an error naming the key and the fix, never the value. The same for the
``.env``, for Redis and for a custom store.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Hashable
from pathlib import Path

import httpx
import pytest
import requests

import mlauth
import mlauth.httpx
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores import store_from_env
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from mlauth.tokens import MAX_TOKEN_LENGTH, token_problem
from tests.support.cli import mlauth_cli as cli
from tests.support.hostile_answers import BAD_TOKEN_STRINGS, assert_not_in, assert_valid_bearer

BAD = BAD_TOKEN_STRINGS


def quoted(value: str) -> str:
    """``value`` as a double-quoted .env value python-dotenv reads back as it is."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "\\r").replace("\n", "\\n") + '"'


def env_with(fake: FakeMercadoLibre, folder: Path, key: str, value: str) -> Path:
    """A valid .env for ``fake`` (token not expired) whose ``key`` holds ``value``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".env"
    tokens = fake.write_env(path, expires_at=time.time() + 3600, include_access=False)
    values = {
        "ML_ACCESS_TOKEN": str(tokens["access_token"]),
        "ML_REFRESH_TOKEN": str(tokens["refresh_token"]),
        key: value,
    }
    lines = [
        line
        for line in path.read_text().splitlines()
        if not line.startswith(("ML_ACCESS_TOKEN=", "ML_REFRESH_TOKEN="))
    ]
    lines += [f"{name}={quoted(text)}" for name, text in values.items()]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    assert read_env_file(path)[key] == value  # the file really holds the bad value
    return path


# -- the one check -------------------------------------------------------------------------


def test_the_check_takes_rfc6750_tokens_and_names_what_is_wrong_without_quoting() -> None:
    for good in ("APP_USR-123-010101-abc-8035443", "TG-5b90-8035443", "a.b_c~d+e/f==", "x"):
        assert token_problem(good) is None
    assert token_problem("A" * MAX_TOKEN_LENGTH) is None
    for value in BAD.values():
        problem = token_problem(value)
        assert problem is not None and value not in problem
    assert token_problem("a=b") is not None  # '=' only at the end
    assert token_problem(None) == "is null, not a string"


# -- the .env --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_a_bad_access_token_in_the_env_is_refreshed_never_sent(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    env = env_with(fake_ml, tmp_path, "ML_ACCESS_TOKEN", value)
    with caplog.at_level(logging.DEBUG, logger="mlauth"):
        auth = mlauth.MLAuth.from_env(env)
        response = requests.get(f"{fake_ml.base_url}/users/me", auth=auth, timeout=30)
    assert response.status_code == 200
    assert_valid_bearer(response.request.headers["Authorization"])
    assert fake_ml.stats()["refreshes"] == 1 and fake_ml.stats()["api_401"] == 0
    assert read_env_file(env)["ML_ACCESS_TOKEN"] != value
    warning = [r.getMessage() for r in caplog.records if "ML_ACCESS_TOKEN" in r.getMessage()]
    assert warning and str(env) in warning[0] and "refreshes it" in warning[0]
    assert_not_in(caplog.text + repr(auth), value)


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_a_bad_refresh_token_in_the_env_is_a_config_error_that_never_quotes_it(
    fake_ml: FakeMercadoLibre, tmp_path: Path, value: str
) -> None:
    env = env_with(fake_ml, tmp_path, "ML_REFRESH_TOKEN", value)
    with pytest.raises(mlauth.ConfigError) as caught:
        mlauth.MLAuth.from_env(env)
    message = str(caught.value)
    assert str(env) in message and "ML_REFRESH_TOKEN" in message and "mlauth login" in message
    assert_not_in(message + repr(caught.value), value)
    assert fake_ml.stats()["token_requests"] == 0
    done = cli("status", "--env", str(env))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "ML_REFRESH_TOKEN" in done.stderr
    assert_not_in(done.stdout + done.stderr, value)


def test_httpx_never_sends_a_bad_access_token_either(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = env_with(fake_ml, tmp_path, "ML_ACCESS_TOKEN", BAD["crlf"])
    with httpx.Client(auth=mlauth.httpx.HttpxAuth.from_env(env)) as client:
        response = client.get(f"{fake_ml.base_url}/users/me")
    assert response.status_code == 200
    assert_valid_bearer(response.request.headers["Authorization"])
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["api_401"] == 0  # refreshed before anything was sent


# -- a custom store ------------------------------------------------------------------------


class LyingStore(mlauth.EnvFileStore):
    """A custom store that hands over a bad token in place of the one in the file."""

    def __init__(self, path: Path, field: str, value: str) -> None:
        super().__init__(path)
        self.field, self.value = field, value
        self.original = read_env_file(path)["ML_ACCESS_TOKEN"]

    def load(self) -> tuple[mlauth.TokenSet, Hashable]:
        tokens, version = super().load()
        access = tokens.access_token
        if access is not None and access.reveal() == self.original:  # until the first refresh
            tokens = dataclasses.replace(tokens, **{self.field: mlauth.Secret(self.value)})
        return tokens, version


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_a_custom_stores_bad_access_token_is_refreshed_never_sent(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path, value: str
) -> None:
    store = LyingStore(fake_ml_env, "access_token", value)
    auth = mlauth.MLAuth.from_env(fake_ml_env, store=store)
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=auth, timeout=30)
    assert response.status_code == 200
    assert_valid_bearer(response.request.headers["Authorization"])
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["api_401"] == 0  # refreshed before anything was sent


def test_a_custom_stores_bad_refresh_token_is_never_sent(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    value = BAD["crlf"]
    store = LyingStore(env, "refresh_token", value)
    auth = mlauth.MLAuth.from_env(env, store=store)
    with pytest.raises(mlauth.StoreError, match="stored refresh token holds a line break") as e:
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth, timeout=30)
    assert_not_in(str(e.value) + repr(e.value), value)
    assert fake_ml.stats()["token_requests"] == 0


# -- Redis -----------------------------------------------------------------------------------


def redis_env(fake: FakeMercadoLibre, folder: Path, server: RedisServer, **fields: str) -> Path:
    """A .env whose tokens are in Redis, with ``fields`` of the hash set as given."""
    folder.mkdir(parents=True, exist_ok=True)
    env = folder / ".env"
    fake.write_env(env, expires_at=time.time() + 3600)
    migrate_to_redis(env, server.url)
    key = f"mlauth:{fake.client_id}:tokens"
    with server.client() as client:
        for name, value in fields.items():
            client.hset(key, name, value)
    return env


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_a_bad_access_token_in_redis_is_refreshed_never_sent(
    fake_ml: FakeMercadoLibre, tmp_path: Path, redis_server: RedisServer, value: str
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server, access_token=value)
    auth = mlauth.MLAuth.from_env(env)
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=auth, timeout=30)
    assert response.status_code == 200
    assert_valid_bearer(response.request.headers["Authorization"])
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["api_401"] == 0  # refreshed before anything was sent


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_a_bad_refresh_token_in_redis_is_a_store_error_that_never_quotes_it(
    fake_ml: FakeMercadoLibre, tmp_path: Path, redis_server: RedisServer, value: str
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server, refresh_token=value)
    with pytest.raises(mlauth.StoreError) as caught:
        mlauth.MLAuth.from_env(env)
    message = str(caught.value)
    assert "refresh_token" in message and f"mlauth:{fake_ml.client_id}:tokens" in message
    assert_not_in(message + repr(caught.value), value)
    assert fake_ml.stats()["token_requests"] == 0


ODD_HASHES = {
    "generation-word": {"generation": "abc"},
    "generation-negative": {"generation": "-3"},
    "generation-float": {"generation": "1.5"},
    "generation-huge": {"generation": "9" * 40},
    "expires-word": {"expires_at": "soon"},
    "expires-infinite": {"expires_at": "inf"},
    "refreshed-negative": {"refreshed_at": "-1"},
}


@pytest.mark.parametrize("fields", ODD_HASHES.values(), ids=ODD_HASHES.keys())
def test_a_redis_hash_with_odd_fields_is_a_store_error_naming_the_key_and_the_fix(
    fake_ml: FakeMercadoLibre, tmp_path: Path, redis_server: RedisServer, fields: dict[str, str]
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server, **fields)
    (field,) = fields
    key = f"mlauth:{fake_ml.client_id}:tokens"
    with pytest.raises(mlauth.StoreError) as from_env:
        mlauth.MLAuth.from_env(env)
    with pytest.raises(mlauth.StoreError) as installed:
        mlauth.install(env)
    mlauth.uninstall()
    for error in (from_env.value, installed.value):
        message = str(error)
        assert key in message and field in message
        assert "HSET" in message or "HDEL" in message  # the fix
        assert_not_in(message, fields[field])
    done = cli("status", "--env", str(env))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and key in done.stderr and field in done.stderr


# -- what a store writes ------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD.values(), ids=BAD.keys())
def test_a_store_never_writes_a_token_that_cannot_be_one(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path, redis_server: RedisServer, value: str
) -> None:
    # Whoever calls save() (a migration script, a custom tool) may hand over anything.
    env_store = mlauth.EnvFileStore(fake_ml_env)
    redis_store = store_from_env(redis_env(fake_ml, fake_ml_env.parent / "r", redis_server))
    for store in (env_store, redis_store):
        tokens, version = store.load()
        before = fake_ml_env.read_bytes()
        bad_refresh = dataclasses.replace(tokens, refresh_token=mlauth.Secret(value))
        with pytest.raises(mlauth.StoreError, match="refusing to save a refresh token") as e:
            store.save(bad_refresh, replaces=version)
        assert_not_in(str(e.value), value)
        assert fake_ml_env.read_bytes() == before and store.load()[0] == tokens
        bad_access = dataclasses.replace(tokens, access_token=mlauth.Secret(value))
        store.save(bad_access, replaces=store.load()[1])
        saved, _ = store.load()
        assert saved.access_token is None and saved.refresh_token == tokens.refresh_token
    assert fake_ml_env.read_text().count("\n") == before.decode().count("\n")  # no line added
