"""Expiry storm: N processes x M threads share one token chain, library by library.

One :class:`~mlauth.testing.FakeMercadoLibre` on loopback with short-lived tokens; each
refresh kills the old access token and the refresh token is single use, as on MercadoLibre.
For each library in turn: a fresh token chain, N worker processes (:mod:`benchmarks.worker`)
that start together, each with M threads calling the API for the same number of seconds,
every library set up as its own documentation recommends (:mod:`benchmarks.contenders`).
Counts come from the workers (what the caller saw) and from the fake (what the server saw).

    python -m benchmarks.storm --processes 4 --threads 4 --seconds 20 --token-lifetime 4
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from benchmarks.common import (
    INSECURE_LOOPBACK_ENV,
    RESULTS,
    go,
    machine,
    percentile,
    results_of,
    save,
    start_workers,
    table,
    total,
)
from benchmarks.contenders import LIBRARIES, STATIC, json_token, save_json_token
from benchmarks.worker import SECRET_ENV
from mlauth.testing import FakeMercadoLibre
from mlauth.token import MAX_MARGIN_SHARE


@dataclasses.dataclass
class Run:
    """What one library did in one storm: the callers' counts and the server's."""

    library: str
    processes: int
    threads: int
    seconds: float
    lifetime: float
    calls: int
    ok: int
    failed: int
    surfaced_401: int
    absorbed_401: int
    errors: dict[str, int]
    stranded: int
    first_failure_s: float | None
    error_samples: list[str]
    server: dict[str, int]
    refresh_times: list[float]
    latencies_ms: list[float]
    touched_ms: list[float]
    refreshing_ms: list[float]
    lock_waits_ms: list[float]

    @property
    def margin(self) -> float:
        # requests-oauthlib has no margin: it refreshes once the token has expired.
        return 0.0 if self.library == "requests-oauthlib" else self.lifetime * MAX_MARGIN_SHARE

    @property
    def expected_refreshes(self) -> int:
        """The floor: one refresh per token, each replaced ``margin`` before it expires."""
        return math.floor(self.seconds / (self.lifetime - self.margin))

    @property
    def double_refreshes(self) -> int:
        """Refreshes closer than half a token's life to the one before: the same token twice."""
        times = self.refresh_times
        return sum(1 for a, b in itertools.pairwise(times) if b - a < self.lifetime / 2)

    def p(self, share: float) -> float:
        return percentile(self.latencies_ms, share)

    def summary(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        for key in ("latencies_ms", "touched_ms", "refreshing_ms", "lock_waits_ms"):
            del data[key]
        data.update(
            p50_ms=self.p(0.5),
            p99_ms=self.p(0.99),
            expected_refreshes=self.expected_refreshes,
            double_refreshes=self.double_refreshes,
            touched_calls=len(self.touched_ms),
            touched_p99_ms=percentile(self.touched_ms, 0.99),
            lock_waits=len(self.lock_waits_ms),
            lock_wait_total_ms=round(sum(self.lock_waits_ms), 2),
            lock_wait_p99_ms=percentile(self.lock_waits_ms, 0.99),
        )
        return data


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
) -> Run:
    """One storm for one library, on a token chain of its own."""
    lifetime = fake.token_lifetime
    margin = lifetime * MAX_MARGIN_SHARE
    store = folder / (".env" if library == "mlauth" else "token.json")
    command = [
        *(sys.executable, "-m", "benchmarks.worker", library, "--store", str(store)),
        *("--url", fake.base_url, "--token-url", fake.token_url),
        *("--client-id", fake.client_id, "--threads", str(threads)),
        *("--seconds", str(seconds), "--margin", str(margin)),
    ]
    env = {SECRET_ENV: fake.client_secret}
    if library not in ("mlauth", STATIC):
        env.update(INSECURE_LOOPBACK_ENV)
    procs = start_workers([command] * processes, env=env)
    try:
        # A fresh token, written the moment before the workers load it.
        issued = time.time()
        if library == "mlauth":
            fake.write_env(
                store, expires_at=issued + lifetime, extra={"ML_TOKEN_REFRESHED_AT": str(issued)}
            )
        elif library == STATIC:
            long_lived = 3600.0 + seconds  # outlives the run: no expiry, the floor
            save_json_token(
                store, json_token(fake.issue_tokens(lifetime=long_lived), issued + long_lived)
            )
        else:
            save_json_token(store, json_token(fake.issue_tokens(), issued + lifetime))
        fake.reset_stats()
        go(procs)
        results = results_of(procs, timeout=seconds + 300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors: dict[str, int] = {}
    for result in results:
        for name, count in result["errors"].items():  # type: ignore[attr-defined]
            errors[name] = errors.get(name, 0) + int(count)

    def joined(key: str) -> list[float]:
        return [float(x) for r in results for x in r[key]]  # type: ignore[attr-defined]

    return Run(
        library=library,
        processes=processes,
        threads=threads,
        seconds=seconds,
        lifetime=lifetime,
        calls=total(results, "calls"),
        ok=total(results, "ok"),
        failed=total(results, "failed"),
        surfaced_401=total(results, "surfaced_401"),
        absorbed_401=total(results, "absorbed_401"),
        errors=errors,
        stranded=sum(1 for r in results if r["stranded"]),
        first_failure_s=min(
            (float(str(r["first_failure_s"])) for r in results if r["first_failure_s"] is not None),
            default=None,
        ),
        error_samples=[s for r in results for s in r["error_samples"]][:3],  # type: ignore[attr-defined]
        server=fake.stats(),
        refresh_times=fake.refresh_times(),
        latencies_ms=joined("latencies_ms"),
        touched_ms=joined("touched_ms"),
        refreshing_ms=joined("refreshing_ms"),
        lock_waits_ms=joined("lock_waits_ms"),
    )


def report(runs: Sequence[Run], rtt_ms: float) -> str:
    rows = []
    for run in runs:
        rows.append(
            [
                run.library,
                run.calls,
                run.failed,
                f"{run.server['refreshes']} / {run.expected_refreshes}",
                run.double_refreshes,
                run.server["invalid_grant"],
                run.surfaced_401,
                run.absorbed_401,
                f"{run.p(0.5):.2f}",
                f"{run.p(0.99):.2f}",
                "-" if run.first_failure_s is None else f"{run.first_failure_s:.1f} s",
                f"{run.stranded} of {run.processes}",
                ", ".join(f"{k} {v}" for k, v in sorted(run.errors.items())) or "-",
            ]
        )
    first = runs[0]
    text = table(
        [
            "library",
            "calls",
            "failed",
            "refreshes / floor",
            "double refreshes",
            "invalid_grant",
            "401s surfaced",
            "401s absorbed",
            "p50 ms",
            "p99 ms",
            "first failure",
            "processes left without a token",
            "exceptions raised to the caller",
        ],
        rows,
    )
    text += (
        f"\n\n{first.processes} processes x {first.threads} threads, {first.seconds:g} s per "
        f"library, tokens live {first.lifetime:g} s (refreshed {first.margin:g} s ahead where "
        f"the library can). Floor: 0 failed, 0 invalid_grant, 0 double refreshes, refreshes "
        f"= one per token ({first.expected_refreshes} in {first.seconds:g} s; "
        f"{math.floor(first.seconds / first.lifetime)} for requests-oauthlib, which refreshes "
        "only at expiry); "
        f"one refresh round trip to the fake = {rtt_ms:.2f} ms."
    )
    samples = [f"- {run.library}: {s}" for run in runs for s in run.error_samples[:1]]
    if samples:
        text += "\n\nFirst error seen per library:\n" + "\n".join(samples)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storm", description=__doc__)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--token-lifetime", type=float, default=4.0)
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    libraries = [name.strip() for name in args.libraries.split(",") if name.strip()]
    runs = []
    with FakeMercadoLibre(
        token_lifetime=args.token_lifetime, kill_old_access_on_refresh=True
    ) as fake:
        rtt = token_round_trip_ms(fake)
        for library in libraries:
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(
                    run_library(
                        fake,
                        library,
                        processes=args.processes,
                        threads=args.threads,
                        seconds=args.seconds,
                        folder=Path(tmp),
                    )
                )
    text = report(runs, rtt)
    print(text)
    data = {
        "token_round_trip_ms": rtt,
        "runs": [run.summary() for run in runs],
        "machine": machine(),
    }
    save(args.out, "storm", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
