"""``mlauth sellers``: the sellers of a store of many sellers, as a table or a JSON document.

The rows come from :meth:`~mlauth.stores.sellers.SellerStores.rows`, one read of the store
for them all; nothing here refreshes, sends anything to MercadoLibre, or holds a token. The
JSON document's shape is ``mlauth/schemas/sellers.schema.json``, named by :data:`SCHEMA`.
Strings that come from the store (who refreshed, why a refresh failed) are masked against the
``.env``'s secrets and anything shaped like a token, and printed escaped in a terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from mlauth import __version__
from mlauth.errors import ConfigError, InvalidGrantError
from mlauth.secret import Secret, mask, url_scheme
from mlauth.sellers import Sellers
from mlauth.stores import sellers_from_env
from mlauth.stores.envfile import read_env_file, secrets_of
from mlauth.stores.select import STORE_KEY
from mlauth.stores.sellers import FAILING, OK, REAUTHORIZE, SellerRow
from mlauth.terminal import printable
from mlauth.tokens import TokenSet, seller_of, token_problem

from .times import duration, moment, when

__all__ = [
    "SCHEMA",
    "STATE_CODES",
    "Masker",
    "document",
    "read_refresh_token",
    "store_kind",
    "table",
]

#: The document's type and major version. Adding a field keeps it; removing or renaming one,
#: or changing what a value means, makes it ``mlauth-sellers/2``.
SCHEMA = "mlauth-sellers/1"

#: A row's state as the JSON document names it (the table shows the row's own words).
STATE_CODES = {
    OK: "ok",
    FAILING: "refresh_failing",
    REAUTHORIZE: "reauthorization_required",
}

# What a row that is not ok says when its store gave no reason.
_NO_DETAIL = {
    FAILING: "the last refresh failed (the store kept no reason)",
    REAUTHORIZE: "an invalid_grant marked the chain dead (the store kept no reason)",
}

# The longest refresh token read from standard input: far beyond any real one, and a file
# piped in by mistake is not read whole into memory.
_MAX_INPUT = 8192


class Masker:
    """Masks the ``.env``'s secrets (and anything shaped like a token) in text from the store.

    Remembers each distinct text: ten thousand rows mostly repeat a few ``pid N@host`` and
    error messages, and masking builds every spelling of every secret each time.
    """

    def __init__(self, secrets: Iterable[Secret | None]) -> None:
        self._secrets = [secret for secret in secrets if secret is not None]
        self._done: dict[str, str] = {}

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        masked = self._done.get(text)
        if masked is None:
            masked = self._done[text] = mask(text, self._secrets)
        return masked


def store_kind(url: str) -> str:
    """``sqlite``, ``postgresql``, ``redis`` or ``other``, from the store's URL."""
    scheme = url_scheme(url.strip())
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    if scheme in ("redis", "rediss", "unix"):
        return "redis"
    return "other"


def _detail(row: SellerRow, masker: Masker) -> str | None:
    if row.state == OK:
        return None
    return masker(row.detail) or _NO_DETAIL.get(row.state, "no reason given")


def _state_code(row: SellerRow) -> str:
    # A store that says something else is a bug there; the document stays valid and says
    # the worst, so a monitoring script looks.
    return STATE_CODES.get(row.state, "reauthorization_required")


def _seconds_left(row: SellerRow, now: float) -> float | None:
    if row.expires_at is None or not math.isfinite(row.expires_at):
        return None
    return round(row.expires_at - now, 3)


def document(
    rows: Sequence[SellerRow],
    *,
    env: str,
    location: str,
    kind: str,
    masker: Masker,
    now: float | None = None,
) -> dict[str, Any]:
    """The ``mlauth sellers --json`` document (``mlauth-sellers/1``) of these rows."""
    now = time.time() if now is None else now
    sellers = []
    counts = dict.fromkeys(STATE_CODES.values(), 0)
    for row in rows:
        left = _seconds_left(row, now)
        state = _state_code(row)
        counts[state] += 1
        sellers.append(
            {
                "user_id": row.user_id,
                "state": state,
                "detail": _detail(row, masker),
                "expires_at": moment(row.expires_at),
                "seconds_left": left,
                "expired": None if left is None else left <= 0,
                "last_refresh": {"at": moment(row.refreshed_at), "by": masker(row.refreshed_by)},
            }
        )
    return {
        "schema": SCHEMA,
        "mlauth_version": __version__,
        "generated_at": moment(now),
        "env": os.path.abspath(env),
        "store": {"kind": kind, "location": masker(location)},
        "counts": {"total": len(sellers), **counts},
        "sellers": sellers,
    }


def render(doc: dict[str, Any]) -> str:
    """The document as JSON text: ASCII only (a control character from the store arrives
    escaped, never raw on a terminal), no NaN or infinity (not JSON)."""
    return json.dumps(doc, indent=2, allow_nan=False)


def _expires(row: SellerRow, now: float) -> str:
    if row.expires_at is None:
        return "unknown"
    if not math.isfinite(row.expires_at):
        return "an impossible time"
    left = row.expires_at - now
    at = when(row.expires_at)
    return f"{at} (in {duration(left)})" if left > 0 else f"{at} (expired {duration(left)} ago)"


def _last(row: SellerRow, now: float) -> str:
    if row.refreshed_at is None:
        return "unknown"
    if not math.isfinite(row.refreshed_at):
        return "an impossible time"
    return f"{when(row.refreshed_at)} ({duration(now - row.refreshed_at)} ago)"


def table(rows: Sequence[SellerRow], *, masker: Masker, now: float | None = None) -> list[str]:
    """``mlauth sellers``' lines: a header and one aligned line per seller (no trailing
    spaces), every character a terminal would act on shown escaped."""
    now = time.time() if now is None else now
    header = ("USER ID", "EXPIRES", "LAST REFRESH", "BY", "STATE")
    cells: list[Sequence[str]] = [header]
    for row in rows:
        state = row.state if row.state in STATE_CODES else f"unknown state {row.state!r}"
        detail = _detail(row, masker)
        cells.append(
            (
                row.user_id,
                _expires(row, now),
                _last(row, now),
                masker(row.refreshed_by) or "-",
                state if detail is None else f"{state}: {detail}",
            )
        )
    cells = [[printable(cell) for cell in line] for line in cells]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)), line[-1]])
        for line in cells
    ]


def summary(rows: Sequence[SellerRow], location: str) -> str:
    """``3 sellers in LOCATION: 2 ok, 1 refresh failing``, the states with none left out."""
    counts = {state: 0 for state in STATE_CODES}
    for row in rows:
        counts[row.state if row.state in counts else REAUTHORIZE] += 1
    noun = "seller" if len(rows) == 1 else "sellers"
    parts = [f"{count} {state}" for state, count in counts.items() if count]
    return f"{len(rows)} {noun} in {location}: {', '.join(parts)}"


def read_refresh_token(stream: TextIO | None) -> Secret:
    """The refresh token ``mlauth sellers add`` reads from standard input, alone on it.

    Never from the command line, where ``ps`` and the shell's history show it; and never
    typed at a terminal, which echoes it (and whose Enter would be read as the end): a
    terminal is refused before anything is read. The messages never quote what was read.
    """
    if stream is None:
        raise ConfigError(_NO_INPUT)
    if stream.isatty():
        raise ConfigError(
            "standard input is a terminal: `mlauth sellers add` reads the seller's refresh "
            "token from a pipe or a file, never typed (a terminal shows it) nor from the "
            f"command line (ps and the shell's history show it). {_HOW}"
        )
    text = stream.read(_MAX_INPUT + 1)
    if len(text) > _MAX_INPUT:
        raise ConfigError(
            f"standard input holds more than {_MAX_INPUT} characters: not a refresh token. {_HOW}"
        )
    value = text.strip()
    if not value:
        raise ConfigError(_NO_INPUT)
    if any(char.isspace() for char in value):
        raise ConfigError(
            "standard input holds more than one word: give the refresh token alone (TG-...), "
            f"on one line. {_HOW}"
        )
    if value.startswith(("APP_USR-", "TEST-")):
        raise ConfigError(
            "standard input holds an access token (APP_USR-...), not a refresh token; give "
            f"the refresh token (TG-...). {_HOW}"
        )
    problem = token_problem(value)
    if problem is not None:  # its words never quote the value
        raise ConfigError(f"the refresh token on standard input {problem}. {_HOW}")
    return Secret(value)


_HOW = (
    "For example: `mlauth sellers add < refresh-token.txt`, or "
    "`printenv REFRESH_TOKEN | mlauth sellers add`"
)
_NO_INPUT = f"nothing on standard input: give the seller's refresh token (TG-...) there. {_HOW}"


# -- the commands ------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """``mlauth sellers [--json]``: every seller of the store, one read; exit 0 whatever
    their states (``mlauth check --seller ID`` judges one; the document counts them)."""
    values = read_env_file(args.env)
    masker = Masker(secrets_of(values))
    kind = store_kind(values.get(STORE_KEY) or "")
    del values  # the whole .env (secret, tokens): not a local of the errors raised below
    stores = sellers_from_env(args.env)
    try:
        rows = stores.rows()
    finally:
        stores.close()
    location = masker(stores.location) or ""
    if args.json:
        doc = document(rows, env=args.env, location=location, kind=kind, masker=masker)
        print(render(doc))
        return 0
    if not rows:
        print(
            printable(
                f"no sellers in {location} yet: add one with `mlauth login` (the seller "
                "authorizes the app) or `mlauth sellers add` (a refresh token on stdin)"
            )
        )
        return 0
    lines = table(rows, masker=masker)
    lines.append(printable(summary(rows, location)))
    dead = sum(row.state == REAUTHORIZE for row in rows)
    if dead:
        lines.append(
            f"{dead} must authorize the app again: run `mlauth login --env "
            f"{shlex.quote(args.env)}` for each (the seller who authorizes is replaced)"
        )
    print("\n".join(lines))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    """``mlauth sellers add``: a refresh token on stdin; refreshed once, which proves it and
    checks the seller (the one its suffix or ``--seller`` names); saved; the user id alone on
    stdout."""
    token = read_refresh_token(sys.stdin)  # a terminal is refused before anything else
    named = seller_of(TokenSet(None, token))
    if named is not None and args.seller is not None and named != args.seller:
        raise ConfigError(
            f"the refresh token is seller {named}'s (it ends with that user id), not seller "
            f"{args.seller}'s; nothing was sent or saved. Run again with --seller {named}, "
            "or without --seller"
        )
    sellers = Sellers.from_env(args.env)
    try:
        user_id = named or args.seller
        if user_id is not None and user_id in sellers.ids():
            # Refused before the token is spent: Sellers.add would refuse only after.
            raise ConfigError(
                f"{sellers.stores.location} holds seller {user_id} already; nothing was sent "
                f"or saved. To give them this chain instead, `mlauth sellers remove {user_id}` "
                "first, or have the seller authorize again with `mlauth login` (which replaces "
                "the chain)"
            )
        user_id = sellers.add(token, user_id=args.seller)
    except InvalidGrantError as exc:
        # No chain of the store died: this token was never one of them. Exit 1, not 3.
        raise ConfigError(
            f"MercadoLibre refused the refresh token ({exc.error}: "
            f"{mask(exc.description or 'no detail', [token])}): it was spent already, revoked, "
            "or is another app's. Nothing was saved. Give a live refresh token, or have the "
            "seller authorize the app with `mlauth login`"
        ) from None
    finally:
        sellers.stores.close()
    print(user_id)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """``mlauth sellers remove ID``: forget one seller's chain, under its lock."""
    stores = sellers_from_env(args.env)
    try:
        removed = stores.remove(args.user_id)
        location = stores.location
    finally:
        stores.close()
    if not removed:
        raise ConfigError(
            f"seller {args.user_id} is not in {location}; nothing was removed "
            "(`mlauth sellers` lists the sellers held)"
        )
    print(
        printable(
            f"removed seller {args.user_id} from {location}; the app's grant at MercadoLibre "
            "stays until the seller (or you) revoke it"
        )
    )
    return 0
