"""The ``mlauth`` command against the loopback fake, run as a real process each time."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

import mlauth
from mlauth.cli.login import AUTH_HOSTS, LoginRequest, authorization_base, parse_pasted
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.cli import (
    REDIRECT,
    assert_clean_failure,
    assert_no_secret,
    mlauth_cli,
)
from tests.support.lock_holder import lock_held_by_another_process
from tests.support.mounts import remount_read_only, tmpfs

# -- status -------------------------------------------------------------------------------


def test_status_shows_fingerprints_expiry_and_the_last_refresh(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3 * 3600)
    mlauth.MLAuth.from_env(env).refresh()
    done = mlauth_cli("status", "--env", str(env))
    assert done.returncode == 0, done.stderr
    tokens = mlauth.EnvFileStore(env).load()[0]
    assert tokens.access_token is not None and tokens.refresh_token is not None
    assert f"access token:     {tokens.access_token.fingerprint}" in done.stdout
    assert f"refresh token:    {tokens.refresh_token.fingerprint}" in done.stdout
    assert re.search(r"expires:\s+in 5h59m", done.stdout)
    assert f"by pid {os.getpid()}@" in done.stdout
    assert re.search(r"refresh running:\s+no", done.stdout)
    assert str(env) in done.stdout
    assert_no_secret(done.stdout + done.stderr, env)


def test_status_says_when_a_refresh_is_running(fake_ml_env: Path) -> None:
    with lock_held_by_another_process(fake_ml_env):
        done = mlauth_cli("status", "--env", str(fake_ml_env))
    assert done.returncode == 0
    assert re.search(r"refresh running:\s+yes \(lock held\)", done.stdout)


def test_status_without_a_refresh_token_asks_for_login(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    env.write_text(f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET=x\n")
    env.chmod(0o600)
    done = mlauth_cli("status", "--env", str(env))
    assert_clean_failure(done, 3)
    assert "mlauth login" in done.stderr
    assert "refresh token:    <none>" in done.stdout


def test_after_invalid_grant_status_token_and_refresh_say_re_authorization_required(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    fake_ml.revoke_refresh_tokens()
    first = mlauth_cli("refresh", "--env", str(fake_ml_env))
    assert_clean_failure(first, 3)  # a real invalid_grant, which leaves the marker
    assert Path(f"{os.path.realpath(fake_ml_env)}.reauth").is_file()
    asked = fake_ml.stats()["token_requests"]
    for command in ("status", "token", "refresh"):
        done = mlauth_cli(command, "--env", str(fake_ml_env))
        if command == "token":  # its access token may still work: printed, and said so
            assert done.returncode == 3 and "the access token printed" in done.stderr
        else:
            assert_clean_failure(done, 3)
        assert "re-authorization required" in done.stderr
        assert "was refused by MercadoLibre" in done.stderr
        assert f"mlauth login --env {fake_ml_env}" in done.stderr
    assert "refresh token:" in mlauth_cli("status", "--env", str(fake_ml_env)).stdout
    assert fake_ml.stats()["token_requests"] == asked  # nobody asked again
    # A new authorization makes the marker stale: status is fine again.
    code = fake_ml.issue_authorization_code(REDIRECT)
    login = mlauth_cli(
        "login", "--env", str(fake_ml_env), "--redirect-uri", REDIRECT, "--code", code
    )
    assert login.returncode == 0, login.stderr
    assert mlauth_cli("status", "--env", str(fake_ml_env)).returncode == 0


def test_no_credentials_and_no_refresh_token_names_the_credentials(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("OTHER=1\n")
    for command in ("token", "refresh"):
        done = mlauth_cli(command, "--env", str(env))
        assert_clean_failure(done, 1)
        assert "ML_CLIENT_ID" in done.stderr


def test_a_missing_env_is_one_line_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / ".env"
    for command in ("status", "token", "refresh", "login"):
        done = mlauth_cli(command, "--env", str(missing), input="")
        assert_clean_failure(done, 1)
        assert str(missing) in done.stderr and "no such .env file" in done.stderr
        # A first login needs only the app's credentials: it writes the refresh token.
        assert "ML_REFRESH_TOKEN unless `mlauth login` is to write one" in done.stderr
    assert not missing.exists()


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("ML_TOKEN_EXPIRES_AT", "1e400"),
        ("ML_TOKEN_EXPIRES_AT", "nan"),
        ("ML_TOKEN_REFRESHED_AT", "99999999999999"),
    ],
)
def test_status_with_an_impossible_time_is_one_line_naming_the_key(
    fake_ml: FakeMercadoLibre, tmp_path: Path, key: str, raw: str
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, extra={key: raw})
    done = mlauth_cli("status", "--env", str(env))
    assert_clean_failure(done, 1)
    assert f"{key}={raw!r}" in done.stderr and "delete the line" in done.stderr


def test_status_lines_survive_times_no_calendar_has() -> None:
    from mlauth.cli.commands import _duration, _when

    assert "not a valid time" in _when(1e300)
    assert "not a valid time" in _when(float("nan"))
    assert _duration(float("inf")) == _duration(float("nan")) == "an unknown time"
    assert _duration(-3661.5) == "1h01m"


def test_an_env_that_is_a_directory_is_called_one(tmp_path: Path) -> None:
    for command in ("status", "token", "login"):
        done = mlauth_cli(command, "--env", str(tmp_path), input="")
        assert_clean_failure(done, 1)
        assert "is a directory" in done.stderr and "no such" not in done.stderr


def test_usage_errors_exit_2() -> None:
    assert mlauth_cli().returncode == 2
    assert mlauth_cli("no-such-command").returncode == 2
    assert mlauth_cli("status", "--bogus").returncode == 2
    assert mlauth_cli("run").returncode == 2


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("mlauth")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("status", "token", "refresh", "login", "migrate", "sellers", "run", "demo"):
        assert command in done.stdout


# -- token --------------------------------------------------------------------------------


def test_token_prints_the_stored_token_for_shell_use(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    done = mlauth_cli("token", "--env", str(fake_ml_env))
    assert done.returncode == 0, done.stderr
    assert done.stdout == read_env_file(fake_ml_env)["ML_ACCESS_TOKEN"] + "\n"
    assert fake_ml.stats()["refreshes"] == 0
    answer = requests.get(
        f"{fake_ml.base_url}/users/me", headers={"Authorization": f"Bearer {done.stdout.strip()}"}
    )
    assert answer.status_code == 200


def test_token_refreshes_an_expired_token_first(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    old = fake_ml.write_env(env, expires_at=time.time() - 5)
    done = mlauth_cli("token", "--env", str(env))
    assert done.returncode == 0, done.stderr
    assert fake_ml.stats()["refreshes"] == 1
    printed = done.stdout.strip()
    assert printed != old["access_token"]
    assert printed == read_env_file(env)["ML_ACCESS_TOKEN"]


def test_token_with_a_dead_chain_asks_for_login(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 5)
    fake_ml.revoke_refresh_tokens()
    before = env.read_text()
    done = mlauth_cli("token", "--env", str(env))
    assert_clean_failure(done, 3)
    assert "invalid_grant" in done.stderr and "mlauth login --env" in done.stderr
    assert done.stdout == ""
    assert env.read_text() == before


# -- refresh ------------------------------------------------------------------------------


def test_refresh_rotates_once_and_prints_no_token(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    before = read_env_file(fake_ml_env)
    done = mlauth_cli("refresh", "--env", str(fake_ml_env))
    assert done.returncode == 0, done.stderr
    after = read_env_file(fake_ml_env)
    assert fake_ml.stats()["refreshes"] == 1
    assert after["ML_REFRESH_TOKEN"] != before["ML_REFRESH_TOKEN"]
    assert done.stdout.startswith("refreshed: access sha256:")
    assert_no_secret(done.stdout + done.stderr, fake_ml_env)
    assert after["ML_CLIENT_ID"] == before["ML_CLIENT_ID"]


def test_refresh_with_a_dead_refresh_token_names_mlauth_login(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    fake_ml.revoke_refresh_tokens()
    before = fake_ml_env.read_text()
    done = mlauth_cli("refresh", "--env", str(fake_ml_env))
    assert_clean_failure(done, 3)
    assert "re-authorization required" in done.stderr
    assert f"mlauth login --env {fake_ml_env}" in done.stderr
    assert fake_ml_env.read_text() == before
    assert_no_secret(done.stderr, fake_ml_env)


def test_refresh_without_credentials_names_the_key(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    text = fake_ml_env.read_text()
    fake_ml_env.write_text(re.sub(r"ML_CLIENT_SECRET=.*\n", "", text))
    done = mlauth_cli("refresh", "--env", str(fake_ml_env))
    assert_clean_failure(done, 1)
    assert "ML_CLIENT_SECRET is missing" in done.stderr
    assert fake_ml.stats()["token_requests"] == 0


def test_refresh_with_a_wrong_secret_says_so(fake_ml: FakeMercadoLibre, fake_ml_env: Path) -> None:
    text = fake_ml_env.read_text().replace(fake_ml.client_secret, "wrong-secret-for-tests")
    fake_ml_env.write_text(text)
    done = mlauth_cli("refresh", "--env", str(fake_ml_env))
    assert_clean_failure(done, 1)
    assert "invalid_client" in done.stderr


# -- login --------------------------------------------------------------------------------


@pytest.fixture
def first_env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    """A .env as a seller writes it before the first authorization: credentials only."""
    env = tmp_path / ".env"
    env.write_text(
        "# my pipeline\n"
        f"ML_CLIENT_ID={fake_ml.client_id}\n"
        f"ML_CLIENT_SECRET={fake_ml.client_secret}\n"
        f"ML_TOKEN_URL={fake_ml.token_url}\n"
        f"ML_AUTH_URL={fake_ml.base_url}\n"
        f"ML_API_HOSTS={fake_ml.host}\n"
        "AMAZON_REGION=us-east-1  # kept\n"
    )
    env.chmod(0o600)  # as a seller should: a looser file gets a warning line on stderr
    return env


def start_login(env: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start an interactive login; return it and the query of the URL it printed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlauth",
            "login",
            "--env",
            str(env),
            "--redirect-uri",
            REDIRECT,
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    return proc, query


@pytest.mark.parametrize("pkce", [False, True])
def test_login_pasting_the_redirected_url_writes_tokens_and_keeps_the_rest(
    fake_ml: FakeMercadoLibre, first_env: Path, pkce: bool
) -> None:
    proc, query = start_login(first_env, *(["--pkce"] if pkce else []))
    assert query["client_id"] == fake_ml.client_id and query["redirect_uri"] == REDIRECT
    assert ("code_challenge" in query) is pkce
    code = fake_ml.issue_authorization_code(REDIRECT, query.get("code_challenge"))
    out, err = proc.communicate(f"{REDIRECT}?code={code}&state={query['state']}\n", timeout=60)
    assert proc.returncode == 0, err
    assert fake_ml.stats()["code_exchanges"] == 1
    text = first_env.read_text()
    assert text.startswith("# my pipeline\n") and "AMAZON_REGION=us-east-1  # kept\n" in text
    values = read_env_file(first_env)
    assert values["ML_REFRESH_TOKEN"] and values["ML_ACCESS_TOKEN"]
    assert "authorized: tokens saved" in out
    assert_no_secret(out + err, first_env)
    # The new chain works: the CLI refreshes it.
    assert mlauth_cli("refresh", "--env", str(first_env)).returncode == 0
    assert fake_ml.stats()["invalid_grant"] == 0


@pytest.mark.parametrize("pkce", [False, True])
def test_login_through_the_fakes_authorization_page(
    fake_ml: FakeMercadoLibre, first_env: Path, pkce: bool
) -> None:
    proc, query = start_login(first_env, *(["--pkce"] if pkce else []))
    page = f"{fake_ml.base_url}/authorization?" + urlencode(query)
    answer = requests.get(page, allow_redirects=False, timeout=10)
    assert answer.status_code == 302
    redirected = answer.headers["Location"]
    assert redirected.startswith(REDIRECT + "?")
    out, err = proc.communicate(redirected + "\n", timeout=60)
    assert proc.returncode == 0, err
    assert "authorized: tokens saved" in out
    assert fake_ml.stats()["code_exchanges"] == 1


def test_login_code_url_without_state_says_the_state_was_not_checked(
    fake_ml: FakeMercadoLibre, first_env: Path
) -> None:
    code = fake_ml.issue_authorization_code(REDIRECT)
    done = mlauth_cli(
        "login",
        "--env",
        str(first_env),
        "--redirect-uri",
        REDIRECT,
        "--code",
        f"{REDIRECT}?code={code}&state=unchecked",
    )
    assert done.returncode == 0, done.stderr
    assert "state was not checked" in done.stderr and "--state" in done.stderr


def test_no_answer_at_the_prompt_is_reported_on_its_own_line(first_env: Path) -> None:
    proc, _ = start_login(first_env)
    _, err = proc.communicate("", timeout=60)
    assert proc.returncode == 1
    assert "redirected URL or code: \nmlauth: no answer on standard input" in err


def test_ctrl_c_at_the_prompt_is_reported_on_its_own_line(first_env: Path) -> None:
    proc, _ = start_login(first_env)
    assert proc.stderr is not None
    seen = ""
    while not seen.endswith("redirected URL or code: "):
        char = proc.stderr.read(1)
        assert char, seen  # the prompt comes before EOF
        seen += char
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.startswith("\nmlauth: interrupted"), err


def test_a_malformed_auth_url_names_an_authorization_page(first_env: Path) -> None:
    with pytest.raises(mlauth.ConfigError) as caught:
        authorization_base("MLA", "not a url")
    assert "auth.mercadolibre.com.ar" in str(caught.value)
    assert "oauth/token" not in str(caught.value)


def test_login_refuses_a_url_from_another_login(fake_ml: FakeMercadoLibre, first_env: Path) -> None:
    proc, _ = start_login(first_env)
    code = fake_ml.issue_authorization_code(REDIRECT)
    out, err = proc.communicate(f"{REDIRECT}?code={code}&state=not-this-one\n", timeout=60)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_clean_failure(done, 1)
    assert "state does not match" in err
    assert fake_ml.stats()["token_requests"] == 0  # the code was not spent
    assert "ML_REFRESH_TOKEN" not in first_env.read_text()


def test_login_with_a_bad_code_fails_cleanly(fake_ml: FakeMercadoLibre, first_env: Path) -> None:
    before = first_env.read_text()
    done = mlauth_cli(
        "login", "--env", str(first_env), "--redirect-uri", REDIRECT, "--code", "TG-bogus"
    )
    assert_clean_failure(done, 1)
    assert "authorization code was refused" in done.stderr
    assert first_env.read_text() == before


def test_login_code_argument_for_scripts_replaces_a_dead_chain(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    fake_ml.revoke_refresh_tokens()
    assert mlauth_cli("refresh", "--env", str(fake_ml_env)).returncode == 3
    code = fake_ml.issue_authorization_code(REDIRECT)
    done = mlauth_cli(
        "login",
        "--env",
        str(fake_ml_env),
        "--redirect-uri",
        REDIRECT,
        "--code",
        f"{REDIRECT}?code={code}&state=s1",
        "--state",
        "s1",
    )
    assert done.returncode == 0, done.stderr
    assert mlauth_cli("refresh", "--env", str(fake_ml_env)).returncode == 0


@pytest.mark.parametrize(
    ("line", "replacement", "named"),
    [
        ("ML_CLIENT_SECRET=", "", "ML_CLIENT_SECRET"),
        ("ML_TOKEN_URL=", "ML_TOKEN_URL=http://auth.example.test/oauth/token", "plain http"),
        ("ML_API_HOSTS=", "ML_API_HOSTS=not a host!", "ML_API_HOSTS"),
        ("AMAZON_REGION=", "ML_TOKEN_STORE=redis://127.0.0.1:1/0", "cannot reach Redis"),
    ],
)
def test_login_checks_the_configuration_before_printing_the_url(
    fake_ml: FakeMercadoLibre, first_env: Path, line: str, replacement: str, named: str
) -> None:
    lines = first_env.read_text().splitlines(keepends=True)
    first_env.write_text(
        "".join(replacement + "\n" if text.startswith(line) else text for text in lines)
    )
    done = mlauth_cli("login", "--env", str(first_env), "--redirect-uri", REDIRECT, input="")
    assert_clean_failure(done, 1)
    assert named in done.stderr
    assert done.stdout == ""  # no URL: the seller was not sent to authorize
    assert "redirected URL or code" not in done.stderr


def test_login_into_a_read_only_folder_fails_before_printing_the_url(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "ro", "1m") as folder:
        env = folder / ".env"
        env.write_text(
            f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n"
            f"ML_TOKEN_URL={fake_ml.token_url}\nML_AUTH_URL={fake_ml.base_url}\n"
        )
        remount_read_only(folder)
        done = mlauth_cli("login", "--env", str(env), "--redirect-uri", REDIRECT, input="")
        assert_clean_failure(done, 1)
        assert "cannot save tokens to" in done.stderr and done.stdout == ""
        assert "read-only" in done.stderr


def test_login_without_a_redirect_uri_says_how_to_give_one(first_env: Path) -> None:
    done = mlauth_cli("login", "--env", str(first_env), input="")
    assert_clean_failure(done, 1)
    assert "--redirect-uri" in done.stderr and "ML_REDIRECT_URI" in done.stderr


def test_authorization_url_per_site_and_pkce() -> None:
    assert authorization_base("MLB", None) == "https://auth.mercadolivre.com.br"
    assert authorization_base("mlm", None) == "https://auth.mercadolibre.com.mx"
    assert authorization_base("MLA", "http://127.0.0.1:9/") == "http://127.0.0.1:9"
    with pytest.raises(mlauth.ConfigError, match="unknown site"):
        authorization_base("XYZ", None)
    with pytest.raises(mlauth.ConfigError, match="plain http"):
        authorization_base("MLA", "http://auth.example.com")
    request = LoginRequest.new(AUTH_HOSTS["MLA"], "123", REDIRECT, pkce=True)
    parts = urlsplit(request.url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert (parts.netloc, parts.path) == ("auth.mercadolibre.com.ar", "/authorization")
    assert query["response_type"] == "code" and query["state"] == request.state
    assert query["code_challenge_method"] == "S256"
    assert request.code_verifier is not None
    verifier = request.code_verifier.reveal()
    assert 43 <= len(verifier) <= 128 and verifier not in request.url
    digest = hashlib.sha256(verifier.encode()).digest()
    assert query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_pasted_answers_are_read_or_refused_with_the_reason() -> None:
    code, state = parse_pasted(f"  {REDIRECT}?code=TG-abc&state=xyz\n")
    assert (code.reveal(), state) == ("TG-abc", "xyz")
    code, state = parse_pasted("TG-abc")
    assert (code.reveal(), state) == ("TG-abc", None)
    with pytest.raises(mlauth.ConfigError, match="access_denied"):
        parse_pasted(f"{REDIRECT}?error=access_denied&state=xyz")
    with pytest.raises(mlauth.ConfigError, match="no code="):
        parse_pasted(f"{REDIRECT}?state=xyz")
    with pytest.raises(mlauth.ConfigError, match="nothing was pasted"):
        parse_pasted("  \n")


# -- demo ---------------------------------------------------------------------------------


def test_demo_command_runs_the_demo() -> None:
    done = mlauth_cli(
        "demo", "--processes", "1", "--threads", "1", "--seconds", "2", "--token-lifetime", "1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: no call failed" in done.stdout


def test_demo_serve_never_overwrites_a_real_env(tmp_path: Path) -> None:
    real = tmp_path / ".env"
    real.write_text("ML_CLIENT_ID=mine\n")
    done = mlauth_cli("demo", "--serve", "--env", str(real))
    assert done.returncode == 1 and "never overwrites a real .env" in done.stderr
    assert real.read_text() == "ML_CLIENT_ID=mine\n"
