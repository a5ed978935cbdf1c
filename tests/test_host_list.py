"""``ML_API_HOSTS``: an entry that is no host name is an error naming it and the fix; a list
that can never match MercadoLibre gets one WARNING at start-up; ``mlauth status`` shows it.

Without these, ``ML_API_HOSTS=127.0.0.1;8080`` or ``api.mercadolibre.con`` were accepted and
every request went out without the token, got a 401, and nothing said why.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlauth
from mlauth.testing import FakeMercadoLibre
from tests.support.fake_tokens import env_text

HOSTS_WARNING = "the hosts that get the token"


def write_env(tmp_path: Path, **overrides: str | None) -> Path:
    tmp_path.mkdir(exist_ok=True)
    env = tmp_path / ".env"
    env.write_text(env_text(**overrides))
    env.chmod(0o600)
    return env


def set_key(env: Path, key: str, value: str) -> None:
    lines = env.read_text().splitlines(keepends=True)
    env.write_text(
        "".join(f"{key}={value}\n" if line.startswith(f"{key}=") else line for line in lines)
    )


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and HOSTS_WARNING in r.getMessage()
    ]


# -- entries that are no host name --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "named", "fix"),
    [
        ("127.0.0.1;8080", "'127.0.0.1;8080'", "did you mean 127.0.0.1:8080?"),
        ("api.mercadolibre.com;443", "'api.mercadolibre.com;443'", "api.mercadolibre.com:443?"),
        ("api.mercadolibre.com api.mercadopago.com", "white space", "separate hosts with commas"),
        ("https://api.mercadolibre.com/", "not a host name", "write only the host, api.merc"),
        ("api.mercadolibre.com/items", "not a host name", "write only the host, api.merc"),
        ("api.mercadolibre.com, *.mercadopago.com", "'*.mercadopago.com'", "list each host"),
        ("api.mercadolibre.com.", "ends with a '.'", "leave it out"),
        ("\u0430pi.mercadolibre.com", "not ASCII", "xn--"),
        ("127.1", "not an IPv4 address", "four decimal numbers"),
        ("[::1%eth0]:8080", "zone id", "leave it out"),
        ("[::1", "no closing ']'", "host:port"),
        ("api.mercadolibre.com:99999", "bad port", "host:port"),
        ("user@api.mercadolibre.com", "not a host name", "host:port"),
        ("api.mercadolibre.com:", "bad port", "host:port"),
    ],
)
def test_an_entry_that_is_no_host_name_is_an_error_naming_it_and_the_fix(
    tmp_path: Path, value: str, named: str, fix: str
) -> None:
    env = write_env(tmp_path, ML_API_HOSTS=value)
    with pytest.raises(mlauth.ConfigError) as caught:
        mlauth.MLAuth.from_env(env)
    message = str(caught.value)
    assert message.startswith(f"{env}: ML_API_HOSTS: "), message
    assert named in message and fix in message, message
    store = mlauth.EnvFileStore(write_env(tmp_path / "other"))
    with pytest.raises(mlauth.ConfigError, match=r"^hosts: ") as caught:
        mlauth.MLAuth("1234", "fake-secret", store, hosts=value)
    assert named in str(caught.value) and fix in str(caught.value)


def test_the_cli_names_the_entry_and_the_fix(tmp_path: Path) -> None:
    env = write_env(tmp_path, ML_API_HOSTS="127.0.0.1;8080")
    done = run("-m", "mlauth", "refresh", "--env", str(env))
    assert done.returncode == 1
    assert "ML_API_HOSTS: '127.0.0.1;8080'" in done.stderr
    assert "did you mean 127.0.0.1:8080?" in done.stderr
    assert "Traceback" not in done.stderr


# -- a list that can never match MercadoLibre: one WARNING ---------------------------------


@pytest.mark.parametrize(
    ("hosts", "token_url", "guess"),
    [
        ("api.mercadolibre.con", None, "Did you mean api.mercadolibre.com (not api.mercadol"),
        ("api.mercadopago.co", None, "Did you mean api.mercadopago.com (not api.mercadopago.co"),
        ("api.mercadolibre.com:8443", None, None),  # a port MercadoLibre does not use
        ("images.example, cdn.example", None, None),
        ("api.example", "https://proxy.example/oauth/token", None),
    ],
)
def test_hosts_that_can_never_match_mercadolibre_get_one_warning(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    hosts: str,
    token_url: str | None,
    guess: str | None,
) -> None:
    env = write_env(tmp_path, ML_API_HOSTS=hosts, ML_TOKEN_URL=token_url)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        mlauth.MLAuth.from_env(env)
    (message,) = warnings_of(caplog)
    assert "requests to MercadoLibre will go without the token" in message
    assert "api.mercadolibre.com, api.mercadopago.com" in message
    assert (guess is None and "Did you mean" not in message) or (guess or "") in message


@pytest.mark.parametrize(
    ("hosts", "token_url"),
    [
        (None, None),  # the default
        ("api.mercadopago.com", "https://api.mercadopago.com/oauth/token"),
        ("api.mercadolibre.com:443, cdn.example", None),
        ("API.MercadoLibre.com", None),
        ("127.0.0.1:8080", "http://127.0.0.1:8080/oauth/token"),
        ("localhost", None),
        ("[::1]:9000", None),
        ("proxy.example:8443", "https://proxy.example:8443/oauth/token"),  # a proxy for the API
    ],
)
def test_hosts_that_can_match_get_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, hosts: str | None, token_url: str | None
) -> None:
    env = write_env(tmp_path, ML_API_HOSTS=hosts, ML_TOKEN_URL=token_url)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        mlauth.MLAuth.from_env(env)
    assert warnings_of(caplog) == []


def test_the_constructor_warns_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = mlauth.EnvFileStore(write_env(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        mlauth.MLAuth("1234", "fake-secret", store, hosts=["api.mercadolibre.con"])
    assert len(warnings_of(caplog)) == 1


def test_install_in_a_script_without_logging_warns_once_on_stderr(tmp_path: Path) -> None:
    env = write_env(tmp_path, ML_API_HOSTS="api.mercadolibre.con")
    script = textwrap.dedent(
        f"""
        import mlauth
        mlauth.install({str(env)!r})
        print("installed")
        """
    )
    done = run("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "installed\n"
    assert done.stderr.count(HOSTS_WARNING) == 1, done.stderr
    assert "api.mercadolibre.com (not api.mercadolibre.con)" in done.stderr


def test_mlauth_token_warns_once_and_still_prints_the_token(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    set_key(fake_ml_env, "ML_API_HOSTS", "api.mercadolibre.con")
    done = run("-m", "mlauth", "token", "--env", str(fake_ml_env))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("APP_USR-")
    assert done.stderr.count(HOSTS_WARNING) == 1, done.stderr


# -- mlauth status: the hosts that get the token ------------------------------------------


def status(env: Path) -> subprocess.CompletedProcess[str]:
    return run("-m", "mlauth", "status", "--env", str(env))


def test_status_shows_the_hosts_that_get_the_token(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    done = status(fake_ml_env)
    assert done.returncode == 0, done.stderr
    assert f"token sent to:    {fake_ml.host}\n" in done.stdout
    set_key(fake_ml_env, "ML_API_HOSTS", f"{fake_ml.host}, api.mercadolibre.com, [::1]:8080")
    done = status(fake_ml_env)
    assert done.returncode == 0, done.stderr
    expected = f"token sent to:    {fake_ml.host}, api.mercadolibre.com, [::1]:8080\n"
    assert expected in done.stdout


def test_status_says_when_the_default_host_is_used(tmp_path: Path) -> None:
    done = status(write_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "token sent to:    api.mercadolibre.com (the default)\n" in done.stdout


def test_status_warns_about_hosts_that_can_never_match(tmp_path: Path) -> None:
    done = status(write_env(tmp_path, ML_API_HOSTS="api.mercadolibre.con"))
    assert done.returncode == 0, done.stderr
    row = re.search(r"^token sent to: +(.*)$", done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    assert row.group(1).startswith("api.mercadolibre.con (WARNING: ")
    assert "go without the token" in row.group(1)
    assert "did you mean api.mercadolibre.com (not api.mercadolibre.con)?" in row.group(1)


def test_status_with_a_bad_host_list_shows_the_rows_then_the_error(tmp_path: Path) -> None:
    done = status(write_env(tmp_path, ML_API_HOSTS="127.0.0.1;8080"))
    assert done.returncode == 1
    assert "token sent to:    unknown (ML_API_HOSTS is not valid)\n" in done.stdout
    assert "did you mean 127.0.0.1:8080?" in done.stderr
    assert "Traceback" not in done.stderr
