"""One worker process of the many-sellers storm (:mod:`benchmarks.sellers_storm`).

M threads, each calling ``GET /users/me`` in turn for a seller picked at random and, right
after, with a fixed valid header (the floor: a long-lived token of a user the storm never
refreshes), until the deadline; then one JSON line of results. Each thread has its own
``requests.Session``, used for both calls, so the two differ only by the auth.

The auth of each ``kind``:

- ``sqlite``, ``postgresql``, ``redis``: one :class:`mlauth.MLAuth` per seller on that
  seller's store from the sellers store (``SellerStores.store(user_id)``), built at the
  seller's first call in this process and kept: the process loads only the sellers it calls.
- ``env``: the one-seller baseline, ``MLAuth.from_env(".env")`` (every call is for its seller).
Each call is marked with what happened in it beyond sending the request (:data:`LOADED`,
:data:`REFRESHED`, :data:`ABSORBED_401`), so the parent can tell a plain call from one that
loaded a seller or met an expiry.

- ``peer``: what integrators write by hand: a SQLite table of tokens per seller, read at each
  call; on a 401, read the seller's refresh token from the row, POST the refresh, UPDATE the
  row, send the call again once. No lock, no check that a peer refreshed first.

The client secret comes in the environment (command lines are visible to every user).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import wait_for_go
from mlauth import MLAuth
from mlauth.stores.sellers import SellerStores
from mlauth.tokens import TokenSet

SECRET_ENV = "BENCH_CLIENT_SECRET"
MLAUTH_STORES = ("sqlite", "postgresql", "redis")
#: A call's marks: it built the seller's auth in this process (the seller's first call
#: here), it refreshed the chain (in this thread), a 401 was absorbed by sending it again.
LOADED, REFRESHED, ABSORBED_401 = 1, 2, 4
KINDS = (*MLAUTH_STORES, "env", "peer")

#: The peer's table, as an integrator's migration would make it.
PEER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tokens (user_id INTEGER PRIMARY KEY, access_token TEXT, "
    "refresh_token TEXT, expires_at REAL)"
)


def open_sellers(kind: str, location: str, client_id: str) -> SellerStores:
    """The sellers store ``kind`` at ``location`` (a path for SQLite, else a URL).

    Imported here: a row whose store is not installed (or not written yet) fails alone.
    """
    sellers: SellerStores
    if kind in ("sqlite", "postgresql"):
        sql = importlib.import_module("mlauth.stores.sql")
        sellers = (
            sql.SqlSellers.sqlite(Path(location))
            if kind == "sqlite"
            else sql.SqlSellers.postgresql(location)
        )
    elif kind == "redis":
        redis_sellers = importlib.import_module("mlauth.stores.redis_sellers")
        sellers = redis_sellers.RedisSellers(location, client_id=client_id)
    else:
        raise ValueError(f"no sellers store of kind {kind!r}")
    sellers.bind_client(client_id)
    return sellers


class Caller:
    """Makes one call for one seller, however the kind keeps its tokens; thread-safe."""

    def __init__(self, args: argparse.Namespace, secret: str) -> None:
        self.args = args
        self.secret = secret
        self.url = f"{args.url}/users/me"
        self.refreshed = 0
        # Per seller, when each refresh this process made started (the clock its new token's
        # expiry is counted from): the parent counts expiries touched on these.
        self.refresh_times: dict[str, list[float]] = {}
        self.absorbed_401 = 0
        self._lock = threading.Lock()
        self._auths: dict[str, MLAuth] = {}
        self._local = threading.local()
        self.sellers: SellerStores | None = None
        self._env_auth: MLAuth | None = None
        if args.kind in MLAUTH_STORES:
            self.sellers = open_sellers(args.kind, args.location, args.client_id)
        elif args.kind == "env":
            only = str(args.first_seller)
            self._env_auth = self._watched(MLAuth.from_env(args.location), only)

    def _watched(self, auth: MLAuth, user_id: str) -> MLAuth:
        def on_refresh(tokens: TokenSet) -> None:
            # Runs in the thread that refreshed: the call it is making gets the mark.
            self._refreshed(user_id, tokens.refreshed_at)

        auth.on_refresh = on_refresh
        return auth

    def _refreshed(self, user_id: str, started: float | None) -> None:
        self._local.marks |= REFRESHED
        with self._lock:
            self.refreshed += 1
            self.refresh_times.setdefault(user_id, []).append(started or 0.0)

    def auth(self, user_id: str) -> MLAuth:
        if self._env_auth is not None:
            return self._env_auth
        auth = self._auths.get(user_id)
        if auth is None:
            # Built outside the lock, so a seller's first call never waits for another
            # seller's; if two threads build one seller's at once, the first kept wins (the
            # other was never used: the chain is read at the first request).
            assert self.sellers is not None
            built = MLAuth(
                self.args.client_id,
                self.secret,
                self.sellers.store(user_id),
                token_url=self.args.token_url,
                hosts=[self.args.host],
            )
            self._watched(built, user_id)  # before any thread can use it
            with self._lock:
                auth = self._auths.setdefault(user_id, built)
            if auth is built:
                self._local.marks |= LOADED
        return auth

    def call(self, session: requests.Session, user_id: str) -> int:
        """One API call for ``user_id``: the final status code; :meth:`marks` says the rest."""
        self._local.marks = 0
        if self.args.kind == "peer":
            return self._peer_call(session, user_id)
        response = session.get(self.url, auth=self.auth(user_id), timeout=30)
        absorbed = sum(1 for r in response.history if r.status_code == 401)
        if absorbed:
            self._local.marks |= ABSORBED_401
            with self._lock:
                self.absorbed_401 += absorbed
        return response.status_code

    def marks(self) -> int:
        """The marks of this thread's last call."""
        return int(getattr(self._local, "marks", 0))

    # -- the hand-made pattern -------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # Python's defaults: a 5 s busy timeout, the rollback journal, no WAL.
            db = self._local.db = sqlite3.connect(self.args.location)
        return db

    def _peer_call(self, session: requests.Session, user_id: str) -> int:
        db = self._db()
        (access,) = db.execute(
            "SELECT access_token FROM tokens WHERE user_id = ?", (int(user_id),)
        ).fetchone()
        response = session.get(self.url, headers={"Authorization": f"Bearer {access}"}, timeout=30)
        if response.status_code != 401:
            return response.status_code
        self._local.marks |= ABSORBED_401
        (refresh,) = db.execute(
            "SELECT refresh_token FROM tokens WHERE user_id = ?", (int(user_id),)
        ).fetchone()
        started = time.time()
        answer = session.post(
            self.args.token_url,
            data={
                "grant_type": "refresh_token",
                "client_id": self.args.client_id,
                "client_secret": self.secret,
                "refresh_token": refresh,
            },
            headers={"Accept": "application/json"},
            timeout=30,
        )
        if answer.status_code != 200:
            return answer.status_code  # invalid_grant: a peer spent it first; the call fails
        tokens = answer.json()
        with db:
            db.execute(
                "UPDATE tokens SET access_token = ?, refresh_token = ?, expires_at = ? "
                "WHERE user_id = ?",
                (
                    tokens["access_token"],
                    tokens["refresh_token"],
                    started + float(tokens["expires_in"]),
                    int(user_id),
                ),
            )
        self._refreshed(user_id, started)
        retried = session.get(
            self.url, headers={"Authorization": f"Bearer {tokens['access_token']}"}, timeout=30
        )
        if retried.status_code == 200:
            with self._lock:
                self.absorbed_401 += 1
        return retried.status_code


def run(args: argparse.Namespace, secret: str) -> dict[str, object]:
    caller = Caller(args, secret)
    user_ids = [str(args.first_seller + n) for n in range(args.sellers)]
    floor_header = {"Authorization": f"Bearer {os.environ[FLOOR_ENV]}"}
    lock = threading.Lock()
    # Per seller, each call's wall-clock start and end: the auth looks at the clock somewhere
    # in between (after loading the seller's chain, on its first call in this process).
    spans: dict[str, list[tuple[float, float]]] = {}
    calls_ms: list[float] = []
    calls_cpu_us: list[float] = []
    marks: list[int] = []
    floor_ms: list[float] = []
    floor_cpu_us: list[float] = []
    counts = {"calls": 0, "failed": 0, "floor_calls": 0, "floor_failed": 0}
    errors: dict[str, int] = {}
    samples: list[str] = []
    deadline = time.monotonic() + args.seconds

    def timed(call: Callable[[], int]) -> tuple[int | str, float, float]:
        cpu, wall = time.thread_time_ns(), time.perf_counter()
        try:
            status: int | str = call()
        except Exception as exc:  # noqa: BLE001 (counted and sampled: a failed call)
            status = type(exc).__name__
            with lock:
                errors[status] = errors.get(status, 0) + 1
                if len(samples) < 3:
                    samples.append(f"{status}: {str(exc)[:200]}")
        return status, (time.perf_counter() - wall) * 1000, (time.thread_time_ns() - cpu) / 1000

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        session.trust_env = False  # the environment's proxies are not what is measured
        while time.monotonic() < deadline:
            user_id = rng.choice(user_ids)
            started = time.time()
            status, ms, cpu = timed(functools.partial(caller.call, session, user_id))
            ended = time.time()
            floor, fms, fcpu = timed(
                lambda: session.get(caller.url, headers=floor_header, timeout=30).status_code
            )
            with lock:
                spans.setdefault(user_id, []).append((started, ended))
                calls_ms.append(ms)
                calls_cpu_us.append(cpu)
                marks.append(caller.marks())
                floor_ms.append(fms)
                floor_cpu_us.append(fcpu)
                counts["calls"] += 1
                counts["failed"] += status != 200
                counts["floor_calls"] += 1
                counts["floor_failed"] += floor != 200

    threads = [
        threading.Thread(target=loop, args=(os.getpid() * 1000 + n,)) for n in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        **counts,
        "kind": args.kind,
        "pid": os.getpid(),
        "refreshed_here": caller.refreshed,
        "refresh_times": caller.refresh_times,
        "absorbed_401": caller.absorbed_401,
        "loaded_sellers": len(caller._auths) or (1 if args.kind == "env" else 0),
        "errors": errors,
        "error_samples": samples,
        "spans": {
            user: [(round(a, 4), round(b, 4)) for a, b in times] for user, times in spans.items()
        },
        "calls_ms": [round(x, 3) for x in calls_ms],
        "calls_cpu_us": [round(x, 1) for x in calls_cpu_us],
        "marks": marks,
        "floor_ms": [round(x, 3) for x in floor_ms],
        "floor_cpu_us": [round(x, 1) for x in floor_cpu_us],
    }


FLOOR_ENV = "BENCH_FLOOR_TOKEN"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sellers_worker")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--location", required=True, help="a path, or the store's URL")
    parser.add_argument("--url", required=True)
    parser.add_argument("--host", required=True, help="the API host:port mlauth may send to")
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--first-seller", type=int, required=True)
    parser.add_argument("--sellers", type=int, required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    wait_for_go()
    result: dict[str, Any] = run(args, os.environ[SECRET_ENV])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
