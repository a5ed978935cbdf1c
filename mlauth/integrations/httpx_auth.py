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
import weakref
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, NoReturn, TypeVar, cast

import anyio
import anyio.to_thread
import httpx
from anyio.lowlevel import RunVar

from mlauth.engine import RefreshEngine
from mlauth.errors import MLAuthError, as_client_error, rebuilt
from mlauth.secret import Secret

from .adapter import AuthAdapter, warn_not_resent

try:  # private, and only used to tell whether a multipart body can be sent again
    from httpx._multipart import FileField, MultipartStream
except ImportError:  # pragma: no cover - a future httpx: multipart bodies are not re-sent
    FileField = MultipartStream = None  # type: ignore[assignment,misc]


def _parsed() -> bool:
    """Whether an httpx.URL keeps its parse where :meth:`HttpxAuth._allows` reads it in one
    go (private, so checked: url.scheme, .raw_host and .port each read it, and raw_host
    encodes a str only to be decoded back), with the same values as the public properties."""
    url = httpx.URL("https://[::1]:8443/x")
    parts = getattr(url, "_uri_reference", None)
    try:
        return (parts.scheme, parts.host, parts.port) == (  # type: ignore[union-attr]
            url.scheme,
            url.raw_host.decode("ascii"),
            url.port,
        )
    except AttributeError:  # pragma: no cover - a future httpx
        return False


_PARSED = _parsed()

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
    # content=<file>: an IteratorByteStream. Only a sync one: an async file's (anyio's,
    # aiofiles') tell() and seek() are coroutines, so calling them rewinds nothing and the
    # body would go out again empty.
    if not isinstance(stream, httpx.SyncByteStream):
        return None
    source = getattr(stream, "_stream", None)
    if source is None or isinstance(source, Generator) or not _seekable(source):
        return None
    try:
        position = source.tell()
    except (OSError, ValueError):  # a closed file, or one that only pretends to seek
        return None
    return functools.partial(source.seek, position)


def _seekable(file: object) -> bool:
    if isinstance(file, (bytes, str)):
        return True
    try:
        return bool(file.seekable())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False


def _as_http_error(exc: MLAuthError, request: httpx.Request) -> MLAuthError:
    """The same error, also catchable as :class:`httpx.HTTPError`, with ``.request`` set.

    An ``except httpx.HTTPError`` around a call catches it, ``except httpx.TransportError``
    (which retry helpers use) does not (:func:`mlauth.errors.as_client_error`).
    """
    return as_client_error(exc, httpx.HTTPError, request=request)


class _Hops:
    """One auth's trips to a worker thread on one event loop: one at a time.

    Without it, every task that finds no FRESH token would take a thread of anyio's pool
    (shared with the rest of the app) to wait in the engine for the same refresh, and a task
    cancelled and retried would leave a thread behind each time. With it, one task per loop
    waits in a thread; the tasks queued behind it take what the trip ended with, a token or
    an error, instead of each waiting as long again.
    """

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.done = 0  # trips ended (a cancelled one does not count: it has not ended)
        # What the last one ended with: the token to send, None (a genuine 401: nothing new),
        # or the error it raised.
        self.outcome: Secret | MLAuthError | None = None

    def settled(self, before: int) -> Secret | None:
        """What a trip that ended while this task waited (``done`` moved past ``before``)
        brought back: a token (whether it answers this task is the engine's to say), or its
        error raised again. None: look for yourself."""
        if self.done == before:
            return None
        outcome = self.outcome
        if isinstance(outcome, MLAuthError):
            # A copy per task: one exception raised in several tasks would mix tracebacks.
            raise rebuilt(type(outcome), outcome.args, vars(outcome)) from outcome.__cause__
        return outcome

    async def trip(self, call: Callable[..., Secret | None], *args: Any) -> Secret | None:
        """``call(*args)`` in a worker thread; its outcome is kept for the tasks queued."""
        try:
            outcome = await _off_loop(call, *args)
        except MLAuthError as exc:
            self.outcome, self.done = exc, self.done + 1
            raise
        self.outcome, self.done = outcome, self.done + 1
        return outcome


# Per event loop (asyncio or trio): each auth's _Hops, kept as long as the auth is.
_HOPS: RunVar[weakref.WeakKeyDictionary[RefreshEngine, _Hops]] = RunVar("mlauth_hops")


def _hops(engine: RefreshEngine) -> _Hops:
    try:
        table = _HOPS.get()
    except LookupError:
        table = weakref.WeakKeyDictionary()
        _HOPS.set(table)
    hops = table.get(engine)
    if hops is None:
        hops = table[engine] = _Hops()
    return hops


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
        # httpx has parsed the URL: check what it will connect to, not a string of it. Read
        # from its parse directly where it can be (see _parsed): this runs on every request.
        if _PARSED:
            parts = url._uri_reference
            return self._hosts.allows_parts(parts.scheme, parts.host, parts.port)
        return self._hosts.allows_parts(url.scheme, url.raw_host.decode("ascii"), url.port)

    def _fail(self, exc: Exception, request: httpx.Request) -> NoReturn:
        """Raise ``exc`` as an mlauth error that is also an :class:`httpx.HTTPError`.

        Only MLAuthErrors leave a request, as with requests: the engine's own, and this
        adapter's steps around it (a file's ``tell()``, a thread that cannot start) made one.
        """
        if isinstance(exc, MLAuthError):
            raise _as_http_error(exc, request) from exc.__cause__
        error = self._engine.unexpected(exc, "sending a request through httpx")
        raise _as_http_error(error, request) from exc

    def _resend(
        self, request: httpx.Request, rewind: Callable[[], None] | None, new: Secret | None
    ) -> bool:
        """Set ``request`` up to go again with ``new``; False to return the 401 instead."""
        method, host = request.method, request.url.host
        if new is None:
            self._told_401(method, host, "genuine")
            return False  # a genuine 401: the engine spent nothing, and nothing is re-sent
        if rewind is not None:
            try:
                rewind()
            except (OSError, ValueError):  # the file was closed or cut meanwhile
                rewind = None
        if rewind is None:
            warn_not_resent(method, request.url.path)
            self._told_401(method, host, "not_resendable")
            return False
        request.headers["Authorization"] = f"Bearer {new.reveal()}"
        self._told_401(method, host, None)
        return True

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        if not self._allows(request.url):
            yield request  # other hosts get nothing from us, not even a removed header
            return
        try:
            token = self._engine.token_for_request()
            # Most bodies are bytes held in memory (no body included): no call for them.
            rewind = _keep if type(request.stream) is httpx.ByteStream else _rewinder(request)
        except Exception as exc:  # noqa: BLE001 (_fail raises it as an MLAuthError)
            self._fail(exc, request)
        # Replaces whatever the caller set: legacy code passes stale headers.
        request.headers["Authorization"] = f"Bearer {token.reveal()}"
        response = yield request
        if response.status_code != 401:
            return  # most answers: one comparison here, not a call into the gate
        # response.request is the last hop's: after a redirect to another host httpx has
        # stripped our header.
        sent = response.request
        failed = self._failed_token(response.status_code, sent.url, sent.headers)
        if failed is None:
            return
        try:
            again = self._resend(request, rewind, self._engine.after_401(failed))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, request)
        if again:
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
            token = self._engine.fresh_token()  # on the loop: a memory read, a comparison
            if token is None:
                token = await self._token_off_loop()
            rewind = _keep if type(request.stream) is httpx.ByteStream else _rewinder(request)
        except Exception as exc:  # noqa: BLE001 (cancellation is a BaseException: not here)
            self._fail(exc, request)
        request.headers["Authorization"] = f"Bearer {token.reveal()}"
        response = yield request
        if response.status_code != 401:
            return  # most answers: one comparison here, not a call into the gate
        # response.request is the last hop's: after a redirect to another host httpx has
        # stripped our header.
        sent = response.request
        failed = self._failed_token(response.status_code, sent.url, sent.headers)
        if failed is None:
            return
        try:
            again = self._resend(request, rewind, await self._after_401_off_loop(failed))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, request)
        if again:
            yield request

    async def _token_off_loop(self) -> Secret:
        """:meth:`RefreshEngine.token_for_request` in a worker thread, one task per loop at a
        time; a task that waited for another's trip takes what it ended with."""
        hops = _hops(self._engine)
        before = hops.done
        async with hops.lock:
            token = hops.settled(before) or self._engine.fresh_token()
            if token is None:
                token = await hops.trip(self._engine.token_for_request)
            assert token is not None  # token_for_request always returns one
            return token

    async def _after_401_off_loop(self, failed: Secret) -> Secret | None:
        """:meth:`RefreshEngine.after_401` in a worker thread, one task per loop at a time."""
        hops = _hops(self._engine)
        before = hops.done
        async with hops.lock:
            # What after_401 answers first, without a trip: another task's trip, or a peer,
            # may have moved on already.
            token = self._engine.resend_at_hand(failed, hops.settled(before))
            if token is not None:
                return token
            return await hops.trip(self._engine.after_401, failed)


async def _off_loop(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)`` in a worker thread, the event loop free meanwhile.

    A cancelled caller stops waiting at once and the thread carries on: a refresh it runs
    ends with its save and lets the lock go, whoever is still waiting for it.
    """
    return await anyio.to_thread.run_sync(_until_done, call, *args, abandon_on_cancel=True)


def _until_done(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)``, in a thread that a normal exit of the process waits for.

    anyio's asyncio workers are such threads; trio's are daemon threads, which the
    interpreter stops at exit wherever they are: an abandoned refresh would be cut between
    spending the refresh token and saving its successor, and the chain lost. There, the call
    runs in a thread of its own, which the daemon worker waits for.
    """
    if not threading.current_thread().daemon:
        return call(*args)
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the waiting worker
            outcome.append((False, exc))

    # daemon=False said outright: a new thread would inherit the daemon flag of this one.
    thread = threading.Thread(target=run, name="mlauth refresh", daemon=False)
    thread.start()
    thread.join()
    done, value = outcome[0]
    if done:
        return cast(_T, value)
    raise value
