"""A process making API calls as one seller of a SQL store of many sellers, which can be
frozen at a refresh phase.

Run as ``python tests/support/scripts/sql_worker.py CONFIG`` (a JSON object: the database,
the seller, the fake's URL and credentials, threads, requests per thread, a "go" file the
threads wait for, the MLAuth lock timeout and the store's lease). Prints one JSON line: the
statuses and errors. With ``MLAUTH_TEST_PAUSE_AT=<phase>`` and
``MLAUTH_TEST_PAUSE_MARKER=<path>`` it creates the marker when it reaches the phase and waits
to be killed. The hooks wrap library functions here, so production code has no test switch.
Phases:

- ``after-lease``: the seller's lease is held; the token POST is about to be sent;
- ``after-raw``: the raw answer arrived and is kept in the row; nothing has read it;
- ``after-commit``: the new tokens are committed; the lease is not released yet.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import requests

import mlauth
import mlauth.endpoint
from mlauth.stores.sql import SqlRefresh, SqlSellers


def pause(phase: str) -> None:
    marker = os.environ["MLAUTH_TEST_PAUSE_MARKER"]
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, phase.encode())
    os.close(fd)
    while True:  # until the test's SIGKILL
        signal.pause()


def install_pause(phase: str) -> None:
    if phase == "after-lease":
        refresh = mlauth.endpoint.TokenEndpoint.refresh

        def paused_refresh(self: Any, *args: Any, **kwargs: Any) -> Any:
            pause(phase)
            return refresh(self, *args, **kwargs)

        mlauth.endpoint.TokenEndpoint.refresh = paused_refresh  # type: ignore[method-assign]
    elif phase == "after-raw":
        answered = SqlRefresh.answered

        def paused_answered(self: Any, raw: bytes, *, started: float, at: float) -> None:
            answered(self, raw, started=started, at=at)
            pause(phase)

        SqlRefresh.answered = paused_answered  # type: ignore[method-assign]
    elif phase == "after-commit":
        commit = SqlRefresh.commit

        def paused_commit(self: Any, tokens: Any) -> Any:
            commit(self, tokens)
            pause(phase)

        SqlRefresh.commit = paused_commit  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown phase {phase!r}")


def main() -> int:
    config = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
    phase = os.environ.get("MLAUTH_TEST_PAUSE_AT")
    if phase:
        install_pause(phase)
    open_ = SqlSellers.sqlite if config["kind"] == "sqlite" else SqlSellers.postgresql
    sellers = open_(config["spec"], client_id=config["client_id"], lock_timeout=config["lease"])
    host = config["base_url"].removeprefix("http://")
    auth = mlauth.MLAuth(
        config["client_id"],
        config["client_secret"],
        sellers.store(config["user_id"]),
        token_url=f"{config['base_url']}/oauth/token",
        hosts=[host],
        lock_timeout=config["lock_timeout"],
        backoff=0.01,
    )
    statuses: list[int] = []
    errors: list[str] = []
    go = config["go"]

    def run() -> None:
        while go and not os.path.exists(go):
            time.sleep(0.005)
        with requests.Session() as session:
            for _ in range(config["requests"]):
                try:
                    response = session.get(f"{config['base_url']}/users/me", auth=auth, timeout=60)
                    statuses.append(response.status_code)
                except requests.RequestException as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run) for _ in range(config["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sellers.close()
    print(json.dumps({"pid": os.getpid(), "statuses": statuses, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
