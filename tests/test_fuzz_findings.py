"""What the fuzz properties (tests/test_fuzz_*.py) found, each pinned down as a plain test.

Each case is the shrunk example of a property, replayed with the same stub token endpoint:
the properties may stop finding it once the strategies change; these never stop asking.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlauth
from mlauth.stores.envfile import read_env_file
from tests.fuzz_support import (
    AUTH_OPTIONS,
    NATURAL,
    Answer,
    ErrorBody,
    Issuer,
    ObjectBody,
    TextBody,
    TokenStub,
    Val,
    assert_nothing_secret,
    every_log_record,
    outcome,
    said,
    status_output,
    write_env,
)
from tests.secrets_support import ODD_SECRET, everything_said


def test_an_access_token_the_token_endpoint_quotes_is_masked_in_logs_journal_and_status(
    tmp_path: Path,
) -> None:
    # A 5xx whose error code quotes the access token the client holds (not one of ML's
    # shape, which is masked by its shape): the retry's DEBUG line, the journal's record of
    # an unanswered attempt and what `mlauth status` shows of it copied it as it was.
    stub = TokenStub(Issuer("opaque", 1))
    echo = Answer(500, ErrorBody(Val("old access"), None))
    stub.plans = [echo, echo]
    env = write_env(tmp_path, stub, expired=True)
    with every_log_record() as records:
        auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
        stub.mount_on(auth)
        error = outcome(auth.refresh)
    assert isinstance(error, mlauth.RefreshError), repr(error)
    assert "HTTP 500" in str(error)
    secrets = [ODD_SECRET, *stub.issuer.issued]
    assert_nothing_secret(said(error, records), secrets, "the error and the log")
    assert_nothing_secret((tmp_path / ".env.journal").read_text(), secrets, "the journal")
    assert_nothing_secret(status_output(env), secrets, "mlauth status")


def test_a_token_type_holding_a_token_is_not_quoted_in_the_warning(tmp_path: Path) -> None:
    # A short token (20 characters or less) in token_type was quoted in the WARNING about it.
    stub = TokenStub(Issuer("short", 2))
    fields = {**dict(NATURAL), "token_type": Val("new access")}
    stub.plans = [Answer(200, ObjectBody(tuple(fields.items())))]
    env = write_env(tmp_path, stub, expired=True)
    with every_log_record() as records:
        auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
        stub.mount_on(auth)
        auth.refresh()
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == stub.live  # kept: only a warning
    (warning,) = [r for r in records if r.levelno == logging.WARNING and "odd" in r.msg]
    assert "token_type is a string of" in warning.getMessage()
    assert_nothing_secret(said(None, records), [ODD_SECRET, *stub.issuer.issued], "the log")


def test_an_error_answer_nested_too_deeply_is_a_refusal_not_an_unexpected_error(
    tmp_path: Path,
) -> None:
    # requests' Response.json() raises RecursionError (no ValueError) on such a body, and the
    # refusal became an UnexpectedError that said nothing of the server's error code.
    stub = TokenStub(Issuer("ml", 3))
    deep = "[" * 5000 + "]" * 5000
    body = TextBody((Val("json", '{"error": "invalid_client", "cause": ' + deep + "}"),))
    stub.plans = [Answer(400, body)]
    env = write_env(tmp_path, stub, expired=True)
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
    stub.mount_on(auth)
    error = outcome(auth.refresh)
    assert type(error) is mlauth.RefreshError, repr(error)
    assert "invalid_client" in str(error) and "ML_CLIENT_SECRET" in str(error)


def test_host_rules_that_fail_to_build_can_be_shown_with_their_frames(tmp_path: Path) -> None:
    # capture_locals calls repr() on the half-built object, in the frame of the ValueError
    # the ConfigError was raised from: it raised AttributeError, so a crash reporter or
    # pytest -l failed on a bad ML_API_HOSTS instead of showing the error.
    store = mlauth.EnvFileStore(write_env(tmp_path, TokenStub(Issuer("ml", 8)), expired=False))
    error = outcome(lambda: mlauth.MLAuth("1234567890", "a-secret", store, hosts=["bad host!"]))
    assert isinstance(error, mlauth.ConfigError), repr(error)
    assert "HostRules([])" in everything_said(error)
