"""Property-based tests (hypothesis): the .env writer and the 401 handler, on any input.

Example counts are kept moderate so the whole suite stays quick on two shared cores.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import re
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from unittest import mock

import pytest
import requests
import requests_mock
from dotenv import dotenv_values
from dotenv.parser import parse_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlauth
from mlauth.endpoint import TokenEndpoint
from mlauth.stores.envfile import TOKEN_KEYS, render_update

# -- the .env writer ----------------------------------------------------------------------------

KEYS = st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True).filter(lambda k: k not in TOKEN_KEYS)
# Printable text with the characters that break hand-written writers: quotes, #, =, spaces.
VALUE_TEXT = st.text(alphabet=st.sampled_from("aZ9 _-=#'\"\\:/.+@$"), max_size=12)


@st.composite
def assignment(draw: st.DrawFn, key: st.SearchStrategy[str]) -> str:
    name = draw(key)
    value = draw(VALUE_TEXT)
    style = draw(st.sampled_from(["bare", "single", "double"]))
    if style == "single":
        value = value.replace("'", "").replace("\\", "")  # python-dotenv reads \' in '...'
        rendered = f"'{value}'"
    elif style == "double":
        rendered = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        rendered = "".join(c for c in value if c not in " #'\"\\")
    export = draw(st.sampled_from(["", "export "]))
    comment = draw(st.sampled_from(["", "  # a note", " #x"]))
    if style == "bare" and comment and not rendered:
        comment = ""
    return f"{export}{name}={rendered}{comment}"


LINE = st.one_of(
    assignment(KEYS),
    assignment(st.sampled_from(TOKEN_KEYS)),
    st.builds(lambda text: "# " + text, VALUE_TEXT),
    st.just(""),
)
TOKEN_VALUE = st.text(alphabet=st.sampled_from("aZ9-_ =#'\"\\."), min_size=1, max_size=16)


def parse(text: str) -> dict[str, str | None]:
    return dict(dotenv_values(stream=io.StringIO(text), interpolate=False))


TOKEN_LINE = re.compile(r"\s*(?:export\s+)?(?:" + "|".join(TOKEN_KEYS) + r")\s*=")


def kept_lines(text: str) -> list[str]:
    """Every line but the token keys' (comments, blanks, other keys), in order, as is.

    The generated values hold no newline, so each assignment is exactly one line.
    """
    return [line for line in text.splitlines() if not TOKEN_LINE.match(line)]


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(LINE, max_size=12),
    newline=st.sampled_from(["\n", "\r\n"]),
    updates=st.dictionaries(st.sampled_from(TOKEN_KEYS), TOKEN_VALUE, min_size=1),
)
def test_env_writer_keeps_everything_else_and_round_trips_token_values(
    lines: list[str], newline: str, updates: dict[str, str]
) -> None:
    text = newline.join(lines) + (newline if lines else "")
    assert all(not b.error for b in parse_stream(io.StringIO(text)))  # python-dotenv reads it
    after = render_update(text, dict(updates))
    before_values, after_values = parse(text), parse(after)
    # Every other key keeps its value; every token key reads back exactly as written.
    assert {k: v for k, v in after_values.items() if k not in updates} == {
        k: v for k, v in before_values.items() if k not in updates
    }
    for key, value in updates.items():
        assert after_values[key] == value
    # Comments, blank lines and other assignments are kept, byte for byte and in order.
    assert kept_lines(after) == kept_lines(text)
    if newline == "\r\n" and lines:  # an empty file has no line ending to keep
        assert after.count("\r\n") == after.count("\n")


# -- the 401 handler ----------------------------------------------------------------------------

API = "https://api.mercadolibre.com"
OTHER = "https://cdn.example.com"
TOKEN_URL = f"{API}/oauth/token"
STATUSES = st.sampled_from([200, 401, 401, 403, 500, 502, "redirect-api", "redirect-other"])
# What the token endpoint does with each POST, in order (then it answers normally):
# "ok"; a 5xx or a timeout before it processed the grant; "lost-timeout"/"lost-502": it
# rotated the token and the answer was lost (a read timeout, a 502 from a proxy after it).
TOKEN_OUTCOMES = st.sampled_from(["ok", "ok", 500, 503, "timeout", "lost-timeout", "lost-502"])


class ScriptedServer:
    """Answers API calls from per-caller scripts and the token endpoint like ML (single use)."""

    def __init__(self, scripts: list[list[object]], token_script: list[object]) -> None:
        self.scripts = [iter(script) for script in scripts]
        self.token_script = iter(token_script)
        self.lock = threading.Lock()
        self.sends: dict[str, int] = {}
        self.spent: list[str] = []  # every refresh token presented, in order
        self.delivered: set[str] = set()  # tokens whose successor reached the client
        self.resent_after_delivery: list[str] = []
        self.live_refresh = "TG-fake-refresh-0"
        self.issued: set[str] = set()
        self.counter = itertools.count(1)
        self.hops = itertools.count(1)
        self.leaks: list[str] = []

    def api(self, request: requests.PreparedRequest, context: object) -> str:
        url = urllib.parse.urlsplit(request.url)
        caller = int(url.path.split("/")[2])
        header = request.headers.get("Authorization", "")
        with self.lock:
            self.sends[url.path] = self.sends.get(url.path, 0) + 1
            if url.netloc != "api.mercadolibre.com" and header:
                self.leaks.append(f"{url.netloc} got {header}")
            if any(mark in str(request.url) for mark in ("access_token", "APP_USR", "TG-")):
                self.leaks.append(f"token in URL {request.url}")
            status = next(self.scripts[caller], 200)
            hop = next(self.hops)
        if status == "redirect-api":
            context.status_code = 302  # type: ignore[attr-defined]
            context.headers["Location"] = f"{API}/hop/{caller}/{hop}"  # type: ignore[attr-defined]
        elif status == "redirect-other":
            context.status_code = 302  # type: ignore[attr-defined]
            context.headers["Location"] = f"{OTHER}/hop/{caller}/{hop}"  # type: ignore[attr-defined]
        else:
            context.status_code = status  # type: ignore[attr-defined]
        return "{}"

    def token(self, request: requests.PreparedRequest, context: object) -> dict[str, object]:
        form = urllib.parse.parse_qs(str(request.body))
        presented = form["refresh_token"][0]
        with self.lock:
            self.spent.append(presented)
            if presented in self.delivered:  # the client had its successor: a double spend
                self.resent_after_delivery.append(presented)
            outcome = next(self.token_script, "ok")
            if outcome == "timeout":
                raise requests.ReadTimeout("scripted: no answer, grant not processed")
            if isinstance(outcome, int):
                context.status_code = outcome  # type: ignore[attr-defined]
                return {"error": "server_error", "status": outcome}
            if presented != self.live_refresh:
                context.status_code = 400  # type: ignore[attr-defined]
                return {"error": "invalid_grant", "status": 400}
            n = next(self.counter)
            self.live_refresh = f"TG-fake-refresh-{n}"
            if outcome == "lost-timeout":
                raise requests.ReadTimeout("scripted: rotated, answer lost")
            if outcome == "lost-502":
                context.status_code = 502  # type: ignore[attr-defined]
                return {"error": "bad_gateway", "status": 502}
            self.delivered.add(presented)
        return {
            "access_token": f"APP_USR-fake-access-{n}",
            "token_type": "bearer",
            "expires_in": 21600,
            "refresh_token": f"TG-fake-refresh-{n}",
        }


@pytest.fixture
def env_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prop")


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    scripts=st.lists(st.lists(STATUSES, max_size=4), min_size=1, max_size=4),
    hosts=st.lists(st.sampled_from([API, API, OTHER]), min_size=4, max_size=4),
    token_script=st.lists(TOKEN_OUTCOMES, max_size=4),
    max_attempts=st.integers(min_value=1, max_value=3),
    min_token_age=st.sampled_from([0.0, 10.0]),
    expired=st.booleans(),
)
def test_401_handler_never_sends_twice_never_leaks_never_spends_twice(
    env_dir: Path,
    scripts: list[list[object]],
    hosts: list[str],
    token_script: list[object],
    max_attempts: int,
    min_token_age: float,
    expired: bool,
) -> None:
    # Each example its own folder: the journal and marker beside a shared .env would carry
    # one example's leftovers (an open intent, a re-authorization) into the next.
    with tempfile.TemporaryDirectory(dir=env_dir) as folder:
        env = Path(folder) / ".env"
        env.write_text(
            "ML_CLIENT_ID=1234\nML_CLIENT_SECRET=fake-secret\n"
            "ML_ACCESS_TOKEN=APP_USR-fake-access-0\nML_REFRESH_TOKEN=TG-fake-refresh-0\n"
            # An expired token: every caller needs the refresh at once, before any 401.
            + (f"ML_TOKEN_EXPIRES_AT={time.time() - 5:.0f}\n" if expired else "")
        )
        run_401_example(env, scripts, hosts, token_script, max_attempts, min_token_age)


def run_401_example(
    env: Path,
    scripts: list[list[object]],
    hosts: list[str],
    token_script: list[object],
    max_attempts: int,
    min_token_age: float,
) -> None:
    server = ScriptedServer(scripts, token_script)
    adapter = requests_mock.Adapter()
    # requests-mock tries the latest registration first: the token endpoint goes last.
    adapter.register_uri(requests_mock.ANY, requests_mock.ANY, text=server.api)
    adapter.register_uri("POST", TOKEN_URL, json=server.token)
    token_session = requests.Session()
    token_session.mount("https://", adapter)
    # The token endpoint's private session, built in the constructor, is this one.
    with mock.patch.object(TokenEndpoint, "_new_session", return_value=token_session):
        auth = mlauth.MLAuth.from_env(
            env, min_token_age=min_token_age, backoff=0.0, max_attempts=max_attempts
        )
    barrier = threading.Barrier(len(scripts))

    def caller(index: int) -> None:
        with requests.Session() as session:
            session.mount("https://", adapter)
            session.auth = auth
            barrier.wait()
            # A refused refresh is a fine outcome; the properties are what matter.
            with contextlib.suppress(mlauth.MLAuthError):
                session.get(f"{hosts[index]}/r/{index}", timeout=5)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(scripts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert max(server.sends.values(), default=0) <= 2, (
        server.sends
    )  # one send and at most one re-send
    assert server.leaks == []
    # Never spent twice: no token is presented again once its successor reached us, and a
    # token whose answer was lost is presented in at most one retry series, not one per
    # caller (the threads behind a failed refresh get its error).
    assert server.resent_after_delivery == [], server.spent
    counts = collections.Counter(server.spent)
    assert max(counts.values(), default=0) <= max_attempts, server.spent
