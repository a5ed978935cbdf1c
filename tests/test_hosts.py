"""HostRules: which URLs may carry the token, and the per-origin cache in front of the check.

The cache must never change an answer: every tricky URL gets, from a warm cache, the answer a
fresh ``HostRules`` gives it uncached; and the cache stays bounded and free of credentials.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlauth.hosts import ALLOWED_PREFIXES_SIZE, ORIGIN_CACHE_SIZE, HostRules

RULES = [
    "api.mercadolibre.com",
    "auth.mercadolibre.com:8443",
    "127.0.0.1",
    "localhost",
    "[::1]:8080",
    "[2001:db8::1]",
]

# (url, whether it may carry the token)
TRICKY = [
    ("https://api.mercadolibre.com/users/me", True),
    ("https://api.mercadolibre.com", True),  # no path
    ("https://api.mercadolibre.com:443/x", True),  # explicit default port
    ("https://api.mercadolibre.com:/x", True),  # empty port: the default
    ("https://API.MercadoLibre.COM/x", True),  # host names are case-insensitive
    ("HTTPS://API.MERCADOLIBRE.COM:443/X", True),
    ("http://api.mercadolibre.com/x", False),  # plain http to a non-loopback host
    ("ftp://api.mercadolibre.com/x", False),
    ("wss://api.mercadolibre.com/x", False),
    ("https://api.mercadolibre.com./x", False),  # trailing dot: not the name allowed
    ("https://api.mercadolibre.com.evil.com/x", False),
    ("https://\u0430pi.mercadolibre.com/x", False),  # Cyrillic a
    # userinfo: the host is what follows the last @
    ("https://evil@api.mercadolibre.com/x", True),
    ("https://user:pw@api.mercadolibre.com/x", True),
    ("https://api.mercadolibre.com@evil.com/x", False),
    ("https://api.mercadolibre.com:443@evil.com/x", False),
    ("https://api.mercadolibre.com%2F@evil.com/x", False),
    # backslashes: requests and urllib3 read a backslash in the netloc as "/", so the first
    # would go to evil.com; urlsplit alone would have said api.mercadolibre.com
    ("https://evil.com\\@api.mercadolibre.com/x", False),
    ("https://evil.com\\.api.mercadolibre.com/x", False),
    ("https://api.mercadolibre.com\\@evil.com/x", False),
    ("https://api.mercadolibre.com\\.evil.com/x", False),
    ("https://api.mercadolibre.com/a\\b", True),  # in the path only
    # the allowed name elsewhere than in the host
    ("https://evil.com/?u=https://api.mercadolibre.com/", False),
    ("https://evil.com#@api.mercadolibre.com/x", False),
    ("https://evil.com?@api.mercadolibre.com/x", False),
    ("https://api.mercadolibre.com?x=1", True),
    ("https://api.mercadolibre.com#frag", True),
    # not a URL with a host
    ("https:api.mercadolibre.com/x", False),
    ("https:/api.mercadolibre.com/x", False),
    ("//api.mercadolibre.com/x", False),
    ("api.mercadolibre.com/x", False),
    ("", False),
    # what urlsplit strips (leading C0 and spaces) or deletes (tabs, line breaks): requests
    # strips leading white space too, but refuses the rest (InvalidSchema, InvalidURL), and
    # urllib3 cannot parse them, so the two readers disagree: no token
    (" https://api.mercadolibre.com/x", True),
    ("\x00https://api.mercadolibre.com/x", False),
    ("https://api.mercadolibre.com\t/x", False),
    ("https://api.merca\tdolibre.com/x", False),
    ("ht\ttps://api.mercadolibre.com/x", False),
    ("https://api.mercadolibre.com\n.evil.com/x", False),
    ("https:\t//evil.com/?u=https://api.mercadolibre.com/", False),
    # characters that NFKC-normalize to URL delimiters
    ("https://api.mercadolibre.com\uff0fevil.com/x", False),
    ("https://api.mercadolibre.com\uff03@evil.com/x", False),
    # ports
    ("https://auth.mercadolibre.com:8443/x", True),
    ("https://auth.mercadolibre.com:08443/x", True),
    ("https://auth.mercadolibre.com/x", False),
    ("https://auth.mercadolibre.com:443/x", False),
    ("https://auth.mercadolibre.com:99999/x", False),
    ("https://auth.mercadolibre.com:x/x", False),
    ("https://api.mercadolibre.com:443:443/x", False),
    # loopback: plain http allowed
    ("http://127.0.0.1:5000/x", True),
    ("http://localhost/x", True),
    ("http://LOCALHOST/x", True),
    ("https://localhost:1/x", True),
    ("http://localhost.:80/x", False),
    ("http://127.0.0.1.evil.com/", False),
    ("http://127.1/x", False),
    ("http://0x7f.0.0.1/x", False),
    # IPv6 literals
    ("http://[::1]:8080/x", True),
    ("http://[::1]/x", False),  # port 80, not 8080
    ("http://[::1/x", False),
    ("http://::1]/x", False),
    ("https://[2001:db8::1]/x", True),
    ("https://[2001:DB8::1]:1/x", True),
    ("http://[2001:db8::1]/x", False),  # not loopback: https only
    ("http://[::ffff:127.0.0.1]:8080/x", False),
    ("https://[v1.x]/x", False),
]
URLS = [url for url, _ in TRICKY]


@pytest.mark.parametrize(("url", "expected"), TRICKY)
def test_the_full_check_answers_each_tricky_url(url: str, expected: bool) -> None:
    assert HostRules(RULES).allows_uncached(url) is expected
    assert HostRules(RULES).allows(url) is expected  # a cold cache


def test_a_warm_cache_gives_every_url_the_uncached_answer() -> None:
    rules = HostRules(RULES)
    for urls in (URLS, URLS[::-1], URLS):  # twice from the cache, in both orders
        for url in urls:
            assert rules.allows(url) is HostRules(RULES).allows_uncached(url), url


def test_an_origin_is_decided_once_and_then_answered_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rules = HostRules(RULES)
    assert rules.allows("https://api.mercadolibre.com/users/me")
    assert not rules.allows("https://http2.mlstatic.com/a.jpg")

    def full_check(url: str | None) -> bool:
        raise AssertionError(f"{url} was checked again")

    monkeypatch.setattr(rules, "allows_uncached", full_check)
    assert rules.allows("https://api.mercadolibre.com/items/MLA1?x=1")
    assert not rules.allows("https://http2.mlstatic.com/b.jpg")


@pytest.mark.parametrize(
    "url",
    [
        "https://user:secret-pw@api.mercadolibre.com/x",  # userinfo: maybe a password
        "https://api.mercadolibre.com?@evil.com/x",
        "https://api.mercadolibre.com#@evil.com/x",
        " https://api.mercadolibre.com/x",
        "https://api.mercadolibre.com\t/x",
        "https://" + "a" * 400 + ".example/x",
    ],
)
def test_origins_that_are_not_cached(url: str) -> None:
    rules = HostRules(RULES)
    assert rules.allows(url) is rules.allows_uncached(url)
    assert rules._seen == {}


def test_the_cache_stays_bounded_and_keeps_answering() -> None:
    rules = HostRules(RULES)
    for n in range(3 * ORIGIN_CACHE_SIZE + 7):
        assert not rules.allows(f"https://host{n}.example/x")
        assert rules.allows(f"http://127.0.0.1:{1000 + n}/x")  # loopback: any port
        assert len(rules._seen) <= ORIGIN_CACHE_SIZE
        assert len(rules._allowed_prefixes) <= ALLOWED_PREFIXES_SIZE
        if n % 50 == 0:
            assert rules.allows("https://api.mercadolibre.com/users/me")
    assert rules.allows("https://api.mercadolibre.com/users/me")
    assert not rules.allows("http://api.mercadolibre.com/users/me")
    assert not rules.allows("https://api.mercadolibre.com.evil.com/users/me")
    assert len(rules._seen) <= ORIGIN_CACHE_SIZE


def test_allowed_origins_are_kept_with_the_slash_that_ends_them() -> None:
    rules = HostRules(RULES)
    assert rules.allows("https://api.mercadolibre.com/users/me")
    assert rules.allows("https://api.mercadolibre.com")  # no path: the same origin
    assert rules._allowed_prefixes == ("https://api.mercadolibre.com/",)
    for url in (
        "https://api.mercadolibre.com.evil.com/x",
        "https://api.mercadolibre.com:443@evil.com/x",
        "https://api.mercadolibre.com@evil.com/x",
        "https://api.mercadolibre.com\\@evil.com/x",
    ):
        assert not rules.allows(url), url


def test_non_str_urls_take_the_full_check() -> None:
    rules = HostRules(RULES)
    assert not rules.allows(None)
    assert not rules.allows(b"https://api.mercadolibre.com/x")  # type: ignore[arg-type]

    class Url(str):
        pass

    assert rules.allows(Url("https://api.mercadolibre.com/x"))
    assert rules._seen == {}


# Pieces that the tricky URLs above are made of; hypothesis strings them together so that
# many URLs share a prefix with a different ending, on one HostRules whose cache fills up.
PIECES = [
    "https",
    "http",
    "HTTPS",
    "ftp",
    "://",
    ":",
    "/",
    "//",
    "?",
    "#",
    "@",
    "\\",
    "\t",
    "\n",
    " ",
    "[",
    "]",
    "::1",
    "2001:db8::1",
    "127.0.0.1",
    "localhost",
    "api.mercadolibre.com",
    "API.MercadoLibre.com",
    "auth.mercadolibre.com",
    ".",
    "evil.com",
    ":443",
    ":8443",
    ":8080",
    ":99999",
    ":x",
    "%2F",
    "\uff0f",
    "\u2100",
]
SHARED = HostRules(RULES)


@settings(max_examples=1500, deadline=None)
@given(
    start=st.sampled_from(["https://", "http://", "HTTPS://", "", " https://", "https:\t//"]),
    pieces=st.lists(st.sampled_from(PIECES), max_size=8),
)
def test_any_url_gets_the_uncached_answer_from_a_shared_cache(
    start: str, pieces: list[str]
) -> None:
    url = start + "".join(pieces)
    expected = HostRules(RULES).allows_uncached(url)
    assert SHARED.allows(url) is expected
    assert SHARED.allows(url) is expected


def test_parsed_urls_get_the_answer_of_the_host_httpx_connects_to() -> None:
    """httpx hands the auth a parsed URL; the rules judge the host it will connect to, which
    is the answer the full check gives that host's plain origin. Cached, twice over."""
    rules = HostRules(RULES)
    checked = 0
    for url in URLS * 2:
        try:
            parsed = httpx.URL(url)
            host = parsed.raw_host.decode("ascii")
        except (httpx.InvalidURL, UnicodeError):
            continue  # httpx refuses to send it at all
        if not host:
            continue
        shown = f"[{host}]" if ":" in host else host
        origin = f"{parsed.scheme}://{shown}" + (f":{parsed.port}" if parsed.port else "") + "/"
        expected = HostRules(RULES).allows_uncached(origin)
        assert rules.allows_parts(parsed.scheme, host, parsed.port) is expected, url
        checked += 1
    assert checked > len(URLS)  # most of the table parses
