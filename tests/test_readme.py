"""Every code block of the README, and of the package index's page, runs here as written.

Python blocks and shell sessions run in the project folder of ``tests/support/doc_blocks.py`` (a
``.env`` with an expired token, the legacy ``main2.py``, ``api.mercadolibre.com`` answered by
a fake MercadoLibre, a real ``redis-server`` for the documented Redis URL). The set-up block's
``make`` targets are checked with ``make -n``; the ``pip install`` lines against the package's
name and extras (.ci/wheel-matrix installs the wheel for real); the pytest example runs under
pytest; the ``.gitignore`` block is checked by ``tests/test_deploy_cli.py``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.doc_blocks import (
    CODE,
    LINK,
    block_id,
    check_prints,
    is_session,
    page_blocks,
    run_in_project,
)
from tests.support.project_metadata import ROOT, pyproject

pytestmark = pytest.mark.processes

README = ROOT / "README.md"
# The long description of the package (pyproject.toml's readme): the package index shows it
# away from the repository, so it has no relative links; its blocks run like the README's.
PYPI = ROOT / "README.pypi.md"
BUDGET = 15_000  # bytes: the README says what mlauth is for; docs/ holds the rest


def readme_blocks(language: str, page: Path = README) -> list[tuple[str, str | None]]:
    return [(body, prints) for lang, body, prints in page_blocks(page) if lang == language]


def is_setup(block: str) -> bool:
    return block.startswith("make ")


def is_install(block: str) -> bool:
    """Commands for one's own project: every line a ``pip install``."""
    lines = [line for line in block.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith("pip install ") for line in lines)


def test_the_readme_is_within_its_budget() -> None:
    size = len(README.read_bytes())
    assert size <= BUDGET, f"README.md is {size} bytes; move detail into docs/"


def test_every_readme_block_is_of_a_kind_that_runs_here() -> None:
    kinds = [lang for lang, _, _ in page_blocks(README)]
    assert set(kinds) <= {"python", "sh", "gitignore"}, kinds
    assert kinds.count("gitignore") == 1  # tests/test_deploy_cli.py runs it through git
    for body, _ in readme_blocks("sh"):
        kinds_of_it = [is_setup(body), is_session(body), is_install(body)]
        assert kinds_of_it.count(True) == 1, f"an sh block no test recognises: {body}"
    assert len([b for b, _ in readme_blocks("python") if "def test_" in b]) == 1


def test_every_block_of_the_package_page_is_of_a_kind_that_runs_here() -> None:
    kinds = [lang for lang, _, _ in page_blocks(PYPI)]
    assert set(kinds) <= {"python", "sh"}, kinds
    assert all(is_install(body) for body, _ in readme_blocks("sh", PYPI))
    assert not [b for b, _ in readme_blocks("python", PYPI) if "def test_" in b]


def test_the_package_page_has_no_relative_link() -> None:
    text = CODE.sub("", PYPI.read_text())
    targets = LINK.findall(text) + re.findall(r"(?:href|src)=[\"']([^\"']+)", text)
    relative = [target for target in targets if not re.match(r"https?://", target)]
    assert not relative, f"README.pypi.md: {relative} would be dead on the package index"


@pytest.mark.parametrize("page", [README, PYPI], ids=lambda page: page.name)
def test_the_install_lines_name_this_package_and_its_extras(page: Path) -> None:
    project = pyproject()["project"]
    extras = set(project["optional-dependencies"]) - {"test", "bench"}
    (block,) = [body for body, _ in readme_blocks("sh", page) if is_install(body)]
    named = set()
    for line in block.splitlines():
        (requirement,) = shlex.split(line, comments=True)[2:]
        match = re.fullmatch(r"([\w.-]+)(?:\[([\w,]+)\])?", requirement)
        assert match, f"{page.name}: {line}"
        assert match[1] == project["name"], f"{page.name}: {line}"
        named |= set((match[2] or "").split(",")) - {""}
    assert named == extras, f"{page.name} shows extras {named}; the package has {extras}"


def test_the_setup_commands_are_the_makefile_targets() -> None:
    (block,) = [body for body, _ in readme_blocks("sh") if is_setup(body)]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make demo", "make test"]
    planned = {}
    for command in commands:
        done = subprocess.run(
            [*command.split(), "-n"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        planned[command] = done.stdout
    assert "-m mlauth.cli.demo" in planned["make demo"]
    for step in ("ruff check", "ruff format --check", "mypy --strict", "-m pytest"):
        assert step in planned["make test"], planned["make test"]


@pytest.mark.parametrize(
    ("page", "body", "prints"),
    [
        (page.name, b, p)
        for page in (README, PYPI)
        for b, p in readme_blocks("python", page)
        if "def test_" not in b
    ],
    ids=block_id,
)
def test_python_block_runs_as_written(
    page: str, body: str, prints: str | None, tmp_path: Path
) -> None:
    check_prints(page, run_in_project(page, "python", body, tmp_path), prints)


@pytest.mark.parametrize("body", [b for b, _ in readme_blocks("sh") if is_session(b)], ids=block_id)
def test_shell_session_runs_in_the_project_folder(body: str, tmp_path: Path) -> None:
    run_in_project("README.md", "sh", body, tmp_path)


def test_the_pytest_fixture_example_passes(tmp_path: Path) -> None:
    (block,) = [b for b, _ in readme_blocks("python") if "def test_" in b]
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
