"""What the benchmark scripts share: tables, percentiles, the machine, the ready/go start."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO

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


# -- workers: start together, report one JSON line --------------------------------------


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
