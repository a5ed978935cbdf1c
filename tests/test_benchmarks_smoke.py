"""CI smoke of every benchmark: each runs at tiny sizes and prints its table. No timing.

The full-size runs are ``make bench``; here only that each script works end to end against
the installed peers and reports every contender, with the columns BENCHMARKS.md shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.run_all import replace_block
from mlauth.testing.redis_server import RedisServer

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("mlauth", "requests-oauthlib", "authlib", "google-auth")
REDIS_ROW = "mlauth (redis)"


def run_script(name: str, *args: str, out: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def table_lines(table: str) -> list[list[str]]:
    """The markdown table's lines as cells, header included, rule left out."""
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| -")
    ]


def rows(table: str) -> dict[str, list[str]]:
    """The markdown table's rows by first cell, header included."""
    return {cells[0]: cells for cells in table_lines(table)}


def committed_columns(name: str) -> list[str]:
    """The header of the committed ``benchmarks/results/NAME.md``: the columns BENCHMARKS.md
    shows (``make bench`` copies that table into it), which a smoke run must print too."""
    return table_lines((ROOT / "benchmarks" / "results" / f"{name}.md").read_text())[0]


def test_overhead_reports_every_contender_against_the_floor(tmp_path: Path) -> None:
    out = run_script("overhead", "--rounds", "2", "--calls", "20", "--block", "7", out=tmp_path)
    table = rows(out)
    assert table["contender"][:4] == ["contender", "µs/call (median)", "best round", "x floor"]
    for name in ("static AuthBase", "static AuthBase + os.stat", *PEERS, "mlauth pickup"):
        assert name in table, out
    assert table["static AuthBase"][3] == "1.000"  # the floor against itself
    assert "Every session has trust_env = False" in out  # the environment is not measured
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert len(data["contenders"]["mlauth"]["per_round_us"]) == 2
    assert data["block"] == 7  # 20 calls in turns of 7, 7 and 6
    assert (tmp_path / "overhead.md").read_text().strip() == out.strip()
    assert data["otel_metrics"] is False


def test_overhead_with_otel_metrics_on_the_api_alone_says_so(tmp_path: Path) -> None:
    out = run_script("overhead", "--rounds", "1", "--calls", "10", "--otel-metrics", out=tmp_path)
    assert "mlauth" in rows(out), out
    assert "mlauth.metrics.otel installed, OpenTelemetry API only (no SDK)." in out
    assert json.loads((tmp_path / "overhead.json").read_text())["otel_metrics"] is True


def test_storm_reports_every_library_and_mlauth_spends_no_token_twice(tmp_path: Path) -> None:
    out = run_script(
        "storm",
        *("--processes", "1", "--threads", "2", "--seconds", "2", "--token-lifetime", "2"),
        out=tmp_path,
    )
    table = rows(out)
    assert table["library"] == committed_columns("storm")
    for name in (*PEERS, REDIS_ROW):
        assert name in table, out
        assert int(table[name][1]) > 0  # every library made calls (`make test` has redis-server)
    runs = {r["library"]: r for r in json.loads((tmp_path / "storm.json").read_text())["runs"]}
    for name in ("mlauth", REDIS_ROW):
        assert runs[name]["failed"] == 0, runs[name]["errors"]
        assert runs[name]["server"]["invalid_grant"] == 0
    # Each row ran on the store it names: the workers' .env selected it.
    assert runs["mlauth"]["stores"] == ["EnvFileStore"]
    assert runs[REDIS_ROW]["stores"] == ["RedisStore"]


def test_storm_without_redis_server_says_so_in_the_table(tmp_path: Path) -> None:
    # PATH without redis-server (the workers are started by absolute interpreter path).
    empty = tmp_path / "bin"
    empty.mkdir()
    out = run_script(
        "storm",
        *("--processes", "1", "--threads", "1", "--seconds", "1", "--libraries", REDIS_ROW),
        out=tmp_path,
        env={**os.environ, "PATH": str(empty)},
    )
    assert rows(out)[REDIS_ROW][1] == "not run", out
    assert f"{REDIS_ROW} not run: redis-server is not installed" in out
    runs = json.loads((tmp_path / "storm.json").read_text())["runs"]
    assert runs == [{"library": REDIS_ROW, "not_run": runs[0]["not_run"]}]
    assert "redis-server" in runs[0]["not_run"]


def test_scale_prints_its_table_and_draws_every_curve(tmp_path: Path) -> None:
    out = run_script(
        "scale", "--processes", "1,2", "--seconds", "1", "--token-lifetime", "2", out=tmp_path
    )
    table = rows(out)
    assert table["processes"][:3] == ["processes", "calls/s", "floor calls/s"]
    assert "1" in table and "2" in table
    for png in sorted(tmp_path.glob("*.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert len(list(tmp_path.glob("scale_*.png"))) == 4
    assert out.count("](scale_") == 4  # every plot linked under the table


def rows_by_pair(table: str) -> dict[tuple[str, str], list[str]]:
    """The rows of a table whose first two cells name a row (client, auth)."""
    return {(cells[0], cells[1]): cells for cells in table_lines(table)}


def test_httpx_overhead_compares_each_client_kind_with_its_own_floor(tmp_path: Path) -> None:
    out = run_script(
        "httpx_overhead", "--rounds", "2", "--calls", "20", "--block", "7", out=tmp_path
    )
    table = rows_by_pair(out)
    assert table["client", "auth"][2:5] == ["µs/call (median)", "best round", "x floor"]
    for client, authlib in (
        ("httpx.Client", "Authlib OAuth2Client"),
        ("httpx.AsyncClient", "Authlib AsyncOAuth2Client"),
    ):
        for auth in ("static httpx.Auth + os.stat", "mlauth HttpxAuth", authlib):
            assert (client, auth) in table, out
        assert table[client, "static httpx.Auth"][4] == "1.000"  # its floor against itself
    assert "Every client has trust_env = False" in out
    data = json.loads((tmp_path / "httpx_overhead.json").read_text())
    assert len(data["contenders"]["httpx.AsyncClient: mlauth HttpxAuth"]["per_round_us"]) == 2
    assert (tmp_path / "httpx_overhead.md").read_text().strip() == out.strip()


def test_async_storm_reports_every_library_and_mlauth_spends_no_token_twice(
    tmp_path: Path,
) -> None:
    out = run_script(
        "async_storm",
        *("--processes", "2", "--tasks", "4", "--seconds", "2", "--token-lifetime", "2"),
        out=tmp_path,
    )
    table = rows(out)
    assert table["library"] == committed_columns("async_storm")
    for name in ("floor: static httpx.Auth", "mlauth HttpxAuth", "Authlib AsyncOAuth2Client"):
        assert int(table[name][1]) > 0, out  # every library made calls
    runs = {
        r["library"]: r for r in json.loads((tmp_path / "async_storm.json").read_text())["runs"]
    }
    assert runs["static"]["server"]["refreshes"] == 0  # the floor's token outlives the run
    mlauth = runs["mlauth"]
    assert mlauth["failed"] == 0, mlauth["errors"]
    assert mlauth["server"]["invalid_grant"] == 0
    assert mlauth["server"]["refreshes"] >= 1  # the storm did cross an expiry
    assert mlauth["double_refreshes"] == 0
    # Every refresh the server saw was made by one worker's client, once: the processes
    # shared the chain rather than each refreshing its own copy.
    assert sum(mlauth["refreshed_here"]) == mlauth["server"]["refreshes"]


def test_loop_lag_sees_a_blocked_loop_and_one_refresh_per_window(tmp_path: Path) -> None:
    out = run_script(
        "loop_lag", "--repeats", "1", "--token-delay", "0.5", "--interval", "0.001", out=tmp_path
    )
    table = rows(out)
    assert table["contender"][1:2] == ["refreshes"]
    blocking = "blocking refresh on the loop (sync httpx.Auth)"
    for name in ("mlauth HttpxAuth", "Authlib AsyncOAuth2Client", blocking):
        assert table[name][1] == "1", out  # the window held exactly one refresh
    assert table["control: no refresh"][1] == "0"
    data = json.loads((tmp_path / "loop_lag.json").read_text())
    # The probe's own check: the loop cannot run during a 0.5 s blocking POST, so the probe
    # wakes up at least that late (less its 1 ms sleep). A lower bound, not a timing claim.
    assert data[blocking]["max_lag_ms"] >= 450, data[blocking]
    # mlauth refreshes in a worker thread: its probe, in the same run, is never held that long.
    assert data["mlauth HttpxAuth"]["max_lag_ms"] < data[blocking]["max_lag_ms"]


def test_redirect_overhead_reports_both_scripts_both_ways() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.redirect_overhead", "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = rows(done.stdout)
    assert set(table) == {"script", "with def", "without"}
    for name in ("with def", "without"):
        # Three measures, each "--no-redirect / redirect".
        assert [len(cell.split(" / ")) for cell in table[name][1:]] == [2, 2, 2], done.stdout


def test_watch_cost_times_every_way_of_checking_side_by_side() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.watch_cost", "--number", "200", "--repeat", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = rows(done.stdout)
    for name in (
        "os.stat(path)",
        "os.fstat(kept fd)",
        "mapped counter read + compare",
        "StampWatch.quick(), counter mapped",
        "EnvFileStore.local_stamp()",
        "StampWatch.bump() (per save, not per request)",
    ):
        assert float(table[name][1]) > 0, done.stdout


def test_startup_cost_reports_every_row_for_every_checkout_and_the_pairs() -> None:
    checkouts = ["--checkout", f"a={ROOT}", "--checkout", f"b={ROOT}"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.startup_cost",
            "--runs",
            "2",
            "--no-bytecode",
            *checkouts,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 rounds from "), done.stdout
    for row in ("import", "python -c", "mlauth run", "import, no bytecode"):
        for label in ("a       ", "b       ", "b - a:"):
            found = [line for line in lines if line.startswith(f"{row:20} {label}")]
            assert len(found) == 1, (row, label, done.stdout)
            assert "quartiles" in found[0]


def test_run_all_replaces_only_the_marked_blocks() -> None:
    doc = "intro\n<!-- bench:storm -->\nold table\n<!-- /bench:storm -->\nprose stays\n"
    new = replace_block(doc, "storm", "| new | table |\n")
    assert (
        new == "intro\n<!-- bench:storm -->\n| new | table |\n<!-- /bench:storm -->\nprose stays\n"
    )
    with pytest.raises(ValueError, match="bench:scale"):
        replace_block(doc, "scale", "x")


def refresh_cost(*args: str) -> dict[str, Any]:
    # Run by path, as from another checkout's interpreter: it must need nothing but mlauth.
    script = str(ROOT / "benchmarks" / "refresh_cost.py")
    done = subprocess.run(
        [sys.executable, script, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "tests",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data: dict[str, Any] = json.loads(done.stdout)
    assert data["refreshes_seen_by_fake"] == 3  # each forced refresh reached the fake once
    assert len(data["refresh_ms"]) == len(data["post_ms"]) == 3
    assert len(data["fsyncs_per_refresh"]) == 3
    return data


def test_refresh_cost_runs_from_its_file_and_counts_each_forced_refresh() -> None:
    data = refresh_cost("--refreshes", "3")
    assert data["store"] == "EnvFileStore"
    # A .env refresh is journaled and saved durably: every one of them fsyncs something.
    assert min(data["fsyncs_per_refresh"]) > 0


def test_refresh_cost_on_redis_refreshes_through_the_redis_store(
    redis_server: RedisServer,
) -> None:
    data = refresh_cost("--refreshes", "3", "--redis", redis_server.url)
    assert data["store"] == "RedisStore"
    with redis_server.client() as client:  # the script moved the chain into that Redis
        assert [key for key in client.keys("mlauth:*") if client.hget(key, "refresh_token")]


def sellers_storm(tmp_path: Path, store: str, *extra: str) -> dict[str, Any]:
    """One tiny many-sellers storm on ``store``: its table checked, its JSON record returned."""
    out = run_script(
        "sellers_storm",
        *("--stores", store, "--sellers", "12", "--processes", "2", "--threads", "2"),
        *("--seconds", "4", "--token-lifetime", "3", *extra),
        out=tmp_path,
    )
    assert rows(out)["store"] == committed_columns("sellers_storm")
    (run,) = json.loads((tmp_path / "sellers_storm.json").read_text())["runs"]
    assert "not_run" not in run, run  # `make test` has every server the stores need
    assert run["calls"] > 0 and run["floor_failed"] == 0, run
    # The calls crossed expiries: 3 s tokens (replaced from 2.25 s on) in a 4 s storm.
    assert run["expiries_touched"] >= 1, run
    return run  # type: ignore[no-any-return]


@pytest.mark.parametrize("store", ["env", "sqlite", "postgresql", "redis"])
def test_sellers_storm_refreshes_each_seller_once_per_expiry_touched(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    # PostgreSQL: a fresh database on the session's server (the script could start its own,
    # at a few seconds per run); Redis: the script starts its own redis-server.
    extra: tuple[str, ...] = ()
    if store == "postgresql":
        extra = ("--postgres-url", request.getfixturevalue("postgres_url"))
    run = sellers_storm(tmp_path, store, *extra)
    assert run["failed"] == 0, (run["errors"], run["error_samples"])
    assert run["server"]["invalid_grant"] == 0
    assert run["refreshes"] == run["expiries_touched"], run["off_examples"]
    assert run["sellers_off"] == 0, run["off_examples"]
    # Every refresh the fake saw was made by one worker, once, and reported with its time.
    assert sum(run["refreshed_here"]) == run["refreshes"]


def test_sellers_storm_runs_the_hand_made_peer_and_counts_what_it_does(tmp_path: Path) -> None:
    run = sellers_storm(tmp_path, "peer")
    assert run["label"] == "peer: tokens table + refresh on 401"
    assert run["refreshes"] >= 1  # it refreshed on the 401s at expiry (raced or not)
    assert run["absorbed_401"] >= 1
    # What it raced into is reported, whatever it is: the fake's count, the callers' failures.
    assert run["server"]["invalid_grant"] >= 0 and run["failed"] >= run["server"]["invalid_grant"]


def test_sellers_scale_loads_and_lists_every_seller_on_each_store(
    tmp_path: Path, postgres_url: str
) -> None:
    out = run_script(
        "sellers_scale",
        *("--sellers", "120", "--repeats", "1", "--postgres-url", postgres_url),
        out=tmp_path,
    )
    assert rows(out)["store"] == committed_columns("sellers_scale")
    results = json.loads((tmp_path / "sellers_scale.json").read_text())["results"]
    assert [r["kind"] for r in results] == ["sqlite", "postgresql", "redis"]
    for result in results:
        assert "not_run" not in result, result
        # Every seller written is listed, and each load step loaded what it says.
        assert result["rows"]["sellers_listed"] == 120
        assert [p["loaded"] for p in result["memory"]] == [1, 100]
        assert all(p["heap"] > 0 for p in result["memory"]), result["memory"]


def test_expiries_touched_is_one_per_replacement_point_a_call_met() -> None:
    from benchmarks.sellers_storm import touched

    # 5 s tokens replaced 1.25 s ahead; a 10 ms call every 0.5 s for 13 s, from t = 0.
    calls = [(t / 2, t / 2 + 0.01) for t in range(27)]

    def count(refreshes: list[float]) -> int:
        return touched(calls, 0.0, refreshes, lifetime=5.0, margin=1.25, slack=0.5)

    # A lazy refresher: at the first call after each replacement point (3.75, 7.75, 11.75).
    assert count([4.0, 8.0, 12.0]) == 3
    # The same chain, its last expiry met by no refresh: one more touched than refreshed.
    assert count([4.0, 8.0]) == 3
    # A second refresh right after the first touched nothing.
    assert count([4.0, 4.01, 8.01, 12.01]) == 3
    # Refreshed before any call reached the replacement point: touched nothing either.
    assert count([2.0, 6.0, 10.0]) == 2
