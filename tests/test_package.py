"""What a user of the package sees before any code runs: the version, the licence, the
metadata, the Pythons it claims and CI tests, and a clone that `make clean` leaves clean.

The wheel itself is built, installed on every claimed Python and smoke-tested by
``.ci/wheel-matrix``; here ``tests/support/scripts/wheel_smoke.py`` (what it runs there) runs
against this install, so a broken smoke is seen before CI.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlauth
from tests.support import SCRIPTS
from tests.support.project_metadata import ROOT, classified_pythons, pyproject

BIN = Path(sys.executable).parent
MATRIX = ROOT / ".ci" / "wheel-matrix"
# Both run `make test` itself, so they are there wherever this suite runs.
MAKE, BASH = shutil.which("make"), shutil.which("bash")


def matrix_pythons() -> list[str]:
    (line,) = re.findall(r"^VERSIONS=\((.*)\)$", MATRIX.read_text(), flags=re.MULTILINE)
    return line.split()


def section(page: Path, heading: str) -> str:
    text = page.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


# -- the version --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[str(BIN / "mlauth")], [sys.executable, "-m", "mlauth"]], ids=["script", "-m"]
)
def test_version_flag_prints_the_version_and_exits_0(command: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [*command, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"mlauth {mlauth.__version__}\n", "")


def test_every_folder_of_modules_is_a_package_of_the_wheel() -> None:
    # The list is written out (for _run_site, which has no __init__.py); a folder missing
    # from it is missing from the wheel, and `import mlauth` fails there.
    folders = {
        ".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "mlauth").rglob("*.py")
    }
    assert set(pyproject()["tool"]["setuptools"]["packages"]) == folders


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


def test_the_claimed_pythons_are_the_ones_ci_tests_and_the_readme_names() -> None:
    claimed = classified_pythons()
    matrix = matrix_pythons()
    assert set(matrix) <= claimed
    # The one left is the main Python, on which `make test` runs the whole suite.
    assert len(claimed - set(matrix)) == 1, (claimed, matrix)
    lowest = min(claimed, key=lambda v: tuple(map(int, v.split("."))))
    highest = max(claimed, key=lambda v: tuple(map(int, v.split("."))))
    assert pyproject()["project"]["requires-python"] == f">={lowest}"
    install = section(ROOT / "README.md", "Install")
    assert set(re.findall(r"\b3\.\d+\b", install)) == claimed, install
    assert f"Python {lowest} to {highest}" in install
    assert f"Python {lowest} to {highest}" in (ROOT / "README.pypi.md").read_text()


def test_ci_runs_the_readme_test_command_then_the_wheel_matrix() -> None:
    commands = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test", ".ci/wheel-matrix"]
    assert BASH is not None
    syntax = subprocess.run([BASH, "-n", str(MATRIX)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@pytest.mark.processes
def test_the_wheel_smoke_passes_against_this_install(tmp_path: Path) -> None:
    # From another folder, as .ci/wheel-matrix runs it (there with --installed as well).
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "wheel_smoke.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\nok: ") == 7, done.stdout
    assert "legacy scripts under mlauth run" in done.stdout  # the redirect, on each Python
    assert "ok: mlauth status --json" in done.stdout  # the schema is in the wheel
    assert done.stdout.rstrip().endswith("wheel smoke: all checks passed")


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
