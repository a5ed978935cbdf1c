"""A process that sends requests through mlauth and reports the events it saw.

    python event_worker.py CLIENT ENV URL [COUNT]

CLIENT is ``requests``, ``sync`` (httpx.Client) or ``async`` (httpx.AsyncClient). It
subscribes to every event, sends COUNT (default 1) GETs to URL, waits for its events to be
delivered, and prints one JSON line: ``{"statuses": [...], "events": [{fields}, ...]}``; a
request that raised an mlauth error has the error's class name for its status.
"""

from __future__ import annotations

import asyncio
import json
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

    def attempt(send: Callable[[], int]) -> None:
        try:
            statuses.append(send())
        except mlauth.MLAuthError as exc:
            statuses.append(type(exc).__name__)

    if client == "requests":
        session = requests.Session()
        session.trust_env = False
        session.auth = mlauth.MLAuth.from_env(env)
        for _ in range(count):
            attempt(lambda: session.get(url, timeout=30).status_code)
    elif client == "sync":
        with httpx.Client(auth=HttpxAuth.from_env(env), trust_env=False, timeout=30) as sync:
            for _ in range(count):
                attempt(lambda: sync.get(url).status_code)
    else:

        async def run() -> None:
            auth = HttpxAuth.from_env(env)
            async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=30) as client:
                for _ in range(count):
                    try:
                        statuses.append((await client.get(url)).status_code)
                    except mlauth.MLAuthError as exc:
                        statuses.append(type(exc).__name__)

        asyncio.run(run())
    assert flush(30), "events not delivered"
    print(json.dumps({"statuses": statuses, "events": [e.fields() for e in seen]}), flush=True)


if __name__ == "__main__":
    main()
