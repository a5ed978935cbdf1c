"""HttpxAuth on an event loop: a slow refresh leaves the loop free; cancelled waits lose nothing.

The token endpoint of the loopback FakeMercadoLibre is made slow (``token_delay``) so that a
refresh takes seconds. A probe task sleeps a few milliseconds at a time and records how late
it wakes: the loop's lag. The lag is compared with the refresh's duration measured in the
same run, never with a fixed time, and a control runs the same probe around a refresh made on
the loop itself, to show the probe sees a blocked loop.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from mlauth.httpx import HttpxAuth
from mlauth.integrations.httpx_auth import _hops
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support import SCRIPTS
from tests.support.httpx_calls import wait_until
from tests.support.threads import refresh_turn_is_free

WORKER = SCRIPTS / "httpx_worker.py"
DEADLINE = 60.0  # for any poll or answer; generous, the machine is shared and noisy
PERIOD = 0.005  # the probe's sleep
REFRESH_DELAY = 1.0  # the token endpoint's delay in the lag tests
SLOW_REFRESH = 3.0  # in the cancellation tests: the POST is still in flight when we cancel
BACKENDS = ["asyncio", "trio"]


def expired_env(fake: FakeMercadoLibre, env: Path) -> None:
    """A .env whose token has expired: the first request of anyone must refresh."""
    fake.write_env(env, expires_at=time.time() - 10)


def dead_env(fake: FakeMercadoLibre, env: Path) -> None:
    """A .env that says its token lives an hour while the server has already killed it: the
    first request is sent and meets a 401, and the refresh is ``after_401``'s."""
    lifetime = fake.token_lifetime
    fake.token_lifetime = 0.0
    fake.write_env(env, expires_at=time.time() + 3600)
    fake.token_lifetime = lifetime


class LagProbe:
    """Sleeps PERIOD at a time on the loop and keeps the worst lateness it woke with."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.running = anyio.Event()
        self.stop = anyio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            before = anyio.current_time()
            await anyio.sleep(PERIOD)
            self.worst = max(self.worst, anyio.current_time() - before - PERIOD)
            self.running.set()


async def under_probe(work: Callable[[], Awaitable[object]]) -> tuple[float, float, object]:
    """Run ``work`` while a LagProbe runs: (worst lag, the work's duration, its result)."""
    probe = LagProbe()
    async with anyio.create_task_group() as group:
        group.start_soon(probe.run)
        await probe.running.wait()
        started = anyio.current_time()
        result = await work()
        took = anyio.current_time() - started
        probe.stop.set()
    return probe.worst, took, result


async def requests_that_refresh(env: Path, url: str, count: int) -> tuple[float, float, object]:
    """``count`` requests at once, under the probe; the client and auth are made before it
    starts (reading the .env and building an SSL context are the caller's, not the flow's)."""
    statuses: list[int] = []
    async with httpx.AsyncClient(auth=HttpxAuth.from_env(env), timeout=DEADLINE) as client:

        async def call() -> None:
            statuses.append((await client.get(f"{url}/users/me")).status_code)

        async def calls() -> list[int]:
            async with anyio.create_task_group() as group:
                for _ in range(count):
                    group.start_soon(call)
            return statuses

        return await under_probe(calls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_env", [expired_env, dead_env], ids=["expired", "401"])
def test_a_slow_refresh_leaves_the_event_loop_free(
    tmp_path: Path, backend: str, make_env: Callable[[FakeMercadoLibre, Path], None]
) -> None:
    with FakeMercadoLibre() as fake:
        env = tmp_path / ".env"
        make_env(fake, env)
        fake.token_delay = REFRESH_DELAY

        async def main() -> tuple[float, float, object, float]:
            lag, took, statuses = await requests_that_refresh(env, fake.base_url, 10)
            # The same probe over an idle wait as long, in the same run: this machine's own lag.
            idle, _, _ = await under_probe(lambda: anyio.sleep(took))
            return lag, took, statuses, idle

        lag, took, statuses, idle = anyio.run(main, backend=backend)
        stats = fake.stats()
    print(
        f"\n[figures] {backend}: worst loop lag {lag * 1000:.1f} ms during {took * 1000:.0f} ms"
        f" (idle: {idle * 1000:.1f} ms)"
    )
    assert statuses == [200] * 10
    assert stats["refreshes"] == 1
    # The requests waited for the slow refresh; the loop did not: its worst lag is the idle
    # loop's plus well under the refresh (a blocked loop's is all of it, see the control).
    assert lag < idle + took / 4, (lag, idle, took)


def test_the_probe_sees_a_refresh_made_on_the_loop(tmp_path: Path) -> None:
    """The control: the same probe, around the engine's blocking call made on the loop, as an
    adapter that forgot to move it to a thread would do. The lag is the refresh's length."""
    with FakeMercadoLibre() as fake:
        env = tmp_path / ".env"
        expired_env(fake, env)
        fake.token_delay = REFRESH_DELAY
        auth = HttpxAuth.from_env(env)

        async def blocking() -> object:
            return auth._engine.token_for_request()  # the POST, on the loop

        async def main() -> tuple[float, float, object]:
            return await under_probe(blocking)

        lag, took, _ = anyio.run(main)
        stats = fake.stats()
    print(f"\n[figures] control: worst loop lag {lag * 1000:.0f} ms during {took * 1000:.0f} ms")
    assert stats["refreshes"] == 1
    assert lag > took / 2, (lag, took)


def lock_busy(lock_path: Path) -> bool:
    """Whether another process holds the refresh lock, asked from a new process."""
    out = subprocess.run(
        [sys.executable, str(WORKER), "lock-busy", str(lock_path)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    ).stdout
    busy: bool = json.loads(out)["busy"]
    return busy


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_task_cancelled_during_the_refresh_loses_nothing(tmp_path: Path, backend: str) -> None:
    """The task whose request started the refresh is cancelled while the POST is in flight:
    it stops waiting at once, the refresh goes on to its save and lets the lock go, and the
    tasks that were waiting for it get its token."""
    waiters = 3

    with FakeMercadoLibre() as fake:
        env = tmp_path / ".env"
        expired_env(fake, env)
        fake.token_delay = SLOW_REFRESH
        auth = HttpxAuth.from_env(env)
        seen: dict[str, object] = {}

        async def main() -> None:
            async with httpx.AsyncClient(auth=auth, timeout=DEADLINE) as client:
                statuses: list[int] = []

                async def waiter() -> None:
                    statuses.append((await client.get(f"{fake.base_url}/users/me")).status_code)

                async with anyio.create_task_group() as group:
                    victim = anyio.CancelScope()

                    async def first() -> None:
                        with victim:
                            seen["victim"] = (
                                await client.get(f"{fake.base_url}/users/me")
                            ).status_code
                        seen["victim_in_flight"] = fake.token_requests_in_flight.is_set()

                    group.start_soon(first)
                    await wait_until(fake.token_requests_in_flight.is_set, "the token POST")
                    for _ in range(waiters):
                        group.start_soon(waiter)
                    # They wait on the loop for the victim's trip to a worker thread (one
                    # task per loop and auth goes to a thread; the others take its answer).
                    turn = _hops(auth._engine).lock
                    await wait_until(
                        lambda: turn.statistics().tasks_waiting >= waiters, "the waiters waiting"
                    )
                    victim.cancel()
                seen["statuses"] = statuses
                seen["victim_cancelled"] = victim.cancelled_caught
                # The next request needs neither a refresh nor a wait.
                seen["after"] = (await client.get(f"{fake.base_url}/users/me")).status_code

        anyio.run(main, backend=backend)
        stats = fake.stats()
        stored = read_env_file(env)["ML_REFRESH_TOKEN"]
        assert fake.is_live(stored)

    assert seen["victim_cancelled"] and "victim" not in seen
    # The victim's task ended while the POST it started was still in flight.
    assert seen["victim_in_flight"] is True
    assert seen["statuses"] == [200] * waiters
    assert seen["after"] == 200
    assert stats["refreshes"] == 1 and stats["token_requests"] == 1
    assert stats["invalid_grant"] == 0
    assert not lock_busy(tmp_path / ".env.lock")
    assert refresh_turn_is_free(auth)  # type: ignore[arg-type]
    assert (tmp_path / ".env.journal").read_bytes() == b""  # the refresh was committed


def start_cancel_all(env: Path, url: str, backend: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(WORKER), "cancel-all", str(env), url, "--tasks", "10"]
    return subprocess.Popen(
        [*command, "--backend", backend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    assert ready, f"worker {proc.pid} said nothing within {DEADLINE:g}s"
    line = proc.stdout.readline()
    assert line, f"worker {proc.pid} exited ({proc.wait()})"
    answer: dict[str, object] = json.loads(line)
    return answer


@pytest.mark.processes
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_process_that_cancels_every_waiting_task_exits_with_the_token_saved(
    tmp_path: Path, backend: str
) -> None:
    """Every task waits for a slow refresh; all are cancelled and the event loop returns. The
    interpreter then exits, with the refresh's worker thread still running: the refresh must
    reach its save first. The server has already rotated the chain and holds its answer back,
    as a real one would go on with a grant whatever the client does: a process that exited
    before the answer came would leave a .env whose refresh token is spent for good."""
    with FakeMercadoLibre() as fake:
        env = tmp_path / ".env"
        expired_env(fake, env)
        before = read_env_file(env)["ML_REFRESH_TOKEN"]
        fake.token_answer_delay = SLOW_REFRESH
        proc = start_cancel_all(env, fake.base_url, backend)
        try:
            assert read_line(proc) == {"started": 10}
            assert fake.token_requests_in_flight.wait(DEADLINE), "no token POST"
            assert proc.stdin is not None
            proc.stdin.write("cancel\n")
            proc.stdin.flush()
            outcome = read_line(proc)
            # The loop was done with every task while the POST was still in flight.
            in_flight = fake.token_requests_in_flight.is_set()
            _, err = proc.communicate(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        stats = fake.stats()
        after = read_env_file(env)["ML_REFRESH_TOKEN"]
        rotated, live = after != before, fake.is_live(after)  # no token in a failure message
    print(f"\n[figures] {backend}: {outcome}, exit {proc.returncode}, stats {stats}")
    assert outcome == {"cancelled": 10, "finished": 0}
    assert in_flight
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert stats["refreshes"] == 1 and stats["invalid_grant"] == 0
    assert rotated
    assert live, "the .env holds a spent refresh token: the chain is lost"
    assert (tmp_path / ".env.journal").read_bytes() == b""
