"""The httpx extra: ``mlauth.httpx`` says what to install when httpx is missing, and the core
package never needs httpx."""

from __future__ import annotations

import subprocess
import sys

# Make ``import httpx`` fail as it does where the package is not installed.
WITHOUT_HTTPX = "import sys; sys.modules['httpx'] = None; "


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_HTTPX + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_mlauth_httpx_without_httpx_names_the_extra() -> None:
    result = run("import mlauth.httpx")
    assert result.returncode != 0
    assert "ImportError: mlauth.httpx needs httpx: pip install 'mlauth[httpx]'" in result.stderr


def test_the_core_package_and_the_requests_adapter_work_without_httpx() -> None:
    result = run(
        "import mlauth, mlauth.cli, mlauth.integrations.requests_auth; "
        "assert 'anyio' not in sys.modules; print(mlauth.MLAuth.__name__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MLAuth"
