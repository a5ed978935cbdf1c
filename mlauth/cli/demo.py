"""The demo: several processes x threads share one ``.env`` against a fake MercadoLibre.

``python -m mlauth.cli.demo`` starts :class:`~mlauth.testing.FakeMercadoLibre` on loopback with
short-lived tokens that die at each rotation, writes a ``.env`` for it in a temporary folder,
and starts worker processes (this same module with ``--worker``) that hammer the API through
``MLAuth.from_env``. It prints a live line a second and a summary, and exits non-zero if any
call failed or any refresh token was spent twice. The tests run the same workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import requests

from mlauth.errors import MLAuthError
from mlauth.integrations.requests_auth import MLAuth
from mlauth.stores.envfile import read_env_file
from mlauth.stores.lock import ProcessLock
from mlauth.stores.private import write_replacing
from mlauth.stores.watch import COUNTER_SUFFIX
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import MAX_MARGIN_SHARE

__all__ = ["main", "run_worker"]


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_worker(
    env: str,
    url: str,
    *,
    threads: int,
    seconds: float,
    requests_per_thread: int | None = None,
    report: Callable[[dict[str, int]], None] | None = None,
) -> dict[str, object]:
    """One process of the demo: ``threads`` sessions sharing one MLAuth, until the deadline.

    ``report`` gets the running totals once a second (the demo prints them live).
    """
    auth = MLAuth.from_env(env)
    lock = threading.Lock()
    totals = {"calls": 0, "ok": 0, "failed": 0, "surfaced_401": 0, "absorbed_401": 0}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    finished = threading.Event()

    def loop() -> None:
        with requests.Session() as session:
            session.auth = auth
            run(session)

    def run(session: requests.Session) -> None:
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

    def reporter() -> None:
        while not finished.wait(1.0):  # a period for the live line, not a synchronization
            with lock:
                snapshot = dict(totals)
            if report is not None:
                report(snapshot)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    ticker = threading.Thread(target=reporter, daemon=True)
    ticker.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    finished.set()
    ticker.join()
    return {
        **totals,
        "pid": os.getpid(),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "errors": errors[:5],
        "finished_at": time.time(),
    }


def total(results: Iterable[Mapping[str, object]], key: str) -> int:
    """The sum of one counter over the workers' results."""
    return sum(int(str(result[key])) for result in results)


class _Worker:
    """A worker process and the latest totals it reported on its stdout."""

    def __init__(self, env: str, url: str, threads: int, seconds: float) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 (our own module, run by this interpreter)
            [
                *(sys.executable, "-m", "mlauth.cli.demo", "--worker", "--env", env, "--url", url),
                *("--threads", str(threads), "--seconds", str(seconds)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.latest: dict[str, object] = {"calls": 0, "failed": 0, "absorbed_401": 0}
        self.result: dict[str, object] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not ours (a stray print); keep draining the pipe
            if "progress" in message:
                self.latest = message["progress"]
            else:
                self.latest = self.result = message

    def wait(self) -> dict[str, object] | None:
        self.proc.wait()
        self._reader.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.result if self.proc.returncode == 0 else None


def _watch(workers: list[_Worker], fake: FakeMercadoLibre) -> list[dict[str, object] | None]:
    """Print a live line a second until every worker is done; return their results."""
    started = time.monotonic()
    while any(w.proc.poll() is None for w in workers):
        time.sleep(1.0)  # the live line's period, not a synchronization
        latest = [w.latest for w in workers]
        s = fake.stats()
        print(
            f"  {time.monotonic() - started:5.1f}s  calls={total(latest, 'calls'):<6} "
            f"failed={total(latest, 'failed'):<3} refreshes={s['refreshes']:<3} "
            f"401s absorbed={total(latest, 'absorbed_401'):<4} "
            f"invalid_grant={s['invalid_grant']}",
            flush=True,
        )
    return [w.wait() for w in workers]


def run_demo(processes: int, threads: int, seconds: float, lifetime: float) -> int:
    with FakeMercadoLibre(token_lifetime=lifetime) as fake, tempfile.TemporaryDirectory() as tmp:
        env = os.path.join(tmp, ".env")
        issued = time.time()
        # With the issue time known, the margin scales to these short tokens from the start.
        fake.write_env(
            env, expires_at=issued + lifetime, extra={"ML_TOKEN_REFRESHED_AT": str(issued)}
        )
        print(
            f"fake MercadoLibre at {fake.base_url}: tokens live {lifetime:g}s and the old one "
            f"dies at each rotation; {processes} processes x {threads} threads for {seconds:g}s"
        )
        workers = [_Worker(env, fake.base_url, threads, seconds) for _ in range(processes)]
        try:
            results = _watch(workers, fake)
        finally:
            for worker in workers:  # on Ctrl-C or an error, leave no worker behind
                if worker.proc.poll() is None:
                    worker.proc.kill()
        stats = fake.stats()
    ok = [r for r in results if r is not None]
    crashed = len(results) - len(ok)
    failed = total(ok, "failed")
    expected_gap = lifetime * (1 - MAX_MARGIN_SHARE)
    print(
        f"\ncalls={total(ok, 'calls')} failed={failed} crashed_processes={crashed} "
        f"refreshes={stats['refreshes']} (one per token: each lives {lifetime:g}s and is "
        f"renewed {lifetime * MAX_MARGIN_SHARE:g}s early, about {seconds / expected_gap:.1f} "
        f"in {seconds:g}s) 401s absorbed={total(ok, 'absorbed_401')} "
        f"invalid_grant={stats['invalid_grant']}"
    )
    for r in ok:
        for error in r["errors"]:  # type: ignore[attr-defined]
            print(f"  pid {r['pid']}: {error}")
    good = failed == 0 and crashed == 0 and stats["invalid_grant"] == 0
    print("OK: no call failed, every refresh token was spent once." if good else "FAILED")
    return 0 if good else 1


SERVE_MARKER = "# written by `mlauth demo --serve` for its fake server; safe to delete"
# How long a stopping server waits for a process that is refreshing its .env to finish.
LOCK_WAIT = 5.0


def serve(env: str, port: int, lifetime: float) -> int:
    """Run a fake MercadoLibre on loopback until Ctrl-C or SIGTERM, with a ``.env`` for it.

    For trying the command line and ``mlauth run`` by hand. The ``.env`` is written whole
    (and atomically, so a command started meanwhile never reads half of it); an existing
    file is replaced only if this function wrote it, so a real ``.env`` is never lost.
    """
    if os.path.exists(env):
        with open(env, encoding="utf-8", errors="replace") as handle:
            if handle.readline().rstrip("\n") != SERVE_MARKER:
                print(
                    f"mlauth demo --serve: {env} exists and was not written by the demo; "
                    "give another --env path (the demo never overwrites a real .env)",
                    file=sys.stderr,
                )
                return 1
    _take_stop_signals()
    try:
        fake = FakeMercadoLibre(port=port, token_lifetime=lifetime).start()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        # At once and non-zero: a script waiting for the .env to appear must not wait for ever.
        print(
            f"mlauth demo --serve: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
            "stop what uses the port or give another --port (--port 0 picks a free one)",
            file=sys.stderr,
        )
        return 1
    with fake:
        started = time.monotonic()
        issued = time.time()
        # Drafted in a folder of our own, then written beside the .env under a random name
        # and renamed over it: no name someone else could predict (and plant a link at).
        with tempfile.TemporaryDirectory(prefix="mlauth-demo-") as private:
            draft = os.path.join(private, ".env")
            fake.write_env(
                draft,
                expires_at=issued + lifetime,
                extra={
                    "ML_TOKEN_REFRESHED_AT": str(issued),
                    "ML_AUTH_URL": fake.base_url,
                    "ML_REDIRECT_URI": "https://example.test/callback",
                },
            )
            with open(draft, encoding="utf-8") as handle:
                body = handle.read()
        write_replacing(os.path.abspath(env), f"{SERVE_MARKER}\n{body}".encode())
        print(
            f"fake MercadoLibre at {fake.base_url} (tokens live {lifetime:g}s); {env} is "
            "written for it. Ctrl-C to stop; it then prints what it served.",
            flush=True,
        )
        _wait_for_stop()
        stats = fake.stats()
    left = _remove_own_files(env, fake.token_url)
    print(
        f"fake MercadoLibre stopped after {time.monotonic() - started:.0f}s: "
        f"{_served(stats)}" + (f"; {left}" if left else ""),
        flush=True,
    )
    return 0


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _take_stop_signals() -> None:
    """Block Ctrl-C and SIGTERM in every thread, for :func:`_wait_for_stop` to take them.

    Not a handler: Python runs handlers in the main thread between any two bytecodes, so a
    second signal (Ctrl-C, then a script's trap sending SIGTERM) can land inside the first
    one's handler, and one that sets an Event deadlocks there on the Event's own lock. The
    server's threads, started after this, inherit the mask. Default actions, not ignored:
    a shell starts a background command with Ctrl-C ignored, and Ctrl-C must stop it too.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def _wait_for_stop() -> None:
    signal.sigwait(STOP_SIGNALS)
    # Stopping: another Ctrl-C, or the kill of a script's trap right after it, must not cut
    # the clean-up short and leave the files half removed.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _served(stats: Mapping[str, int]) -> str:
    """The server's counters, for the line it prints as it stops."""
    return (
        f"calls={stats['api_calls']} ({stats['api_ok']} ok, {stats['api_401']} answered 401) "
        f"refreshes={stats['refreshes']} invalid_grant={stats['invalid_grant']} "
        f"logins={stats['code_exchanges']}"
    )


def _remove_own_files(env: str, token_url: str) -> str | None:
    """Delete the ``.env`` this server wrote and what mlauth made beside it; what was left.

    Gone with its server: a later walkthrough must wait for the next server's file, not find
    this one, and the lock, journal and marker belong to a store that no longer has a server.
    Only if the file is still this server's: another ``--serve`` may have taken the path
    over, and its files are live. The lock file goes too, which a live store must never
    lose (two processes would lock two inodes under one name); here the store dies first:
    under the lock, the ``.env`` is removed before anything else, so a process that still
    gets the old inode's lock finds no tokens to spend.
    """
    try:
        with open(env, encoding="utf-8", errors="replace") as handle:
            ours = handle.readline().rstrip("\n") == SERVE_MARKER
        ours = ours and read_env_file(env).get("ML_TOKEN_URL") == token_url
    except (OSError, MLAuthError):
        return None  # removed already, or not a file we can read: not ours to touch
    if not ours:
        return f"{env} now belongs to another server: left as it is"
    real = os.path.realpath(env)
    try:
        with ProcessLock(f"{real}.lock").hold(LOCK_WAIT):
            counter = f"{real}{COUNTER_SUFFIX}"
            for path in (env, f"{real}.journal", f"{real}.reauth", counter, f"{real}.lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    except MLAuthError as exc:  # a process refreshing (against a server now gone) holds it
        with contextlib.suppress(OSError):
            os.remove(env)
        return f"left the files beside {env}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlauth.cli.demo", description=__doc__)
    parser.add_argument("--processes", type=int, default=6, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="per process (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=15.0, help="(default: %(default)g)")
    parser.add_argument(
        "--token-lifetime", type=float, default=3.0, help="in seconds (default: %(default)g)"
    )
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
        print_lock = threading.Lock()

        def emit(message: Mapping[str, object]) -> None:
            with print_lock:
                print(json.dumps(message), flush=True)

        result = run_worker(
            args.env,
            args.url,
            threads=args.threads,
            seconds=args.seconds,
            requests_per_thread=args.requests,
            report=lambda totals: emit({"progress": totals}),
        )
        emit(result)
        return 0
    return run_demo(args.processes, args.threads, args.seconds, args.token_lifetime)


if __name__ == "__main__":
    sys.exit(main())
