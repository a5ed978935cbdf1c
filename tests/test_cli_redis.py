"""The ``mlauth`` command with the Redis store: migrate, status/token/refresh/login, run and
install(), against a real redis-server and the loopback fake, each command a real process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

import mlauth
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores.envfile import STORE_KEY, TOKEN_KEYS, read_env_file
from mlauth.stores.redis import RedisStore
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer, free_port
from tests.support.cli import REDIRECT, assert_clean_failure, mlauth_cli

pytestmark = pytest.mark.processes


def stored(server: RedisServer, env: Path, url: str | None = None) -> dict[str, str]:
    """The hash holding ``env``'s tokens, read straight from Redis."""
    key = f"mlauth:{read_env_file(env)['ML_CLIENT_ID']}:tokens"
    with redis.Redis.from_url(url or server.url, decode_responses=True) as client:
        values: dict[str, str] = client.hgetall(key)
    return values


def assert_no_secret(text: str, *hashes: dict[str, str], fake: FakeMercadoLibre) -> None:
    assert fake.client_secret not in text
    for values in hashes:
        for field in ("access_token", "refresh_token"):
            if values.get(field):
                assert values[field] not in text


@pytest.fixture
def redis_env(fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path) -> Path:
    """A .env whose tokens (access token expired) were moved into Redis."""
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10, extra={"PIPELINE": "keep me"})
    migrate_to_redis(env, redis_server.url)
    return env


@pytest.fixture
def _always_uninstall() -> Iterator[None]:
    yield
    mlauth.uninstall()


# -- status, token, refresh ---------------------------------------------------------------


def test_status_token_and_refresh_work_on_the_tokens_in_redis(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, redis_env: Path
) -> None:
    env_before = redis_env.read_text()
    first = stored(redis_server, redis_env)

    status = mlauth_cli("status", "--env", str(redis_env))
    assert status.returncode == 0, status.stderr
    rows = dict(line.split(":", 1) for line in status.stdout.splitlines())
    rows = {label: value.strip() for label, value in rows.items()}
    assert rows["store"] == redis_server.url
    assert rows["key"] == f"mlauth:{fake_ml.client_id}:tokens"
    assert rows["generation"] == f"1 (chain {first['chain']})"
    assert rows["access token"] == mlauth.fingerprint(first["access_token"])
    assert rows["refresh token"] == mlauth.fingerprint(first["refresh_token"])
    assert rows["expires"].startswith("expired")
    assert rows["refresh running"] == "no"

    token = mlauth_cli("token", "--env", str(redis_env))  # expired: refreshed first
    assert token.returncode == 0, token.stderr
    second = stored(redis_server, redis_env)
    assert token.stdout == second["access_token"] + "\n"
    assert second["generation"] == "2" and second["refresh_token"] != first["refresh_token"]
    assert fake_ml.stats()["refreshes"] == 1

    refresh = mlauth_cli("refresh", "--env", str(redis_env))
    assert refresh.returncode == 0, refresh.stderr
    third = stored(redis_server, redis_env)
    assert third["generation"] == "3" and third["refresh_token"] != second["refresh_token"]
    assert refresh.stdout.startswith("refreshed: access sha256:")
    assert fake_ml.stats()["refreshes"] == 2 and fake_ml.stats()["invalid_grant"] == 0

    assert redis_env.read_text() == env_before  # the tokens never went back into the file
    everything = status.stdout + status.stderr + refresh.stdout + refresh.stderr + token.stderr
    assert_no_secret(everything, first, second, third, fake=fake_ml)


def test_status_says_when_the_redis_lock_is_held(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, redis_env: Path
) -> None:
    holder = RedisStore(redis_server.url, client_id=fake_ml.client_id)
    with holder.lock(5):  # held by this process while the command runs in another
        busy = mlauth_cli("status", "--env", str(redis_env))
    free = mlauth_cli("status", "--env", str(redis_env))
    assert busy.returncode == 0, busy.stderr
    assert "refresh running:  yes (lock held)" in busy.stdout
    assert "refresh running:  no" in free.stdout


def test_status_masks_the_redis_password(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    with redis_server.client() as client:
        client.config_set("requirepass", "fake-redis-password")
    url = f"redis://:fake-redis-password@127.0.0.1:{redis_server.port}/0"
    env = tmp_path / ".env"
    fake_ml.write_env(env)
    migrate_to_redis(env, url)

    done = mlauth_cli("status", "--env", str(env))

    assert done.returncode == 0, done.stderr
    assert f"redis://:***@127.0.0.1:{redis_server.port}/0" in done.stdout
    assert "fake-redis-password" not in done.stdout + done.stderr
    assert_no_secret(done.stdout, stored(redis_server, env, url), fake=fake_ml)


@pytest.mark.parametrize("command", ["status", "token", "refresh", "login"])
def test_unreachable_redis_is_one_line_naming_the_url(
    fake_ml: FakeMercadoLibre, tmp_path: Path, command: str
) -> None:
    env = tmp_path / ".env"
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env.write_text(
        f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n"
        f"ML_TOKEN_URL={fake_ml.token_url}\n{STORE_KEY}={url}\n"
    )
    before = env.read_text()
    extra = ["--redirect-uri", REDIRECT, "--code", "TG-fake-code"] if command == "login" else []

    done = mlauth_cli(command, "--env", str(env), *extra)

    assert_clean_failure(done, 1)
    assert len(done.stderr.splitlines()) == 1
    assert url in done.stderr
    assert done.stdout == ""
    assert env.read_text() == before
    assert fake_ml.stats()["token_requests"] == 0  # nothing spent, not even the login code


# -- login --------------------------------------------------------------------------------


def test_login_writes_the_tokens_into_an_empty_redis_not_the_env(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# a new machine: credentials and the shared store, no tokens yet\n"
        f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n"
        f"ML_TOKEN_URL={fake_ml.token_url}\nML_API_HOSTS={fake_ml.host}\n"
        f"{STORE_KEY}={redis_server.url}\n"
    )
    before = env.read_text()
    code = fake_ml.issue_authorization_code(REDIRECT)

    done = mlauth_cli("login", "--env", str(env), "--redirect-uri", REDIRECT, "--code", code)

    assert done.returncode == 0, done.stderr
    assert f"tokens saved in {redis_server.url}" in done.stdout
    assert env.read_text() == before
    values = stored(redis_server, env)
    assert values["refresh_token"].startswith("TG-") and values["generation"] == "1"
    assert "mlauth login" in values["refreshed_by"]
    assert_no_secret(done.stdout + done.stderr, values, fake=fake_ml)
    assert mlauth_cli("refresh", "--env", str(env)).returncode == 0  # the new chain works
    assert fake_ml.stats()["invalid_grant"] == 0


def test_login_replaces_a_dead_chain_in_redis_as_its_next_generation(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, redis_env: Path
) -> None:
    # A process that was using the old chain (its store has read it).
    running = mlauth.MLAuth.from_env(redis_env)
    old = stored(redis_server, redis_env)
    fake_ml.revoke_refresh_tokens()
    assert mlauth_cli("refresh", "--env", str(redis_env)).returncode == 3
    env_before = redis_env.read_text()

    code = fake_ml.issue_authorization_code(REDIRECT)
    done = mlauth_cli("login", "--env", str(redis_env), "--redirect-uri", REDIRECT, "--code", code)

    assert done.returncode == 0, done.stderr
    new = stored(redis_server, redis_env)
    assert new["chain"] == old["chain"] and int(new["generation"]) == int(old["generation"]) + 1
    assert new["refresh_token"] != old["refresh_token"]
    assert redis_env.read_text() == env_before
    # The running process picks the new tokens up as the chain's next link.
    assert isinstance(running.store, RedisStore)
    running.store.check_interval = 0.0
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=running).status_code == 200
    assert running.tokens.refresh_token == mlauth.Secret(new["refresh_token"])


# -- install() and mlauth run -------------------------------------------------------------


@pytest.mark.usefixtures("_always_uninstall")
def test_install_uses_the_redis_store_the_env_names(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, redis_env: Path
) -> None:
    auth = mlauth.install(redis_env)
    assert isinstance(auth.store, RedisStore)
    stale = {"Authorization": "Bearer APP_USR-stale-legacy-token"}
    assert requests.get(f"{fake_ml.base_url}/users/me", headers=stale).status_code == 200
    values = stored(redis_server, redis_env)
    assert values["generation"] == "2"  # the expired token was refreshed into Redis
    assert auth.tokens.access_token == mlauth.Secret(values["access_token"])
    assert not set(TOKEN_KEYS) & set(read_env_file(redis_env))


def test_mlauth_run_installs_the_redis_store_in_the_command(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, redis_env: Path
) -> None:
    script = (
        "import mlauth, requests\n"
        "auth = mlauth.installed()\n"
        f"answer = requests.get({fake_ml.base_url + '/users/me'!r},\n"
        "    headers={'Authorization': 'Bearer APP_USR-stale-legacy-token'})\n"
        "print(type(auth.store).__name__, answer.status_code)\n"
    )
    done = mlauth_cli("run", "--env", str(redis_env), "--", sys.executable, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "RedisStore 200\n"
    assert stored(redis_server, redis_env)["generation"] == "2"
    assert fake_ml.stats()["refreshes"] == 1


# -- migrate ------------------------------------------------------------------------------


def test_migrate_moves_the_tokens_and_a_second_run_has_nothing_to_do(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, extra={"PIPELINE": "keep me"})
    before = read_env_file(env)

    done = mlauth_cli("migrate", "--env", str(env), "--to", redis_server.url)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("moved the tokens (refresh sha256:")
    assert redis_server.url in done.stdout and len(done.stdout.splitlines()) == 1
    after = read_env_file(env)
    assert after[STORE_KEY] == redis_server.url and after["PIPELINE"] == "keep me"
    assert not set(TOKEN_KEYS) & set(after)
    values = stored(redis_server, env)
    assert values["refresh_token"] == before["ML_REFRESH_TOKEN"]
    assert values["generation"] == "1"
    assert_no_secret(done.stdout + done.stderr, values, fake=fake_ml)

    again = mlauth_cli("migrate", "--env", str(env), "--to", redis_server.url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("already migrated:") and "nothing to do" in again.stdout
    assert stored(redis_server, env) == values  # not written again
    assert read_env_file(env) == after

    elsewhere = mlauth_cli("migrate", "--env", str(env), "--to", "redis://127.0.0.1:1/3")
    assert_clean_failure(elsewhere, 1)
    assert "already keeps its tokens in" in elsewhere.stderr


def test_migrate_refuses_a_different_chain_unless_forced(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    first, second = tmp_path / "a" / ".env", tmp_path / "b" / ".env"
    for env in (first, second):
        env.parent.mkdir()
        fake_ml.write_env(env)  # two chains of one app: the same key in Redis
    assert mlauth_cli("migrate", "--env", str(first), "--to", redis_server.url).returncode == 0
    in_redis = stored(redis_server, first)
    untouched = second.read_text()

    refused = mlauth_cli("migrate", "--env", str(second), "--to", redis_server.url)

    assert_clean_failure(refused, 1)
    assert "already holds another token chain" in refused.stderr
    assert "--force" in refused.stderr
    assert second.read_text() == untouched
    assert stored(redis_server, first) == in_redis
    assert_no_secret(refused.stderr, in_redis, fake=fake_ml)

    replacement = read_env_file(second)["ML_REFRESH_TOKEN"]
    forced = mlauth_cli("migrate", "--env", str(second), "--to", redis_server.url, "--force")
    assert forced.returncode == 0, forced.stderr
    assert stored(redis_server, second)["refresh_token"] == replacement
    assert read_env_file(second)[STORE_KEY] == redis_server.url


def test_migrate_without_the_redis_extra_names_it(fake_ml_env: Path) -> None:
    before = fake_ml_env.read_text()
    hidden = (
        "import sys\n"
        "sys.modules['redis'] = None  # as if the extra were not installed\n"
        "from mlauth.cli.commands import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["migrate", "--env", str(fake_ml_env), "--to", "redis://127.0.0.1:6379/0"]
    done = subprocess.run(
        [sys.executable, "-c", hidden, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_clean_failure(done, 1)
    assert len(done.stderr.splitlines()) == 1
    assert "pip install 'mlauth[redis]'" in done.stderr
    assert fake_ml_env.read_text() == before


def test_migrate_to_an_unreachable_redis_names_it_and_changes_nothing(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    before = fake_ml_env.read_text()
    port = free_port()  # nothing listens there
    url = f"redis://:fake-redis-password@127.0.0.1:{port}/0"
    done = mlauth_cli("migrate", "--env", str(fake_ml_env), "--to", url)
    assert_clean_failure(done, 1)
    assert len(done.stderr.splitlines()) == 1
    assert f"redis://:***@127.0.0.1:{port}/0" in done.stderr
    assert "fake-redis-password" not in done.stderr
    assert fake_ml_env.read_text() == before
