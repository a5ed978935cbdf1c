"""A fake MercadoLibre on loopback: the OAuth token endpoint and an echoing API.

:class:`FakeMercadoLibre` is a real HTTP server (real sockets, keep-alive, threads), so code
under test talks to it exactly as it would talk to ``api.mercadolibre.com``. It follows the
rules in ML's documentation that matter for token handling: refresh tokens are single use and
rotate on every refresh, the old access token dies at rotation, 401 bodies vary in shape, 403
means permissions, and a token in the query string is refused. Faults (5xx answers, lost
answers, dropped connections, slow endpoints) can be injected to test the paths that a real
server only takes on a bad day.

Only the standard library is used, so the module can be imported by users' own tests without
pulling in anything; pytest fixtures live in :mod:`mlauth.pytest_plugin`.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import http
import http.server
import itertools
import json
import logging
import os
import re
import secrets
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

from .memory import MemoryStore

__all__ = ["FakeMercadoLibre", "MemoryStore"]

log = logging.getLogger("mlauth.testing")

_STAT_NAMES = (
    "api_calls",
    "api_ok",
    "api_401",
    "api_403",
    "token_requests",
    "refreshes",
    "code_exchanges",
    "invalid_grant",
    "invalid_client",
    "faults",
    "abandoned",
)

# Answers copied from ML's documentation and from what clients have logged (ML-FACTS.md).
_INVALID_GRANT: dict[str, object] = json.loads(
    '{"error_description":"Error validating grant. Your authorization code or refresh token '
    'may be expired or it was already used","error":"invalid_grant","status":400,"cause":[]}'
)
_INVALID_CLIENT: dict[str, object] = json.loads(
    '{"message":"invalid client_id or client_secret","error":"invalid_client","status":401,'
    '"cause":[]}'
)
_FORBIDDEN: dict[str, object] = json.loads(
    '{"message":"At least one policy returned UNAUTHORIZED.","status":403,'
    '"code":"PA_UNAUTHORIZED_RESULT_FROM_POLICIES","blocked_by":"PolicyAgent"}'
)
# Every 401 shape ML has been seen to send. The fake rotates through them so that a client
# which decides on the body text instead of the status code fails its tests (the legacy code
# this library replaces missed the first one).
_UNAUTHORIZED_SHAPES: list[dict[str, object]] = [
    json.loads(shape)
    for shape in (
        '{"code":"unauthorized","message":"invalid access token"}',
        '{"message":"invalid_token","cause":[],"error":"not_found","status":401}',
        '{"message":"expired_token","cause":[],"error":"not_found","status":401}',
        '{"message":"invalid access token","error":"not_found","status":401}',
    )
]

# ML's list of the users who authorized an app; the id is matched as a string, so a wrong one
# answers 404 like an unknown application rather than falling through to the echo.
_GRANTS_PATH = re.compile(r"/applications/([^/]+)/grants/?")


@dataclasses.dataclass(frozen=True)
class _Fault:
    """One injected token-endpoint failure, as queued by ``fail_next_token_requests``."""

    status: int
    error: str
    retry_after: float | None
    body: str | None
    consume: bool


@dataclasses.dataclass(frozen=True)
class _PendingCode:
    redirect_uri: str
    code_challenge: str | None
    user_id: int


@dataclasses.dataclass(eq=False)
class _Chain:
    """One seller's token chain: whose it is, and the access tokens it has issued."""

    user_id: int
    access: list[str] = dataclasses.field(default_factory=list)


def _check_user_id(user_id: object) -> int:
    # ML user ids are positive integers and end every token; anything else would mint tokens
    # no real server sends, and a test would pass on a shape that cannot happen.
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
        raise ValueError(f"user_id must be a positive int, got {user_id!r}")
    return user_id


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison, as a real server would do for secrets."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _error(status: int, error: str, message: str) -> tuple[int, dict[str, object]]:
    return status, {"message": message, "error": error, "status": status, "cause": []}


class FakeMercadoLibre:
    """MercadoLibre's OAuth token endpoint and API, served on loopback from a daemon thread.

    ``GET /authorization`` plays the authorization page of a seller who says yes: it
    redirects to the ``redirect_uri`` with a ``code`` (and the ``state``), so ``mlauth login``
    can be tried against it.

    Use as a context manager, or :meth:`start` / :meth:`stop`. ``token_lifetime``,
    ``kill_old_access_on_refresh``, ``token_delay``, ``token_delay_for``,
    ``token_answer_delay`` and ``api_delay`` are read on every request, so a test may change
    them while the server runs. Every token
    chain (one per :meth:`issue_tokens` or code exchange) is independent of the others.

    One fake is one app, and it serves any number of sellers (users): ``issue_tokens(
    user_id=…)`` starts a chain for that user, whose tokens end with the id and whose token
    answers carry it, as ML's do; the API answers each token's own user; ``GET
    /applications/{client_id}/grants`` lists every user who authorized the app. Without
    ``user_id`` everything is for ``user_id`` given here, as with a single seller. Every
    lookup on the token and API paths is a dict lookup, so thousands of users cost nothing
    per request.

    Example::

        with FakeMercadoLibre(token_lifetime=2) as fake:
            fake.write_env(tmp_path / ".env")
            fake.fail_next_token_requests(1, status=503, retry_after=1)
            ...  # run the code under test against fake.base_url, then check fake.stats()
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: float = 21600.0,
        kill_old_access_on_refresh: bool = True,
        client_id: str = "1234567890123456",
        client_secret: str = "fake-client-secret-not-real",  # noqa: S107 - fake by design
        user_id: int = 8035443,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.user_id = user_id
        self.token_lifetime = token_lifetime
        self.kill_old_access_on_refresh = kill_old_access_on_refresh
        self.token_delay = 0.0
        # Per seller: a token POST on that user's chain (a refresh or a code exchange) waits
        # this much longer, in its own handler thread and holding no lock, so one seller's
        # hanging POST leaves every other seller's answered at once. See
        # :meth:`release_token_delays` and :meth:`token_requests_in_flight_for`.
        self.token_delay_for: dict[int, float] = {}
        # Delay after a grant is processed and before its answer is sent: a client killed
        # meanwhile loses an answer whose refresh token the server has already rotated.
        self.token_answer_delay = 0.0
        # Some proxies and old clients send expires_in as a string ("21600"); so can the fake.
        self.expires_in_as_string = False
        self.api_delay = 0.0
        self.token_requests_in_flight = threading.Event()
        self._address = (host, port)
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(_STAT_NAMES, 0)
        self._refresh_times: list[float] = []
        # Live refresh token -> its chain (user and access tokens); a used or revoked refresh
        # token is simply absent, which is what makes it single use.
        self._refresh_chains: dict[str, _Chain] = {}
        # Access token -> (time.monotonic() deadline, its user).
        self._access_tokens: dict[str, tuple[float, int]] = {}
        # Per user: the live refresh tokens (so one user is revoked without a scan), when the
        # user first authorized the app (the grants list), and refreshes counted per user.
        self._live_by_user: dict[int, set[str]] = {}
        self._grants: dict[int, float] = {}
        self._refreshes_by_user: collections.Counter[int] = collections.Counter()
        self._refresh_times_by_user: dict[int, list[float]] = {}
        self._codes: dict[str, _PendingCode] = {}
        self._faults: collections.deque[_Fault] = collections.deque()
        self._manglers: collections.deque[tuple[int, Callable[[dict[str, object]], object]]] = (
            collections.deque()
        )
        self._resets = 0
        self._in_flight = 0
        self._in_flight_by_user: collections.Counter[int] = collections.Counter()
        # Delayed token POSTs sleep on this condition, so release_token_delays() and stop()
        # can cut them short; the epoch tells a sleeper it was released.
        self._delays = threading.Condition(threading.Lock())
        self._delay_epoch = 0
        self._unauthorized_shapes = itertools.cycle(_UNAUTHORIZED_SHAPES)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeMercadoLibre:
        """Bind the socket and serve from a daemon thread. Returns ``self``."""
        if self._stopped:
            raise RuntimeError("a stopped FakeMercadoLibre cannot be restarted; make a new one")
        if self._server is None:
            self._server = _Server(self._address, self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"FakeMercadoLibre:{self.host}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and every open connection. Idempotent."""
        server, thread = self._server, self._thread
        if server is None or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        self.release_token_delays()  # a sleeping handler would hold its connection open
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join()

    def __enter__(self) -> FakeMercadoLibre:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``host:port`` of the bound socket, the form ``ML_API_HOSTS`` takes."""
        if self._server is None:
            raise RuntimeError("FakeMercadoLibre is not started")
        address, port = self._server.server_address[:2]
        return f"{address!s}:{port}"

    @property
    def base_url(self) -> str:
        """The API root, e.g. ``http://127.0.0.1:45123``."""
        return f"http://{self.host}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/oauth/token"

    # -- tokens ----------------------------------------------------------------------------

    def issue_tokens(
        self, *, lifetime: float | None = None, user_id: int | None = None
    ) -> dict[str, object]:
        """Mint a new token chain, as a fresh authorization would; not counted as a refresh.

        The chain is ``user_id``'s (default: the fake's ``user_id``), who is then listed among
        the app's grants.
        """
        user = self.user_id if user_id is None else _check_user_id(user_id)
        with self._lock:
            return self._mint(_Chain(user), lifetime)

    def issue_authorization_code(
        self, redirect_uri: str, code_challenge: str | None = None, *, user_id: int | None = None
    ) -> str:
        """A single-use code, as ML's authorization page would put on the redirect.

        With ``code_challenge`` (S256) the exchange must carry the matching ``code_verifier``.
        The exchange starts a chain for ``user_id`` (default: the fake's ``user_id``).
        """
        user = self.user_id if user_id is None else _check_user_id(user_id)
        code = f"TG-{secrets.token_hex(12)}-{user}"
        with self._lock:
            self._codes[code] = _PendingCode(redirect_uri, code_challenge, user)
        return code

    def revoke_refresh_tokens(self, user_id: int | None = None) -> None:
        """Invalidate refresh tokens, as a password change does: every user's, or one user's.

        Access tokens live on until they expire, and the user stays among the app's grants
        (see :meth:`revoke_grant` for a seller who removes the app).
        """
        with self._lock:
            if user_id is None:
                self._refresh_chains.clear()
                self._live_by_user.clear()
                return
            for refresh in self._live_by_user.pop(user_id, set()):
                del self._refresh_chains[refresh]

    def revoke_grant(self, user_id: int) -> None:
        """The seller removes the app: their refresh and access tokens die, and the grant goes.

        Scans the access tokens once; it is not on any request's path.
        """
        with self._lock:
            for refresh in self._live_by_user.pop(user_id, set()):
                del self._refresh_chains[refresh]
            dead = [token for token, (_, user) in self._access_tokens.items() if user == user_id]
            for token in dead:
                del self._access_tokens[token]
            self._grants.pop(user_id, None)

    def grants(self) -> list[int]:
        """The users who authorized the app (and have not revoked it), oldest grant first."""
        with self._lock:
            return list(self._grants)

    def write_env(
        self,
        path: str | os.PathLike[str],
        *,
        expires_at: float | None = None,
        extra: Mapping[str, str] | None = None,
        include_access: bool = True,
        user_id: int | None = None,
    ) -> dict[str, object]:
        """Issue tokens and write a complete ``.env`` for them (mode 0600). Returns the tokens.

        The chain is ``user_id``'s (default: the fake's ``user_id``), as in :meth:`issue_tokens`.

        ``expires_at`` is only written to the file; the server keeps its own clock, so a test
        can make the file claim an expiry the server does not share.
        """
        tokens = self.issue_tokens(user_id=user_id)
        lines = [f"ML_CLIENT_ID={self.client_id}", f"ML_CLIENT_SECRET={self.client_secret}"]
        if include_access:
            lines.append(f"ML_ACCESS_TOKEN={tokens['access_token']}")
        lines += [
            f"ML_REFRESH_TOKEN={tokens['refresh_token']}",
            f"ML_TOKEN_URL={self.token_url}",
            f"ML_API_HOSTS={self.host}",
        ]
        if expires_at is not None:
            lines.append(f"ML_TOKEN_EXPIRES_AT={float(expires_at)!r}")
        lines += [f"{key}={value}" for key, value in (extra or {}).items()]
        # Created 0600 from the start (not chmod-ed after) so the secret is never readable by
        # others, and chmod-ed anyway in case the file already existed with wider rights.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write("\n".join(lines) + "\n")
        return tokens

    # -- observation -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (a copy: it does not change under the caller)."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = dict.fromkeys(_STAT_NAMES, 0)
            self._refresh_times.clear()
            self._refreshes_by_user.clear()
            self._refresh_times_by_user.clear()

    def refreshes_by_user(self) -> dict[int, int]:
        """Successful refreshes per user since the start or :meth:`reset_stats` (a copy).

        Users with no refresh are absent; the values add up to ``stats()["refreshes"]``.
        """
        with self._lock:
            return dict(self._refreshes_by_user)

    def refresh_times_by_user(self) -> dict[int, list[float]]:
        """``time.time()`` of each successful refresh per user, in order (a copy); users with
        no refresh are absent. What a benchmark compares with the calls each seller got."""
        with self._lock:
            return {user: list(times) for user, times in self._refresh_times_by_user.items()}

    def is_live(self, refresh_token: str | None) -> bool:
        """Whether ``refresh_token`` is the live end of a chain (the next refresh would work)."""
        with self._lock:
            return refresh_token is not None and refresh_token in self._refresh_chains

    def refresh_times(self) -> list[float]:
        """``time.time()`` of each successful refresh, in order."""
        with self._lock:
            return list(self._refresh_times)

    # -- fault injection -------------------------------------------------------------------

    def fail_next_token_requests(
        self,
        count: int,
        *,
        status: int = 503,
        error: str = "server_error",
        retry_after: float | None = None,
        body: str | None = None,
        consume: bool = False,
    ) -> None:
        """Make the next ``count`` token POSTs answer ``status`` with an error.

        The body is ML's JSON error shape, or ``body`` verbatim (e.g. a proxy's HTML page).
        With ``consume=True`` the grant is processed first and only the answer is lost: the
        refresh token sent is spent, which is the case that makes retrying a 5xx dangerous.
        """
        fault = _Fault(status, error, retry_after, body, consume)
        with self._lock:
            self._faults.extend([fault] * count)

    def mangle_next_token_answers(
        self, count: int, mangle: Callable[[dict[str, object]], object], *, status: int = 200
    ) -> None:
        """Make the next ``count`` successful token answers go out as ``mangle(answer)``.

        The grant is processed first (a refresh token sent is spent and its successor is
        live), then ``mangle`` gets the answer ML would send (a dict it may change) and
        returns the body to send with ``status``: ``bytes`` as they are, anything else as
        JSON. So a test can send the new tokens in an odd answer (``expires_in`` "abc", a
        numeric ``refresh_token``, a body that is not JSON) and see whether the chain lives.
        """
        with self._lock:
            self._manglers.extend([(status, mangle)] * count)

    def _take_mangler(self) -> tuple[int, Callable[[dict[str, object]], object]] | None:
        with self._lock:
            if not self._manglers:
                return None
            self._stats["faults"] += 1
            return self._manglers.popleft()

    def release_token_delays(self) -> None:
        """Let every token POST sleeping out a delay go on now (delays set later still apply)."""
        with self._delays:
            self._delay_epoch += 1
            self._delays.notify_all()

    def token_requests_in_flight_for(self, user_id: int) -> int:
        """How many token POSTs on ``user_id``'s chain are being handled right now (received,
        not yet answered): a test waits for a seller's POST to hang before it acts."""
        with self._lock:
            return self._in_flight_by_user[user_id]

    def reset_next_token_requests(self, count: int) -> None:
        """Make the next ``count`` token POSTs close the connection without any answer."""
        with self._lock:
            self._resets += count

    # -- request handling (called from handler threads) ------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _token_started(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._stats["token_requests"] += 1
            self.token_requests_in_flight.set()

    def _token_finished(self) -> None:
        # A counter, not the Event alone: with two token POSTs in progress the first to finish
        # must not clear the Event under the second.
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.token_requests_in_flight.clear()

    def _grant_user(self, form: Mapping[str, str]) -> int | None:
        """Whose chain a token POST is for (its refresh token's or code's user), if known."""
        with self._lock:
            if form.get("grant_type") == "refresh_token":
                chain = self._refresh_chains.get(form.get("refresh_token") or "")
                return None if chain is None else chain.user_id
            pending = self._codes.get(form.get("code") or "")
            return None if pending is None else pending.user_id

    def _seller_delay(self, user: int | None) -> float:
        """Sleep out ``user``'s own token delay (holding no lock); the seconds asked for."""
        delay = 0.0 if user is None else self.token_delay_for.get(user, 0.0)
        if delay <= 0:
            return 0.0
        with self._lock:
            self._in_flight_by_user[user] += 1  # type: ignore[index]
        try:
            with self._delays:
                epoch = self._delay_epoch
                # wait_for releases the condition while it sleeps: other sellers' POSTs
                # (and this seller's other ones) are handled meanwhile.
                self._delays.wait_for(lambda: self._delay_epoch != epoch, timeout=delay)
        finally:
            with self._lock:
                self._in_flight_by_user[user] -= 1  # type: ignore[index]
        return delay

    def _take_fault(self) -> _Fault | Literal["reset"] | None:
        """The injected fault for this token POST, if any, oldest first; resets go first."""
        with self._lock:
            if self._resets:
                self._resets -= 1
                self._stats["faults"] += 1
                return "reset"
            if self._faults:
                self._stats["faults"] += 1
                return self._faults.popleft()
            return None

    def _mint(self, chain: _Chain, lifetime: float | None = None) -> dict[str, object]:
        """Issue an access + refresh pair on ``chain``. The caller holds the lock."""
        lifetime = float(self.token_lifetime if lifetime is None else lifetime)
        user = chain.user_id
        stamp = time.strftime("%m%d%H", time.gmtime())
        access = f"APP_USR-{self.client_id}-{stamp}-{secrets.token_hex(16)}-{user}"
        refresh = f"TG-{secrets.token_hex(12)}-{user}"
        # Monotonic, so a test (or NTP) moving the wall clock cannot revive or kill a token.
        self._access_tokens[access] = (time.monotonic() + lifetime, user)
        chain.access.append(access)
        self._refresh_chains[refresh] = chain
        self._live_by_user.setdefault(user, set()).add(refresh)
        self._grants.setdefault(user, time.time())
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": self._expires_in(lifetime),
            "scope": "offline_access read write",
            "user_id": user,
            "refresh_token": refresh,
        }

    def _expires_in(self, lifetime: float) -> object:
        number = int(lifetime) if lifetime.is_integer() else lifetime
        return str(number) if self.expires_in_as_string else number

    def _grant(self, form: Mapping[str, str]) -> tuple[int, dict[str, object]]:
        """Apply one token POST to the state and return the answer ML would give."""
        with self._lock:
            grant_type = form.get("grant_type")
            if not grant_type:
                return _error(400, "invalid_request", "grant_type is required")
            if not (
                _same(form.get("client_id"), self.client_id)
                and _same(form.get("client_secret"), self.client_secret)
            ):
                self._stats["invalid_client"] += 1
                return 401, _INVALID_CLIENT
            if grant_type == "refresh_token":
                token = form.get("refresh_token")
                if not token:
                    return _error(400, "invalid_request", "refresh_token is required")
                chain = self._refresh_chains.pop(token, None)
                if chain is None:
                    self._stats["invalid_grant"] += 1
                    return 400, _INVALID_GRANT
                self._live_by_user[chain.user_id].discard(token)
                if self.kill_old_access_on_refresh:
                    for access in chain.access:
                        self._access_tokens.pop(access, None)
                    chain.access.clear()
                self._stats["refreshes"] += 1
                self._refreshes_by_user[chain.user_id] += 1
                now = time.time()
                self._refresh_times.append(now)
                self._refresh_times_by_user.setdefault(chain.user_id, []).append(now)
                return 200, self._mint(chain)
            if grant_type == "authorization_code":
                code, redirect_uri = form.get("code"), form.get("redirect_uri")
                if not code or not redirect_uri:
                    return _error(400, "invalid_request", "code and redirect_uri are required")
                pending = self._codes.get(code)
                verifier = form.get("code_verifier")
                if (
                    pending is None
                    or pending.redirect_uri != redirect_uri
                    or (
                        pending.code_challenge is not None
                        and not (verifier and _same(_s256(verifier), pending.code_challenge))
                    )
                ):
                    self._stats["invalid_grant"] += 1
                    return 400, _INVALID_GRANT
                # Spent only on success, so a test can retry an exchange it got wrong.
                del self._codes[code]
                self._stats["code_exchanges"] += 1
                return 200, self._mint(_Chain(pending.user_id))
            return _error(400, "unsupported_grant_type", f"unsupported grant_type {grant_type}")

    def _authorize(self, authorization: str | None, query: str) -> int | dict[str, object]:
        """The user of the live token the request carries, else the 401 body to answer."""
        token = None
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
        # ML refuses a token in the query string since 2021, even next to a good header.
        in_query = "access_token" in urllib.parse.parse_qs(query, keep_blank_values=True)
        with self._lock:
            found = self._access_tokens.get(token) if token else None
            if not in_query and found is not None and found[0] > time.monotonic():
                return found[1]
            self._stats["api_401"] += 1
            return next(self._unauthorized_shapes)

    def _grants_page(self, app_id: str, query: str) -> tuple[int, dict[str, object]]:
        """``GET /applications/{app_id}/grants``: who authorized the app, a page at a time.

        The shape follows ML's documentation: ``paging`` (``total``, ``limit``, ``offset``) and
        one entry per user in the shape ML documents for ``/users/{id}/applications``
        (``user_id``, ``app_id``, ``date_created``, ``scopes``).
        """
        if app_id != self.client_id:
            return _error(404, "not_found", f"application {app_id} not found")
        params = urllib.parse.parse_qs(query)
        try:
            offset = int(params.get("offset", ["0"])[0])
            limit = int(params.get("limit", ["50"])[0])
        except ValueError:
            return _error(400, "bad_request", "offset and limit must be integers")
        if offset < 0 or not 0 < limit <= 1000:
            return _error(400, "bad_request", "offset must be >= 0 and limit in 1..1000")
        app = int(self.client_id) if self.client_id.isdigit() else self.client_id
        with self._lock:
            granted = list(self._grants.items())
        page = [
            {
                "user_id": user,
                "app_id": app,
                "date_created": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(when)),
                "scopes": ["offline_access", "read", "write"],
            }
            for user, when in granted[offset : offset + limit]
        ]
        paging = {"total": len(granted), "limit": limit, "offset": offset}
        return 200, {"paging": paging, "grants": page}


class _Server(http.server.ThreadingHTTPServer):
    """The listening socket, with a backlog for dozens of client processes."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], fake: FakeMercadoLibre) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup: slow, and a
        # query off the machine. The name is only used for CGI, so skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self.fake._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Shut keep-alive connections down, so a stopped fake really stops answering."""
        with self.fake._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its handler thread
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-request (a test's subprocess, a timeout) is routine here; the
        # default prints a traceback per connection, which buries the real test output.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        log.debug("error serving %s", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API
    # http.server sends headers and body in two writes; with Nagle on, a keep-alive client
    # waits ~40 ms for a delayed ACK on every call and benchmarks measure the fake.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: one line per request would drown the test output."""

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/oauth/token":
            self._token()
        elif path == "/authorization" and self.command == "GET":
            self._authorization()
        else:
            self._api()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_POST

    # -- authorization page ----------------------------------------------------------------

    def _authorization(self) -> None:
        """ML's authorization page, with the seller already logged in and saying yes.

        ``mlauth login`` against the fake (``ML_AUTH_URL``) prints a URL to this page; it
        answers with the redirect a browser would follow, carrying ``code`` and ``state``.
        """
        self._read_body()
        query = {
            k: v[0]
            for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()
        }
        fake = self.server.fake
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != fake.client_id or not redirect_uri:
            # Like ML: an unknown app or no redirect URI is an error page, never a redirect.
            self._send(*_error(400, "invalid_request", "unknown client_id or no redirect_uri"))
            return
        answer: dict[str, str] = {}
        challenge = query.get("code_challenge")
        if query.get("response_type") != "code":
            answer["error"] = "unsupported_response_type"
        elif challenge is not None and query.get("code_challenge_method") != "S256":
            answer["error"] = "invalid_request"
            answer["error_description"] = "code_challenge_method must be S256"
        else:
            answer["code"] = fake.issue_authorization_code(redirect_uri, challenge)
        if "state" in query:
            answer["state"] = query["state"]
        joiner = "&" if urllib.parse.urlsplit(redirect_uri).query else "?"
        location = f"{redirect_uri}{joiner}{urllib.parse.urlencode(answer)}"
        self._send(302, b"", [("Location", location)], None)

    # -- token endpoint --------------------------------------------------------------------

    def _token(self) -> None:
        fake = self.server.fake
        fake._token_started()
        try:
            body = self._read_body()
            form = {
                key: values[0]
                for key, values in urllib.parse.parse_qs(
                    (body or b"").decode("utf-8", "replace")
                ).items()
            }
            delay = fake.token_delay
            if delay > 0:
                time.sleep(delay)
            delay += fake._seller_delay(fake._grant_user(form) if fake.token_delay_for else None)
            # A client that gave up while the server was slow never had its grant processed:
            # the refresh token it sent must stay valid, or tests of "timeout, then retry"
            # would see an invalid_grant that the real server would not have produced.
            if body is None or (delay > 0 and not self._client_connected()):
                fake._count("abandoned")
                self.close_connection = True
                return
            fault = fake._take_fault()
            if fault == "reset":
                self.close_connection = True  # no answer at all: RemoteDisconnected
                return
            if isinstance(fault, _Fault):
                if fault.consume:
                    fake._grant(form)  # processed server-side; the answer is what gets lost
                self._send_fault(fault)
                return
            status, payload = fake._grant(form)
            mangler = fake._take_mangler() if status == 200 else None
            answer: object = payload
            if mangler is not None:
                status, answer = mangler[0], mangler[1](dict(payload))
            if fake.token_answer_delay > 0:
                time.sleep(fake.token_answer_delay)
            self._send(status, answer)
        finally:
            fake._token_finished()

    def _client_connected(self) -> bool:
        """Peek at the socket without blocking: EOF means the client closed its end."""
        connection: socket.socket = self.connection
        previous = connection.gettimeout()
        try:
            connection.settimeout(0.0)
            return connection.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True  # nothing to read, and no EOF: still there
        except OSError:
            return False  # reset by the peer
        finally:
            connection.settimeout(previous)

    def _send_fault(self, fault: _Fault) -> None:
        headers = [] if fault.retry_after is None else [("Retry-After", f"{fault.retry_after:g}")]
        if fault.body is not None:
            self._send(fault.status, fault.body.encode(), headers, "text/plain; charset=utf-8")
            return
        try:
            message = http.HTTPStatus(fault.status).phrase
        except ValueError:
            message = fault.error
        self._send(fault.status, _error(fault.status, fault.error, message)[1], headers)

    # -- API -------------------------------------------------------------------------------

    def _api(self) -> None:
        fake = self.server.fake
        fake._count("api_calls")  # before reading: a client killed mid-body still counts
        body = self._read_body()
        if body is None:
            self.close_connection = True
            return
        if fake.api_delay > 0:
            time.sleep(fake.api_delay)
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/redirect":
            # Before the auth check, like a CDN or another host would: the test is whether the
            # client carries its token across the hop, so the redirect itself must not need one.
            target = urllib.parse.parse_qs(url.query).get("to", [""])[0]
            self._send(302, b"", [("Location", target)], None)
            return
        user = fake._authorize(self.headers.get("Authorization"), url.query)
        if not isinstance(user, int):
            self._send(401, user)  # and no WWW-Authenticate, like ML
            return
        grants = _GRANTS_PATH.fullmatch(url.path)
        if grants is not None and self.command in ("GET", "HEAD"):
            status, answer = fake._grants_page(grants.group(1), url.query)
            if status == 200:
                fake._count("api_ok")
            self._send(status, answer)
            return
        if url.path == "/forbidden":
            fake._count("api_403")
            self._send(403, _FORBIDDEN)
            return
        headers = []
        if url.path == "/set-cookie":
            headers.append(("Set-Cookie", f"{url.query}; Path=/"))
        fake._count("api_ok")
        echo = {
            "method": self.command,
            "path": self.path,
            "user_id": user,
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "content_type": self.headers.get("Content-Type"),
            "cookie": self.headers.get("Cookie"),
        }
        self._send(200, echo, headers)

    # -- wire ------------------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The request body by Content-Length or chunked encoding; None if cut short."""
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                # requests sends generator bodies chunked; the framing must be consumed whole
                # or the next request on this keep-alive connection would be garbage.
                parts: list[bytes] = []
                while True:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline(1024).strip():
                            pass  # trailers
                        return b"".join(parts)
                    chunk = self.rfile.read(size)
                    if len(chunk) < size or self.rfile.readline(1024).strip():
                        return None
                    parts.append(chunk)
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length > 0 else b""
            return data if len(data) == length else None
        except (ValueError, OSError):  # malformed framing, or the client died mid-body
            return None

    def _send(
        self,
        status: int,
        payload: object,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str | None = "application/json",
    ) -> None:
        """Answer ``payload`` as JSON, or as is when it is ``bytes``."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        # Always a Content-Length: on a keep-alive connection it is the only end-of-body mark.
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
