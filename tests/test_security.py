"""Security proof: where tokens go, what the logs hold, and who may read the files.

Complements test_auth_unit (host rules on one request), test_resend_loopback (redirects on
a real server), test_properties (any response sequence) and test_logging_secrets.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
import traceback
from collections.abc import Hashable
from pathlib import Path

import pytest
import requests
import requests_mock

import mlauth
import mlauth.cli.commands
import mlauth.engine
import mlauth.integrations.requests_auth
import mlauth.stores.envfile
from mlauth.secret import mask
from mlauth.stores.envfile import read_env_file, update_env_file
from mlauth.stores.journal import Journal
from mlauth.testing import FakeMercadoLibre


class OnceBrokenStore(mlauth.EnvFileStore):
    """The first save fails (the disk filled after the check); later ones work."""

    failed = False

    def save(self, tokens: mlauth.TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        if not self.failed:
            self.failed = True
            raise mlauth.StoreError("No space left on device")
        return super().save(tokens, replaces=replaces)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_mlauth_creates_is_private(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    # A typical umask, under which a careless writer's new files would be world-readable.
    previous = os.umask(0o022)
    request.addfinalizer(lambda: os.umask(previous) and None)
    auth = mlauth.MLAuth.from_env(env, store=OnceBrokenStore(env))
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert mode(Path(f"{env}.journal")) == 0o600  # holds the answer the save could not write
    fake_ml.revoke_refresh_tokens()
    mlauth.EnvFileStore(env).save(dataclasses.replace(auth.tokens, expires_at=time.time() - 1))
    with pytest.raises(mlauth.InvalidGrantError):
        requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(env))
    for name in (".env", ".env.lock", ".env.journal", ".env.reauth"):
        assert mode(tmp_path / name) == 0o600, name


def test_a_loose_journal_is_made_private_before_tokens_are_written_to_it(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    journal = tmp_path / ".env.journal"
    journal.touch()
    journal.chmod(0o644)  # left world-readable by hand, a backup restore, an older version
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(env)).ok
    assert fake_ml.stats()["refreshes"] == 1
    assert mode(journal) == 0o600


def test_an_existing_env_keeps_its_mode_through_a_refresh(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    env.chmod(0o640)  # a deliberate group-read for a deploy user
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(env)).ok
    assert mode(env) == 0o640
    assert fake_ml.stats()["refreshes"] == 1


def test_a_readable_env_gets_one_warning_per_process_with_the_fix(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mlauth.stores.envfile, "_warned_modes", set())
    env = tmp_path / ".env"
    fake_ml.write_env(env)
    private = tmp_path / "private.env"
    fake_ml.write_env(private)
    env.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        mlauth.MLAuth.from_env(env)
        mlauth.MLAuth.from_env(env)
        mlauth.MLAuth.from_env(private)
    warnings = [
        r.getMessage() for r in caplog.records if "readable by other users" in r.getMessage()
    ]
    assert warnings == [
        f"{env} holds tokens but is readable by other users (mode 0644); fix with: chmod 600 {env}"
    ]


def test_no_token_over_plain_http_to_a_non_loopback_host(
    env_file: Path, requests_mock: requests_mock.Mocker
) -> None:
    requests_mock.get("http://api.mercadolibre.com/items", text="{}")
    requests_mock.get("https://api.mercadolibre.com/items", text="{}")
    auth = mlauth.MLAuth.from_env(env_file)
    requests.get("http://api.mercadolibre.com/items", auth=auth)
    requests.get("https://api.mercadolibre.com/items", auth=auth)
    plain, tls = requests_mock.request_history
    assert "Authorization" not in plain.headers
    assert tls.headers["Authorization"].startswith("Bearer ")
    # Nor does the refresh token travel to a plain-http token URL.
    with pytest.raises(mlauth.ConfigError, match="https"):
        mlauth.MLAuth.from_env(env_file, token_url="http://api.mercadolibre.com/oauth/token")


def test_tokens_never_appear_in_a_url(fake_ml: FakeMercadoLibre, fake_ml_env: Path) -> None:
    seen: list[str] = []

    def record(r: requests.Response, **kwargs: object) -> None:
        seen.extend(u for hop in [*r.history, r] for u in (hop.request.url or "", hop.url))

    update_env_file(fake_ml_env, {"ML_ACCESS_TOKEN": "APP_USR-1234-010101-deadbeef-8035443"})
    session = requests.Session()
    session.auth = mlauth.MLAuth.from_env(fake_ml_env)
    session.hooks["response"].append(record)
    assert session.get(f"{fake_ml.base_url}/users/me", params={"q": "x"}).status_code == 200
    stored = read_env_file(fake_ml_env)
    assert fake_ml.stats()["refreshes"] == 1
    assert len(seen) == 4  # the 401 and the re-sent answer, each with its request's URL
    for url in seen:
        for token in (stored["ML_ACCESS_TOKEN"], stored["ML_REFRESH_TOKEN"]):
            assert str(token) not in url


def test_debug_run_through_journal_recovery_and_reauth_leaks_nothing(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mlauth.engine, "PERSIST_RETRY_DELAY", 0.0)
    env = tmp_path / ".env"
    first = fake_ml.write_env(env, expires_at=time.time() - 1)
    secrets = {str(first["access_token"]), str(first["refresh_token"]), fake_ml.client_secret}
    caplog.set_level(logging.DEBUG)  # every logger: mlauth, urllib3, requests
    errors: list[BaseException] = []

    # 1. A refresh whose save fails: tokens kept in memory and in the journal.
    auth = mlauth.MLAuth.from_env(env, store=OnceBrokenStore(env))
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    live = auth.tokens
    assert live.access_token is not None and live.refresh_token is not None
    secrets |= {live.access_token.reveal(), live.refresh_token.reveal()}
    # 2. A peer recovers them from the journal.
    peer = mlauth.MLAuth.from_env(env)
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=peer).status_code == 200
    # 3. The grant dies: invalid_grant, the marker, and the refusal without sending.
    fake_ml.revoke_refresh_tokens()
    mlauth.EnvFileStore(env).save(dataclasses.replace(peer.tokens, expires_at=time.time() - 1))
    for _ in range(2):
        try:
            requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(env))
        except mlauth.InvalidGrantError as exc:
            errors.append(exc)
    # 4. A 5xx storm and a possibly-spent token (an intent left by a dead process).
    fresh = fake_ml.issue_tokens()
    secrets |= {str(fresh["access_token"]), str(fresh["refresh_token"])}
    update_env_file(env, {"ML_REFRESH_TOKEN": str(fresh["refresh_token"])})
    Journal(str(env)).intent(mlauth.Secret(str(fresh["refresh_token"])))
    fake_ml.fail_next_token_requests(3, status=503)
    try:
        requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(env))
    except mlauth.RefreshError as exc:
        errors.append(exc)

    assert len(errors) == 3
    assert "not sent" in str(errors[1])
    text = "\n".join(
        [r.getMessage() for r in caplog.records]
        + ["".join(traceback.format_exception(e)) for e in errors]
        + [repr(e) for e in errors]
        + [repr(auth), str(vars(auth)), repr(peer), repr(Journal(str(env)))]
        + [str(mlauth.reauthorization_required(mlauth.EnvFileStore(env)))]
    )
    assert ".env.journal holds them" in text and "recovered a refresh" in text
    for secret in secrets:
        assert secret not in text, "a whole token or the secret reached the logs"


def test_debug_cli_run_prints_no_secret_but_the_token_it_was_asked_for(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 1)  # `token` must refresh first
    caplog.set_level(logging.DEBUG)  # every logger: mlauth, urllib3, requests
    secrets = {fake_ml.client_secret}
    outputs: list[tuple[str, str, str]] = []
    for command in ("status", "token", "refresh", "status", "token"):
        before = read_env_file(env)
        code = mlauth.cli.commands.main([command, "--env", str(env)])
        after = read_env_file(env)
        out, err = capsys.readouterr()
        assert code == 0, err
        for stored in (before, after):
            secrets |= {str(stored["ML_ACCESS_TOKEN"]), str(stored["ML_REFRESH_TOKEN"])}
        if command == "token":  # the one place a whole token belongs: stdout, for the shell
            assert out == f"{after['ML_ACCESS_TOKEN']}\n"
            out = ""
        outputs.append((command, out, err))
    assert fake_ml.stats()["refreshes"] == 2  # the expired token, then `mlauth refresh`
    assert len(secrets) == 1 + 2 * 3
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "refreshed MercadoLibre token" in logs  # the DEBUG/INFO run really ran
    for command, out, err in outputs:
        for secret in secrets:
            assert secret not in out and secret not in err, f"mlauth {command} printed a secret"
    for secret in secrets:
        assert secret not in logs, "a whole token or the secret reached the logs"


@pytest.mark.parametrize(
    "echo",
    [
        "{secret}",
        "refresh_token={plus}&x=1",  # form-encoded: '+' and '/' as %2B and %2F
        "refresh_token={plus_lower}",  # the same, with lowercase escapes
        '{{"refresh_token": "{json}"}}',
    ],
    ids=["plain", "form", "form-lowercase", "json"],
)
def test_mask_finds_a_secret_in_every_spelling_it_comes_back_in(echo: str) -> None:
    secret = mlauth.Secret("not-a-TG-token/with+odd=chars")
    plus = "not-a-TG-token%2Fwith%2Bodd%3Dchars"
    text = echo.format(
        secret=secret.reveal(),
        plus=plus,
        plus_lower=plus.replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d"),
        json=secret.reveal().replace("/", "\\/"),
    )
    masked = mask(text, [secret])
    assert secret.fingerprint in masked
    assert "with" not in masked  # no piece of the secret is left


def test_mask_leaves_a_text_that_quotes_no_secret_as_it_was() -> None:
    text = "pid 42@worker-7 (HTTP 503 server_error)"
    assert mask(text, [mlauth.Secret("TG-abcdefgh12345678-1"), None]) == text
