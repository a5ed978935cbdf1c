"""Per-request cost of each httpx auth, client side only, for ``Client`` and ``AsyncClient``.

The httpx twin of :mod:`benchmarks.overhead`. Every client gets the same stub transport,
which answers a canned 200 at once, so a call measures httpx plus the auth layer and nothing
else (no socket, no server). Each kind of client has its own floor: a client whose auth is an
``httpx.Auth`` setting one constant header.

- ``httpx.Client``: the floor, the floor plus one ``os.stat`` of the ``.env`` per request
  (what mlauth made before issue 19), ``HttpxAuth`` and Authlib's ``OAuth2Client``;
- ``httpx.AsyncClient``: the same with the same ``HttpxAuth`` object type (its async flow)
  and Authlib's ``AsyncOAuth2Client``.

Every token is far from expiry (nobody refreshes during the run) and every client has
``trust_env`` off. All contenders run in one process, on one event loop (a sync client is
called from the coroutine like any blocking code), in rounds: in each round every contender
makes ``--calls`` calls in turns of ``--block`` calls, the order rotated from round to round
and reversed from turn to turn, so drifts in the machine's speed hit them all alike; each
contender's figure for a round is compared with its own floor's for the same round. The time
is the CPU time of this thread (:data:`benchmarks.overhead.CLOCK`): for the async clients
the loop's own work for the call (creating and resuming the task's awaits) is included, as
it is for any awaited call, but nothing else runs on the loop meanwhile.

    python -m benchmarks.httpx_overhead --rounds 30 --calls 1000 --block 20
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from benchmarks.common import (
    AgainstFloor,
    add_out_argument,
    add_round_arguments,
    publish,
    round_turns,
    table,
)
from benchmarks.contenders import json_token, save_json_token
from benchmarks.httpx_contenders import (
    StatHttpxBearer,
    StaticHttpxBearer,
    authlib_async_client,
    authlib_client,
)
from benchmarks.overhead import (
    ACCESS,
    CLIENT_ID,
    CLIENT_SECRET,
    CLOCK,
    CLOCK_COST_US,
    REFRESH,
    TOKEN_URL,
    URL,
    env_text,
    per_call_us,
)
from mlauth.httpx import HttpxAuth

SYNC, ASYNC = "httpx.Client", "httpx.AsyncClient"
FLOOR = "static httpx.Auth"
FLOOR_STAT = "static httpx.Auth + os.stat"
MLAUTH = "mlauth HttpxAuth"
AUTHLIB = {SYNC: "Authlib OAuth2Client", ASYNC: "Authlib AsyncOAuth2Client"}
BODY = b'{"id":8035443}'


class StubTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Answers every request with the same 200 at once, and remembers the last token sent."""

    def __init__(self) -> None:
        self.last_authorization: str | None = None
        self.sent = 0

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        self.last_authorization = request.headers.get("Authorization")
        return httpx.Response(
            200, headers={"Content-Type": "application/json"}, content=BODY, request=request
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._answer(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self._answer(request)


class Contender:
    """A client, the stub it sends through, and its per-round figures."""

    def __init__(
        self, kind: str, name: str, client: httpx.Client | httpx.AsyncClient, stub: StubTransport
    ) -> None:
        self.kind = kind
        self.name = name
        self.client = client
        self.stub = stub
        self.per_round: list[float] = []  # mean µs per call, one value per round

    async def spend(self, calls: int) -> int:
        """CPU ns spent in ``calls`` calls, timing only the calls themselves."""
        clock = CLOCK
        spent = 0
        client = self.client
        if isinstance(client, httpx.AsyncClient):
            for _ in range(calls):
                started = clock()
                await client.get(URL)
                spent += clock() - started
        else:
            for _ in range(calls):
                started = clock()
                client.get(URL)
                spent += clock() - started
        return spent

    async def run(self, calls: int) -> float:
        gc.collect()
        return per_call_us(await self.spend(calls), calls)


def _client(kind: str, auth: httpx.Auth, stub: StubTransport) -> httpx.Client | httpx.AsyncClient:
    if kind == SYNC:
        return httpx.Client(auth=auth, transport=stub, trust_env=False)
    return httpx.AsyncClient(auth=auth, transport=stub, trust_env=False)


def _authlib(kind: str, store: Path, stub: StubTransport) -> httpx.Client | httpx.AsyncClient:
    make = authlib_client if kind == SYNC else authlib_async_client
    return make(
        store,
        token_url=TOKEN_URL,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        margin=300.0,
        transport=stub,
    )


def build(tmp: Path) -> list[Contender]:
    """Four sync and four async contenders; the first of each kind is its floor."""
    far = time.time() + 6 * 3600  # far from expiry: nobody refreshes during the run
    env = tmp / ".env"
    env.write_text(env_text(ACCESS, far))
    store = tmp / "authlib.json"
    answer = {"access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 21600}
    save_json_token(store, json_token(answer, far))
    contenders = []
    for kind in (SYNC, ASYNC):
        # One HttpxAuth per client, as a program with one client of each kind would have.
        auths: list[tuple[str, httpx.Auth]] = [
            (FLOOR, StaticHttpxBearer(ACCESS)),
            (FLOOR_STAT, StatHttpxBearer(ACCESS, env)),
            (MLAUTH, HttpxAuth.from_env(env)),
        ]
        for name, auth in auths:
            stub = StubTransport()
            contenders.append(Contender(kind, name, _client(kind, auth, stub), stub))
        stub = StubTransport()
        contenders.append(Contender(kind, AUTHLIB[kind], _authlib(kind, store, stub), stub))
    return contenders


async def check(contenders: Sequence[Contender]) -> None:
    """Every contender really sends the token, and never reads the environment."""
    for contender in contenders:
        if contender.client.trust_env:
            raise SystemExit(f"{contender.kind} {contender.name} reads the environment")
        for _ in range(4):
            await contender.run(1)
            if contender.stub.last_authorization != f"Bearer {ACCESS}":
                raise SystemExit(f"{contender.kind} {contender.name} sent no token or another")


async def measure(contenders: Sequence[Contender], rounds: int, calls: int, block: int) -> None:
    """Each round: ``calls`` calls per contender, in turns of ``block`` calls, as
    :func:`benchmarks.overhead.measure` takes them (:func:`benchmarks.common.round_turns`)."""
    for contender in contenders:
        await contender.run(max(calls // 4, 1))  # warm-up: imports, caches, first-call paths
    for index in range(rounds):
        gc.collect()
        spent = dict.fromkeys(contenders, 0)
        for contender, turn in round_turns(contenders, index, calls, block):
            spent[contender] += await contender.spend(turn)
        for contender in contenders:
            contender.per_round.append(per_call_us(spent[contender], calls))


def _flow_us(auth: httpx.Auth, n: int) -> float:
    """µs for one pass of ``auth``'s sync flow up to the request it sends."""
    request = httpx.Request("GET", URL)
    clock = CLOCK
    started = clock()
    for _ in range(n):
        flow = auth.sync_auth_flow(request)
        next(flow)
        flow.close()
    return (clock() - started) / n / 1000


def micro(contenders: Sequence[Contender], n: int = 20000) -> dict[str, float]:
    """µs of the sync auth flows alone, and of the check mlauth makes on the event loop."""
    found = {}
    for contender in contenders:
        auth = contender.client.auth
        if contender.kind == SYNC and isinstance(auth, (StaticHttpxBearer, HttpxAuth)):
            found[f"{contender.name} sync_auth_flow alone"] = _flow_us(auth, n)
        if contender.kind == ASYNC and isinstance(auth, HttpxAuth):
            fresh = auth._engine.fresh_token  # the only step of the async flow on the loop
            clock = CLOCK
            started = clock()
            for _ in range(n):
                fresh()
            found["mlauth RefreshEngine.fresh_token() alone (on the loop)"] = (
                (clock() - started) / n / 1000
            )
    return found


def report(
    contenders: Sequence[Contender],
    micros: Mapping[str, float],
    rounds: int,
    calls: int,
    block: int,
) -> tuple[str, dict[str, object]]:
    floors = {c.kind: c for c in contenders if c.name == FLOOR}
    rows = []
    found: dict[str, dict[str, object]] = {}
    for contender in contenders:
        figures = AgainstFloor.of(contender.per_round, floors[contender.kind].per_round)
        rows.append([contender.kind, contender.name, *figures.cells()])
        found[f"{contender.kind}: {contender.name}"] = {
            **figures.figures(),
            "us_added": figures.added_us,
            "per_round_us": contender.per_round,
        }
    text = table(
        ["client", "auth", "µs/call (median)", "best round", "x floor", "vs floor", "µs added"],
        rows,
    )
    text += (
        "\n\nµs/call is the CPU time (user + system, this thread) of one client.get() through "
        "a stub transport, httpx's own cost included, less the clock's own cost "
        f"({CLOCK_COST_US:.2f} µs). Every client has trust_env = False. Each kind of client "
        f"is compared with its own floor, `{FLOOR}`: an httpx.Auth whose auth_flow sets one "
        "constant header."
        f"\n{rounds} rounds x {calls} calls per contender, taken in turns of {block} calls, "
        "sync and async contenders interleaved on one event loop.\n"
        + "\n".join(f"- {name}: {us:.2f} µs" for name, us in micros.items())
    )
    data = {
        "rounds": rounds,
        "calls": calls,
        "block": block,
        "contenders": found,
        "micro_us": dict(micros),
    }
    return text, data


async def bench(tmp: Path, rounds: int, calls: int, block: int) -> tuple[str, dict[str, object]]:
    contenders = build(tmp)
    try:
        await check(contenders)
        await measure(contenders, rounds, calls, block)
        micros = micro(contenders)
    finally:
        for contender in contenders:
            if isinstance(contender.client, httpx.AsyncClient):
                await contender.client.aclose()
            else:
                contender.client.close()
    return report(contenders, micros, rounds, calls, block)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.httpx_overhead", description=__doc__
    )
    add_round_arguments(parser, rounds=30, calls=1000)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        text, data = asyncio.run(bench(Path(tmp), args.rounds, args.calls, args.block))
    publish(args.out, "httpx_overhead", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
