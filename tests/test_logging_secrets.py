"""A DEBUG-level run through a refresh and an invalid_grant shows no whole token or secret."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre


def test_debug_run_through_refresh_and_invalid_grant_leaks_nothing(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = tmp_path / ".env"
    first = fake_ml.write_env(env, expires_at=time.time() - 1)  # expired: refresh at once
    secrets = {str(first["access_token"]), str(first["refresh_token"]), fake_ml.client_secret}

    caplog.set_level(logging.DEBUG)  # the root logger: mlauth, urllib3 and requests alike
    auth = mlauth.MLAuth.from_env(env)
    session = requests.Session()
    session.auth = auth
    assert session.get(f"{fake_ml.base_url}/users/me").status_code == 200
    stored = read_env_file(env)
    secrets |= {str(stored["ML_ACCESS_TOKEN"]), str(stored["ML_REFRESH_TOKEN"])}
    assert fake_ml.stats()["refreshes"] == 1

    # The seller revokes the app, and the stored token reaches its expiry: the refresh that
    # follows is refused for good.
    fake_ml.revoke_refresh_tokens()
    mlauth.EnvFileStore(env).save(dataclasses.replace(auth.tokens, expires_at=time.time() - 1))
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        session.get(f"{fake_ml.base_url}/users/me")

    assert fake_ml.stats()["invalid_grant"] >= 1
    text = "\n".join(
        [r.getMessage() for r in caplog.records]
        + [str(r.args) for r in caplog.records]
        + ["".join(traceback.format_exception(caught.value))]
        + [repr(auth), str(vars(auth)), repr(caught.value)]
    )
    assert "refreshed MercadoLibre token" in text
    assert "invalid_grant" in text
    for secret in secrets:
        assert secret not in text, "a whole token or the secret reached the logs"
    assert mlauth.fingerprint(str(stored["ML_ACCESS_TOKEN"])) in text
