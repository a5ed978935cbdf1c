"""Running the ``mlauth`` command as a real process, and what every expected failure keeps."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from mlauth.stores.envfile import read_env_file

REDIRECT = "https://example.test/callback"


def mlauth_cli(
    *args: str,
    input: str | None = None,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``mlauth ARGS`` in this environment, with ``environ``'s variables set on top."""
    return subprocess.run(
        [sys.executable, "-m", "mlauth", *args],
        input=input,
        # No input: a prompt must not wait on the terminal pytest was started from.
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=None if environ is None else {**os.environ, **environ},
        check=False,
    )


def assert_clean_failure(done: subprocess.CompletedProcess[str], code: int) -> None:
    """An expected failure: its exit code, a short message, no traceback, no output."""
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert 0 < len(done.stderr.strip().splitlines()) <= 2, done.stderr


def secrets_in(path: Path) -> list[str]:
    values = read_env_file(path)
    keys = ("ML_ACCESS_TOKEN", "ML_REFRESH_TOKEN", "ML_CLIENT_SECRET")
    return [v for k, v in values.items() if k in keys and v]


def assert_no_secret(text: str, env: Path) -> None:
    for secret in secrets_in(env):
        assert secret not in text
