"""The warning for a request the program itself sends to the token endpoint.

mlauth's own token calls never go through the patched ``requests.Session.request`` (they use
a session of their own), so a request to the token endpoint that does is the program's: a
legacy refresh function that was not redirected (another name, ``--no-redirect``, a script
watch that stepped aside for a debugger, a worker that never called ``install()``). Its refresh
spends the refresh token outside the lock. The warning names the function and the
``--redirect`` that hands it to mlauth, once per function; the request itself goes out
unchanged.
"""

from __future__ import annotations

import logging
import os
import sys
import types

import requests

__all__ = ["token_endpoint_called"]

log = logging.getLogger("mlauth")

_REQUESTS = os.path.join(os.path.dirname(os.path.abspath(requests.__file__)), "")
_MLAUTH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "")
_warned: set[tuple[str, str]] = set()


def _caller() -> types.FrameType | None:
    """The first frame outside requests and mlauth: the code that sent the request."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith((_REQUESTS, _MLAUTH)):
            return frame
        frame = frame.f_back
    return None


def token_endpoint_called(token_url: str) -> None:
    frame = _caller()
    if frame is None:
        return
    module = str(frame.f_globals.get("__name__", "?"))
    function = frame.f_code.co_name
    if (module, function) in _warned:
        return
    _warned.add((module, function))
    where = f"{module}.{function}() ({frame.f_code.co_filename}, line {frame.f_lineno})"
    top_level = getattr(frame.f_globals.get(function), "__code__", None) is frame.f_code
    fix = (
        f"if it refreshes, let mlauth do it: `mlauth run --redirect {module}:{function}`, or "
        f'install(redirect=["{module}:{function}"])'
        if top_level
        else "if it refreshes, call mlauth.MLAuth.refresh() (or redirect that function) instead"
    )
    log.warning(
        "%s sent a request to the token endpoint %s itself: a refresh made that way spends "
        "the refresh token outside mlauth's lock and races every other process "
        "(invalid_grant); %s",
        where,
        token_url,
        fix,
    )
