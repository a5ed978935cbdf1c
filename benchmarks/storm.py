"""Expiry storm: N processes x M threads share one token chain, library by library.

One :class:`~mlauth.testing.FakeMercadoLibre` on loopback with short-lived tokens; each
refresh kills the old access token and the refresh token is single use, as on MercadoLibre.
For each library in turn: a fresh token chain, N worker processes (:mod:`benchmarks.worker`)
that start together, each with M threads calling the API for the same number of seconds,
every library set up as its own documentation recommends (:mod:`benchmarks.contenders`).
Counts come from the workers (what the caller saw) and from the fake (what the server saw).

``mlauth (redis)`` is mlauth on its Redis store: a redis-server started here on a free
loopback port (in a temporary folder, stopped at the end), each worker in a folder of its own
whose ``.env`` holds only the credentials and ``ML_TOKEN_STORE`` (as ``mlauth migrate`` leaves
it): processes that share nothing but Redis, like machines. Without redis-server or the
``redis`` package its row says what is missing instead of figures.

    python -m benchmarks.storm --processes 4 --threads 4 --seconds 20 --token-lifetime 4
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests

from benchmarks.common import (
    INSECURE_LOOPBACK_ENV,
    STORM_COLUMNS,
    StormRun,
    caller_counts,
    chosen_libraries,
    first_errors,
    joined,
    percentile,
    publish,
    run_workers,
    storm_parser,
    table,
)
from benchmarks.contenders import (
    LIBRARIES,
    MLAUTH_KINDS,
    MLAUTH_REDIS,
    STATIC,
    json_token,
    save_json_token,
)
from benchmarks.worker import SECRET_ENV
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer, unavailable
from mlauth.tokens import MAX_MARGIN_SHARE

# The storm's default line-up: mlauth on each of its stores, then the peers.
STORM_LIBRARIES = (LIBRARIES[0], MLAUTH_REDIS, *LIBRARIES[1:])


@dataclasses.dataclass
class Run(StormRun):
    """What one library did in one storm: the callers' counts and the server's, and what
    mlauth's hooks saw in the workers (calls an expiry touched, lock waits, the store)."""

    threads: int
    touched_ms: list[float]
    refreshing_ms: list[float]
    lock_waits_ms: list[float]
    stores: list[str]  # mlauth's token store class in the workers (none for the peers)

    @property
    def margin(self) -> float:
        # requests-oauthlib has no margin: it refreshes once the token has expired.
        return 0.0 if self.library == "requests-oauthlib" else super().margin

    def summary(self) -> dict[str, object]:
        data = super().summary()
        for key in ("touched_ms", "refreshing_ms", "lock_waits_ms"):
            del data[key]
        data.update(
            touched_calls=len(self.touched_ms),
            touched_p99_ms=percentile(self.touched_ms, 0.99),
            lock_waits=len(self.lock_waits_ms),
            lock_wait_total_ms=round(sum(self.lock_waits_ms), 2),
            lock_wait_p99_ms=percentile(self.lock_waits_ms, 0.99),
        )
        return data


@dataclasses.dataclass
class NotRun:
    """A contender this machine cannot run, and why (what is missing, how to get it)."""

    library: str
    reason: str

    def summary(self) -> dict[str, object]:
        return {"library": self.library, "not_run": self.reason}


@contextmanager
def redis_for(libraries: Sequence[str]) -> Iterator[RedisServer | str | None]:
    """A redis-server for the run if ``mlauth (redis)`` is in it: the server, or why not.

    Started in a temporary folder on a free loopback port, stopped (and the folder removed)
    at the end; None when no contender needs it.
    """
    if MLAUTH_REDIS not in libraries:
        yield None
        return
    missing = unavailable()
    if missing is not None:
        yield missing
        return
    with tempfile.TemporaryDirectory(prefix="storm-redis-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            server.start()
        except RuntimeError as exc:
            server.stop()
            yield f"redis-server did not start: {str(exc)[:300]}"
            return
        try:
            yield server
        finally:
            server.stop()


def token_round_trip_ms(fake: FakeMercadoLibre, samples: int = 20) -> float:
    """Median time of one refresh POST to the fake: the least an expiry can add to a call."""
    chain = fake.issue_tokens()
    times = []
    with requests.Session() as session:
        for _ in range(samples):
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
            times.append((time.perf_counter() - started) * 1000)
            chain = answer.json()
    fake.reset_stats()
    return percentile(times, 0.5)


def run_library(
    fake: FakeMercadoLibre,
    library: str,
    *,
    processes: int,
    threads: int,
    seconds: float,
    folder: Path,
    redis_url: str | None = None,
) -> Run:
    """One storm for one library, on a token chain of its own.

    ``redis_url`` is the server ``mlauth (redis)`` keeps its tokens in.
    """
    if library == MLAUTH_REDIS and redis_url is None:
        raise ValueError(f"{MLAUTH_REDIS} needs a redis_url")
    lifetime = fake.token_lifetime
    margin = lifetime * MAX_MARGIN_SHARE
    store = folder / (".env" if library in MLAUTH_KINDS else "token.json")
    # On Redis each process has a folder and a .env of its own: they share only Redis.
    stores = (
        [folder / f"machine{n}" / ".env" for n in range(processes)]
        if library == MLAUTH_REDIS
        else [store] * processes
    )
    commands = [
        [
            *(sys.executable, "-m", "benchmarks.worker", library, "--store", str(path)),
            *("--url", fake.base_url, "--token-url", fake.token_url),
            *("--client-id", fake.client_id, "--threads", str(threads)),
            *("--seconds", str(seconds), "--margin", str(margin)),
        ]
        for path in stores
    ]
    env = {SECRET_ENV: fake.client_secret}
    if library not in (*MLAUTH_KINDS, STATIC):
        env.update(INSECURE_LOOPBACK_ENV)

    def write_chain() -> None:
        """A fresh token, written the moment before the workers load it."""
        issued = time.time()
        if library in MLAUTH_KINDS:
            fake.write_env(
                store, expires_at=issued + lifetime, extra={"ML_TOKEN_REFRESHED_AT": str(issued)}
            )
            if library == MLAUTH_REDIS and redis_url is not None:
                # Imported here: without the redis package the other rows still run.
                from mlauth.cli.migrate import migrate_to_redis

                # What a user does: migrate the .env once, copy it to every machine. force:
                # the key (from the fake's client id) may hold an earlier run's chain.
                migrate_to_redis(store, redis_url, force=True)
                for path in stores:
                    path.parent.mkdir()
                    shutil.copyfile(store, path)
        elif library == STATIC:
            long_lived = 3600.0 + seconds  # outlives the run: no expiry, the floor
            save_json_token(
                store, json_token(fake.issue_tokens(lifetime=long_lived), issued + long_lived)
            )
        else:
            save_json_token(store, json_token(fake.issue_tokens(), issued + lifetime))
        fake.reset_stats()

    results = run_workers(commands, env=env, before_go=write_chain, timeout=seconds + 300)
    return Run(
        library=library,
        processes=processes,
        threads=threads,
        seconds=seconds,
        lifetime=lifetime,
        **caller_counts(results),
        server=fake.stats(),
        refresh_times=fake.refresh_times(),
        touched_ms=joined(results, "touched_ms"),
        refreshing_ms=joined(results, "refreshing_ms"),
        lock_waits_ms=joined(results, "lock_waits_ms"),
        stores=sorted({str(r["store"]) for r in results if r.get("store")}),
    )


def report(outcomes: Sequence[Run | NotRun], rtt_ms: float) -> str:
    rows: list[list[object]] = []
    runs = [run for run in outcomes if isinstance(run, Run)]
    for run in outcomes:
        if isinstance(run, NotRun):
            rows.append([run.library, "not run", *["-"] * (len(STORM_COLUMNS) - 2)])
        else:
            rows.append(run.row())
    text = table(STORM_COLUMNS, rows)
    for skipped in outcomes:
        if isinstance(skipped, NotRun):
            text += f"\n\n{skipped.library} not run: {skipped.reason}"
    if not runs:
        return text
    first = runs[0]
    text += (
        f"\n\n{first.processes} processes x {first.threads} threads, {first.seconds:g} s per "
        f"library, tokens live {first.lifetime:g} s (refreshed {first.margin:g} s ahead where "
        f"the library can). Floor: 0 failed, 0 invalid_grant, 0 double refreshes, refreshes "
        f"= one per token ({first.expected_refreshes} in {first.seconds:g} s; "
        f"{math.floor(first.seconds / first.lifetime)} for requests-oauthlib, which refreshes "
        "only at expiry); "
        f"one refresh round trip to the fake = {rtt_ms:.2f} ms."
    )
    return text + first_errors(runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = storm_parser(
        "python -m benchmarks.storm",
        __doc__,
        libraries=STORM_LIBRARIES,
        per_process="threads",
        per_process_default=4,
    )
    args = parser.parse_args(argv)
    # STATIC (a constant header, the floor scale.py uses) is accepted too, as it always was.
    libraries = chosen_libraries(parser, args.libraries, STORM_LIBRARIES, also=(STATIC,))
    runs: list[Run | NotRun] = []
    fake_server = FakeMercadoLibre(
        token_lifetime=args.token_lifetime, kill_old_access_on_refresh=True
    )
    with fake_server as fake, redis_for(libraries) as redis_or_why:
        rtt = token_round_trip_ms(fake)
        for library in libraries:
            redis_url = None
            if library == MLAUTH_REDIS:
                if not isinstance(redis_or_why, RedisServer):
                    runs.append(NotRun(library, str(redis_or_why)))
                    continue
                redis_url = redis_or_why.url
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(
                    run_library(
                        fake,
                        library,
                        processes=args.processes,
                        threads=args.threads,
                        seconds=args.seconds,
                        folder=Path(tmp),
                        redis_url=redis_url,
                    )
                )
    text = report(runs, rtt)
    data = {"token_round_trip_ms": rtt, "runs": [run.summary() for run in runs]}
    publish(args.out, "storm", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
