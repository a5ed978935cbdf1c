"""Shared by the URL tests: a loopback listener that plays another host, and recorders of
where requests and httpx would really connect (the socket address, taken at the connect call,
after every layer of the client has parsed the URL its own way)."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
import pytest
import requests
import urllib3


class Listener:
    """A TCP listener on ``host`` that keeps every byte any client sends it, and answers
    nothing (each connection is closed once the client stops sending or after a second)."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self._sock = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._received: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(1.0)
                chunks = []
                try:
                    while chunk := conn.recv(65536):
                        chunks.append(chunk)
                except OSError:
                    pass
                with self._lock:
                    self._received.append(b"".join(chunks))

    @property
    def received(self) -> bytes:
        with self._lock:
            return b"".join(self._received)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._received)

    def close(self) -> None:
        self._sock.close()
        self._thread.join(5)


@contextmanager
def listener(host: str = "127.0.0.2") -> Iterator[Listener]:
    server = Listener(host)
    try:
        yield server
    finally:
        server.close()


class Connecting(Exception):
    """Raised where the client would open its socket: nothing leaves the machine."""


@dataclasses.dataclass(frozen=True)
class Destination:
    """Where a client would send a request: scheme, host as given to the socket, port."""

    scheme: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """The host, an IP address in its canonical form (``2001:DB8::1`` is ``2001:db8::1``)."""
        try:
            return str(ipaddress.ip_address(self.host))
        except ValueError:
            return self.host


@dataclasses.dataclass
class Sent:
    """One request a client tried to send: whether it carried a bearer token, and where."""

    authorization: bool
    destination: Destination


def _record(target: list[Sent], authorization: bool, destination: Destination) -> None:
    target.append(Sent(authorization, destination))


class RequestsRecorder:
    """A requests session whose sends stop at the socket: ``send(url, auth)`` returns what
    would have gone out, or None if requests refused the URL before connecting."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._authorization: list[bool] = []
        self._sent: list[Sent] = []
        recorder = self

        def new_conn(conn: urllib3.connection.HTTPConnection) -> socket.socket:
            scheme = "https" if isinstance(conn, urllib3.connection.HTTPSConnection) else "http"
            port = conn.port
            assert port is not None
            host = conn._dns_host  # what urllib3 hands to getaddrinfo
            _record(recorder._sent, recorder._authorization[-1], Destination(scheme, host, port))
            raise Connecting

        class Adapter(requests.adapters.HTTPAdapter):
            def send(self, request: requests.PreparedRequest, **kwargs: Any) -> Any:
                recorder._authorization.append("Authorization" in request.headers)
                return super().send(request, **kwargs)

        monkeypatch.setattr(urllib3.connection.HTTPConnection, "_new_conn", new_conn)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy from the environment: the direct path
        self.session.mount("http://", Adapter())
        self.session.mount("https://", Adapter())

    def send(self, url: str, auth: requests.auth.AuthBase | None) -> Sent | None:
        before = len(self._sent)
        try:
            self.session.get(url, auth=auth)
        except Connecting:
            pass
        except requests.RequestException:
            return None  # requests refused the URL (InvalidURL, InvalidSchema, ...)
        assert len(self._sent) == before + 1, url
        return self._sent[-1]


class HttpxRecorder:
    """The same for httpx: its transport's connection pool connects through a network
    backend that records the address instead."""

    def __init__(self, auth: httpx.Auth) -> None:
        self._sent: list[Sent] = []
        self._authorization = False
        recorder = self

        class Backend(httpcore.SyncBackend):
            def connect_tcp(self, host: str, port: int, **kwargs: Any) -> httpcore.NetworkStream:
                raise Connecting(host, port)

        class Transport(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                recorder._authorization = "authorization" in request.headers
                try:
                    return super().handle_request(request)
                except Connecting as exc:
                    host, port = exc.args
                    name = host.decode("ascii") if isinstance(host, bytes) else host
                    where = Destination(request.url.scheme, name, port)
                    _record(recorder._sent, recorder._authorization, where)
                    raise

        transport = Transport()
        transport._pool._network_backend = Backend()  # type: ignore[union-attr]
        self.client = httpx.Client(transport=transport, auth=auth, trust_env=False)

    def send(self, url: str) -> Sent | None:
        before = len(self._sent)
        try:
            self.client.get(url)
        except Connecting:
            pass
        except (httpx.HTTPError, httpx.InvalidURL):
            return None  # httpx refused the URL
        assert len(self._sent) == before + 1, url
        return self._sent[-1]
