"""What every HTTP adapter of the refresh engine shares: its options, its set-up, its face.

:class:`mlauth.MLAuth` (requests) and :class:`mlauth.httpx.HttpxAuth` (httpx) take exactly
the same options, read the same ``.env`` keys and use the same stores, because both are this
class plus a few lines that speak their client's auth protocol. Two adapters built on one
``.env`` share the single flight through the store's lock, as two processes do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from mlauth import alerts, events
from mlauth.alerts import DEFAULT_FAILING_MINUTES
from mlauth.config import (
    DEFAULT_HOSTS,
    DEFAULT_TOKEN_URL,
    check_hosts,
    check_token_url,
    env_settings,
    hosts_warning,
)
from mlauth.endpoint import TokenEndpoint
from mlauth.engine import RefreshEngine
from mlauth.errors import ConfigError
from mlauth.preflight import refresh_problem
from mlauth.secret import Secret
from mlauth.stores import TokenStore, store_from_env
from mlauth.tokens import TokenSet

from .runner import ENV_VARIABLE as RUN_ENV_VARIABLE

__all__ = ["AuthAdapter", "bearer", "warn_not_resent"]

log = logging.getLogger("mlauth")

_Adapter = TypeVar("_Adapter", bound="AuthAdapter")


def bearer(header: str | bytes | None) -> Secret | None:
    """The token of an ``Authorization: Bearer`` header, or None.

    A :class:`Secret` at once: the caller's frame is on the traceback of whatever the 401 it
    handles raises (a failed refresh), and a crash reporter sends that frame's locals.
    """
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header or header[:7].lower() != "bearer ":
        return None
    token = header[7:].strip()
    return Secret(token) if token else None


def warn_not_resent(method: str, path: str) -> None:
    """The one line both adapters log when a 401's request cannot be sent again."""
    log.warning(
        "got a 401 on %s %s; the token is refreshed but the body cannot be sent again "
        "(a generator or unrewindable stream), so the 401 is returned",
        method,
        path,
    )


def _check(
    client_id: object,
    secret: Secret,
    store: object,
    refresh_margin: float,
    lock_timeout: float,
    min_token_age: float,
) -> None:
    """ConfigError unless the constructor's arguments are usable."""
    if not isinstance(client_id, str) or not client_id.strip():
        raise ConfigError("client_id is empty; pass the app's client id (ML_CLIENT_ID)")
    if not secret.reveal().strip():
        raise ConfigError("client_secret is empty; pass the app's secret (ML_CLIENT_SECRET)")
    if not isinstance(store, TokenStore):
        raise ConfigError(f"store must be a TokenStore such as EnvFileStore, got {store!r}")
    if refresh_margin < 0 or lock_timeout <= 0 or min_token_age < 0:
        raise ConfigError("refresh_margin and min_token_age must be >= 0, lock_timeout > 0")


def _warn_if_lock_lapses(store: TokenStore, endpoint: TokenEndpoint) -> None:
    """One WARNING at set-up if the store's lock can lapse within one token call.

    Allowed (the commit stays fenced), but a slow answer then lets the lock lapse mid-call:
    a peer may take it and send the same refresh token (one of them gets invalid_grant and
    adopts the other's commit), or the refresh fails with LockLostError.
    """
    expiry = store.lock_expiry
    if expiry is not None and expiry <= endpoint.attempt_time:
        log.warning(
            "%s: the refresh lock expires after %gs (lock_timeout, ML_TOKEN_LOCK_TIMEOUT), "
            "not longer than one token call (%gs connect + read timeout); with a slow token "
            "endpoint a peer may take the lapsed lock and spend the same refresh token, or "
            "refreshes fail with LockLostError. Raise it above %gs.",
            store.location,
            expiry,
            endpoint.attempt_time,
            endpoint.attempt_time,
        )


class AuthAdapter:
    """The options, set-up and public methods of an auth that keeps a token chain alive.

    Subclasses add only the hooks of their HTTP client; every decision about tokens is the
    engine's (:class:`mlauth.engine.RefreshEngine`).
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str | Secret,
        store: TokenStore,
        *,
        token_url: str = DEFAULT_TOKEN_URL,
        hosts: Iterable[str] = DEFAULT_HOSTS,
        refresh_margin: float = 300.0,
        lock_timeout: float = 120.0,
        min_token_age: float = 10.0,
        timeout: float | tuple[float, float] = (5.0, 15.0),
        max_attempts: int = 3,
        backoff: float = 0.5,
        on_refresh: Callable[[TokenSet], None] | None = None,
        alert_command: str | None = None,
        alert_failing_minutes: float = DEFAULT_FAILING_MINUTES,
    ) -> None:
        # Wrapped at once and the plain str let go: this frame is on the traceback of any
        # error raised below (a store that cannot be read, no refresh token), and crash
        # reporters send its locals.
        secret = client_secret if isinstance(client_secret, Secret) else Secret(client_secret)
        del client_secret
        _check(client_id, secret, store, refresh_margin, lock_timeout, min_token_age)
        self.client_id = client_id.strip()
        self.store = store
        store.bind_client(self.client_id)  # a shared store (Redis) names its key after it
        self.token_url = check_token_url(token_url, "token_url")
        self._hosts = check_hosts(hosts if isinstance(hosts, str) else list(hosts), "hosts")
        unmatched = hosts_warning(self._hosts, self.token_url)
        if unmatched is not None:
            log.warning("%s", unmatched)  # once, at start-up: each 401 later would not say why
        endpoint = TokenEndpoint(
            self.token_url,
            self.client_id,
            secret,
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
            # Retries must end well before peers waiting on the lock give up.
            budget=float(lock_timeout) / 2,
        )
        _warn_if_lock_lapses(store, endpoint)
        self._engine = RefreshEngine(
            store,
            endpoint,
            refresh_margin=float(refresh_margin),
            lock_timeout=float(lock_timeout),
            min_token_age=float(min_token_age),
            on_refresh=on_refresh,
            secrets=(secret,),
        )
        if alert_command:
            alerts.watch(
                alert_command, store, alert_failing_minutes * 60, self._engine.known_secrets
            )

    @classmethod
    def from_env(
        cls: type[_Adapter],
        path: str | os.PathLike[str] = ".env",
        *,
        seller: str | int | None = None,
        **kwargs: Any,
    ) -> _Adapter:
        """Build from a ``.env``: credentials, token URL and hosts from the file, tokens in it.

        Keyword arguments override the file and are passed on to the constructor; ``store=``
        keeps the credentials in the file and the tokens elsewhere, as ``ML_TOKEN_STORE`` does.
        ``seller``: the user id whose chain to use, in a store of many sellers (one holding
        a single seller needs none; :class:`mlauth.Sellers` routes by seller).
        If a refresh could not be saved or locked (:func:`~mlauth.preflight.refresh_problem`),
        an ERROR says so now.
        """
        settings = env_settings(path)
        settings.update(kwargs)
        store = settings.pop("store", None) or store_from_env(path, seller=seller)
        auth = cls(store=store, **settings)  # type: ignore[arg-type]
        # Said at start, not at the first refresh hours later; not raised: a pipeline whose
        # token is still valid may finish its work before a refresh is due.
        # Under `mlauth run` the command's .env was checked before the command started; every
        # Python it starts would otherwise check it again.
        checked = os.environ.get(RUN_ENV_VARIABLE)
        if not checked or os.path.realpath(checked) != os.path.realpath(path):
            problem = refresh_problem(auth.store)
            if problem is not None:
                log.error("the next token refresh will fail: %s", problem)
        return auth

    def __repr__(self) -> str:
        # Also of an object whose __init__ failed midway: tracebacks that show locals
        # (pytest -l, capture_locals) call it on the frame's ``self``.
        state = vars(self)
        engine = state.get("_engine")
        return (
            f"{type(self).__name__}(client_id={state.get('client_id')!r}, "
            f"store={state.get('store')!r}, hosts={state.get('_hosts')!r}, "
            f"{engine.tokens.describe() if engine is not None else 'not set up'})"
        )

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A pickle would carry the client secret and live tokens into whatever transports it
        # (a pool's pipe, a task queue's broker), and the copy would share none of this
        # process's state anyway. Each process builds its own; fork children inherit it.
        name = type(self).__name__
        raise TypeError(
            f"an {name} cannot be pickled (nor a client holding one): with a spawn or "
            "forkserver pool, or a task queue, build one in each worker, e.g. "
            f"{name}.from_env(path) in the pool's initializer; forked workers inherit a "
            "module-level one and may use it as is"
        )

    @property
    def tokens(self) -> TokenSet:
        """The tokens this process uses now (values wrapped in :class:`Secret`)."""
        return self._engine.tokens

    # The tuning options live in the engine; set here, they take effect there.
    @property
    def refresh_margin(self) -> float:
        return self._engine.refresh_margin

    @refresh_margin.setter
    def refresh_margin(self, seconds: float) -> None:
        self._engine.refresh_margin = float(seconds)

    @property
    def lock_timeout(self) -> float:
        return self._engine.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        self._engine.lock_timeout = float(seconds)

    @property
    def min_token_age(self) -> float:
        return self._engine.min_token_age

    @min_token_age.setter
    def min_token_age(self, seconds: float) -> None:
        self._engine.min_token_age = float(seconds)

    @property
    def on_refresh(self) -> Callable[[TokenSet], None] | None:
        """Called with the new tokens after each refresh this process made."""
        return self._engine.on_refresh

    @on_refresh.setter
    def on_refresh(self, callback: Callable[[TokenSet], None] | None) -> None:
        self._engine.on_refresh = callback

    def _allows(self, url: Any) -> bool:
        """Whether the token goes to ``url`` (as the HTTP client parsed it, if it did)."""
        return self._hosts.allows(url)

    def _failed_token(
        self, status_code: int, url: Any, headers: Mapping[str, str | bytes]
    ) -> Secret | None:
        """The token a response to ``url``, sent with ``headers``, answered with a 401, if
        that 401 is ours to handle; else None.

        The one gate of every adapter: a 401 (403 is about permissions, never about expiry),
        from a host we send the token to (hooks and flows see every redirect hop, and another
        host's 401 is none of our business), on a request that carried our bearer token (one
        whose header the client stripped on a redirect did not). Whether that token is still
        the one in use is the engine's question."""
        if status_code != 401 or not self._allows(url):
            return None
        return bearer(headers.get("Authorization"))

    def _told_401(self, method: str, host: str, returned: str | None) -> None:
        """The event of a 401 this adapter handled: sent again (``returned`` None) or
        returned to the caller, and why (:class:`mlauth.events.UnauthorizedReturned`)."""
        store, seller = self._engine.store.location, self._engine.store.seller
        if returned is None:
            event: events.Event = events.UnauthorizedAbsorbed(
                store=store, seller=seller, method=method, host=host
            )
        else:
            event = events.UnauthorizedReturned(
                store=store, seller=seller, method=method, host=host, reason=returned
            )
        events.emit(event)

    def handles(self, url: str) -> bool:
        """Whether a request to ``url`` would carry the token (an allowed host, https)."""
        return self._hosts.allows(url)

    def valid_tokens(self) -> TokenSet:
        """Tokens with a usable access token, as the next request would send them.

        A peer's newer token is picked up; an expired token is refreshed (waiting for the
        locks), and one within the refresh margin is refreshed if nobody else is doing it.
        """
        return self._engine.valid_tokens()

    def refresh(self, *, force: bool = True) -> TokenSet:
        """Refresh now under both locks and return the tokens to use.

        ``force=True`` always spends the refresh token found under the lock (``mlauth
        refresh``). ``force=False`` treats the token this process holds as failed, as a 401
        would: if a peer has already replaced it, or it was refreshed less than
        ``min_token_age`` ago, those tokens are returned and nothing is spent. That is the
        right answer to a legacy "refresh now" call made by several processes at once.
        """
        return self._engine.refresh(force=force)
