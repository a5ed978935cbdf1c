"""What ``mlauth status --json`` and ``mlauth check`` report: the chain's state, and why.

One reading of the store gives both: the JSON document (its shape is
``mlauth/schemas/status.schema.json``, named by :data:`SCHEMA`) and the overall state, which
``mlauth check`` turns into its exit code. The states, worst first:

- ``reauthorization_required``: the store holds no refresh token, or an ``invalid_grant``
  marked it dead. Nothing but ``mlauth login`` helps.
- ``degraded``: the chain is alive but a person should look before it becomes an outage: the
  store cannot be read (Redis down) or a refresh could not be saved or locked now; the access
  token expired or is missing (the next request must refresh first; in a pipeline that runs
  all the time, refreshes are failing); a journal (or the Redis hash) holds an answer the
  store does not have yet.
- ``ok``: none of these.

Configuration errors (no ``.env``, a missing credential, a malformed value) are not a state:
they raise :class:`~mlauth.ConfigError` (exit 1), as every command does, and no document is
printed. Nothing here holds or prints a whole token or the client secret: tokens appear as
fingerprints, and every string taken from the store is masked on the way out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from mlauth import __version__
from mlauth.config import env_settings, token_hosts_row
from mlauth.errors import StoreError
from mlauth.preflight import refresh_problem
from mlauth.secret import Secret, mask
from mlauth.stores import store_from_env
from mlauth.stores.base import TokenStore
from mlauth.stores.envfile import EnvFileStore, read_env_file, secrets_of
from mlauth.stores.select import STORE_KEY
from mlauth.tokens import TokenSet

from .sellers import store_kind
from .times import moment

__all__ = ["DEGRADED", "OK", "REAUTHORIZE", "SCHEMA", "Health", "Reason", "examine"]

#: The document's type and major version. Adding a field keeps it; removing or renaming one,
#: or changing what a value means, makes it ``mlauth-status/2``.
SCHEMA = "mlauth-status/1"

OK = "ok"
DEGRADED = "degraded"
REAUTHORIZE = "reauthorization_required"

# The status_details() rows that are answers kept beside the store, which it does not hold
# yet: the .env's journal (mlauth.stores.envfile) and the Redis hash's answer field
# (mlauth.stores.redis).
_PENDING_LABELS = ("journal", "answer")


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why the state is not ``ok``: a stable ``code`` for scripts, a ``message`` for people."""

    code: str
    state: str
    message: str

    @property
    def first(self) -> bool:
        """No refresh token at all: the app was never authorized (not *re*-authorized)."""
        return self.code == "no_refresh_token"


@dataclasses.dataclass
class Health:
    """The state of one ``.env``'s chain, its reasons, and the JSON document."""

    state: str
    reasons: list[Reason]
    document: dict[str, Any]
    #: What the store holds (None: it could not be read); repr shows fingerprints only.
    tokens: TokenSet | None
    #: The seller whose chain it is, in a store of many sellers; None for a one-seller store.
    seller: str | None = None

    def reason(self, state: str) -> Reason | None:
        """The first reason for ``state``, if any."""
        return next((r for r in self.reasons if r.state == state), None)

    def render(self) -> str:
        """The document as one JSON text: ASCII only (a control character from the store
        arrives escaped, never raw on a terminal), no NaN or infinity (not JSON)."""
        return json.dumps(self.document, indent=2, allow_nan=False)


def examine(env: str, seller: str | None = None) -> Health:
    """Read the chain ``env`` names (``seller``'s, in a store of many sellers), once, without
    refreshing or sending anything.

    Raises :class:`~mlauth.ConfigError` when the configuration itself is broken; a store that
    cannot be read is a ``degraded`` state instead (running processes keep the token they
    hold until it expires).
    """
    env_settings(env)  # credentials, ML_TOKEN_URL, ML_API_HOSTS: a refresh needs them all
    store = store_from_env(env, seller=seller)
    values = read_env_file(env)
    known: list[Secret | None] = list(secrets_of(values))
    kind = _kind(store, values.get(STORE_KEY) or "")
    del values  # the whole .env: not a local of what is raised below
    reasons: list[Reason] = []
    unreadable: list[str] = []

    def guarded(read: Any) -> Any:
        try:
            return read()
        except StoreError as exc:
            unreadable.append(str(exc))
            return None

    loaded = guarded(store.load)
    tokens: TokenSet | None = None if loaded is None else loaded[0]
    if tokens is not None:
        known += [tokens.access_token, tokens.refresh_token]
    busy = guarded(store.refresh_in_progress) if tokens is not None else None
    dead = guarded(store.reauthorization_required) if tokens is not None else None
    details: list[tuple[str, str]] = []
    if tokens is not None:
        details = guarded(store.status_details) or []
    if unreadable:
        reasons.append(Reason("store_unreadable", DEGRADED, unreadable[0]))
    elif tokens is not None and tokens.refresh_token is not None and dead is None:
        problem = refresh_problem(store)
        if problem is not None:
            reasons.append(Reason("store_not_writable", DEGRADED, problem))
    if tokens is not None:
        reasons += _token_reasons(store, tokens, dead)
    pending = [value for label, value in details if label in _PENDING_LABELS]
    if pending:
        reasons.append(Reason("answer_pending", DEGRADED, pending[0]))
    reasons = [dataclasses.replace(r, message=mask(r.message, known)) for r in reasons]
    state = _worst(reasons)
    document = {
        "schema": SCHEMA,
        "mlauth_version": __version__,
        "generated_at": moment(time.time()),
        "env": os.path.abspath(env),
        "state": state,
        "reasons": [{"code": r.code, "state": r.state, "message": r.message} for r in reasons],
        "store": {
            "kind": kind,
            "location": mask(store.location, known),  # a Redis URL's password is masked there
            "seller": store.seller,  # the chain's, in a store of many sellers (events say it too)
            "readable": not unreadable,
            "details": [{"label": label, "value": mask(value, known)} for label, value in details],
        },
        "tokens": None if tokens is None else _tokens(tokens, known),
        "refresh_in_progress": busy,
        "reauthorization": {
            "required": None if tokens is None else state == REAUTHORIZE,
            "reason": next((r.code for r in reasons if r.state == REAUTHORIZE), None),
        },
        "journal": None if tokens is None else {"pending": len(pending)},
        "token_sent_to": token_hosts_row(env),
    }
    return Health(state, reasons, document, tokens, store.seller)


def _token_reasons(store: TokenStore, tokens: TokenSet, dead: str | None) -> list[Reason]:
    if tokens.refresh_token is None:
        return [Reason("no_refresh_token", REAUTHORIZE, f"{store.location} holds no refresh token")]
    if dead is not None:
        return [Reason("refresh_token_dead", REAUTHORIZE, dead)]
    if tokens.access_token is None:
        return [
            Reason(
                "access_token_missing",
                DEGRADED,
                "no access token is stored: the next request refreshes first",
            )
        ]
    left = tokens.expires_in()
    if left is not None and left <= 0:
        ago = f"{-left:.0f}s ago" if math.isfinite(left) else "at an unknown time"
        return [
            Reason(
                "access_token_expired",
                DEGRADED,
                f"the access token expired {ago}: the next request refreshes first; if a "
                "pipeline runs all the time, its refreshes are failing (see its log)",
            )
        ]
    return []


def _worst(reasons: list[Reason]) -> str:
    states = {reason.state for reason in reasons}
    for state in (REAUTHORIZE, DEGRADED):
        if state in states:
            return state
    return OK


def _kind(store: TokenStore, url: str) -> str:
    if isinstance(store, EnvFileStore):
        return "env_file"
    if store.seller is not None:  # one seller's chain in a store of many
        return store_kind(url)
    # Imported only when the extra is: a store of that class means the module is loaded.
    redis_store = sys.modules.get("mlauth.stores.redis")
    if redis_store is not None and isinstance(store, redis_store.RedisStore):
        return "redis"
    return "other"


def _tokens(tokens: TokenSet, known: list[Secret | None]) -> dict[str, Any]:
    left = tokens.expires_in()
    seconds_left = round(left, 3) if left is not None and math.isfinite(left) else None
    by = tokens.refreshed_by
    return {
        "access_token_fingerprint": (
            None if tokens.access_token is None else tokens.access_token.fingerprint
        ),
        "refresh_token_fingerprint": (
            None if tokens.refresh_token is None else tokens.refresh_token.fingerprint
        ),
        "expires_at": moment(tokens.expires_at),
        "seconds_left": seconds_left,
        "expired": None if seconds_left is None else seconds_left <= 0,
        "last_refresh": {
            "at": moment(tokens.refreshed_at),
            "by": None if by is None else mask(by, known),
        },
    }
