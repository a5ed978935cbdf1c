"""Review of the fenced raw answer (``_KEEP``) and the generation the Redis scripts write.

The Python side and the Lua scripts must read a hash alike: a version that ``load()`` accepts
is one the fence and the commit accept, and what a commit writes is what ``load()`` reads.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import requests

import mlauth
import mlauth.endpoint
from benchmarks.redis_server import RedisServer
from mlauth.cli.migrate import migrate_to_redis
from mlauth.testing import FakeMercadoLibre


@pytest.fixture
def redis_env(fake_ml: FakeMercadoLibre, tmp_path: Path, redis_server: RedisServer) -> Path:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)  # expired: the first call refreshes
    migrate_to_redis(env, redis_server.url)
    return env


def key_of(fake: FakeMercadoLibre) -> str:
    return f"mlauth:{fake.client_id}:tokens"


def stored(server: RedisServer, fake: FakeMercadoLibre) -> dict[str, str]:
    with server.client() as client:
        values: dict[str, str] = client.hgetall(key_of(fake))
    return values


def test_a_hash_without_a_generation_still_keeps_the_raw_answer_before_it_is_read(
    fake_ml: FakeMercadoLibre,
    redis_env: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # load() reads a hash without a generation as generation 0 (_generation), and the commit
    # script lands on it; the fence compares tonumber('') (nil) with 0 and refuses, so the
    # answer, the only copy of the new refresh token until the commit, is kept nowhere.
    with redis_server.client() as client:
        client.hdel(key_of(fake_ml), "generation")
    seen: list[dict[str, str]] = []
    original = mlauth.endpoint.read_answer

    def reading(body: bytes) -> object:
        seen.append(stored(redis_server, fake_ml))
        return original(body)

    monkeypatch.setattr(mlauth.endpoint, "read_answer", reading)
    with caplog.at_level("ERROR", logger="mlauth"):
        response = requests.get(
            f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(redis_env), timeout=30
        )
    assert response.status_code == 200
    assert "could not keep the raw token answer" not in caplog.text
    (at_reading,) = seen
    assert "answer" in at_reading, "the raw answer was not in the hash when it was read"


def test_a_commit_over_the_largest_generation_leaves_a_hash_that_reads_back(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    # _generation accepts up to 15 digits; the commit script writes generation + 1, which
    # from 999999999999999 has 16: the hash then holds the only live refresh token and
    # every later load() refuses it ("mlauth never writes").
    with redis_server.client() as client:
        client.hset(key_of(fake_ml), "generation", "9" * 15)
    with contextlib.suppress(mlauth.MLAuthError):  # refusing before spending is fine too
        mlauth.MLAuth.from_env(redis_env).refresh()
    if fake_ml.stats()["refreshes"] == 0:
        return  # refused before anything was spent: the stored refresh token is still live
    # The refresh token was spent and committed: the next process must read what it wrote.
    mlauth.MLAuth.from_env(redis_env).refresh()
    assert fake_ml.stats()["invalid_grant"] == 0
