"""Masking for secrets: a wrapper whose ``repr`` never shows the value, and fingerprints.

Holding tokens and the client secret in :class:`Secret` closes the doors a plain ``str``
leaves open: ``repr(auth)``, ``vars(auth)``, tracebacks that print locals (and crash reporters
such as Sentry, which send them), f-strings in log calls. The value is read only where it must
go on the wire, through :meth:`Secret.reveal`; a form body that holds secrets is a
:class:`SecretForm`, encoded only for the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

__all__ = [
    "Secret",
    "SecretForm",
    "fingerprint",
    "mask",
    "quotes_url_secret",
    "redact_url",
    "url_scheme",
]

# What MercadoLibre's access (APP_USR-..., TEST-... in the sandbox) and refresh (TG-...) tokens
# look like. No word boundary before them: in percent-encoded text (%22TG-...) there is none.
_TOKEN_SHAPE = re.compile(r"(?:APP_USR|TG)-[A-Za-z0-9_-]{8,}|TEST-[0-9]{4,}-[A-Za-z0-9_-]{8,}")


def fingerprint(value: str | None) -> str:
    """A short, stable, one-way label for a token: ``sha256:1a2b3c4d``.

    Eight hex digits of SHA-256 identify a token in logs and in ``mlauth status`` without
    giving away anything usable; the prefix of an ML token is deliberately not shown, since
    it embeds the client id and user id.
    """
    if not value:
        return "<none>"
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]


def _spellings(value: str) -> set[str]:
    """How ``value`` may come back in someone else's text: as it is, form- or URL-encoded
    (a server or proxy that echoes the request body), JSON- or HTML-escaped."""
    # Imported here: html loads html.entities (thousands of entries, a few ms), and this
    # runs only when a message is masked, never on import or on a plain request.
    import html

    escaped = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    escaped |= {text.replace("/", "\\/") for text in escaped}  # some encoders escape '/'
    encoded = {quote_plus(value), quote(value, safe=""), quote(value)}
    return {value, html.escape(value), *encoded, *escaped}


def _pattern(spelling: str) -> str:
    # Percent-encoding may come back in either case: %2B or %2b.
    return re.sub(r"%([0-9A-F]{2})", r"%(?i:\1)", re.escape(spelling))


def mask(text: str, secrets: Iterable[Secret | None] = ()) -> str:
    """``text`` with each of ``secrets``, and anything shaped like an ML token, fingerprinted.

    For messages made from someone else's text (an exception, a server's error answer), which
    may quote a value it was given, in any of the encodings a body or a URL uses.
    """
    label: dict[str, str] = {}
    for secret in secrets:
        if secret is not None and secret.reveal():
            for spelling in _spellings(secret.reveal()):
                label.setdefault(spelling, secret.fingerprint)
    # Only the spellings the text holds (a match differs from its spelling at most in the
    # case of a %XX): compiling a pattern costs far more than the search, and most texts
    # (a `refreshed_by` of every row `mlauth sellers` lists) quote no secret at all.
    lowered = text.lower()
    present = [spelling for spelling in label if spelling.lower() in lowered]
    if present:
        # Longest first, in one pass: a spelling inside another's never splits it.
        spellings = sorted(present, key=len, reverse=True)
        found = re.compile("|".join(f"({_pattern(s)})" for s in spellings))
        text = found.sub(lambda match: label[spellings[(match.lastindex or 1) - 1]], text)
    return _TOKEN_SHAPE.sub(lambda match: fingerprint(match.group()), text)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Query keys whose values are credentials (redis-py reads both from the query string).
_SECRET_KEY = re.compile(r"(?:^|[?&;#])(?:password|username)=", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` fit for messages and logs: its password masked, whatever characters it holds.

    Not parsed as a URL: a password with an unencoded ``/``, ``#``, ``?``, ``@`` or ``:``
    ends the host early for ``urllib.parse``, which then shows the rest of it as a path, a
    fragment or a query. Everything before the *last* ``@`` is the user information: shown as
    ``user:***@``, or as ``***@`` without a password after a ``:`` (a lone value may be one).
    After a ``password=`` or ``username=`` in the query, the rest of the URL is masked (an
    unencoded ``&`` or ``#`` in the value would otherwise end it early); with an ``@`` after
    such a key, all but the scheme is. When the text is ambiguous, more is masked, never less.
    """
    return _redaction(url)[0]


def url_scheme(url: str) -> str:
    """The scheme of ``url``, lower-cased, as ``urlsplit`` reads it; "" if it has none.

    Never raises: ``urlsplit`` does on a malformed IPv6 host (``redis://:pw@[::1``), and
    that ValueError ends in messages that quote the whole URL (argparse's, for one).
    """
    found = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url)
    return found.group(1).lower() if found else ""


def quotes_url_secret(text: str, url: str) -> bool:
    """Whether ``text`` (a URL parser's error, say) holds any piece of what
    :func:`redact_url` masks in ``url``, cut where a parser may have cut it."""
    return any(
        piece and piece in text
        for hidden in _redaction(url)[1]
        for piece in re.split(r"[/?#@:&;=]", hidden)
    )


def _redaction(url: str) -> tuple[str, list[str]]:
    """``url`` with its credentials masked, and what was masked."""
    scheme = _SCHEME.match(url)
    head, rest = (scheme.group(), url[scheme.end() :]) if scheme else ("", url)
    at = rest.rfind("@")
    key = _SECRET_KEY.search(rest)
    if key is not None and key.start() < at:
        # An '@' after password=: in the value, or the key is in the user information. Which
        # one cannot be told: everything is masked.
        return head + "***", [rest]
    hidden: list[str] = []
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, password = userinfo.partition(":")
        head += f"{user}:***@" if colon and password else "***@"
        hidden.append(password if colon and password else userinfo)
    key = _SECRET_KEY.search(rest)
    if key is not None:
        hidden.append(rest[key.end() :])
        rest = rest[: key.end()] + "***"
    return head + rest, hidden


class Secret:
    """A string that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret wants a str, got {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The real value, for the one place that puts it on the wire or on disk."""
        return self._value

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode("utf-8"), other._value.encode("utf-8"))

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickling would write the value out in clear; a Secret is not meant to travel.
        raise TypeError("a Secret cannot be pickled")


class SecretForm:
    """A form body (``application/x-www-form-urlencoded``) that holds secrets.

    Its ``repr`` masks them and it refuses pickling, like :class:`Secret`: a frame or an
    attribute that holds it shows nothing a crash reporter may not send. The plain body exists
    only as the bytes :meth:`encode` makes for the wire.
    """

    __slots__ = ("_fields", "_unsent")

    def __init__(
        self, fields: Mapping[str, str | Secret | None], *, unsent: Iterable[Secret | None] = ()
    ) -> None:
        self._fields = tuple((name, value) for name, value in fields.items() if value is not None)
        # Secrets the sender holds beside the form's own (the access token in use): a server
        # or a proxy may quote those too, and its answer goes into logs and the journal.
        self._unsent = tuple(secret for secret in unsent if secret is not None)

    def encode(self) -> bytes:
        """The body to send, encoded as requests encodes a ``data=`` dict."""
        return urlencode(
            [(name, v.reveal() if isinstance(v, Secret) else v) for name, v in self._fields]
        ).encode("ascii")

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """What an answer to this form must never be quoted with: its secrets, and the
        ones its sender holds beside them."""
        return (*(value for _, value in self._fields if isinstance(value, Secret)), *self._unsent)

    def mask(self, text: str) -> str:
        """``text`` (a server's answer to this form, say) with this form's secrets masked."""
        return mask(text, self.secrets)

    def __repr__(self) -> str:
        return f"SecretForm({', '.join(f'{name}={value!r}' for name, value in self._fields)})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("a SecretForm cannot be pickled")
