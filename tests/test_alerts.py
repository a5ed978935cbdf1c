"""The alert command (mlauth.alerts): once per incident for every process on a store, with
the incident in its environment and on stdin, and never a secret.

The command is a real ``/bin/sh -c`` that writes what it was given into a folder
(tests/support/alert_recorder.py); the processes are real, against the loopback fake.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mlauth
from mlauth import events
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores.envfile import read_env_file, update_env_file
from mlauth.stores.redis import RedisStore
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support import SCRIPTS
from tests.support.alert_recorder import RECORDER, alerts_in, everything_given
from tests.support.kernel_locks import DEADLINE
from tests.support.leaks import assert_no_secret


def secrets_of(fake: FakeMercadoLibre, env: Path) -> list[str]:
    values = read_env_file(env)
    return [fake.client_secret] + [
        v for k, v in values.items() if v and k in ("ML_ACCESS_TOKEN", "ML_REFRESH_TOKEN")
    ]


def workers_start(env: Path, url: str, out: Path) -> subprocess.Popen[str]:
    """One process, one request through mlauth, the recorder as its alert command."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "event_worker.py"), "requests", str(env), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "ML_ALERT_COMMAND": RECORDER, "MLAUTH_TEST_OUT": str(out)},
        text=True,
    )


def workers(env: Path, url: str, out: Path, count: int) -> list[dict[str, Any]]:
    """``count`` processes at once, each one request through mlauth with the recorder as
    its alert command (and the client secret in its environment, which must not reach it)."""
    environment = dict(os.environ)
    environment.update(
        ML_ALERT_COMMAND=RECORDER,
        MLAUTH_TEST_OUT=str(out),
        ML_CLIENT_SECRET=read_env_file(env)["ML_CLIENT_SECRET"] or "",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "event_worker.py"), "requests", str(env), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            text=True,
        )
        for _ in range(count)
    ]
    found = []
    for proc in procs:
        out_text, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
        found.append(json.loads(out_text))
    return found


def test_eight_processes_meeting_a_dead_token_alert_once(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env, out = tmp_path / ".env", tmp_path / "alerts"
    out.mkdir()
    fake_ml.write_env(env, expires_at=time.time() - 10)
    secrets = secrets_of(fake_ml, env)
    fake_ml.revoke_refresh_tokens()
    url = f"{fake_ml.base_url}/users/me"
    found = workers(env, url, out, 8)
    assert all(f["statuses"] == ["InvalidGrantError"] for f in found)
    told = sum(e["kind"] == "reauthorization_required" for f in found for e in f["events"])
    assert told == 8  # every process knew; one alerted
    (alert,) = alerts_in(out)
    assert alert["alert"] == "reauthorization_required"
    assert alert["store"] == str(env) and "mlauth login" in alert["message"]
    assert alert["event"]["kind"] == "reauthorization_required"
    (environment,) = out.glob("alert.*.env")
    given = dict(line.split("=", 1) for line in environment.read_text().splitlines() if "=" in line)
    assert given["MLAUTH_ALERT"] == "reauthorization_required"
    assert given["MLAUTH_ALERT_STORE"] == str(env)
    assert "ML_CLIENT_SECRET" not in given
    (arguments,) = out.glob("alert.*.args")
    assert arguments.read_text() == "/bin/sh\n"  # $0 only: the command took no argument
    assert_no_secret(everything_given(out), secrets, "the alert command's input")
    # The incident stays open: more processes meeting it alert no more.
    workers(env, url, out, 2)
    assert len(alerts_in(out)) == 1
    # A new chain (a login) that refreshes ends it; the next dead chain alerts again.
    fake_ml.write_env(env, expires_at=time.time() - 10)
    mlauth.MLAuth.from_env(env).refresh()
    assert events.flush(DEADLINE)
    fake_ml.revoke_refresh_tokens()
    update_env_file(env, {"ML_TOKEN_EXPIRES_AT": "1"})  # expired: the next request refreshes
    workers(env, url, out, 2)
    assert [a["alert"] for a in alerts_in(out)] == ["reauthorization_required"] * 2


def alerting_env(fake: FakeMercadoLibre, env: Path, out: Path, minutes: str) -> None:
    fake.write_env(
        env,
        expires_at=time.time() - 10,
        extra={"ML_ALERT_COMMAND": RECORDER, "ML_ALERT_FAILING_MINUTES": minutes},
    )
    os.environ["MLAUTH_TEST_OUT"] = str(out)


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "alerts"
    folder.mkdir()
    yield folder
    os.environ.pop("MLAUTH_TEST_OUT", None)


def test_refreshes_failing_for_longer_than_the_limit_alert_once(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    env = tmp_path / ".env"
    alerting_env(fake_ml, env, out, "60")
    fake_ml.fail_next_token_requests(3, status=503)  # the three refreshes below
    auth = mlauth.MLAuth.from_env(env, max_attempts=1, backoff=0.0)
    with pytest.raises(mlauth.RefreshError):
        auth.refresh()
    assert events.flush(DEADLINE)
    assert alerts_in(out) == []  # failing for less than an hour
    # Another process's first failure, an hour ago, is on record beside the .env.
    (tmp_path / ".env.incident.failing").write_text(repr(time.time() - 3601))
    for _ in range(2):
        with pytest.raises(mlauth.RefreshError):
            mlauth.MLAuth.from_env(env, max_attempts=1, backoff=0.0).refresh()
    assert events.flush(DEADLINE)
    (alert,) = alerts_in(out)
    assert alert["alert"] == "refresh_failing" and alert["event"]["kind"] == "refresh_failed"
    assert alert["since"] <= time.time() - 3600
    # A refresh that works ends the incident, and its records go.
    mlauth.MLAuth.from_env(env).refresh()
    assert events.flush(DEADLINE)
    assert sorted(p.name for p in tmp_path.glob(".env.incident.*")) == []


def test_a_failing_alert_command_is_logged_and_breaks_nothing(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(
        env,
        expires_at=time.time() - 10,
        extra={"ML_ALERT_COMMAND": "echo no webhook today >&2; exit 3"},
    )
    fake_ml.revoke_refresh_tokens()
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    assert events.flush(DEADLINE)
    said = [r.getMessage() for r in caplog.records if "alert command" in r.getMessage()]
    assert said == ["the alert command (ML_ALERT_COMMAND) exited with 3: no webhook today"]


def test_a_bad_failing_limit_names_the_key(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, extra={"ML_ALERT_FAILING_MINUTES": "ten"})
    with pytest.raises(mlauth.ConfigError, match="ML_ALERT_FAILING_MINUTES='ten'"):
        mlauth.MLAuth.from_env(env)


SCRIPT = """
import requests, sys
print(requests.get(sys.argv[1] + "/users/me", timeout=30).status_code)
"""


MLAUTH_RUN = (sys.executable, "-m", "mlauth", "run")


def run_with_alert(env: Path, script: Path, url: str, out: Path) -> int:
    return subprocess.run(
        [
            *MLAUTH_RUN,
            "--env",
            str(env),
            "--alert",
            RECORDER,
            "--",
            sys.executable,
            str(script),
            url,
        ],
        capture_output=True,
        env={**os.environ, "MLAUTH_TEST_OUT": str(out)},
        timeout=DEADLINE,
        check=False,
    ).returncode


def test_mlauth_run_alert_reaches_the_commands_python(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    script = tmp_path / "main.py"
    script.write_text(SCRIPT)
    assert run_with_alert(env, script, fake_ml.base_url, out) == 0
    assert alerts_in(out) == []  # it worked: nothing to say
    fake_ml.revoke_refresh_tokens()
    update_env_file(env, {"ML_TOKEN_EXPIRES_AT": "1"})
    assert run_with_alert(env, script, fake_ml.base_url, out) != 0
    assert [a["alert"] for a in alerts_in(out)] == ["reauthorization_required"]


# Stands in for the network: records its arguments and stdin, answers like a webhook.
CURL = """#!/bin/sh
printf '%s\\n' "$@" > "$MLAUTH_TEST_OUT/curl.$$.args"
cat > "$MLAUTH_TEST_OUT/curl.$$.stdin"
echo '{"ok":true}'
"""


def documented_alerts() -> dict[str, str]:
    """The ``--alert`` commands of docs/monitoring.md, by the service they post to."""
    page = (Path(__file__).parent.parent / "docs" / "monitoring.md").read_text()
    commands = {}
    for line in page.splitlines():
        if line.startswith("mlauth run --alert "):
            words = shlex.split(line)
            command = words[words.index("--alert") + 1]
            commands["telegram" if "telegram" in command else "slack"] = command
    assert sorted(commands) == ["slack", "telegram"]
    return commands


@pytest.mark.parametrize("service", ["telegram", "slack"])
def test_the_documented_alert_commands_send_the_message(
    service: str, fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env, out, bin_dir = tmp_path / ".env", tmp_path / "alerts", tmp_path / "bin"
    out.mkdir()
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(CURL)
    (bin_dir / "curl").chmod(0o755)
    fake_ml.write_env(env, expires_at=time.time() - 10)
    fake_ml.revoke_refresh_tokens()
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "ML_ALERT_COMMAND": documented_alerts()[service],
        "MLAUTH_TEST_OUT": str(out),
        "TELEGRAM_BOT_TOKEN": "123456:fake-bot-token",
        "TELEGRAM_CHAT_ID": "-1001234",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/fake",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "event_worker.py"), "requests", str(env), fake_ml.base_url],
        capture_output=True,
        text=True,
        env=environment,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "alert command" not in done.stderr  # it exited 0
    (args,) = [p.read_text().splitlines() for p in out.glob("curl.*.args")]
    (stdin,) = [p.read_text() for p in out.glob("curl.*.stdin")]
    message = f"mlauth: the seller must authorize the app again: run `mlauth login` ({env})"
    if service == "telegram":
        assert "https://api.telegram.org/bot123456:fake-bot-token/sendMessage" in args
        assert "chat_id=-1001234" in args
        assert args[args.index("--data-urlencode") + 1] == f"text={message}"
    else:
        assert args[-1] == "https://hooks.slack.com/services/T000/B000/fake"
        assert json.loads(stdin) == {"text": message}


def test_processes_on_one_redis_alert_once(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Each process has a .env of its own (as on machines of their own), all on one Redis.
    out = tmp_path / "alerts"
    out.mkdir()
    envs = []
    for index in range(3):
        folder = tmp_path / f"machine{index}"
        folder.mkdir()
        envs.append(folder / ".env")
    fake_ml.write_env(envs[0], expires_at=time.time() - 10)
    migrate_to_redis(envs[0], redis_server.url)
    for env in envs[1:]:
        env.write_text(envs[0].read_text())
    fake_ml.revoke_refresh_tokens()
    url = f"{fake_ml.base_url}/users/me"
    procs = [workers_start(env, url, out) for env in envs]
    for proc in procs:
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
    (alert,) = alerts_in(out)
    assert alert["alert"] == "reauthorization_required"
    assert alert["store"] == RedisStore(redis_server.url).location


def test_an_odd_reason_reaches_the_command_escaped_and_cut(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    # The server's error text goes into MLAUTH_ALERT_REASON: a NUL (no environment can hold
    # one), CR/LF and 200,000 characters must not stop the alert.
    env = tmp_path / ".env"
    alerting_env(fake_ml, env, out, "10")
    description = "bad\u0000grant\r\nline2 " + "x" * 200_000
    body = json.dumps({"error": "invalid_grant", "error_description": description})
    fake_ml.fail_next_token_requests(1, status=400, error="invalid_grant", body=body)
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    assert events.flush(DEADLINE)
    (alert,) = alerts_in(out)
    assert alert["alert"] == "reauthorization_required"
    (environment,) = out.glob("alert.*.env")
    reason = [
        line for line in environment.read_text().splitlines() if line.startswith("MLAUTH_ALERT_")
    ]
    (given,) = [line for line in reason if line.startswith("MLAUTH_ALERT_REASON=")]
    assert "\\x00" in given and "\r" not in given and len(given) <= 4200


def test_secrets_under_other_names_stay_out_of_the_commands_environment(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / ".env"
    alerting_env(fake_ml, env, out, "10")
    monkeypatch.setenv("MELI_CLIENT_SECRET", fake_ml.client_secret)  # docker --env-file
    monkeypatch.setenv("APP_CACHE", "redis://:hunter2-not-real@127.0.0.1:6390/0")
    monkeypatch.setenv("MLAUTH_HARMLESS", "kept")
    fake_ml.revoke_refresh_tokens()
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    assert events.flush(DEADLINE)
    (environment,) = out.glob("alert.*.env")
    names = {line.split("=", 1)[0] for line in environment.read_text().splitlines() if "=" in line}
    assert "MLAUTH_HARMLESS" in names
    assert not names & {"MELI_CLIENT_SECRET", "APP_CACHE"}
    assert_no_secret(everything_given(out), [fake_ml.client_secret, "hunter2-not-real"], "alert")


def test_an_incident_nobody_saw_end_reminds_after_a_day(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    env = tmp_path / ".env"
    alerting_env(fake_ml, env, out, "0")
    # A store outage alerted two days ago by a cron job that exited before it ended.
    (tmp_path / ".env.incident.alert.refresh_failing").write_text(f"{time.time() - 2 * 86400!r} x")
    fake_ml.fail_next_token_requests(2, status=503)
    for _ in range(2):
        with pytest.raises(mlauth.RefreshError):
            mlauth.MLAuth.from_env(env, max_attempts=1, backoff=0.0).refresh()
    assert events.flush(DEADLINE)
    assert [a["alert"] for a in alerts_in(out)] == ["refresh_failing"]  # once, not twice


def test_a_timed_out_command_is_not_quoted(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = tmp_path / ".env"
    hook = "https://hooks.example.test/services/FAKE-webhook-secret"
    command = f"sleep 30 && curl -fsS {hook}"
    fake_ml.write_env(env, expires_at=time.time() - 10, extra={"ML_ALERT_COMMAND": f"'{command}'"})
    assert read_env_file(env)["ML_ALERT_COMMAND"] == command
    monkeypatch.setattr("mlauth.alerts.COMMAND_TIMEOUT", 0.5)
    fake_ml.revoke_refresh_tokens()
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    assert events.flush(DEADLINE)
    said = [r.getMessage() for r in caplog.records if "alert command" in r.getMessage()]
    assert said == ["the alert command (ML_ALERT_COMMAND) timed out after 0.5s"]
    assert hook not in caplog.text


def test_an_error_while_the_environment_is_built_carries_no_secret_in_its_frames(
    fake_ml: FakeMercadoLibre, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The subscriber logs what it raised with its traceback; a crash reporter's logging
    # integration sends every frame's locals. The frame that held the secrets is not there.
    from mlauth import alerts

    def broken(url: str) -> str:
        raise RuntimeError("a bug while comparing values")

    monkeypatch.setattr(alerts, "redact_url", broken)
    secret = mlauth.Secret("fake-client-secret-in-a-frame")
    with pytest.raises(RuntimeError) as caught:
        alerts._environment({"MLAUTH_ALERT": "x"}, [secret])
    frames = []
    tb = caught.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    said = repr([frame.f_locals for frame in frames])
    assert secret.reveal() not in said
