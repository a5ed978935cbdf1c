"""Bad configuration fails at from_env time, naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlauth
from mlauth.tokens import Freshness
from tests.support.fake_tokens import env_text


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ML_CLIENT_ID": None}, "ML_CLIENT_ID is missing"),
        ({"ML_CLIENT_SECRET": ""}, "ML_CLIENT_SECRET is missing"),
        ({"ML_CLIENT_ID": "'123 456'"}, "ML_CLIENT_ID contains white space"),
        ({"ML_REFRESH_TOKEN": None}, "ML_REFRESH_TOKEN is missing"),
        ({"ML_TOKEN_EXPIRES_AT": "soon"}, "ML_TOKEN_EXPIRES_AT='soon' is not a number"),
        ({"ML_TOKEN_URL": "http://api.mercadolibre.com/oauth/token"}, "plain http"),
        ({"ML_TOKEN_URL": "not a url"}, "ML_TOKEN_URL: 'not a url' is not a URL"),
        ({"ML_API_HOSTS": "api.mercadolibre.com:99999"}, "ML_API_HOSTS: .* bad port"),
        ({"ML_API_HOSTS": "https://api.mercadolibre.com/"}, "ML_API_HOSTS: .* not a host"),
    ],
)
def test_bad_configuration_names_file_and_key(
    tmp_path: Path, overrides: dict[str, str | None], message: str
) -> None:
    path = write(tmp_path, env_text(**overrides))
    with pytest.raises(mlauth.ConfigError, match=message) as caught:
        mlauth.MLAuth.from_env(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_missing_env_file_is_never_created(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    with pytest.raises(mlauth.ConfigError, match=r"no such \.env file"):
        mlauth.MLAuth.from_env(path)
    assert not path.exists()


def test_env_settings_and_keyword_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        env_text(ML_TOKEN_URL="http://127.0.0.1:9/oauth/token", ML_API_HOSTS="127.0.0.1:9, x.io"),
    )
    auth = mlauth.MLAuth.from_env(path, refresh_margin=42)
    assert auth.token_url == "http://127.0.0.1:9/oauth/token"
    assert auth.refresh_margin == 42
    assert "127.0.0.1" in repr(auth) and "x.io" in repr(auth)
    overridden = mlauth.MLAuth.from_env(path, client_id="999", hosts=["a.example"])
    assert overridden.client_id == "999"
    assert "a.example" in repr(overridden) and "x.io" not in repr(overridden)


def test_legacy_env_without_expiry_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, env_text(ML_TOKEN_EXPIRES_AT=None))
    auth = mlauth.MLAuth.from_env(path)
    assert auth.tokens.expires_at is None
    assert auth.tokens.freshness(300) is Freshness.FRESH


def test_store_must_be_a_token_store(tmp_path: Path) -> None:
    with pytest.raises(mlauth.ConfigError, match="TokenStore"):
        mlauth.MLAuth("1", "s", store="not a store")  # type: ignore[arg-type]


def test_from_env_reads_a_file_saved_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_bytes(b"\xef\xbb\xbf" + env_text().split("\n", 2)[2].encode())  # ML_CLIENT_ID first
    auth = mlauth.MLAuth.from_env(path)
    assert auth.client_id == "1234567890123456"


def test_from_env_refuses_a_token_key_set_twice(tmp_path: Path) -> None:
    path = write(tmp_path, env_text() + "ML_REFRESH_TOKEN=TG-stale-from-an-old-paste\n")
    with pytest.raises(
        mlauth.ConfigError, match=r"ML_REFRESH_TOKEN is set twice, on lines 6 and 8"
    ):
        mlauth.MLAuth.from_env(path)
