"""A process that sends requests through mlauth and reports the events it saw.

    python event_worker.py CLIENT ENV URL [COUNT]

CLIENT is ``requests``, ``sync`` (httpx.Client) or ``async`` (httpx.AsyncClient). It
subscribes to every event, sends COUNT (default 1) GETs to URL, waits for its events to be
delivered, and prints one JSON line: ``{"statuses": [...], "events": [{fields}, ...]}``; a
request that raised an mlauth error has the error's class name for its status.

With ``EVENT_WORKER_STEPS`` set, it prints ``step`` after each request but the last and
waits for a line on stdin before the next (the test changes the world in between). With
``EVENT_WORKER_REDIS`` (a Redis URL), the tokens are in that Redis, looked at on every
request and again at once after a failed look (no check interval, no back-off).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable

import httpx
import requests

import mlauth
from mlauth.events import Event, flush
from mlauth.httpx import HttpxAuth


def main() -> None:
    client, env, url = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    seen: list[Event] = []
    mlauth.subscribe(seen.append)
    statuses: list[int | str] = []
    options: dict[str, object] = {}
    redis_url = os.environ.get("EVENT_WORKER_REDIS")
    if redis_url:
        from mlauth.stores import redis as redis_store

        redis_store.PROBE_BACKOFF = 0.0
        options["store"] = redis_store.RedisStore(redis_url, check_interval=0.0)

    def step() -> None:
        if os.environ.get("EVENT_WORKER_STEPS") and len(statuses) < count:
            print("step", flush=True)
            sys.stdin.readline()

    def attempt(send: Callable[[], int]) -> None:
        try:
            statuses.append(send())
        except mlauth.MLAuthError as exc:
            statuses.append(type(exc).__name__)
        step()

    if client == "requests":
        session = requests.Session()
        session.trust_env = False
        session.auth = mlauth.MLAuth.from_env(env, **options)
        for _ in range(count):
            attempt(lambda: session.get(url, timeout=30).status_code)
    elif client == "sync":
        auth = HttpxAuth.from_env(env, **options)
        with httpx.Client(auth=auth, trust_env=False, timeout=30) as sync:
            for _ in range(count):
                attempt(lambda: sync.get(url).status_code)
    else:

        async def run() -> None:
            auth = HttpxAuth.from_env(env, **options)
            async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=30) as client:
                for _ in range(count):
                    try:
                        statuses.append((await client.get(url)).status_code)
                    except mlauth.MLAuthError as exc:
                        statuses.append(type(exc).__name__)
                    step()

        asyncio.run(run())
    assert flush(30), "events not delivered"
    print(json.dumps({"statuses": statuses, "events": [e.fields() for e in seen]}), flush=True)


if __name__ == "__main__":
    main()
