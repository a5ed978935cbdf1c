"""Shared by the tests that look for secrets where a crash reporter or a log would find them:
everything an error says (its chain, with every frame's locals), every log line, a token
endpoint that echoes the request body back, and ports that refuse or never answer."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import pickle
import re
import select
import socket
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

from mlauth.testing import FakeMercadoLibre

# A client secret whose encodings all differ: form-encoding, percent-encoding (either case of
# hex digit) and JSON escaping each spell it another way. Obviously fake.
ODD_SECRET = "fake+secret/not=real&%41-é"


def spellings(value: str) -> set[str]:
    """``value`` as an echo may carry it: as is, form- or percent-encoded, JSON-escaped."""
    encoded = {quote_plus(value), quote(value, safe=""), quote(value)}
    encoded |= {re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), text) for text in encoded}
    escaped = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return {value, *encoded, *escaped}


def assert_no_secret(text: str, secrets: Iterable[str], where: str) -> None:
    for secret in secrets:
        for spelling in spellings(secret):
            assert spelling not in text, f"{where} holds the secret {secret[:8]}... as {spelling!r}"


def chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it leads to through ``__cause__`` and ``__context__``,
    suppressed or not: whoever holds the error can reach them all."""
    found: list[BaseException] = []
    todo = [error]
    while todo:
        current = todo.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return found


def everything_said(error: BaseException) -> str:
    """What a crash reporter, a ``pytest -l`` or a log formatter could show of ``error``:
    for each exception of its chain, the traceback with every frame's locals, its message,
    ``repr``, attributes and pickle."""
    parts: list[str] = []
    for exc in chain(error):
        summary = traceback.TracebackException(
            type(exc), exc, exc.__traceback__, capture_locals=True
        )
        parts += [*summary.format(), str(exc), repr(exc), repr(getattr(exc, "__dict__", {}))]
        try:
            parts.append(pickle.dumps(exc).decode("latin-1"))
        except Exception as unpicklable:  # noqa: BLE001 (whatever it says, it is looked at)
            parts.append(repr(unpicklable))
    return "\n".join(parts)


def logged(records: Iterable[logging.LogRecord]) -> str:
    """Every line logged, with the locals of any traceback logged with it. The fake server's
    own records are left out: it is the other end, which holds the secret by design."""
    parts: list[str] = []
    for record in records:
        if record.name.startswith("mlauth.testing"):
            continue
        parts += [record.getMessage(), repr(record.args)]
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(everything_said(record.exc_info[1]))
    return "\n".join(parts)


def failure(call: Callable[[], object]) -> BaseException:
    """The exception ``call()`` raises. Caught here, in a frame that holds nothing secret
    (the test's own frame, with the secrets to look for, is not on its traceback)."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 (handed to the caller to look at)
        return exc
    raise AssertionError("the call did not fail")


# -- servers and ports -------------------------------------------------------------------------

Render = Callable[[dict[str, str], bytes], tuple[int, str, bytes]]


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        form = dict(parse_qsl(body.decode("utf-8")))
        status, content_type, answer = self.server.render(form, body)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def echo_server(render: Render) -> Iterator[str]:
    """A token endpoint on loopback whose answer ``render`` makes from the form it got (parsed,
    and the body as it came); yields its token URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.render = render  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/oauth/token"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def json_answer(status: int, payload: object) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload).encode()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port nobody listens on (connection refused); kept bound so no one can."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        yield holder.getsockname()[1]


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so a connect to it times out.

    The kernel drops SYNs to a listener whose queue is full: connections are opened until one
    does not complete within a short wait (a poll with a deadline, not a sleep).
    """
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(64):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            _, writable, _ = select.select([], [filler], [], 0.3)
            if not writable:
                break  # this SYN was dropped: the queue is full
        else:
            raise AssertionError("the accept queue never filled up")
        yield port


# -- the ways a token call fails ---------------------------------------------------------------


def _lower_hex(text: str) -> str:
    return re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def _echo(status: int, make: Callable[[dict[str, str], bytes], dict[str, object]]) -> Render:
    return lambda form, body: json_answer(status, make(form, body))


# The answer of a server (or a proxy in front of it) that quotes the request back, in the
# encodings such answers use. Each is ML's error shape with the echo in one of its fields.
ECHOES: dict[str, Render] = {
    "5xx echoing the body in its error code": _echo(502, lambda f, b: {"error": b.decode()}),
    "4xx echoing the body": _echo(
        400, lambda f, b: {"error": "invalid_request", "error_description": b.decode()}
    ),
    "4xx echoing the values": _echo(
        400,
        lambda f, b: {
            "error": "invalid_request",
            "message": " ".join(f"{k}={v}" for k, v in f.items()),
        },
    ),
    "4xx echoing the form as JSON": _echo(
        400, lambda f, b: {"error": "invalid_request", "error_description": json.dumps(f)}
    ),
    "4xx echoing percent-encoded values": _echo(
        400,
        lambda f, b: {
            "error": "invalid_request",
            "error_description": "&".join(
                f"{k}={_lower_hex(quote(v, safe=''))}" for k, v in f.items()
            ),
        },
    ),
    "4xx echoing the body as text": lambda f, b: (400, "text/plain", b"bad request: " + b),
    "invalid_grant quoting the grant": _echo(
        400,
        lambda f, b: {
            "error": "invalid_grant",
            "error_description": f"{f.get('refresh_token') or f.get('code')} was already used",
        },
    ),
}

# A 200 whose body is cut short: not JSON, though it holds the new tokens (which are secrets).
NEW_ACCESS = "APP_USR-1234567890123456-010101-fakenewaccess000000000000000-8035443"
NEW_REFRESH = "TG-fakenewrefresh00000000000-8035443"
BROKEN_200 = f'{{"access_token": "{NEW_ACCESS}", "refresh_token": "{NEW_REFRESH}", "expires_in": 2'

# Every way a refresh (or a code exchange) can fail, and whether the error's message quotes
# the server's echo (then it must show the fingerprint where the secret was).
FAILURES = [
    "refused",
    "connect timeout",
    "read timeout",
    "5xx",
    *ECHOES,
    "invalid_grant",
    "200 with a broken body",
]
QUOTED = {name for name in ECHOES if "as text" not in name}


def arrange(name: str, fake: FakeMercadoLibre, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Make the next token calls fail as ``name`` (one of FAILURES) says: the options (token
    URL, timeouts) that an auth or a ``.env`` needs for it."""
    timeout = (2.0, 2.0)  # generous on a loaded machine; the timeout cases set their own
    url = fake.token_url
    if name == "refused":
        url = f"http://127.0.0.1:{stack.enter_context(refusing_port())}/oauth/token"
    elif name == "connect timeout":
        url = f"http://127.0.0.1:{stack.enter_context(unanswered_port())}/oauth/token"
        timeout = (0.5, 2.0)
    elif name == "read timeout":
        fake.token_delay = 3.0  # the grant is never processed: the client is gone by then
        timeout = (2.0, 0.5)
    elif name == "5xx":
        fake.fail_next_token_requests(10, status=503)
    elif name in ECHOES:
        url = stack.enter_context(echo_server(ECHOES[name]))
    elif name == "invalid_grant":
        fake.revoke_refresh_tokens()
    elif name == "200 with a broken body":
        fake.fail_next_token_requests(10, status=200, body=BROKEN_200)
    else:
        raise AssertionError(f"unknown failure {name!r}")
    return {"token_url": url, "timeout": timeout}
