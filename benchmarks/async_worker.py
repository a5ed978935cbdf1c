"""One async storm worker process: M asyncio tasks calling the fake API through one client.

Started by :mod:`benchmarks.async_storm`; prints a ready line, waits for the parent's go,
builds its ``httpx.AsyncClient`` (so it loads the token the parent has just written), runs
M tasks calling ``GET /users/me`` until the deadline on one event loop, and prints one JSON
line of results: what the caller saw (status or exception per call, 401s absorbed by a
re-send, i.e. in ``response.history``) and the refreshes this process made (mlauth's
``on_refresh``, Authlib's ``update_token``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import wait_for_go, worker_parser
from benchmarks.httpx_contenders import (
    ASYNC_LIBRARIES,
    MLAUTH,
    STATIC,
    authlib_async_client,
    mlauth_async_client,
    static_async_client,
)
from benchmarks.worker import SECRET_ENV
from mlauth.httpx import HttpxAuth


class Tally:
    """The counts of one process, kept by its tasks (one loop: no lock needed)."""

    def __init__(self) -> None:
        self.counts = {"calls": 0, "ok": 0, "failed": 0, "surfaced_401": 0, "absorbed_401": 0}
        self.errors: dict[str, int] = {}
        self.samples: list[str] = []
        self.latencies: list[float] = []
        self.first_failure: float | None = None
        self.last_ok: list[bool] = []  # per task: whether its last call succeeded
        # The 401s returned to the caller: how long each call took, and how many of them
        # were a re-send (after a first 401) that got a 401 again.
        self.surfaced_401_ms: list[float] = []
        self.surfaced_after_resend = 0

    def record(self, status: int | str, absorbed: int, elapsed: float, since_start: float) -> None:
        self.counts["calls"] += 1
        self.counts["absorbed_401"] += absorbed
        self.latencies.append(elapsed)
        if status == 200:
            self.counts["ok"] += 1
            return
        self.counts["failed"] += 1
        if status == 401:
            self.counts["surfaced_401"] += 1
            self.surfaced_401_ms.append(round(elapsed * 1000, 3))
            self.surfaced_after_resend += absorbed > 0
        if self.first_failure is None:
            self.first_failure = since_start

    def error(self, exc: Exception) -> str:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1
        if len(self.samples) < 3:
            self.samples.append(f"{name}: {str(exc)[:160]}")
        return name


async def call_until(client: httpx.AsyncClient, url: str, deadline: float, tally: Tally) -> None:
    started_at = time.monotonic()
    ok = False
    while time.monotonic() < deadline:
        started = time.perf_counter()
        absorbed = 0
        try:
            response = await client.get(url)
            status: int | str = response.status_code
            absorbed = sum(1 for r in response.history if r.status_code == 401)
        except Exception as exc:  # noqa: BLE001 (peers raise their own exception types)
            status = tally.error(exc)
        tally.record(status, absorbed, time.perf_counter() - started, time.monotonic() - started_at)
        ok = status == 200
    tally.last_ok.append(ok)


def make_client(
    library: str, store: Path, *, token_url: str, client_id: str, margin: float, tasks: int
) -> tuple[httpx.AsyncClient, list[int]]:
    """The client, and a one-item list counting the refreshes it makes.

    One kept-alive connection per task (httpx keeps 20 by default): no task waits for the
    pool or opens a new connection per call, whichever library it runs.
    """
    refreshed = [0]
    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    if library == MLAUTH:
        client = mlauth_async_client(store, timeout=30, limits=limits)
        assert isinstance(client.auth, HttpxAuth)

        def on_refresh(_tokens: object) -> None:
            refreshed[0] += 1

        client.auth.on_refresh = on_refresh
        return client, refreshed
    if library == STATIC:
        return static_async_client(store, timeout=30, limits=limits), refreshed
    client = authlib_async_client(
        store,
        token_url=token_url,
        client_id=client_id,
        # From the environment, not argv: command lines are visible to every user (ps).
        client_secret=os.environ[SECRET_ENV],
        margin=margin,
        refreshed=refreshed,
        timeout=30,
        limits=limits,
    )
    return client, refreshed


async def run(
    library: str,
    store: Path,
    url: str,
    *,
    token_url: str,
    client_id: str,
    tasks: int,
    seconds: float,
    margin: float,
) -> dict[str, object]:
    client, refreshed = make_client(
        library, store, token_url=token_url, client_id=client_id, margin=margin, tasks=tasks
    )
    tally = Tally()
    deadline = time.monotonic() + seconds
    async with client:
        await asyncio.gather(
            *(call_until(client, f"{url}/users/me", deadline, tally) for _ in range(tasks))
        )
    return {
        **tally.counts,
        "library": library,
        "pid": os.getpid(),
        "refreshed_here": refreshed[0],
        "first_failure_s": tally.first_failure,
        # Every task's last call failed: this process lost the token chain for good.
        "stranded": not any(tally.last_ok),
        "errors": tally.errors,
        "error_samples": tally.samples,
        "latencies_ms": [round(x * 1000, 3) for x in tally.latencies],
        "surfaced_401_ms": tally.surfaced_401_ms,
        "surfaced_401_after_resend": tally.surfaced_after_resend,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = worker_parser(
        "python -m benchmarks.async_worker",
        ASYNC_LIBRARIES,
        per_process="tasks",
        per_process_default=8,
    )
    args = parser.parse_args(argv)
    wait_for_go()
    result: dict[str, Any] = asyncio.run(
        run(
            args.library,
            args.store,
            args.url,
            token_url=args.token_url,
            client_id=args.client_id,
            tasks=args.tasks,
            seconds=args.seconds,
            margin=args.margin,
        )
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
