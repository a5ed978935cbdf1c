"""Helpers for legacy modules: token globals kept current, a refresh function redirected.

Legacy pipelines keep the token in module globals (``ML_ACCESS_TOKEN``, ``HEADERS``) and have
a refresh function of their own that rewrites the ``.env`` without a lock. Under
:func:`mlauth.install` the globals no longer matter for ``requests`` calls (the header is
replaced), but code may still read them, and a refresh function that runs would race every
other process. These helpers fix both without editing the module.
"""

from __future__ import annotations

import logging
import threading
import types
import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

from mlauth.errors import ConfigError, MLAuthError
from mlauth.secret import Secret
from mlauth.stores.lock import fork_bound
from mlauth.tokens import TokenSet

from . import patch
from .requests_auth import MLAuth

__all__ = ["keep_globals_current", "redirect_refresh"]

log = logging.getLogger("mlauth")

Namespace = types.ModuleType | MutableMapping[str, Any]


def _namespace(target: Namespace) -> MutableMapping[str, Any]:
    return vars(target) if isinstance(target, types.ModuleType) else target


def _auth_or_installed(auth: MLAuth | None) -> MLAuth:
    if auth is not None:
        return auth
    installed = patch.installed()
    if installed is None:
        raise ConfigError("pass auth=, or call mlauth.install() first")
    return installed


class _GlobalsWriter:
    """Writes the current access token into a namespace whenever it changes."""

    def __init__(
        self, namespace: MutableMapping[str, Any], token_name: str, headers_name: str
    ) -> None:
        self.namespace = namespace
        self.token_name = token_name
        self.headers_name = headers_name
        self._written: Secret | None = None
        self._lock = threading.Lock()
        fork_bound.add(self)

    def _after_fork_in_child(self) -> None:
        # A thread of the parent may have been writing the globals at the fork.
        self._lock = threading.Lock()

    def __call__(self, auth: MLAuth) -> None:
        self.write(auth.tokens)

    def write(self, tokens: TokenSet) -> None:
        token = tokens.access_token
        if token is None or token == self._written:
            return
        with self._lock:
            self.namespace[self.token_name] = token.reveal()
            headers = self.namespace.get(self.headers_name)
            # In place: other modules may hold a reference to the same dict.
            if isinstance(headers, MutableMapping):
                headers["Authorization"] = f"Bearer {token.reveal()}"
            self._written = token


# The writers of each auth, so a redirected refresh can update them too.
_writers: weakref.WeakKeyDictionary[MLAuth, list[_GlobalsWriter]] = weakref.WeakKeyDictionary()


def keep_globals_current(
    target: Namespace,
    auth: MLAuth | None = None,
    *,
    token_name: str = "ML_ACCESS_TOKEN",  # noqa: S107 (a variable name)
    headers_name: str = "HEADERS",
) -> None:
    """Keep ``target``'s token globals equal to the token ``auth`` uses.

    ``target`` is a module (or its globals dict). ``token_name`` gets the access token;
    the dict ``headers_name``, if there is one, gets its ``Authorization`` entry updated in
    place. They are written now, after each refresh made by this process (through
    ``on_refresh``, chained after any callback already set) and, under
    :func:`mlauth.install`, after every request, so a token adopted from another process
    lands too. ``auth`` defaults to the installed one.
    """
    auth = _auth_or_installed(auth)
    writer = _GlobalsWriter(_namespace(target), token_name, headers_name)
    writer(auth)
    previous = auth.on_refresh

    def on_refresh(tokens: TokenSet) -> None:
        writer.write(tokens)
        if previous is not None:
            previous(tokens)

    auth.on_refresh = on_refresh
    _writers.setdefault(auth, []).append(writer)
    if patch.installed() is auth:
        patch._after_request.append(writer)


def redirect_refresh(
    target: Namespace, name: str = "refresh_ml_token", auth: MLAuth | None = None
) -> Callable[..., Any]:
    """Replace ``target.<name>`` (a legacy ``refresh() -> bool``) with mlauth's locked refresh.

    The replacement takes any arguments, refreshes like a 401 would (single flight: a token a
    peer already rotated, or one refreshed moments ago, is adopted without spending anything)
    and returns True, or logs the error and returns False, which is what legacy callers
    expect. Callers inside the module find the new function, since Python looks globals up
    at call time. Returns the original function.
    """
    auth = _auth_or_installed(auth)
    namespace = _namespace(target)
    original: object = namespace.get(name)
    if not callable(original):
        raise ConfigError(f"{target!r} has no function {name!r} to redirect")

    def refresh_via_mlauth(*args: object, **kwargs: object) -> bool:
        try:
            auth.refresh(force=False)
        except MLAuthError as exc:
            log.error("%s() redirected to mlauth: refresh failed: %s", name, exc)
            return False
        for writer in _writers.get(auth, ()):
            writer(auth)  # the token may have been adopted, which calls no on_refresh
        return True

    refresh_via_mlauth.__name__ = name
    refresh_via_mlauth.__wrapped__ = original  # type: ignore[attr-defined]
    namespace[name] = refresh_via_mlauth
    return original
