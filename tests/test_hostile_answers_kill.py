"""Kill -9 a refresher right after its raw answer is kept and before anything read it.

The server has rotated; the raw bytes are the only copy of the new refresh token. A peer
process (in another container, on another machine with Redis) must find them, read them as
the refresher would have (odd fields and all) and carry the chain on, spending nothing twice.
Each victim is a real process (tests/support/scripts/fault_worker.py, phase ``after-raw``)
killed with SIGKILL, against the loopback FakeMercadoLibre.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mlauth
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores.envfile import read_env_file
from mlauth.stores.mounted import JOURNAL_ATTR
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support import SCRIPTS
from tests.support.hostile_answers import DELETE, Mangle, fields
from tests.support.mounts import bind_file

pytestmark = pytest.mark.processes

WORKER = SCRIPTS / "fault_worker.py"
REDIRECT = "https://example.com/callback"


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


def start(env: Path, *args: str, log: Path, pause: bool) -> subprocess.Popen[str]:
    environ = dict(os.environ)
    if pause:
        environ["MLAUTH_TEST_PAUSE_AT"] = "after-raw"
        environ["MLAUTH_TEST_PAUSE_MARKER"] = str(log.with_suffix(".paused"))
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(env), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=environ,
        )


def kill_after_raw(env: Path, *args: str, tmp_path: Path) -> None:
    """Run a victim until it has kept its raw answer, then SIGKILL it."""
    log = tmp_path / "victim.log"
    victim = start(env, *args, log=log, pause=True)
    marker = log.with_suffix(".paused")
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert victim.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)
    assert victim.returncode == -signal.SIGKILL


def peer(env: Path, fake: FakeMercadoLibre, tmp_path: Path) -> dict[str, object]:
    log = tmp_path / "peer.log"
    proc = start(env, fake.base_url, log=log, pause=False)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, log.read_text()[-2000:]
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def assert_chain_lives(env: Path, fake: FakeMercadoLibre) -> None:
    refreshes = fake.stats()["refreshes"]
    mlauth.MLAuth.from_env(env).refresh()
    assert fake.stats()["refreshes"] == refreshes + 1
    assert fake.stats()["invalid_grant"] == 0


# The answer, and how many refreshes the server sees in all: the victim's, plus one for an
# access token when the answer held a refresh token only.
ANSWERS = {
    "plain": (fields(), 1),
    "odd-fields": (fields(expires_in="abc", token_type=7), 1),
    "no-access-token": (fields(access_token=DELETE), 2),
}


@pytest.mark.parametrize(("change", "refreshes"), ANSWERS.values(), ids=ANSWERS.keys())
def test_a_kept_raw_answer_in_the_env_journal_is_replayed_by_the_next_process(
    fake: FakeMercadoLibre,
    tmp_path: Path,
    change: Callable[[dict[str, object]], object],
    refreshes: int,
) -> None:
    env = tmp_path / ".env"
    fake.write_env(env, expires_at=time.time() - 10)
    mangle = Mangle(change)
    fake.mangle_next_token_answers(1, mangle)
    spent = read_env_file(env)["ML_REFRESH_TOKEN"]
    kill_after_raw(env, fake.base_url, tmp_path=tmp_path)
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == spent  # the victim saved nothing
    assert fake.stats()["refreshes"] == 1

    result = peer(env, fake, tmp_path)
    assert result["status"] == 200, result
    # Replayed: the new refresh token from the raw bytes (and, for an answer without an
    # access token, one refresh with it); the spent token was never sent again.
    assert fake.stats()["invalid_grant"] == 0
    assert fake.stats()["refreshes"] == refreshes
    assert read_env_file(env)["ML_REFRESH_TOKEN"] != spent
    assert Path(f"{env}.journal").read_bytes() == b""
    assert_chain_lives(env, fake)


def test_a_kept_raw_answer_in_redis_is_replayed_with_the_fence_by_the_next_holder(
    fake: FakeMercadoLibre, tmp_path: Path, redis_server: RedisServer
) -> None:
    env = tmp_path / ".env"
    # A short lock timeout: the dead victim's Redis lock lapses quickly for the peer.
    fake.write_env(env, expires_at=time.time() - 10, extra={"ML_TOKEN_LOCK_TIMEOUT": "3"})
    migrate_to_redis(env, redis_server.url)
    key = f"mlauth:{fake.client_id}:tokens"
    with redis_server.client() as client:
        before = client.hgetall(key)
    mangle = Mangle(fields(expires_in=[1]))
    fake.mangle_next_token_answers(1, mangle)
    kill_after_raw(env, fake.base_url, tmp_path=tmp_path)
    with redis_server.client() as client:
        left = client.hgetall(key)
    assert left["refresh_token"] == before["refresh_token"] and "answer" in left

    result = peer(env, fake, tmp_path)
    assert result["status"] == 200, result
    assert fake.stats()["token_requests"] == 1  # the victim's only: replayed, not refreshed
    with redis_server.client() as client:
        after = client.hgetall(key)
    assert after["refresh_token"] == mangle.refresh_token and "answer" not in after
    assert int(after["generation"]) == int(before["generation"]) + 1
    assert_chain_lives(env, fake)


def test_a_raw_answer_kept_on_a_mounted_envs_inode_is_replayed_from_another_container(
    fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    host = tmp_path / "host" / ".env"
    host.parent.mkdir()
    fake.write_env(host, expires_at=time.time() - 10)
    mangle = Mangle(fields(expires_in=-5, token_type="MAC"))
    fake.mangle_next_token_answers(1, mangle)
    with (
        bind_file(host, tmp_path / "c1" / ".env") as one,
        bind_file(host, tmp_path / "c2" / ".env") as two,
    ):
        kill_after_raw(one, fake.base_url, tmp_path=tmp_path)
        assert JOURNAL_ATTR in os.listxattr(host)  # on the inode both containers share
        result = peer(two, fake, tmp_path)
        assert result["status"] == 200, result
        assert fake.stats()["token_requests"] == 1
        assert read_env_file(host)["ML_REFRESH_TOKEN"] == mangle.refresh_token
        assert JOURNAL_ATTR not in os.listxattr(host)
        assert_chain_lives(two, fake)


def test_a_login_killed_after_its_answer_was_kept_is_replayed_by_the_next_process(
    fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    env.write_text(
        f"ML_CLIENT_ID={fake.client_id}\nML_CLIENT_SECRET={fake.client_secret}\n"
        f"ML_TOKEN_URL={fake.token_url}\nML_API_HOSTS={fake.host}\n"
    )
    code = fake.issue_authorization_code(REDIRECT)
    mangle = Mangle(fields(token_type=None))
    fake.mangle_next_token_answers(1, mangle)
    kill_after_raw(env, "--login", code, REDIRECT, tmp_path=tmp_path)
    assert "ML_REFRESH_TOKEN" not in read_env_file(env)  # the code is spent, nothing saved

    result = peer(env, fake, tmp_path)
    assert result["status"] == 200, result
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    assert fake.stats()["code_exchanges"] == 1 and fake.stats()["refreshes"] == 0
    assert_chain_lives(env, fake)
