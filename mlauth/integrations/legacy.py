"""Helpers for legacy modules: token globals kept current, a refresh function redirected.

Legacy pipelines keep the token in module globals (``ML_ACCESS_TOKEN``, ``HEADERS``) and have
a refresh function of their own that rewrites the ``.env`` without a lock. Under
:func:`mlauth.install` the globals no longer matter for ``requests`` calls (the header is
replaced), but code may still read them, and a refresh function that runs would race every
other process. These helpers fix both without editing the module.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, MutableMapping
from typing import Any

from mlauth.errors import ConfigError
from mlauth.tokens import TokenSet

from . import patch
from .globals_writer import GlobalsWriter, register
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
    writer = GlobalsWriter(_namespace(target), token_name, headers_name)
    writer(auth)
    previous = auth.on_refresh

    def on_refresh(tokens: TokenSet) -> None:
        writer.write(tokens)
        if previous is not None:
            previous(tokens)

    auth.on_refresh = on_refresh
    register(auth, writer)
    if patch.installed() is auth:
        patch._after_request.append(writer)


def redirect_refresh(
    target: Namespace, name: str = "refresh_ml_token", auth: MLAuth | None = None
) -> Callable[..., Any]:
    """Replace ``target.<name>`` (a legacy ``refresh() -> bool``) with mlauth's locked refresh.

    The replacement takes any arguments, refreshes like a 401 would (single flight: a token a
    peer already rotated, or one refreshed moments ago, is adopted without spending anything)
    and returns True, or logs the error and returns False, which is what legacy callers
    expect. It leaves ``ML_ACCESS_TOKEN`` and ``HEADERS["Authorization"]`` of ``target``, if
    it has them, as the legacy function would. Callers inside the module find the new
    function, since Python looks globals up at call time. Returns the original function; a
    function mlauth already redirected (:func:`mlauth.install` does it by default) is left
    as it is.

    :func:`mlauth.install` redirects ``refresh_ml_token`` by default, and others named in its
    ``redirect=``: this is for a module object at hand, or an auth of its own.
    """
    # Imported here, not with mlauth: the redirect package is imported only when something
    # is redirected (see mlauth.integrations.patch).
    from .redirect import functions

    auth = _auth_or_installed(auth)
    namespace = _namespace(target)
    original: object = namespace.get(name)
    if not callable(original):
        raise ConfigError(f"{target!r} has no function {name!r} to redirect")
    if functions.is_redirect(original):
        return functions.original_of(original)  # type: ignore[return-value]
    label = f"{namespace.get('__name__', '?')}.{name}"

    def refresh_via_mlauth(*args: object, **kwargs: object) -> bool:
        return functions.refresh_now(auth, label, namespace)

    functions.mark(refresh_via_mlauth, original)
    namespace[name] = refresh_via_mlauth
    return original
