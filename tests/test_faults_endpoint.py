"""A misbehaving token endpoint never costs the chain: each fault, then the chain still lives.

Real loopback server, real sockets. For every fault: what the caller sees, whether the refresh
token was spent, what the .env holds, and that the next call (once the fault is gone) works
with no invalid_grant.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import requests

import mlauth
import mlauth.engine
import mlauth.integrations.requests_auth
from mlauth.endpoint import TokenEndpoint
from mlauth.stores.envfile import read_env_file, update_env_file
from mlauth.testing import FakeMercadoLibre


@pytest.fixture
def expired_env(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    # The next call must refresh; a failure is not remembered, so "the next call" really asks.
    update_env_file(fake_ml_env, {"ML_TOKEN_EXPIRES_AT": str(time.time() - 10)})
    monkeypatch.setattr(mlauth.engine, "FAILURE_COOLDOWN", 0.0)
    return fake_ml_env


def call(fake: FakeMercadoLibre, auth: mlauth.MLAuth) -> requests.Response:
    return requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)


def assert_chain_lives(fake: FakeMercadoLibre, env: Path, auth: mlauth.MLAuth) -> None:
    assert call(fake, auth).status_code == 200
    assert fake.stats()["invalid_grant"] == 0
    assert mlauth.reauthorization_required(mlauth.EnvFileStore(env)) is None
    # And a new process reading the .env continues the chain too.
    assert call(fake, mlauth.MLAuth.from_env(env)).status_code == 200


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried_and_the_chain_survives(
    fake_ml: FakeMercadoLibre, expired_env: Path, status: int
) -> None:
    fake_ml.fail_next_token_requests(2, status=status)
    auth = mlauth.MLAuth.from_env(expired_env, max_attempts=3, backoff=0.001)
    assert call(fake_ml, auth).status_code == 200
    assert fake_ml.stats()["token_requests"] == 3 and fake_ml.stats()["refreshes"] == 1
    assert_chain_lives(fake_ml, expired_env, auth)


@pytest.mark.parametrize("retry_after", [None, 0.2])
def test_rate_limits_are_retried_honouring_retry_after(
    fake_ml: FakeMercadoLibre, expired_env: Path, retry_after: float | None
) -> None:
    fake_ml.fail_next_token_requests(
        1, status=429, error="local_rate_limited", retry_after=retry_after
    )
    auth = mlauth.MLAuth.from_env(expired_env, backoff=0.001)
    assert call(fake_ml, auth).status_code == 200
    assert fake_ml.stats()["token_requests"] == 2 and fake_ml.stats()["refreshes"] == 1
    assert_chain_lives(fake_ml, expired_env, auth)


def test_a_connection_reset_is_retried(fake_ml: FakeMercadoLibre, expired_env: Path) -> None:
    fake_ml.reset_next_token_requests(1)
    auth = mlauth.MLAuth.from_env(expired_env, backoff=0.001)
    assert call(fake_ml, auth).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1
    assert_chain_lives(fake_ml, expired_env, auth)


def test_a_timeout_spends_nothing_and_says_so(fake_ml: FakeMercadoLibre, expired_env: Path) -> None:
    before = expired_env.read_bytes()
    fake_ml.token_delay = 1.0  # longer than the read timeout: the client gives up each time
    auth = mlauth.MLAuth.from_env(expired_env, timeout=(2.0, 0.2), max_attempts=2, backoff=0.001)
    with pytest.raises(mlauth.RefreshError, match=r"no answer from .*ReadTimeout") as caught:
        call(fake_ml, auth)
    assert "left as they were" in str(caught.value)
    assert fake_ml.stats()["refreshes"] == 0
    assert expired_env.read_bytes() == before
    fake_ml.token_delay = 0.0
    assert_chain_lives(fake_ml, expired_env, auth)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("<html>502 Bad Gateway</html>", "unusable body"),
        ('{"token_type":"bearer","expires_in":21600}', "access_token is missing"),
    ],
    ids=["malformed-json", "missing-fields"],
)
def test_an_unusable_200_is_an_error_naming_the_problem(
    fake_ml: FakeMercadoLibre, expired_env: Path, body: str, problem: str
) -> None:
    before = expired_env.read_bytes()
    fake_ml.fail_next_token_requests(1, status=200, body=body)
    auth = mlauth.MLAuth.from_env(expired_env)
    with pytest.raises(mlauth.RefreshError, match=problem):
        call(fake_ml, auth)
    assert expired_env.read_bytes() == before  # nothing half-written
    assert fake_ml.stats()["token_requests"] == 1  # a 200 is not retried blindly
    assert_chain_lives(fake_ml, expired_env, auth)


def test_expires_in_as_a_string_is_accepted(fake_ml: FakeMercadoLibre, expired_env: Path) -> None:
    fake_ml.expires_in_as_string = True
    auth = mlauth.MLAuth.from_env(expired_env)
    started = time.time()
    assert call(fake_ml, auth).status_code == 200
    expires_at = float(read_env_file(expired_env)["ML_TOKEN_EXPIRES_AT"] or 0)
    assert started - 5 <= expires_at - fake_ml.token_lifetime <= time.time()
    assert_chain_lives(fake_ml, expired_env, auth)


def test_invalid_client_names_the_keys_to_fix_and_spends_nothing(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    update_env_file(expired_env, {"ML_CLIENT_SECRET": "fake-renewed-secret-not-copied"})
    auth = mlauth.MLAuth.from_env(expired_env)
    with pytest.raises(mlauth.RefreshError, match=r"invalid_client.*ML_CLIENT_SECRET"):
        call(fake_ml, auth)
    assert fake_ml.stats()["token_requests"] == 1  # not retried
    assert fake_ml.stats()["refreshes"] == 0
    # No re-authorization needed: fixing the secret is enough.
    assert mlauth.reauthorization_required(mlauth.EnvFileStore(expired_env)) is None
    update_env_file(expired_env, {"ML_CLIENT_SECRET": fake_ml.client_secret})
    assert_chain_lives(fake_ml, expired_env, mlauth.MLAuth.from_env(expired_env))


def test_after_a_5xx_the_possibly_spent_token_gets_exactly_one_try_in_the_next_process(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    # A 503 may come after the server rotated the token: the intent stays open, so the next
    # process does not run a retry series on a token that may be spent.
    fake_ml.fail_next_token_requests(1, status=503)
    with pytest.raises(mlauth.RefreshError):
        call(fake_ml, mlauth.MLAuth.from_env(expired_env, max_attempts=1))
    fake_ml.fail_next_token_requests(1, status=503)
    with pytest.raises(mlauth.RefreshError):
        call(fake_ml, mlauth.MLAuth.from_env(expired_env, max_attempts=3, backoff=0.001))
    assert fake_ml.stats()["token_requests"] == 2  # one try, not a series
    # The try that succeeds closes it: the chain lives.
    assert_chain_lives(fake_ml, expired_env, mlauth.MLAuth.from_env(expired_env))
    assert fake_ml.stats()["refreshes"] == 1


def test_a_5xx_after_the_server_rotated_ends_in_the_possibly_spent_message(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    fake_ml.fail_next_token_requests(1, status=502, consume=True)  # spent, answer lost
    with pytest.raises(mlauth.RefreshError):
        call(fake_ml, mlauth.MLAuth.from_env(expired_env, max_attempts=1))
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        call(fake_ml, mlauth.MLAuth.from_env(expired_env))
    message = str(caught.value)
    assert "possibly spent already" in message and "no usable answer" in message
    assert "HTTP 502" in message and "mlauth login" in message
    assert fake_ml.stats()["token_requests"] == 2


def test_a_definite_refusal_closes_the_intent_so_the_next_refresh_retries_normally(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    update_env_file(expired_env, {"ML_CLIENT_SECRET": "fake-renewed-secret-not-copied"})
    with pytest.raises(mlauth.RefreshError, match="invalid_client"):
        call(fake_ml, mlauth.MLAuth.from_env(expired_env))
    update_env_file(expired_env, {"ML_CLIENT_SECRET": fake_ml.client_secret})
    fake_ml.fail_next_token_requests(1, status=503)
    auth = mlauth.MLAuth.from_env(expired_env, max_attempts=3, backoff=0.001)
    assert call(fake_ml, auth).status_code == 200  # a full retry series: 503, then 200
    assert fake_ml.stats()["token_requests"] == 3 and fake_ml.stats()["refreshes"] == 1


def endpoint_error(fake: FakeMercadoLibre, url: str | None = None) -> mlauth.RefreshError:
    """The error of one refresh series (two attempts) against ``url`` (default: the fake)."""
    endpoint = TokenEndpoint(
        url or fake.token_url,
        fake.client_id,
        mlauth.Secret(fake.client_secret),
        timeout=(2.0, 2.0),
        max_attempts=2,
        backoff=0.001,
    )
    live = mlauth.Secret(str(fake.issue_tokens()["refresh_token"]))
    with pytest.raises(mlauth.RefreshError) as caught:
        endpoint.refresh(live)
    return caught.value


@pytest.mark.parametrize(
    ("fault", "spent"),
    [
        ("refused connection", False),
        ("invalid_client on the only attempt", False),
        ("rate limited twice", False),
        ("503 twice", True),
        ("503, then invalid_client", True),
        ("connection reset", True),
        ("200 with a broken body", True),
    ],
)
def test_the_endpoint_says_whether_a_failed_refresh_may_have_spent_the_token(
    fake_ml: FakeMercadoLibre, fault: str, spent: bool
) -> None:
    url = None
    if fault == "refused connection":
        with socket.socket() as sock:  # a port nobody listens on once it is closed
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/oauth/token"
    elif fault == "invalid_client on the only attempt":
        fake_ml.fail_next_token_requests(1, status=401, error="invalid_client")
    elif fault == "rate limited twice":
        fake_ml.fail_next_token_requests(2, status=429, error="local_rate_limited")
    elif fault == "503 twice":
        fake_ml.fail_next_token_requests(2, status=503)
    elif fault == "503, then invalid_client":
        fake_ml.fail_next_token_requests(1, status=503)
        fake_ml.fail_next_token_requests(1, status=401, error="invalid_client")
    elif fault == "connection reset":
        fake_ml.reset_next_token_requests(2)
    else:
        fake_ml.fail_next_token_requests(2, status=200, body="<html>proxy</html>")
    error = endpoint_error(fake_ml, url)
    assert (error.possibly_spent is not None) is spent, error.possibly_spent
