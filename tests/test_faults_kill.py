"""Kill -9 the refresher at each phase of a refresh; a peer must carry the chain on.

Each test freezes a real process at one phase (tests/support/scripts/fault_worker.py), kills
it with SIGKILL, then runs a peer process against the same .env and the same loopback server,
and checks what the peer saw, what the server counted, and what is on disk. The one window no
client can close (the server rotated the token and the answer died with the process) must end
in a clear "re-authorization required" naming the command to run, for every process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlauth
from mlauth.stores.envfile import read_env_file
from mlauth.stores.lock import ProcessLock
from mlauth.testing import FakeMercadoLibre
from tests.support.fault_kills import (
    assert_chain_lives,
    kill,
    kill_after_the_rotation,
    kill_at,
    peer,
    start,
    wait_until,
)

pytestmark = pytest.mark.processes


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


@pytest.fixture
def env(fake: FakeMercadoLibre, tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    # The file says the token expired: the first request of each process must refresh.
    fake.write_env(path, expires_at=time.time() - 10, extra={"PIPELINE_SETTING": "keep me"})
    return path


def test_kill_while_waiting_for_the_lock(env: Path, fake: FakeMercadoLibre, tmp_path: Path) -> None:
    log = tmp_path / "victim.log"
    with ProcessLock(f"{env}.lock").hold(timeout=5):  # somebody else is refreshing
        victim = start(env, fake, log)
        wait_until(lambda: "waiting for refresh lock" in log.read_text(), "lock wait", log)
        kill(victim)
    before = read_env_file(env)["ML_REFRESH_TOKEN"]
    result = peer(env, fake, tmp_path)
    assert result["status"] == 200
    assert fake.stats()["token_requests"] == 1  # the victim sent nothing
    assert read_env_file(env)["ML_REFRESH_TOKEN"] != before
    assert_chain_lives(env, fake, tmp_path)


def test_kill_before_the_post_leaves_a_possibly_spent_token_that_works(
    env: Path, fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    kill_at("before-post", env, fake, tmp_path)
    journal = Path(f"{env}.journal")
    assert '"kind":"intent"' in journal.read_text()  # the intent outlived the process
    result = peer(env, fake, tmp_path)
    assert result["status"] == 200
    assert fake.stats()["token_requests"] == 1 and fake.stats()["refreshes"] == 1
    assert journal.read_bytes() == b""
    assert_chain_lives(env, fake, tmp_path)


def test_kill_while_the_post_is_in_flight_before_the_server_acts(
    env: Path, fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    fake.token_delay = 30.0  # the server reads the POST, then waits before processing it
    log = tmp_path / "victim.log"
    victim = start(env, fake, log)
    assert fake.token_requests_in_flight.wait(30), log.read_text()
    kill(victim)
    fake.token_delay = 0.0
    result = peer(env, fake, tmp_path)
    assert result["status"] == 200
    assert fake.stats()["refreshes"] == 1
    assert_chain_lives(env, fake, tmp_path)


def test_kill_after_the_server_rotated_but_before_the_answer_arrived(
    env: Path, fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    # The one window that cannot be saved: the token is spent, its successor died in transit.
    before = env.read_bytes()
    kill_after_the_rotation(env, fake, tmp_path)

    result = peer(env, fake, tmp_path)
    assert result["error"] == "InvalidGrantError"
    message = str(result["message"])
    assert "possibly spent already" in message and "died" in message
    assert "mlauth login" in message
    assert fake.stats()["token_requests"] == 2  # the victim's, and exactly one try
    status = mlauth.reauthorization_required(mlauth.EnvFileStore(env))
    assert status is not None and "mlauth login" in status
    # Every later process stops at once with the same fix, sending nothing.
    later = peer(env, fake, tmp_path, "later")
    assert later["error"] == "InvalidGrantError" and "not sent" in str(later["message"])
    assert fake.stats()["token_requests"] == 2
    assert env.read_bytes() == before  # the .env is as the seller left it


@pytest.mark.parametrize("phase", ["after-answer", "during-write"])
def test_kill_after_the_answer_before_the_store_has_it_is_replayed(
    phase: str, env: Path, fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    spent = read_env_file(env)["ML_REFRESH_TOKEN"]
    kill_at(phase, env, fake, tmp_path)
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == spent  # the store never got the answer
    assert fake.stats()["refreshes"] == 1

    result = peer(env, fake, tmp_path)
    assert result["status"] == 200
    # Replayed from the journal: no second refresh, and the chain continues from the answer.
    assert fake.stats()["token_requests"] == 1
    assert read_env_file(env)["ML_REFRESH_TOKEN"] != spent
    assert Path(f"{env}.journal").read_bytes() == b""
    assert_chain_lives(env, fake, tmp_path)
    # A kill mid-write leaves the temporary file behind: private, like the .env, and removed
    # by the recovery that follows once it is old enough that no live writer can own it.
    assert [p.stat().st_mode & 0o077 for p in tmp_path.glob("..env.*.mlauth-tmp")] == (
        [0] if phase == "during-write" else []
    )


def test_recovery_removes_a_temporary_env_left_by_a_killed_writer(
    env: Path, fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    kill_at("during-write", env, fake, tmp_path)
    (leftover,) = tmp_path.glob("..env.*.mlauth-tmp")
    long_ago = time.time() - 3600
    os.utime(leftover, (long_ago, long_ago))
    assert peer(env, fake, tmp_path)["status"] == 200
    assert not leftover.exists()
    assert fake.stats()["token_requests"] == 1


def test_kill_after_the_write_before_the_commit(
    env: Path, fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    spent = read_env_file(env)["ML_REFRESH_TOKEN"]
    kill_at("after-write", env, fake, tmp_path)
    assert read_env_file(env)["ML_REFRESH_TOKEN"] != spent  # saved; only the commit is missing
    result = peer(env, fake, tmp_path)
    assert result["status"] == 200
    assert fake.stats()["token_requests"] == 1  # the peer adopted the saved tokens
    assert_chain_lives(env, fake, tmp_path)
