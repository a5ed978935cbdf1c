"""What a user of the package sees before any code runs: the version, the licence, the
metadata, and a clone that `make clean` leaves clean."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlauth
from tests.package_support import ROOT, pyproject

BIN = Path(sys.executable).parent
# `make test` runs this suite, so make is there wherever it runs.
MAKE = shutil.which("make")


# -- the version --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[str(BIN / "mlauth")], [sys.executable, "-m", "mlauth"]], ids=["script", "-m"]
)
def test_version_flag_prints_the_version_and_exits_0(command: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [*command, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"mlauth {mlauth.__version__}\n", "")


def test_the_version_is_written_in_one_place() -> None:
    project = pyproject()
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mlauth.__version__"}
    written = [
        path.relative_to(ROOT)
        for path in (ROOT / "mlauth").rglob("*.py")
        if re.search(r"^__version__ = ", path.read_text(), flags=re.MULTILINE)
    ]
    assert written == [Path("mlauth/__init__.py")]
    assert re.fullmatch(r"\d+\.\d+\.\d+", mlauth.__version__)
    # The metadata of this install was built from that same line.
    assert importlib.metadata.version("mlauth") == mlauth.__version__


# -- licence and metadata -------------------------------------------------------------------


def test_the_licence_is_mit_shipped_as_a_file_and_named_in_the_metadata() -> None:
    project = pyproject()["project"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert project["license"] == "MIT"  # an SPDX expression (PEP 639)
    assert project["license-files"] == ["LICENSE"]
    # setuptools refuses a licence classifier beside an SPDX expression: the build would fail.
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "setuptools>=77" in pyproject()["build-system"]["requires"]  # reads SPDX licences


def test_the_metadata_says_what_the_package_is_for() -> None:
    project = pyproject()["project"]
    assert {"requests", "httpx"} <= set(re.findall(r"\w+", project["description"]))
    assert {"mercadolibre", "oauth", "requests", "httpx"} <= set(project["keywords"])
    assert project["readme"] == "README.pypi.md"
    for prefix in ("Development Status", "Intended Audience", "Operating System", "Topic"):
        assert [c for c in project["classifiers"] if c.startswith(prefix + " ::")], prefix
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "mlauth" / "py.typed").is_file()
    # Nothing public exists to link to: no invented homepage or repository.
    assert "urls" not in project


# -- make clean -----------------------------------------------------------------------------

LEFT_BEHIND = [
    ".venv/bin/python",
    ".pytest_cache/README.md",
    ".mypy_cache/3.11/cache.db",
    ".ruff_cache/content",
    ".hypothesis/examples/0a/1b",
    "mlauth.egg-info/PKG-INFO",
    "build/lib/mlauth/__init__.py",
    "dist/mlauth-0.1.0-py3-none-any.whl",
    "mlauth/__pycache__/engine.cpython-311.pyc",
    "tests/__pycache__/conftest.cpython-311-pytest-9.pyc",
]
KEPT = ["mlauth/engine.py", "tests/conftest.py", "README.md", ".env", "docs/cli.md"]


def test_make_clean_removes_what_the_tools_tests_and_builds_leave(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in LEFT_BEHIND + KEPT:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert MAKE is not None
    done = subprocess.run([MAKE, "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert left == sorted(["Makefile", *KEPT])
