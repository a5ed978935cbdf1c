"""The command line as deployments meet it: no --env, a stray .env.demo, cron, bad options.

Each command runs as a real ``python -m mlauth`` process against the loopback fake.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from mlauth.stores.envfile import read_env_file
from mlauth.stores.incidents import FileIncidents
from mlauth.stores.journal import Journal
from mlauth.stores.watch import COUNTER_SUFFIX
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.cli import REDIRECT, assert_clean_failure, assert_no_secret, mlauth_cli
from tests.support.pending_answer import answer_pending

pytestmark = pytest.mark.processes

README = Path(__file__).resolve().parent.parent / "README.md"


def project_folder(fake: FakeMercadoLibre, tmp_path: Path) -> tuple[Path, Path]:
    """A folder holding the project's .env and a stray .env.demo (another chain of the fake)."""
    folder = tmp_path / "project"
    folder.mkdir()
    env, demo = folder / ".env", folder / ".env.demo"
    fake.write_env(env, expires_at=time.time() + 3 * 3600)
    fake.write_env(demo, expires_at=time.time() + 3 * 3600)
    return env, demo


def test_every_command_without_env_uses_dot_env_not_a_stray_env_demo(
    fake_ml: FakeMercadoLibre, tmp_path: Path, redis_server: RedisServer
) -> None:
    env, demo = project_folder(fake_ml, tmp_path)
    folder = env.parent
    demo_before = demo.read_bytes()

    status = mlauth_cli("status", cwd=folder)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"store:\s+{re.escape(str(env))}\n", status.stdout)

    token = mlauth_cli("token", cwd=folder)
    assert token.returncode == 0, token.stderr
    assert token.stdout.strip() == read_env_file(env)["ML_ACCESS_TOKEN"]

    before = read_env_file(env)["ML_REFRESH_TOKEN"]
    refresh = mlauth_cli("refresh", cwd=folder)
    assert refresh.returncode == 0, refresh.stderr
    assert read_env_file(env)["ML_REFRESH_TOKEN"] != before

    show = "import mlauth; print(mlauth.installed().store.location)"
    run = mlauth_cli("run", "--", sys.executable, "-c", show, cwd=folder)
    assert (run.returncode, run.stdout) == (0, f"{env}\n"), run.stderr

    code = fake_ml.issue_authorization_code(REDIRECT)
    before = read_env_file(env)["ML_REFRESH_TOKEN"]
    login = mlauth_cli("login", "--redirect-uri", REDIRECT, "--code", code, cwd=folder)
    assert login.returncode == 0, login.stderr
    assert f"tokens saved in {env}" in login.stdout
    assert read_env_file(env)["ML_REFRESH_TOKEN"] != before

    migrate = mlauth_cli("migrate", "--to", redis_server.url, cwd=folder)
    assert migrate.returncode == 0, migrate.stderr
    assert read_env_file(env)["ML_TOKEN_STORE"] == redis_server.url

    assert demo.read_bytes() == demo_before  # no command touched it
    # demo keeps its own default: it refuses to overwrite the stray file, naming it.
    serve = mlauth_cli("demo", "--serve", cwd=folder)
    assert_clean_failure(serve, 1)
    assert ".env.demo exists and was not written by the demo" in serve.stderr
    assert demo.read_bytes() == demo_before


def test_a_cron_like_environment_runs_status_and_a_command(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env, _ = project_folder(fake_ml, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # What cron gives: a bare PATH, no HOME, no terminal, stdin from /dev/null.
    cron = {"PATH": "/usr/bin:/bin"}
    call = (
        "import requests\n"
        f"r = requests.get({fake_ml.base_url + '/users/me'!r}, timeout=30)\n"
        "print(r.status_code, r.json()['path'])\n"
    )
    runs = {}
    for name, args in {
        "status": ("status", "--env", str(env)),
        "run": ("run", "--env", str(env), "--", sys.executable, "-c", call),
    }.items():
        runs[name] = subprocess.run(
            [sys.executable, "-m", "mlauth", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=elsewhere,
            env=cron,
            start_new_session=True,  # no controlling terminal
        )
    assert runs["status"].returncode == 0, runs["status"].stderr
    assert f"store:            {env}\n" in runs["status"].stdout
    assert re.search(r"expires:\s+in 2h59m", runs["status"].stdout)
    assert runs["run"].returncode == 0, runs["run"].stderr
    assert runs["run"].stdout == "200 /users/me\n"
    for done in runs.values():
        assert done.stderr == ""
        assert_no_secret(done.stdout, env)


def test_the_fake_refuses_an_api_call_without_a_token(fake_ml: FakeMercadoLibre) -> None:
    # The cron test's 200 means the token was added only if the fake refuses calls without.
    assert requests.get(f"{fake_ml.base_url}/users/me", timeout=30).status_code == 401


# -- rough edges ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--processes", "-1"), "--processes: '-1' is out of range"),
        (("--threads", "0"), "--threads: '0' is out of range"),
        (("--token-lifetime", "0"), "--token-lifetime: '0' is out of range"),
        (("--seconds", "nan"), "--seconds: 'nan' is out of range"),
        (("--serve", "--port", "99999"), "--port: '99999' is out of range"),
        (("--serve", "--port", "http"), "--port: 'http' is not a whole number"),
    ],
)
def test_bad_demo_options_are_usage_errors(
    tmp_path: Path, args: tuple[str, ...], named: str
) -> None:
    done = mlauth_cli("demo", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / ".env.demo").exists()


def test_demo_serve_on_a_busy_port_exits_at_once_saying_so(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = mlauth_cli("demo", "--serve", "--port", str(port), cwd=tmp_path)
    assert_clean_failure(done, 1)
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "another --port" in done.stderr
    assert not (tmp_path / ".env.demo").exists()  # a waiting script does not see one appear


def test_migrate_to_a_url_that_is_not_a_store_names_the_scheme(fake_ml_env: Path) -> None:
    done = mlauth_cli("migrate", "--env", str(fake_ml_env), "--to", "http://me:pw@host:80/0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "the scheme http:// is not a store mlauth knows" in done.stderr
    assert "redis://, rediss://, unix://, sqlite://, postgresql://" in done.stderr
    assert "pw" not in done.stderr and "install" not in done.stderr


def test_a_failed_code_exchange_says_so_and_what_to_do(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the exchange cannot connect
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = tmp_path / ".env"
    env.write_text(
        f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n"
        f"ML_TOKEN_URL=http://127.0.0.1:{closed}/oauth/token\n"
    )
    env.chmod(0o600)
    done = mlauth_cli("login", "--env", str(env), "--redirect-uri", REDIRECT, "--code", "TG-c1")
    assert_clean_failure(done, 1)
    assert "the authorization code exchange gave up" in done.stderr
    assert "token refresh" not in done.stderr
    assert "Run `mlauth login` again" in done.stderr


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("ML_CLIENT_SECRET", "", "ML_CLIENT_SECRET is missing"),
        ("ML_API_HOSTS", "not a host!", "ML_API_HOSTS"),
    ],
)
def test_status_with_a_broken_configuration_exits_1_naming_it(
    fake_ml_env: Path, key: str, value: str, named: str
) -> None:
    text = re.sub(rf"(?m)^{key}=.*$", f"{key}={value}", fake_ml_env.read_text())
    fake_ml_env.write_text(text)
    done = mlauth_cli("status", "--env", str(fake_ml_env))
    assert_clean_failure(done, 1)
    assert named in done.stderr
    assert "refresh token:" in done.stdout  # what it could read is still shown


def test_status_shows_a_pending_journal_answer(fake_ml_env: Path) -> None:
    stored, _ = answer_pending(fake_ml_env, "status-test")
    done = mlauth_cli("status", "--env", str(fake_ml_env))
    assert done.returncode == 0, done.stderr
    assert re.search(
        rf"journal:\s+an unsaved answer for token {stored.fingerprint}, replayed at the next "
        "refresh",
        done.stdout,
    )
    for secret in ("APP_USR-unsaved-access-for-status-test", "TG-unsaved-refresh-for-status"):
        assert secret not in done.stdout + done.stderr
    assert_no_secret(done.stdout + done.stderr, fake_ml_env)


def test_the_readme_gitignore_keeps_every_file_mlauth_writes_out_of_git(tmp_path: Path) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("environment limit: no git command on PATH")
    (block,) = re.findall(r"```gitignore\n(.*?)```", README.read_text(), flags=re.DOTALL)
    subprocess.run([git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(block)
    env = str(tmp_path / ".env")
    journal = Journal(env)
    written = [
        env,
        str(tmp_path / ".env.demo"),
        env + ".lock",
        env + COUNTER_SUFFIX,
        journal.path,
        journal.reauth_path,
        str(tmp_path / ".env.abc123.mlauth-tmp"),  # a save's temporary file, left by a crash
    ]
    for path in written:
        Path(path).write_text("x")
    incidents = FileIncidents(env)  # the alerts' open incidents (mlauth.alerts)
    for name in ("failing", "alert.reauthorization_required.sha256-1a2b3c4d"):
        assert incidents.open(name, "x")[0]
    written += sorted(str(path) for path in tmp_path.glob(".env.incident.*"))
    assert len(written) == 9
    done = subprocess.run(
        [git, "-C", str(tmp_path), "check-ignore", "--no-index", *written],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.split() == written, done.stderr
    # And nothing broader: the project's own files stay tracked.
    (tmp_path / "main.py").write_text("x")
    kept = subprocess.run([git, "-C", str(tmp_path), "check-ignore", "main.py"], check=False)
    assert kept.returncode == 1
