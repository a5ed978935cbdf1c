"""Shared by the httpx tests: one call through ``httpx.Client`` or ``httpx.AsyncClient``, what
each hop carried, and a scripted API behind ``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import anyio
import httpx

Mode = Literal["sync", "async"]
MODES: tuple[Mode, ...] = ("sync", "async")


@dataclasses.dataclass(frozen=True)
class Hop:
    """What one request put on the wire carried (httpx mutates the request it re-sends, so
    the first attempt's headers are copied when it goes out, not read afterwards)."""

    url: str
    authorization: str | None
    content_length: str | None
    content_type: str | None
    thread: int


def _hop(request: httpx.Request) -> Hop:
    headers = request.headers
    return Hop(
        str(request.url),
        headers.get("Authorization"),
        headers.get("Content-Length"),
        headers.get("Content-Type"),
        threading.get_ident(),
    )


def request(
    mode: Mode,
    auth: httpx.Auth,
    method: str,
    url: str,
    *,
    transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    hops: list[Hop] | None = None,
    follow_redirects: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    """One call with a new client of ``mode``; ``hops`` gets every request sent (re-sends and
    redirect hops included). A MockTransport serves both modes."""
    seen = hops if hops is not None else []
    options: dict[str, Any] = {
        "auth": auth,
        "transport": transport,
        "follow_redirects": follow_redirects,
        "timeout": 20.0,  # a body sent short would otherwise hang the test
    }
    if mode == "sync":
        hook: Callable[[httpx.Request], None] = lambda r: seen.append(_hop(r))  # noqa: E731
        with httpx.Client(event_hooks={"request": [hook]}, **options) as client:
            return client.request(method, url, **kwargs)

    async def async_hook(r: httpx.Request) -> None:
        seen.append(_hop(r))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(event_hooks={"request": [async_hook]}, **options) as client:
            return await client.request(method, url, **kwargs)

    return run(call)


def run(main: Callable[[], Coroutine[Any, Any, httpx.Response]]) -> httpx.Response:
    return asyncio.run(main())


@dataclasses.dataclass(frozen=True)
class Call:
    """One request the scripted API received."""

    url: str
    authorization: str | None
    body: bytes


class ScriptedApi:
    """An API for ``httpx.MockTransport``: answers ``statuses`` in turn (the last repeats)
    and records each call as it arrives."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses) or [200]
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.calls.append(
                Call(str(request.url), request.headers.get("Authorization"), request.content)
            )
            status = self.statuses[min(len(self.calls), len(self.statuses)) - 1]
        return httpx.Response(status, json={"status": status})

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def sent_tokens(self) -> list[str | None]:
        return [call.authorization for call in self.calls]


async def wait_until(condition: Callable[[], bool], what: str, deadline: float = 60.0) -> None:
    """Poll ``condition`` on the loop until it holds; fail after ``deadline`` seconds (generous:
    the machine is shared and noisy)."""
    end = anyio.current_time() + deadline
    while not condition():
        assert anyio.current_time() < end, f"not seen within {deadline:g}s: {what}"
        await anyio.sleep(0.01)
