"""Reading and checking configuration: the ``.env`` keys and the constructor's arguments."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .errors import ConfigError, masked, sealed
from .hosts import HostRules
from .secret import Secret, mask
from .stores.envfile import read_env_file, secrets_of
from .urls import LOOPBACK, configured_target, is_loopback

__all__ = [
    "API_HOSTS",
    "DEFAULT_HOSTS",
    "DEFAULT_TOKEN_URL",
    "check_hosts",
    "check_token_url",
    "env_settings",
    "hosts_warning",
    "token_hosts_row",
]

DEFAULT_TOKEN_URL = "https://api.mercadolibre.com/oauth/token"  # noqa: S105 (a URL)
DEFAULT_HOSTS = ("api.mercadolibre.com",)
# The API hosts of MercadoLibre and Mercado Pago (ML-FACTS.md): a host list that can match
# neither, nor a loopback test server, nor the token URL's host, sends the token nowhere.
API_HOSTS = ("api.mercadolibre.com", "api.mercadopago.com")


def check_token_url(url: str, where: str, example: str = DEFAULT_TOKEN_URL) -> str:
    """The token URL, or ConfigError: credentials go over https only (plain http on loopback),
    to the host requests will connect to (see :func:`mlauth.urls.configured_target`).

    ``example`` is the well-formed URL the error shows (the authorization page checks its
    origin with the same rule).
    """
    if not isinstance(url, str):
        raise ConfigError(f"{where}: expected a URL, got {type(url).__name__}; e.g. {example}")
    text = url.strip()
    try:
        configured_target(text, example)
    except ValueError as exc:
        raise ConfigError(f"{where}: {_shown(text)} {exc}") from None
    return text


def _shown(url: str) -> str:
    """``url`` quoted for an error, its password (if any) masked."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        url = url.replace(f":{password}@", ":***@", 1)
    return repr(url)


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


def _unmatched(rules: HostRules, token_url: str) -> list[str] | None:
    """None if an entry of ``rules`` can match a MercadoLibre or Mercado Pago API host, a
    loopback host (a test server) or the token URL's host (a proxy in front of the API);
    otherwise the hosts the entries probably meant (``api.mercadolibre.com (not
    api.mercadolibre.con)``), maybe none."""
    if any(is_loopback(name) for name, _ in rules.entries):
        return None
    token = configured_target(token_url, DEFAULT_TOKEN_URL)
    wanted = [(host, 443) for host in API_HOSTS] + [(token.host, token.port)]
    if any(rules.matches(name, port) for name, port in wanted):
        return None
    known = sorted({name for name, _ in wanted})
    guesses = []
    for name, _ in rules.entries:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close and close[0] != name:
            guesses.append(f"{close[0]} (not {name})")
    return guesses


def hosts_warning(rules: HostRules, token_url: str) -> str | None:
    """Why ``rules`` will put the token on no request to MercadoLibre, or None.

    Then every request goes out without the token and gets a 401, and nothing else would
    say why, so the adapter says it once at start-up.
    """
    guesses = _unmatched(rules, token_url)
    if guesses is None:
        return None
    guess = f" Did you mean {', '.join(guesses)}?" if guesses else ""
    host = configured_target(token_url, DEFAULT_TOKEN_URL).host
    return (
        f"the hosts that get the token (ML_API_HOSTS, hosts=: {rules.shown()}) include no "
        f"MercadoLibre or Mercado Pago API host ({', '.join(API_HOSTS)}, port 443), no "
        f"loopback host ({LOOPBACK}) and not the token URL's host ({host}): requests to "
        f"MercadoLibre will go without the token and get 401.{guess}"
    )


@sealed  # the .env's values are locals
def token_hosts_row(path: str | os.PathLike[str]) -> str:
    """What ``mlauth status`` shows for the hosts that get the token. Never raises: a bad
    value is reported by the checks that follow the rows."""
    try:
        values = read_env_file(path)
        listed = (values.get("ML_API_HOSTS") or "").strip()
        rules = check_hosts(listed or list(DEFAULT_HOSTS), "ML_API_HOSTS")
    except ConfigError:
        return "unknown (ML_API_HOSTS is not valid)"
    return mask(_hosts_row(values, rules, listed), secrets_of(values))


def _hosts_row(values: Mapping[str, str | None], rules: HostRules, listed: str) -> str:
    shown = rules.shown() + ("" if listed else " (the default)")
    try:
        url = check_token_url(values.get("ML_TOKEN_URL") or DEFAULT_TOKEN_URL, "ML_TOKEN_URL")
    except ConfigError:
        return shown  # the token URL's own error follows the rows
    guesses = _unmatched(rules, url)
    if guesses is None:
        return shown
    guess = f"; did you mean {', '.join(guesses)}?" if guesses else ""
    return (
        f"{shown} (WARNING: no MercadoLibre API host among them: requests to MercadoLibre "
        f"go without the token{guess})"
    )


def _required(values: Mapping[str, str | None], key: str, path: str, fix: str) -> str:
    value = (values.get(key) or "").strip()
    if not value:
        raise ConfigError(f"{path}: {key} is missing or empty; {fix}")
    if any(ch.isspace() for ch in value):
        raise ConfigError(f"{path}: {key} contains white space; {fix}")
    return value


_SETTINGS = frozenset(
    {
        "ML_CLIENT_ID",
        "ML_CLIENT_SECRET",
        "ML_TOKEN_URL",
        "ML_API_HOSTS",
        "ML_ALERT_COMMAND",
        "ML_ALERT_FAILING_MINUTES",
    }
)


@sealed  # the .env's values, the client secret among them, are locals here and below
def env_settings(path: str | os.PathLike[str]) -> dict[str, object]:
    """The MLAuth arguments a ``.env`` defines (credentials, token URL, hosts), checked.

    The client secret comes as a :class:`Secret`. A ConfigError leaves without the frames
    that held the file's values, and quotes none of its secrets.
    """
    where = os.fspath(path)
    read = read_env_file(where)
    with masked(secrets_of(read)):  # a token pasted under another key is not quoted
        return _settings(where, {key: value for key, value in read.items() if key in _SETTINGS})


def _settings(where: str, values: dict[str, str | None]) -> dict[str, object]:
    creds = "copy it from your app in the MercadoLibre developer panel"
    settings: dict[str, object] = {
        "client_id": _required(values, "ML_CLIENT_ID", where, creds),
        "client_secret": Secret(_required(values, "ML_CLIENT_SECRET", where, creds)),
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
    # The alert command: the process's environment first (`mlauth run --alert` sets it there).
    command = os.environ.get("ML_ALERT_COMMAND") or values.get("ML_ALERT_COMMAND") or ""
    if command.strip():
        settings["alert_command"] = command.strip()
    minutes = (values.get("ML_ALERT_FAILING_MINUTES") or "").strip()
    if minutes:
        try:
            settings["alert_failing_minutes"] = float(minutes)
        except ValueError:
            settings["alert_failing_minutes"] = -1.0  # refused below, with the key named
        if not 0 <= settings["alert_failing_minutes"] < float("inf"):  # type: ignore[operator]
            raise ConfigError(
                f"{where}: ML_ALERT_FAILING_MINUTES={minutes!r} is not a number of minutes; "
                "write how long refreshes may fail before the alert, e.g. 10"
            )
    return settings
