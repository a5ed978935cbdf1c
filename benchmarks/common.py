"""What the benchmark scripts share: tables, percentiles, the machine, the ready/go start;
what the two per-request overhead benchmarks (:mod:`benchmarks.overhead`,
:mod:`benchmarks.httpx_overhead`) share: the rounds' schedule, the figures against a floor;
and what the two expiry storms (:mod:`benchmarks.storm`, :mod:`benchmarks.async_storm`) share:
their command line, their run record and its table row."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, TypedDict, TypeVar

from mlauth.tokens import MAX_MARGIN_SHARE

RESULTS = Path(__file__).resolve().parent / "results"

PEER_PACKAGES = (
    "mlauth",
    "requests",
    "requests-oauthlib",
    "oauthlib",
    "Authlib",
    "google-auth",
    "redis",
)

# The fake MercadoLibre is plain http on loopback; both OAuth libraries refuse http token
# endpoints unless told otherwise. Set only in the peers' worker processes.
INSECURE_LOOPBACK_ENV = {"OAUTHLIB_INSECURE_TRANSPORT": "1", "AUTHLIB_INSECURE_TRANSPORT": "1"}


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def versions() -> dict[str, str]:
    found = {}
    for name in PEER_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    # The storm's Redis row runs Debian's redis-server: "Redis server v=7.0.15 sha=...".
    server = shutil.which("redis-server")
    if server is not None:
        try:
            banner = subprocess.run(
                [server, "--version"], capture_output=True, text=True, timeout=10
            ).stdout
            found["redis-server"] = banner.split("v=", 1)[1].split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            found["redis-server"] = "unknown"
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    """Where and when the figures were taken: cores, CPU, Python, versions, load."""
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
    }


def save(out: Path, name: str, text: str, data: object) -> None:
    """Write ``name``.md (the printed table) and ``name``.json (the raw figures)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")


def publish(out: Path, name: str, text: str, data: Mapping[str, object]) -> None:
    """The end of every benchmark: print the table, save it and the figures with the machine.

    The machine (its load above all) is read after the run, so it describes the run's end.
    """
    print(text)
    save(out, name, text, {**data, "machine": machine()})


# -- per-request overhead: contenders in interleaved turns, compared with a floor --------

ContenderT = TypeVar("ContenderT")


def add_round_arguments(parser: argparse.ArgumentParser, *, rounds: int, calls: int) -> None:
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--calls", type=int, default=calls, help="calls per contender per round")
    parser.add_argument(
        "--block",
        type=int,
        default=20,
        help="calls a contender makes before the next one takes its turn, within a round",
    )


def round_turns(
    contenders: Sequence[ContenderT], index: int, calls: int, block: int
) -> Iterator[tuple[ContenderT, int]]:
    """Round ``index``'s turns in the order they are taken: (contender, calls in the turn).

    The machine's speed drifts over seconds (other work, the host under the VM), by more
    than the differences measured; with short turns every contender's calls of a round are
    spread over the same stretch of time. The order is rotated from round to round and
    reversed in odd rounds, so nobody always goes first.
    """
    shift = index % len(contenders)
    order = list(contenders[shift:]) + list(contenders[:shift])
    if index % 2:
        order.reverse()
    done = 0
    while done < calls:
        turn = min(block, calls - done)
        for contender in order:
            yield contender, turn
        order.reverse()  # nobody always goes first after the same neighbour
        done += turn


@dataclasses.dataclass(frozen=True)
class AgainstFloor:
    """One contender's per-round µs per call, summed up against its floor's."""

    median_us: float
    min_us: float
    ratio: float
    added_us: float

    @classmethod
    def of(cls, per_round: Sequence[float], floor: Sequence[float]) -> AgainstFloor:
        us = median(per_round)
        # Ratio within each round, then the median: both ran side by side, under the same load.
        ratio = median([c / f for c, f in zip(per_round, floor, strict=True)])
        return cls(us, min(per_round), ratio, us - median(floor))

    def cells(self) -> list[object]:
        """µs/call (median), best round, x floor, vs floor, µs added."""
        return [
            f"{self.median_us:.1f}",
            f"{self.min_us:.1f}",
            f"{self.ratio:.3f}",
            f"{(self.ratio - 1) * 100:+.1f}%",
            f"{self.added_us:+.1f}",
        ]

    def figures(self) -> dict[str, object]:
        return {"median_us": self.median_us, "min_us": self.min_us, "ratio_to_floor": self.ratio}


# -- workers: start together, report one JSON line --------------------------------------


def worker_parser(
    prog: str, libraries: Sequence[str], *, per_process: str, per_process_default: int
) -> argparse.ArgumentParser:
    """A storm worker's options, as its parent passes them; ``per_process``: threads, tasks.

    The client secret is not among them: it comes in the environment, since command lines
    are visible to every user (ps).
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("library", choices=libraries)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument(f"--{per_process}", type=int, default=per_process_default)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--margin", type=float, default=1.0)
    return parser


def wait_for_go(stdin: IO[str] = sys.stdin) -> None:
    """Worker side: say ready, then block until the parent says go (or closes stdin)."""
    print(json.dumps({"ready": os.getpid()}), flush=True)
    stdin.readline()


def start_workers(
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 300.0,
) -> list[subprocess.Popen[str]]:
    """Start every worker and return once each has printed its ready line.

    Imports take a while and 64 processes on 2 cores start over several seconds: the
    measured window opens only when all of them are ready, with :func:`go`.
    """
    full_env = {**os.environ, **(env or {})}
    procs = [
        subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        for command in commands
    ]
    deadline = time.monotonic() + ready_timeout
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the worker is ready (or dies: "")
        if not line or "ready" not in json.loads(line) or time.monotonic() > deadline:
            for other in procs:
                other.kill()
            raise RuntimeError(f"a worker did not start: {line!r}, exit {proc.wait()}")
    return procs


def go(procs: Sequence[subprocess.Popen[str]]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def results_of(procs: Sequence[subprocess.Popen[str]], timeout: float) -> list[dict[str, object]]:
    """Every worker's last stdout line as JSON; RuntimeError naming a worker that failed."""
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {proc.pid} exited {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def total(results: Sequence[Mapping[str, object]], key: str) -> int:
    return sum(int(str(r[key])) for r in results)


def run_workers(
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str],
    before_go: Callable[[], None],
    timeout: float,
) -> list[dict[str, object]]:
    """Start the workers, run ``before_go`` once all are ready, let them go, collect results.

    ``before_go`` writes the token the workers load after go: written earlier, it would age
    (or expire) while 64 processes start. A worker still running when this fails is killed.
    """
    procs = start_workers(commands, env=env)
    try:
        before_go()
        go(procs)
        return results_of(procs, timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- expiry storms: the command line, one run's record, its table row ------------------


def storm_parser(
    prog: str,
    description: str | None,
    *,
    libraries: Sequence[str],
    per_process: str,
    per_process_default: int,
    per_process_help: str | None = None,
) -> argparse.ArgumentParser:
    """The storms' options; ``per_process`` names what runs the calls (threads, tasks)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument(
        f"--{per_process}", type=int, default=per_process_default, help=per_process_help
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--token-lifetime", type=float, default=4.0)
    parser.add_argument(
        "--libraries",
        default=",".join(libraries),
        help=f"comma-separated, from: {', '.join(libraries)} (default: all)",
    )
    add_out_argument(parser)
    return parser


def chosen_libraries(
    parser: argparse.ArgumentParser,
    spec: str,
    offered: Sequence[str],
    also: Collection[str] = (),
) -> list[str]:
    """The libraries named in ``--libraries``; a parser error for any not ``offered``.

    ``also``: accepted without being offered (the storm's STATIC).
    """
    libraries = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(libraries) - {*offered, *also})
    if unknown:
        parser.error(f"unknown libraries {unknown}; pick from: {', '.join(offered)}")
    return libraries


STORM_COLUMNS = (
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
)


class CallerCounts(TypedDict):
    """What the workers of one storm saw, summed over them: :class:`StormRun`'s own fields."""

    calls: int
    ok: int
    failed: int
    surfaced_401: int
    absorbed_401: int
    errors: dict[str, int]
    stranded: int
    first_failure_s: float | None
    error_samples: list[str]
    latencies_ms: list[float]


def joined(results: Sequence[Mapping[str, object]], key: str) -> list[float]:
    """Every worker's list under ``key``, end to end."""
    return [float(x) for r in results for x in r[key]]  # type: ignore[attr-defined]


def caller_counts(results: Sequence[Mapping[str, object]]) -> CallerCounts:
    """The workers' JSON lines (sync or async worker alike) summed into one storm's counts."""
    errors: dict[str, int] = {}
    for result in results:
        for name, count in result["errors"].items():  # type: ignore[attr-defined]
            errors[name] = errors.get(name, 0) + int(count)
    return CallerCounts(
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
        latencies_ms=joined(results, "latencies_ms"),
    )


@dataclasses.dataclass
class StormRun:
    """What one library did in one storm, sync or async: the callers' counts and the server's.

    The fields both storms record; :class:`benchmarks.storm.Run` and
    :class:`benchmarks.async_storm.AsyncRun` add how the calls ran and what only they count.
    """

    library: str
    processes: int
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

    @property
    def label(self) -> str:
        """The library's name in the table."""
        return self.library

    @property
    def margin(self) -> float:
        """How long before expiry the library replaces a token: mlauth's share for short ones."""
        return self.lifetime * MAX_MARGIN_SHARE

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
        """The JSON record: every field but the raw latencies, which give their percentiles."""
        data = dataclasses.asdict(self)
        del data["latencies_ms"]
        data.update(
            p50_ms=self.p(0.5),
            p99_ms=self.p(0.99),
            expected_refreshes=self.expected_refreshes,
            double_refreshes=self.double_refreshes,
        )
        return data

    def row(self) -> list[object]:
        """The run's row under :data:`STORM_COLUMNS`."""
        return [
            self.label,
            self.calls,
            self.failed,
            f"{self.server['refreshes']} / {self.expected_refreshes}",
            self.double_refreshes,
            self.server["invalid_grant"],
            self.surfaced_401,
            self.absorbed_401,
            f"{self.p(0.5):.2f}",
            f"{self.p(0.99):.2f}",
            "-" if self.first_failure_s is None else f"{self.first_failure_s:.1f} s",
            f"{self.stranded} of {self.processes}",
            ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "-",
        ]


def first_errors(runs: Sequence[StormRun]) -> str:
    """The first error each library raised to its caller, as a paragraph ("" for none)."""
    samples = [f"- {run.label}: {s}" for run in runs for s in run.error_samples[:1]]
    if not samples:
        return ""
    return "\n\nFirst error seen per library:\n" + "\n".join(samples)
