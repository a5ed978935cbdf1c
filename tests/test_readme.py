"""The README's offline examples run as written (those that talk to the fake server)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_fake_server_example_runs(tmp_path: Path) -> None:
    (block,) = [
        b for b in python_blocks() if 'session.auth = mlauth.MLAuth.from_env(".env.demo")' in b
    ]
    script = tmp_path / "example.py"
    script.write_text(block)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "'path': '/users/me'" in done.stdout


def test_the_pytest_fixture_example_passes(tmp_path: Path) -> None:
    (block,) = [b for b in python_blocks() if "def test_" in b]
    (tmp_path / "test_example.py").write_text(block)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_the_install_example_runs(tmp_path: Path) -> None:
    (block,) = [b for b in python_blocks() if "with FakeMercadoLibre(" in b and "install(" in b]
    script = tmp_path / "example.py"
    script.write_text(block)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "200\n401\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_command_line_walkthrough_runs(tmp_path: Path) -> None:
    (block,) = [b for b in sh_blocks() if "mlauth demo --serve" in b]
    # The README's fixed port, swapped for a free one so parallel runs cannot collide.
    (tmp_path / "walkthrough.sh").write_text("set -e\n" + block.replace("8765", str(free_port())))
    bin_dir = str(Path(sys.executable).parent)  # this venv's mlauth and python come first
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen(
        ["/bin/bash", "walkthrough.sh"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so the background server goes too
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, out + err
    assert "refresh running:  no" in out
    assert "refreshed: access sha256:" in out
    assert out.count('"path": "/users/me"') == 1  # curl's answer (JSON)
    assert "'path': '/users/me'" in out  # mlauth run's (a printed dict)
    assert "authorized: tokens saved in" in out  # the login through the fake's page
    assert not (tmp_path / ".env.demo").exists()  # removed by the server as it stopped
    assert "APP_USR-" not in out + err  # no token printed along the way
