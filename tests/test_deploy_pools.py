"""Process pools and forks of a process that already built its MLAuth (issue 10, item 1).

Workers inherit (fork) or build (spawn, forkserver) the auth; every run crosses several token
expiries against the loopback fake, which kills the old access token at each rotation.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mlauth import EnvFileStore, MLAuth
from mlauth.cli.migrate import migrate_to_redis
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support import SCRIPTS
from tests.support.demo_workers import LIFETIME, wait_for_line
from tests.support.mounts import bind_file
from tests.support.pools import run_pool

pytestmark = pytest.mark.processes


@pytest.fixture
def fake_env(tmp_path: Path) -> Iterator[tuple[FakeMercadoLibre, Path]]:
    with FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake:
        env = tmp_path / ".env"
        fake.write_env(env, expires_at=time.time() + LIFETIME)
        yield fake, env


@pytest.mark.parametrize("kind", ["fork", "executor-fork", "forkserver", "spawn"])
def test_pool_workers_share_the_chain_through_expiries(
    kind: str, fake_env: tuple[FakeMercadoLibre, Path]
) -> None:
    run_pool(kind, *fake_env)


def test_fork_pool_workers_share_a_redis_chain_through_expiries(
    fake_env: tuple[FakeMercadoLibre, Path], redis_server: RedisServer
) -> None:
    # redis-py's pools notice the new pid and reconnect; the store keeps no other socket.
    fake, env = fake_env
    migrate_to_redis(env, redis_server.url)
    run_pool("fork", fake, env, " (Redis store)")


def test_pickling_an_auth_or_its_session_says_to_build_one_per_worker(
    fake_env: tuple[FakeMercadoLibre, Path],
) -> None:
    auth = MLAuth.from_env(fake_env[1])
    session = requests.Session()
    session.auth = auth
    for thing in (auth, session):
        with pytest.raises(TypeError, match=r"MLAuth.from_env\(path\) in the pool's initializer"):
            pickle.dumps(thing)
    # What a user sees who passes it to a pool task: the same message, not a lock's.
    with (
        multiprocessing.get_context("fork").Pool(1) as pool,
        pytest.raises(TypeError, match="cannot be pickled"),
    ):
        pool.apply(len, (session,))


def _start_holder(
    env: Path, fake: FakeMercadoLibre, tmp_path: Path
) -> tuple[subprocess.Popen[str], int, Path, Path]:
    log, result = tmp_path / "child.log", tmp_path / "child.json"
    log.touch()  # wait_for_line reads it before the child opens it
    script = str(SCRIPTS / "fork_lock_holder.py")
    holder = subprocess.Popen(
        [sys.executable, script, str(env), fake.base_url, str(log), str(result)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    line = holder.stdout.readline()
    assert line.startswith("forked "), line
    return holder, int(line.split()[1]), log, result


def _wait_for_result(result: Path, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while not result.exists():
        assert time.monotonic() < deadline, f"the forked child gave no result in {timeout:g}s"
        time.sleep(0.01)
    answer: dict[str, object] = json.loads(result.read_text())
    return answer


def _wait_gone(pid: int, timeout: float) -> None:
    """Poll until ``pid`` has exited: gone, or a zombie, which holds no file open."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        assert time.monotonic() < deadline, f"pid {pid} still running {timeout:g}s after SIGKILL"
        time.sleep(0.01)


# The sibling lock file (flock on .env.lock) and the inode lock of a .env mounted alone (an
# OFD lock on the .env itself): both belong to an open file description the child inherits.
LAYOUTS = {"sibling-lock-file": "took refresh lock", "mounted-alone": "took the refresh lock"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("parent_fate", ["releases", "is_killed"])
def test_child_forked_while_a_parent_thread_holds_the_lock_waits_then_refreshes(
    parent_fate: str, layout: str, tmp_path: Path
) -> None:
    with FakeMercadoLibre(token_lifetime=3600.0) as fake, contextlib.ExitStack() as stack:
        env = tmp_path / "host" / ".env"
        env.parent.mkdir()
        fake.write_env(env, expires_at=time.time() - 10)  # the child's request must refresh
        if layout == "mounted-alone":
            env = stack.enter_context(bind_file(env, tmp_path / "container" / ".env"))
        assert EnvFileStore(env).in_place == (layout == "mounted-alone")
        holder, child, log, result = _start_holder(env, fake, tmp_path)
        try:
            wait_for_line(log, "waiting for refresh lock", 30)
            # Still held by the parent's thread: the child waits and has spent nothing.
            assert not result.exists()
            assert fake.stats()["token_requests"] == 0
            if parent_fate == "releases":
                assert holder.stdin is not None
                holder.stdin.write("go\n")
                holder.stdin.flush()
            else:
                # The kernel frees the lock when the last descriptor of the parent's open
                # file description closes. Had the child kept its inherited copy, that
                # would never happen and it would wait for itself for its whole 60 s
                # lock_timeout; the 20 s deadline below would fail first.
                os.kill(holder.pid, signal.SIGKILL)
            answer = _wait_for_result(result, 20)
            holder.wait(timeout=30)
        finally:
            for pid in (holder.pid, child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            holder.wait(timeout=30)
            # An orphaned child is reaped by init, not here: it must be dead before the
            # mounted .env it holds open can be unmounted.
            _wait_gone(child, 30)
            if holder.stdin is not None:
                holder.stdin.close()
            if holder.stdout is not None:
                holder.stdout.close()
        stats = fake.stats()
    assert answer == {"status": 200, "error": None}
    assert holder.returncode == (0 if parent_fate == "releases" else -signal.SIGKILL)
    assert stats["refreshes"] == 1 and stats["invalid_grant"] == 0
    assert LAYOUTS[layout] in log.read_text()


INSIDE_INSTALL_AT_FORK = """
import os, signal, sys, threading, time
import mlauth, mlauth.integrations.patch
held, release = threading.Event(), threading.Event()

def inside_install():
    with mlauth.integrations.patch._lock:  # a thread of the parent is inside install() at the fork
        held.set()
        release.wait()

threading.Thread(target=inside_install, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    mlauth.install(sys.argv[1])
    os._exit(0)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status), flush=True)
        break
    time.sleep(0.01)
else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("child hung", flush=True)
release.set()
"""


def test_a_child_forked_while_a_thread_is_inside_install_can_install(
    fake_env: tuple[FakeMercadoLibre, Path],
) -> None:
    # The thread that held install()'s lock does not exist in the child: its lock is new.
    done = subprocess.run(
        [sys.executable, "-c", INSIDE_INSTALL_AT_FORK, str(fake_env[1])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "child exit 0", done.stdout + done.stderr
