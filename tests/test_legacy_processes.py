"""An unmodified legacy pipeline in several processes, under install() and under `mlauth run`,
while the fake server rotates tokens and kills the old ones."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mlauth.testing import FakeMercadoLibre
from tests.support.legacy_apps import (
    PYTHON,
    RecordingServer,
    legacy_env,
    start_worker,
    worker_result,
    write_legacy_app,
)

pytestmark = pytest.mark.processes

LIFETIME = 2.0


def run_storm(
    tmp_path: Path, commands: list[tuple[list[str], str]], seconds: float
) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, int], list[float], list[str | None]]:
    """Run the workers side by side against one fake server; return what everyone saw."""
    worker = write_legacy_app(tmp_path)
    env = tmp_path / ".env"
    with (
        FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake,
        RecordingServer(host="127.0.0.2") as other,
    ):
        legacy_env(fake, env, LIFETIME)
        procs = [
            start_worker([*prefix, str(worker)], tmp_path, env, other.url, mode, seconds)
            for prefix, mode in commands
        ]
        results = [worker_result(proc) for proc in procs]
        stats, times, headers = fake.stats(), fake.refresh_times(), other.headers()
    return results, stats, times, headers


def check_chain(stats: dict[str, int], times: list[float], seconds: float) -> None:
    assert stats["invalid_grant"] == 0
    # At most one refresh per token lifetime: two refreshes closer than half a lifetime
    # would mean two processes refreshed the same token.
    assert stats["refreshes"] >= seconds / LIFETIME - 1
    assert stats["refreshes"] <= seconds / (LIFETIME * 0.75) + 2
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= LIFETIME / 2, gaps


def figures(label: str, results: list[tuple[int, dict[str, Any]]], stats: dict[str, int]) -> None:
    calls = sum(r["calls"] for _, r in results)
    failed = sum(r["failed"] for _, r in results)
    print(
        f"\n[figures] {label}: {len(results)} processes, tokens {LIFETIME:g}s: calls={calls} "
        f"failed={failed} refreshes={stats['refreshes']} 401s served={stats['api_401']} "
        f"invalid_grant={stats['invalid_grant']}"
    )


def test_legacy_module_under_install_never_fails_and_never_leaks(tmp_path: Path) -> None:
    seconds = 6.0
    modes = ["install-before", "install-after", "install-before", "install-after"]
    results, stats, times, headers = run_storm(
        tmp_path, [([PYTHON], mode) for mode in modes], seconds
    )
    figures("legacy module under install()", results, stats)
    for code, result in results:
        assert code == 5, result
        assert result["calls"] > 0 and result["failed"] == 0, result["errors"]
        assert result["legacy_refreshes"] == 0  # every 401 was absorbed before it saw one
    # Old tokens were killed at every rotation (check_chain counts them); a worker that met a
    # peer's refresh waited for its token instead of sending a dead one, so 401s are rare.
    check_chain(stats, times, seconds)
    # The non-ML host got exactly what the legacy code sent it: its own stale header, or none.
    assert len(headers) == sum(r["other_calls"] for _, r in results)
    assert set(headers) <= {"Bearer stale-legacy", None}
    assert headers.count(None) == len(headers) // 2


def test_unmodified_script_under_mlauth_run_same_outcome(tmp_path: Path) -> None:
    seconds = 6.0
    env = tmp_path / ".env"
    run = [PYTHON, "-m", "mlauth", "run", "--env", str(env), "--", PYTHON]
    results, stats, times, headers = run_storm(tmp_path, [(run, "none")] * 3, seconds)
    figures("unmodified script under mlauth run", results, stats)
    for code, result in results:
        assert code == 5, result  # the script's own exit code came through
        assert result["calls"] > 0 and result["failed"] == 0, result["errors"]
        assert result["legacy_refreshes"] == 0
    check_chain(stats, times, seconds)
    assert set(headers) <= {"Bearer stale-legacy", None}
    assert len(headers) == sum(r["other_calls"] for _, r in results)


def test_without_mlauth_the_same_script_fails(tmp_path: Path) -> None:
    """The control: the storm above is hard enough to break the legacy code on its own."""
    results, stats, _, _ = run_storm(tmp_path, [([PYTHON], "none")] * 3, 5.0)
    failed = sum(r["failed"] for _, r in results)
    figures("control, no mlauth", results, stats)
    # It misses the {"code":"unauthorized"} 401 shape, and its unlocked refreshes race.
    assert failed > 0 or stats["invalid_grant"] > 0
    assert any(code == 1 for code, _ in results) or stats["invalid_grant"] > 0


def test_redirected_legacy_refresh_is_single_flight_across_processes(tmp_path: Path) -> None:
    """Four processes call the legacy refresh function at once: one refresh, same token."""
    write_legacy_app(tmp_path)
    script = tmp_path / "refresh_at_start.py"
    script.write_text(
        "import json, os, sys\n"
        "import mlauth\n"
        "import legacy_pipeline as lp\n"
        "mlauth.install(os.environ['PIPELINE_ENV'])\n"
        "mlauth.keep_globals_current(lp)\n"
        "mlauth.redirect_refresh(lp)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # the start line: all processes refresh at the same moment
        "ok = lp.refresh_ml_token()\n"
        "status = lp.http_get('/users/me').status_code\n"
        "print(json.dumps({'ok': ok, 'status': status, 'legacy_refreshes': lp.LEGACY_REFRESHES,\n"
        "  'token': mlauth.fingerprint(lp.ML_ACCESS_TOKEN),\n"
        "  'header': mlauth.fingerprint(lp.HEADERS['Authorization'][7:])}))\n"
    )
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=3600.0) as fake:
        # Issued a minute ago: older than min_token_age, so a refresh is really due.
        legacy_env(fake, env, 3600.0, age=60.0)
        command = [PYTHON, "-u", str(script)]
        procs = [
            start_worker(command, tmp_path, env, "http://unused", "x", 0, stdin=subprocess.PIPE)
            for _ in range(4)
        ]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.communicate()[1]
        stats_before = fake.stats()
        for proc in procs:  # the start line to all of them, then wait for each
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [finish(proc) for proc in procs]
        stats = fake.stats()
    assert stats_before["refreshes"] == 0
    assert stats["refreshes"] == 1 and stats["invalid_grant"] == 0
    assert {r["token"] for r in results} == {results[0]["token"]}  # one token everywhere
    for r in results:
        assert r["ok"] is True and r["status"] == 200 and r["legacy_refreshes"] == 0
        assert r["header"] == r["token"]  # HEADERS followed the new token


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result
