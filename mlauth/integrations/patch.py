"""``mlauth.install()``: every ``requests`` call in the process carries the auth, unedited.

One class attribute is patched: ``requests.Session.request``. ``requests.get/post/...`` build
a throwaway Session and go through it, and so do sessions created before the patch, so this
one patch covers legacy code whichever way it calls requests and whenever it was imported.
What it does not cover: a bound ``session.request`` saved before install(), and code that
calls ``Session.send`` with a request it prepared itself.

The saved original is never forgotten: a bound ``session.request`` taken while installed, or
a thread already inside a request, still calls our wrapper after :func:`uninstall`, and the
wrapper must then find the original to pass the call through to.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from mlauth.errors import ConfigError
from mlauth.hosts import DEFAULT_PORTS
from mlauth.logs import level_from_environment, show_on_stderr
from mlauth.stores import store_from_env

from .requests_auth import MLAuth

if TYPE_CHECKING:
    from .redirect import Redirect

__all__ = ["install", "installed", "uninstall"]

log = logging.getLogger("mlauth")

_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have been inside install() or uninstall() at the fork.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
# (the .env's real path, the auth) while installed; read without the lock by every request,
# so it is only ever replaced whole.
_state: tuple[str, MLAuth] | None = None
# What our wrapper calls; set at the first install() and only ever replaced by another
# callable, never cleared (see the module docstring).
_original: Callable[..., requests.Response] | None = None
# Whether our wrapper is somewhere in Session.request's chain (itself, or under another patch).
_patched = False
# Called after every patched request (mlauth.integrations.legacy keeps a module's globals current).
_after_request: list[Callable[[MLAuth], None]] = []

# Session.request(self, method, url, params, data, headers, cookies, files, auth, ...):
# the index of ``auth`` among the positional arguments after ``url``.
_AUTH_POSITION = 5

# The legacy redirect (mlauth.integrations.redirect, with ast, the import hook and the script
# watch) is imported only when something is redirected: ``import mlauth`` and install(
# redirect=False) do without it, and `mlauth run` pays for it once per interpreter, not twice.
_REDIRECT = "mlauth.integrations.redirect"
# Whether install() started the redirect (False under install(redirect=False)).
_redirecting = False


def _redirect_more(auth: MLAuth, more: Redirect) -> None:
    """A later install() for the same .env: add the functions it names (the redirect is
    started first, as it was before it was imported lazily, if install() had redirect=False)."""
    global _redirecting
    from . import redirect

    if not _redirecting:
        redirect.start(auth, redirect.plan_for(False))
        _redirecting = True
    redirect.add(more)


def _request(
    self: requests.Session, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
) -> requests.Response:
    state, original = _state, _original
    assert original is not None  # set before the wrapper is first put in place, never cleared
    if state is not None:
        auth = state[1]
        explicit = args[_AUTH_POSITION] if len(args) > _AUTH_POSITION else kwargs.get("auth")
        # Only for URLs the auth handles: any auth at all, even one that does nothing for a
        # host, would stop requests from using ~/.netrc credentials for that host.
        text = url.decode("utf-8", "replace") if isinstance(url, bytes) else str(url)
        if explicit is None and self.auth is None and _gets_token(auth, text):
            if len(args) > _AUTH_POSITION:
                args = (*args[:_AUTH_POSITION], auth, *args[_AUTH_POSITION + 1 :])
            else:
                kwargs["auth"] = auth
        response = original(self, method, url, *args, **kwargs)
        for listener in list(_after_request):
            listener(auth)
        return response
    return original(self, method, url, *args, **kwargs)


def _endpoint(url: str) -> tuple[str, str, int | None, str] | None:
    """(scheme, host, port, path) with the default port filled in; None if unparsable."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    port = port or DEFAULT_PORTS.get(scheme)
    return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def _gets_token(auth: MLAuth, url: str) -> bool:
    # The token endpoint is on an allowed host, but a legacy refresh POST sent there needs
    # no bearer token, and a 401 from it (invalid_client) must not start a refresh. Compared
    # parsed: https://api.mercadolibre.com:443/oauth/token is the same endpoint.
    if not auth.handles(url):
        return False
    target = _endpoint(url)
    if target is not None and target == _endpoint(auth.token_url):
        from .redirect.unlocked import token_endpoint_called  # rare: a legacy refresh POST

        token_endpoint_called(auth.token_url)  # never mlauth's own: say who, and the fix
        return False
    return True


def install(
    path: str | os.PathLike[str] = ".env",
    *,
    redirect: bool | Iterable[str] = True,
    **kwargs: Any,
) -> MLAuth:
    """Make every ``requests`` call of this process carry an :class:`MLAuth` built on ``path``.

    Requests to allowed hosts that have no ``auth=`` of their own and whose session has none
    get the token (a stale ``Authorization`` header is replaced); everything else is left as
    it is. Keyword arguments go to :meth:`MLAuth.from_env`.

    ``redirect``: every top-level function named ``refresh_ml_token`` in the program's own
    modules (the script, the modules beside it; not installed libraries) runs mlauth's locked
    refresh instead of its own from the moment its ``def`` has run, in modules imported before
    or after; ``["MODULE:FUNCTION", ...]`` names others besides; False redirects nothing (see
    :mod:`mlauth.integrations.redirect` and docs/legacy.md).

    mlauth's warnings and errors are shown on stderr from then on when the app has no logging
    handler of its own (``MLAUTH_LOG_LEVEL`` sets the level, ``off`` silences them; see
    :mod:`mlauth.logs`): an app that configures logging, before or after, sees them once,
    through its own handlers.

    Calling it again with the same ``.env`` returns the installed MLAuth (later keyword
    arguments are ignored, but functions named in ``redirect`` are added); with another
    ``.env`` it raises :class:`ConfigError`, since one process cannot sensibly send two token
    chains to the same hosts: call :func:`uninstall` first to switch.
    """
    global _state, _original, _patched, _redirecting
    real = os.path.realpath(os.fspath(path))
    with _lock:
        if _state is not None:
            if _state[0] == real:
                if not isinstance(redirect, bool):  # True or False here changes nothing
                    _redirect_more(_state[1], redirect)
                return _state[1]
            raise ConfigError(
                f"mlauth is already installed for {_state[0]}; call mlauth.uninstall() before "
                f"installing it for {real}"
            )
        # Before anything can log: a legacy script never set up logging, and mlauth's
        # NullHandler would hide even the ERROR that says its tokens could not be saved.
        show_on_stderr(level_from_environment())
        plan = None  # redirect=False: the redirect is not even imported
        if redirect is not False:
            from .redirect import plan_for, start

            plan = plan_for(redirect)  # a malformed MODULE:FUNCTION: before any change
        kwargs.setdefault("store", store_from_env(path))
        auth = MLAuth.from_env(path, **kwargs)
        if not _patched:
            _original = requests.Session.request
            requests.Session.request = _request  # type: ignore[method-assign]
            _patched = True
        _state = (real, auth)
        if plan is not None:
            start(auth, plan)
            _redirecting = True
        log.debug("installed mlauth into requests for %s", real)
        return auth


def uninstall() -> None:
    """Undo :func:`install`: ``requests.Session.request`` is the original object again, and
    the functions it redirected are the program's own again.

    If something else patched ``Session.request`` on top of ours, that patch is kept and ours
    becomes a pass-through. Calling it when nothing is installed does nothing.
    """
    global _state, _patched, _redirecting
    with _lock:
        _state = None
        _redirecting = False
        _after_request.clear()
        redirect = sys.modules.get(_REDIRECT)
        if redirect is not None:  # never imported: nothing was redirected, nothing to undo
            redirect.stop()
        if not _patched or _original is None:
            return
        if requests.Session.request is _request:
            requests.Session.request = _original  # type: ignore[method-assign]
            _patched = False  # _original stays: stale bound wrappers still pass through to it
        else:
            log.warning(
                "requests.Session.request was patched again after mlauth.install(); leaving "
                "that patch in place, with mlauth's part of it switched off"
            )


def installed() -> MLAuth | None:
    """The MLAuth installed by :func:`install`, or None."""
    state = _state
    return None if state is None else state[1]
