"""Reading a URL as the client that sends it will: where the bytes go, or no answer at all.

``urllib.parse`` and urllib3 (requests' parser) read some URLs as two different hosts:
``http://evil.example\\@127.0.0.1/`` is user ``evil.example\\`` at 127.0.0.1 for the first,
and host evil.example with path ``/\\@127.0.0.1/`` for the second (and for browsers). A check
made with one parser and a connection made with the other send the secret elsewhere. So a URL
is accepted only where every reader agrees: :func:`sent_target` for the URLs of requests that
may carry the token (judged on every new origin), :func:`configured_target` for the URLs mlauth
itself sends the client secret to or sends the seller to (the token URL, the login page), where
anything unusual is refused outright since a configured URL has no reason to hold it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit

import requests
from urllib3.util import parse_url

__all__ = [
    "DEFAULT_PORTS",
    "Target",
    "configured_target",
    "host_problem",
    "is_loopback",
    "sent_target",
    "split_target",
    "urllib3_agrees",
]

DEFAULT_PORTS = {"https": 443, "http": 80}
LOOPBACK = "localhost, 127.0.0.0/8 or [::1]"

# One DNS label, lower-case. "_" is not valid in host names but is in Docker service names,
# and no parser reads it differently.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
# A last label that makes the whole name an IPv4 address to getaddrinfo and to WHATWG URL
# parsers (``127.1``, ``0x7f.1``): such a name must be written as a plain dotted quad.
_NUMERIC = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")


_IPV6_LOOPBACK = ipaddress.IPv6Address("::1")


class Target(NamedTuple):
    """Where a request goes: lower-case scheme, lower-case host (IPv6 without brackets), and
    the port, the scheme's default filled in."""

    scheme: str
    host: str
    port: int


def is_loopback(host: str) -> bool:
    """``localhost``, an address in 127.0.0.0/8, or ``::1`` (without a zone id)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        # Not ::ffff:127.0.0.1 (Python 3.13 calls it loopback, 3.11 does not), nor a zone id.
        return address.scope_id is None and address == _IPV6_LOOPBACK
    return address.is_loopback


def host_problem(name: str, *, bracketed: bool = False) -> str | None:
    """Why ``name`` (lower-case) is not a host every parser and resolver reads alike; None if
    it is one. ``bracketed``: it was written in ``[...]`` (an IPv6 literal)."""
    if bracketed:
        try:
            address = ipaddress.IPv6Address(name)
        except ValueError:
            return "is not an IPv6 address"
        if address.scope_id is not None:
            return "has a zone id (%...), which parsers read differently; leave it out"
        return None
    if not name:
        return "is empty"
    if not name.isascii():
        return "is not ASCII; write an international name in its IDNA form (xn--...)"
    labels = name.split(".")
    if _NUMERIC.match(labels[-1]):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return "is not an IPv4 address; write it as four decimal numbers, e.g. 127.0.0.1"
        return None
    if name.endswith("."):
        return "ends with a '.'; leave it out"
    if "*" in name:
        return "is a wildcard, which is not supported; list each host"
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return "is not a host name: only letters, digits and '-', with '.' between labels"
    return None


def _bare(host: str | None) -> str | None:
    """urllib3 keeps the brackets of an IPv6 host; urlsplit drops them."""
    if host and host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def sent_target(url: str) -> Target | None:
    """Where requests sends a request for ``url``, if ``urlsplit`` and urllib3's
    ``parse_url`` read the same scheme, host and port; None if they do not, or if it is no
    http(s) URL with a host.

    requests parses a new URL with ``parse_url`` (``PreparedRequest.prepare_url``), and its
    adapter picks the connection from ``urlparse`` of the result; a redirect's URL reaches the
    adapter without ``parse_url``. A URL both read alike goes where either says.
    """
    target = split_target(url)
    return target if target is not None and urllib3_agrees(url, target) else None


def split_target(url: str) -> Target | None:
    """``urlsplit``'s reading of an http(s) URL, or None (no host, another scheme, a bad
    port). A backslash in the authority gives None: browsers, WHATWG parsers and urllib3 read
    it as ``/``, so the URL names two hosts to two readers.

    Half of :func:`sent_target`, for a caller that can refuse on it alone and so skip
    :func:`urllib3_agrees`, the slower half (several microseconds).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme
    if host is None or scheme not in DEFAULT_PORTS or "\\" in parts.netloc:
        return None
    return Target(scheme, host, port or DEFAULT_PORTS[scheme])


# An origin both parsers read alike, character for character: a lower-case scheme and a
# host of letters, digits, dots and hyphens, an all-digit port, ended by the path, query,
# fragment or the end. Nothing in it is dropped, decoded or re-encoded by either, and both
# end the authority at the same character; parse_url (several microseconds) is not needed.
_PLAIN_ORIGIN = re.compile(r"https?://[a-z0-9.-]+(?::[0-9]{1,5})?(?=[/?#]|\Z)")


def urllib3_agrees(url: str, target: Target) -> bool:
    """Whether urllib3's ``parse_url`` reads ``url`` as ``target`` (:func:`split_target`)."""
    if _PLAIN_ORIGIN.match(url):
        return True  # what requests prepares for an ordinary host: no parse needed
    return _parsed_alike(url, target)


def _parsed_alike(url: str, target: Target) -> bool:
    try:
        other = parse_url(url.lstrip())  # requests strips leading white space first
    except ValueError:  # LocationParseError
        return False
    port = other.port or DEFAULT_PORTS.get(other.scheme or "")
    return (other.scheme, _bare(other.host), port) == target


def _first_odd_character(url: str) -> str | None:
    for position, char in enumerate(url):
        if char.isspace():
            return f"white space at position {position}"
        if not char.isprintable():
            return f"a control character ({char!r}) at position {position}"
        if not char.isascii():
            return (
                f"a non-ASCII character ({char!r}) at position {position}; write a host name "
                "in its IDNA form (xn--...), a path percent-encoded"
            )
    return None


def _authority(scheme: str, netloc: str, example: str) -> tuple[str, int]:
    """(host, port) of an authority that has no user info and no percent sign."""
    if netloc.startswith("["):
        name, _, rest = netloc[1:].partition("]")
        problem = host_problem(name, bracketed=True)
        port_text = rest[1:] if rest.startswith(":") else None if not rest else "?"
    else:
        name, colon, port_text_or_empty = netloc.partition(":")
        problem = host_problem(name)
        port_text = port_text_or_empty if colon else None
    if problem:
        raise ValueError(f"has a bad host name: {name!r} {problem}; for example {example}")
    port = DEFAULT_PORTS[scheme]
    if port_text is not None:
        if not port_text.isdigit() or port_text.startswith("0") or int(port_text) > 65535:
            raise ValueError(
                f"has a bad port ({port_text!r}): give a number from 1 to 65535 without "
                f"leading zeros, or no port at all; for example {example}"
            )
        port = int(port_text)
    return name, port


def configured_target(url: str, example: str) -> Target:
    """Where requests will send the client secret (the token URL) or the browser will send
    the seller (the login page), for a URL with nothing that parsers read differently.

    Raises ValueError with the problem and the fix (``example`` is a well-formed URL to show).
    Refused: anything but printable ASCII (white space, control characters, non-ASCII),
    backslashes, user info, percent signs in the authority, a query or a fragment, a host that
    is not a plain name or address (IPv6 zone ids, ``127.1``), a port with leading zeros or
    out of range, a URL that ``urlsplit``, urllib3 and requests' own preparation do not all
    read as the same scheme, host and port, and plain http to a host that is not loopback.
    """
    if not url.lower().startswith(("https://", "http://")):
        raise ValueError(f"is not a URL (http:// or https://...); for example {example}")
    odd = _first_odd_character(url)
    if odd is not None:
        raise ValueError(f"contains {odd}; for example {example}")
    if "\\" in url:
        raise ValueError(
            "contains a backslash, which urllib.parse reads as part of a user name and "
            "requests and browsers as '/': the URL names two hosts; write it without one, "
            f"e.g. {example}"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"is not a URL; for example {example}") from None
    scheme = parts.scheme
    if not parts.netloc:
        raise ValueError(f"has no host; for example {example}")
    if "@" in parts.netloc:
        raise ValueError(
            "has user info (the part before '@'), which can hide the real host and is never "
            f"needed here; remove it, e.g. {example}"
        )
    if "%" in parts.netloc:
        raise ValueError(
            "has a percent-encoded host or port, which requests decodes and urllib.parse "
            f"does not; write it plainly, e.g. {example}"
        )
    if parts.query or "?" in url:
        raise ValueError(f"has a query string; give the bare URL, e.g. {example}")
    if parts.fragment or "#" in url:
        raise ValueError(f"has a fragment ('#...'); give the bare URL, e.g. {example}")
    host, port = _authority(scheme, parts.netloc.lower(), example)
    target = Target(scheme, host, port)
    _same_for_requests(url, target, example)
    if scheme != "https" and not is_loopback(host):
        raise ValueError(
            "is plain http to a host that is not loopback; use https (plain http is allowed "
            f"only for test servers on {LOOPBACK})"
        )
    return target


def _same_for_requests(url: str, target: Target, example: str) -> None:
    """Raise unless urllib3's ``parse_url`` and requests' preparation of ``url`` (whose
    result its adapter connects to) name ``target``: the checks above read ``urlsplit``'s
    parse, and no parser release may make them about another host."""
    readings: dict[str, Target | None] = {}
    try:
        parsed = parse_url(url)
        scheme = parsed.scheme or ""
        port = parsed.port or DEFAULT_PORTS.get(scheme, 0)
        readings["urllib3"] = Target(scheme, _bare(parsed.host) or "", port)
    except ValueError:  # LocationParseError
        readings["urllib3"] = None
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)
        readings["requests"] = sent_target(prepared.url or "")
    except (requests.RequestException, ValueError):
        readings["requests"] = None
    for reader, reading in readings.items():
        if reading != target:
            seen = "cannot parse it" if reading is None else f"reads host {reading.host!r}"
            raise ValueError(
                f"is read as host {target.host!r} by urllib.parse while {reader} {seen}; "
                f"write a plain URL, e.g. {example}"
            )
