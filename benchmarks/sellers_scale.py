"""Many sellers at rest: memory per loaded seller, and listing 10,000 sellers, per store.

For each store (``--stores``, default ``sqlite,postgresql,redis``) the script writes
``--sellers`` chains (default 10,000; tokens from a loopback FakeMercadoLibre) through
``SellerStores.add``, then:

- **memory per loaded seller**: a fresh process opens the store and loads 1, then 100, then
  1,000 sellers the way an app does, one :class:`mlauth.MLAuth` per seller on
  ``SellerStores.store(user_id)``, each used once on a prepared request (so its chain is read
  and its token injected; nothing is sent). After each step it measures the Python heap
  (``tracemalloc``: what Python objects hold) and the resident set (``/proc/self/statm``:
  everything, C libraries and the allocator's slack included), and divides the growth since
  the store was opened (nothing loaded) by the sellers loaded. The "marginal" column divides
  the growth from 100 to 1,000 by 900: the cost of one more seller, with the first seller's
  one-time costs (a connection, imports, caches) out of it.
- **listing**: ``mlauth sellers`` (the CLI, a process of its own, with a ``.env`` whose
  ``ML_TOKEN_STORE`` names the store) and ``SellerStores.rows()`` (in this process, a fresh
  store object each time), each timed ``--repeats`` times on all the sellers; medians.

PostgreSQL is the one at ``--postgres-url``, else a test server started here; Redis a
redis-server started here. A store that cannot run here gets a row saying why.

    python -m benchmarks.sellers_scale --sellers 10000 --stores sqlite,postgresql,redis
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import add_out_argument, publish, table
from benchmarks.sellers_storm import FIRST_SELLER, LABELS, location_for, token_set
from benchmarks.sellers_worker import MLAUTH_STORES, open_sellers
from mlauth.testing import FakeMercadoLibre

LOADS = (1, 100, 1000)
COLUMNS = (
    "store",
    "sellers",
    "write all (add), s",
    "heap per loaded seller, KiB (1 / 100 / 1,000; marginal)",
    "RSS per loaded seller, KiB (1 / 100 / 1,000; marginal)",
    "`mlauth sellers`, s",
    "`rows()`, ms",
)


def populate(fake: FakeMercadoLibre, kind: str, location: str, count: int) -> float:
    """Write ``count`` sellers' chains; the seconds it took (tokens minted beforehand)."""
    lifetime = 21600.0
    answers = [fake.issue_tokens(user_id=FIRST_SELLER + n) for n in range(count)]
    now = time.time()
    sellers = open_sellers(kind, location, fake.client_id)
    try:
        started = time.perf_counter()
        for answer in answers:
            sellers.add(str(answer["user_id"]), token_set(answer, now, lifetime), replace=True)
        return time.perf_counter() - started
    finally:
        sellers.close()


# -- the measuring process -----------------------------------------------------------------


def measure_loads(kind: str, location: str, client_id: str, loads: Sequence[int]) -> int:
    """Run in a fresh process (``--measure``): print the memory after each load, as JSON."""
    import tracemalloc

    import requests

    from mlauth import MLAuth

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page

    tracemalloc.start()
    sellers = open_sellers(kind, location, client_id)
    auths: list[MLAuth] = []
    base_heap, base_rss = tracemalloc.get_traced_memory()[0], rss()
    points = []
    for target in loads:
        while len(auths) < target:
            user_id = str(FIRST_SELLER + len(auths))
            auth = MLAuth(
                client_id,
                "fake-client-secret-not-real",
                sellers.store(user_id),
                token_url="http://127.0.0.1:9/oauth/token",
                hosts=["127.0.0.1"],
            )
            prepared = requests.Request("GET", "http://127.0.0.1/users/me").prepare()
            auth(prepared)  # reads the chain, injects the token
            assert str(prepared.headers["Authorization"]).endswith(f"-{user_id}")
            auths.append(auth)
        points.append(
            {
                "loaded": target,
                "heap": tracemalloc.get_traced_memory()[0] - base_heap,
                "rss": rss() - base_rss,
            }
        )
    print(json.dumps(points))
    return 0


def memory(kind: str, location: str, client_id: str, loads: Sequence[int]) -> list[dict[str, int]]:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.sellers_scale", "--measure", kind),
            *("--location", location, "--client-id", client_id),
            *("--loads", ",".join(map(str, loads))),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed: {done.stderr[-800:]}")
    points: list[dict[str, int]] = json.loads(done.stdout.strip().splitlines()[-1])
    return points


# -- listing -------------------------------------------------------------------------------


def store_url(kind: str, location: str) -> str:
    return f"sqlite:///{Path(location).resolve()}" if kind == "sqlite" else location


def time_cli(fake: FakeMercadoLibre, kind: str, location: str, folder: Path, repeats: int) -> Any:
    """Median seconds of ``mlauth sellers`` over ``repeats`` runs; or why it cannot run."""
    env_file = folder / "cli.env"
    env_file.write_text(
        f"ML_CLIENT_ID={fake.client_id}\nML_CLIENT_SECRET={fake.client_secret}\n"
        f"ML_TOKEN_STORE={store_url(kind, location)}\nML_TOKEN_URL={fake.token_url}\n"
        f"ML_API_HOSTS={fake.host}\n"
    )
    env_file.chmod(0o600)
    times = []
    lines = 0
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "mlauth", "sellers", "--env", str(env_file), "--json"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            return f"not available: exit {done.returncode}: {last[:200]}"
        lines = len(json.loads(done.stdout))
    return {"median_s": statistics.median(times), "times_s": times, "sellers_listed": lines}


def time_rows(kind: str, location: str, client_id: str, repeats: int) -> dict[str, Any]:
    times = []
    listed = 0
    for _ in range(repeats):
        sellers = open_sellers(kind, location, client_id)
        try:
            started = time.perf_counter()
            listed = len(sellers.rows())
            times.append(time.perf_counter() - started)
        finally:
            sellers.close()
    return {
        "median_ms": statistics.median(times) * 1000,
        "times_ms": [t * 1000 for t in times],
        "sellers_listed": listed,
    }


def per_seller(points: Sequence[dict[str, int]], key: str) -> str:
    each = [f"{p[key] / p['loaded'] / 1024:.1f}" for p in points]
    text = " / ".join(each)
    if len(points) >= 2:
        a, b = points[-2], points[-1]
        text += f"; {(b[key] - a[key]) / (b['loaded'] - a['loaded']) / 1024:.1f}"
    return text


def run_store(
    fake: FakeMercadoLibre, kind: str, location: str, folder: Path, args: argparse.Namespace
) -> dict[str, Any]:
    loads = [n for n in LOADS if n <= args.sellers]
    written = populate(fake, kind, location, args.sellers)
    points = memory(kind, location, fake.client_id, loads)
    return {
        "kind": kind,
        "sellers": args.sellers,
        "write_s": written,
        "memory": points,
        "cli": time_cli(fake, kind, location, folder, args.repeats),
        "rows": time_rows(kind, location, fake.client_id, args.repeats),
    }


def row(result: dict[str, Any]) -> list[object]:
    if "not_run" in result:
        return [LABELS[result["kind"]], "not run", *["-"] * (len(COLUMNS) - 2)]
    cli = result["cli"]
    return [
        LABELS[result["kind"]],
        result["sellers"],
        f"{result['write_s']:.1f}",
        per_seller(result["memory"], "heap"),
        per_seller(result["memory"], "rss"),
        f"{cli['median_s']:.2f}" if isinstance(cli, dict) else "not available",
        f"{result['rows']['median_ms']:.0f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sellers_scale", description=__doc__)
    parser.add_argument("--sellers", type=int, default=10_000)
    parser.add_argument("--stores", default=",".join(MLAUTH_STORES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--postgres-url", help="a PostgreSQL to use (default: start one)")
    # The measuring process's own options (it is this script, run again).
    parser.add_argument("--measure", choices=MLAUTH_STORES, help=argparse.SUPPRESS)
    parser.add_argument("--location", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--loads", default=",".join(map(str, LOADS)), help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.measure:
        loads = [int(n) for n in args.loads.split(",")]
        return measure_loads(args.measure, args.location, args.client_id, loads)
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(MLAUTH_STORES))
    if unknown:
        parser.error(f"unknown stores {unknown}; pick from: {', '.join(MLAUTH_STORES)}")
    results: list[dict[str, Any]] = []
    with FakeMercadoLibre() as fake:
        for kind in kinds:
            with (
                tempfile.TemporaryDirectory(prefix=f"sellers-scale-{kind}-") as tmp,
                contextlib.ExitStack() as stack,
            ):
                try:
                    location = stack.enter_context(location_for(kind, Path(tmp), args))
                    open_sellers(kind, location, fake.client_id).close()
                except (RuntimeError, ImportError) as exc:
                    reason = f"{type(exc).__name__}: {str(exc)[:300]}"
                    results.append({"kind": kind, "not_run": reason})
                    continue
                results.append(run_store(fake, kind, location, Path(tmp), args))
    text = table(COLUMNS, [row(r) for r in results])
    for result in results:
        if "not_run" in result:
            text += f"\n\n{LABELS[result['kind']]} not run: {result['not_run']}"
        elif not isinstance(result["cli"], dict):
            text += f"\n\n`mlauth sellers` on {LABELS[result['kind']]}: {result['cli']}"
    text += (
        "\n\nMemory: growth since the store was opened, divided by the sellers loaded (an "
        "MLAuth each, its chain read); marginal = (1,000 sellers - 100 sellers) / 900. "
        f"Listing: median of {args.repeats} runs over all the sellers."
    )
    publish(args.out, "sellers_scale", text, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
