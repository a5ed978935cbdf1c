"""MLAuth: the requests adapter of the refresh engine.

It injects the token the engine says to send, and on a 401 asks the engine what to re-send
with and re-sends the prepared request once (the copy/cookies/send/history steps of requests'
digest auth). Every decision about tokens is the engine's (:mod:`mlauth.engine`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from http.cookiejar import CookieJar
from typing import Any, cast
from urllib.parse import urlsplit

import requests
from requests.cookies import extract_cookies_to_jar
from requests.utils import rewind_body

from .adapter import AuthAdapter, warn_not_resent

__all__ = ["MLAuth"]

log = logging.getLogger("mlauth")


def _replayable(request: requests.PreparedRequest) -> bool:
    """Whether the body can be sent a second time: in memory, or a stream we can rewind."""
    body: object = request.body
    if body is None or isinstance(body, (bytes, str)):
        return True
    # requests records the stream's position before the first send; a generator has none
    # (and would be re-sent empty, silently), a failed tell() left a non-int marker.
    return isinstance(getattr(request, "_body_position", None), int)


class MLAuth(AuthAdapter, requests.auth.AuthBase):
    """A :class:`requests.auth.AuthBase` that keeps a MercadoLibre token chain alive.

    ``session.auth = MLAuth.from_env(".env")`` is all a session needs. See the README for the
    single-flight refresh and for every option (:class:`~mlauth.integrations.adapter.AuthAdapter`).
    """

    @functools.cached_property
    def _on_response(self) -> Callable[..., requests.Response]:
        return self._handle_401  # one bound method, not one per request

    # -- before the request: inject -----------------------------------------------------------

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if not self._hosts.allows(r.url):
            return r  # other hosts get nothing from us, not even a removed header
        token = self._engine.token_for_request()
        # Replaces whatever the caller set: legacy code passes stale headers.
        r.headers["Authorization"] = f"Bearer {token.reveal()}"
        # register_hook() would check the hook against an ABC on every request.
        r.hooks["response"].append(self._on_response)
        return r

    # -- after the response: ask the engine, re-send once --------------------------------------

    def _handle_401(self, r: requests.Response, **kwargs: Any) -> requests.Response:
        if r.status_code != 401:
            return r  # most answers: one comparison here, not a call into the gate
        request = r.request
        # Hooks run on every redirect hop: the gate checks the hop's own URL and header.
        failed = self._failed_token(r.status_code, request.url, request.headers)
        if failed is None:
            return r
        try:
            new = self._engine.after_401(failed)
        except BaseException:
            r.close()  # the caller never sees this response: give its connection back
            raise
        method, host = str(request.method), urlsplit(request.url or "").hostname or ""
        if new is None:
            self._told_401(method, host, "genuine")
            return r
        if not _replayable(request):
            warn_not_resent(method, request.path_url)
            self._told_401(method, host, "not_resendable")
            return r
        # Read and release the first answer so the re-send can reuse its connection.
        r.content  # noqa: B018
        r.close()
        prep = request.copy()  # never mutate r.request: it becomes history[0].request
        if not isinstance(cast(object, prep.body), (bytes, str, type(None))):
            rewind_body(prep)
        jar = cast(CookieJar, prep._cookies)
        extract_cookies_to_jar(jar, request, r.raw)
        prep.headers.pop("Cookie", None)  # prepare_cookies never replaces an existing header
        prep.prepare_cookies(jar)
        prep.headers["Authorization"] = f"Bearer {new.reveal()}"
        # The hooks dict is shared with the copy; the re-sent answer does not go through the
        # hooks again, so one 401 can never loop.
        self._told_401(method, host, None)
        retried: requests.Response = r.connection.send(prep, **kwargs)
        retried.history.append(r)
        retried.request = prep
        return retried
