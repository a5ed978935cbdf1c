"""A process that makes one API call as one seller of a Redis store of many sellers.

Run as ``python tests/support/scripts/seller_worker.py REDIS_URL API_URL USER_ID`` with
``MLAUTH_TEST_CLIENT_ID``, ``MLAUTH_TEST_CLIENT_SECRET`` and ``MLAUTH_TEST_LOCK_TIMEOUT`` (the
seller's lock lease) in the environment; prints one JSON line with the outcome. Its auth is
``MLAuth(store=RedisSellers(...).store(USER_ID))``, built before the call.

``MLAUTH_TEST_READY=<path>`` and ``MLAUTH_TEST_GO=<path>``: once its auth is built it creates
the first file, then waits (polling, 30 s at most) for the second, so a test starts the call
of several processes at once. ``MLAUTH_TEST_PAUSE_AT`` and ``MLAUTH_TEST_PAUSE_MARKER`` freeze
it at a refresh phase as ``fault_worker.py`` does (its hooks, imported from this folder).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import requests
from fault_worker import install_pause  # this script's folder is first on sys.path

import mlauth
from mlauth.stores.redis_sellers import RedisSellers


def wait_for_go() -> None:
    ready, go = os.environ.get("MLAUTH_TEST_READY"), os.environ.get("MLAUTH_TEST_GO")
    if not ready or not go:
        return
    Path(ready).touch()
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("no go within 30 s")
        time.sleep(0.005)


def main() -> int:
    url, api, user_id = sys.argv[1:4]
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
    phase = os.environ.get("MLAUTH_TEST_PAUSE_AT")
    if phase:
        install_pause(phase, os.devnull)  # the phases of a refresh, not of a .env's write
    sellers = RedisSellers(
        url,
        client_id=os.environ["MLAUTH_TEST_CLIENT_ID"],
        lock_timeout=float(os.environ.get("MLAUTH_TEST_LOCK_TIMEOUT", "30")),
    )
    auth = mlauth.MLAuth(
        os.environ["MLAUTH_TEST_CLIENT_ID"],
        os.environ["MLAUTH_TEST_CLIENT_SECRET"],
        store=sellers.store(user_id),
        token_url=f"{api}/oauth/token",
        hosts=[api.split("://", 1)[1]],
        backoff=0.01,
    )
    wait_for_go()
    outcome: dict[str, object] = {"pid": os.getpid(), "user_id": user_id}
    try:
        response = requests.get(f"{api}/users/me", auth=auth, timeout=60)
        outcome["status"] = response.status_code
        outcome["user"] = response.json().get("user_id") if response.ok else None
    except requests.RequestException as exc:
        outcome["error"] = type(exc).__name__
        outcome["message"] = str(exc)
    outcome["finished_at"] = time.time()
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
