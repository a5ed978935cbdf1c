"""One process of the httpx process tests: HttpxAuth (and MLAuth) calls on one shared .env.

Run by tests/test_httpx_processes.py and tests/test_httpx_async.py with ``sys.executable``:

- ``storm ENV URL --seconds S [--tasks N] [--httpx-threads N] [--requests-threads N]``:
  builds its auths, prints ``{"ready": pid}``, waits for a ``go`` line on stdin (the test's
  barrier: every process starts calling at once), then until the deadline runs N
  ``httpx.AsyncClient`` tasks (one HttpxAuth), N threads of a sync ``httpx.Client`` (the same
  HttpxAuth object) and N ``requests`` threads (an MLAuth of its own), all calling the API.
  Prints one JSON line of totals.
- ``cancel-all ENV URL --tasks N [--backend asyncio|trio]``: starts N tasks whose first call
  must refresh, prints ``{"started": N}``, and on a ``cancel`` line cancels them all while
  they wait (asyncio: the ``asyncio.wait_for`` around them times out; trio: a cancel scope),
  prints what became of them and returns from the event loop, so the interpreter exits with
  the refresh still under way in its worker thread.
- ``lock-busy PATH``: whether another process holds the refresh lock file PATH now.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import requests

import mlauth
from mlauth.httpx import HttpxAuth
from mlauth.stores.lock import ProcessLock

TIMEOUT = 60.0  # per call: generous, the machine is shared and noisy
CONNECTIONS = 8  # per AsyncClient


def say(message: dict[str, object]) -> None:
    print(json.dumps(message), flush=True)


class Tally:
    """Counters shared by the tasks and threads of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals = {"calls": 0, "ok": 0, "failed": 0, "absorbed_401": 0}
        self.by_kind: dict[str, int] = {}
        self.errors: list[str] = []
        self.worst = 0.0  # the slowest call, in seconds

    def add(self, kind: str, status: int | str, history: Iterable[Any], took: float) -> None:
        with self._lock:
            self.totals["calls"] += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            self.totals["absorbed_401"] += sum(1 for r in history if r.status_code == 401)
            self.worst = max(self.worst, took)
            if status == 200:
                self.totals["ok"] += 1
            else:
                self.totals["failed"] += 1
                self.errors.append(f"{kind}: {status}")

    def result(self) -> dict[str, object]:
        with self._lock:
            return {
                **self.totals,
                "by_kind": dict(self.by_kind),
                "errors": self.errors[:5],
                "worst_ms": round(self.worst * 1000),
                "pid": os.getpid(),
            }


def timed(kind: str, tally: Tally, call: Callable[[], Any]) -> None:
    started = time.monotonic()
    try:
        response = call()
        status, history = response.status_code, response.history
    except (httpx.HTTPError, requests.RequestException, mlauth.MLAuthError) as exc:
        status, history = f"{type(exc).__name__}: {str(exc)[:200]}", []
    tally.add(kind, status, history, time.monotonic() - started)


async def async_tasks(
    auth: HttpxAuth, url: str, count: int, deadline: float, pause: float, tally: Tally
) -> None:
    # The tasks share a few connections, as a pipeline's client would: dozens of keep-alive
    # connections per process would have the test server's threads (one per connection, one
    # GIL) serve each in turn, and a call wait seconds, longer than these tokens live.
    limits = httpx.Limits(max_connections=CONNECTIONS)
    async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT, limits=limits) as client:

        async def calls() -> None:
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    response = await client.get(f"{url}/users/me")
                    status: int | str = response.status_code
                    history: list[httpx.Response] = response.history
                except httpx.HTTPError as exc:
                    status, history = f"{type(exc).__name__}: {str(exc)[:200]}", []
                tally.add("httpx-async", status, history, time.monotonic() - started)
                await asyncio.sleep(pause)

        await asyncio.gather(*(calls() for _ in range(count)))


def httpx_thread(auth: HttpxAuth, url: str, deadline: float, pause: float, tally: Tally) -> None:
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        while time.monotonic() < deadline:
            timed("httpx-sync", tally, lambda: client.get(f"{url}/users/me"))
            time.sleep(pause)  # pacing between calls, as the async tasks do


def requests_thread(
    auth: mlauth.MLAuth, url: str, deadline: float, pause: float, tally: Tally
) -> None:
    with requests.Session() as session:
        session.auth = auth
        while time.monotonic() < deadline:
            timed("requests", tally, lambda: session.get(f"{url}/users/me", timeout=TIMEOUT))
            time.sleep(pause)  # pacing between calls, as the async tasks do


def storm(args: argparse.Namespace) -> None:
    # Both auths are built before the barrier: the start-up (imports, reading the .env) is
    # not what the test times or races.
    httpx_auth = HttpxAuth.from_env(args.env)
    requests_auth = mlauth.MLAuth.from_env(args.env) if args.requests_threads else None
    tally = Tally()
    say({"ready": os.getpid()})
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go' on stdin")
    deadline = time.monotonic() + args.seconds
    threads = [
        threading.Thread(
            target=httpx_thread, args=(httpx_auth, args.url, deadline, args.pause, tally)
        )
        for _ in range(args.httpx_threads)
    ]
    if requests_auth is not None:
        threads += [
            threading.Thread(
                target=requests_thread, args=(requests_auth, args.url, deadline, args.pause, tally)
            )
            for _ in range(args.requests_threads)
        ]
    for thread in threads:
        thread.start()
    if args.tasks:
        asyncio.run(async_tasks(httpx_auth, args.url, args.tasks, deadline, args.pause, tally))
    for thread in threads:
        thread.join()
    say(tally.result())


async def cancel_all_asyncio(auth: HttpxAuth, url: str, count: int) -> dict[str, object]:
    async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT) as client:
        tasks = [asyncio.ensure_future(client.get(f"{url}/users/me")) for _ in range(count)]
        say({"started": count})
        line = await asyncio.to_thread(sys.stdin.readline)
        assert line.strip() == "cancel", line
        # The refresh takes seconds (the test's slow token endpoint): the timeout expires
        # and wait_for cancels the gather, which cancels every task.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=0.01)
    return {
        "cancelled": sum(t.cancelled() for t in tasks),
        "finished": sum(t.done() and not t.cancelled() for t in tasks),
    }


async def cancel_all_trio(auth: HttpxAuth, url: str, count: int) -> dict[str, object]:
    import trio

    finished = 0

    async def call(client: httpx.AsyncClient) -> None:
        nonlocal finished
        await client.get(f"{url}/users/me")
        finished += 1

    async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT) as client:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(call, client)
                say({"started": count})
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                assert line.strip() == "cancel", line
                scope.cancel()
    return {"cancelled": count - finished if scope.cancelled_caught else 0, "finished": finished}


def cancel_all(args: argparse.Namespace) -> None:
    auth = HttpxAuth.from_env(args.env)
    if args.backend == "trio":
        import trio

        outcome = trio.run(cancel_all_trio, auth, args.url, args.tasks)
    else:
        outcome = asyncio.run(cancel_all_asyncio(auth, args.url, args.tasks))
    say(outcome)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["storm", "cancel-all", "lock-busy"])
    parser.add_argument("env")
    parser.add_argument("url", nargs="?", default="")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tasks", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--httpx-threads", type=int, default=0)
    parser.add_argument("--requests-threads", type=int, default=0)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(process)d %(message)s")
    if args.mode == "storm":
        storm(args)
    elif args.mode == "cancel-all":
        cancel_all(args)
    else:  # the first argument is the lock file, not a .env
        say({"busy": ProcessLock(args.env).busy()})


if __name__ == "__main__":
    main()
