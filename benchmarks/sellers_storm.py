"""Many-sellers storm: N processes x M threads calling the API for sellers picked at random.

One :class:`~mlauth.testing.FakeMercadoLibre` on loopback serves S sellers (default 1,000),
each with a chain of its own: tokens that live ``--token-lifetime`` seconds (default 5),
single-use refresh tokens, and each seller's old access tokens killed at every rotation of
that seller's chain, as on MercadoLibre. For each store given, a fresh set of chains is
written to it and 8 worker processes of 4 threads (:mod:`benchmarks.sellers_worker`) start
together; each thread calls ``GET /users/me`` for a random seller, then the same with a fixed
valid header (the floor), until the time is up. Stores (``--stores``):

- ``sqlite``, ``postgresql``, ``redis``: mlauth's sellers stores, one ``MLAuth`` per seller
  per process on ``SellerStores.store(user_id)``;
- ``env``: mlauth on the one-seller ``.env`` with one seller: the per-call cost to compare with;
- ``peer``: the hand-made "tokens table + refresh on 401" (a SQLite table read at each call;
  on a 401 read the row, POST the refresh, UPDATE the row, call again; no lock).

PostgreSQL is the one at ``--postgres-url``, else a server started here (mlauth.testing's
PostgreSQL test server, when installed); Redis a redis-server started here. A store that
cannot run here gets a row saying why.

**Expiries touched** (the expected refresh count). For each seller, take the tokens its chain
had during the run: the first, issued just before the start, then one per refresh, dated by
the refresher's clock read before its POST (what mlauth counts the new token's expiry from:
``TokenSet.refreshed_at``, given to ``on_refresh``; the peer's ``time.time()`` before its
POST). Token k, issued at T_k, is due to be replaced from its *replacement point* P_k = T_k +
lifetime - margin on (margin: a quarter of a short token's life for mlauth, 1.25 s for 5 s
tokens; 0 for the peer, which waits for the 401 at expiry). Token k's expiry was *touched*
when a call to that seller looked at its token after P_k while token k was the seller's
newest. A call's auth looks at the clock somewhere between the call's start and its end
(after loading the seller's chain, on its first call in a process), so: for a token that
was replaced (at T_k+1), a call that started before T_k+1 and ended after P_k - slack; for
the last token, a call that started after P_k + slack. The slack (a tenth of the lifetime,
0.5 s) absorbs the clocks' small differences; it only decides calls that close to a
replacement point. (A call slower than the time between a premature refresh and the next
replacement point could hide that refresh: the table's p99 says how slow calls were; a
second refresh of one token also shows as ``invalid_grant``.) A seller's expected refreshes
are the tokens whose expiry a call touched. A refresh made early (a second refresh of one
expiry; a refresh on a 401 that a peer's rotation caused) is a refresh that touched nothing,
and a touched expiry no refresh followed is touched but not refreshed: either makes the
seller "off". Refreshes are
the fake's count; a seller whose refreshes the fake counted differently from the workers'
reports is off too.

**Per-call overhead.** Every call is followed, in the same thread on the same session, by a
call with a fixed valid header (a token of a user the storm never refreshes): the floor. The
table gives the floor's wall time (p50, p99), what the auth adds to it (the auth's calls'
p50 minus the floor's p50, the same for p99: every call counts, those that refreshed or
waited for a refresh too), and the same for the thread's CPU time per call (medians). With
1,000 sellers on 2 cores most calls are a seller's first in its process or meet an expiry,
so the same figures are also given for the *plain* calls alone: calls that did not build
their seller's auth in the process, did not refresh, had no 401 sent again (a wait for a
peer's refresh of the same seller is not told apart and stays in), each against the floor
call made right after it. That is the per-call cost to compare with the one-seller ``.env``.

    python -m benchmarks.sellers_storm --sellers 1000 --processes 8 --threads 4 --seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import add_out_argument, percentile, publish, run_workers, table
from benchmarks.sellers_worker import (
    ABSORBED_401,
    FLOOR_ENV,
    KINDS,
    LOADED,
    MLAUTH_STORES,
    PEER_SCHEMA,
    REFRESHED,
    SECRET_ENV,
    open_sellers,
)
from mlauth.secret import Secret
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer, unavailable
from mlauth.tokens import MAX_MARGIN_SHARE, TokenSet

FIRST_SELLER = 100_000_001
FLOOR_USER = 99_999_999
ENV_SELLER = 8035443
SLACK_SHARE = 0.1

COLUMNS = (
    "store",
    "sellers",
    "calls",
    "failed",
    "invalid_grant",
    "refreshes / expiries touched",
    "sellers off",
    "401s absorbed",
    "floor p50 / p99 ms",
    "added p50 / p99 ms",
    "plain calls",
    "plain: added p50 / p99 ms",
    "plain: CPU µs/call floor, added",
)

LABELS = {
    "sqlite": "mlauth, SQLite",
    "postgresql": "mlauth, PostgreSQL",
    "redis": "mlauth, Redis",
    "env": "mlauth, one-seller .env",
    "peer": "peer: tokens table + refresh on 401",
}


# -- expiries touched ----------------------------------------------------------------------


def touched(
    spans: Sequence[tuple[float, float]],
    issued: float,
    refreshes: Sequence[float],
    *,
    lifetime: float,
    margin: float,
    slack: float,
) -> int:
    """The expiries of one seller's tokens that calls touched (the module's definition).

    ``spans``: the wall-clock (start, end) of the seller's calls; ``issued``: its first
    token's issue time; ``refreshes``: when each refresh of its chain started, any order.
    """
    issues = [issued, *sorted(refreshes)]
    count = 0
    for k, issued_at in enumerate(issues):
        point = issued_at + lifetime - margin
        if k + 1 < len(issues):
            replaced = issues[k + 1]
            count += any(start < replaced and end >= point - slack for start, end in spans)
        else:
            count += any(start >= point + slack for start, _ in spans)
    return count


# -- setting up the chains ------------------------------------------------------------------


def token_set(answer: Mapping[str, object], issued: float, lifetime: float) -> TokenSet:
    return TokenSet(
        access_token=Secret(str(answer["access_token"])),
        refresh_token=Secret(str(answer["refresh_token"])),
        expires_at=issued + lifetime,
        refreshed_at=issued,
        refreshed_by="sellers_storm",
        user_id=str(answer["user_id"]),
    )


def write_chains(
    fake: FakeMercadoLibre, kind: str, location: str, user_ids: Sequence[int]
) -> dict[int, float]:
    """A fresh chain per seller, written where ``kind`` keeps them; each one's issue time."""
    lifetime = fake.token_lifetime
    issued: dict[int, float] = {}
    if kind == "env":
        (user,) = user_ids
        issued[user] = time.time()
        fake.write_env(
            location,
            expires_at=issued[user] + lifetime,
            extra={"ML_TOKEN_REFRESHED_AT": str(issued[user])},
            user_id=user,
        )
        return issued
    if kind == "peer":
        with contextlib.closing(sqlite3.connect(location)) as db, db:
            db.execute(PEER_SCHEMA)
            for user in user_ids:
                issued[user] = time.time()
                answer = fake.issue_tokens(user_id=user)
                db.execute(
                    "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?)",
                    (
                        user,
                        answer["access_token"],
                        answer["refresh_token"],
                        issued[user] + lifetime,
                    ),
                )
        return issued
    sellers = open_sellers(kind, location, fake.client_id)
    try:
        for user in user_ids:
            issued[user] = time.time()
            answer = fake.issue_tokens(user_id=user)
            sellers.add(str(user), token_set(answer, issued[user], lifetime), replace=True)
    finally:
        sellers.close()
    return issued


# -- the servers a store needs ---------------------------------------------------------------


@contextlib.contextmanager
def redis_url(folder: Path) -> Iterator[str]:
    """A redis-server of its own; RuntimeError saying why there is none."""
    missing = unavailable()
    if missing is not None:
        raise RuntimeError(missing)
    server = RedisServer(folder)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_url(given: str | None) -> Iterator[str]:
    """``given``, or a PostgreSQL test server started here; RuntimeError saying why not."""
    if given:
        yield given
        return
    try:
        module: Any = importlib.import_module("mlauth.testing.postgres_server")
    except ImportError as exc:
        raise RuntimeError(f"no --postgres-url, and no PostgreSQL test server: {exc}") from exc
    missing = module.unavailable() if hasattr(module, "unavailable") else None
    if missing is not None:
        raise RuntimeError(str(missing))
    # Its own folder (not ``folder``): as root it runs as nobody, who must reach it.
    server = module.PostgresServer()
    try:
        server.start()
        yield str(server.url)
    finally:
        server.stop()


@contextlib.contextmanager
def location_for(kind: str, folder: Path, args: argparse.Namespace) -> Iterator[str]:
    if kind == "redis":
        with redis_url(folder) as url:
            yield url
    elif kind == "postgresql":
        with postgres_url(args.postgres_url) as url:
            yield url
    else:
        yield str(folder / {"env": ".env", "peer": "tokens.db", "sqlite": "sellers.db"}[kind])


# -- one run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    kind: str
    sellers: int
    processes: int
    threads: int
    seconds: float
    lifetime: float
    setup_s: float
    calls: int
    failed: int
    floor_failed: int
    errors: dict[str, int]
    error_samples: list[str]
    server: dict[str, int]
    refreshes: int
    expiries_touched: int
    sellers_off: int
    off_examples: list[dict[str, object]]
    absorbed_401: int
    loaded_sellers: list[int]
    refreshed_here: list[int]
    calls_ms: list[float]
    floor_ms: list[float]
    calls_cpu_us: list[float]
    floor_cpu_us: list[float]
    marks: list[int]

    def figures(self, *, plain: bool = False) -> dict[str, float]:
        """The latency figures of every call, or of the plain ones (no mark) and their floors."""
        keep = [not (plain and mark) for mark in self.marks]
        calls, floor, calls_cpu, floor_cpu = (
            [x for x, k in zip(xs, keep, strict=True) if k]
            for xs in (self.calls_ms, self.floor_ms, self.calls_cpu_us, self.floor_cpu_us)
        )
        p = percentile
        return {
            "calls": len(calls),
            "floor_p50_ms": p(floor, 0.5),
            "floor_p99_ms": p(floor, 0.99),
            "calls_p50_ms": p(calls, 0.5),
            "calls_p99_ms": p(calls, 0.99),
            "added_p50_ms": p(calls, 0.5) - p(floor, 0.5),
            "added_p99_ms": p(calls, 0.99) - p(floor, 0.99),
            "floor_cpu_us": p(floor_cpu, 0.5),
            "added_cpu_us": p(calls_cpu, 0.5) - p(floor_cpu, 0.5),
        }

    def summary(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        for key in ("calls_ms", "floor_ms", "calls_cpu_us", "floor_cpu_us", "marks"):
            del data[key]
        data.update(
            all_calls=self.figures(),
            plain_calls=self.figures(plain=True),
            marked={
                name: sum(1 for m in self.marks if m & bit)
                for name, bit in (
                    ("loaded", LOADED),
                    ("refreshed", REFRESHED),
                    ("absorbed_401", ABSORBED_401),
                )
            },
            label=LABELS[self.kind],
        )
        return data

    def row(self) -> list[object]:
        f, plain = self.figures(), self.figures(plain=True)
        return [
            LABELS[self.kind],
            self.sellers,
            self.calls,
            self.failed,
            self.server["invalid_grant"],
            f"{self.refreshes} / {self.expiries_touched}",
            self.sellers_off,
            self.absorbed_401,
            f"{f['floor_p50_ms']:.2f} / {f['floor_p99_ms']:.2f}",
            f"{f['added_p50_ms']:+.2f} / {f['added_p99_ms']:+.2f}",
            f"{plain['calls']:.0f}",
            f"{plain['added_p50_ms']:+.2f} / {plain['added_p99_ms']:+.2f}",
            f"{plain['floor_cpu_us']:.0f}, {plain['added_cpu_us']:+.0f}",
        ]


@dataclasses.dataclass
class NotRun:
    kind: str
    reason: str

    def summary(self) -> dict[str, object]:
        return {"kind": self.kind, "label": LABELS[self.kind], "not_run": self.reason}

    def row(self) -> list[object]:
        return [LABELS[self.kind], "not run", *["-"] * (len(COLUMNS) - 2)]


def joined(results: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(x) for r in results for x in r[key]]


def run_kind(fake: FakeMercadoLibre, kind: str, location: str, args: argparse.Namespace) -> Run:
    """One storm on one store, on chains of its own."""
    lifetime = fake.token_lifetime
    count = 1 if kind == "env" else args.sellers
    first = ENV_SELLER if kind == "env" else FIRST_SELLER
    user_ids = [first + n for n in range(count)]
    floor = fake.issue_tokens(lifetime=3600.0 + args.seconds, user_id=FLOOR_USER)
    command = [
        *(sys.executable, "-m", "benchmarks.sellers_worker", kind, "--location", location),
        *("--url", fake.base_url, "--host", fake.host, "--token-url", fake.token_url),
        *("--client-id", fake.client_id, "--first-seller", str(first)),
        *("--sellers", str(count), "--threads", str(args.threads)),
        *("--seconds", str(args.seconds)),
    ]
    env = {SECRET_ENV: fake.client_secret, FLOOR_ENV: str(floor["access_token"])}
    issued: dict[int, float] = {}
    setup = [0.0]

    def before_go() -> None:
        started = time.monotonic()
        issued.update(write_chains(fake, kind, location, user_ids))
        setup[0] = time.monotonic() - started
        fake.reset_stats()

    results = run_workers(
        [command] * args.processes, env=env, before_go=before_go, timeout=args.seconds + 600
    )
    server = fake.stats()
    by_server = fake.refreshes_by_user()
    by_user: dict[int, list[float]] = {}
    for result in results:
        for user, times in result["refresh_times"].items():  # type: ignore[attr-defined]
            by_user.setdefault(int(user), []).extend(times)
    spans: dict[int, list[tuple[float, float]]] = {}
    for result in results:
        for user, times in result["spans"].items():  # type: ignore[attr-defined]
            spans.setdefault(int(user), []).extend((float(a), float(b)) for a, b in times)
    margin = 0.0 if kind == "peer" else lifetime * MAX_MARGIN_SHARE
    expected = {
        user: touched(
            spans.get(user, []),
            issued[user],
            by_user.get(user, []),
            lifetime=lifetime,
            margin=margin,
            slack=lifetime * SLACK_SHARE,
        )
        for user in user_ids
    }
    off = [
        user
        for user in user_ids
        if not expected[user] == len(by_user.get(user, [])) == by_server.get(user, 0)
    ]
    errors: dict[str, int] = {}
    for result in results:
        for name, n in result["errors"].items():  # type: ignore[attr-defined]
            errors[name] = errors.get(name, 0) + int(n)
    return Run(
        kind=kind,
        sellers=count,
        processes=args.processes,
        threads=args.threads,
        seconds=args.seconds,
        lifetime=lifetime,
        setup_s=round(setup[0], 3),
        calls=sum(int(str(r["calls"])) for r in results),
        failed=sum(int(str(r["failed"])) for r in results),
        floor_failed=sum(int(str(r["floor_failed"])) for r in results),
        errors=errors,
        error_samples=[s for r in results for s in r["error_samples"]][:3],  # type: ignore[attr-defined]
        server=server,
        refreshes=server["refreshes"],
        expiries_touched=sum(expected.values()),
        sellers_off=len(off),
        off_examples=[
            {
                "user_id": user,
                "issued": issued[user],
                "refreshes": by_user.get(user, []),
                "server_refreshes": by_server.get(user, 0),
                "expected": expected[user],
                "spans": sorted(spans.get(user, [])),
            }
            for user in off[:3]
        ],
        absorbed_401=sum(int(str(r["absorbed_401"])) for r in results),
        loaded_sellers=[int(str(r["loaded_sellers"])) for r in results],
        refreshed_here=[int(str(r["refreshed_here"])) for r in results],
        calls_ms=joined(results, "calls_ms"),
        floor_ms=joined(results, "floor_ms"),
        calls_cpu_us=joined(results, "calls_cpu_us"),
        floor_cpu_us=joined(results, "floor_cpu_us"),
        marks=[int(m) for r in results for m in r["marks"]],  # type: ignore[attr-defined]
    )


def report(outcomes: Sequence[Run | NotRun], args: argparse.Namespace) -> str:
    text = table(COLUMNS, [outcome.row() for outcome in outcomes])
    for outcome in outcomes:
        if isinstance(outcome, NotRun):
            text += f"\n\n{LABELS[outcome.kind]} not run: {outcome.reason}"
    text += (
        f"\n\n{args.processes} processes x {args.threads} threads, {args.seconds:g} s per "
        f"store, {args.sellers} sellers (the .env: 1), a random seller per call, tokens live "
        f"{args.token_lifetime:g} s, each seller's old access tokens killed at its rotation. "
        "Floor: 0 failed, 0 invalid_grant, refreshes = expiries touched, 0 sellers off. "
        "Added: the auth's calls' p50 (p99) minus the floor calls' p50 (p99), the floor "
        "being a fixed valid header sent right after each call by the same thread. Plain "
        "calls: those that neither loaded their seller in the process, nor refreshed, nor "
        "had a 401 sent again (compared with their own floor calls)."
    )
    samples = [
        f"- {LABELS[o.kind]}: {s}"
        for o in outcomes
        if isinstance(o, Run)
        for s in o.error_samples[:1]
    ]
    if samples:
        text += "\n\nFirst error seen per store:\n" + "\n".join(samples)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sellers_storm", description=__doc__)
    parser.add_argument("--sellers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--token-lifetime", type=float, default=5.0)
    parser.add_argument(
        "--stores",
        default="env,sqlite,postgresql,redis,peer",
        help=f"comma-separated, from: {', '.join(KINDS)}",
    )
    parser.add_argument("--postgres-url", help="a PostgreSQL to use (default: start one)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown stores {unknown}; pick from: {', '.join(KINDS)}")
    outcomes: list[Run | NotRun] = []
    with FakeMercadoLibre(
        token_lifetime=args.token_lifetime, kill_old_access_on_refresh=True
    ) as fake:
        for kind in kinds:
            with (
                tempfile.TemporaryDirectory(prefix=f"sellers-{kind}-") as tmp,
                contextlib.ExitStack() as stack,
            ):
                # What this machine lacks (a server, a driver, a store not written yet) makes
                # a row saying so; a failure during the run itself is raised.
                try:
                    location = stack.enter_context(location_for(kind, Path(tmp), args))
                    if kind in MLAUTH_STORES:
                        open_sellers(kind, location, fake.client_id).close()
                except (RuntimeError, ImportError) as exc:
                    outcomes.append(NotRun(kind, f"{type(exc).__name__}: {str(exc)[:300]}"))
                    continue
                outcomes.append(run_kind(fake, kind, location, args))
    text = report(outcomes, args)
    publish(args.out, "sellers_storm", text, {"runs": [o.summary() for o in outcomes]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
