"""Reading a 2xx answer of the token endpoint, leniently, in small pure functions.

Once the server has rotated, its answer holds the only live refresh token. So the raw bytes
are kept first (a journal record, or a Redis key: see :func:`raw_record`), and read second,
to keep whatever is usable whatever else is odd:

- a usable refresh token is kept, with the access token if that is usable too (if not, the
  next refresh fetches one with the new refresh token);
- no ``refresh_token`` at all (absent or null: an app without offline_access) with a usable
  access token keeps the spent refresh token, as ML documents;
- anything else (no usable token, or a ``refresh_token`` that is there but unusable: the old
  one was most likely spent for it) keeps nothing: the raw answer stays where it was kept,
  for a human, and the error says where.

An unusable ``expires_in`` ("abc", -5, 0, true, [1], 1e308, NaN) means an unknown expiry,
and a ``token_type`` other than bearer is odd, not fatal: both are only worth a warning.

Nothing here does I/O or logs, so the rules can be fuzzed on their own.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from typing import Any

from .secret import Secret
from .tokens import (
    LATEST_TIME,
    MAX_TOKEN_LENGTH,
    TokenAnswer,
    TokenSet,
    json_kind,
    token_problem,
    user_id_of,
)

__all__ = [
    "ANSWER_FIELDS",
    "RAW_LIMIT",
    "Reading",
    "answer_of",
    "essentials",
    "parse_body",
    "parse_expires_in",
    "raw_of",
    "raw_record",
    "read_answer",
    "tokens_of",
]

# The fields a token answer is read from (user_id: the seller it is for); scope is not needed.
ANSWER_FIELDS = ("access_token", "refresh_token", "expires_in", "token_type", "user_id")
# ML's tokens live 6 h; a year is already absurd.
MAX_EXPIRES_IN = 366 * 24 * 3600.0
# A numeric string longer than this is no lifetime anyone meant (and float() of a long one
# is slow); it reads as an unknown expiry.
_MAX_NUMBER_TEXT = 64
# The most of a raw answer a record keeps as it came; a larger one keeps its essentials.
RAW_LIMIT = 64 * 1024
# Python refuses to read integers of more digits than this (int_max_str_digits).
_MAX_INT_DIGITS = 4000


def _lenient_int(text: str) -> int | float:
    # A huge integer must not make the whole body unreadable (and its tokens lost): it is a
    # float then, infinite if need be, and an expires_in that big is unknown anyway.
    return int(text) if len(text) <= _MAX_INT_DIGITS else float(text)


_NESTING = re.compile(r'["\[\]{}]')


_STRINGS = json.JSONDecoder()


def _skip_nested(text: str, start: int) -> int:
    """The index just past the array or object that starts at ``start``, however deep."""
    depth, index = 0, start
    while True:
        match = _NESTING.search(text, index)
        if match is None:
            raise ValueError("unterminated array or object")
        char, index = match.group(), match.end()
        if char == '"':
            _, index = _STRINGS.raw_decode(text, index - 1)
            continue
        depth += 1 if char in "[{" else -1
        if depth == 0:
            return index


def _shallow_object(text: str) -> dict[str, Any] | None:
    """The top level of a JSON object nested too deeply for :func:`json.loads` (which
    recurses): its strings, numbers and literals as they are, each array or object an empty
    one. An answer's own fields are strings and numbers, so they read the same. None if the
    text is no object."""
    decoder = json.JSONDecoder(parse_int=_lenient_int)
    found: dict[str, Any] = {}
    try:
        index = _skip_space(text, 0)
        if text[index] != "{":
            return None
        index = _skip_space(text, index + 1)
        while text[index] == '"':
            key, index = decoder.raw_decode(text, index)
            index = _skip_space(text, index)
            if text[index] != ":":
                return None
            index = _skip_space(text, index + 1)
            if text[index] in "[{":
                found[key] = [] if text[index] == "[" else {}
                index = _skip_nested(text, index)
            else:
                found[key], index = decoder.raw_decode(text, index)
            index = _skip_space(text, index)
            if text[index] == "}":
                return found
            if text[index] != ",":
                return None
            index = _skip_space(text, index + 1)
    except (ValueError, IndexError, RecursionError):
        return None
    return None


def _skip_space(text: str, index: int) -> int:
    while text[index] in " \t\n\r":
        index += 1
    return index


def parse_body(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The answer's JSON object, or None and what the body is instead.

    Read leniently: a stray byte that is not UTF-8 spoils only the string it is in, and a
    value nested too deeply for Python's parser only that value.
    """
    text = raw.decode(json.detect_encoding(raw), "replace")
    try:
        body = json.loads(text, parse_int=_lenient_int)
    except RecursionError:
        body = _shallow_object(text)
        if body is None:
            return None, "nests too deeply to be read"
    except ValueError:
        return None, "is not JSON" if raw.strip() else "is empty"
    if not isinstance(body, dict):
        return None, f"is {json_kind(body)}, not a JSON object"
    return body, None


def parse_expires_in(value: object) -> tuple[float | None, str | None]:
    """(seconds, None), or (None, why it is odd); a missing one is (None, None).

    ML documents a number; proxies and older code have sent a numeric string. Anything else,
    or a lifetime that is not positive, finite and under a year, is an unknown expiry: the
    tokens are kept, and the first 401 refreshes them.
    """
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None, f"expires_in is {json_kind(value)}"
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) > _MAX_NUMBER_TEXT:
                raise ValueError
            seconds = float(text)
        except ValueError:
            return None, f"expires_in is a string of {len(value)} characters that is no number"
    else:  # float() of a huge int would overflow; any such int is absurd anyway
        seconds = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.inf
    if not 0 < seconds <= MAX_EXPIRES_IN:  # also false for NaN
        shown = f"{seconds:.3g}" if math.isfinite(seconds) else str(seconds)
        return None, f"expires_in is {shown}, not a lifetime between 0 and a year"
    return seconds, None


# The registered token types other than bearer (RFC 6749's registry, RFC 9449's DPoP): the
# only values a warning quotes. Any other string may be a token a confused server or proxy put
# there (the new access token, say), and the warning goes to logs.
_OTHER_TYPES = frozenset({"mac", "dpop", "n_a", "pop", "basic"})


def _token_type_oddity(value: object) -> str | None:
    if value is None or (isinstance(value, str) and value.lower() == "bearer"):
        return None  # ML sends bearer or Bearer; a missing one means bearer (RFC 6749)
    if isinstance(value, str) and value.lower() in _OTHER_TYPES:
        return f"token_type is {value!r}, not bearer"
    if isinstance(value, str):
        return f"token_type is a string of {len(value)} characters, not bearer"
    return f"token_type is {json_kind(value)}, not bearer"


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one answer holds, field by field (see :func:`read_answer`)."""

    access_token: Secret | None
    refresh_token: Secret | None
    expires_in: float | None
    #: why the body is no JSON object (nothing else was read), or None
    body_problem: str | None = None
    #: why the access token is unusable ("access_token is missing"), or None
    access_problem: str | None = None
    #: why the refresh token is unusable, or None (usable, or absent: see refresh_absent)
    refresh_problem: str | None = None
    #: no refresh_token at all (absent or null): an app without offline_access
    refresh_absent: bool = False
    #: what is odd but costs nothing (expires_in, token_type), for one warning
    oddities: tuple[str, ...] = ()
    #: the seller the answer is for (``user_id``: a positive int or its digits), or None
    user_id: str | None = None


def _field_problem(body: dict[str, Any], name: str) -> str | None:
    if name not in body:
        return f"{name} is missing"
    problem = token_problem(body[name])
    return None if problem is None else f"{name} {problem}"


def read_answer(raw: bytes) -> Reading:
    """Read a 2xx answer's raw bytes field by field; never raises."""
    body, problem = parse_body(raw)
    if body is None:
        return Reading(None, None, None, body_problem=f"the body {problem}")
    access_problem = _field_problem(body, "access_token")
    refresh_absent = body.get("refresh_token") is None
    refresh_problem = None if refresh_absent else _field_problem(body, "refresh_token")
    expires_in, expiry_oddity = parse_expires_in(body.get("expires_in"))
    oddities = tuple(
        odd for odd in (expiry_oddity, _token_type_oddity(body.get("token_type"))) if odd
    )
    return Reading(
        access_token=None if access_problem else Secret(body["access_token"]),
        refresh_token=None if refresh_absent or refresh_problem else Secret(body["refresh_token"]),
        expires_in=expires_in,
        access_problem=access_problem,
        refresh_problem=refresh_problem,
        refresh_absent=refresh_absent,
        oddities=oddities,
        user_id=user_id_of(body.get("user_id")),
    )


def answer_of(reading: Reading) -> TokenAnswer | str:
    """The tokens worth keeping, or why there are none (words that quote no value).

    A usable refresh token is kept with or without a usable access token. No refresh token
    at all keeps the spent one (``refresh_token`` None), if the access token is usable. A
    refresh token that is there but unusable keeps nothing: the server rotated for it.
    """
    if reading.body_problem is not None:
        return reading.body_problem
    if reading.refresh_token is not None:
        return TokenAnswer(
            access_token=reading.access_token,
            refresh_token=reading.refresh_token,
            expires_in=reading.expires_in,
            access_problem=reading.access_problem,
            user_id=reading.user_id,
        )
    if reading.refresh_absent and reading.access_token is not None:
        return TokenAnswer(reading.access_token, None, reading.expires_in, user_id=reading.user_id)
    refresh = reading.refresh_problem or "there is no refresh_token"
    return refresh if reading.access_problem is None else f"{refresh}, and {reading.access_problem}"


def essentials(raw: bytes, limit: int = RAW_LIMIT) -> bytes:
    """A smaller body that reads the same (:func:`read_answer`), for a raw answer too large
    to keep whole: the answer's own fields, each one that is too long to be usable replaced
    by a note. A body that is no JSON object holds nothing usable: its first bytes are kept.
    """
    body, _ = parse_body(raw)
    if body is None:
        return raw[:limit]
    kept: dict[str, object] = {}
    for name in ANSWER_FIELDS:
        if name not in body:
            continue
        value = body[name]
        text = json.dumps(value)
        # A longer value is unusable as a token or a lifetime: a note reads the same.
        small = len(text) <= MAX_TOKEN_LENGTH + 2 and (name != "expires_in" or len(text) < 70)
        kept[name] = value if small else {"trimmed": f"{json_kind(value)} of {len(text)} bytes"}
    return json.dumps(kept).encode("ascii")


def raw_record(
    raw: bytes,
    *,
    replaces: str,
    grant: str,
    started: float,
    at: float,
    by: str,
    limit: int = RAW_LIMIT,
) -> dict[str, Any]:
    """The record that keeps a raw answer (a journal line, a Redis value).

    ``replaces`` is the fingerprint of the refresh token the answer follows (the spent one,
    or for ``mlauth login`` the one the store held); ``started`` the time before the first
    POST (the expiry counts from it), ``at`` the time the answer arrived. A body over
    ``limit`` bytes keeps its :func:`essentials`.
    """
    body = raw if len(raw) <= limit else essentials(raw, limit)
    record: dict[str, Any] = {
        "kind": "raw",
        "spent": replaces,
        "grant": grant,
        "started": started,
        "at": at,
        "by": by,
        "size": len(raw),
    }
    try:
        record["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_b64"] = base64.b64encode(body).decode("ascii")
    if body is not raw:
        record["trimmed"] = True
    return record


def raw_of(record: dict[str, Any]) -> bytes | None:
    """The body a :func:`raw_record` kept, or None if the record holds none."""
    text, encoded = record.get("body"), record.get("body_b64")
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    if isinstance(encoded, str):
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


_MAX_WHO = 300  # "pid N@" and a host name of at most 253 characters


def _time(record: dict[str, Any], key: str) -> float | None:
    """The record's ``key`` if it is a unix time mlauth could have written, else None.

    The record is read back from places others may write (a journal, a Redis hash), so its
    own fields are input too: a huge integer must not raise (``float(10**400)`` does), and a
    time past year 9999 must not become an ``expires_at`` the store then refuses to read.
    """
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if 0 <= seconds <= LATEST_TIME else None


def writer_of(value: object) -> str | None:
    """The record's ``by`` if it can be what mlauth writes there (``pid N@host``): it is saved
    beside the tokens and shown, so a control character (a CR would end a ``.env`` line) or a
    whole page of text planted in a record is dropped."""
    if isinstance(value, str) and value.isprintable() and 0 < len(value) <= _MAX_WHO:
        return value
    return None


def tokens_of(record: dict[str, Any], spent: Secret | None) -> TokenSet | str:
    """The tokens a :func:`raw_record` holds, to be saved over ``spent``'s link; or why not.

    ``spent`` is the refresh token the answer followed, if known: an answer without a
    refresh token keeps it (and without it, such an answer holds no chain to save).
    """
    raw = raw_of(record)
    if raw is None:
        return "the record holds no answer"
    answer = answer_of(read_answer(raw))
    if isinstance(answer, str):
        return answer
    refresh = answer.refresh_token
    if refresh is None and record.get("grant") == "refresh_token":
        refresh = spent  # an app without offline_access: the spent token lives on
    if refresh is None:
        return "there is no refresh_token"
    by = record.get("by")
    # The expiry counts from before the POST; a record without a usable start counts from
    # the answer's arrival (later by one round trip: the refresh margin covers that).
    started = _time(record, "started")
    if started is None:
        started = _time(record, "at")
    lifetime = answer.expires_in
    expires_at = None if started is None or lifetime is None else started + lifetime
    return TokenSet(
        access_token=answer.access_token,
        refresh_token=refresh,
        expires_at=expires_at if expires_at is None or expires_at <= LATEST_TIME else None,
        refreshed_at=started,
        refreshed_by=writer_of(by),
        user_id=answer.user_id,
    )
