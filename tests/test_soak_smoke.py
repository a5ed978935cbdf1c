"""A seconds-long run of benchmarks/soak.py, so the soak script itself cannot rot.

The full soak (minutes, figures in docs/reliability.md) is not run in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def test_soak_smoke_rotates_with_no_failed_call_and_no_invalid_grant(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            *(sys.executable, str(SOAK), "--processes", "2", "--threads", "1"),
            *("--seconds", "4", "--sample", "1", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0 and summary["invalid_grant"] == 0
    assert summary["refreshes"] >= 2  # 1-second tokens really rotated
    assert summary["refreshes"] == summary["token_requests"]  # none wasted
    for process in summary["per_process"]:
        assert process["samples"] >= 3 and process["fds_last"] > 0
    assert summary["files_left"] == [".env", ".env.generation", ".env.journal", ".env.lock"]
