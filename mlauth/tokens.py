"""The token set a store holds, and how fresh it is: fresh, stale or invalid.

The vocabulary is google-auth's, used everywhere in mlauth: a FRESH token is sent as it is; a
STALE one (within the refresh margin of its expiry) still works, so it is refreshed ahead if
nobody else is doing it, never waited for; an INVALID one (none, or expired) must be replaced
before anything is sent, so the refresh is waited for and its failure raised.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import socket
import time

from .secret import Secret

__all__ = [
    "MAX_TOKEN_LENGTH",
    "Freshness",
    "TokenAnswer",
    "TokenSet",
    "json_kind",
    "this_process",
    "token_problem",
]

# A refresh is started ahead of expiry by ``refresh_margin`` seconds, but never by more than
# this share of the token's lifetime: with the 2-second tokens of a test server a 300-second
# margin would refresh on every call.
MAX_MARGIN_SHARE = 0.25
# The last second of the year 9999: a stored time outside 0..LATEST_TIME (or not finite) is
# no unix time in seconds (milliseconds, a common slip, land far past it); stores refuse it.
LATEST_TIME = 253402300799.0


# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# ML's access tokens are about 75 characters and its refresh tokens about 40. 2048 lets a
# switch to JWT-style tokens (typically 0.8-1.5 KB) through, refuses the absurd, and keeps
# "Authorization: Bearer ..." far below the 8 KiB header limits of common servers and proxies.
MAX_TOKEN_LENGTH = 2048


def json_kind(value: object) -> str:
    """What a decoded JSON value is, in words: "a number", "null", "an array"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _bad_character(value: str) -> str:
    """The kind of the first character a bearer token cannot hold, never the character."""
    for char in value:
        if _B64TOKEN.fullmatch(char) or char == "=":
            continue
        if char in "\r\n":
            return "a line break"
        if char == "\0" or not char.isprintable():
            return "a control character"
        if char.isspace():
            return "white space"
        if not char.isascii():
            return "a non-ASCII character"
        return "punctuation"
    return "an '=' before its end"


def token_problem(value: object) -> str | None:
    """What makes ``value`` unusable as a token, or None if it is usable.

    The one check for every token mlauth saves or sends, wherever it came from (an answer of
    the token endpoint, a ``.env``, Redis, a custom store): a string of RFC 6750 ``b64token``
    characters, at most :data:`MAX_TOKEN_LENGTH` long. The words never quote the value (it
    may be a live token), so they can go into any message: "is a number", "holds a line
    break"...
    """
    if not isinstance(value, str):
        return f"is {json_kind(value)}, not a string"
    if not value:
        return "is empty"
    if len(value) > MAX_TOKEN_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_TOKEN_LENGTH})"
    if _B64TOKEN.fullmatch(value) is None:
        return (
            f"holds {_bad_character(value)} (a bearer token is letters, digits and -._~+/, "
            "then optional '=', RFC 6750)"
        )
    return None


def this_process() -> str:
    """``pid N@host``: who refreshed, in the store and in journal records."""
    return f"pid {os.getpid()}@{socket.gethostname()}"


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"  # still valid, within the refresh margin of its expiry
    INVALID = "invalid"  # no access token, or past its known expiry


@dataclasses.dataclass(frozen=True)
class TokenAnswer:
    """The usable part of a successful answer from the token endpoint.

    ``access_token`` is None when the answer carried a usable refresh token but no usable
    access token (``access_problem`` says what was wrong with it): the refresh token is kept,
    and the next refresh fetches an access token with it. ``refresh_token`` is None when the
    answer had none (an app without offline_access): the spent one is kept.
    """

    access_token: Secret | None
    refresh_token: Secret | None
    expires_in: float | None
    access_problem: str | None = None
    #: The seller the answer is for (its ``user_id`` field), when it names one.
    user_id: str | None = None


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """One link of the token chain, as stored.

    ``expires_at`` and ``refreshed_at`` are unix seconds (wall clock, shared by processes);
    either is None when unknown, for instance in a ``.env`` written by hand or by legacy code.
    """

    access_token: Secret | None
    refresh_token: Secret | None
    expires_at: float | None = None
    refreshed_at: float | None = None
    refreshed_by: str | None = None
    #: The seller whose chain this is, as the token answer said (``user_id``); None when
    #: unknown (a ``.env`` keeps no such line: :func:`seller_of` reads the tokens' suffix).
    #: Not part of equality: two reads of one link are equal whether or not the store keeps it.
    user_id: str | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_answer(
        cls, answer: TokenAnswer, spent: Secret, started: float, *, refreshed_by: str
    ) -> TokenSet:
        """The link that follows ``spent``: the answer's tokens, expiring from ``started``.

        An answer without a refresh token (an app without offline_access) keeps ``spent``.
        """
        return cls(
            access_token=answer.access_token,
            refresh_token=answer.refresh_token or spent,
            expires_at=None if answer.expires_in is None else started + answer.expires_in,
            refreshed_at=started,
            refreshed_by=refreshed_by,
            user_id=answer.user_id,
        )

    @property
    def lifetime(self) -> float | None:
        if self.expires_at is None or self.refreshed_at is None:
            return None
        return max(self.expires_at - self.refreshed_at, 0.0)

    def margin(self, refresh_margin: float) -> float:
        """The effective proactive margin: ``refresh_margin`` capped by the token's lifetime."""
        lifetime = self.lifetime
        if lifetime is None:
            return refresh_margin
        return min(refresh_margin, lifetime * MAX_MARGIN_SHARE)

    def expires_in(self, now: float | None = None) -> float | None:
        if self.expires_at is None:
            return None
        return self.expires_at - (time.time() if now is None else now)

    def freshness(self, refresh_margin: float, now: float | None = None) -> Freshness:
        """FRESH, STALE (within the effective margin of expiry) or INVALID (see the module)."""
        if self.access_token is None:
            return Freshness.INVALID
        left = self.expires_in(now)
        if left is None or left > self.margin(refresh_margin):
            return Freshness.FRESH  # an unknown expiry counts as valid until its 401
        return Freshness.STALE if left > 0 else Freshness.INVALID

    def age(self, now: float | None = None) -> float | None:
        if self.refreshed_at is None:
            return None
        return (time.time() if now is None else now) - self.refreshed_at

    def describe(self, now: float | None = None) -> str:
        """A loggable summary: fingerprints and times, never a token."""
        access = self.access_token.fingerprint if self.access_token else "<none>"
        refresh = self.refresh_token.fingerprint if self.refresh_token else "<none>"
        left = self.expires_in(now)
        expiry = "unknown expiry" if left is None else f"expires in {left:.0f}s"
        return f"access={access} refresh={refresh} {expiry}"

    def __str__(self) -> str:
        # A log call given the tokens formats them only if the record is emitted.
        return self.describe()


# MercadoLibre's tokens end with the seller's user id (APP_USR-...-123456789, TG-...-123456789).
_USER_SUFFIX = re.compile(r"-([1-9][0-9]{0,19})\Z")
# A user id as mlauth keeps it: the decimal digits of a positive integer.
USER_ID = re.compile(r"[1-9][0-9]{0,19}\Z")


def user_id_of(value: object) -> str | None:
    """``value`` as a user id (a positive int, or a string of its digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str) and USER_ID.match(value):
        return value
    return None


def seller_of(tokens: TokenSet) -> str | None:
    """The seller a link belongs to: the answer's ``user_id``, else the id its tokens end
    with (the refresh token's first), else None."""
    if tokens.user_id is not None:
        return tokens.user_id
    for token in (tokens.refresh_token, tokens.access_token):
        if token is not None:
            match = _USER_SUFFIX.search(token.reveal())
            if match:
                return match.group(1)
    return None
