"""Async expiry storm: N processes x M asyncio tasks share one token chain, httpx clients.

The async twin of :mod:`benchmarks.storm`: one :class:`~mlauth.testing.FakeMercadoLibre` on
loopback with short-lived tokens; each refresh kills the old access token and the refresh
token is single use, as on MercadoLibre. For each library in turn: a fresh token chain, N
worker processes (:mod:`benchmarks.async_worker`) that start together, each running M tasks
on one event loop through one ``httpx.AsyncClient``, for the same number of seconds.

- ``static`` (the floor): a constant header with a token that outlives the run; what the
  same processes, tasks and fake do when no token expires.
- ``mlauth``: ``httpx.AsyncClient(auth=HttpxAuth.from_env(".env"))``, every process on the
  same ``.env``.
- ``authlib``: ``AsyncOAuth2Client(..., token_endpoint=..., update_token=saver)`` as Authlib's
  docs show, the saver writing the new token to one JSON file shared by the processes, each
  of which loads it at start. Authlib serialises refreshes per client object (an anyio lock),
  not across processes.

Both refresh a quarter of a token's life ahead (mlauth's own margin for short tokens;
Authlib's ``leeway`` set to the same). Counts come from the workers (what the caller saw)
and from the fake (what the server saw).

    python -m benchmarks.async_storm --processes 4 --tasks 24 --seconds 20 --token-lifetime 4
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

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
    total,
)
from benchmarks.contenders import json_token, save_json_token
from benchmarks.httpx_contenders import ASYNC_LIBRARIES, MLAUTH, STATIC
from benchmarks.storm import token_round_trip_ms
from benchmarks.worker import SECRET_ENV
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import MAX_MARGIN_SHARE

LABELS = {
    STATIC: "floor: static httpx.Auth",
    MLAUTH: "mlauth HttpxAuth",
    "authlib": "Authlib AsyncOAuth2Client",
}


@dataclasses.dataclass
class AsyncRun(StormRun):
    """What one library did in one async storm: the callers' counts and the server's, the
    refreshes each process made, and how long the calls that returned a 401 took."""

    tasks: int
    refreshed_here: list[int]  # per process: the refreshes its client made
    surfaced_401_ms: list[float]  # how long the calls that returned a 401 took
    surfaced_401_after_resend: int  # of those, re-sends that got a 401 again

    @property
    def label(self) -> str:
        return LABELS[self.library]

    @property
    def expected_refreshes(self) -> int:
        """The floor: one refresh per token, each replaced a quarter of its life early."""
        if self.library == STATIC:
            return 0  # its token outlives the run
        return super().expected_refreshes

    def summary(self) -> dict[str, object]:
        data = super().summary()
        data.update(
            surfaced_401_min_ms=min(self.surfaced_401_ms, default=None),
            surfaced_401_p50_ms=percentile(self.surfaced_401_ms, 0.5),
        )
        return data


def _write_chain(fake: FakeMercadoLibre, library: str, store: Path, lifetime: float) -> None:
    """A fresh token chain in ``store``, written the moment before the workers load it."""
    issued = time.time()
    if library == STATIC:
        long_lived = 3600.0  # outlives the run: no expiry, the floor
        save_json_token(
            store, json_token(fake.issue_tokens(lifetime=long_lived), issued + long_lived)
        )
    elif library == MLAUTH:
        fake.write_env(
            store, expires_at=issued + lifetime, extra={"ML_TOKEN_REFRESHED_AT": str(issued)}
        )
    else:
        save_json_token(store, json_token(fake.issue_tokens(), issued + lifetime))


def _commands(
    fake: FakeMercadoLibre, library: str, store: Path, processes: int, tasks: int, seconds: float
) -> list[list[str]]:
    margin = fake.token_lifetime * MAX_MARGIN_SHARE
    command = [
        *(sys.executable, "-m", "benchmarks.async_worker", library, "--store", str(store)),
        *("--url", fake.base_url, "--token-url", fake.token_url),
        *("--client-id", fake.client_id, "--tasks", str(tasks)),
        *("--seconds", str(seconds), "--margin", str(margin)),
    ]
    return [command] * processes


def run_library(
    fake: FakeMercadoLibre,
    library: str,
    *,
    processes: int,
    tasks: int,
    seconds: float,
    folder: Path,
) -> AsyncRun:
    """One storm for one library, on a token chain of its own."""
    store = folder / (".env" if library == MLAUTH else "token.json")
    env = {SECRET_ENV: fake.client_secret}
    if library == "authlib":
        env.update(INSECURE_LOOPBACK_ENV)  # Authlib refuses an http token endpoint otherwise

    def write_chain() -> None:
        _write_chain(fake, library, store, fake.token_lifetime)
        fake.reset_stats()

    results = run_workers(
        _commands(fake, library, store, processes, tasks, seconds),
        env=env,
        before_go=write_chain,
        timeout=seconds + 300,
    )
    return AsyncRun(
        library=library,
        processes=processes,
        tasks=tasks,
        seconds=seconds,
        lifetime=fake.token_lifetime,
        **caller_counts(results),
        refreshed_here=[int(str(r["refreshed_here"])) for r in results],
        server=fake.stats(),
        refresh_times=fake.refresh_times(),
        surfaced_401_ms=joined(results, "surfaced_401_ms"),
        surfaced_401_after_resend=total(results, "surfaced_401_after_resend"),
    )


def report(runs: Sequence[AsyncRun], rtt_ms: float) -> str:
    text = table(STORM_COLUMNS, [run.row() for run in runs])
    if not runs:
        return text
    # The figures of the floor line are those of a library that refreshes, not the static's.
    first = next((run for run in runs if run.library != STATIC), runs[0])
    text += (
        f"\n\n{first.processes} processes x {first.tasks} asyncio tasks (one event loop and "
        f"one httpx.AsyncClient per process), {first.seconds:g} s per library, tokens live "
        f"{first.lifetime:g} s (refreshed {first.margin:g} s ahead). "
        "Floor: 0 failed, 0 invalid_grant, 0 double refreshes, refreshes = one per token "
        f"({first.expected_refreshes} in {first.seconds:g} s); one refresh round trip to the "
        f"fake = {rtt_ms:.2f} ms.\n"
        + "\n".join(
            f"- {run.label}: refreshes made per process "
            + ", ".join(str(n) for n in run.refreshed_here)
            for run in runs
        )
    )
    surfaced = [
        f"- {run.label}: {run.surfaced_401} 401s returned, "
        f"{run.surfaced_401_after_resend} of them to a re-send; those calls took "
        f"{min(run.surfaced_401_ms):.0f} ms at least, {percentile(run.surfaced_401_ms, 0.5):.0f} "
        f"ms at the median (a token lives {run.lifetime * 1000:.0f} ms)"
        for run in runs
        if run.surfaced_401_ms
    ]
    if surfaced:
        text += "\n\n401s returned to the caller:\n" + "\n".join(surfaced)
    return text + first_errors(runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = storm_parser(
        "python -m benchmarks.async_storm",
        __doc__,
        libraries=ASYNC_LIBRARIES,
        per_process="tasks",
        per_process_default=24,
        per_process_help="asyncio tasks per process",
    )
    args = parser.parse_args(argv)
    libraries = chosen_libraries(parser, args.libraries, ASYNC_LIBRARIES)
    runs = []
    fake_server = FakeMercadoLibre(
        token_lifetime=args.token_lifetime, kill_old_access_on_refresh=True
    )
    with fake_server as fake:
        rtt = token_round_trip_ms(fake)
        for library in libraries:
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(
                    run_library(
                        fake,
                        library,
                        processes=args.processes,
                        tasks=args.tasks,
                        seconds=args.seconds,
                        folder=Path(tmp),
                    )
                )
    text = report(runs, rtt)
    data = {"token_round_trip_ms": rtt, "runs": [run.summary() for run in runs]}
    publish(args.out, "async_storm", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
