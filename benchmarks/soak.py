"""Soak: many rotations of 1-second tokens across several processes, for minutes.

    .venv/bin/python benchmarks/soak.py --processes 6 --threads 2 --minutes 10

Starts a loopback FakeMercadoLibre whose tokens live ``--lifetime`` seconds and die at each
rotation, writes a .env for it, and runs ``--processes`` worker processes (this script with
``--worker``), each with ``--threads`` threads calling the API through one MLAuth. Every
``--sample`` seconds each worker reports its call counts, its resident memory (VmRSS) and its
open file descriptors. At the end it prints a summary (and ``--json`` writes it): calls,
failed calls, refreshes, invalid_grant, and per process the first and last RSS and fd counts
with the largest values seen. It exits non-zero if any call failed or any invalid_grant was
served. Memory and fd figures are reported, not judged: see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import requests

from mlauth.integrations.requests_auth import MLAuth
from mlauth.testing import FakeMercadoLibre


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _calls(auth: MLAuth, url: str, threads: int, seconds: float) -> dict[str, object]:
    """Call the API from ``threads`` sessions until the deadline, keeping counts only.

    Nothing is kept per call (no latency list, unlike the demo's worker), so the memory
    figures are mlauth's and requests', not the harness's.
    """
    lock = threading.Lock()
    totals = {"calls": 0, "ok": 0, "failed": 0, "surfaced_401": 0, "401_after_resend": 0}
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def loop() -> None:
        with requests.Session() as session:
            session.auth = auth
            while time.monotonic() < deadline:
                resent = False
                try:
                    response = session.get(f"{url}/users/me", timeout=30)
                    status = response.status_code
                    resent = bool(response.history)
                except requests.RequestException as exc:
                    status = 0
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                with lock:
                    totals["calls"] += 1
                    totals["ok"] += status == 200
                    totals["failed"] += status != 200
                    totals["surfaced_401"] += status == 401
                    # A 401 that survived the re-send: a second rotation overtook it.
                    totals["401_after_resend"] += status == 401 and resent

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return {**totals, "errors": errors}


def worker(env: str, url: str, threads: int, seconds: float, sample: float) -> int:
    lock = threading.Lock()

    def emit(message: dict[str, object]) -> None:
        with lock:
            print(json.dumps(message), flush=True)

    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(sample):  # a sampling period, not a synchronization
            emit({"sample": {"t": time.time(), "rss_kib": _rss_kib(), "fds": _fds()}})

    auth = MLAuth.from_env(env)
    emit({"sample": {"t": time.time(), "rss_kib": _rss_kib(), "fds": _fds()}})
    ticker = threading.Thread(target=sampler, daemon=True)
    ticker.start()
    result = _calls(auth, url, threads, seconds)
    stop.set()
    ticker.join()
    emit({"sample": {"t": time.time(), "rss_kib": _rss_kib(), "fds": _fds()}})
    emit({"result": result})
    return 0


def _collect(proc: subprocess.Popen[str], into: dict[str, object]) -> None:
    samples: list[dict[str, float]] = []
    into["samples"] = samples
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "sample" in message:
            samples.append(message["sample"])
        elif "result" in message:
            into["result"] = message["result"]


def soak(
    processes: int, threads: int, seconds: float, lifetime: float, sample: float
) -> dict[str, object]:
    with (
        FakeMercadoLibre(token_lifetime=lifetime, kill_old_access_on_refresh=True) as fake,
        tempfile.TemporaryDirectory(prefix="mlauth-soak-") as folder,
    ):
        env = os.path.join(folder, ".env")
        fake.write_env(env, expires_at=time.time() + lifetime)
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, __file__, "--worker", "--env", env),
                    *("--url", fake.base_url, "--threads", str(threads)),
                    *("--seconds", str(seconds), "--sample", str(sample)),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        outputs: list[dict[str, object]] = [{} for _ in procs]
        readers = [
            threading.Thread(target=_collect, args=(p, out))
            for p, out in zip(procs, outputs, strict=True)
        ]
        for reader in readers:
            reader.start()
        for proc in procs:
            proc.wait()
        for reader in readers:
            reader.join()
        stats = fake.stats()
        leftovers = sorted(os.listdir(folder))
    per_process: list[dict[str, object]] = []
    calls = failed = 0
    for out in outputs:
        result = out.get("result")
        samples = out.get("samples") or []
        assert isinstance(samples, list)
        if not isinstance(result, dict) or not samples:
            per_process.append({"crashed": True})
            failed += 1
            continue
        calls += int(result["calls"])
        failed += int(result["failed"])
        rss = [int(s["rss_kib"]) for s in samples]
        fds = [int(s["fds"]) for s in samples]
        # After warm-up (the first quarter), memory should stay level: report the drift.
        settled = rss[len(rss) // 4 :]
        per_process.append(
            {
                "calls": result["calls"],
                "failed": result["failed"],
                "surfaced_401": result["surfaced_401"],
                "401_after_resend": result["401_after_resend"],
                "errors": result["errors"],
                "rss_kib_first": rss[0],
                "rss_kib_after_warmup": settled[0],
                "rss_kib_last": rss[-1],
                "rss_kib_max": max(rss),
                "fds_first": fds[0],
                "fds_last": fds[-1],
                "fds_max": max(fds),
                "samples": len(samples),
            }
        )
    return {
        "processes": processes,
        "threads": threads,
        "seconds": seconds,
        "token_lifetime": lifetime,
        "calls": calls,
        "failed": failed,
        "refreshes": stats["refreshes"],
        "token_requests": stats["token_requests"],
        "invalid_grant": stats["invalid_grant"],
        "api_401": stats["api_401"],
        "files_left": leftovers,
        "per_process": per_process,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    parser.add_argument("--lifetime", type=float, default=1.0)
    parser.add_argument("--sample", type=float, default=5.0)
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--env", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if args.worker:
        return worker(args.env, args.url, args.threads, seconds, args.sample)
    summary = soak(args.processes, args.threads, seconds, args.lifetime, args.sample)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0 if summary["failed"] == 0 and summary["invalid_grant"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
