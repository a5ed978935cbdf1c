"""Reading and checking configuration: the ``.env`` keys and the constructor's arguments."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .errors import ConfigError
from .hosts import HostRules, is_loopback
from .stores.base import TokenStore
from .stores.envfile import STORE_KEY, EnvFileStore, read_env_file

__all__ = [
    "DEFAULT_HOSTS",
    "DEFAULT_TOKEN_URL",
    "check_token_url",
    "env_settings",
    "shared_store",
    "store_from_env",
]

DEFAULT_TOKEN_URL = "https://api.mercadolibre.com/oauth/token"  # noqa: S105 (a URL)
DEFAULT_HOSTS = ("api.mercadolibre.com",)


def check_token_url(url: str, where: str, example: str = DEFAULT_TOKEN_URL) -> str:
    """The token URL, or ConfigError: credentials go over https only (plain http on loopback).

    ``example`` is the well-formed URL the error shows (the authorization page checks its
    origin with the same rule).
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        host = None
        parts = None
    if parts is None or host is None or parts.scheme not in ("https", "http"):
        raise ConfigError(f"{where}: {url!r} is not a URL; for example {example}")
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigError(
            f"{where}: {url!r} would send the client secret over plain http; use https "
            "(plain http is allowed only for loopback test servers)"
        )
    if parts.query:
        raise ConfigError(f"{where}: {url!r} has a query string; give the bare URL, e.g. {example}")
    return url.strip()


def check_hosts(hosts: object, where: str) -> HostRules:
    if isinstance(hosts, str):
        hosts = [h for h in hosts.split(",") if h.strip()]
    if not isinstance(hosts, (list, tuple, set, frozenset)):
        raise ConfigError(f"{where}: expected host names, got {type(hosts).__name__}")
    try:
        return HostRules(str(h) for h in hosts)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: {exc}. Write comma-separated host names, each optionally host:port, "
            f"e.g. {DEFAULT_HOSTS[0]}"
        ) from None


def _required(values: Mapping[str, str | None], key: str, path: str, fix: str) -> str:
    value = (values.get(key) or "").strip()
    if not value:
        raise ConfigError(f"{path}: {key} is missing or empty; {fix}")
    if any(ch.isspace() for ch in value):
        raise ConfigError(f"{path}: {key} contains white space; {fix}")
    return value


def env_settings(path: str | os.PathLike[str]) -> dict[str, object]:
    """The MLAuth arguments a ``.env`` defines (credentials, token URL, hosts), checked."""
    where = os.fspath(path)
    values = read_env_file(where)
    creds = "copy it from your app in the MercadoLibre developer panel"
    settings: dict[str, object] = {
        "client_id": _required(values, "ML_CLIENT_ID", where, creds),
        "client_secret": _required(values, "ML_CLIENT_SECRET", where, creds),
    }
    if (values.get("ML_TOKEN_URL") or "").strip():
        settings["token_url"] = check_token_url(
            values["ML_TOKEN_URL"] or "", f"{where}: ML_TOKEN_URL"
        )
    if (values.get("ML_API_HOSTS") or "").strip():
        check_hosts(values["ML_API_HOSTS"], f"{where}: ML_API_HOSTS")
        settings["hosts"] = tuple(
            h.strip() for h in (values["ML_API_HOSTS"] or "").split(",") if h.strip()
        )
    return settings


def shared_store(values: Mapping[str, str | None], where: str) -> TokenStore | None:
    """The store ``ML_TOKEN_STORE`` names in these ``.env`` values, or None if it names none."""
    url = (values.get(STORE_KEY) or "").strip()
    if not url:
        return None
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            # Host part only: credentials may sit before '@' or in the query string.
            f"{where}: {STORE_KEY}={url.split('@')[-1].split('?')[0]!r} is not a store mlauth "
            "knows; write "
            "redis://HOST:PORT/DB (or rediss:// for TLS), or delete the line to keep the "
            "tokens in this file"
        )
    try:
        from .stores.redis import RedisStore
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
        client_id=_required(values, "ML_CLIENT_ID", where, "copy it from your app"),
        lock_timeout=lock_timeout,
    )


def store_from_env(path: str | os.PathLike[str]) -> TokenStore:
    """The token store a ``.env`` selects: the one ``ML_TOKEN_STORE`` names, else the file.

    The one place the store is chosen: :meth:`MLAuth.from_env`, :func:`mlauth.install`
    (so ``mlauth run``) and every CLI command go through it.
    """
    where = os.fspath(path)
    return shared_store(read_env_file(where), where) or EnvFileStore(where)
