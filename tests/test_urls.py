"""Every URL is judged as the client that sends it will read it.

The token URL and the login page's URL are refused when ``urllib.parse`` and requests (urllib3)
could read them as two hosts, or hold anything a parser may read differently; the per-request
host rules give the token only where requests and httpx really connect. The differential tests
take the address each client hands to its socket, after every layer has parsed the URL its own
way, and compare it with what mlauth decided.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

import mlauth
import mlauth.urls
from mlauth.cli.login import authorization_base
from mlauth.config import DEFAULT_TOKEN_URL, check_token_url
from mlauth.hosts import HostRules
from mlauth.httpx import HttpxAuth
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.cli import mlauth_cli as run_cli
from tests.support.destinations import Destination, HttpxRecorder, RequestsRecorder, listener
from tests.support.fake_tokens import env_text


def set_key(env: Path, key: str, value: str) -> None:
    lines = env.read_text().splitlines(keepends=True)
    env.write_text(
        "".join(f"{key}={value}\n" if line.startswith(f"{key}=") else line for line in lines)
    )


# -- the attack: a backslash splits the checked host from the one requests connects to ----


def test_a_backslash_in_the_token_url_never_sends_the_secret_to_the_host_requests_reads(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    # urlsplit reads "127.0.0.2:PORT\" as a user name and 127.0.0.1 (loopback: plain http is
    # allowed) as the host; requests reads the backslash as "/" and connects to 127.0.0.2.
    before = read_env_file(fake_ml_env)
    with listener("127.0.0.2") as evil:
        set_key(fake_ml_env, "ML_TOKEN_URL", f"http://127.0.0.2:{evil.port}\\@{fake_ml.host}/t")
        done = run_cli("refresh", "--env", str(fake_ml_env))
        received, connections = evil.received, evil.connections
    assert fake_ml.client_secret.encode() not in received
    assert str(before["ML_REFRESH_TOKEN"]).encode() not in received
    assert connections == 0
    assert done.returncode == 1, done.stderr
    assert "ML_TOKEN_URL" in done.stderr and "backslash" in done.stderr
    assert "Traceback" not in done.stderr
    assert fake_ml.stats()["refreshes"] == 0
    assert read_env_file(fake_ml_env)["ML_REFRESH_TOKEN"] == before["ML_REFRESH_TOKEN"]


def test_a_backslash_in_the_auth_url_never_sends_the_seller_elsewhere(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    with listener("127.0.0.2") as evil:
        auth_url = f"http://127.0.0.2:{evil.port}\\@{fake_ml.host}"
        done = run_cli(
            "login", "--env", str(fake_ml_env), "--redirect-uri", "https://example.test/cb",
            "--auth-url", auth_url,
        )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""  # no URL printed: the seller is sent nowhere
    assert "--auth-url" in done.stderr and "backslash" in done.stderr


# -- the token URL and the login page: refused with the key and the fix --------------------

# (URL, words the error must hold)
REFUSED = [
    ("http://evil.example\\@127.0.0.1/oauth/token", "backslash"),
    ("https://api.mercadolibre.com\\@evil.example/oauth/token", "backslash"),
    ("https://evil.example@api.mercadolibre.com/oauth/token", "user info"),
    ("https://api.mercadolibre.com@evil.example/oauth/token", "user info"),
    ("http://user:pw@127.0.0.1/oauth/token", "user info"),
    ("https://api.mercadolibre.com/oauth/\ttoken", "white space"),
    ("https://api.merca\tdolibre.com/oauth/token", "white space"),
    ("https://api.mercadolibre.com\r\n.evil.example/oauth/token", "white space"),
    ("https://api.mercadolibre.com /oauth/token", "white space"),
    ("https://api.mercadolibre.com\x00.evil.example/oauth/token", "control character"),
    ("https://api.mercadolibre.com\x7f/oauth/token", "control character"),
    ("https://\u0430pi.mercadolibre.com/oauth/token", "non-ASCII"),  # Cyrillic a
    ("https://api.mercadolibre.com\uff0fevil.example/oauth/token", "non-ASCII"),
    ("https://api.mercadolibre.com/\u00f1", "non-ASCII"),
    ("https://api%2emercadolibre.com/oauth/token", "percent-encoded"),
    ("http://127.0.0.1%2eevil.example/oauth/token", "percent-encoded"),
    ("http://[::1%25eth0]:8080/oauth/token", "percent-encoded"),
    ("https://api.mercadolibre.com/oauth/token?x=1", "query string"),
    ("https://api.mercadolibre.com?@evil.example/oauth/token", "query string"),
    ("https://api.mercadolibre.com/oauth/token#frag", "fragment"),
    ("https://evil.example#@api.mercadolibre.com/oauth/token", "fragment"),
    ("https://api.mercadolibre.com:/oauth/token", "bad port"),
    ("https://api.mercadolibre.com:0443/oauth/token", "bad port"),
    ("https://api.mercadolibre.com:0/oauth/token", "bad port"),
    ("https://api.mercadolibre.com:99999/oauth/token", "bad port"),
    ("https://api.mercadolibre.com:443:443/oauth/token", "bad port"),
    ("http://[::1]x/oauth/token", "bad port"),
    ("http://127.1/oauth/token", "not an IPv4 address"),
    ("http://0x7f.0.0.1/oauth/token", "not an IPv4 address"),
    ("https://api.mercadolibre.com./oauth/token", "ends with a '.'"),
    ("https://*.mercadolibre.com/oauth/token", "wildcard"),
    ("https://api_.mercadolibre.com-/oauth/token", "not a host name"),
    ("http://[v1.x]/oauth/token", "not an IPv6 address"),
    ("https:///oauth/token", "no host"),
    ("https:api.mercadolibre.com/oauth/token", "not a URL"),
    ("//api.mercadolibre.com/oauth/token", "not a URL"),
    ("ftp://api.mercadolibre.com/oauth/token", "not a URL"),
    ("http://api.mercadolibre.com/oauth/token", "plain http"),
    ("http://127.0.0.1.evil.example/oauth/token", "plain http"),
    ("http://localhost.evil.example/oauth/token", "plain http"),
    ("http://[::ffff:127.0.0.1]/oauth/token", "plain http"),
    ("http://[2001:db8::1]/oauth/token", "plain http"),
]

ACCEPTED = [
    ("https://api.mercadolibre.com/oauth/token", ("https", "api.mercadolibre.com", 443)),
    ("https://api.mercadopago.com/oauth/token", ("https", "api.mercadopago.com", 443)),
    ("HTTPS://API.MercadoLibre.com:443/oauth/token", ("https", "api.mercadolibre.com", 443)),
    ("https://ml-proxy.internal:8443/oauth/token", ("https", "ml-proxy.internal", 8443)),
    ("https://fake_ml/oauth/token", ("https", "fake_ml", 443)),  # a Docker service name
    ("http://127.0.0.1:5000/oauth/token", ("http", "127.0.0.1", 5000)),
    ("http://127.8.9.10/oauth/token", ("http", "127.8.9.10", 80)),
    ("http://localhost:8080/oauth/token", ("http", "localhost", 8080)),
    ("http://[::1]:8080/oauth/token", ("http", "::1", 8080)),
    ("https://[2001:db8::1]/oauth/token", ("https", "2001:db8::1", 443)),
    ("  https://api.mercadolibre.com/oauth/token\n", ("https", "api.mercadolibre.com", 443)),
]


@pytest.mark.parametrize(("url", "words"), REFUSED)
def test_a_token_url_parsers_may_read_apart_is_refused_naming_the_key(
    tmp_path: Path, url: str, words: str
) -> None:
    store = mlauth.EnvFileStore(tmp_path / ".env")
    with pytest.raises(mlauth.ConfigError, match=r"^token_url: ") as caught:
        mlauth.MLAuth("1234", "fake-secret", store, token_url=url)
    assert words in str(caught.value)
    assert DEFAULT_TOKEN_URL in str(caught.value) or "use https" in str(caught.value)


@pytest.mark.parametrize(("url", "words"), REFUSED)
def test_a_login_page_url_parsers_may_read_apart_is_refused(url: str, words: str) -> None:
    with pytest.raises(mlauth.ConfigError, match="--auth-url, ML_AUTH_URL") as caught:
        authorization_base("MLA", url)
    assert words in str(caught.value)
    assert "https://auth.mercadolibre.com.ar" in str(caught.value) or words == "plain http"


def test_the_token_url_error_names_the_env_file_and_masks_a_password(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "ML_CLIENT_ID=1234\nML_CLIENT_SECRET=fake-secret\nML_REFRESH_TOKEN=TG-fake-1\n"
        "ML_TOKEN_URL=https://user:hunter2-fake@api.mercadolibre.com/oauth/token\n"
    )
    with pytest.raises(mlauth.ConfigError) as caught:
        mlauth.MLAuth.from_env(env)
    assert f"{env}: ML_TOKEN_URL" in str(caught.value)
    assert "user info" in str(caught.value)
    assert "hunter2-fake" not in str(caught.value)


@pytest.mark.parametrize(("url", "target"), ACCEPTED)
def test_plain_token_urls_are_accepted_as_written(
    url: str, target: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check_token_url(url, "token_url") == url.strip()
    assert mlauth.urls.configured_target(url.strip(), "e.g.") == target
    # ... and requests connects exactly there.
    sent = RequestsRecorder(monkeypatch).send(url.strip(), None)
    assert sent is not None
    assert (sent.destination.scheme, sent.destination.address, sent.destination.port) == target


def test_a_url_the_parsers_read_apart_is_refused_whatever_the_other_checks_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last check compares urllib3's and requests' readings with urlsplit's: a parser
    release that reads a URL the other checks pass differently still cannot send it away."""
    real = mlauth.urls.parse_url

    def elsewhere(url: str) -> object:
        parsed = real(url)
        return parsed._replace(host="evil.example")

    monkeypatch.setattr(mlauth.urls, "parse_url", elsewhere)
    with pytest.raises(mlauth.ConfigError, match=r"urllib3 reads host 'evil\.example'"):
        check_token_url("https://api.mercadolibre.com/oauth/token", "token_url")


@settings(max_examples=400, deadline=None)
@given(
    start=st.sampled_from(["https://", "http://", "HTTPS://", "http:\\\\", "https:/"]),
    pieces=st.lists(
        st.sampled_from(
            [
                "127.0.0.1", "127.0.0.2", "localhost", "[::1]", "evil.example",
                "api.mercadolibre.com", ":8080", ":", "@", "\\", "/", "?", "#", "%2e", "%40",
                "%25", "\t", "\n", " ", ".", "\u3002", "\uff0f", "\u0430", "[", "]", ";",
            ]
        ),
        max_size=7,
    ),
)  # fmt: skip
def test_an_accepted_token_url_is_where_requests_connects(start: str, pieces: list[str]) -> None:
    url = start + "".join(pieces)
    try:
        target = mlauth.urls.configured_target(url, "e.g.")
    except ValueError:
        return  # refused: nothing is ever sent to it
    with pytest.MonkeyPatch.context() as patch:
        sent = RequestsRecorder(patch).send(url, None)
    assert sent is not None, url
    expected = Destination(target.scheme, target.host, target.port)
    assert (sent.destination.scheme, sent.destination.address, sent.destination.port) == (
        expected.scheme,
        expected.address,
        expected.port,
    ), url
    assert target.scheme == "https" or mlauth.urls.is_loopback(target.host)


# -- the per-request host rules: the token only where the client really connects -----------

RULES = [
    "api.mercadolibre.com",
    "auth.mercadolibre.com:8443",
    "127.0.0.1",
    "localhost",
    "[::1]:8080",
    "[2001:db8::1]",
]
ANY_PORT = {"api.mercadolibre.com", "127.0.0.1", "localhost", "2001:db8::1"}
WITH_PORT = {("auth.mercadolibre.com", 8443), ("::1", 8080)}


def allowed(where: Destination) -> bool:
    """The rules above, written out independently of HostRules."""
    loopback = where.address in ("localhost", "::1") or where.address.startswith("127.")
    if where.scheme != "https" and not loopback:
        return False
    return where.address in ANY_PORT or (where.address, where.port) in WITH_PORT


# Each is a way a checked host and a connected host have come apart in some client.
TRICKY = [
    "https://api.mercadolibre.com/users/me",
    "https://API.MercadoLibre.COM:443/x",
    "https://api.mercadolibre.com:/x",
    "https://api.mercadolibre.com:0443/x",
    "http://api.mercadolibre.com/x",
    "https://api.mercadolibre.com./x",
    "https://api.mercadolibre.com.evil.example/x",
    "https://\u0430pi.mercadolibre.com/x",
    "https://evil@api.mercadolibre.com/x",
    "https://api.mercadolibre.com@evil.example/x",
    "https://api.mercadolibre.com:443@evil.example/x",
    "https://api.mercadolibre.com%2F@evil.example/x",
    "https://api.mercadolibre.com%40evil.example/x",
    "https://user@evil.example@api.mercadolibre.com/x",
    "https://evil.example;@api.mercadolibre.com/x",
    "https://evil.example\\@api.mercadolibre.com/x",
    "https://evil.example\\.api.mercadolibre.com/x",
    "https://api.mercadolibre.com\\@evil.example/x",
    "https://api.mercadolibre.com\\.evil.example/x",
    "http://evil.example\\@127.0.0.1/x",
    "https://evil.example/?u=https://api.mercadolibre.com/",
    "https://evil.example#@api.mercadolibre.com/x",
    "https://evil.example?@api.mercadolibre.com/x",
    "https://api%2emercadolibre.com/x",
    "https://api.mercadolibre.com%2eevil.example/x",
    "https://api.mercadolibre.com%00.evil.example/x",
    " https://api.mercadolibre.com/x",
    "\x00https://api.mercadolibre.com/x",
    "ht\ttps://api.mercadolibre.com/x",
    "https://api.merca\tdolibre.com/x",
    "https://api.mercadolibre.com\n.evil.example/x",
    "https://api.mercadolibre.com\uff0fevil.example/x",
    "https://api.mercadolibre.com\uff03@evil.example/x",
    "https://api.mercadolibre.com\u3002evil.example/x",
    "https://\uff41pi.mercadolibre.com/x",
    "https://API.MERCADOLIBRE.CO\u212a/x",
    "https://auth.mercadolibre.com:8443/x",
    "https://auth.mercadolibre.com:08443/x",
    "https://auth.mercadolibre.com/x",
    "https://auth.mercadolibre.com:99999/x",
    "http://127.0.0.1:5000/x",
    "http://localhost./x",
    "http://127.1/x",
    "http://0x7f.0.0.1/x",
    "http://127.0.0.1.evil.example/x",
    "http://[::1]:8080/x",
    "http://[::1]/x",
    "http://[::1%25eth0]:8080/x",
    "http://[::1%eth0]:8080/x",
    "https://[2001:DB8::1]:1/x",
    "http://[2001:db8::1]/x",
    "http://[::ffff:127.0.0.1]:8080/x",
    "wss://api.mercadolibre.com/x",
]
# Those that requests sends to an allowed host and that must keep the token (the table is
# also a guard against refusing too much). requests re-encodes a backslash as %5C in the path
# and decodes %2e in a host before the auth sees the URL: those go to api.mercadolibre.com.
GET_THE_TOKEN = {
    "https://api.mercadolibre.com\\@evil.example/x",
    "https://api.mercadolibre.com\\.evil.example/x",
    "https://api%2emercadolibre.com/x",
    "https://api.mercadolibre.com/users/me",
    "https://API.MercadoLibre.COM:443/x",
    "https://api.mercadolibre.com:/x",
    "https://api.mercadolibre.com:0443/x",
    "https://evil@api.mercadolibre.com/x",
    "https://user@evil.example@api.mercadolibre.com/x",
    "https://evil.example;@api.mercadolibre.com/x",
    "https://auth.mercadolibre.com:8443/x",
    "https://auth.mercadolibre.com:08443/x",
    "http://127.0.0.1:5000/x",
    "http://[::1]:8080/x",
    "https://[2001:DB8::1]:1/x",
    " https://api.mercadolibre.com/x",
}


@pytest.mark.parametrize("url", TRICKY)
def test_requests_carries_the_token_only_where_it_connects_to_an_allowed_host(
    env_file: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = mlauth.MLAuth.from_env(env_file, hosts=RULES)
    sent = RequestsRecorder(monkeypatch).send(url, auth)
    if sent is None:
        assert url not in GET_THE_TOKEN
        return
    if sent.authorization:
        assert allowed(sent.destination), sent
    assert sent.authorization is (url in GET_THE_TOKEN), sent


@pytest.mark.parametrize("url", TRICKY)
def test_allows_says_yes_only_for_the_host_urllib3_reads_and_requests_connects_to(
    env_file: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``allows()`` judges the prepared URL (what MLAuth gets); when it says yes, urllib3's
    ``parse_url`` of that URL and the socket requests opens name the same allowed host."""
    try:
        prepared = requests.Request("GET", url).prepare()
    except requests.RequestException:
        return  # never sent
    assert prepared.url is not None
    if not HostRules(RULES).allows(prepared.url):
        return
    parsed = parse_url(prepared.url)
    sent = RequestsRecorder(monkeypatch).send(url, None)
    assert sent is not None and allowed(sent.destination)
    read = Destination(parsed.scheme or "", (parsed.host or "").strip("[]"), parsed.port or 0)
    assert (read.scheme, read.address) == (sent.destination.scheme, sent.destination.address)
    assert read.port in (0, sent.destination.port)


@pytest.mark.parametrize("url", TRICKY)
def test_httpx_carries_the_token_only_where_it_connects_to_an_allowed_host(
    env_file: Path, url: str
) -> None:
    recorder = HttpxRecorder(HttpxAuth.from_env(env_file, hosts=RULES))
    sent = recorder.send(url)
    if sent is not None and sent.authorization:
        assert allowed(sent.destination), sent
    if url in PLAIN:
        assert sent is not None and sent.authorization, sent


# Plain URLs of allowed hosts: every client sends them with the token.
PLAIN = {
    "https://api.mercadolibre.com/users/me",
    "https://API.MercadoLibre.COM:443/x",
    "https://auth.mercadolibre.com:8443/x",
    "http://127.0.0.1:5000/x",
    "http://[::1]:8080/x",
    "https://[2001:DB8::1]:1/x",
}


PIECES = [
    "https://", "http://", "api.mercadolibre.com", "API.MercadoLibre.com", "127.0.0.1",
    "localhost", "[::1]", "[2001:db8::1]", "evil.example", "auth.mercadolibre.com", ":8443",
    ":8080", ":443", ":", "/", "?", "#", "@", "\\", "\t", "\n", " ", ".", "%2e", "%40", "%25",
    "%2F", ";", "\x00", "\u3002", "\uff0f", "\u0430", "\u212a", "[", "]",
]  # fmt: skip


@pytest.fixture(scope="module")
def shared_auths(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[mlauth.MLAuth, HttpxAuth]:
    """One MLAuth and one HttpxAuth for a whole hypothesis run."""
    env = tmp_path_factory.mktemp("urls") / ".env"
    env.write_text(env_text())
    env.chmod(0o600)
    return mlauth.MLAuth.from_env(env, hosts=RULES), HttpxAuth.from_env(env, hosts=RULES)


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from(["https://", "http://", "HTTPS://", " https://", "https:\t//"]),
    pieces=st.lists(st.sampled_from(PIECES), max_size=6),
)
def test_any_url_gets_the_token_only_where_each_client_connects_to_an_allowed_host(
    shared_auths: tuple[mlauth.MLAuth, HttpxAuth], start: str, pieces: list[str]
) -> None:
    url = start + "".join(pieces)
    requests_auth, httpx_auth = shared_auths
    with pytest.MonkeyPatch.context() as patch:
        by_requests = RequestsRecorder(patch).send(url, requests_auth)
    by_httpx = HttpxRecorder(httpx_auth).send(url)
    for sent in (by_requests, by_httpx):
        if sent is not None and sent.authorization:
            assert allowed(sent.destination), (url, sent)


@settings(max_examples=2000, deadline=None)
@given(
    start=st.sampled_from(["https://", "http://", "HTTPS://", " https://", "https:\t//"]),
    pieces=st.lists(st.sampled_from(PIECES), max_size=6),
)
def test_the_plain_origin_shortcut_agrees_with_urllib3s_reading(
    start: str, pieces: list[str]
) -> None:
    """The host check skips urllib3's parse for an origin of plain characters; wherever it
    does, urllib3 reads the same scheme, host and port as urlsplit."""
    url = start + "".join(pieces)
    target = mlauth.urls.split_target(url)
    if target is None or not mlauth.urls._PLAIN_ORIGIN.match(url):
        return
    assert mlauth.urls._parsed_alike(url, target), url
