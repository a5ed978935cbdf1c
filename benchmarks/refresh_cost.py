"""What one refresh costs under mlauth, against the bare POST it wraps.

One process, one :class:`~mlauth.testing.FakeMercadoLibre` on loopback, one ``.env`` in a
temporary folder: ``MLAuth.from_env(".env").refresh()`` (a forced refresh: the lock, the
journal, the POST, the save) ``--refreshes`` times, after one unrecorded warm-up, interleaved
in turns with a bare refresh POST to the fake through a ``requests.Session`` (the least a
refresh can take). Counted per refresh: the ``os.fsync``/``os.fdatasync`` calls mlauth makes
(the functions are wrapped for the run; ``strace -f -c -e trace=fsync,fdatasync`` on this
script shows the same at the system-call level).

With ``--redis URL`` the tokens are moved to that Redis first (what ``mlauth migrate --to``
does; start a server yourself, e.g. ``redis-server --port 6399 --save ''``), and the refresh
is the Redis store's (its lock, the raw answer kept in the hash, the fenced commit).

Imports only mlauth, requests and the standard library, so any checkout's interpreter can
run it from another one's file, to compare two versions side by side:

    python -m benchmarks.refresh_cost --refreshes 40
    /old/checkout/.venv/bin/python benchmarks/refresh_cost.py --refreshes 40 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from mlauth import MLAuth
from mlauth.testing import FakeMercadoLibre


class SyncCounter:
    """Wraps ``os.fsync`` and ``os.fdatasync`` (the module attributes mlauth calls) and counts."""

    def __init__(self) -> None:
        self.calls = 0
        self._saved: dict[str, Callable[[int], None]] = {}

    def __enter__(self) -> SyncCounter:
        for name in ("fsync", "fdatasync"):
            original: Callable[[int], None] = getattr(os, name)
            self._saved[name] = original

            def counted(fd: int, _original: Callable[[int], None] = original) -> None:
                self.calls += 1
                _original(fd)

            setattr(os, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(os, name, original)


def bare_post_ms(fake: FakeMercadoLibre, session: requests.Session, chain: dict[str, Any]) -> float:
    """One refresh POST with ``chain``'s refresh token; the chain is advanced in place."""
    started = time.perf_counter()
    answer = session.post(
        fake.token_url,
        data={
            "grant_type": "refresh_token",
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
            "refresh_token": chain["refresh_token"],
        },
        headers={"Accept": "application/json"},
        timeout=30,
    )
    spent = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    chain.update(answer.json())
    return spent


def measure(refreshes: int, redis_url: str | None = None) -> dict[str, Any]:
    logging.disable(logging.WARNING)  # the fake's own access log, and nothing else is wanted
    with tempfile.TemporaryDirectory() as tmp, FakeMercadoLibre() as fake:
        env = Path(tmp) / ".env"
        fake.write_env(env)
        if redis_url is not None:
            from mlauth.cli.migrate import migrate_to_redis

            migrate_to_redis(env, redis_url, force=True)  # a previous run's chain is replaced
        auth = MLAuth.from_env(env)
        auth.refresh()  # warm-up: imports, first-call paths, the journal file created
        chain = fake.issue_tokens()
        with requests.Session() as session:
            bare_post_ms(fake, session, chain)
            refresh_ms: list[float] = []
            post_ms: list[float] = []
            syncs: list[int] = []
            before = fake.stats()["refreshes"]
            for _ in range(refreshes):
                with SyncCounter() as counter:
                    started = time.perf_counter()
                    auth.refresh()
                    refresh_ms.append((time.perf_counter() - started) * 1000)
                syncs.append(counter.calls)
                post_ms.append(bare_post_ms(fake, session, chain))
            made = fake.stats()["refreshes"] - before
    return {
        "store": type(auth.store).__name__,
        "refreshes": refreshes,
        "refreshes_seen_by_fake": made - refreshes,  # the bare POSTs are refreshes too
        "refresh_ms": refresh_ms,
        "post_ms": post_ms,
        "fsyncs_per_refresh": syncs,
    }


def summary(data: dict[str, Any]) -> str:
    refresh = data["refresh_ms"]
    post = data["post_ms"]
    added = statistics.median(refresh) - statistics.median(post)
    syncs = sorted(set(data["fsyncs_per_refresh"]))
    return "\n".join(
        [
            f"{data['refreshes']} forced refreshes on the {data['store']} "
            f"(the fake saw {data['refreshes_seen_by_fake']})",
            f"- mlauth refresh: median {statistics.median(refresh):.2f} ms, "
            f"min {min(refresh):.2f}, max {max(refresh):.2f}",
            f"- bare POST:      median {statistics.median(post):.2f} ms, "
            f"min {min(post):.2f}, max {max(post):.2f}",
            f"- added by mlauth (medians): {added:.2f} ms",
            f"- fsync/fdatasync calls per refresh: {', '.join(map(str, syncs))}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refreshes", type=int, default=40)
    parser.add_argument("--redis", metavar="URL", help="keep the tokens in this Redis")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)
    data = measure(args.refreshes, args.redis)
    print(json.dumps(data) if args.json else summary(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
