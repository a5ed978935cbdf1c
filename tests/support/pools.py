"""A process pool (fork, a fork ProcessPoolExecutor, forkserver, spawn) whose workers and
parent call the API through one auth across several token expiries, and what the run must
show. The workers' auth and session are this module's globals: set in the parent before a
fork pool starts, or built in each spawn/forkserver worker."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from pathlib import Path

import requests

from mlauth import MLAuth
from mlauth.testing import FakeMercadoLibre
from tests.support.demo_workers import LIFETIME, check_storm

SECONDS = 6.0  # three token lifetimes
WORKERS = 3

# What a worker calls through. Set in the parent before a fork pool starts (the workers
# inherit them), or by _build_in_worker in each spawn/forkserver worker.
_AUTH: MLAuth | None = None
_SESSION: requests.Session | None = None


def _build_in_worker(env: str) -> None:
    global _AUTH, _SESSION
    _AUTH = MLAuth.from_env(env)
    _SESSION = requests.Session()
    _SESSION.auth = _AUTH


def _calls(url: str, seconds: float, session: requests.Session | None = None) -> dict[str, object]:
    """Call the API until the deadline, half through the session, half with ``auth=``."""
    session = session or _SESSION
    assert _AUTH is not None and session is not None
    totals: dict[str, object] = {"calls": 0, "failed": 0, "absorbed_401": 0, "errors": []}
    calls = failed = absorbed = 0
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        calls += 1
        try:
            if calls % 2:
                response = session.get(f"{url}/users/me", timeout=30)
            else:
                response = requests.get(f"{url}/users/me", auth=_AUTH, timeout=30)
            absorbed += sum(1 for r in response.history if r.status_code == 401)
            if response.status_code != 200:
                failed += 1
                errors.append(f"HTTP {response.status_code}")
        except Exception as exc:  # noqa: BLE001 - every kind counts: a RuntimeError was the bug
            failed += 1
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    totals.update(calls=calls, failed=failed, absorbed_401=absorbed, errors=errors[:5])
    totals["pid"] = os.getpid()
    return totals


def run_pool(kind: str, fake: FakeMercadoLibre, env: Path, label: str = "") -> None:
    global _AUTH, _SESSION
    # Built, and used, in the parent before any worker exists: what a pipeline's module-level
    # setup does before a Pool, a ProcessPoolExecutor or a prefork server starts.
    _AUTH = MLAuth.from_env(env)
    _SESSION = requests.Session()
    _SESSION.auth = _AUTH
    # The auth is used before the fork, the session is not: a Session that has sent a request
    # keeps a pooled socket that forked children would share with it and with each other
    # (answers cross between processes). That is requests' state, not the auth's; the README
    # says to create or close sessions in the worker.
    assert requests.get(f"{fake.base_url}/users/me", auth=_AUTH, timeout=30).status_code == 200
    fake.reset_stats()  # count from here: the call above may have refreshed nothing or one

    if kind == "executor-fork":
        context = multiprocessing.get_context("fork")
        pool: object = concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context)
    elif kind == "fork":
        pool = multiprocessing.get_context("fork").Pool(WORKERS)
    else:  # spawn, forkserver: nothing is inherited, each worker builds its own from the .env
        context = multiprocessing.get_context(kind)
        pool = context.Pool(WORKERS, initializer=_build_in_worker, initargs=(str(env),))

    started = time.time()
    parent: list[dict[str, object]] = []
    # The parent keeps calling meanwhile through the same auth (its own session), as a
    # server's master or a pipeline's driver does.
    own = requests.Session()
    own.auth = _AUTH
    caller = threading.Thread(target=lambda: parent.append(_calls(fake.base_url, SECONDS, own)))
    args = [(fake.base_url, SECONDS)] * WORKERS
    if isinstance(pool, concurrent.futures.ProcessPoolExecutor):
        with pool:
            futures = [pool.submit(_calls, *a) for a in args]
            caller.start()
            results = [f.result(timeout=120) for f in futures]
    else:
        assert isinstance(pool, multiprocessing.pool.Pool)
        with pool:
            pending = pool.starmap_async(_calls, args, chunksize=1)
            caller.start()
            results = pending.get(timeout=120)
    caller.join()
    own.close()
    span = time.time() - started
    stats, refresh_times = fake.stats(), fake.refresh_times()

    assert len({r["pid"] for r in results}) > 1, "the tasks did not spread over the workers"
    label = f"{kind} pool{label}, {WORKERS} workers + parent"
    print(f"\n[figures] {label}: {span / LIFETIME:.1f} token lifetimes crossed")
    check_storm(
        label,
        results + parent,
        stats,
        refresh_times,
        seconds=SECONDS,
        span=span,
        threads=WORKERS + 1,
    )
