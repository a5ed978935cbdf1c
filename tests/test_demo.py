"""`make demo`'s program runs end to end and reports what it saw."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_reports_no_failures() -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mlauth.cli.demo", "--processes", "2", "--threads", "2"),
            *("--seconds", "3", "--token-lifetime", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = re.search(
        r"calls=(\d+) failed=(\d+) crashed_processes=(\d+) refreshes=(\d+).*invalid_grant=(\d+)",
        done.stdout,
    )
    assert summary is not None, done.stdout
    calls, failed, crashed, refreshes, invalid_grant = map(int, summary.groups())
    assert calls > 0 and refreshes >= 2
    assert failed == crashed == invalid_grant == 0
    assert re.search(r"^\s+\d+\.\ds\s+calls=\d+\s+failed=0", done.stdout, re.M)  # live lines
