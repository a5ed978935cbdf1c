"""Per-request cost of each auth library, client side only.

Every session gets the same stub transport adapter, which answers a canned 200 at once, so a
call measures requests plus the auth layer and nothing else (no socket, no server). The floor
is a session with a static ``Authorization`` header.

Every session, the floor's included, has ``trust_env`` off. With it on, requests reads the
proxy variables (and, for a session without an auth object, ``~/.netrc``) on every call: a
cost of the environment, not of the auth layer, and one that some peers pay and others do
not, depending only on whether they set ``session.auth``.

The contenders run in the same process, in rounds; in each round every contender makes
``--calls`` calls, in turns of ``--block`` calls, the order rotated from round to round and
reversed from turn to turn, so that the machine's drifts in speed (other work, the host under
the VM) hit them all alike. Each contender's figure for a round is compared with the floor's
for the same round.

"static AuthBase + os.stat" is the floor plus one ``os.stat`` of the ``.env``, which mlauth
made per request before issue 19 (to notice a peer's refresh without reading the file; it
now reads a save counter in shared memory, and still stats a ``.env`` mounted alone): what
that system call costs on requests' real path, next to what it costs in a loop of its own.

"mlauth pickup" is the path right after another process refreshed: before each of its calls
(outside the timed part) a new ``.env`` is put in place with ``os.replace`` (a new inode, the
way mlauth and its peers save) and the save counter is bumped, as a peer's save does, so
every timed call notices the change and re-reads the file.

    python -m benchmarks.overhead --rounds 40 --calls 2000 --block 20

``--otel-metrics`` first installs ``mlauth.metrics.otel`` with the OpenTelemetry API alone (no
SDK: the global provider is the API's no-op proxy), as an application that has the extra but
exports nothing: whatever that costs per request shows in the mlauth rows, against a run
without the flag.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from benchmarks.common import (
    AgainstFloor,
    add_out_argument,
    add_round_arguments,
    publish,
    round_turns,
    table,
)
from benchmarks.contenders import (
    LIBRARIES,
    StaticBearer,
    json_token,
    make_session,
    save_json_token,
)
from mlauth.config import DEFAULT_HOSTS
from mlauth.hosts import HostRules
from mlauth.stores.watch import COUNTER_SUFFIX, StampWatch

URL = "https://api.mercadolibre.com/users/me"
# Allowed, but not an origin of plain characters: the host check confirms it with urllib3.
ODD_ORIGIN_URL = "HTTPS://API.mercadolibre.com/users/me"
TOKEN_URL = "https://api.mercadolibre.com/oauth/token"
CLIENT_ID = "1234567890123456"
CLIENT_SECRET = "fake-secret-for-benchmarks-only"
ACCESS = "APP_USR-1234567890123456-010101-fakeaccess00000000000000000000000a-8035443"
ACCESS_B = "APP_USR-1234567890123456-010101-fakeaccess00000000000000000000000b-8035443"
REFRESH = "TG-fakerefresh000000000000001-8035443"
FLOOR = "static AuthBase"
HEADER = "static session header"
PICKUP = "mlauth pickup"
FLOOR_STAT = "static AuthBase + os.stat"

# CPU time of this thread, not wall time: the machine is shared, and wall time would charge
# a call for every time slice another process got in the middle of it. Reading the clock
# costs about a microsecond itself; that cost is measured and taken off every call.
CLOCK = time.thread_time_ns


def _clock_cost_us(samples: int = 20000) -> float:
    clock = CLOCK
    spent = 0
    for _ in range(samples):
        started = clock()
        spent += clock() - started
    return spent / samples / 1000


CLOCK_COST_US = _clock_cost_us()


def per_call_us(spent_ns: int, calls: int) -> float:
    """Mean µs per call from the CPU ns ``calls`` timed calls took, the clock's cost taken off."""
    return spent_ns / calls / 1000 - CLOCK_COST_US


class StubAdapter(BaseAdapter):
    """Answers every request with the same 200 at once, and remembers the last token sent."""

    def __init__(self) -> None:
        super().__init__()
        self.last_authorization: str | bytes | None = None
        self.sent = 0

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        self.sent += 1
        self.last_authorization = request.headers.get("Authorization")
        response = requests.Response()
        response.status_code = 200
        response.reason = "OK"
        response._content = b'{"id":8035443}'
        response.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
        response.encoding = "utf-8"
        response.url = request.url or URL
        response.request = request
        response.connection = self  # type: ignore[assignment]
        return response

    def close(self) -> None:
        pass


class StatBearer(StaticBearer):
    """The floor plus one ``os.stat`` of the ``.env`` per request (mlauth's before issue 19)."""

    def __init__(self, token: str, path: Path) -> None:
        super().__init__(token)
        self.path = str(path)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        os.stat(self.path)
        r.headers["Authorization"] = self.header
        return r


def env_text(access: str, expires_at: float) -> str:
    return "".join(
        f"{key}={value}\n"
        for key, value in {
            "ML_CLIENT_ID": CLIENT_ID,
            "ML_CLIENT_SECRET": CLIENT_SECRET,
            "ML_ACCESS_TOKEN": access,
            "ML_REFRESH_TOKEN": REFRESH,
            "ML_TOKEN_EXPIRES_AT": f"{expires_at:.3f}",
            "ML_TOKEN_REFRESHED_AT": f"{time.time():.3f}",
        }.items()
    )


class Contender:
    """A session, the stub it sends through, and what it must do before each timed call."""

    def __init__(
        self, name: str, session: requests.Session, before: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.session = session
        # No proxy variables, no ~/.netrc: the environment is not what is measured.
        session.trust_env = False
        self.stub = StubAdapter()
        session.mount("https://", self.stub)
        self.before = before
        self.per_round: list[float] = []  # mean µs per call, one value per round

    def call(self) -> None:
        self.session.get(URL)

    def run(self, calls: int) -> float:
        """Mean µs per call over ``calls`` calls, timing only the calls themselves."""
        gc.collect()
        return per_call_us(self.spend(calls), calls)

    def spend(self, calls: int) -> int:
        """CPU ns spent in ``calls`` calls, timing only the calls themselves."""
        clock = CLOCK
        before, call = self.before, self.call
        spent = 0
        for _ in range(calls):
            if before is not None:
                before()
            started = clock()
            call()
            spent += clock() - started
        return spent


def build(tmp: Path) -> list[Contender]:
    far = time.time() + 6 * 3600  # far from expiry: nobody refreshes during the run
    env = tmp / ".env"
    env.write_text(env_text(ACCESS, far))
    token = json_token({"access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 21600}, far)
    floor = requests.Session()
    floor.auth = StaticBearer(ACCESS)
    # The header set on the session, as legacy code does; shown for reference. Without an
    # auth object requests looks for credentials in the URL on every call (one more urlparse),
    # so it costs a little more than the floor. (With trust_env on it would also look for a
    # ~/.netrc entry.)
    plain = requests.Session()
    plain.headers["Authorization"] = f"Bearer {ACCESS}"
    # The floor plus mlauth's stat: how much of mlauth's cost is noticing a peer's refresh.
    stat = requests.Session()
    stat.auth = StatBearer(ACCESS, env)
    contenders = [Contender(FLOOR, floor), Contender(HEADER, plain), Contender(FLOOR_STAT, stat)]
    for library in LIBRARIES:
        store = env
        if library != "mlauth":
            store = tmp / f"{library}.json"
            save_json_token(store, token)
        session = make_session(
            library,
            store,
            token_url=TOKEN_URL,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            margin=300.0,
        )
        contenders.append(Contender(library, session))

    # The pickup: a peer wrote a new .env (alternating tokens) just before each call.
    pickup_env = tmp / "pickup.env"
    pickup_env.write_text(env_text(ACCESS, far))
    templates = [tmp / "pickup.a", tmp / "pickup.b"]
    templates[0].write_text(env_text(ACCESS_B, far))
    templates[1].write_text(env_text(ACCESS, far))
    staging = tmp / "pickup.tmp"
    turn = [0]

    # A peer's save counts itself in the save counter beside the file (mlauth.stores.watch),
    # after the file is in place: that is what tells this process, without a stat.
    counter = StampWatch(lambda: None, f"{pickup_env}{COUNTER_SUFFIX}")

    def rewrite() -> None:
        shutil.copyfile(templates[turn[0] % 2], staging)
        os.replace(staging, pickup_env)
        counter.bump()
        turn[0] += 1

    pickup = requests.Session()
    pickup.auth = make_session(
        "mlauth",
        pickup_env,
        token_url=TOKEN_URL,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        margin=300.0,
    ).auth
    contenders.append(Contender(PICKUP, pickup, rewrite))
    return contenders


def check(contenders: Sequence[Contender]) -> None:
    """Every contender really sends the token (and the pickup the peer's new one)."""
    for contender in contenders:
        if contender.session.trust_env:
            raise SystemExit(f"{contender.name} reads the environment (trust_env is on)")
        seen = set()
        for _ in range(4):
            contender.run(1)
            seen.add(contender.stub.last_authorization)
        expected = {f"Bearer {ACCESS}", f"Bearer {ACCESS_B}"}
        if contender.name != PICKUP:
            expected = {f"Bearer {ACCESS}"}
        if seen != expected:
            raise SystemExit(f"{contender.name} sent {seen}, expected {expected}")


def measure(contenders: Sequence[Contender], rounds: int, calls: int, block: int) -> None:
    """Each round: ``calls`` calls per contender, taken in turns of ``block`` calls
    (:func:`benchmarks.common.round_turns`), so the per-round ratios to the floor compare
    like with like."""
    for contender in contenders:
        contender.run(max(calls // 4, 1))  # warm-up: imports, caches, first-call paths
    for index in range(rounds):
        gc.collect()
        spent = dict.fromkeys(contenders, 0)
        for contender, turn in round_turns(contenders, index, calls, block):
            spent[contender] += contender.spend(turn)
        for contender in contenders:
            contender.per_round.append(per_call_us(spent[contender], calls))


def micro(tmp: Path, contenders: Sequence[Contender], n: int = 20000) -> dict[str, float]:
    """µs per call of the auth objects alone, of the stat mlauth makes on every request, and
    of its host check: from the per-origin cache (every request after an origin's first), and
    uncached (an origin's first request): ``urlsplit``, the rules, then whether urllib3 reads
    the same host, which for an origin of plain characters is one regular expression and for
    any other (here an upper-case scheme and host, which requests itself never sends) is
    urllib3's own ``parse_url``."""
    env = str(tmp / ".env")
    clock = CLOCK
    started = clock()
    for _ in range(n):
        os.stat(env)
    found = {"os.stat(.env)": (clock() - started) / n / 1000}
    rules = HostRules(DEFAULT_HOSTS)
    for label, check_host, url in (
        ("host check, cached (HostRules.allows)", rules.allows, URL),
        (
            "host check, uncached, plain origin (HostRules.allows_uncached)",
            rules.allows_uncached,
            URL,
        ),
        (
            "host check, uncached, urllib3 parse (HostRules.allows_uncached, upper-case origin)",
            rules.allows_uncached,
            ODD_ORIGIN_URL,
        ),
    ):
        assert check_host(url), url
        started = clock()
        for _ in range(n):
            check_host(url)
        found[label] = (clock() - started) / n / 1000
    for contender in contenders:
        auth = contender.session.auth
        if contender.name in (FLOOR, FLOOR_STAT, "mlauth") and callable(auth):
            prepared = requests.Request("GET", URL).prepare()
            started = clock()
            for _ in range(n):
                prepared.hooks["response"].clear()
                auth(prepared)
            found[f"{contender.name} auth(request) alone"] = (clock() - started) / n / 1000
    return found


def report(
    contenders: Sequence[Contender],
    micros: Mapping[str, float],
    rounds: int,
    calls: int,
    block: int,
) -> tuple[str, dict[str, object]]:
    floor = contenders[0]
    rows = []
    data: dict[str, object] = {"rounds": rounds, "calls": calls, "block": block, "contenders": {}}
    for contender in contenders:
        figures = AgainstFloor.of(contender.per_round, floor.per_round)
        rows.append([contender.name, *figures.cells()])
        data["contenders"][contender.name] = {  # type: ignore[index]
            **figures.figures(),
            "per_round_us": contender.per_round,
        }
    data["micro_us"] = dict(micros)
    text = table(
        ["contender", "µs/call (median)", "best round", "x floor", "vs floor", "µs added"], rows
    )
    text += (
        "\n\nµs/call is the CPU time (user + system, this thread) of one session.get() through "
        "the stub adapter, requests' own cost included, less the clock's own cost "
        f"({CLOCK_COST_US:.2f} µs). Every session has trust_env = False (no proxy variables, "
        "no ~/.netrc lookups), the floor's included."
        f"\n{rounds} rounds x {calls} calls per contender, taken in turns of {block} calls; "
        f"floor = `{FLOOR}`: a requests.AuthBase that sets one constant header, the least any "
        "auth layer can do on requests' own path.\n"
        + "\n".join(f"- {name}: {us:.2f} µs" for name, us in micros.items())
    )
    return text, data


def install_otel_metrics() -> None:
    """mlauth's OpenTelemetry metrics on the API's global provider, with no SDK set."""
    from opentelemetry import metrics

    import mlauth.metrics.otel

    mlauth.metrics.otel.install()
    provider = type(metrics.get_meter_provider()).__name__
    if provider != "_ProxyMeterProvider":  # an SDK would measure something else
        raise SystemExit(f"an OpenTelemetry SDK is configured ({provider}): run without it")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    add_round_arguments(parser, rounds=40, calls=2000)
    add_out_argument(parser)
    parser.add_argument(
        "--otel-metrics",
        action="store_true",
        help="install mlauth.metrics.otel (OpenTelemetry API only, no SDK) before measuring",
    )
    args = parser.parse_args(argv)
    if args.otel_metrics:
        install_otel_metrics()
    with tempfile.TemporaryDirectory() as tmp:
        contenders = build(Path(tmp))
        check(contenders)
        measure(contenders, args.rounds, args.calls, args.block)
        micros = micro(Path(tmp), contenders)
    text, data = report(contenders, micros, args.rounds, args.calls, args.block)
    data["otel_metrics"] = args.otel_metrics
    if args.otel_metrics:
        text += "\n\nmlauth.metrics.otel installed, OpenTelemetry API only (no SDK)."
    publish(args.out, "overhead", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
