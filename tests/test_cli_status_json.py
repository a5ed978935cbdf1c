"""``mlauth status --json`` and ``mlauth check`` on the ``.env`` and on Redis: every document
validated against the schema the package ships, each command a real process run without
flags in the folder of its ``.env`` (``--env`` only where the case needs another file)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import jsonschema
import pytest
import redis

import mlauth
from mlauth.cli.migrate import migrate_to_redis
from mlauth.schemas import status_schema
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer, free_port
from tests.support.cli import assert_clean_failure, mlauth_cli, secrets_in
from tests.support.lock_holder import lock_held_by_another_process
from tests.support.mounts import remount_read_only, tmpfs
from tests.support.pending_answer import answer_pending
from tests.support.status_json import VALIDATOR, assert_hides, status_json

pytestmark = pytest.mark.processes

REDIS_PASSWORD = "fake-redis-password-for-status-json"


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def redis_hash(url: str, client_id: str) -> dict[str, str]:
    with redis.Redis.from_url(url, decode_responses=True) as client:
        values: dict[str, str] = client.hgetall(f"mlauth:{client_id}:tokens")
    return values


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The test server, behind a password, as a .env names it."""
    with redis_server.client() as client:
        client.config_set("requirepass", REDIS_PASSWORD)
    return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/0"


def chain_in(
    store: str, fake_ml: FakeMercadoLibre, folder: Path, url: str, **kwargs: object
) -> Path:
    """A .env in ``folder`` whose tokens are in the ``store`` named ("env" or "redis")."""
    env = folder / ".env"
    fake_ml.write_env(env, **kwargs)  # type: ignore[arg-type]
    if store == "redis":
        migrate_to_redis(env, url)
    return env


# -- ok --------------------------------------------------------------------------------------


def test_the_shipped_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = status_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    shipped = Path(mlauth.__file__).parent / "schemas" / "status.schema.json"
    assert json.loads(shipped.read_text()) == schema
    assert schema["properties"]["schema"] == {"const": "mlauth-status/1"}


@pytest.mark.parametrize("store", ["env", "redis"])
def test_a_fresh_chain_is_ok_with_fingerprints_and_the_last_refresh(
    fake_ml: FakeMercadoLibre, tmp_path: Path, redis_url: str, store: str
) -> None:
    env = chain_in(store, fake_ml, tmp_path, redis_url, expires_at=time.time() + 3600)
    mlauth.MLAuth.from_env(env).refresh()  # by this process: refreshed_by names it
    tokens = mlauth.stores.store_from_env(env).load()[0]
    assert tokens.access_token is not None and tokens.refresh_token is not None

    done, doc = status_json(cwd=tmp_path)  # no flags: ./.env
    check = mlauth_cli("check", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert doc["state"] == "ok" and doc["reasons"] == []
    assert doc["env"] == str(env)
    assert doc["store"]["kind"] == {"env": "env_file", "redis": "redis"}[store]
    assert doc["store"]["readable"] is True
    assert doc["store"]["seller"] is None  # a one-seller store's chain is nobody's in particular
    assert doc["tokens"]["access_token_fingerprint"] == tokens.access_token.fingerprint
    assert doc["tokens"]["refresh_token_fingerprint"] == tokens.refresh_token.fingerprint
    assert doc["tokens"]["expired"] is False
    assert 0 < doc["tokens"]["seconds_left"] <= fake_ml.token_lifetime
    assert doc["tokens"]["last_refresh"]["by"].startswith(f"pid {os.getpid()}@")
    assert abs(doc["tokens"]["last_refresh"]["at"]["unix"] - time.time()) < 600
    assert doc["refresh_in_progress"] is False
    assert doc["reauthorization"] == {"required": False, "reason": None}
    assert doc["journal"] == {"pending": 0}
    assert (check.returncode, check.stderr) == (0, "")
    assert one_line(check.stdout).startswith(
        f"mlauth: ok: access {tokens.access_token.fingerprint}"
    )
    if store == "redis":
        labels = {row["label"]: row["value"] for row in doc["store"]["details"]}
        assert labels["key"] == f"mlauth:{fake_ml.client_id}:tokens"
        assert doc["store"]["location"] == f"redis://:***@127.0.0.1:{redis_url.rsplit(':', 1)[1]}"


@pytest.mark.parametrize("store", ["env", "redis"])
def test_no_token_secret_or_password_in_either_command(
    fake_ml: FakeMercadoLibre, tmp_path: Path, redis_url: str, store: str
) -> None:
    # The secret pasted where a process name belongs, too: it comes back as a fingerprint.
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 60)
    secret = fake_ml.client_secret
    with env.open("a") as handle:
        handle.write(f"ML_TOKEN_REFRESHED_BY={secret}\nML_TOKEN_REFRESHED_AT={time.time()}\n")
    hidden = secrets_in(env)
    assert len(hidden) == 3  # access, refresh, secret
    if store == "redis":
        migrate_to_redis(env, redis_url)
        stored = redis_hash(redis_url, fake_ml.client_id)
        hidden += [stored["access_token"], stored["refresh_token"], REDIS_PASSWORD]

    done, doc = status_json(cwd=tmp_path)
    check = mlauth_cli("check", cwd=tmp_path)

    assert doc["state"] == "degraded"  # the access token expired a minute ago
    assert_hides(done.stdout + done.stderr + check.stdout + check.stderr, hidden)
    by = doc["tokens"]["last_refresh"]["by"]
    assert by == mlauth.fingerprint(secret)


def test_a_lock_held_elsewhere_shows_as_a_refresh_in_progress(fake_ml_env: Path) -> None:
    with lock_held_by_another_process(fake_ml_env):
        done, doc = status_json(cwd=fake_ml_env.parent)
    assert done.returncode == 0, done.stderr
    assert doc["refresh_in_progress"] is True


# -- degraded --------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["env", "redis"])
def test_an_expired_access_token_is_degraded_exit_4(
    fake_ml: FakeMercadoLibre, tmp_path: Path, redis_url: str, store: str
) -> None:
    chain_in(store, fake_ml, tmp_path, redis_url, expires_at=time.time() - 120)
    asked = fake_ml.stats()["token_requests"]

    done, doc = status_json(cwd=tmp_path)
    check = mlauth_cli("check", cwd=tmp_path)

    assert done.returncode == 0, done.stderr  # status reports; check judges
    assert doc["state"] == "degraded"
    assert [r["code"] for r in doc["reasons"]] == ["access_token_expired"]
    assert doc["tokens"]["expired"] is True and doc["tokens"]["seconds_left"] < -100
    assert check.returncode == 4 and check.stdout == ""
    assert one_line(check.stderr).startswith("mlauth: degraded: the access token expired")
    assert fake_ml.stats()["token_requests"] == asked  # looking never refreshes


def test_a_missing_access_token_is_degraded(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    fake_ml.write_env(tmp_path / ".env", include_access=False)
    _, doc = status_json(cwd=tmp_path)
    assert doc["state"] == "degraded"
    assert [r["code"] for r in doc["reasons"]] == ["access_token_missing"]
    assert doc["tokens"]["access_token_fingerprint"] is None
    assert mlauth_cli("check", cwd=tmp_path).returncode == 4


def test_an_answer_the_journal_holds_and_the_env_lacks_is_degraded(fake_ml_env: Path) -> None:
    stored, unsaved = answer_pending(fake_ml_env, "status-json")

    done, doc = status_json(cwd=fake_ml_env.parent)
    check = mlauth_cli("check", cwd=fake_ml_env.parent)

    assert doc["state"] == "degraded"
    assert doc["journal"] == {"pending": 1}
    assert [r["code"] for r in doc["reasons"]] == ["answer_pending"]
    assert f"an unsaved answer for token {stored.fingerprint}" in doc["reasons"][0]["message"]
    assert check.returncode == 4
    assert "replayed at the next refresh" in one_line(check.stderr)
    assert_hides(done.stdout + check.stderr, [stored.reveal(), unsaved.refresh_token.reveal()])


def test_a_store_that_cannot_be_saved_to_is_degraded(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "ro", "1m") as folder:
        fake_ml.write_env(folder / ".env", expires_at=time.time() + 3600)
        remount_read_only(folder)
        _, doc = status_json(cwd=folder)
        check = mlauth_cli("check", cwd=folder)
    assert doc["state"] == "degraded"
    assert [r["code"] for r in doc["reasons"]] == ["store_not_writable"]
    assert check.returncode == 4
    assert "cannot save tokens to" in one_line(check.stderr)


def test_an_unreachable_redis_is_degraded_naming_the_url_without_its_password(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    (tmp_path / ".env").write_text(
        f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n"
        f"ML_TOKEN_URL={fake_ml.token_url}\n"
        f"ML_TOKEN_STORE=redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0\n"
    )

    done, doc = status_json(cwd=tmp_path)
    check = mlauth_cli("check", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert doc["state"] == "degraded"
    assert doc["store"]["readable"] is False
    assert doc["tokens"] is None and doc["journal"] is None
    assert doc["reauthorization"]["required"] is None  # unknown, not "no"
    assert [r["code"] for r in doc["reasons"]] == ["store_unreadable"]
    assert check.returncode == 4
    line = one_line(check.stderr)
    assert f"127.0.0.1:{port}" in line
    assert_hides(done.stdout + done.stderr + line, [REDIS_PASSWORD, fake_ml.client_secret])


# -- re-authorization required ----------------------------------------------------------------


@pytest.mark.parametrize("store", ["env", "redis"])
def test_a_dead_refresh_token_marker_is_reauthorization_required_exit_3(
    store: str, fake_ml: FakeMercadoLibre, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The .env's marker (.env.reauth), or the Redis hash's dead field: what one invalid_grant
    # left is seen without another request.
    url = request.getfixturevalue("redis_url") if store == "redis" else ""
    chain_in(store, fake_ml, tmp_path, url, expires_at=time.time() - 60)
    fake_ml.revoke_refresh_tokens()
    assert_clean_failure(mlauth_cli("refresh", cwd=tmp_path), 3)  # a real invalid_grant

    done, doc = status_json(cwd=tmp_path)
    check = mlauth_cli("check", cwd=tmp_path)
    again = mlauth_cli("refresh", cwd=tmp_path)

    assert fake_ml.stats()["invalid_grant"] == 1  # nothing was sent again
    assert_clean_failure(again, 3)
    assert done.returncode == 3
    assert "re-authorization required" in done.stderr
    assert doc["state"] == "reauthorization_required"
    assert doc["reauthorization"] == {"required": True, "reason": "refresh_token_dead"}
    assert "refresh_token_dead" in [r["code"] for r in doc["reasons"]]
    assert (check.returncode, check.stdout) == (3, "")
    line = one_line(check.stderr)
    assert line.startswith("mlauth: re-authorization required:")
    assert "fix: run `mlauth login --env .env` to authorize the app again" in line


def test_no_refresh_token_asks_for_the_first_authorization(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    env.write_text(f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n")
    env.chmod(0o600)

    done, doc = status_json(cwd=tmp_path)
    check = mlauth_cli("check", cwd=tmp_path)

    assert done.returncode == 3 and "authorization required" in done.stderr
    assert doc["reauthorization"] == {"required": True, "reason": "no_refresh_token"}
    assert doc["tokens"]["refresh_token_fingerprint"] is None
    assert check.returncode == 3
    assert one_line(check.stderr).startswith("mlauth: authorization required:")


# -- configuration errors: exit 1, no document ---------------------------------------------


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (None, ".env"),  # no file at all
        (("ML_TOKEN_EXPIRES_AT", "tomorrow"), "ML_TOKEN_EXPIRES_AT"),
        (("ML_CLIENT_SECRET", ""), "ML_CLIENT_SECRET is missing"),
        (("ML_REFRESH_TOKEN", "TG-two words"), "ML_REFRESH_TOKEN"),
        (("ML_TOKEN_STORE", "memcached://127.0.0.1:1"), "ML_TOKEN_STORE"),
    ],
    ids=["missing-env", "bad-expiry", "no-secret", "bad-refresh-token", "unknown-store"],
)
@pytest.mark.parametrize("command", [["status", "--json"], ["check"]])
def test_a_configuration_error_is_exit_1_naming_it_with_no_document(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    edit: tuple[str, str] | None,
    named: str,
    command: list[str],
) -> None:
    if edit is not None:
        env = tmp_path / ".env"
        fake_ml.write_env(env)
        key, value = edit
        text = re.sub(rf"(?m)^{key}=.*\n", "", env.read_text())
        env.write_text(text + f"{key}={value}\n")
    done = mlauth_cli(*command, cwd=tmp_path)
    assert_clean_failure(done, 1)
    assert done.stdout == ""
    assert named in done.stderr


@pytest.mark.parametrize(
    ("where", "field"),
    [((), "access_token"), (("tokens",), "refresh_token"), (("store",), "password")],
)
def test_the_schema_refuses_a_field_it_does_not_name(
    fake_ml_env: Path, where: tuple[str, ...], field: str
) -> None:
    # The schema is closed: a field added to the document but not to the schema (a token,
    # say) fails every validation in these tests rather than shipping unnoticed.
    _, doc = status_json(cwd=fake_ml_env.parent)
    part = doc
    for key in where:
        part = part[key]
    part[field] = "APP_USR-1234567890123456-010101-notarealtoken-1"
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(doc)


def test_the_schema_takes_a_sellers_user_id_or_null_as_the_stores_seller(
    fake_ml_env: Path,
) -> None:
    _, doc = status_json(cwd=fake_ml_env.parent)
    for seller in ("8035443", None):
        doc["store"]["seller"] = seller
        VALIDATOR.validate(doc)
    doc["store"]["seller"] = 8035443  # user ids are strings, as in events and `mlauth sellers`
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(doc)
