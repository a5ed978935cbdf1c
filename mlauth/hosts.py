"""Which requests may carry the token: host names, ports, and the https rule."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from .urls import DEFAULT_PORTS, host_problem, is_loopback, split_target, urllib3_agrees

__all__ = ["DEFAULT_PORTS", "HostRules", "is_loopback"]

# How many origins (scheme://host:port) HostRules.allows remembers; an app talks to a few.
ORIGIN_CACHE_SIZE = 256
# How many allowed origins get the startswith() fast path (case variants count apart).
ALLOWED_PREFIXES_SIZE = 8
_MAX_CACHED_ORIGIN = 300  # "https://" + a 253-character host name + ":65535", with room
_NOT_IN_CACHED_ORIGIN = "?#@\t\r\n"


def parse_host(entry: str) -> tuple[str, int | None]:
    """``"host"`` or ``"host:port"`` (``"[::1]:8080"`` for IPv6) -> (lower-case name, port).

    ValueError names the entry, what is wrong with it and how to write it: an entry that is
    no host name can never match a URL, and would leave every request without the token.
    """
    entry = entry.strip()
    text = entry.lower()
    if not text:
        raise ValueError(f"{entry!r} has no host name")
    if "://" in text or "/" in text:
        try:
            host = urlsplit(text if "://" in text else "//" + text).netloc
        except ValueError:
            host = ""
        hint = f": write only the host, {host}" if host else ""
        raise ValueError(f"{entry!r} is not a host name{hint}")
    if any(char.isspace() for char in text):
        raise ValueError(
            f"{entry!r} is not a host name: it contains white space (separate hosts with "
            "commas, e.g. api.mercadolibre.com,api.mercadopago.com)"
        )
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
        problem = host_problem(name, bracketed=True) if bracket else "has no closing ']'"
    else:
        name, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
        problem = host_problem(name)
    if problem is not None:
        shown = repr(entry) if name == text else f"{entry!r}: {name!r}"
        raise ValueError(f"{shown} {problem}{_guess(text)}")
    if port_text is None:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{entry!r} has a bad port (a number from 1 to 65535)")
    return name, int(port_text)


def _guess(text: str) -> str:
    """What a mistyped entry probably meant, as " (did you mean ...?)", or nothing."""
    if ";" in text:  # a semicolon for a colon: 127.0.0.1;8080
        fixed = text.replace(";", ":")
        try:
            parse_host(fixed)
        except ValueError:
            return ""
        return f" (did you mean {fixed}?)"
    return ""


def _entry(name: str, port: int | None) -> str:
    shown = f"[{name}]" if ":" in name else name
    return shown if port is None else f"{shown}:{port}"


class HostRules:
    """The allowed hosts. A name without a port matches any port.

    The token goes only over https, except to loopback hosts (so tests and the demo can use
    a plain-http fake server); a plain-http URL for any other allowed host gets no token.
    """

    def __init__(self, hosts: Iterable[str]) -> None:
        entries = [parse_host(h) for h in hosts]
        if not entries:
            raise ValueError("at least one allowed host is needed")
        self._any_port = frozenset(name for name, port in entries if port is None)
        self._with_port = frozenset((name, port) for name, port in entries if port is not None)
        self.entries = tuple(entries)
        # origin -> answer of allows_uncached(); see allows(). Reads and writes are single
        # dict operations, safe across threads; the worst a race does is check an origin twice.
        self._seen: dict[str, bool] = {}
        # The allowed origins found so far, each with the "/" that ends it: a URL that starts
        # with one has that origin (see allows()), so one startswith() answers the usual case.
        self._allowed_prefixes: tuple[str, ...] = ()
        self._seen_parts: dict[tuple[str, str, int | None], bool] = {}  # see allows_parts()

    def __repr__(self) -> str:
        # Also of an object whose __init__ failed on a bad entry: tracebacks that show locals
        # (pytest -l, capture_locals, crash reporters) call it on that frame's ``self``.
        entries = vars(self).get("entries", ())
        return f"HostRules({[_entry(name, port) for name, port in entries]!r})"

    def shown(self) -> str:
        """The entries as ``ML_API_HOSTS`` takes them: ``api.mercadolibre.com, [::1]:8080``."""
        return ", ".join(_entry(name, port) for name, port in self.entries)

    def allows(self, url: str | None) -> bool:
        """Whether ``url`` may carry the token. Runs before every request, so it is cached.

        The answer depends only on the URL's origin: everything before the first ``/`` after
        the first ``://`` (requests always gives a URL a path, so that ``/`` is there). That
        prefix is looked up in a small dict; on a miss the whole URL goes through
        :meth:`allows_uncached`, and the answer is kept only for a prefix that is exactly the
        origin ``urlsplit`` would see (see :func:`_cacheable`), so a hit returns what the full
        parse would.

        Before that, the usual case: a URL that starts with an allowed origin already seen,
        followed by its ``/``. Its own origin is that one (the first ``://`` and the first
        ``/`` after it are the prefix's), so the answer is the cached True.
        """
        if type(url) is str:  # a str subclass (or bytes) takes the long way below
            if url.startswith(self._allowed_prefixes):
                return True
            start = url.find("://")
            if start > 0:
                end = url.find("/", start + 3)
                origin = url if end < 0 else url[:end]
                known = self._seen.get(origin)
                if known is not None:
                    return known
                answer = self.allows_uncached(url)
                if _cacheable(origin):
                    seen = self._seen
                    if len(seen) >= ORIGIN_CACHE_SIZE:
                        seen.clear()  # bounded; the few origins an app uses come back at once
                    seen[origin] = answer
                    prefixes = self._allowed_prefixes
                    if answer and len(prefixes) < ALLOWED_PREFIXES_SIZE:
                        self._allowed_prefixes = (*prefixes, origin + "/")
                return answer
        return self.allows_uncached(url)

    def allows_parts(self, scheme: str, host: str, port: int | None) -> bool:
        """The rules for a URL its client has parsed already (httpx): lower-case scheme,
        ASCII host (IDNA-encoded, IPv6 without brackets), port or None.

        Cached like :meth:`allows`: the loopback check parses an IP address.
        """
        origin = (scheme, host, port)
        known = self._seen_parts.get(origin)
        if known is not None:
            return known
        host = host.lower()  # httpx lower-cases names, but not IPv6 literals
        answer = scheme in DEFAULT_PORTS and (scheme == "https" or is_loopback(host))
        if answer and host not in self._any_port:
            answer = (host, port or DEFAULT_PORTS[scheme]) in self._with_port
        seen = self._seen_parts
        if len(seen) >= ORIGIN_CACHE_SIZE:
            seen.clear()
        seen[origin] = answer
        return answer

    def allows_uncached(self, url: str | None) -> bool:
        """The full check, uncached: the scheme, host and port rules, on the host requests
        will connect to (:func:`~mlauth.urls.sent_target`): ``urlsplit``'s and urllib3's
        readings must agree, or there is no token.

        A backslash in the netloc gets no token: ``urlsplit`` reads
        ``https://evil.com\\@api.mercadolibre.com/`` as userinfo and the allowed host, while
        requests, urllib3 and browsers take the backslash for a ``/`` and connect to evil.com.
        """
        if not url or not isinstance(url, str):
            return False
        target = split_target(url)
        if target is None:
            return False
        scheme, name, port = target
        if scheme != "https" and not is_loopback(name):
            return False
        # urllib3's parse last: it costs several times urlsplit, and only a yes needs it.
        return self.matches(name, port) and urllib3_agrees(url, target)

    def matches(self, name: str, port: int) -> bool:
        """Whether an entry names host ``name`` (lower-case) on ``port``."""
        return name in self._any_port or (name, port) in self._with_port


def _cacheable(origin: str) -> bool:
    """Whether ``origin`` (a URL up to its first ``/`` after ``://``) fixes the answer.

    The answer depends only on the scheme and netloc ``urlsplit`` finds, and on the scheme,
    host and port urllib3's ``parse_url`` finds. ``urlsplit`` strips leading C0 controls and
    spaces, deletes tabs and line breaks anywhere, takes the scheme before the first ``:`` and
    a netloc only right after ``//``, and ends the netloc at ``?`` or ``#`` as well as ``/``.
    With none of those characters in the prefix, both come from the prefix alone: the first
    ``:`` is in it, and is either the one of ``://`` (the netloc is the rest of the prefix) or
    an earlier one (then no netloc, or no scheme: no token either way). ``parse_url`` ends the
    authority at a backslash too, but a backslash in the prefix is in ``urlsplit``'s netloc,
    which gets no token; otherwise its authority is that same netloc, and nothing after it
    (path, query, fragment: only ever re-encoded) can make it fail. So every URL with this
    prefix gets the same answer. Prefixes with userinfo (``@``: a password may be in it) or
    longer than a host name can be are not kept, so the cache holds no credentials and stays
    small.
    """
    return (
        len(origin) <= _MAX_CACHED_ORIGIN
        and origin[0] > " "
        and not any(char in origin for char in _NOT_IN_CACHED_ORIGIN)
    )
