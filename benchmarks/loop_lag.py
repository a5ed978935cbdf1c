"""Event-loop lag during a token refresh: does the refresh stop the other tasks?

One process, one asyncio loop, one :class:`~mlauth.testing.FakeMercadoLibre` on loopback
whose token endpoint takes ``--token-delay`` seconds to answer (1 s at full size). A probe
task sleeps ``--interval`` (1 ms) in a loop and records how late each wake-up is: the loop's
lag, i.e. how long any other task (a web handler, a heartbeat) would have waited. Meanwhile
one API call is made whose token has expired, so the call has to wait for a refresh. Per
contender and repeat a fresh token chain, a fresh client, and a check with the fake that
exactly one refresh happened (zero for the control).

- ``mlauth HttpxAuth``: ``httpx.AsyncClient(auth=HttpxAuth.from_env(".env"))``; on the loop
  only the engine's ``fresh_token()`` check, the refresh in a worker thread (anyio).
- ``Authlib AsyncOAuth2Client``: its refresh is an awaited POST on the same loop.
- ``blocking refresh on the loop``: what not to do, measured rather than guessed: an
  ``httpx.Auth`` whose sync ``auth_flow`` refreshes with a blocking ``httpx.post``. httpx's
  default ``async_auth_flow`` runs a sync ``auth_flow`` on the loop, so the loop stops for
  the whole POST. (Any sync refresh called from a coroutine does the same.)
- ``control: no refresh``: a call with a valid constant token, then an idle wait as long as
  the token endpoint's delay: the probe's own lag on this machine, for the same window.

Contenders are interleaved, the order rotated from repeat to repeat, after one unrecorded
warm-up window each with an instant token endpoint (first-call imports and set-up).

    python -m benchmarks.loop_lag --repeats 5 --token-delay 1.0 --interval 0.001
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from pathlib import Path

import httpx

from benchmarks.common import (
    INSECURE_LOOPBACK_ENV,
    add_out_argument,
    median,
    percentile,
    publish,
    table,
)
from benchmarks.contenders import json_token, save_json_token
from benchmarks.httpx_contenders import StaticHttpxBearer, authlib_async_client
from mlauth.httpx import HttpxAuth
from mlauth.testing import FakeMercadoLibre

MLAUTH = "mlauth HttpxAuth"
AUTHLIB = "Authlib AsyncOAuth2Client"
BLOCKING = "blocking refresh on the loop (sync httpx.Auth)"
CONTROL = "control: no refresh"
CONTENDERS = (MLAUTH, AUTHLIB, BLOCKING, CONTROL)


class BlockingRefreshAuth(httpx.Auth):
    """A naive refreshing auth: a blocking POST inside ``auth_flow`` when the token expired."""

    def __init__(self, token: dict[str, object], fake: FakeMercadoLibre) -> None:
        self.access = str(token["access_token"])
        self.refresh_token = str(token["refresh_token"])
        self.expires_at = float(str(token["expires_at"]))
        self.fake = fake

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        if time.time() >= self.expires_at:
            answer = httpx.post(
                self.fake.token_url,
                data={
                    "grant_type": "refresh_token",
                    "client_id": self.fake.client_id,
                    "client_secret": self.fake.client_secret,
                    "refresh_token": self.refresh_token,
                },
                trust_env=False,
                timeout=30,
            ).json()
            self.access, self.refresh_token = answer["access_token"], answer["refresh_token"]
            self.expires_at = time.time() + float(answer["expires_in"])
        request.headers["Authorization"] = f"Bearer {self.access}"
        yield request


@dataclasses.dataclass
class Lag:
    """One contender's windows: the probe's lags (s), the call times (s), refreshes made."""

    name: str
    lags: list[float] = dataclasses.field(default_factory=list)
    window_max: list[float] = dataclasses.field(default_factory=list)
    calls: list[float] = dataclasses.field(default_factory=list)
    refreshes: int = 0


def _expired_chain(fake: FakeMercadoLibre) -> dict[str, object]:
    # Expired a second ago on the client's clock: the next call must wait for a refresh.
    return json_token(fake.issue_tokens(), time.time() - 1)


def make_client(name: str, fake: FakeMercadoLibre, tmp: Path) -> httpx.AsyncClient:
    """A fresh client for ``name`` on a fresh token chain (expired, but for the control)."""
    if name == MLAUTH:
        env = tmp / ".env"
        fake.write_env(env, expires_at=time.time() - 1)
        return httpx.AsyncClient(auth=HttpxAuth.from_env(env), trust_env=False, timeout=30)
    if name == AUTHLIB:
        store = tmp / "token.json"
        save_json_token(store, _expired_chain(fake))
        return authlib_async_client(
            store,
            token_url=fake.token_url,
            client_id=fake.client_id,
            client_secret=fake.client_secret,
            margin=60.0,
            timeout=30,
        )
    if name == BLOCKING:
        auth: httpx.Auth = BlockingRefreshAuth(_expired_chain(fake), fake)
    else:
        auth = StaticHttpxBearer(str(fake.issue_tokens()["access_token"]))
    return httpx.AsyncClient(auth=auth, trust_env=False, timeout=30)


async def probe(lags: list[float], stop: asyncio.Event, interval: float) -> None:
    """Sleep ``interval`` again and again; record how late each wake-up was."""
    clock = time.perf_counter
    while not stop.is_set():
        started = clock()
        await asyncio.sleep(interval)
        lags.append(max(0.0, clock() - started - interval))


async def window(work: Callable[[], Awaitable[None]], interval: float) -> tuple[list[float], float]:
    """The probe's lags while ``work`` runs, and how long ``work`` took (s)."""
    lags: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(probe(lags, stop, interval))
    await asyncio.sleep(interval)  # the probe is running before the work starts
    lags.clear()
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    stop.set()
    await task
    return lags, took


async def one(name: str, fake: FakeMercadoLibre, tmp: Path, interval: float, lag: Lag) -> None:
    """One window for ``name``: a call that waits for a refresh (or the control's idle wait)."""
    client = make_client(name, fake, tmp)
    before = fake.stats()["refreshes"]

    async def work() -> None:
        response = await client.get(f"{fake.base_url}/users/me")
        if response.status_code != 200:
            raise SystemExit(f"{name}: the call answered {response.status_code}")
        if name == CONTROL:
            await asyncio.sleep(fake.token_delay)

    async with client:
        lags, took = await window(work, interval)
    refreshes = fake.stats()["refreshes"] - before
    if refreshes != (0 if name == CONTROL else 1):
        raise SystemExit(f"{name}: {refreshes} refreshes in the window, expected one")
    lag.lags += lags
    lag.window_max.append(max(lags, default=0.0))
    lag.calls.append(took)
    lag.refreshes += refreshes


async def measure(
    fake: FakeMercadoLibre, tmp: Path, repeats: int, interval: float
) -> dict[str, Lag]:
    # Warm-up, not recorded: a process's first async request imports httpcore (and trio,
    # if installed) on the loop, and each path has its first-call costs; whoever came first
    # would pay them all. The endpoint answers at once meanwhile.
    delay, fake.token_delay = fake.token_delay, 0.0
    for name in CONTENDERS:
        folder = tmp / f"warm-up-{CONTENDERS.index(name)}"
        folder.mkdir()
        await one(name, fake, folder, interval, Lag(name))
    fake.token_delay = delay
    found = {name: Lag(name) for name in CONTENDERS}
    for index in range(repeats):
        shift = index % len(CONTENDERS)
        for name in (*CONTENDERS[shift:], *CONTENDERS[:shift]):
            folder = tmp / f"{index}-{CONTENDERS.index(name)}"
            folder.mkdir()
            await one(name, fake, folder, interval, found[name])
    return found


def report(
    found: dict[str, Lag], repeats: int, delay: float, interval: float
) -> tuple[str, dict[str, object]]:
    rows = []
    data: dict[str, object] = {"repeats": repeats, "token_delay_s": delay, "interval_s": interval}
    for name, lag in found.items():
        ms = [x * 1000 for x in lag.lags]
        rows.append(
            [
                name,
                lag.refreshes,
                f"{median(lag.calls) * 1000:.0f}",
                len(ms),
                f"{max(ms, default=0.0):.1f}",
                f"{percentile(ms, 0.99):.2f}",
                f"{median(ms):.3f}",
                f"{median(lag.window_max) * 1000:.1f}",
            ]
        )
        data[name] = {
            "refreshes": lag.refreshes,
            "call_s": lag.calls,
            "window_max_lag_ms": [x * 1000 for x in lag.window_max],
            "max_lag_ms": max(ms, default=0.0),
            "p99_lag_ms": percentile(ms, 0.99),
            "p50_lag_ms": median(ms),
            "probe_samples": len(ms),
        }
    text = table(
        [
            "contender",
            "refreshes",
            "window ms (median)",
            "probe wake-ups",
            "max lag ms",
            "p99 lag ms",
            "p50 lag ms",
            "max lag per window ms (median)",
        ],
        rows,
    )
    text += (
        f"\n\n{repeats} windows per contender, interleaved; token endpoint answers after "
        f"{delay:g} s; the probe sleeps {interval * 1000:g} ms at a time and its lag is how "
        "late it woke up. A window is one API call whose token has expired (so it includes "
        "one refresh), on a fresh token chain and a fresh client; the control's is a call "
        "with a valid token plus an idle wait as long as the endpoint's delay."
    )
    return text, data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop_lag", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="windows per contender")
    parser.add_argument("--token-delay", type=float, default=1.0, help="seconds per refresh")
    parser.add_argument("--interval", type=float, default=0.001, help="the probe's sleep, s")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    # Authlib refuses the fake's http token endpoint otherwise; this process is a benchmark.
    os.environ.update(INSECURE_LOOPBACK_ENV)
    with FakeMercadoLibre() as fake, tempfile.TemporaryDirectory() as tmp:
        fake.token_delay = args.token_delay
        found = asyncio.run(measure(fake, Path(tmp), args.repeats, args.interval))
    text, data = report(found, args.repeats, args.token_delay, args.interval)
    publish(args.out, "loop_lag", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
