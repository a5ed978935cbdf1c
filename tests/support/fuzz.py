"""Shared by the fuzz properties (tests/test_fuzz_*.py): a token endpoint that rotates and
answers as an example planned, hypothesis strategies for its answers, and the checks every
property makes (only MLAuthError leaves, nothing secret is said anywhere, the .env gains
nothing).

The endpoint is a requests transport adapter mounted on the token endpoint's private session:
the shape of an answer is all these properties are about, and thousands of examples must run
in seconds (loopback servers and processes are tested elsewhere). Its refresh tokens are
single use: a refresh token it no longer accepts gets ML's ``invalid_grant``, so a chain that
an answer broke shows up as a refused POST.

How many examples: :data:`EXAMPLES_VARIABLE` (``make fuzz`` sets 20000 per property); unset,
each property runs the short count it names, for ``make test``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, quote

import requests
import urllib3
from dotenv.parser import parse_stream
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import mlauth
from mlauth.cli.commands import main as cli_main
from mlauth.secret import fingerprint
from mlauth.stores.envfile import SECRET_KEYS, TOKEN_KEYS
from tests.support.leaks import ODD_SECRET, everything_said, logged, spellings

EXAMPLES_VARIABLE = "MLAUTH_FUZZ_EXAMPLES"
CLIENT_ID = "1234567890123456"
API = "https://api.mercadolibre.com"
# What every auth of an example is built with: retries without waiting, and a retry budget
# (lock_timeout / 2) shorter than an attempt's timeouts plus a second, so a Retry-After of a
# second or more ends the series instead of sleeping.
AUTH_OPTIONS: dict[str, Any] = {"backoff": 0.0001, "max_attempts": 2, "lock_timeout": 41.0}


def fuzz_settings(short: int) -> settings:
    """``short`` examples, or as many as :data:`EXAMPLES_VARIABLE` says (``make fuzz``)."""
    raw = os.environ.get(EXAMPLES_VARIABLE, "").strip()
    return settings(
        max_examples=int(raw) if raw else short,
        # make test's short pass is a gate: the same examples on every run and every machine,
        # so it never fails on a clone for an example nobody has seen; make fuzz explores.
        derandomize=not raw,
        deadline=None,  # a loaded machine is no failure
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# -- the tokens of one example's chain -------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
# RFC 6750 b64token and mlauth's length limit, written out again: the properties judge an
# answer without asking the code under test.
USABLE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
STYLES = ("ml", "opaque", "short")


def usable(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 2048 and USABLE.fullmatch(value) is not None


class Issuer:
    """Issues the tokens of one chain, each new, in one style: ML's (``APP_USR-...``,
    ``TG-...``, which mlauth recognizes by shape), opaque ones with every b64token character
    (``+``, ``/``, ``=``, ``~`` encode differently in a form, a URL and JSON), or short opaque
    ones. Random from a seed the example draws, so an example replays exactly."""

    def __init__(self, style: str, seed: int) -> None:
        self.style = style
        self._rng = random.Random(seed)
        self.issued: list[str] = []

    def _pick(self, alphabet: str, count: int) -> str:
        return "".join(self._rng.choice(alphabet) for _ in range(count))

    def pair(self) -> tuple[str, str]:
        n = len(self.issued) // 2 + 1
        if self.style == "ml":
            hexa = "0123456789abcdef"
            access = f"APP_USR-{CLIENT_ID}-010101-{self._pick(hexa, 32)}-8035443"
            refresh = f"TG-{self._pick(hexa, 24)}-8035443"
        elif self.style == "opaque":
            access = f"fzA{n}.{self._pick(_B64, 40)}+/{self._pick(_B64, 6)}~=="
            refresh = f"fzR{n}/{self._pick(_B64, 24)}+{self._pick(_B64, 6)}="
        else:
            access = f"fa{n}{self._pick(_B64, 14)}"
            refresh = f"fr{n}{self._pick(_B64, 14)}"
        self.issued += [access, refresh]
        return access, refresh


# -- values in planned bodies ----------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What a planned body is rendered from: the request, and the tokens at hand."""

    form: dict[str, str]
    body: bytes
    new_access: str
    new_refresh: str
    old_access: str
    old_refresh: str


@dataclasses.dataclass(frozen=True)
class Val:
    """A value in a planned body. ``kind`` "json" is JSON text as it is; the others name what
    the value is made from, so a failing example reads without a live token in it:
    "new access", "new refresh", "old access", "old refresh", "secret", or an echo of the
    request ("echo body", "echo values", "echo json", "echo percent"). ``insert`` is put into
    a token at ``at`` (a mangled token)."""

    kind: str
    text: str = ""
    insert: str = ""
    at: int = 0

    @property
    def secret(self) -> bool:
        """Whether the value is (made from) a secret of the chain."""
        return self.kind in ("new access", "new refresh", "old access", "old refresh", "secret")

    def raw(self, ctx: Context) -> str:
        """The value as plain text (JSON text, for "json")."""
        if self.kind in ("json", "text"):
            return self.text
        value = {
            "new access": ctx.new_access,
            "new refresh": ctx.new_refresh,
            "old access": ctx.old_access,
            "old refresh": ctx.old_refresh,
            "secret": ODD_SECRET,
            "echo body": ctx.body.decode("utf-8", "replace"),
            "echo values": " ".join(f"{k}={v}" for k, v in ctx.form.items()),
            "echo json": json.dumps(ctx.form),
            "echo percent": "&".join(
                f"{k}={_lower_hex(quote(v, safe=''))}" for k, v in ctx.form.items()
            ),
        }[self.kind]
        if self.insert:
            at = self.at % (len(value) + 1)
            value = value[:at] + self.insert + value[at:]
        return value

    def json(self, ctx: Context, ascii_only: bool) -> str:
        if self.kind == "json":
            return self.text
        return json.dumps(self.raw(ctx), ensure_ascii=ascii_only)

    def value(self, ctx: Context) -> object:
        """The decoded value, as a strict reader takes it (``json.loads``)."""
        if self.kind != "json":
            return self.raw(ctx)
        try:
            return json.loads(self.text)
        except (ValueError, RecursionError):
            return None  # a huge or deep leaf: no token either way


def _lower_hex(text: str) -> str:
    return re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), text)


@dataclasses.dataclass(frozen=True)
class ObjectBody:
    """A JSON object, written pair by pair (a name may come twice: the last one counts)."""

    pairs: tuple[tuple[str, Val], ...]
    ascii_only: bool = True

    def text(self, ctx: Context) -> str:
        items = (
            json.dumps(name, ensure_ascii=self.ascii_only) + ": " + val.json(ctx, self.ascii_only)
            for name, val in self.pairs
        )
        return "{" + ", ".join(items) + "}"

    def field(self, name: str) -> Val | None:
        found = [val for key, val in self.pairs if key == name]
        return found[-1] if found else None


@dataclasses.dataclass(frozen=True)
class ErrorBody:
    """ML's error shape, ``{"error": ..., "error_description"|"message": ..., ...}``."""

    error: Val | None
    description: Val | None
    key: str = "error_description"

    def text(self, ctx: Context) -> str:
        parts = [] if self.error is None else [f'"error": {self.error.json(ctx, True)}']
        if self.description is not None:
            parts.append(f'"{self.key}": {self.description.json(ctx, True)}')
        return "{" + ", ".join([*parts, '"status": 400', '"cause": []']) + "}"


@dataclasses.dataclass(frozen=True)
class TextBody:
    """Whatever else a server or a proxy sends: pieces of plain text, one after the other."""

    pieces: tuple[Val, ...]

    def text(self, ctx: Context) -> str:
        return "".join(piece.raw(ctx) for piece in self.pieces)


Body = ObjectBody | ErrorBody | TextBody

NATURAL: tuple[tuple[str, Val], ...] = (
    ("access_token", Val("new access")),
    ("token_type", Val("json", '"bearer"')),
    ("expires_in", Val("json", "21600")),
    ("scope", Val("json", '"offline_access read write"')),
    ("user_id", Val("json", "8035443")),
    ("refresh_token", Val("new refresh")),
)
GOOD_BODY = ObjectBody(NATURAL)


@dataclasses.dataclass(frozen=True)
class Answer:
    """One planned answer of the token endpoint.

    ``encoding`` encodes the body text (lone surrogates pass as they are: bytes that are no
    UTF-8); then ``cut`` keeps only that many bytes and ``junk`` inserts bytes. A 2xx answer
    means the server rotated: the refresh token it delivers is live from then on (see
    :meth:`delivers`); no ``refresh_token`` at all (or null) means it kept the old one.
    """

    status: int
    body: Body
    headers: tuple[tuple[str, str], ...] = ()
    encoding: str = "utf-8"
    cut: int | None = None
    junk: tuple[tuple[int, bytes], ...] = ()

    @property
    def bodiless(self) -> bool:
        """An answer whose body no client reads, whatever the server sends (RFC 9110)."""
        return self.status < 200 or self.status in (204, 304)

    def render(self, ctx: Context) -> bytes:
        if self.bodiless:
            return b""
        data = self.body.text(ctx).encode(self.encoding, "surrogatepass")
        if self.cut is not None:
            data = data[: self.cut % (len(data) + 1)]
        for at, extra in self.junk:
            at %= len(data) + 1
            data = data[:at] + extra + data[at:]
        return data

    @property
    def rotates(self) -> bool:
        return 200 <= self.status < 300

    def refresh_field(self, ctx: Context) -> object:
        """The ``refresh_token`` a strict reader finds in the answer: None when there is
        none (or null), ``...`` when the body cannot be read as the object planned."""
        intact = self.cut is None and not self.junk and not self.bodiless
        if not isinstance(self.body, ObjectBody) or not intact:
            return ...
        field = self.body.field("refresh_token")
        return None if field is None else field.value(ctx)

    def refuses(self, ctx: Context) -> bool:
        """A definite invalid_grant: the client then marks the token dead."""
        if self.rotates or not isinstance(self.body, ErrorBody) or self.body.error is None:
            return False
        return self.body.error.value(ctx) == "invalid_grant"


GOOD = Answer(200, GOOD_BODY, (("Content-Type", "application/json"),))
INVALID_GRANT = {
    "error": "invalid_grant",
    "error_description": "Error validating grant. Your authorization code or refresh token "
    "may be expired or it was already used",
    "status": 400,
    "cause": [],
}


def respond(
    adapter: requests.adapters.BaseAdapter,
    request: requests.PreparedRequest,
    status: int,
    headers: Iterable[tuple[str, str]],
    data: bytes,
) -> requests.Response:
    """A response built the way requests builds one from urllib3's, from ``adapter`` (where a
    401's request is sent again)."""
    raw = urllib3.HTTPResponse(
        body=io.BytesIO(data),
        headers=urllib3.HTTPHeaderDict(list(headers)),
        status=status,
        reason="fuzz",
        preload_content=False,
        decode_content=False,
        request_method=request.method,
    )
    response = requests.adapters.HTTPAdapter().build_response(request, raw)
    response.connection = adapter
    return response


class TokenStub(requests.adapters.BaseAdapter):
    """The token endpoint: single-use refresh tokens that rotate, and planned answers.

    ``access``/``live`` are the tokens the store starts with; ``plans`` the answers to give,
    in order, to POSTs that present the live refresh token (after them: good answers).

    The stub keeps the model the properties judge by: ``lost`` once a 2xx rotated to a
    refresh token its answer did not deliver usable (the chain is gone: no property about
    it then), ``refused`` once it answered ``invalid_grant`` to a live token (the client
    rightly marks it dead), and ``wrong``: the POSTs that presented a token it no longer
    accepts.
    """

    def __init__(self, issuer: Issuer) -> None:
        super().__init__()
        self.issuer = issuer
        self.access, self.live = issuer.pair()
        self.plans: list[Answer] = []
        self.sent: list[str | None] = []  # the refresh token each POST presented
        self.lost = False
        self.refused = False
        self.wrong = 0

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        body = request.body if isinstance(request.body, bytes) else b""
        form = dict(parse_qsl(body.decode("utf-8")))
        presented = form.get("refresh_token")
        self.sent.append(presented)
        if presented != self.live:
            self.wrong += 1
            return respond(self, request, 400, [], json.dumps(INVALID_GRANT).encode())
        plan = self.plans.pop(0) if self.plans else GOOD
        new_access, new_refresh = self.issuer.pair()
        ctx = Context(form, body, new_access, new_refresh, self.access, self.live)
        data = plan.render(ctx)
        if plan.refuses(ctx):
            self.refused = True
        if plan.rotates:
            found = plan.refresh_field(ctx)
            if found is not None:  # None: no refresh_token, the server kept the old one
                self.live = found if usable(found) else new_refresh
                self.lost = self.lost or not usable(found)
            self.access = new_access
        return respond(self, request, plan.status, plan.headers, data)

    def close(self) -> None:
        pass

    def mount_on(self, auth: mlauth.MLAuth | Any) -> None:
        """Answer every token POST of ``auth`` (whatever ML_TOKEN_URL says)."""
        session: requests.Session = auth._engine._endpoint._session
        session.mount("https://", self)
        session.mount("http://", self)


class ApiStub(requests.adapters.BaseAdapter):
    """MercadoLibre's API: 401 to the access token ``stale``, 200 to any other."""

    def __init__(self, stale: str) -> None:
        super().__init__()
        self.stale = stale

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        status = 401 if request.headers.get("Authorization") == f"Bearer {self.stale}" else 200
        body = b'{"message":"invalid_token","status":401}' if status == 401 else b"{}"
        return respond(self, request, status, [("Content-Type", "application/json")], body)

    def close(self) -> None:
        pass


# -- strategies: what a body may hold ---------------------------------------------------------

# Every kind of character: any code point, lone surrogates (only \u escapes can carry them,
# or bytes that are no UTF-8), and those that break headers, lines, terminals and encodings.
CHARS = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),
    st.sampled_from(list("\r\n\x00\t \x1b\x7f\x85\u2028\ufeff+/=~.-_%&\"\\'#@é中")),
)
TEXT = st.text(CHARS, max_size=30)
NUMBERS = st.one_of(
    st.integers().map(str),
    st.floats().map(json.dumps),  # NaN and Infinity too, which json.loads reads
    st.sampled_from(
        ["21600", "21600.0", "2.16e4", "0", "-0", "-5", "1e308", "1e400", "-1e400", "0.0001"]
    ),
    st.builds(lambda digits: "9" * digits, st.integers(300, 6000)),  # past int_max_str_digits
)
LEAVES = st.one_of(
    st.sampled_from(["null", "true", "false"]),
    NUMBERS,
    st.builds(json.dumps, TEXT),
    st.builds(lambda text: json.dumps(text, ensure_ascii=False), TEXT),
    st.builds(lambda char, size: json.dumps(char * size), CHARS, st.integers(2040, 2100)),
)
JSON_TEXT = st.recursive(
    LEAVES,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(TEXT, kids), max_size=3).map(
            lambda pairs: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
        ),
    ),
    max_leaves=6,
)
# Deeper than Python's JSON parser recurses (about 1000 levels).
DEEP = st.builds(
    lambda depth, inner, arrays: (
        ("[" * depth + inner + "]" * depth) if arrays else ('{"a":' * depth + inner + "}" * depth)
    ),
    st.integers(900, 30000),
    st.sampled_from(["{}", "[]", "1", '"x"']),
    st.booleans(),
)
ANY_JSON = st.one_of(JSON_TEXT, JSON_TEXT, JSON_TEXT, DEEP).map(lambda text: Val("json", text))

TOKEN_KINDS = ("new access", "new refresh", "old access", "old refresh", "secret")
ECHOES = ("echo body", "echo values", "echo json", "echo percent")
# What a server (or a proxy in front of it) may quote of what it knows: the request, and
# the tokens the client sent or holds.
KNOWN = ("old access", "old refresh", "secret", *ECHOES)


@st.composite
def mangled(draw: st.DrawFn, kind: str, chars: st.SearchStrategy[str] | None = None) -> Val:
    """A token with a character (or a run of them, of ``chars``) put in, somewhere."""
    chars = CHARS if chars is None else chars
    insert = draw(st.one_of(chars, st.text(chars, min_size=1, max_size=30)))
    return Val(kind, insert=insert, at=draw(st.integers(0, 100)))


@st.composite
def field_value(draw: st.DrawFn, name: str, natural: Val) -> Val | None:
    """A field of a 2xx answer: mostly as ML sends it (so that refreshes go on), else
    missing, any JSON at all, another token of the chain, or a mangled token."""
    roll = draw(st.integers(0, 11))
    if roll < 6:
        return natural
    if roll == 6:
        return None
    if roll in (7, 8):
        return draw(ANY_JSON)
    if roll == 9:
        return Val(draw(st.sampled_from(TOKEN_KINDS)))
    return draw(mangled(draw(st.sampled_from(TOKEN_KINDS))))


@st.composite
def object_bodies(draw: st.DrawFn) -> ObjectBody:
    pairs = []
    for name, natural in NATURAL:
        val = draw(field_value(name, natural))
        if val is not None:
            pairs.append((name, val))
    names = st.one_of(TEXT, st.sampled_from([name for name, _ in NATURAL]))
    for _ in range(draw(st.integers(0, 3))):  # extra fields, or a field given twice
        extra = (draw(names), draw(ANY_JSON))
        pairs.insert(draw(st.integers(0, len(pairs))), extra)
    return ObjectBody(tuple(pairs), ascii_only=draw(st.booleans()))


SAID = st.one_of(
    st.sampled_from(
        [
            "invalid_grant",
            "invalid_client",
            "invalid_request",
            "local_rate_limited",
            "unauthorized_client",
            "forbidden",
            "server_error",
        ]
    ).map(lambda code: Val("json", json.dumps(code))),
    st.sampled_from(KNOWN).map(Val),
    st.builds(lambda kind, insert: Val(kind, insert=insert), st.sampled_from(KNOWN), TEXT),
    ANY_JSON,
)
TEXT_PIECES = st.one_of(
    st.sampled_from(KNOWN).map(Val),
    st.builds(lambda text: Val("json", text), TEXT),
    st.sampled_from(["<html><body>Bad Gateway</body></html>", "OK", " ", "\r\n"]).map(
        lambda text: Val("json", text)
    ),
    st.builds(lambda data: Val("json", data.decode("latin-1")), st.binary(max_size=20)),
)
TEXT_BODIES = st.lists(TEXT_PIECES, max_size=3).map(lambda pieces: TextBody(tuple(pieces)))
ERROR_BODIES = st.builds(
    ErrorBody,
    st.one_of(st.none(), SAID),
    st.one_of(st.none(), SAID),
    st.sampled_from(["error_description", "message"]),
)
RETRY_AFTER = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "120",
            "-1",
            "1.5",
            "9" * 400,
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Mon, 99 Foo 2020 99:99:99 GMT",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=30),
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=utf-16",
        "application/json; charset=no-such-charset",
        "text/html",
        "text/plain; charset=latin-1",
    ]
)


@st.composite
def headers(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    found = []
    if draw(st.booleans()):
        found.append(("Content-Type", draw(CONTENT_TYPES)))
    if draw(st.integers(0, 3)) == 0:
        found.append(("Retry-After", draw(RETRY_AFTER)))
    return tuple(found)


SUCCESS = st.sampled_from([200, 200, 200, 200, 201, 202, 203, 204, 206, 299])
FAILURE = st.sampled_from([100, 302, 400, 400, 401, 403, 404, 409, 418, 429, 500, 502, 503, 504])


@st.composite
def answers(draw: st.DrawFn, status: st.SearchStrategy[int] | None = None) -> Answer:
    """Any answer of the token endpoint: 2xx with any body (mostly an object with odd
    fields), or an error with ML's error shape quoting what the server knows, or anything."""
    code = draw(status if status is not None else st.one_of(SUCCESS, FAILURE))
    roll = draw(st.integers(0, 9))
    body: Body
    if 200 <= code < 300:
        if roll < 7:
            body = draw(object_bodies())
        elif roll == 7:
            body = TextBody((draw(ANY_JSON),))  # JSON that is no object
        elif roll == 8:
            body = draw(TEXT_BODIES)
        else:
            body = draw(ERROR_BODIES)
    elif roll < 6:
        body = draw(ERROR_BODIES)
    elif roll < 8:
        body = draw(TEXT_BODIES)
    else:
        body = draw(object_bodies())
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-32"]))
    cut = draw(st.integers(0, 10**6)) if draw(st.integers(0, 9)) == 0 else None
    junk: tuple[tuple[int, bytes], ...] = ()
    if draw(st.integers(0, 9)) == 0:
        inserted = st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=3))
        junk = tuple(draw(st.lists(inserted, min_size=1, max_size=3)))
    return Answer(code, body, draw(headers()), encoding, cut, junk)


# -- what the properties check ----------------------------------------------------------------


def outcome(call: Callable[[], object]) -> BaseException | None:
    """What ``call()`` raises, or None. Caught in a frame that holds nothing secret."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 (handed to the caller to look at)
        return exc
    return None


def assert_only_mlauth_error(error: BaseException | None, doing: str) -> None:
    if error is not None and not isinstance(error, mlauth.MLAuthError):
        what = type(error).__name__
        raise AssertionError(f"{doing} raised {what}, not an MLAuthError") from error


def assert_nothing_secret(text: str, secrets: Iterable[str], where: str) -> None:
    """No secret in ``text``, as is or in any encoding an echo or a pickle gives it
    (a pickle holds UTF-8, so read as latin-1 a non-ASCII secret looks garbled)."""
    for secret in secrets:
        if len(secret) < 8:
            continue  # too short to tell a leak from a coincidence
        try:
            forms = spellings(secret)
            forms |= {form.encode("utf-8").decode("latin-1") for form in forms}
        except UnicodeEncodeError:  # a lone surrogate: it can only be there as it is
            forms = {secret}
        for form in forms:
            if form in text:
                at = text.index(form)
                context = text[max(at - 120, 0) : at].replace(form, "<secret>")
                raise AssertionError(
                    f"{where} holds the secret {secret[:6]}... as {form[:6]!r}...; "
                    f"after: {context!r}"
                )


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def every_log_record() -> Iterator[list[logging.LogRecord]]:
    """Every record any logger emits at DEBUG and up, while the block runs."""
    recorder = Recorder()
    root, ours = logging.getLogger(), logging.getLogger("mlauth")
    levels = root.level, ours.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    ours.setLevel(logging.DEBUG)
    try:
        yield recorder.records
    finally:
        root.removeHandler(recorder)
        root.setLevel(levels[0])
        ours.setLevel(levels[1])


def said(error: BaseException | None, records: list[logging.LogRecord]) -> str:
    """Everything an error and the log records could show (leaks.everything_said)."""
    return (everything_said(error) if error is not None else "") + "\n" + logged(records)


def use_requests_auth(entry: str, env: Path, stub: TokenStub) -> None:
    """One use of the chain through :class:`mlauth.MLAuth`: ``refresh``, ``valid_tokens`` or
    an API call (``requests``). No token is a local here (this frame is on the traceback)."""
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
    stub.mount_on(auth)
    if entry == "refresh":
        auth.refresh()
    elif entry == "valid_tokens":
        auth.valid_tokens()
    else:
        with requests.Session() as session:
            session.mount("https://", ApiStub(stub.access))
            session.get(f"{API}/users/me", auth=auth, timeout=5).close()


def status_output(env: Path) -> str:
    """What ``mlauth status`` prints, on stdout and stderr (run in this process)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        cli_main(["status", "--env", str(env)])
    return out.getvalue() + err.getvalue()


# Where example folders go: a RAM-backed filesystem if the machine has one, where a refresh's
# fsyncs cost nothing (the properties are about contents, not durability) and thousands of
# examples run in seconds; else the default temporary folder.
_SHM = "/dev/shm"
EXAMPLES_ROOT = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None


@contextlib.contextmanager
def closing_redis_clients() -> Iterator[None]:
    """Close, at the end of the block, every Redis client a RedisStore made in it: an example
    makes several (from_env, the CLI, a store's own load), and a socket left to the garbage
    collector warns (an error under this suite's filterwarnings) wherever it is collected."""
    from mlauth.stores.redis import RedisStore

    opened: list[Any] = []
    connect = RedisStore._connect

    def recording(store: RedisStore, url: str, timeout: float) -> Any:
        clients = connect(store, url, timeout)
        opened.extend(clients)
        return clients

    with mock.patch.object(RedisStore, "_connect", recording):
        try:
            yield
        finally:
            for client in opened:
                client.close()


@contextlib.contextmanager
def example_folder() -> Iterator[Path]:
    """A folder of the example's own (hypothesis runs many examples in one test call)."""
    with tempfile.TemporaryDirectory(prefix="mlauth-fuzz-", dir=EXAMPLES_ROOT) as name:
        folder = Path(name)
        folder.chmod(0o700)
        yield folder


# -- the .env -------------------------------------------------------------------------------


def write_env(folder: Path, stub: TokenStub, *, expired: bool) -> Path:
    """A .env for the stub's first tokens, with the lines a pipeline's .env has besides."""
    env = folder / ".env"
    expires = time.time() + (-10 if expired else 6 * 3600)
    env.write_text(
        "# the pipeline's settings\n"
        "OTHER=keep me  # a note\n"
        f"ML_CLIENT_ID={CLIENT_ID}\n"
        f"ML_CLIENT_SECRET={ODD_SECRET}\n"
        f"export ML_ACCESS_TOKEN='{stub.access}'\n"
        f'ML_REFRESH_TOKEN="{stub.live}"  # rotated by mlauth\n'
        f"ML_TOKEN_EXPIRES_AT={expires:.0f}\n"
        "\n"
        "# the end\n"
    )
    env.chmod(0o600)
    return env


def keys_of(text: str) -> list[str | None]:
    """The keys of the .env's bindings as python-dotenv reads them (None: no binding)."""
    return [binding.key for binding in parse_stream(io.StringIO(text))]


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def other_lines(text: str) -> list[str]:
    """The lines of ``text``, with their endings, that no token key's binding touches (the
    blank or white lines python-dotenv counts as the start of a binding are other lines)."""
    spans, at = [], 0
    for binding in parse_stream(io.StringIO(text)):
        original = binding.original.string
        if binding.key in TOKEN_KEYS:
            spans.append((at + len(original) - len(original.lstrip()), at + len(original)))
        at += len(original)
    assert at == len(text), "python-dotenv did not read the whole text"
    return [
        line.group()
        for line in _LINE.finditer(text)
        if not any(line.start() < end and start < line.end() for start, end in spans)
    ]


def assert_env_gained_nothing(before: bytes, after: bytes) -> None:
    """``after`` (the .env once mlauth wrote it) has no line and no key ``before`` did not
    have, but for one line per token key mlauth keeps; every other line (bindings, comments,
    blank lines, junk) is there byte for byte, in order."""
    if after == before:
        return
    old, new = before.decode("utf-8"), after.decode("utf-8")
    assert new.startswith("\ufeff") == old.startswith("\ufeff"), "the BOM changed"
    # mlauth reads and writes the file without its BOM (python-dotenv would take it for a
    # part of the first key).
    old, new = old.removeprefix("\ufeff"), new.removeprefix("\ufeff")
    old_keys, new_keys = keys_of(old), keys_of(new)
    gained = set(new_keys) - set(old_keys) - set(TOKEN_KEYS)
    assert not gained, f"the .env gained the keys {sorted(map(str, gained))}"
    for key in TOKEN_KEYS:
        assert new_keys.count(key) <= 1, f"{key} is set {new_keys.count(key)} times"
    kept, now = other_lines(old), other_lines(new)
    assert len(now) == len(kept), "a line that holds no token key went or came"
    for number, (line, was) in enumerate(zip(now, kept, strict=True)):
        # A last line without its ending gets one when a token key is added after it.
        ended = not was.endswith(("\n", "\r")) and line.rstrip("\r\n") == was
        assert line == was or ended, f"other line {number} changed: {was!r} -> {line!r}"
    added = len([key for key in TOKEN_KEYS if key not in old_keys])
    lines_before, lines_after = len(_LINE.findall(old)), len(_LINE.findall(new))
    assert lines_after <= lines_before + added, (
        f"the .env went from {lines_before} to {lines_after} lines"
    )


# -- strategies: what a .env may hold -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EnvLine:
    """A line of a .env (or a value that spans lines): ``key`` None is a comment, a blank or
    any other text, ``value`` as it is. The value is a :class:`Val`, so that a failing example
    shows "old refresh", never the token."""

    key: str | None
    value: Val
    style: str = "bare"  # bare, single, double (escaped), raw-double (as it is, in "...")
    export: bool = False
    spaces: str = ""  # around "="
    comment: str = ""  # after the value

    def render(self, ctx: Context) -> str:
        text = self.value.raw(ctx)
        if self.key is None:
            return text
        if self.style == "single":
            text = f"'{text}'"
        elif self.style == "double":
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif self.style == "raw-double":
            text = f'"{text}"'
        head = "export " if self.export else ""
        return f"{head}{self.key}{self.spaces}={self.spaces}{text}{self.comment}"


ENDINGS = ["\n", "\r\n", "\r"]


@dataclasses.dataclass(frozen=True)
class EnvFile:
    """A whole .env: its lines, each line's ending (cycled), a BOM, a last line ending."""

    lines: tuple[EnvLine, ...]
    endings: tuple[str, ...] = ("\n",)
    bom: bool = False
    final_newline: bool = True

    def render(self, ctx: Context) -> bytes:
        ends = [self.endings[i % len(self.endings)] for i in range(len(self.lines))]
        if not self.final_newline and ends:
            ends[-1] = ""
        text = "".join(line.render(ctx) + end for line, end in zip(self.lines, ends, strict=True))
        return (("\ufeff" if self.bom else "") + text).encode("utf-8", "surrogatepass")

    def secrets(self, ctx: Context) -> list[str]:
        """What the file holds as secrets: the values python-dotenv reads for
        ML_CLIENT_SECRET, ML_ACCESS_TOKEN and ML_REFRESH_TOKEN (a comment glued to a bare
        value is part of it), as read and stripped. A secret only under another key is
        none: nothing says it is one. A file that is no UTF-8 declares nothing."""
        try:
            text = self.render(ctx).decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            return []
        found = [
            binding.value
            for binding in parse_stream(io.StringIO(text))
            if binding.key in SECRET_KEYS and binding.value
        ]
        return [text for value in found for text in {value, value.strip()} if text]


def env_context(stub: TokenStub) -> Context:
    return Context({}, b"", "", "", stub.access, stub.live)


# A .env is text: no lone surrogate here (its bytes would be no UTF-8, which one extra line
# below makes happen now and then), and no line break within a line.
ENV_CHARS = st.one_of(
    st.characters(codec="utf-8", exclude_characters="\r\n"),
    st.sampled_from(list("\x00\t \x1b\x7f\x85\u2028\ufeff+/=~.-_%&\"\\'#@$`{}é中")),
)
LINE_TEXT = st.text(ENV_CHARS, max_size=30)
# Times as a .env may hold them: none, past, future, and what float() reads or refuses.
TIMES = st.one_of(
    st.sampled_from(["", " ", "0", "-5", "1e10", "253402300799", "253402300800", "1e400"]),
    st.sampled_from(["inf", "-inf", "nan", "abc", "0x10", "1_000", "\u0661\u0662", "+7", "1e-7"]),
    st.floats(0, 4e9).map(lambda t: f"{t:.3f}"),
    st.integers().map(str),
    LINE_TEXT,
)
# Mostly a time mlauth wrote (past: the next use refreshes), so most examples get as far as
# a refresh and a save.
EXPIRIES = st.one_of(
    st.floats(1e9, 1.7e9).map(lambda t: f"{t:.3f}"),
    st.integers(1_000_000_000, 1_700_000_000).map(str),
    TIMES,
)
SETTINGS: dict[str, st.SearchStrategy[str]] = {
    "ML_TOKEN_EXPIRES_AT": TIMES,
    "ML_TOKEN_REFRESHED_AT": TIMES,
    "ML_TOKEN_REFRESHED_BY": st.one_of(
        st.sampled_from(["pid 1@host", "\x1b[2J\x1b]0;owned\x07", "\u202eevil"]), LINE_TEXT
    ),
    "ML_API_HOSTS": st.one_of(
        st.sampled_from(
            [
                "api.mercadolibre.com",
                "api.mercadolibre.com,api.mercadopago.com",
                "bad host!",
                ",",
                "api.mercadolibre.com:99999",
                "[::1",
                "http://api.mercadolibre.com",
                "127.0.0.1;8080",
                "\u00e1pi.com",
            ]
        ),
        LINE_TEXT,
    ),
    "ML_TOKEN_URL": st.one_of(
        st.sampled_from(
            [
                "https://api.mercadolibre.com/oauth/token",
                "http://127.0.0.1:9/oauth/token",
                "http://evil.example\\@127.0.0.1/oauth/token",
                "http://evil.example/oauth/token",
                "https://user:pw@api.mercadolibre.com/oauth/token",
                "ftp://api.mercadolibre.com/oauth/token",
                "https://api.mercadolibre.com\t/oauth/token",
            ]
        ),
        LINE_TEXT,
    ),
    "ML_ENV_WRITE": st.sampled_from(["auto", "in-place", "IN-PLACE", "bogus", ""]),
    # Never one that connects: a refused connection is retried for a second (test_cli_redis).
    "ML_TOKEN_STORE": st.sampled_from(
        ["", "file:///tmp/x", "memcached://127.0.0.1", "redis://127.0.0.1:notaport/0"]
    ),
    "ML_TOKEN_LOCK_TIMEOUT": st.sampled_from(["30", "abc", "-1", "inf", "nan"]),
    "ML_CLIENT_ID": st.one_of(st.just(CLIENT_ID), st.sampled_from(["", " ", "12 34"]), LINE_TEXT),
}
KEYS = st.one_of(
    st.sampled_from([*TOKEN_KEYS, *SETTINGS, "ML_CLIENT_SECRET", "OTHER", "ml_refresh_token"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,12}", fullmatch=True),
)


@st.composite
def env_values(draw: st.DrawFn, key: str) -> Val:
    """A value for ``key``: a token or the secret (maybe mangled), or text.

    Never a secret under ML_CLIENT_ID: the client id is no secret, it is sent in every token
    request and shown by design, so whatever is put there is shown.
    """
    if key in SETTINGS and (key == "ML_CLIENT_ID" or draw(st.booleans())):
        return Val("text", draw(SETTINGS[key]))
    roll = draw(st.integers(0, 5))
    if roll < 2:
        return Val(draw(st.sampled_from(("old access", "old refresh", "secret"))))
    if roll == 2:
        kind = draw(st.sampled_from(("old access", "old refresh", "secret")))
        return draw(mangled(kind, ENV_CHARS | st.just("\n")))
    return Val("text", draw(st.one_of(LINE_TEXT, LINE_TEXT, st.text(ENV_CHARS | st.just("\n")))))


@st.composite
def env_line_shape(draw: st.DrawFn, line: EnvLine) -> EnvLine:
    """``line`` written another way: quoted, exported, spaced, commented."""
    style = draw(st.sampled_from(["bare", "bare", "single", "double", "raw-double"]))
    comments = ["", "", "  # a note", " #x", "#glued", " # ML_REFRESH_TOKEN=x"]
    comment = draw(st.sampled_from(comments))
    return dataclasses.replace(
        line,
        style=style,
        export=draw(st.booleans()),
        spaces=draw(st.sampled_from(["", "", " ", "\t"])),
        comment=comment,
    )


@st.composite
def env_files(draw: st.DrawFn) -> EnvFile:
    """A .env as people (and editors, and other tools) write them, and worse: the five lines
    a refresh needs, each maybe written another way, changed, or gone, among comments,
    blank lines, junk, other keys, keys set twice and values spanning lines."""
    base = [
        EnvLine("ML_CLIENT_ID", Val("text", CLIENT_ID)),
        EnvLine("ML_CLIENT_SECRET", Val("secret")),
        EnvLine("ML_ACCESS_TOKEN", Val("old access")),
        EnvLine("ML_REFRESH_TOKEN", Val("old refresh")),
        EnvLine("ML_TOKEN_EXPIRES_AT", Val("text", draw(EXPIRIES))),
    ]
    lines: list[EnvLine] = []
    for line in base:
        roll = draw(st.integers(0, 14))
        if roll == 0:
            continue  # gone
        if roll in (1, 2):
            line = draw(env_line_shape(line))
        elif roll == 3:
            assert line.key is not None
            line = dataclasses.replace(line, value=draw(env_values(line.key)))
        lines.append(line)
    extras = st.one_of(
        st.builds(lambda text: EnvLine(None, Val("text", "#" + text)), LINE_TEXT),
        st.sampled_from(["", "   ", "export", "=", "'", '"', "ML_REFRESH_TOKEN"]).map(
            lambda text: EnvLine(None, Val("text", text))
        ),
        st.builds(lambda text: EnvLine(None, Val("text", text)), LINE_TEXT),
        KEYS.flatmap(lambda key: env_values(key).map(lambda val: EnvLine(key, val))).flatmap(
            env_line_shape
        ),
        st.builds(  # a double-quoted value over several lines
            lambda key, text: EnvLine(key, Val("text", text), style="raw-double"),
            KEYS,
            st.text(ENV_CHARS.filter(lambda char: char not in '"\\') | st.just("\n"), max_size=30),
        ),
    )
    for _ in range(draw(st.integers(0, 5))):
        lines.insert(draw(st.integers(0, len(lines))), draw(extras))
    if draw(st.integers(0, 19)) == 0:  # a byte that is no UTF-8
        lines.insert(draw(st.integers(0, len(lines))), EnvLine(None, Val("text", "\udcff")))
    return EnvFile(
        tuple(lines),
        endings=tuple(draw(st.lists(st.sampled_from(ENDINGS), min_size=1, max_size=3))),
        bom=draw(st.integers(0, 7)) == 0,
        final_newline=draw(st.integers(0, 5)) != 0,
    )


# -- strategies: what a Redis hash may hold -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnswerRecord:
    """The raw answer a refresher keeps in the hash's ``answer`` field before reading it.

    ``body`` is what the token endpoint sent it (its status is not kept); ``follows`` names
    the version the hash holds (else an older one); ``spent`` names the stored refresh token
    (else another); ``fields`` are JSON texts put over the record's own; ``whole``, when set,
    is the field's text instead of a record.
    """

    body: Answer
    follows: bool = True
    spent: bool = True
    b64: bool = False
    fields: tuple[tuple[str, str], ...] = ()
    whole: str | None = None

    def render(self, ctx: Context, chain: str, generation: int) -> str:
        if self.whole is not None:
            return self.whole
        raw = self.body.render(ctx)
        record: dict[str, object] = {
            "kind": "raw",
            "spent": fingerprint(ctx.old_refresh if self.spent else ctx.old_access),
            "grant": "refresh_token",
            "started": 1_700_000_000.0,
            "at": 1_700_000_001.0,
            "by": "pid 1@host",
            "size": len(raw),
            "chain": chain if self.follows else chain + "0",
            "generation": generation,
        }
        try:
            if self.b64:
                raise UnicodeDecodeError("utf-8", raw, 0, 0, "asked for base64")
            record["body"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            record["body_b64"] = base64.b64encode(raw).decode("ascii")
        text = json.dumps(record)[:-1]
        return text + "".join(f", {json.dumps(k)}: {v}" for k, v in self.fields) + "}"

    def delivers(self, ctx: Context) -> object:
        """What the replayed answer gives as the refresh token: as Answer.refresh_field, and
        ``...`` when the record itself cannot be read as written."""
        if self.whole is not None or self.fields:
            return ...
        return self.body.refresh_field(ctx)


@dataclasses.dataclass(frozen=True)
class RedisHash:
    """A hash for the tokens: its fields (a :class:`Val`, or bytes that are no UTF-8), and a
    raw answer in its ``answer`` field. ``chain`` and ``generation`` are the version the
    fields name when they are as mlauth writes them."""

    fields: tuple[tuple[str, Val | bytes], ...]
    chain: str
    generation: int
    answer: AnswerRecord | None = None

    def mapping(self, ctx: Context) -> dict[str, str | bytes]:
        found: dict[str, str | bytes] = {
            name: value if isinstance(value, bytes) else value.raw(ctx).encode("utf-8")
            for name, value in self.fields
        }
        if self.answer is not None:
            found["answer"] = self.answer.render(ctx, self.chain, self.generation).encode(
                "utf-8", "surrogatepass"
            )
        return found

    def field(self, name: str) -> Val | bytes | None:
        return dict(self.fields).get(name)

    @property
    def readable(self) -> bool:
        """Whether the version is as mlauth writes it and the refresh token as mlauth wrote
        it (or gone), so that a record that follows is replayed as the answer reads."""
        return (
            self.field("chain") == Val("text", self.chain)
            and self.field("generation") == Val("text", str(self.generation))
            and self.field("refresh_token") in (Val("old refresh"), None)
        )


HASH_TEXT = st.text(ENV_CHARS | st.just("\n"), max_size=30)
GENERATIONS = st.sampled_from(["", "-1", "1.5", "1e3", "abc", "9" * 16, " 1", "007", "\u0661"])
# Bytes that are no UTF-8: a stray byte, a cut sequence, an encoded surrogate.
NOT_UTF8 = st.one_of(
    st.sampled_from([b"\x80", b"\xff\xfe", b"abc\xc3", b"\xed\xa0\x80"]),
    st.binary(max_size=8).map(lambda data: data + b"\xff"),
)


@st.composite
def hash_fields(
    draw: st.DrawFn, chain: str, generation: int
) -> tuple[tuple[str, Val | bytes], ...]:
    natural: dict[str, Val] = {
        "chain": Val("text", chain),
        "generation": Val("text", str(generation)),
        "access_token": Val("old access"),
        "refresh_token": Val("old refresh"),
        "expires_at": Val("text", "1000000000.5"),
        "refreshed_at": Val("text", "999978400.5"),
        "refreshed_by": Val("text", "pid 1@host"),
    }
    odd: dict[str, st.SearchStrategy[str]] = {
        "generation": GENERATIONS,
        "expires_at": TIMES,
        "refreshed_at": TIMES,
        "refreshed_by": SETTINGS["ML_TOKEN_REFRESHED_BY"],
    }
    fields: list[tuple[str, Val | bytes]] = []
    for name, val in natural.items():
        roll = draw(st.integers(0, 30))
        value: Val | bytes = val
        if roll == 0:
            continue
        if roll == 1:
            value = Val("text", draw(odd.get(name, HASH_TEXT)))
        elif roll == 2:
            value = draw(NOT_UTF8)
        elif roll == 3 and name.endswith("_token"):
            kind = draw(st.sampled_from(("old access", "old refresh", "secret")))
            value = draw(mangled(kind, ENV_CHARS | st.just("\n")))
        fields.append((name, value))
    for _ in range(draw(st.integers(0, 2))):
        fields.append(
            (draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True)), Val("text", draw(HASH_TEXT)))
        )
    return tuple(fields)


@st.composite
def answer_records(draw: st.DrawFn) -> AnswerRecord:
    roll = draw(st.integers(0, 9))
    if roll == 0:
        whole = draw(st.one_of(HASH_TEXT, JSON_TEXT.filter(lambda text: not text.startswith("{"))))
        return AnswerRecord(GOOD, whole=whole)
    body = GOOD if roll < 4 else draw(answers(status=st.just(200)))
    fields: tuple[tuple[str, str], ...] = ()
    if draw(st.integers(0, 5)) == 0:
        names = st.sampled_from(
            [
                "kind",
                "spent",
                "grant",
                "started",
                "at",
                "by",
                "chain",
                "generation",
                "body",
                "body_b64",
                "trimmed",
            ]
        )
        fields = tuple(draw(st.lists(st.tuples(names, JSON_TEXT), min_size=1, max_size=3)))
    return AnswerRecord(
        body,
        follows=draw(st.integers(0, 3)) != 0,
        spent=draw(st.integers(0, 3)) != 0,
        b64=draw(st.booleans()),
        fields=fields,
    )


@st.composite
def redis_hashes(draw: st.DrawFn) -> RedisHash:
    chain = draw(st.from_regex(r"[0-9a-f]{16}", fullmatch=True))
    generation = draw(st.integers(1, 10**6))
    answer = draw(answer_records()) if draw(st.booleans()) else None
    return RedisHash(draw(hash_fields(chain, generation)), chain, generation, answer)
