"""HttpxAuth: the httpx adapter of the refresh engine, for ``httpx.Client`` and ``AsyncClient``.

One object serves both: httpx calls :meth:`HttpxAuth.sync_auth_flow` for a ``Client`` and
:meth:`HttpxAuth.async_auth_flow` for an ``AsyncClient``. Every decision about tokens is the
engine's (:mod:`mlauth.engine`), so the single flight is the one :class:`mlauth.MLAuth` takes
part in: the store's lock, shared by every adapter, thread and process on one chain.

On an event loop nothing that can wait runs on the loop. The per-request check there is the
engine's :meth:`~mlauth.engine.RefreshEngine.fresh_token` (a ``stat`` and a comparison);
anything more (reading a peer's token, waiting for the lock, the token POST, the fsyncs) runs
in a worker thread through anyio, which httpx depends on, so it works under asyncio and trio.
A task cancelled while it waits abandons only its wait: the refresh goes on in its thread to
the save, and releases the lock, and the other tasks get its token.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, TypeVar, cast

import anyio.to_thread
import httpx

from mlauth.errors import MLAuthError
from mlauth.secret import Secret

from .adapter import AuthAdapter, bearer

try:  # private, and only used to tell whether a multipart body can be sent again
    from httpx._multipart import FileField, MultipartStream
except ImportError:  # pragma: no cover - a future httpx: multipart bodies are not re-sent
    FileField = MultipartStream = None  # type: ignore[assignment,misc]

__all__ = ["HttpxAuth"]

log = logging.getLogger("mlauth")

_T = TypeVar("_T")


def _keep() -> None:
    """The rewind of a body held in memory: nothing to do."""


def _rewinder(request: httpx.Request) -> Callable[[], None] | None:
    """How to make the body sendable again, recorded before the first send; None if it
    cannot be (a generator, an async iterator, a pipe): it would go out empty."""
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):  # bytes, str, json=, data= and no body
        return _keep
    if MultipartStream is not None and isinstance(stream, MultipartStream):
        # httpx seeks each file back to 0 itself when it renders the body again.
        files = [f.file for f in stream.fields if isinstance(f, FileField)]
        return _keep if all(_seekable(f) for f in files) else None
    source = getattr(stream, "_stream", None)  # content=<file>: an IteratorByteStream
    if source is None or isinstance(source, Generator) or not _seekable(source):
        return None
    position = source.tell()
    return functools.partial(source.seek, position)


def _seekable(file: object) -> bool:
    if isinstance(file, (bytes, str)):
        return True
    try:
        return bool(file.seekable())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False


_http_error_classes: dict[type[MLAuthError], type[MLAuthError]] = {}


def _http_error_class(cls: type[MLAuthError]) -> type[MLAuthError]:
    """``cls`` that is also an :class:`httpx.HTTPError`, named and shown as ``cls``."""
    made = _http_error_classes.get(cls)
    if made is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        made = type(cls.__name__, (cls, httpx.HTTPError), {**namespace, "__doc__": cls.__doc__})
        _http_error_classes[cls] = made  # one class per error class; a race makes two, no harm
    return made


def _as_http_error(exc: MLAuthError, request: httpx.Request) -> MLAuthError:
    """The same error, also catchable as :class:`httpx.HTTPError`, with ``.request`` set.

    Raised while a request was being sent, it is one of httpx's errors as much as ours: an
    ``except httpx.HTTPError`` around a call catches it, ``except httpx.TransportError``
    (which retry helpers use) does not. Raise it ``from exc.__cause__``: an
    :class:`~mlauth.UnexpectedError` keeps its original there.
    """
    cls = _http_error_class(type(exc))
    converted = cls.__new__(cls, *exc.args)
    converted.__dict__.update(exc.__dict__)
    # httpx.HTTPError.request: the API request that failed, never the token POST.
    cast(Any, converted).request = request
    return converted.with_traceback(exc.__traceback__)


class HttpxAuth(AuthAdapter, httpx.Auth):
    """An :class:`httpx.Auth` that keeps a MercadoLibre token chain alive.

    ``httpx.Client(auth=HttpxAuth.from_env(".env"))``, or the same object in
    ``httpx.AsyncClient(auth=...)``. Options, ``.env`` keys, stores and errors are those of
    :class:`mlauth.MLAuth`; errors raised while a request is sent are also
    :class:`httpx.HTTPError`\\ s.
    """

    # Neither body is read ahead: a streamed upload stays streamed, a streamed download too.
    requires_request_body = False
    requires_response_body = False

    def _allows(self, url: httpx.URL) -> bool:
        # httpx has parsed the URL: check what it will connect to, not a string of it.
        return self._hosts.allows_parts(url.scheme, url.raw_host.decode("ascii"), url.port)

    def _failed_token(self, response: httpx.Response) -> Secret | None:
        """The token a 401 answered, if it is ours to handle; else None.

        ``response.request`` is the last hop's: after a redirect to another host httpx has
        stripped our header, and that host's 401 is none of our business.
        """
        if response.status_code != 401:
            return None  # 403 is about permissions, never about expiry
        sent = response.request
        if not self._allows(sent.url):
            return None
        failed = bearer(sent.headers.get("Authorization"))
        return None if failed is None else Secret(failed)

    def _resend(
        self, request: httpx.Request, rewind: Callable[[], None] | None, new: Secret
    ) -> bool:
        """Set ``request`` up to go again with ``new``; False if its body cannot go again."""
        if rewind is None:
            log.warning(
                "got a 401 on %s %s; the token is refreshed but the body cannot be sent again "
                "(a generator or unrewindable stream), so the 401 is returned",
                request.method,
                request.url.path,
            )
            return False
        rewind()
        request.headers["Authorization"] = f"Bearer {new.reveal()}"
        return True

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        if not self._allows(request.url):
            yield request  # other hosts get nothing from us, not even a removed header
            return
        try:
            token = self._engine.token_for_request()
        except MLAuthError as exc:
            raise _as_http_error(exc, request) from exc.__cause__
        # Replaces whatever the caller set: legacy code passes stale headers.
        request.headers["Authorization"] = f"Bearer {token.reveal()}"
        rewind = _rewinder(request)
        response = yield request
        failed = self._failed_token(response)
        if failed is None:
            return
        try:
            new = self._engine.after_401(failed)
        except MLAuthError as exc:
            raise _as_http_error(exc, request) from exc.__cause__
        if new is not None and self._resend(request, rewind, new):
            # httpx reads and closes the 401, records it in history, and sends this; the
            # flow ends after it, so one 401 can never loop.
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not self._allows(request.url):
            yield request
            return
        try:
            token = self._engine.fresh_token()  # on the loop: a stat and a comparison
            if token is None:
                token = await _off_loop(self._engine.token_for_request)
        except MLAuthError as exc:
            raise _as_http_error(exc, request) from exc.__cause__
        request.headers["Authorization"] = f"Bearer {token.reveal()}"
        rewind = _rewinder(request)
        response = yield request
        failed = self._failed_token(response)
        if failed is None:
            return
        try:
            new = await _off_loop(self._engine.after_401, failed)
        except MLAuthError as exc:
            raise _as_http_error(exc, request) from exc.__cause__
        if new is not None and self._resend(request, rewind, new):
            yield request


async def _off_loop(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)`` in a worker thread, the event loop free meanwhile.

    A cancelled caller stops waiting at once and the thread carries on: a refresh it runs
    ends with its save and lets the lock go, whoever is still waiting for it.
    """
    return await anyio.to_thread.run_sync(_to_the_end, call, *args, abandon_on_cancel=True)


def _to_the_end(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)`` in a thread that the interpreter waits for at exit.

    trio's worker threads are daemons: a program that cancels its tasks and returns from
    ``trio.run`` would have one killed mid-refresh, after the server rotated the chain and
    before its answer was saved, leaving a spent refresh token in the store for good.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call(*args)))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller as it is)
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="mlauth-off-loop", daemon=False)
    thread.start()
    thread.join()
    ok, value = outcome.pop()
    if ok:
        return cast(_T, value)
    raise value
