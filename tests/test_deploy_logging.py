"""Start-up checks and visible log lines for `mlauth run` and `install()`, as real processes.

Run as root, a ``chmod 555`` folder stays writable; the unwritable folder here is a real
read-only bind mount, and the unusable lock a lock path that is a directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlauth.stores.envfile import read_env_file
from mlauth.stores.journal import Journal
from mlauth.testing import FakeMercadoLibre
from tests.support.cli import assert_clean_failure, mlauth_cli
from tests.support.lock_holder import lock_held_by_another_process

pytestmark = pytest.mark.processes

MOUNT, UMOUNT = shutil.which("mount"), shutil.which("umount")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` as a read-only bind mount of itself, undone afterwards."""
    if MOUNT is None or UMOUNT is None:
        pytest.skip("environment limit: no mount/umount command on PATH")
    done = subprocess.run(
        [MOUNT, "--bind", str(folder), str(folder)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"environment limit: mount --bind refused: {done.stderr.strip()}")
    try:
        done = subprocess.run(
            [MOUNT, "-o", "remount,bind,ro", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"environment limit: read-only remount refused: {done.stderr.strip()}")
        with pytest.raises(OSError, match="Read-only"):
            (folder / "probe").write_text("x")  # it really refuses root
        yield
    finally:
        subprocess.run([UMOUNT, str(folder)], check=True)


def run_python(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def secrets_of(env: Path) -> list[str]:
    """Every token and the secret the .env and its journal hold."""
    values = read_env_file(env)
    found = [v for k, v in values.items() if v and k in ("ML_ACCESS_TOKEN", "ML_REFRESH_TOKEN")]
    found.append(values["ML_CLIENT_SECRET"] or "<none>")
    for record in Journal(str(env)).records():
        answer = record.get("tokens") or {}
        found += [answer[k] for k in ("access_token", "refresh_token") if answer.get(k)]
    return found


# -- refusing to start a pipeline whose refresh would fail -----------------------------------


def test_run_refuses_before_starting_when_the_folder_is_read_only(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    with read_only(fake_ml_env.parent):
        done = mlauth_cli(
            "run",
            "--env",
            str(fake_ml_env),
            "--",
            sys.executable,
            "-c",
            f"open({str(marker)!r}, 'w')",
        )
    assert_clean_failure(done, 1)
    assert not marker.exists()
    (line,) = done.stderr.splitlines()
    assert "the command was not started" in line
    assert "Read-only file system" in line and "read-write mount" in line


def test_run_refuses_before_starting_when_the_refresh_lock_cannot_be_taken(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    Path(f"{fake_ml_env}.lock").mkdir()  # opening the lock file fails, for root too
    done = mlauth_cli(
        "run", "--env", str(fake_ml_env), "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"
    )
    assert_clean_failure(done, 1)
    assert not marker.exists()
    lock = f"{fake_ml_env}.lock"
    assert f"refusing the refresh lock {lock}: it is a directory" in done.stderr
    assert f"`rmdir {lock}`" in done.stderr  # the fix


def test_run_starts_while_a_peer_holds_the_refresh_lock(fake_ml_env: Path) -> None:
    with lock_held_by_another_process(fake_ml_env):
        done = mlauth_cli("run", "--env", str(fake_ml_env), "--", sys.executable, "-c", "print(1)")
    assert (done.returncode, done.stdout, done.stderr) == (0, "1\n", "")


def test_from_env_logs_an_error_at_start_and_still_works_with_a_valid_token(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    script = (
        "import logging, sys, requests, mlauth\n"
        "logging.basicConfig(stream=sys.stderr, format='%(levelname)s %(message)s')\n"
        f"auth = mlauth.MLAuth.from_env({str(fake_ml_env)!r})\n"
        "print('built', flush=True)\n"
        f"print(requests.get({fake_ml.base_url + '/users/me'!r}, auth=auth).status_code)\n"
    )
    with read_only(fake_ml_env.parent):
        done = run_python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "built\n200\n"  # not raised: the valid token still serves
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("ERROR ")]
    assert "the next token refresh will fail" in line and "Read-only file system" in line


# -- warnings and errors reach stderr -------------------------------------------------------

FAILING_SAVE = (
    "import mlauth\n"
    "def refuse(self, tokens):\n"  # the disk fills while the token POST is out
    "    raise mlauth.StoreError('cannot write the .env: No space left on device (simulated)')\n"
    "mlauth.EnvFileStore.save = refuse\n"
)


def loose_expired_env(fake: FakeMercadoLibre, tmp_path: Path) -> Path:
    """A .env readable by others (0644) whose token is due: the first call refreshes."""
    tmp_path.mkdir(exist_ok=True)
    env = tmp_path / ".env"
    fake.write_env(env, expires_at=time.time() - 10)
    env.chmod(0o644)
    return env


def api_call(fake: FakeMercadoLibre) -> str:
    return f"import requests\nprint(requests.get({fake.base_url + '/users/me'!r}).status_code)\n"


def assert_warning_and_error_once(stderr: str, env: Path) -> None:
    assert stderr.count(f"chmod 600 {env}") == 1, stderr
    assert stderr.count("refreshed tokens could not be saved") == 1, stderr
    assert "keeps them in memory and retries saving" in stderr
    for secret in secrets_of(env):
        assert secret not in stderr


def json_lines(stderr: str) -> list[dict[str, object]]:
    """Each stderr line as the JSON object it must be (a line that is not one fails)."""
    objects = [json.loads(line) for line in stderr.splitlines()]
    assert all(isinstance(found, dict) for found in objects), stderr
    return objects


def assert_shown_as(log_format: str, stderr: str, level: str, message: str) -> None:
    """``message`` at ``level`` shown once by mlauth's fallback, in ``log_format``."""
    if log_format == "text":
        assert stderr.count(f"mlauth: {level}: {message}") == 1, stderr
        return
    (found,) = [line for line in json_lines(stderr) if message in str(line["message"])]
    assert (found["level"], found["logger"]) == (level, "mlauth")
    assert isinstance(found["pid"], int) and str(found["message"]).startswith(message)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(found["time"]))


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("how", ["mlauth run", "install()"])
def test_a_script_without_logging_shows_the_mode_warning_and_the_unsaved_tokens_error(
    fake_ml: FakeMercadoLibre, tmp_path: Path, how: str, log_format: str
) -> None:
    env = loose_expired_env(fake_ml, tmp_path)
    script = FAILING_SAVE + api_call(fake_ml)
    environ = {"MLAUTH_LOG_FORMAT": log_format}
    if how == "mlauth run":
        command = ("run", "--env", str(env), "--", sys.executable, "-c", script)
        done = mlauth_cli(*command, environ=environ)
    else:
        install = f"import mlauth\nmlauth.install({str(env)!r})\n"
        done = run_python("-c", install + script, env={**os.environ, **environ})
    assert (done.returncode, done.stdout) == (0, "200\n"), done.stderr
    assert_warning_and_error_once(done.stderr, env)
    assert_shown_as(log_format, done.stderr, "ERROR", "refreshed tokens could not be saved")
    assert_shown_as(log_format, done.stderr, "WARNING", f"{env} holds tokens")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_script_that_configures_logging_itself_gets_each_line_once(
    fake_ml: FakeMercadoLibre, tmp_path: Path, log_format: str
) -> None:
    env = loose_expired_env(fake_ml, tmp_path)
    # basicConfig runs after the sitecustomize installed mlauth: from then on the app's
    # handler prints mlauth's lines, and only it, in the app's own format.
    script = "import logging\nlogging.basicConfig()\n" + FAILING_SAVE + api_call(fake_ml)
    done = mlauth_cli(
        "run",
        "--env",
        str(env),
        "--",
        sys.executable,
        "-c",
        script,
        environ={"MLAUTH_LOG_FORMAT": log_format},
    )
    assert (done.returncode, done.stdout) == (0, "200\n"), done.stderr
    assert_warning_and_error_once(done.stderr, env)
    assert "ERROR:mlauth:refreshed tokens could not be saved" in done.stderr  # basicConfig's
    # The mode warning came before basicConfig: mlauth's fallback showed it, in its format.
    before, _, after = done.stderr.partition("ERROR:mlauth:refreshed tokens could not be saved")
    assert_shown_as(log_format, before, "WARNING", f"{env} holds tokens")
    assert "mlauth: " not in after and '"level"' not in after


def test_quiet_and_the_environment_variable_silence_mlauth_and_verbose_shows_info(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = loose_expired_env(fake_ml, tmp_path)
    script = FAILING_SAVE + api_call(fake_ml)
    quiet = mlauth_cli("run", "-q", "--env", str(env), "--", sys.executable, "-c", script)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "200\n", "")
    status = mlauth_cli("status", "-q", "--env", str(env))
    assert status.returncode == 0 and status.stderr == ""
    other = loose_expired_env(fake_ml, tmp_path / "other")  # its own chain: a fresh start
    off = run_python(
        "-c",
        f"import mlauth\nmlauth.install({str(other)!r})\n" + script,
        env={"MLAUTH_LOG_LEVEL": "off", "PATH": "/usr/bin:/bin"},
    )
    assert (off.returncode, off.stdout, off.stderr) == (0, "200\n", "")
    env = loose_expired_env(fake_ml, tmp_path / "third")
    env.chmod(0o600)
    verbose = mlauth_cli("refresh", "-v", "--env", str(env))
    assert verbose.returncode == 0, verbose.stderr
    assert "mlauth: INFO: refreshed MercadoLibre token (forced)" in verbose.stderr
    for secret in secrets_of(env):
        assert secret not in verbose.stderr


def test_status_warns_about_a_loose_env_file(fake_ml_env: Path) -> None:
    fake_ml_env.chmod(0o644)
    done = mlauth_cli("status", "--env", str(fake_ml_env))
    assert done.returncode == 0
    assert done.stderr == (
        f"mlauth: WARNING: {fake_ml_env} holds tokens but is readable by other users "
        f"(mode 0644); fix with: chmod 600 {fake_ml_env}\n"
    )


# -- MLAUTH_LOG_FORMAT=json -------------------------------------------------------------------


def test_json_lines_of_a_debug_refresh_hold_no_token_or_secret(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    """The command and a script under `mlauth run` each refresh; every line is an object."""
    environ = {"MLAUTH_LOG_LEVEL": "debug", "MLAUTH_LOG_FORMAT": "json"}
    env = loose_expired_env(fake_ml, tmp_path)
    env.chmod(0o600)
    secrets = secrets_of(env)  # the tokens the command spends, and the secret
    forced = mlauth_cli("refresh", "--env", str(env), environ=environ)
    assert forced.returncode == 0, forced.stderr
    (tmp_path / "script.py").write_text(api_call(fake_ml))
    fake_ml.write_env(env, expires_at=time.time() - 10)  # due again, for the script
    secrets += secrets_of(env)
    run = mlauth_cli(
        "run", "--env", str(env), "--", sys.executable, str(tmp_path / "script.py"),
        environ=environ,
    )  # fmt: skip
    assert (run.returncode, run.stdout) == (0, "200\n"), run.stderr
    assert fake_ml.stats()["refreshes"] == 2
    secrets += secrets_of(env)  # what the script's refresh saved
    for done in (forced, run):
        messages = [str(line["message"]) for line in json_lines(done.stderr)]
        assert any(m.startswith("refreshed MercadoLibre token") for m in messages), messages
        assert {"DEBUG", "INFO"} <= {line["level"] for line in json_lines(done.stderr)}
        for secret in secrets:
            assert secret not in done.stderr
            assert json.dumps(secret)[1:-1] not in done.stderr


def test_a_bad_log_format_is_said_once_in_one_line_and_text_is_written(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = loose_expired_env(fake_ml, tmp_path)
    environ = {"MLAUTH_LOG_FORMAT": "xml"}
    status = mlauth_cli("status", "--env", str(env), environ=environ)
    run = mlauth_cli(
        "run", "--env", str(env), "--", sys.executable, "-c", api_call(fake_ml), environ=environ
    )
    for done in (status, run):  # run: said by the script's install(), not again by mlauth run
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines()[0] == (
            "mlauth: WARNING: MLAUTH_LOG_FORMAT='xml' is not a log format; use text or json "
            "(writing text)"
        )
        assert done.stderr.count("MLAUTH_LOG_FORMAT") == 1
        assert f"mlauth: WARNING: {env} holds tokens" in done.stderr  # still shown, as text
