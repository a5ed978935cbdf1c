"""The demo: several processes x threads share one ``.env`` against a fake MercadoLibre.

``python -m mlauth.demo`` starts :class:`~mlauth.testing.FakeMercadoLibre` on loopback with
short-lived tokens that die at each rotation, writes a ``.env`` for it in a temporary folder,
and starts worker processes (this same module with ``--worker``) that hammer the API through
``MLAuth.from_env``. It prints a live line a second and a summary, and exits non-zero if any
call failed or any refresh token was spent twice. The tests run the same workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import requests

from .auth import MLAuth
from .testing import FakeMercadoLibre
from .token import MAX_MARGIN_SHARE

__all__ = ["main", "run_worker"]


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_worker(
    env: str, url: str, *, threads: int, seconds: float, requests_per_thread: int | None
) -> dict[str, object]:
    """One process of the demo: ``threads`` sessions sharing one MLAuth, until the deadline."""
    auth = MLAuth.from_env(env)
    lock = threading.Lock()
    totals = {"calls": 0, "ok": 0, "failed": 0, "surfaced_401": 0, "absorbed_401": 0}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def loop() -> None:
        session = requests.Session()
        session.auth = auth
        done = 0
        while time.monotonic() < deadline and (
            requests_per_thread is None or done < requests_per_thread
        ):
            done += 1
            started = time.perf_counter()
            try:
                response = session.get(f"{url}/users/me", timeout=30)
                status: int | str = response.status_code
                absorbed = sum(1 for r in response.history if r.status_code == 401)
            except requests.RequestException as exc:
                status, absorbed = type(exc).__name__, 0
                errors.append(str(exc)[:300])
            elapsed = time.perf_counter() - started
            with lock:
                totals["calls"] += 1
                totals["absorbed_401"] += absorbed
                latencies.append(elapsed)
                if status == 200:
                    totals["ok"] += 1
                else:
                    totals["failed"] += 1
                    totals["surfaced_401"] += status == 401

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        **totals,
        "pid": os.getpid(),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "errors": errors[:5],
        "finished_at": time.time(),
    }


def _spawn(env: str, url: str, threads: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 (our own module, run by this interpreter)
        [
            *(sys.executable, "-m", "mlauth.demo", "--worker", "--env", env, "--url", url),
            *("--threads", str(threads), "--seconds", str(seconds)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def run_demo(processes: int, threads: int, seconds: float, lifetime: float) -> int:
    with FakeMercadoLibre(token_lifetime=lifetime) as fake, tempfile.TemporaryDirectory() as tmp:
        env = os.path.join(tmp, ".env")
        fake.write_env(env, expires_at=time.time() + lifetime)
        print(
            f"fake MercadoLibre at {fake.base_url}: tokens live {lifetime:g}s and the old one "
            f"dies at each rotation; {processes} processes x {threads} threads for {seconds:g}s"
        )
        procs = [_spawn(env, fake.base_url, threads, seconds) for _ in range(processes)]
        started = time.monotonic()
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)  # the live line's period, not a synchronization
            s = fake.stats()
            print(
                f"  {time.monotonic() - started:5.1f}s  calls={s['api_calls']:<6} "
                f"refreshes={s['refreshes']:<3} 401s absorbed={s['api_401']:<4} "
                f"invalid_grant={s['invalid_grant']}",
                flush=True,
            )
        results = []
        for proc in procs:
            out, _ = proc.communicate()
            lines = out.strip().splitlines()
            results.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else None)
        stats = fake.stats()
    crashed = sum(r is None for r in results)
    expected_gap = lifetime * (1 - MAX_MARGIN_SHARE)
    ok = [r for r in results if r is not None]
    failed = sum(int(r["failed"]) for r in ok)
    calls = sum(int(r["calls"]) for r in ok)
    print(
        f"\ncalls={calls} failed={failed} crashed_processes={crashed} "
        f"refreshes={stats['refreshes']} (one per token: each lives {lifetime:g}s and is "
        f"renewed {lifetime * MAX_MARGIN_SHARE:g}s early, about {seconds / expected_gap:.1f} "
        f"in {seconds:g}s) "
        f"401s absorbed={sum(int(r['absorbed_401']) for r in ok)} "
        f"invalid_grant={stats['invalid_grant']}"
    )
    for r in ok:
        for error in r["errors"]:
            print(f"  pid {r['pid']}: {error}")
    good = failed == 0 and crashed == 0 and stats["invalid_grant"] == 0
    print("OK: no call failed, every refresh token was spent once." if good else "FAILED")
    return 0 if good else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlauth.demo", description=__doc__)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--token-lifetime", type=float, default=3.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--env", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.log_level:
        logging.basicConfig(
            level=args.log_level, stream=sys.stderr, format="%(created).6f %(message)s"
        )
    if args.worker:
        result = run_worker(
            args.env,
            args.url,
            threads=args.threads,
            seconds=args.seconds,
            requests_per_thread=args.requests,
        )
        print(json.dumps(result), flush=True)
        return 0
    return run_demo(args.processes, args.threads, args.seconds, args.token_lifetime)


if __name__ == "__main__":
    sys.exit(main())
