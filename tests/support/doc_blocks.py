"""The code blocks of the README and docs/, and the project folder they run in.

How a page's blocks are found (with what the line after one says it prints), which kind of
``sh`` block each is, and the *project folder* the pages assume a reader has: a ``.env``
whose token has expired, the legacy ``main2.py``, ``api.mercadolibre.com`` answered by a fake
MercadoLibre (a ``sitecustomize`` routes requests' and httpx's calls there) and, where a block
names the documented Redis URL, a real ``redis-server`` in its place. ``tests/test_docs.py``
and ``tests/test_readme.py`` both run their blocks here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlauth.cli.migrate import migrate_to_redis
from mlauth.secret import Secret
from mlauth.stores.envfile import EnvFileStore, read_env_file
from mlauth.stores.sql import SqlSellers
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from mlauth.tokens import TokenSet, seller_of

# The lines of a .env's token chain, which a move into a store removes.
TOKEN_KEYS = ("ML_ACCESS_TOKEN", "ML_REFRESH_TOKEN", "ML_TOKEN_EXPIRES_AT")

BLOCK = re.compile(r"```(\w*)\n(.*?)```(?:\s*\n\s*It prints `([^`]*)`)?", re.DOTALL)
BIN = Path(sys.executable).parent


# What an ``sh`` block runs under: dash refuses what bash alone accepts (``kill %1`` in a
# script, ``[[``, arrays), which /bin/bash would let through.
POSIX_SH = shutil.which("dash")


def posix_sh() -> str:
    if POSIX_SH is None:
        pytest.skip("environment limit: no dash on PATH to run the sh blocks as POSIX sh")
    return POSIX_SH


# The legacy pipeline the pages call main2: a token read once, headers built at import.
LEGACY = """\
import requests

ML_ACCESS_TOKEN = "APP_USR-read-once-at-import"
HEADERS = {"Authorization": f"Bearer {ML_ACCESS_TOKEN}"}


def refresh_ml_token():
    raise SystemExit("main2.refresh_ml_token ran: it spends the refresh token without a lock")


def run():
    answer = requests.get("https://api.mercadolibre.com/users/me", headers=HEADERS, timeout=30)
    print(answer.status_code)
    answer.raise_for_status()


if __name__ == "__main__":
    run()
"""


# First on PYTHONPATH: requests' and httpx's calls to the real API reach the fake instead, after
# the auth has seen the real URL (and sees the real URL again on the answer).
ROUTE = """\
import os

import requests.adapters

API = "https://api.mercadolibre.com"
FAKE = os.environ.get("MLAUTH_DOCS_FAKE_API")
_send = requests.adapters.HTTPAdapter.send


def send(self, request, *args, **kwargs):
    if FAKE is None or not (request.url or "").startswith(API + "/"):
        return _send(self, request, *args, **kwargs)
    routed = request.copy()
    routed.url = FAKE + request.url[len(API) :]
    response = _send(self, routed, *args, **kwargs)
    response.url, response.request = request.url, request
    return response


requests.adapters.HTTPAdapter.send = send

try:  # httpx's calls too, after its auth flow has seen the real URL (docs/httpx.md)
    import httpx
except ImportError:
    httpx = None


def routed(request):
    if FAKE is None or not str(request.url).startswith(API + "/"):
        return None
    real, request.url = request.url, httpx.URL(FAKE + str(request.url)[len(API) :])
    return real


if httpx is not None:
    _handle, _handle_async = (
        httpx.HTTPTransport.handle_request,
        httpx.AsyncHTTPTransport.handle_async_request,
    )

    def handle(self, request):
        real = routed(request)
        try:
            return _handle(self, request)
        finally:
            if real is not None:
                request.url = real

    async def handle_async(self, request):
        real = routed(request)
        try:
            return await _handle_async(self, request)
        finally:
            if real is not None:
                request.url = real

    httpx.HTTPTransport.handle_request = handle
    httpx.AsyncHTTPTransport.handle_async_request = handle_async
"""


DOCUMENTED_REDIS = "redis://10.0.0.5:6379/0"


def page_blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, body, what the line after it says it prints) of each block of a page."""
    return [(lang, body, prints or None) for lang, body, prints in BLOCK.findall(page.read_text())]


def is_docker(block: str) -> bool:
    return block.startswith("docker run")


def is_cron(block: str) -> bool:
    return re.match(r"[*\d/,-]+ ", block) is not None


def is_walkthrough(block: str) -> bool:
    return "mlauth demo --serve" in block


def is_session(block: str) -> bool:
    """Commands typed in the project folder: every line an ``mlauth`` command."""
    lines = [line for line in block.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith("mlauth ") for line in lines)


@dataclasses.dataclass
class Project:
    folder: Path
    fake: FakeMercadoLibre
    environ: dict[str, str]


@contextlib.contextmanager
def project(tmp_path: Path, block: str) -> Iterator[tuple[Project, str]]:
    """The folder the pages assume, and the block with the documented Redis swapped in."""
    folder, route = tmp_path / "project", tmp_path / "route"
    folder.mkdir()
    route.mkdir()
    (folder / "main2.py").write_text(LEGACY)
    (route / "sitecustomize.py").write_text(ROUTE)
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(FakeMercadoLibre(token_lifetime=3600.0))
        env = folder / ".env"
        fake.write_env(env, expires_at=time.time() - 10)  # the first call must refresh
        # The default allowed host, api.mercadolibre.com, instead of the fake's own address.
        lines = env.read_text().splitlines(keepends=True)
        env.write_text("".join(line for line in lines if not line.startswith("ML_API_HOSTS=")))
        if DOCUMENTED_REDIS in block:
            (tmp_path / "redis").mkdir()
            server = RedisServer(tmp_path / "redis").start()
            stack.callback(server.stop)
            block = block.replace(DOCUMENTED_REDIS, server.url)
            if "mlauth migrate" not in block:  # the page assumes the migration was done
                migrate_to_redis(env, server.url)
        elif re.search(r"Sellers\.|seller=", block) and "mlauth migrate" not in block:
            migrate_to_sellers(env)  # the page (sellers.md) assumes the move was done
        environ = dict(
            os.environ,
            PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""),
            PYTHONPATH=os.pathsep.join(filter(None, [str(route), os.environ.get("PYTHONPATH")])),
            MLAUTH_DOCS_FAKE_API=fake.base_url,
        )
        yield Project(folder, fake, environ), block


def migrate_to_sellers(env: Path) -> None:
    """What the sellers page assumes was done: the .env's chain moved into ``sellers.db``
    beside it (``ML_TOKEN_STORE=sqlite:///sellers.db``), the token lines gone."""
    values = read_env_file(env)
    stores = SqlSellers.sqlite(str(env.parent / "sellers.db"), client_id=values["ML_CLIENT_ID"])
    tokens = TokenSet(None, Secret(values["ML_REFRESH_TOKEN"] or ""))
    user = seller_of(tokens)
    assert user is not None
    stores.add(user, tokens)
    stores.close()
    file = EnvFileStore(env)
    with file.file_lock(10):
        gone: dict[str, str | None] = dict.fromkeys(TOKEN_KEYS)
        file.update_file({**gone, "ML_TOKEN_STORE": "sqlite:///sellers.db"})


def uses_the_api(block: str) -> bool:
    return "api.mercadolibre.com" in block or bool(
        re.search(r"main2\.run\(|main2\.py|-m main2", block)
    )


def check_project(where: str, proj: Project, block: str) -> None:
    """What every block must leave: no refresh token spent twice, a chain that still works."""
    stats = proj.fake.stats()
    assert stats["invalid_grant"] == 0, f"{where}: {stats}"
    if uses_the_api(block):
        assert stats["api_ok"] >= 1 and stats["refreshes"] >= 1, f"{where}: {stats}"
    if "mlauth migrate" in block:
        values = read_env_file(proj.folder / ".env")
        assert values.get("ML_TOKEN_STORE") and "ML_REFRESH_TOKEN" not in values, values
    status = subprocess.run(
        [str(BIN / "mlauth"), "status", "--env", ".env"],
        cwd=proj.folder,
        env=proj.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, f"{where}: {status.stdout}{status.stderr}"


def run_in_project(where: str, kind: str, body: str, tmp_path: Path) -> str:
    """Run a python block or a shell session in the project folder; its stdout."""
    with project(tmp_path, body) as (proj, body):
        script = "example.py" if kind == "python" else "session.sh"
        (proj.folder / script).write_text(body if kind == "python" else "set -e\n" + body)
        done = subprocess.run(
            [sys.executable if kind == "python" else posix_sh(), script],
            cwd=proj.folder,
            env=proj.environ,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{where}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        check_project(where, proj, body)
        return done.stdout


def check_prints(where: str, stdout: str, prints: str | None) -> None:
    if prints is not None:
        lines = stdout.strip().splitlines()
        assert lines and lines[-1] == prints, f"{where}: {stdout}"


def block_id(value: object) -> str:
    return value[:40] if isinstance(value, str) else str(value)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```", re.DOTALL)
