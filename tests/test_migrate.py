"""Moving the tokens from a .env into Redis, and processes that were running on the file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth.cli.migrate import ChainConflictError, migrate_to_redis
from mlauth.stores.envfile import (
    STORE_KEY,
    TOKEN_KEYS,
    EnvFileStore,
    read_env_file,
    update_env_file,
)
from mlauth.stores.redis import RedisStore
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.save_counter import frozen, refresh_in_another_process, sent_token


def key_of(env: Path) -> str:
    return f"mlauth:{read_env_file(env)['ML_CLIENT_ID']}:tokens"


def test_migration_moves_the_tokens_and_keeps_every_other_line(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600, extra={"PIPELINE": "keep me"})
    with env.open("a") as handle:
        handle.write("# a comment the user wrote\n")
    before = env.read_text()
    tokens = read_env_file(env)

    result = migrate_to_redis(env, redis_server.url)

    after = read_env_file(env)
    assert after[STORE_KEY] == redis_server.url
    assert not set(TOKEN_KEYS) & set(after)
    kept = [line for line in before.splitlines() if not line.startswith(TOKEN_KEYS)]
    assert env.read_text().splitlines() == [*kept, f"{STORE_KEY}={redis_server.url}"]
    with redis_server.client() as client:
        stored = client.hgetall(key_of(env))
    assert stored["refresh_token"] == tokens["ML_REFRESH_TOKEN"]
    assert stored["access_token"] == tokens["ML_ACCESS_TOKEN"]
    assert "moved the tokens" in str(result) and tokens["ML_REFRESH_TOKEN"] not in str(result)
    # A second machine needs only a copy of the file.
    copy = tmp_path / "machine2" / ".env"
    copy.parent.mkdir()
    copy.write_text(env.read_text())
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(copy)).ok


def test_migration_refuses_another_chain_in_redis_unless_forced(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    first, second = tmp_path / "a" / ".env", tmp_path / "b" / ".env"
    for env in (first, second):
        env.parent.mkdir()
        fake_ml.write_env(env)  # two different chains of one app
    migrate_to_redis(first, redis_server.url)
    untouched = second.read_text()

    with pytest.raises(ChainConflictError, match="already holds another token chain"):
        migrate_to_redis(second, redis_server.url)
    assert second.read_text() == untouched

    replacement = read_env_file(second)["ML_REFRESH_TOKEN"]
    migrate_to_redis(second, redis_server.url, force=True)
    with redis_server.client() as client:
        stored = client.hgetall(key_of(second))
    assert stored["refresh_token"] == replacement
    assert stored["generation"] == "2"  # goes on from the replaced chain's generation
    assert STORE_KEY in read_env_file(second)


def test_migrating_twice_says_there_is_nothing_left(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, fake_ml_env: Path
) -> None:
    migrate_to_redis(fake_ml_env, redis_server.url)
    with pytest.raises(mlauth.ConfigError, match="already keeps its tokens in redis://"):
        migrate_to_redis(fake_ml_env, redis_server.url)


def test_a_process_running_on_the_env_follows_the_tokens_to_redis(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    auth = mlauth.MLAuth.from_env(env)
    assert isinstance(auth.store, mlauth.EnvFileStore)
    url = f"{fake_ml.base_url}/users/me"
    assert requests.get(url, auth=auth).ok

    migrate_to_redis(env, redis_server.url)
    assert requests.get(url, auth=auth).ok  # picks up the move at its next call
    # Its next refresh takes the Redis lock and commits to Redis, never to the file.
    auth.refresh()

    with redis_server.client() as client:
        stored = client.hgetall(key_of(env))
    assert stored["refresh_token"] == auth.tokens.refresh_token.reveal()  # type: ignore[union-attr]
    assert stored["generation"] == "2"
    assert not set(TOKEN_KEYS) & set(read_env_file(env))
    assert fake_ml.stats()["refreshes"] == 1


def test_a_process_that_cannot_follow_stops_and_never_writes_the_env(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)  # its next call must refresh
    auth = mlauth.MLAuth.from_env(env)
    # The tokens moved somewhere this process cannot reach.
    update_env_file(env, {**dict.fromkeys(TOKEN_KEYS), STORE_KEY: "memcached://10.0.0.1:1"})
    moved = env.read_text()

    for _ in range(2):
        with pytest.raises(mlauth.StoreMovedError, match="cannot follow them"):
            requests.get(f"{fake_ml.base_url}/users/me", auth=auth)

    assert env.read_text() == moved
    assert fake_ml.stats()["token_requests"] == 0


def test_redis_store_lock_is_what_a_following_process_takes(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, fake_ml_env: Path
) -> None:
    auth = mlauth.MLAuth.from_env(fake_ml_env)
    migrate_to_redis(fake_ml_env, redis_server.url)
    redis_store = RedisStore(redis_server.url, client_id=auth.client_id)
    # The file lock is free, but the chain's lock is now the Redis one, and it is held.
    with (
        redis_store.lock(5),
        pytest.raises(mlauth.LockTimeoutError, match="tokens:lock"),
        auth.store.lock(0.0),
    ):
        pass


def test_migration_replays_a_refresh_only_the_journal_holds(
    fake_ml: FakeMercadoLibre,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    spent = read_env_file(env)["ML_REFRESH_TOKEN"]
    dying = mlauth.MLAuth.from_env(env)

    def full_disk(self: EnvFileStore, tokens: mlauth.TokenSet, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(EnvFileStore, "save", full_disk)
        dying.refresh()  # spent; the answer is only in the journal (and in memory)
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == spent
    del dying  # the process dies before it could save again

    result = migrate_to_redis(env, redis_server.url)

    assert result.tokens.refresh_token != mlauth.Secret(spent)
    with redis_server.client() as client:
        assert client.hget(key_of(env), "refresh_token") != spent
    elsewhere = mlauth.MLAuth.from_env(env)  # a second machine, on Redis
    elsewhere.refresh()
    assert fake_ml.stats()["invalid_grant"] == 0


def test_migration_refuses_a_token_a_dead_refresher_possibly_spent(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    before = env.read_text()
    store = EnvFileStore(env)
    with store.lock(5):  # a refresher that wrote its intent and was killed during the POST
        store.journal().intent(mlauth.Secret(read_env_file(env)["ML_REFRESH_TOKEN"]))

    with pytest.raises(mlauth.ConfigError, match=r"never got an answer.*migrate again"):
        migrate_to_redis(env, redis_server.url)

    assert env.read_text() == before
    with redis_server.client() as client:
        assert not client.exists(key_of(env))


def test_a_process_running_on_the_env_sees_the_migration_at_its_next_request(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    # The migration rewrites the .env: like every save by mlauth, it must show through the
    # save counter at the next request, not only once the stat interval runs out.
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    auth = mlauth.MLAuth.from_env(env)
    session = requests.Session()
    session.trust_env = False
    session.auth = auth
    url = f"{fake_ml.base_url}/users/me"
    refresh_in_another_process(env)  # makes the save counter, as any save does
    assert sent_token(lambda: session.get(url, timeout=30)) == read_env_file(env)["ML_ACCESS_TOKEN"]
    frozen(auth)  # from here a change shows only through the save counter
    done = subprocess.run(
        [sys.executable, "-m", "mlauth", "migrate", "--env", str(env), "--to", redis_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    refresh_in_another_process(env)  # on Redis now: kills the access token the file had

    with redis_server.client() as client:
        new = client.hget(key_of(env), "access_token")
    assert sent_token(lambda: session.get(url, timeout=30)) == new
    assert fake_ml.stats()["api_401"] == 0  # the move was seen before the request, not after
    assert fake_ml.stats()["invalid_grant"] == 0
