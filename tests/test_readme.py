"""The README's offline examples run as written (those that talk to the fake server)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_fake_server_example_runs(tmp_path: Path) -> None:
    (block,) = [b for b in python_blocks() if "with FakeMercadoLibre(" in b]
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
