"""One benchmark worker process: M threads calling the fake API through one library.

Started by :mod:`benchmarks.storm` and :mod:`benchmarks.scale`; prints a ready line, waits
for the parent's go, builds its session (so every process loads the token the parent has just
written), calls ``GET /users/me`` until the deadline and prints one JSON line of results.

For mlauth it also records, from mlauth's public hooks only, which calls an expiry touched:
the call that refreshed (``on_refresh`` runs in its thread), calls that waited for the refresh
lock (mlauth's "took refresh lock ... after Xs" debug record, logged in the waiting thread; on
the Redis store, the time between its "waiting for" and "took" records), calls that waited
for a peer to release it without taking it (the lock's "waited Xs for refresh lock ... to be
released" record, or its "gave up waiting" one) and calls whose 401 was absorbed by a re-send
(``response.history``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import wait_for_go, worker_parser
from benchmarks.contenders import LIBRARIES, MLAUTH_KINDS, MLAUTH_REDIS, STATIC, make_session

# mlauth logs this after taking the cross-process lock; its args are (path, seconds, pid).
TOOK_LOCK = "took refresh lock %s after %.3fs (pid %d)"
# A wait for the holder to let go, without taking the lock (ReleaseWatch.wait_released); the
# first is logged when it was released, the second when the waiter gave up. Args (seconds,
# lock, pid) and (lock, seconds, pid).
WAITED_RELEASE = "waited %.3fs for refresh lock %s to be released (pid %d)"
GAVE_UP_RELEASE = "gave up waiting for refresh lock %s to be released after %.3fs (pid %d)"
# The Redis store logs these two instead, both in the waiting thread; the wait is timed here.
REDIS_WAITING = "waiting for refresh lock %s at %s"
REDIS_TOOK_LOCK = "took refresh lock %s"
# A wait shorter than this is an uncontended flock, not a wait for a peer's refresh.
CONTENDED = 0.001
SECRET_ENV = "BENCH_CLIENT_SECRET"


class _LockWaits(logging.Handler):
    """Collects mlauth's lock waits and warnings, and marks the waiting thread's call."""

    def __init__(self, local: threading.local) -> None:
        super().__init__(logging.DEBUG)
        self.local = local
        self.waits: list[float] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg in (TOOK_LOCK, GAVE_UP_RELEASE) and isinstance(record.args, tuple):
            self.waited(float(record.args[1]))  # type: ignore[arg-type]
        elif record.msg == WAITED_RELEASE and isinstance(record.args, tuple):
            self.waited(float(record.args[0]))  # type: ignore[arg-type]
        elif record.msg == REDIS_WAITING:
            self.local.waiting_since = time.monotonic()
        elif record.msg == REDIS_TOOK_LOCK:
            since = getattr(self.local, "waiting_since", None)
            if since is not None:
                self.local.waiting_since = None
                self.waited(time.monotonic() - since)
        elif record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage()[:200])

    def waited(self, seconds: float) -> None:
        self.waits.append(seconds)
        if seconds >= CONTENDED:
            self.local.touched = True


def run(
    library: str,
    store: Path,
    url: str,
    *,
    token_url: str,
    client_id: str,
    client_secret: str,
    threads: int,
    seconds: float,
    margin: float,
) -> dict[str, object]:
    local = threading.local()
    waits = _LockWaits(local)
    session = make_session(
        library,
        store,
        token_url=token_url,
        client_id=client_id,
        client_secret=client_secret,
        margin=margin,
    )
    refreshed = [0]
    store_kind = None
    if library in MLAUTH_KINDS:
        # Which store the .env selected: the Redis row must really run on Redis.
        store_kind = type(session.auth.store).__name__  # type: ignore[union-attr]
        logger = logging.getLogger("mlauth")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(waits)

        def on_refresh(_tokens: object) -> None:
            refreshed[0] += 1
            local.touched = local.refreshed = True

        session.auth.on_refresh = on_refresh  # type: ignore[union-attr]

    lock = threading.Lock()
    counts = {"calls": 0, "ok": 0, "failed": 0, "surfaced_401": 0, "absorbed_401": 0}
    errors: dict[str, int] = {}
    samples: list[str] = []
    latencies: list[float] = []
    touched: list[float] = []
    refreshing: list[float] = []  # the calls that made a refresh (a subset of touched)
    started_at = time.monotonic()
    deadline = started_at + seconds
    first_failure: list[float] = []  # seconds from the start to the first failed call
    last_ok: list[bool] = []  # per thread: whether its last call succeeded

    def loop() -> None:
        clock = time.perf_counter
        ok = False
        while time.monotonic() < deadline:
            local.touched = local.refreshed = False
            started = clock()
            absorbed = 0
            try:
                response = session.get(f"{url}/users/me", timeout=30)
                status: int | str = response.status_code
                absorbed = sum(1 for r in response.history if r.status_code == 401)
            except Exception as exc:  # noqa: BLE001 (peers raise their own exception types)
                status = type(exc).__name__
                with lock:
                    errors[status] = errors.get(status, 0) + 1
                    if len(samples) < 3:
                        samples.append(f"{status}: {str(exc)[:160]}")
            elapsed = clock() - started
            with lock:
                counts["calls"] += 1
                counts["absorbed_401"] += absorbed
                latencies.append(elapsed)
                if local.touched or absorbed:
                    touched.append(elapsed)
                if local.refreshed:
                    refreshing.append(elapsed)
                ok = status == 200
                if ok:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    counts["surfaced_401"] += status == 401
                    if not first_failure:
                        first_failure.append(time.monotonic() - started_at)
        with lock:
            last_ok.append(ok)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        **counts,
        "library": library,
        "pid": os.getpid(),
        "refreshed_here": refreshed[0],
        "store": store_kind,
        "first_failure_s": first_failure[0] if first_failure else None,
        # Every thread's last call failed: this process lost the token chain for good.
        "stranded": not any(last_ok),
        "errors": errors,
        "error_samples": samples,
        "warnings": waits.warnings[:3],
        "latencies_ms": [round(x * 1000, 3) for x in latencies],
        "touched_ms": [round(x * 1000, 3) for x in touched],
        "refreshing_ms": [round(x * 1000, 3) for x in refreshing],
        "lock_waits_ms": [round(x * 1000, 3) for x in waits.waits if x >= CONTENDED],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = worker_parser(
        "python -m benchmarks.worker",
        (*LIBRARIES, MLAUTH_REDIS, STATIC),
        per_process="threads",
        per_process_default=1,
    )
    args = parser.parse_args(argv)
    wait_for_go()
    result: dict[str, Any] = run(
        args.library,
        args.store,
        args.url,
        token_url=args.token_url,
        client_id=args.client_id,
        # From the environment, not argv: command lines are visible to every user (ps).
        client_secret=os.environ[SECRET_ENV],
        threads=args.threads,
        seconds=args.seconds,
        margin=args.margin,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
