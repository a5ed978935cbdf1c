"""The command line's rough edges, as a user meets them: what status prints from a hostile
store, a first login, Redis down, a dead chain whose access token still works, and the files
a login or the demo server leaves behind. Each command runs as a real process."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests

import mlauth
from mlauth.cli.login import complete_login
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores.envfile import read_env_file
from mlauth.stores.journal import Journal
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.cli import REDIRECT, assert_clean_failure, assert_no_secret, mlauth_cli

# What a terminal acts on: C0 (but the line feeds between rows), DEL and C1 (ESC and CSI
# among them), bidi overrides, line separators.
TERMINAL_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2028\u2029]")
# What someone who can write the store may plant: clear the screen, retitle the window, hide
# the rest of the line, a fake row on a line of its own, and a right-to-left override.
HOSTILE = "\x1b[2J\x1b]0;pwned\x07\x1b[8m\nrefresh running:  no\r\x9b31m\u202eevil"


def assert_inert(text: str) -> None:
    """Nothing in ``text`` can drive a terminal; the planted ESC shows as a visible escape."""
    found = TERMINAL_CONTROL.findall(text)
    assert found == [], f"printed raw: {found} in {text!r}"


# -- status prints nothing a terminal acts on -------------------------------------------------


def test_status_escapes_control_characters_from_the_env_the_journal_and_the_marker(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    as_dotenv_escapes = HOSTILE.replace("\n", "\\n").replace("\r", "\\r")
    fake_ml.write_env(
        env,
        expires_at=time.time() + 3600,
        extra={
            "ML_TOKEN_REFRESHED_AT": str(time.time() - 60),
            # Raw in a double-quoted value, but \\n and \\r, which python-dotenv decodes.
            "ML_TOKEN_REFRESHED_BY": f'"{as_dotenv_escapes}"',
        },
    )
    stored = mlauth.EnvFileStore(env).load()[0].refresh_token
    assert stored is not None
    assert mlauth.EnvFileStore(env).load()[0].refreshed_by == HOSTILE
    journal = Journal(os.path.realpath(env))
    # A kept raw answer to the stored token with nothing usable in it, and a marker naming the
    # stored token, whose "by" (and the marker's "reason") someone filled.
    answer = {
        "kind": "raw",
        "spent": stored.fingerprint,
        "at": time.time(),
        "by": HOSTILE,
        "body": '{"error": "odd"}',
    }
    Path(journal.path).write_text(json.dumps(answer) + "\n")
    marker = {"refresh_token": stored.fingerprint, "at": time.time(), "by": HOSTILE}
    Path(journal.reauth_path).write_text(json.dumps({**marker, "reason": HOSTILE}))

    done = mlauth_cli("status", "--env", str(env))

    assert done.returncode == 3, done.stdout + done.stderr  # the marker names the stored token
    assert_inert(done.stdout + done.stderr)
    assert re.search(r"^last refresh: .* by \\x1b\[2J\\x1b\]0;pwned\\x07", done.stdout, re.M)
    # A writer no process could be (control characters) is not quoted at all.
    assert re.search(r"^journal: .*an answer from an unknown process at ", done.stdout, re.M)
    assert len(re.findall("^refresh running:", done.stdout, re.M)) == 1  # no planted row
    assert "seen by \\x1b[2J" in done.stderr and "\\u202eevil" in done.stderr
    assert_no_secret(done.stdout + done.stderr, env)


def test_status_escapes_control_characters_from_a_redis_hash(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, extra={"ML_TOKEN_REFRESHED_AT": str(time.time())})
    migrate_to_redis(env, redis_server.url)
    key = f"mlauth:{fake_ml.client_id}:tokens"
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        client.hset(key, mapping={"refreshed_by": HOSTILE, "chain": f"c0ffee{HOSTILE}"})

    done = mlauth_cli("status", "--env", str(env))

    assert done.returncode == 0, done.stdout + done.stderr
    assert_inert(done.stdout + done.stderr)
    assert re.search(r"^last refresh: .* by \\x1b\[2J\\x1b\]0;pwned\\x07", done.stdout, re.M)
    assert re.search(r"^generation: +1 \(chain c0ffee\\x1b\[2J", done.stdout, re.M)
    assert "\\u202eevil" in done.stdout


def test_a_path_that_is_not_utf8_is_shown_escaped_not_a_traceback(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    folder = os.path.join(os.fsencode(tmp_path), b"odd\xff\x1b[2J")
    os.mkdir(folder)
    env = os.fsdecode(os.path.join(folder, b".env"))
    fake_ml.write_env(env)

    status = mlauth_cli("status", "--env", env)
    migrate = mlauth_cli("migrate", "--env", env, "--to", redis_server.url)

    for done in (status, migrate):
        assert done.returncode == 0, done.stdout + done.stderr
        assert_inert(done.stdout + done.stderr)
    assert re.search(r"^store: +.*odd\\udcff\\x1b\[2J/\.env$", status.stdout, re.M)
    assert "odd\\udcff\\x1b[2J/.env to redis://" in migrate.stdout


def test_the_log_lines_on_stderr_are_escaped_too() -> None:
    from mlauth.logs import StderrFallback

    message = "tokens moved to %s"
    record = logging.LogRecord("mlauth", logging.WARNING, __file__, 1, message, (HOSTILE,), None)
    line = StderrFallback().format(record)
    assert_inert(line)
    assert line.startswith("mlauth: WARNING: tokens moved to \\x1b[2J")


@pytest.mark.parametrize("text", ["plain", "café 😀", "tab\tand\nline", HOSTILE])
def test_printable_keeps_ordinary_text_and_escapes_the_rest(text: str) -> None:
    from mlauth.terminal import printable

    shown = printable(text)
    assert_inert(shown.replace("\n", ""))
    assert "\n" not in shown
    if text.isprintable():
        assert shown == text
    assert len(shown) >= len(text)


# -- a first authorization is not a re-authorization -------------------------------------------


@pytest.fixture
def first_env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    """A .env before the first authorization: credentials and settings, no token yet."""
    env = tmp_path / ".env"
    env.write_text(
        f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n"
        f"ML_TOKEN_URL={fake_ml.token_url}\nML_AUTH_URL={fake_ml.base_url}\n"
        f"ML_API_HOSTS={fake_ml.host}\nML_REDIRECT_URI={REDIRECT}\n"
    )
    env.chmod(0o600)
    return env


def test_a_first_env_is_told_to_authorize_not_to_authorize_again(
    fake_ml: FakeMercadoLibre, first_env: Path
) -> None:
    folder = first_env.parent
    for command in ("status", "token", "refresh", "run"):
        args = ["--", sys.executable, "-c", "pass"] if command == "run" else []
        done = mlauth_cli(command, *args, cwd=folder)  # no options: ./.env, as a user types
        assert done.returncode == 3, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("mlauth: authorization required: "), done.stderr
        assert "fix: run `mlauth login --env .env` to authorize the app" in done.stderr
        assert "again" not in done.stderr and "re-authorization" not in done.stderr.lower()
    # The library says the same to a program started on it.
    with pytest.raises(mlauth.ConfigError) as caught:
        mlauth.MLAuth.from_env(first_env)
    assert "Authorization required: run `mlauth login`" in str(caught.value)
    assert "again" not in str(caught.value)
    # The login itself, without options (the .env names the redirect URI and the page),
    # never speaks of authorizing again either.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlauth", "login"],
        cwd=folder,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    answer = requests.get(url, allow_redirects=False, timeout=30)  # the fake's page says yes
    out, err = proc.communicate(answer.headers["Location"] + "\n", timeout=60)
    assert proc.returncode == 0, err
    assert "authorized: tokens saved in" in out
    assert "again" not in out + err
    assert fake_ml.stats()["code_exchanges"] == 1


def test_a_dead_chain_is_still_told_to_authorize_again(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    fake_ml.revoke_refresh_tokens()
    for command in ("refresh", "status"):  # the invalid_grant, then its marker
        done = mlauth_cli(command, "--env", str(fake_ml_env))
        assert_clean_failure(done, 3)
        assert done.stderr.startswith("mlauth: re-authorization required: ")
        assert "to authorize the app again" in done.stderr


# -- Redis down: no claim about a token nobody gets -------------------------------------------


def test_redis_down_says_what_failed_and_promises_no_token(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)  # expired: a request must refresh
    migrate_to_redis(env, redis_server.url)
    running = mlauth.MLAuth.from_env(env, backoff=0.001)  # read while Redis was up
    redis_server.stop()

    token = mlauth_cli("token", "--env", str(env))
    assert_clean_failure(token, 1)
    assert token.stdout == ""
    assert redis_server.url in token.stderr and "redis-server runs there" in token.stderr
    with pytest.raises(mlauth.StoreError) as caught:
        requests.get(f"{fake_ml.base_url}/users/me", auth=running, timeout=30)
    for said in (token.stderr, str(caught.value)):
        # Neither has a valid token to go on with: none of them may say one is being used.
        assert "keeps being used" not in said and "still-valid" not in said, said
    assert fake_ml.stats()["token_requests"] == 0


# -- a dead chain whose access token still works ----------------------------------------------


def assert_dead_chain_token(done: subprocess.CompletedProcess[str], env: Path) -> str:
    """Exit 3, the still-valid access token alone on stdout, and stderr saying for how long."""
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    printed = done.stdout.strip()
    assert done.stdout == printed + "\n"
    assert printed == read_env_file(env)["ML_ACCESS_TOKEN"]
    lines = done.stderr.splitlines()
    assert lines[-3].startswith("mlauth: re-authorization required: "), done.stderr
    assert re.fullmatch(
        r"mlauth: the access token printed still works for \d+m\d\ds \(until .* UTC\); nothing "
        r"will after that until the app is authorized again",
        lines[-2],
    ), done.stderr
    assert lines[-1].startswith("fix: run `mlauth login --env"), done.stderr
    assert printed not in done.stderr
    return printed


def test_token_of_a_dead_chain_prints_a_still_valid_access_token_and_exits_3(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 40 * 60)  # FRESH: no refresh is tried
    fake_ml.revoke_refresh_tokens()
    assert mlauth_cli("refresh", "--env", str(env)).returncode == 3  # the invalid_grant
    asked = fake_ml.stats()["token_requests"]

    done = mlauth_cli("token", cwd=tmp_path)  # no options, in the folder with the .env

    printed = assert_dead_chain_token(done, env)
    assert re.search(r"still works for (39|40)m", done.stderr)
    assert fake_ml.stats()["token_requests"] == asked  # the dead token was not sent again
    # What the shell user wanted it for works, for now.
    answer = requests.get(
        f"{fake_ml.base_url}/users/me", headers={"Authorization": f"Bearer {printed}"}, timeout=30
    )
    assert answer.status_code == 200


def test_token_that_meets_invalid_grant_refreshing_ahead_says_the_same(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    # Within the 300 s margin (of a 6 h token): token refreshes ahead, and learns it is dead.
    fake_ml.write_env(
        env,
        expires_at=time.time() + 120,
        extra={"ML_TOKEN_REFRESHED_AT": str(time.time() - 6 * 3600 + 120)},
    )
    fake_ml.revoke_refresh_tokens()

    done = mlauth_cli("token", "--env", str(env))

    assert fake_ml.stats()["invalid_grant"] == 1
    assert_dead_chain_token(done, env)
    again = mlauth_cli("token", "--env", str(env))  # the marker: nothing is sent now
    assert_dead_chain_token(again, env)
    assert fake_ml.stats()["token_requests"] == 1


def test_token_of_a_dead_chain_whose_access_token_expired_prints_nothing(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 5)
    fake_ml.revoke_refresh_tokens()
    for _ in range(2):  # the invalid_grant, then the marker
        done = mlauth_cli("token", "--env", str(env))
        assert_clean_failure(done, 3)
        assert done.stdout == "" and "still works" not in done.stderr


# -- what a login leaves behind -----------------------------------------------------------------


@pytest.mark.parametrize("write", ["auto", "in-place"])
def test_login_removes_the_dead_chains_marker_and_the_chain_goes_on(
    fake_ml: FakeMercadoLibre, tmp_path: Path, write: str
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 5, extra={"ML_ENV_WRITE": write})
    running = mlauth.MLAuth.from_env(env, backoff=0.001)  # a pipeline on the old chain
    fake_ml.revoke_refresh_tokens()
    with pytest.raises(mlauth.InvalidGrantError):
        requests.get(f"{fake_ml.base_url}/users/me", auth=running, timeout=30)
    journal = mlauth.EnvFileStore(env).journal()  # a file beside it, or an xattr in-place
    assert journal.marker() is not None

    code = fake_ml.issue_authorization_code(REDIRECT)
    login = mlauth_cli("login", "--redirect-uri", REDIRECT, "--code", code, cwd=tmp_path)

    assert login.returncode == 0, login.stderr
    assert journal.marker() is None
    assert not Path(f"{env}.reauth").exists()
    assert mlauth_cli("status", cwd=tmp_path).returncode == 0
    # The process that met the invalid_grant adopts the new chain and never sends the dead
    # token again; its next refresh spends the new one.
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=running, timeout=30).status_code == 200
    running.refresh()
    assert fake_ml.stats()["invalid_grant"] == 1
    assert fake_ml.stats()["refreshes"] == 1


def test_login_removes_the_marker_after_the_save_and_under_the_lock(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_ml.revoke_refresh_tokens()
    assert mlauth_cli("refresh", "--env", str(fake_ml_env)).returncode == 3  # the marker
    seen: list[tuple[object, bool | None, bool]] = []
    remove = Journal.clear_reauthorization

    def watched(journal: Journal) -> None:
        peer = mlauth.EnvFileStore(fake_ml_env)  # another lock object, as another process has
        seen.append(
            (peer.load()[0].refresh_token, peer.refresh_in_progress(), journal.marker() is None)
        )
        remove(journal)

    monkeypatch.setattr(Journal, "clear_reauthorization", watched)
    code = mlauth.Secret(fake_ml.issue_authorization_code(REDIRECT))
    store = mlauth.EnvFileStore(fake_ml_env)

    tokens = complete_login(str(fake_ml_env), store, code=code, redirect_uri=REDIRECT)

    # When the marker went, the store already held the new chain, and the lock was held.
    assert seen == [(tokens.refresh_token, True, False)]
    assert Journal(os.path.realpath(fake_ml_env)).marker() is None


# -- mlauth demo: its help, what --serve says when it stops, and the files it leaves ----------


def test_demo_help_explains_every_option_with_its_default() -> None:
    done = mlauth_cli("demo", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps at the terminal's width
    for option, default in (("--processes", "6"), ("--threads", "4"), ("--seconds", "15")):
        shown = re.search(rf"{option} {option[2:].upper()} (.*?)\(default: (\w+)\)", text)
        assert shown is not None, text
        assert shown[1].strip(), f"{option} has no help text"
        assert shown[2] == default
    assert "print what it served" in text


DemoServer = Callable[[], tuple[subprocess.Popen[str], str]]


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[DemoServer]:
    """Starts ``mlauth demo --serve`` in ``tmp_path``: it and its base URL, once its .env is
    written. Any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []

    def start() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlauth", "demo", "--serve"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed once the .env is in place
        found = re.match(r"fake MercadoLibre at (http://127\.0\.0\.1:\d+) ", first)
        assert found is not None, first
        return proc, found[1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_serve_prints_its_counters_and_removes_only_its_own_files(
    demo_server: DemoServer, tmp_path: Path, signum: int
) -> None:
    proc, base = demo_server()
    # A second store of the same chain (the user's own files), which spends the refresh
    # token first: the demo's own .env then meets invalid_grant and gets its marker.
    (tmp_path / ".env.copy").write_text((tmp_path / ".env.demo").read_text())
    (tmp_path / ".env.copy").chmod(0o600)
    assert mlauth_cli("refresh", "--env", ".env.copy", cwd=tmp_path).returncode == 0
    assert mlauth_cli("refresh", "--env", ".env.demo", cwd=tmp_path).returncode == 3
    token = mlauth_cli("token", "--env", ".env.copy", cwd=tmp_path).stdout.strip()
    for bearer in (token, "stale"):
        requests.get(f"{base}/users/me", headers={"Authorization": f"Bearer {bearer}"}, timeout=30)
    assert {".env.demo.lock", ".env.demo.journal", ".env.demo.reauth"} <= set(os.listdir(tmp_path))

    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, out + err
    assert re.search(
        r"^fake MercadoLibre stopped after \d+s: calls=2 \(1 ok, 1 answered 401\) refreshes=1 "
        r"invalid_grant=1 logins=0$",
        out,
        re.M,
    ), out
    assert sorted(os.listdir(tmp_path)) == [
        ".env.copy",
        ".env.copy.generation",
        ".env.copy.journal",
        ".env.copy.lock",
    ]


def test_a_stopping_demo_server_leaves_the_files_of_one_that_took_its_path_over(
    demo_server: DemoServer, tmp_path: Path
) -> None:
    first, _ = demo_server()
    second, base = demo_server()  # rewrites .env.demo for itself
    assert mlauth_cli("refresh", "--env", ".env.demo", cwd=tmp_path).returncode == 0

    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=60)

    assert ".env.demo now belongs to another server: left as it is" in out
    assert {".env.demo", ".env.demo.lock", ".env.demo.journal"} <= set(os.listdir(tmp_path))
    assert read_env_file(tmp_path / ".env.demo")["ML_TOKEN_URL"] == f"{base}/oauth/token"
    assert mlauth_cli("refresh", "--env", ".env.demo", cwd=tmp_path).returncode == 0
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=60)
    assert "refreshes=2 invalid_grant=0" in out
    assert os.listdir(tmp_path) == []
