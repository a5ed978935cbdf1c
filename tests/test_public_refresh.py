"""The public refresh surface: MLAuth.refresh(), valid_tokens(), the code exchange, and the
store's "refresh in progress" probe, against the loopback fake."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import mlauth
from mlauth.endpoint import TokenEndpoint
from mlauth.secret import Secret
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.lock_holder import lock_held_by_another_process


def test_forced_refresh_spends_a_fresh_token_and_persists_it(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    auth = mlauth.MLAuth.from_env(fake_ml_env)
    before = auth.tokens
    seen: list[mlauth.TokenSet] = []
    auth.on_refresh = seen.append
    new = auth.refresh()
    assert fake_ml.stats()["refreshes"] == 1
    assert new.refresh_token != before.refresh_token and new.access_token is not None
    assert read_env_file(fake_ml_env)["ML_ACCESS_TOKEN"] == new.access_token.reveal()
    assert seen == [new]
    assert auth.refresh().refresh_token != new.refresh_token  # forced again: spent again
    assert fake_ml.stats()["refreshes"] == 2 and fake_ml.stats()["invalid_grant"] == 0


def test_unforced_refresh_adopts_a_peers_token_without_spending(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    mine = mlauth.MLAuth.from_env(fake_ml_env)
    peer = mlauth.MLAuth.from_env(fake_ml_env)
    rotated = peer.refresh()
    fake_ml.reset_stats()
    # A peer moved on: its tokens are adopted (as read back from the .env), nothing spent.
    assert mine.refresh(force=False).refresh_token == rotated.refresh_token
    # The token is now seconds old: asking again is answered with it, not with a refresh.
    assert mine.refresh(force=False).access_token == rotated.access_token
    assert fake_ml.stats()["refreshes"] == 0


def test_unforced_refresh_spends_when_the_token_is_old(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, extra={"ML_TOKEN_REFRESHED_AT": str(time.time() - 60)})
    auth = mlauth.MLAuth.from_env(env)
    old = auth.tokens.access_token
    assert auth.refresh(force=False).access_token != old
    assert fake_ml.stats()["refreshes"] == 1


def test_valid_tokens_refreshes_an_expired_token_only(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    auth = mlauth.MLAuth.from_env(env)
    assert auth.valid_tokens() == auth.tokens
    assert fake_ml.stats()["refreshes"] == 0
    fake_ml.write_env(env, expires_at=time.time() - 1)
    fresh = auth.valid_tokens()
    assert fake_ml.stats()["refreshes"] == 1
    assert fresh.expires_in() is not None and fresh.expires_in() > 0  # type: ignore[operator]


@pytest.mark.parametrize("pkce", [False, True])
def test_exchange_code_gets_a_token_pair(fake_ml: FakeMercadoLibre, pkce: bool) -> None:
    import base64
    import hashlib

    verifier = "v" * 64
    challenge = None
    if pkce:
        digest = hashlib.sha256(verifier.encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    code = fake_ml.issue_authorization_code("https://example.test/cb", challenge)
    endpoint = TokenEndpoint(fake_ml.token_url, fake_ml.client_id, Secret(fake_ml.client_secret))
    answer = endpoint.exchange_code(
        Secret(code), "https://example.test/cb", code_verifier=Secret(verifier) if pkce else None
    )
    assert answer.refresh_token is not None and answer.access_token
    assert fake_ml.stats()["code_exchanges"] == 1
    with pytest.raises(mlauth.InvalidGrantError):  # single use
        endpoint.exchange_code(Secret(code), "https://example.test/cb")


def test_refresh_in_progress_sees_another_process_holding_the_lock(fake_ml_env: Path) -> None:
    store = mlauth.EnvFileStore(fake_ml_env)
    assert store.refresh_in_progress() is False
    assert not Path(store.lock_path).exists()  # looking did not create the lock file
    with lock_held_by_another_process(fake_ml_env):
        assert store.refresh_in_progress() is True
    assert store.refresh_in_progress() is False
