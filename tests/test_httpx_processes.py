"""HttpxAuth in real processes sharing one .env with each other and with MLAuth.

Every worker (tests/support/scripts/httpx_worker.py) builds its auths, says it is ready and
waits on its stdin; the test releases them all with one ``go`` line each, so they start
calling together. The tokens live a few seconds on a real loopback FakeMercadoLibre that kills
the old access token at each rotation, so a run crosses several lifetimes. The first token is
already dead on the server while the .env says it lives for an hour: every process starts on
the 401 path (``after_401``), and then refreshes ahead of expiry.
"""

from __future__ import annotations

import itertools
import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlauth.cli.demo import total
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support import SCRIPTS

pytestmark = pytest.mark.processes

WORKER = SCRIPTS / "httpx_worker.py"
LIFETIME = 5.0  # seconds a token lives on the server
SECONDS = 10.0  # calling time of every worker: two lifetimes
# Seconds between one task's (or thread's) calls. Unpaced, 160 tasks keep the test server
# (one process, one GIL, a thread per connection) so busy on two shared cores that a call
# waits seconds, as long as these tokens live, and a re-sent call can meet the next rotation.
PAUSE = 0.5
DEADLINE = 120.0  # for a worker to answer; generous, the machine is shared and noisy


def start(env: Path, url: str, **counts: int) -> subprocess.Popen[str]:
    """A storm worker; ``counts``: tasks, httpx_threads, requests_threads."""
    command = [sys.executable, str(WORKER), "storm", str(env), url]
    command += ["--seconds", str(SECONDS), "--pause", str(PAUSE)]
    for name, count in counts.items():
        command += [f"--{name.replace('_', '-')}", str(count)]
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    assert ready, f"worker {proc.pid} said nothing within {DEADLINE:g}s"
    line = proc.stdout.readline()
    assert line, (
        f"worker {proc.pid} exited: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
    )
    answer: dict[str, object] = json.loads(line)
    return answer


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # a failed test leaves no worker behind
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def run_together(procs: list[subprocess.Popen[str]]) -> tuple[list[dict[str, object]], float]:
    """Release the workers at once (the barrier) and collect their totals; and the span."""
    for proc in procs:
        assert "ready" in read_line(proc)
    started = time.time()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()  # communicate() closes it
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results, time.time() - started


def dead_token_env(fake: FakeMercadoLibre, env: Path) -> None:
    """A .env whose access token the server has already killed but which says it lives an
    hour; no ML_TOKEN_REFRESHED_AT, so its 401 cannot pass for a young token's."""
    fake.token_lifetime = 0.0
    fake.write_env(env, expires_at=time.time() + 3600)
    fake.token_lifetime = LIFETIME


def check_chain(
    label: str, results: list[dict[str, object]], fake: FakeMercadoLibre, env: Path, span: float
) -> None:
    """One refresh per lifetime crossed, none of a token twice, no failed call, and the .env
    holds the live end of the chain."""
    stats, times = fake.stats(), fake.refresh_times()
    calls, failed = total(results, "calls"), total(results, "failed")
    absorbed = total(results, "absorbed_401")
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    print(
        f"\n[figures] {label}, {SECONDS:g}s, tokens {LIFETIME:g}s: calls={calls} failed={failed} "
        f"refreshes={stats['refreshes']} gaps={gaps} 401s served={stats['api_401']} "
        f"absorbed={absorbed} invalid_grant={stats['invalid_grant']} "
        f"slowest call={max(int(str(r['worst_ms'])) for r in results)}ms"
    )
    assert failed == 0, [r["errors"] for r in results]
    assert all(int(str(r["ok"])) > 0 for r in results), results
    # A refresh token spent twice is answered invalid_grant: none was.
    assert stats["invalid_grant"] == 0
    # The dead first token: every process met its 401, and one refresh answered them all.
    assert stats["api_401"] >= len(results)
    assert absorbed == stats["api_401"]  # every 401 was re-sent, none reached a caller
    # After the 401 refresh, one ahead of expiry per lifetime: three quarters of one apart.
    # The lower bound is the quarter mlauth refuses to refresh within (the server's times,
    # and a POST it handled late under load, shorten a gap); the upper bound is the span.
    assert stats["refreshes"] >= SECONDS / LIFETIME
    assert stats["refreshes"] <= span / (LIFETIME * 0.75) + 2
    assert min(gaps) >= LIFETIME / 4, gaps
    assert fake.is_live(read_env_file(env)["ML_REFRESH_TOKEN"])


def test_four_processes_of_async_tasks_share_one_chain(
    tmp_path: Path, workers: list[subprocess.Popen[str]]
) -> None:
    processes, tasks = 4, 40
    with FakeMercadoLibre(kill_old_access_on_refresh=True) as fake:
        env = tmp_path / ".env"
        dead_token_env(fake, env)
        workers += [start(env, fake.base_url, tasks=tasks) for _ in range(processes)]
        results, span = run_together(workers)
        check_chain(f"{processes} processes x {tasks} async tasks", results, fake, env, span)


def test_one_process_mixing_requests_and_httpx_sync_and_async(
    tmp_path: Path, workers: list[subprocess.Popen[str]]
) -> None:
    with FakeMercadoLibre(kill_old_access_on_refresh=True) as fake:
        env = tmp_path / ".env"
        dead_token_env(fake, env)
        workers.append(start(env, fake.base_url, tasks=20, httpx_threads=2, requests_threads=3))
        results, span = run_together(workers)
        label = "1 process: 3 requests threads + 20 async tasks + 2 httpx.Client threads"
        check_chain(label, results, fake, env, span)
    kinds = results[0]["by_kind"]
    assert isinstance(kinds, dict)
    assert set(kinds) == {"requests", "httpx-async", "httpx-sync"}, kinds


def test_requests_processes_and_httpx_processes_share_one_chain(
    tmp_path: Path, workers: list[subprocess.Popen[str]]
) -> None:
    with FakeMercadoLibre(kill_old_access_on_refresh=True) as fake:
        env = tmp_path / ".env"
        dead_token_env(fake, env)
        workers += [start(env, fake.base_url, requests_threads=4) for _ in range(2)]
        workers += [start(env, fake.base_url, tasks=40) for _ in range(2)]
        results, span = run_together(workers)
        check_chain(
            "2 requests processes x 4 threads + 2 x 40 async tasks", results, fake, env, span
        )
    assert [list(r["by_kind"]) for r in results] == [  # type: ignore[call-overload]
        ["requests"],
        ["requests"],
        ["httpx-async"],
        ["httpx-async"],
    ]
