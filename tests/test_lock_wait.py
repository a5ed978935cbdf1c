"""Waiting for a refresh lock's release without taking it: ``wait_released``, real processes.

Each lock kind (the sibling lock file's ``flock``, a mounted ``.env``'s OFD lock on its own
inode) is held by one process while others wait. The kernel's table of locks
(``/proc/locks``) shows what each waiter asked for: a waiter blocked in the kernel for a
*shared* lock (``->`` ... ``READ``) neither polls (a polling waiter is never listed as
blocked) nor queues for the lock itself (it would be listed ``WRITE``). Releases and answers
are signalled through pipes; no test sleeps to synchronize or times anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mlauth
from mlauth.stores.envfile import EnvFileStore, update_env_file
from mlauth.stores.lock import ProcessLock
from mlauth.stores.ofd import InodeLock, ofd_supported
from mlauth.testing import FakeMercadoLibre
from tests.support import SCRIPTS
from tests.support.kernel_locks import DEADLINE, blocked_readers, locks_on, poll_until

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(
        not os.path.exists("/proc/locks") or not ofd_supported(),
        reason="needs Linux (/proc/locks, OFD locks)",
    ),
]

AGENT = SCRIPTS / "lock_agent.py"
WAITERS = 4


class Agent:
    """A tests/support/scripts/lock_agent.py process: one command a line in, one JSON answer a
    line out."""

    def __init__(self, kind: str, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT), kind, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = int(self.read()["ready"])  # type: ignore[call-overload]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = DEADLINE) -> dict[str, object]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"agent {self.proc.pid} did not answer within {timeout:g}s"
        line = self.proc.stdout.readline()
        assert line, f"agent {self.proc.pid} exited ({self.proc.wait()})"
        answer: dict[str, object] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, object]:
        self.send(command)
        return self.read()

    def has_answered(self) -> bool:
        """Whether an answer is waiting to be read (the process has printed it); never waits."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 0)
        return bool(ready)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("exit")
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def agents() -> Iterator[Callable[[str, Path], Agent]]:
    started: list[Agent] = []

    def start(kind: str, path: Path) -> Agent:
        agent = Agent(kind, path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


@pytest.fixture(params=["file", "inode"])
def lock_target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """(kind, path): a sibling lock file, or a .env locked on its own inode."""
    if request.param == "file":
        return "file", tmp_path / ".env.lock"
    env = tmp_path / ".env"
    env.write_text("ML_CLIENT_ID=1\n")
    return "inode", env


def test_every_waiter_sleeps_on_a_shared_lock_and_wakes_when_the_holder_lets_go(
    agents: Callable[[str, Path], Agent], lock_target: tuple[str, Path]
) -> None:
    kind, path = lock_target
    holder = agents(kind, path)
    assert holder.ask("take 10") == {"took": True}
    waiters = [agents(kind, path) for _ in range(WAITERS)]
    for waiter in waiters:
        waiter.send(f"wait {DEADLINE}")
    # Each waiter is asleep in the kernel, asking for a shared lock: not polling (a poller is
    # never listed as blocked), not queueing for the lock itself (that would be WRITE).
    poll_until(f"{WAITERS} blocked shared waiters", lambda: blocked_readers(path) == WAITERS)
    assert all(mode == "READ" for blocked, _, mode in locks_on(path) if blocked)
    assert [entry for entry in locks_on(path) if not entry[0]] == [
        (False, "FLOCK" if kind == "file" else "OFDLCK", "WRITE")
    ]  # the holder's, alone
    assert not any(waiter.has_answered() for waiter in waiters)  # none got through yet

    # A second holder-to-be, also asleep for a shared lock, that keeps it once it has it:
    # while it holds it nobody can hold the lock exclusively, so a waiter that took the lock
    # to see it free could not finish until this one lets go.
    sharer = agents(kind, path)
    sharer.send("keep-shared")
    poll_until("the sharer blocked too", lambda: blocked_readers(path) == WAITERS + 1)

    assert holder.ask("release") == {"released": True}
    assert sharer.read() == {"kept": True}
    answers = [waiter.read() for waiter in waiters]
    assert answers == [{"waited": True}] * WAITERS
    # A waiter that has answered holds nothing: only the sharer's lock is left.
    assert locks_on(path) == [(False, "FLOCK" if kind == "file" else "OFDLCK", "READ")]
    assert sharer.ask("release-shared") == {"released": True}
    assert locks_on(path) == []
    # Nothing was left behind: the lock is free for anyone, at once.
    assert holder.ask("take 0") == {"took": True}
    assert holder.ask("release") == {"released": True}


def test_a_waiter_that_times_out_leaves_nothing_held(
    agents: Callable[[str, Path], Agent], lock_target: tuple[str, Path]
) -> None:
    kind, path = lock_target
    holder = agents(kind, path)
    assert holder.ask("take 10") == {"took": True}
    waiter = agents(kind, path)
    assert waiter.ask("wait 0.2") == {"waited": False}
    # Its thread is still asleep in the kernel (it cannot be called back), holding nothing.
    assert blocked_readers(path) == 1
    assert [entry for entry in locks_on(path) if not entry[0]] == [
        (False, "FLOCK" if kind == "file" else "OFDLCK", "WRITE")
    ]
    # The holder can let go and take the lock again; the leftover thread, woken in between,
    # takes a shared lock for an instant at most and gives it back.
    assert holder.ask("release") == {"released": True}
    assert holder.ask(f"take {DEADLINE}") == {"took": True}
    assert holder.ask("release") == {"released": True}
    assert waiter.ask("settle") == {"settled": True}
    assert locks_on(path) == []
    newcomer = agents(kind, path)
    assert newcomer.ask("take 0") == {"took": True}  # at once: nobody holds anything
    assert newcomer.ask("release") == {"released": True}


def test_a_forked_child_neither_keeps_nor_joins_its_parents_wait(
    agents: Callable[[str, Path], Agent], lock_target: tuple[str, Path]
) -> None:
    kind, path = lock_target
    holder = agents(kind, path)
    assert holder.ask("take 10") == {"took": True}
    parent = agents(kind, path)
    assert parent.ask("wait 0.2") == {"waited": False}  # leaves its thread waiting
    parent.send(f"fork {DEADLINE}")
    # The child waits on a descriptor of its own (two blocked shared waiters now): it did
    # not join its parent's thread, which does not exist in the child.
    poll_until("the child blocked too", lambda: blocked_readers(path) == 2)
    assert holder.ask("release") == {"released": True}
    # It kept no copy of its parent's descriptor (which would be a lock left held by the
    # child if the parent's thread had got the lock at the fork), and was woken too.
    assert parent.read() == {"child_fds": [], "child_waited": True}
    assert parent.ask("settle") == {"settled": True}
    assert locks_on(path) == []


def test_a_free_or_missing_lock_is_released_at_once_without_a_thread(tmp_path: Path) -> None:
    lock_file = tmp_path / ".env.lock"
    lock = ProcessLock(str(lock_file))
    assert lock.wait_released(0) is True  # never locked: no file, none created
    assert not lock_file.exists()
    with lock.hold(1):
        pass
    assert lock.wait_released(0) is True
    other = ProcessLock(str(lock_file))
    assert other.wait_released(10) is True
    env = tmp_path / ".env"
    env.write_text("ML_CLIENT_ID=1\n")
    inode = InodeLock(str(env))
    assert inode.wait_released(10) is True
    for free in (lock, other, inode):  # answered by the probe: no waiting thread started
        assert free._watch is None
        assert not free._watching


def waiting_for_release(thread: threading.Thread) -> bool:
    """Whether ``thread`` is asleep on the event of ``wait_released`` (past its probe)."""
    callee, frame = None, sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "wait_released":
            return callee is not None and callee.f_code.co_name == "wait"
        callee, frame = frame, frame.f_back
    return False


def test_threads_of_one_process_share_one_waiting_thread(tmp_path: Path) -> None:
    lock_file = str(tmp_path / ".env.lock")
    holder, lock = ProcessLock(lock_file), ProcessLock(lock_file)
    answers: list[bool] = []
    with holder.hold(1):
        threads = [
            threading.Thread(target=lambda: answers.append(lock.wait_released(DEADLINE)))
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        poll_until(
            "all three threads asleep in wait_released",
            lambda: all(waiting_for_release(thread) for thread in threads),
        )
        # One thread of the process waits in the kernel for all three.
        assert blocked_readers(Path(lock_file)) == 1
        watchers = [t for t in threading.enumerate() if t.name == "mlauth-wait-released"]
        assert len(watchers) == 1
        assert answers == []
    for thread in threads:
        thread.join(DEADLINE)
    assert answers == [True] * 3
    watchers[0].join(DEADLINE)
    assert locks_on(Path(lock_file)) == []


@pytest.mark.parametrize("write", ["", "ML_ENV_WRITE=in-place\n"], ids=["lock-file", "in-place"])
def test_envfile_store_waits_on_its_own_lock(tmp_path: Path, write: str) -> None:
    env = tmp_path / ".env"
    env.write_text("ML_CLIENT_ID=1\nML_CLIENT_SECRET=x\nML_REFRESH_TOKEN=TG-1\n" + write)
    env.chmod(0o600)
    store = EnvFileStore(env)
    assert store.in_place is bool(write)
    holder = InodeLock(str(env)) if store.in_place else ProcessLock(store.lock_path)
    assert store.wait_unlocked(0) is True
    with holder.hold(1):
        assert store.wait_unlocked(0.05) is False
    assert store.wait_unlocked(DEADLINE) is True


def test_a_wait_without_a_usable_limit_waits_until_the_release(tmp_path: Path) -> None:
    lock_file = str(tmp_path / ".env.lock")
    holder, lock = ProcessLock(lock_file), ProcessLock(lock_file)
    answers: list[bool] = []
    with holder.hold(1):
        waiter = threading.Thread(target=lambda: answers.append(lock.wait_released(math.inf)))
        waiter.start()
        poll_until("the waiter asleep", lambda: waiting_for_release(waiter))
    waiter.join(DEADLINE)
    assert answers == [True]


def test_the_scale_benchmark_counts_each_wait_for_a_release(tmp_path: Path) -> None:
    # benchmarks/worker.py marks a call that waited from the lock's own debug records: the
    # formats must stay the ones the lock logs.
    from benchmarks.worker import _LockWaits

    local = threading.local()
    counter = _LockWaits(local)
    logger = logging.getLogger("mlauth")
    logger.addHandler(counter)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    lock_file = str(tmp_path / ".env.lock")
    holder, lock = ProcessLock(lock_file), ProcessLock(lock_file)
    answers: list[bool] = []
    try:
        with holder.hold(1):
            assert lock.wait_released(0.01) is False  # "gave up waiting ..."
            waiter = threading.Thread(target=lambda: answers.append(lock.wait_released(DEADLINE)))
            waiter.start()
            poll_until("the waiter asleep", lambda: waiting_for_release(waiter))
        waiter.join(DEADLINE)  # "waited ... to be released"
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
    assert answers == [True]
    # The holder's "took refresh lock", then the waiter's two.
    assert len(counter.waits) == 3
    assert counter.waits[1] >= 0.01
    assert counter.warnings == []


@pytest.mark.parametrize("path", ["expired", "stale"])
def test_a_token_in_need_adopts_a_peers_refresh_without_taking_the_lock(
    agents: Callable[[str, Path], Agent],
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """The engine's side: a process whose token expired (or is within its refresh margin)
    while a peer holds the lock waits for the peer to let go, then uses what it saved."""
    env = tmp_path / ".env"
    left = {"expired": -10.0, "stale": 30.0}[path]  # a 300 s margin: 30 s left is stale
    fake_ml.write_env(env, expires_at=time.time() + left)
    auth = mlauth.MLAuth.from_env(env)
    lock = Path(f"{env}.lock")
    peer = agents("file", lock)
    assert peer.ask("take 10") == {"took": True}
    got: list[mlauth.TokenSet] = []
    caplog.set_level(logging.DEBUG, logger="mlauth")
    thread = threading.Thread(target=lambda: got.append(auth.valid_tokens()))
    thread.start()
    poll_until("the auth sleeps on a shared lock", lambda: blocked_readers(lock) == 1)
    # The peer refreshes: the next link of the chain goes into the .env, then it lets go.
    new = fake_ml.issue_tokens()
    now = time.time()
    update_env_file(
        env,
        {
            "ML_ACCESS_TOKEN": str(new["access_token"]),
            "ML_REFRESH_TOKEN": str(new["refresh_token"]),
            "ML_TOKEN_EXPIRES_AT": str(now + 3600),
            "ML_TOKEN_REFRESHED_AT": str(now),
        },
    )
    assert peer.ask("release") == {"released": True}
    thread.join(DEADLINE)
    assert got and got[0].access_token == mlauth.Secret(str(new["access_token"]))
    assert fake_ml.stats()["token_requests"] == 0  # nothing spent by this process
    assert "took refresh lock" not in caplog.text  # nor did it queue for the lock


def test_a_nested_hold_released_inside_another_leaves_the_holder_unblocked(
    tmp_path: Path,
) -> None:
    # The thread still holds the lock after an inner hold (or a busy() look) lets go: asking
    # whether the lock is free must not make it wait for itself.
    lock = ProcessLock(str(tmp_path / ".env.lock"))
    with lock.hold(1.0):
        with lock.hold(0.0):
            pass
        assert lock.wait_released(0.0)
        lock.busy()
        assert lock.wait_released(0.0)
    assert lock.wait_released(0.0) and not lock.busy()
