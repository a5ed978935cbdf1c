"""Every code block in docs/ runs here, in the shape it documents.

Python blocks and shell sessions (lines of ``mlauth ...``) run as written in a *project
folder*: what the pages assume a reader has, namely a ``.env`` (whose token has expired, so
the first call refreshes), a legacy module ``main2.py`` that sends a stale ``Authorization``
header, ``api.mercadolibre.com`` answered by a fake MercadoLibre (a ``sitecustomize`` routes
the https calls of ``requests`` and ``httpx`` there; the token endpoint is the fake's), and,
where a block names ``redis://10.0.0.5:6379/0``, a real ``redis-server`` in its place. After
each block the fake must have served no ``invalid_grant`` and ``mlauth status`` must still
find a live chain.
``tests/test_readme.py`` runs the README's blocks in the same folder.

Shell blocks are marked ``sh`` and run under dash, a POSIX shell with no bash extensions, so a
bashism in one fails here. The demo walkthrough runs against ``mlauth demo --serve`` on a free
port, as written and with a step that fails or a signal midway. The deployment
blocks name tools this machine does not have (Docker, systemd, cron), so each is carried out
by what it stands for: a ``docker run -v`` becomes a real bind mount of the host path into a
folder that plays the container's root, and a unit's ``ExecStart`` or a crontab command runs
with what those give a process (no ``HOME``, no terminal, another working directory). Paths
under the documented roots are mapped into a temporary folder; the commands themselves are
not edited.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlauth.stores import sellers_from_env
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.doc_blocks import (
    BIN,
    CODE,
    LINK,
    block_id,
    check_prints,
    is_cron,
    is_docker,
    is_session,
    is_walkthrough,
    page_blocks,
    posix_sh,
    run_in_project,
)
from tests.support.mounts import bind_file

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# What each block's language means here, so a new kind of block cannot go untested.
HANDLED = {"python", "sh", "ini", "dotenv"}


MAIN = """\
import requests, sys
answer = requests.get(sys.argv[1] + "/users/me", timeout=30)
print(answer.status_code)
"""


def blocks(language: str) -> list[tuple[str, str, str | None]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for lang, body, prints in page_blocks(page):
            if lang == language:
                found.append((page.name, body, prints))
    return found


SH_KINDS = (is_docker, is_cron, is_walkthrough, is_session)


def test_every_block_in_the_docs_is_of_a_kind_that_runs_here() -> None:
    kinds = {lang for page in DOCS.glob("*.md") for lang, _, _ in page_blocks(page)}
    assert kinds <= HANDLED, f"no test runs these blocks: {kinds - HANDLED}"
    for page, body, _ in blocks("sh"):
        recognised = [kind.__name__ for kind in SH_KINDS if kind(body)]
        assert len(recognised) == 1, f"{page}: an sh block run by {recognised or 'no test'}"


# -- the project folder ----------------------------------------------------------------------


def is_pytest_example(block: str) -> bool:
    return "def test_" in block


@pytest.mark.parametrize(
    ("page", "body", "prints"),
    [block for block in blocks("python") if not is_pytest_example(block[1])],
    ids=block_id,
)
def test_python_block_runs_as_written(
    page: str, body: str, prints: str | None, tmp_path: Path
) -> None:
    check_prints(page, run_in_project(page, "python", body, tmp_path), prints)


@pytest.mark.parametrize(
    ("page", "body"),
    [(p, b) for p, b, _ in blocks("python") if is_pytest_example(b)],
    ids=block_id,
)
def test_pytest_example_passes(page: str, body: str, tmp_path: Path) -> None:
    """A block that is a test file runs under pytest (the mlauth plugin's fixtures); all pass."""
    (tmp_path / "test_example.py").write_text(body)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{page}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    # At least one run per test function: a plugin may run one several times (anyio's runs an
    # async test once per installed event loop).
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed[1]) >= body.count("def test_"), done.stdout


@pytest.mark.parametrize(
    ("page", "body"), [(p, b) for p, b, _ in blocks("sh") if is_session(b)], ids=block_id
)
def test_shell_session_runs_in_the_project_folder(page: str, body: str, tmp_path: Path) -> None:
    run_in_project(page, "sh", body, tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def walkthrough() -> str:
    (block,) = [b for _, b, _ in blocks("sh") if is_walkthrough(b)]
    return block


def run_walkthrough(
    folder: Path, block: str, *, stop: Callable[[subprocess.Popen[str]], None] | None = None
) -> tuple[int, str, str]:
    """Run ``block`` as the page says (a script, under a POSIX shell) in ``folder``, with the
    page's port swapped for a free one; ``stop`` is called once its server wrote .env.demo.

    Returns the exit code and output, once no process of the script is left: the script
    runs in a session of its own, and any process still in it afterwards fails the test.
    """
    port = free_port()
    (folder / "walkthrough.sh").write_text(block.replace("8765", str(port)))
    env = dict(os.environ, PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen(
        [posix_sh(), "walkthrough.sh"],
        cwd=folder,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: what is left of it can be found
    )
    try:
        if stop is not None:
            deadline = time.monotonic() + 60
            while not (folder / ".env.demo").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "no .env.demo"
                time.sleep(0.05)  # a poll with a deadline: the file is the only signal
            stop(proc)
        out, err = proc.communicate("", timeout=120)  # stdin closed: a step reading it ends
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 0)
            raise AssertionError(f"a process of the walkthrough outlived it: {out}{err}")
        with socket.socket() as probe:  # and nothing listens on the server's port any more
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, out, err


def test_the_command_line_walkthrough_runs(tmp_path: Path) -> None:
    code, out, err = run_walkthrough(tmp_path, walkthrough())
    assert code == 0, out + err
    assert "refresh running:  no" in out
    assert "refreshed: access sha256:" in out
    assert out.count('"path": "/users/me"') == 1  # curl's answer (JSON)
    assert "'path': '/users/me'" in out  # mlauth run's (a printed dict)
    assert "authorized: tokens saved in" in out  # the login through the fake's page
    # The server's counters as it stopped: the refresh, the login, and no token spent twice.
    assert re.search(r"stopped after \d+s: calls=2 .* refreshes=1 invalid_grant=0 logins=1", out)
    assert os.listdir(tmp_path) == ["walkthrough.sh"]  # .env.demo and its files are gone
    assert "APP_USR-" not in out + err  # no token printed along the way


def test_a_failing_walkthrough_step_leaves_no_server_and_no_files(tmp_path: Path) -> None:
    block = walkthrough()
    step = "mlauth refresh --env .env.demo\n"
    assert step in block
    code, out, err = run_walkthrough(tmp_path, block.replace(step, "mlauth refresh --bogus\n"))
    assert code == 2, out + err  # set -e: the usage error ends the script with its code
    assert "refresh running:" in out and "refreshed:" not in out  # it stopped at that step
    assert "fake MercadoLibre stopped after" in out  # the trap stopped the server
    assert os.listdir(tmp_path) == ["walkthrough.sh"]


@pytest.mark.parametrize("how", ["SIGTERM to the script", "Ctrl-C"])
def test_an_interrupted_walkthrough_leaves_no_server_and_no_files(tmp_path: Path, how: str) -> None:
    block = walkthrough()
    step = "mlauth status --env .env.demo\n"
    assert step in block
    # A step that waits for its input, which the test holds open: the script is at some
    # step (that one, or the wait before it) when the signal comes.
    block = block.replace(step, "cat >/dev/null\n")

    def stop(proc: subprocess.Popen[str]) -> None:
        if how == "Ctrl-C":  # the terminal signals the whole foreground group
            os.killpg(proc.pid, signal.SIGINT)
        else:  # kill PID, a CI timeout: the script alone
            proc.send_signal(signal.SIGTERM)
        # Then stdin closes: the step ends, and the shell runs its traps.

    code, out, err = run_walkthrough(tmp_path, block, stop=stop)
    assert code == 130, out + err
    assert "fake MercadoLibre stopped after" in out
    assert os.listdir(tmp_path) == ["walkthrough.sh"]


# -- links -----------------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", CODE.sub("", page.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name
)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name}: {target} names no file"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target} names no heading"


# -- the deployment blocks -------------------------------------------------------------------


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
    "block", [b for _, b, _ in blocks("sh") if is_docker(b)], ids=["folder", "file"]
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


@pytest.mark.parametrize(("page", "body"), [(p, b) for p, b, _ in blocks("dotenv")], ids=block_id)
def test_a_documented_env_names_a_store_mlauth_opens(page: str, body: str, tmp_path: Path) -> None:
    """A ``.env`` shown on a page is read as mlauth reads it, and the store it names opens
    (a SQLite file is made beside it, with no seller yet)."""
    env = tmp_path / ".env"
    env.write_text(body)
    env.chmod(0o600)
    stores = sellers_from_env(env)
    try:
        assert stores.sellers() == [], page
        assert (tmp_path / "sellers.db").is_file(), page
    finally:
        stores.close()


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
    (line,) = [b for _, b, _ in blocks("sh") if is_cron(b)]
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
