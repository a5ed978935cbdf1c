"""The one place a store is chosen from configuration: what ``ML_TOKEN_STORE`` names.

At start (:func:`mlauth.stores.store_from_env`) and at run time, when a migration writes
``ML_TOKEN_STORE`` into a ``.env`` that running processes use (the ``.env`` store follows it),
the same function decides, so both always agree.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlauth.errors import ConfigError
from mlauth.secret import redact_url, url_scheme

from .base import TokenStore

__all__ = ["STORE_KEY", "shared_store"]

# Set when the tokens moved out of the file (``mlauth migrate``): it names the shared store.
STORE_KEY = "ML_TOKEN_STORE"


def _client_id(values: Mapping[str, str | None], where: str) -> str:
    value = (values.get("ML_CLIENT_ID") or "").strip()
    if not value:
        raise ConfigError(f"{where}: ML_CLIENT_ID is missing or empty; copy it from your app")
    return value


def shared_store(values: Mapping[str, str | None], where: str) -> TokenStore | None:
    """The store ``ML_TOKEN_STORE`` names in these ``.env`` values, or None if it names none."""
    url = (values.get(STORE_KEY) or "").strip()
    if not url:
        return None
    scheme = url_scheme(url)
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{where}: {STORE_KEY}={redact_url(url)!r} is not a store mlauth "
            "knows; write redis://HOST:PORT/DB (or rediss:// for TLS), or delete the line to "
            "keep the tokens in this file"
        )
    try:
        from .redis import RedisStore  # an optional extra: imported only when named
    except ImportError as exc:
        raise ConfigError(f"{where}: {STORE_KEY} names Redis, but {exc}") from None
    raw_timeout = (values.get("ML_TOKEN_LOCK_TIMEOUT") or "").strip()
    try:
        lock_timeout = float(raw_timeout) if raw_timeout else 30.0
    except ValueError:
        raise ConfigError(
            f"{where}: ML_TOKEN_LOCK_TIMEOUT={raw_timeout!r} is not a number of seconds"
        ) from None
    return RedisStore(
        url,
        key=(values.get("ML_TOKEN_KEY") or "").strip() or None,
        client_id=_client_id(values, where),
        lock_timeout=lock_timeout,
    )
