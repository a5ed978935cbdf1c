"""Every code block in docs/ runs here, in the shape it documents.

Python blocks run as written. The deployment blocks name tools this machine does not have
(Docker, systemd, cron), so each is carried out by what it stands for: a ``docker run -v``
becomes a real bind mount of the host path into a folder that plays the container's root,
and a unit's ``ExecStart`` or a crontab command runs with what those give a process (no
``HOME``, no terminal, another working directory). Paths under the documented roots are
mapped into a temporary folder; the commands themselves are not edited.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.test_deploy_containers import bind_file

pytestmark = pytest.mark.processes

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```(\w*)\n(.*?)```(?:\s*\n\s*It prints `([^`]*)`)?", re.DOTALL)
BIN = Path(sys.executable).parent

# What each block's language means here, so a new kind of block cannot go untested.
HANDLED = {"python", "sh", "ini"}

MAIN = """\
import requests, sys
answer = requests.get(sys.argv[1] + "/users/me", timeout=30)
print(answer.status_code)
"""


def blocks(language: str) -> list[tuple[str, str, str | None]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for lang, body, prints in BLOCK.findall(page.read_text()):
            if lang == language:
                found.append((page.name, body, prints or None))
    return found


def test_every_block_in_the_docs_is_of_a_kind_that_runs_here() -> None:
    kinds = {lang for page in DOCS.glob("*.md") for lang, _, _ in BLOCK.findall(page.read_text())}
    assert kinds <= HANDLED, f"no test runs these blocks: {kinds - HANDLED}"
    docker = [b for _, b, _ in blocks("sh") if b.startswith("docker run")]
    cron = [b for _, b, _ in blocks("sh") if re.match(r"[*\d/,-]+ ", b)]
    assert len(docker) + len(cron) == len(blocks("sh")), "an sh block no test recognises"


@pytest.mark.parametrize(
    ("page", "body", "prints"), blocks("python"), ids=lambda v: v[:40] if isinstance(v, str) else v
)
def test_python_block_runs_as_written(
    page: str, body: str, prints: str | None, tmp_path: Path
) -> None:
    script = tmp_path / "example.py"
    script.write_text(body)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{page}: {done.stderr[-2000:]}"
    if prints is not None:
        assert done.stdout.strip().splitlines()[-1] == prints, f"{page}: {done.stdout}"


def local(command: list[str], mapping: dict[str, Path]) -> list[str]:
    """The command with documented paths mapped here, and the venv's mlauth and python."""
    out = []
    for arg in command:
        for documented, here in mapping.items():
            if arg == documented or arg.startswith(documented + "/"):
                arg = str(here) + arg[len(documented) :]
        if arg in ("mlauth", "python") or arg.endswith(("/.venv/bin/mlauth", "/.venv/bin/python")):
            arg = str(BIN / os.path.basename(arg))
        out.append(arg)
    return out


def cron_like(command: list[str], cwd: Path, fake: FakeMercadoLibre) -> str:
    """Run as cron and systemd do: no HOME, no terminal, stdin closed; return stdout."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HOME", "TERM", "PWD")}
    done = subprocess.run(
        [*command, fake.base_url],
        cwd=cwd,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


@pytest.mark.parametrize(
    "block", [b for _, b, _ in blocks("sh") if b.startswith("docker run")], ids=["folder", "file"]
)
def test_docker_block_refreshes_through_its_mount(
    block: str, fake: FakeMercadoLibre, tmp_path: Path
) -> None:
    host, root = tmp_path / "host", tmp_path / "container"
    host.mkdir()
    args = shlex.split(block.replace("\\\n", " ").replace("$PWD", str(host)))
    assert args[:2] == ["docker", "run"]
    mounts, workdir, i = [], "/app", 2
    while args[i].startswith("-"):
        if args[i] in ("-v", "-w"):
            if args[i] == "-v":
                mounts.append(args[i + 1].split(":"))
            else:
                workdir = args[i + 1]
            i += 2
        else:
            i += 1
    command = args[i + 1 :]  # after the image
    mapping = {"/app": root / "app"}
    (root / "app").mkdir(parents=True)
    (root / "app" / "main.py").write_text(MAIN)  # the image's own code
    with contextlib.ExitStack() as stack:
        for source, target in mounts:
            source_path = Path(source)
            if source_path.suffix == "" and source_path.name != ".env":
                source_path.mkdir(exist_ok=True)
                env = source_path / ".env"
            else:
                env = source_path
            fake.write_env(env, expires_at=time.time() - 10)  # the first call must refresh
            stack.enter_context(bind_file(source_path, Path(local([target], mapping)[0])))
        out = cron_like(local(command, mapping), Path(local([workdir], mapping)[0]), fake)
    assert out.strip() == "200"
    assert fake.stats()["refreshes"] == 1 and fake.stats()["invalid_grant"] == 0
    assert fake.is_live(read_env_file(env)["ML_REFRESH_TOKEN"])  # the host file has the chain


def test_systemd_unit_runs_without_home_or_terminal(fake: FakeMercadoLibre, tmp_path: Path) -> None:
    ((_, unit, _),) = blocks("ini")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit)
    service = parser["Service"]
    mapping = {"/srv/pipeline": tmp_path / "srv"}
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "main.py").write_text(MAIN)
    fake.write_env(tmp_path / "srv" / ".env", expires_at=time.time() - 10)
    cwd = Path(local([service["WorkingDirectory"]], mapping)[0])
    out = cron_like(local(shlex.split(service["ExecStart"]), mapping), cwd, fake)
    assert out.strip() == "200"
    assert fake.stats()["refreshes"] == 1


def test_crontab_line_runs_from_another_folder(fake: FakeMercadoLibre, tmp_path: Path) -> None:
    (line,) = [b for _, b, _ in blocks("sh") if re.match(r"[*\d/,-]+ ", b)]
    command = shlex.split(line)[5:]  # after minute, hour, day, month, weekday
    mapping = {"/srv/pipeline": tmp_path / "srv"}
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "main.py").write_text(MAIN)
    fake.write_env(tmp_path / "srv" / ".env", expires_at=time.time() - 10)
    elsewhere = tmp_path / "cron-cwd"  # cron starts in $HOME, which is not the pipeline's
    elsewhere.mkdir()
    out = cron_like(local(command, mapping), elsewhere, fake)
    assert out.strip() == "200"
    assert fake.stats()["refreshes"] == 1
