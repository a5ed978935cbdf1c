"""A smoke test of an installed mlauth: what .ci/run checks on every Python the wheel claims.

Run it with the Python of a venv that has ``mlauth[httpx]`` installed, from a folder outside
the repository, so that ``import mlauth`` finds the installed package and not the source tree
(``--installed`` makes sure of that). Against a :class:`~mlauth.testing.FakeMercadoLibre` on
loopback it checks the version's one source and the parts that depend most on the Python and
the dependency versions: an auth mounted on a ``requests.Session``, a 401 re-sent after a
refresh, two processes on one ``.env`` that refresh once between them, ``httpx`` on an
event loop, and two legacy scripts under ``mlauth run`` whose own refresh function (run at
start-up) is redirected to mlauth's: the script watch runs on ``sys.monitoring`` from 3.12 and
on ``sys.settrace`` before. It prints a line per check and exits 1 with the reason at the
first failure.
``tests/test_package.py`` runs it against the development install too.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import dotenv
import httpx
import requests

import mlauth
from mlauth.httpx import HttpxAuth
from mlauth.testing import FakeMercadoLibre

DEADLINE = 120.0  # for a subprocess to answer; generous, CI machines are shared

# One process of the pair: it builds its auth on the shared .env, says it is ready, and
# sends its calls only when told to, so that both meet the expired token together.
PEER = """\
import json, sys
import requests, mlauth

env, base = sys.argv[1], sys.argv[2]
session = requests.Session()
session.auth = mlauth.MLAuth.from_env(env)
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps([session.get(base + "/users/me", timeout=30).status_code for _ in range(5)]))
"""


# A legacy script: a refresh function of its own that POSTs the refresh grant and rewrites
# the .env with set_key, no lock, called at start-up. Under `mlauth run` it must never run.
LEGACY = """\
import json, os, sys
import requests
from dotenv import dotenv_values, set_key

ENV = os.environ["SMOKE_ENV"]
LEGACY_POSTS = 0


def refresh_ml_token(force=False):
    global LEGACY_POSTS
    LEGACY_POSTS += 1
    values = dotenv_values(ENV)
    answer = requests.post(values["ML_TOKEN_URL"], timeout=30, data={
        "grant_type": "refresh_token", "client_id": values["ML_CLIENT_ID"],
        "client_secret": values["ML_CLIENT_SECRET"],
        "refresh_token": values["ML_REFRESH_TOKEN"]})
    if answer.status_code != 200:
        return False
    set_key(ENV, "ML_ACCESS_TOKEN", answer.json()["access_token"])
    set_key(ENV, "ML_REFRESH_TOKEN", answer.json()["refresh_token"])
    return True


def main():
    print("ready", flush=True)
    sys.stdin.readline()
    ok = refresh_ml_token(force=True)
    print(json.dumps({"ok": ok, "legacy_posts": LEGACY_POSTS}), flush=True)


if __name__ == "__main__":
    main()
"""


class SmokeFailure(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SmokeFailure(what)


def expired_env(fake: FakeMercadoLibre, env: Path) -> None:
    """A .env whose token has expired: the first request must refresh before it is sent."""
    fake.write_env(env, expires_at=time.time() - 10)


def dead_env(fake: FakeMercadoLibre, env: Path) -> None:
    """A .env that says its token lives an hour while the server has already killed it."""
    lifetime = fake.token_lifetime
    fake.token_lifetime = 0.0
    fake.write_env(env, expires_at=time.time() + 3600)
    fake.token_lifetime = lifetime


def chain_is_live(fake: FakeMercadoLibre, env: Path) -> bool:
    return fake.is_live(dotenv.dotenv_values(env).get("ML_REFRESH_TOKEN"))


def counts(fake: FakeMercadoLibre) -> str:
    stats = fake.stats()
    return f"refreshes={stats['refreshes']} invalid_grant={stats['invalid_grant']}"


def check_installed() -> None:
    """The mlauth imported is the one pip installed, not a source tree on the path."""
    where = Path(mlauth.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    check(where.is_relative_to(site), f"mlauth was imported from {where}, not from {site}")
    print(f"ok: mlauth {mlauth.__version__} imported from {where.parent}")


def check_version() -> None:
    installed = importlib.metadata.version("mlauth")
    check(
        installed == mlauth.__version__,
        f"the metadata says {installed}, mlauth.__version__ {mlauth.__version__}",
    )
    script = Path(sys.executable).parent / "mlauth"
    for command in ([str(script)], [sys.executable, "-m", "mlauth"]):
        done = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=DEADLINE
        )
        shown = done.stdout.strip()
        check(
            done.returncode == 0 and shown == f"mlauth {installed}",
            f"{' '.join(command)} --version: exit {done.returncode}, {shown!r} {done.stderr!r}",
        )
    print(f"ok: version {installed} from the metadata, __version__ and --version")


def check_session_mount(fake: FakeMercadoLibre, env: Path) -> None:
    expired_env(fake, env)
    session = requests.Session()
    session.auth = mlauth.MLAuth.from_env(env)
    answer = session.get(f"{fake.base_url}/users/me", timeout=30)
    check(answer.status_code == 200, f"mounted on a Session: {answer.status_code} {answer.text}")
    check(fake.stats()["refreshes"] == 1, f"mounted on a Session: {counts(fake)}")
    check(chain_is_live(fake, env), "mounted on a Session: the .env lost the live refresh token")
    print("ok: mounted on a requests.Session, an expired token refreshed and saved")


def check_401_resent(fake: FakeMercadoLibre, env: Path) -> None:
    dead_env(fake, env)
    session = requests.Session()
    session.auth = mlauth.MLAuth.from_env(env)
    answer = session.post(f"{fake.base_url}/items", json={"title": "Mate"}, timeout=30)
    check(answer.status_code == 200, f"after a 401: {answer.status_code} {answer.text}")
    check([r.status_code for r in answer.history] == [401], f"history {answer.history}")
    check(fake.stats()["api_401"] == 1, f"after a 401: {fake.stats()}")
    check(fake.stats()["refreshes"] == 1, f"after a 401: {counts(fake)}")
    print("ok: a 401 refreshed once and the request was re-sent with its body")


def run_together(command: list[str], copies: int, folder: Path, env: dict[str, str]) -> list[str]:
    """Start ``copies`` of a command that prints "ready" and waits for a line on stdin; when
    all are ready, let them go at once. Returns what each printed after "ready"."""
    peers = [
        subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(copies)
    ]
    try:
        for peer in peers:
            assert peer.stdout is not None
            line = peer.stdout.readline().strip()  # EOF (a crash) ends the wait too
            if line != "ready":
                _, err = peer.communicate(timeout=DEADLINE)
                raise SmokeFailure(f"a peer did not start: {line!r} {err[-2000:]}")
        answers = [peer.communicate("go\n", timeout=DEADLINE) for peer in peers]
    finally:
        for peer in peers:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
    for peer, (_, err) in zip(peers, answers, strict=True):
        check(peer.returncode == 0, f"a peer exited {peer.returncode}: {err[-2000:]}")
    return [out for out, _ in answers]


def check_two_processes(fake: FakeMercadoLibre, env: Path, folder: Path) -> None:
    expired_env(fake, env)
    command = [sys.executable, "-c", PEER, str(env), fake.base_url]
    for out in run_together(command, 2, folder, dict(os.environ)):
        check(json.loads(out) == [200] * 5, f"a peer's answers: {out!r}")
    check(fake.stats()["refreshes"] == 1, f"two processes: {counts(fake)}")
    check(fake.stats()["invalid_grant"] == 0, f"two processes: {counts(fake)}")
    check(chain_is_live(fake, env), "two processes: the .env lost the live refresh token")
    print("ok: two processes on one .env met the expired token together and refreshed once")


def check_legacy_redirect(fake: FakeMercadoLibre, env: Path, folder: Path) -> None:
    # Refreshed a minute ago: older than min_token_age, so a refresh is really due.
    fake.write_env(env, extra={"ML_TOKEN_REFRESHED_AT": str(time.time() - 60)})
    script = folder / "legacy_main.py"
    script.write_text(LEGACY)
    command = [sys.executable, "-m", "mlauth", "run", "--env", str(env), "--"]
    environ = dict(os.environ, SMOKE_ENV=str(env))
    outs = run_together([*command, sys.executable, str(script)], 2, folder, environ)
    for out in outs:
        check(json.loads(out) == {"ok": True, "legacy_posts": 0}, f"a legacy script: {out!r}")
    check(fake.stats()["refreshes"] == 1, f"legacy scripts under mlauth run: {counts(fake)}")
    check(fake.stats()["invalid_grant"] == 0, f"legacy scripts under mlauth run: {counts(fake)}")
    check(chain_is_live(fake, env), "legacy scripts: the .env lost the live refresh token")
    watch = "sys.monitoring" if sys.version_info >= (3, 12) else "sys.settrace"
    print(f"ok: two legacy scripts under mlauth run, their refresh_ml_token() redirected ({watch})")


def check_httpx_async(fake: FakeMercadoLibre, env: Path) -> None:
    expired_env(fake, env)
    auth = HttpxAuth.from_env(env)

    async def calls() -> list[int]:
        async with httpx.AsyncClient(auth=auth, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.get(f"{fake.base_url}/users/me") for _ in range(10))
            )
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(calls())
    check(statuses == [200] * 10, f"httpx.AsyncClient: {statuses}")
    check(fake.stats()["refreshes"] == 1, f"httpx.AsyncClient: {counts(fake)}")
    check(chain_is_live(fake, env), "httpx.AsyncClient: the .env lost the live refresh token")
    print("ok: ten concurrent httpx.AsyncClient calls on an expired token, one refresh")


def check_status_json(fake: FakeMercadoLibre, env: Path) -> None:
    """The schema is in the wheel, and `mlauth status --json` gives every field it requires."""
    from mlauth.schemas import status_schema

    schema = status_schema()
    fake.write_env(env, expires_at=time.time() + 3600)
    script = Path(sys.executable).parent / "mlauth"
    done = subprocess.run(
        [str(script), "status", "--json", "--env", str(env)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    check(done.returncode == 0, f"mlauth status --json exited {done.returncode}: {done.stderr}")
    document = json.loads(done.stdout)
    missing = set(schema["required"]) - set(document)
    check(not missing, f"mlauth status --json lacks {sorted(missing)}")
    check(document["schema"] == schema["properties"]["schema"]["const"], f"{document['schema']}")
    check(document["state"] == "ok", f"mlauth status --json: {document['reasons']}")
    print(f"ok: mlauth status --json ({document['schema']}) and its schema from the wheel")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--installed", action="store_true", help="fail unless mlauth comes from site-packages"
    )
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}: {sys.executable}")
    try:
        if args.installed:
            check_installed()
        check_version()
        loopback = (check_session_mount, check_401_resent, check_httpx_async, check_status_json)
        with tempfile.TemporaryDirectory() as tmp:
            for number, smoke in enumerate(loopback):
                with FakeMercadoLibre() as fake:
                    smoke(fake, Path(tmp) / f"{number}.env")
            with FakeMercadoLibre() as fake:
                check_two_processes(fake, Path(tmp) / "shared.env", Path(tmp))
            with FakeMercadoLibre() as fake:
                check_legacy_redirect(fake, Path(tmp) / "legacy.env", Path(tmp))
    except SmokeFailure as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("wheel smoke: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
