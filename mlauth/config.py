"""Reading and checking configuration: the ``.env`` keys and the constructor's arguments."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .errors import ConfigError
from .hosts import HostRules, is_loopback
from .secret import Secret
from .stores.envfile import read_env_file

__all__ = [
    "DEFAULT_HOSTS",
    "DEFAULT_TOKEN_URL",
    "check_token_url",
    "env_settings",
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


_SETTINGS = frozenset({"ML_CLIENT_ID", "ML_CLIENT_SECRET", "ML_TOKEN_URL", "ML_API_HOSTS"})


def env_settings(path: str | os.PathLike[str]) -> dict[str, object]:
    """The MLAuth arguments a ``.env`` defines (credentials, token URL, hosts), checked.

    The client secret comes as a :class:`Secret`, and the file's tokens are not kept: a
    caller's frame (on the traceback of a ConfigError) holds only what it needs.
    """
    where = os.fspath(path)
    values = {key: value for key, value in read_env_file(where).items() if key in _SETTINGS}
    creds = "copy it from your app in the MercadoLibre developer panel"
    settings: dict[str, object] = {
        "client_id": _required(values, "ML_CLIENT_ID", where, creds),
        "client_secret": Secret(_required(values, "ML_CLIENT_SECRET", where, creds)),
    }
    del values["ML_CLIENT_SECRET"]
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
