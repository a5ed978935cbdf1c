"""Processes running scripts/fault_worker.py on one .env against a loopback fake: frozen at a
phase of a refresh and killed with SIGKILL, or run to the end as a peer; and what a chain that
survived a kill must show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlauth
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support import SCRIPTS

WORKER = SCRIPTS / "fault_worker.py"


def start(
    env: Path, fake: FakeMercadoLibre, log: Path, phase: str | None = None
) -> subprocess.Popen[str]:
    environ = dict(os.environ)
    if phase is not None:
        environ["MLAUTH_TEST_PAUSE_AT"] = phase
        environ["MLAUTH_TEST_PAUSE_MARKER"] = str(log.with_suffix(".paused"))
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(env), fake.base_url],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=environ,
        )


def wait_until(condition: Callable[[], bool], what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} never happened: {log.read_text()[-2000:]}")


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def outcome(proc: subprocess.Popen[str], log: Path) -> dict[str, object]:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, log.read_text()[-2000:]
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def kill_at(phase: str, env: Path, fake: FakeMercadoLibre, tmp_path: Path) -> None:
    log = tmp_path / "victim.log"
    victim = start(env, fake, log, phase)
    marker = log.with_suffix(".paused")
    wait_until(marker.exists, f"pause at {phase}", log)
    kill(victim)


def kill_after_the_rotation(env: Path, fake: FakeMercadoLibre, tmp_path: Path) -> None:
    """SIGKILL a refresher after the server rotated its token, before the answer arrived."""
    fake.token_answer_delay = 30.0
    log = tmp_path / "victim.log"
    victim = start(env, fake, log)
    wait_until(lambda: fake.stats()["refreshes"] == 1, "the server's rotation", log)
    kill(victim)
    fake.token_answer_delay = 0.0


def peer(
    env: Path, fake: FakeMercadoLibre, tmp_path: Path, name: str = "peer"
) -> dict[str, object]:
    log = tmp_path / f"{name}.log"
    return outcome(start(env, fake, log), log)


def assert_chain_lives(env: Path, fake: FakeMercadoLibre, tmp_path: Path) -> None:
    """A third process, started later, still gets through, nothing was burned, and the
    seller's own settings are intact."""
    assert peer(env, fake, tmp_path, "later")["status"] == 200
    assert fake.stats()["invalid_grant"] == 0
    assert mlauth.reauthorization_required(mlauth.EnvFileStore(env)) is None
    assert read_env_file(env)["PIPELINE_SETTING"] == "keep me"
    assert read_env_file(env)["ML_CLIENT_ID"] == fake.client_id
