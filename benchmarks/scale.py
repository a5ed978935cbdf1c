"""Scale: how mlauth's cost grows with the number of processes sharing one token.

For each N in ``--processes`` (default 1, 2, 4, 8, 16, 32, 64): N single-threaded mlauth
workers share one ``.env`` against the fake MercadoLibre with short tokens, and then, as the
floor, N workers with a constant header and a token that outlives the run. Per N: throughput
(mlauth and floor), refreshes per token (floor: 1, and no token refreshed twice), time spent
waiting for the refresh lock or for its holder to let go of it (from mlauth's own debug
records, see :mod:`benchmarks.worker`), and the p99 latency added to the calls an expiry
touched (the refreshing call, calls that waited, calls whose 401 was absorbed) over the
run's median call; its floor is one token round trip.

Writes one PNG per curve next to the table.

    python -m benchmarks.scale --processes 1,2,4,8,16,32,64 --seconds 8 --token-lifetime 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, percentile, save, table
from benchmarks.contenders import STATIC
from benchmarks.storm import Run, run_library, token_round_trip_ms
from mlauth.stores.envfile import EnvFileStore
from mlauth.testing import FakeMercadoLibre

PLOTS = {
    "throughput": "scale_throughput.png",
    "refreshes": "scale_refreshes.png",
    "lock_wait": "scale_lock_wait.png",
    "expiry_latency": "scale_expiry_latency.png",
}


def refresh_anatomy(fake: FakeMercadoLibre, folder: Path, samples: int = 20) -> dict[str, float]:
    """Median ms of each store step a refresh makes besides the POST, on this disk.

    A refresh under mlauth is: take the lock, re-read the .env, check the folder is writable
    (a temp file written and fsynced, so a full disk is found before the token is spent), the
    POST, then the atomic save (temp file, fsync, rename, fsync of the folder).
    """
    env = folder / ".env"
    fake.write_env(env)
    store = EnvFileStore(env)
    tokens, _ = store.load()
    steps: dict[str, list[float]] = {
        "lock + release": [],
        "re-read": [],
        "writable check": [],
        "save": [],
    }
    for _ in range(samples):
        started = time.perf_counter()
        with store.lock(10.0):
            pass
        steps["lock + release"].append(time.perf_counter() - started)
        started = time.perf_counter()
        store.load()
        steps["re-read"].append(time.perf_counter() - started)
        started = time.perf_counter()
        store.check_writable()
        steps["writable check"].append(time.perf_counter() - started)
        started = time.perf_counter()
        store.save(tokens)
        steps["save"].append(time.perf_counter() - started)
    return {name: percentile(times, 0.5) * 1000 for name, times in steps.items()}


def figures(run: Run, floor: Run) -> dict[str, Any]:
    median = percentile(run.latencies_ms, 0.5)
    tokens = max(run.expected_refreshes, 1)
    return {
        "processes": run.processes,
        "calls_per_s": run.ok / run.seconds,
        "floor_calls_per_s": floor.ok / floor.seconds,
        "failed": run.failed,
        "errors": ", ".join(f"{k} {v}" for k, v in sorted(run.errors.items()))
        + (f"; 401 {run.surfaced_401}" if run.surfaced_401 else ""),
        "error_samples": run.error_samples,
        "refreshes": run.server["refreshes"],
        "expected_refreshes": run.expected_refreshes,
        "refreshes_per_token": run.server["refreshes"] / tokens,
        "double_refreshes": run.double_refreshes,
        "invalid_grant": run.server["invalid_grant"],
        "lock_waits": len(run.lock_waits_ms),
        "lock_wait_ms_per_refresh": sum(run.lock_waits_ms) / max(run.server["refreshes"], 1),
        "lock_wait_p99_ms": percentile(run.lock_waits_ms, 0.99),
        "touched_calls": len(run.touched_ms),
        "added_p99_ms": max(percentile(run.touched_ms, 0.99) - median, 0.0),
        "refreshing_call_p50_ms": percentile(run.refreshing_ms, 0.5),
        "p50_ms": median,
        "p99_ms": run.p(0.99),
        "floor_p99_ms": floor.p(0.99),
    }


def plot(rows: Sequence[dict[str, Any]], rtt_ms: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ns = [int(r["processes"]) for r in rows]
    curves = {
        "throughput": (
            ("API calls per second, all processes", "calls/s", False),
            [("mlauth", "calls_per_s"), ("floor: constant header, no expiry", "floor_calls_per_s")],
            None,
        ),
        "refreshes": (
            ("Refreshes per token (1 = each token refreshed once)", "refreshes per token", False),
            [("mlauth", "refreshes_per_token")],
            ("floor: 1", 1.0),
        ),
        "lock_wait": (
            ("Time waited for the refresh lock", "ms (log scale)", True),
            [
                ("all processes' waits, per refresh", "lock_wait_ms_per_refresh"),
                ("p99 of one wait", "lock_wait_p99_ms"),
            ],
            None,
        ),
        "expiry_latency": (
            ("Latency added at an expiry (p99 of touched calls - median)", "ms (log scale)", True),
            [("mlauth", "added_p99_ms")],
            (f"floor: one token round trip ({rtt_ms:.2f} ms)", rtt_ms),
        ),
    }
    for name, ((title, ylabel, log), series, floor) in curves.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, key in series:
            ax.plot(ns, [r[key] for r in rows], marker="o", label=label)
        if floor is not None:
            ax.axhline(floor[1], color="grey", linestyle="--", label=floor[0])
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("processes sharing one token")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("symlog", linthresh=0.1)  # from 0 ms to seconds in one view
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / PLOTS[name])
        plt.close(fig)


def report(
    rows: Sequence[dict[str, Any]],
    rtt_ms: float,
    anatomy: dict[str, float],
    seconds: float,
    lifetime: float,
) -> str:
    text = table(
        [
            "processes",
            "calls/s",
            "floor calls/s",
            "failed",
            "refreshes / floor",
            "double refreshes",
            "invalid_grant",
            "lock waits",
            "lock wait ms per refresh",
            "p99 one wait ms",
            "p99 added at expiry ms",
            "refreshing call p50 ms",
            "p99 ms",
            "floor p99 ms",
        ],
        [
            [
                int(r["processes"]),
                f"{r['calls_per_s']:.0f}",
                f"{r['floor_calls_per_s']:.0f}",
                f"{int(r['failed'])}" + (f" ({r['errors'].lstrip('; ')})" if r["errors"] else ""),
                f"{int(r['refreshes'])} / {int(r['expected_refreshes'])}",
                int(r["double_refreshes"]),
                int(r["invalid_grant"]),
                int(r["lock_waits"]),
                f"{r['lock_wait_ms_per_refresh']:.1f}",
                f"{r['lock_wait_p99_ms']:.1f}",
                f"{r['added_p99_ms']:.1f}",
                f"{r['refreshing_call_p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['floor_p99_ms']:.1f}",
            ]
            for r in rows
        ],
    )
    return text + (
        f"\n\n1 thread per process, {seconds:g} s per run, tokens live {lifetime:g} s. Floors: "
        "calls/s = the constant-header run at the same N; 1 refresh per token, 0 double "
        f"refreshes, 0 invalid_grant; added latency at an expiry = one token round trip "
        f"({rtt_ms:.2f} ms on the idle fake).\n\n"
        "What a refresh costs besides the POST, median ms on this disk (EnvFileStore): "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in anatomy.items())
        + f"; with the POST ({rtt_ms:.2f}) the refreshing call's least is "
        + f"{rtt_ms + sum(anatomy.values()):.2f} ms.\n\n"
        + "\n".join(f"![{name}]({file})" for name, file in PLOTS.items())
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--processes", default="1,2,4,8,16,32,64", help="comma-separated Ns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--token-lifetime", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.processes.split(",")]
    rows = []
    with FakeMercadoLibre(
        token_lifetime=args.token_lifetime, kill_old_access_on_refresh=True
    ) as fake:
        rtt = token_round_trip_ms(fake)
        with tempfile.TemporaryDirectory() as tmp:
            anatomy = refresh_anatomy(fake, Path(tmp))
        fake.reset_stats()
        for index, n in enumerate(ns):
            runs = {}
            # Alternate which goes first, so a burst of outside load does not always hit one.
            order = ("mlauth", STATIC) if index % 2 == 0 else (STATIC, "mlauth")
            for library in order:
                with tempfile.TemporaryDirectory() as tmp:
                    runs[library] = run_library(
                        fake,
                        library,
                        processes=n,
                        threads=args.threads,
                        seconds=args.seconds,
                        folder=Path(tmp),
                    )
            rows.append(figures(runs["mlauth"], runs[STATIC]))
            print(f"N={n}: {rows[-1]['calls_per_s']:.0f} calls/s", file=sys.stderr, flush=True)
    text = report(rows, rtt, anatomy, args.seconds, args.token_lifetime)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, rtt, args.out)
    save(
        args.out,
        "scale",
        text,
        {
            "token_round_trip_ms": rtt,
            "refresh_steps_ms": anatomy,
            "rows": rows,
            "machine": machine(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
