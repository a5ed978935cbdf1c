"""Processes running the demo's worker (``python -m mlauth.cli.demo --worker``) on one token
chain, what every such storm must show, and a refresher killed while its POST is in flight."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mlauth.cli.demo import total
from mlauth.testing import FakeMercadoLibre

LIFETIME = 2.0


def worker(
    env: Path,
    url: str,
    *,
    threads: int,
    seconds: float,
    requests: int | None = None,
    debug: bool = False,
    stderr: IO[str] | int = subprocess.PIPE,
    cwd: Path | None = None,
) -> subprocess.Popen[str]:
    """A demo worker process on ``env`` (relative to ``cwd``, if given)."""
    command = [sys.executable, "-m", "mlauth.cli.demo", "--worker", "--env", str(env), "--url", url]
    command += ["--threads", str(threads), "--seconds", str(seconds)]
    if requests is not None:
        command += ["--requests", str(requests)]
    if debug:
        command += ["--log-level", "DEBUG"]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True)


def result_of(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def check_storm(
    label: str,
    results: list[dict[str, object]],
    stats: dict[str, int],
    refresh_times: list[float],
    *,
    seconds: float,
    span: float,
    threads: int,
) -> None:
    """What every multi-process run on one token chain must show, printed as its figures."""
    calls, failed = total(results, "calls"), total(results, "failed")
    absorbed = total(results, "absorbed_401")
    print(
        f"\n[figures] {label}, {seconds:g}s, tokens {LIFETIME:g}s: calls={calls} "
        f"failed={failed} refreshes={stats['refreshes']} 401s served={stats['api_401']} "
        f"absorbed={absorbed} invalid_grant={stats['invalid_grant']}"
    )
    assert calls > threads
    assert failed == 0, [r["errors"] for r in results]
    assert stats["invalid_grant"] == 0
    # The token expires every LIFETIME seconds and is refreshed a quarter-lifetime early: at
    # most one refresh per token (spending one refresh token twice shows as invalid_grant).
    # mlauth never refreshes a token younger than a quarter lifetime, so a shorter gap means a
    # 401 or an expiry check refreshed a token a peer had just rotated. The bound is that
    # quarter, not the three quarters between proactive refreshes: the times are the
    # server's, and a POST it handled late under load shortens the next gap.
    gaps = [b - a for a, b in itertools.pairwise(refresh_times)]
    assert stats["refreshes"] >= seconds / LIFETIME - 1
    # Bounded by the measured span, not the nominal seconds: under load the processes start
    # (and keep calling) over a longer stretch, and the token rightly rotates all along it.
    assert stats["refreshes"] <= span / (LIFETIME * 0.75) + 2
    assert min(gaps) >= LIFETIME / 4, gaps
    # Every 401 the server sent was absorbed by a re-send; none reached a caller.
    assert absorbed == stats["api_401"]


def wait_for_line(log: Path, needle: str, timeout: float) -> None:
    """Poll a process's log file until a line contains ``needle``; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"{needle!r} not seen in {log}: {log.read_text()[-2000:]}")


def kill_holder_mid_post(
    fake: FakeMercadoLibre,
    start_holder: Callable[[], subprocess.Popen[str]],
    start_peer: Callable[[IO[str]], subprocess.Popen[str]],
    peer_log: Path,
) -> tuple[dict[str, object], float]:
    """SIGKILL a refresher whose token POST is in flight while a peer waits for its lock.

    Returns the peer's final result line and when the holder was killed.
    """
    fake.token_delay = 30.0  # the holder's POST hangs until we kill it
    holder = start_holder()
    assert fake.token_requests_in_flight.wait(30), "the holder never reached the token POST"
    with peer_log.open("w") as log:
        peer = start_peer(log)
    wait_for_line(peer_log, "waiting for refresh lock", 30)

    fake.token_delay = 0.0
    killed_at = time.time()
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=10)
    assert holder.returncode == -signal.SIGKILL
    out, _ = peer.communicate(timeout=60)
    assert peer.returncode == 0
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result, killed_at
