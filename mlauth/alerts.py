"""An alert when people must act: a command run once per incident, for every process at once.

``ML_ALERT_COMMAND`` (a ``.env`` key or an environment variable; ``mlauth run --alert CMD``
sets the latter) is run with ``/bin/sh -c`` when one of these incidents begins on the store:

- ``reauthorization_required``: the refresh token is dead; a person must run ``mlauth login``;
- ``refresh_failing``: refreshes have been failing for ``ML_ALERT_FAILING_MINUTES`` (10);
- ``store_unavailable``: the token store cannot be read or written.

A dead chain is one incident (named by its fingerprint: the next chain that dies alerts
again); failing refreshes end when a refresh succeeds, an unavailable store when it answers
again, and the next such incident alerts again. In a store of many sellers (one database,
a chain per seller) the chain's incidents are each seller's own, named with the seller's
user id: seller B's refresh does not end seller A's failing refreshes; an unavailable store
is the whole database's. The processes on one store agree through it: the first to
open the incident runs the command, the others see it open (the store's
:meth:`~mlauth.stores.base.TokenStore.incidents`: files beside the ``.env`` made with
``O_EXCL``, keys in Redis set with ``NX``). A store that cannot keep them (a custom one, or one
that is down) alerts once per process.

The command gets the incident in environment variables (``MLAUTH_ALERT``,
``MLAUTH_ALERT_MESSAGE``, ``MLAUTH_ALERT_SELLER``, ...) and as JSON on stdin; never a token or
the client secret, and the ``ML_*`` variables that could hold one are removed from its
environment. It runs on mlauth's event thread (:mod:`mlauth.events`), never in a request, and
a process that exits waits for it up to :data:`EXIT_WAIT` seconds.

One subscriber per command, whatever the number of chains: an app that loads thousands of
sellers' auths in one process must not offer every event to thousands of subscribers, so
each event finds its chain's state by (store, seller) in a dict.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping

from . import events
from .errors import sealed
from .secret import Secret, mask, redact_url
from .stores.base import TokenStore
from .stores.incidents import Incidents, MemoryIncidents
from .terminal import printable

__all__ = ["COMMAND_KEY", "FAILING_KEY", "watch"]

log = logging.getLogger("mlauth")

COMMAND_KEY = "ML_ALERT_COMMAND"
FAILING_KEY = "ML_ALERT_FAILING_MINUTES"
DEFAULT_FAILING_MINUTES = 10.0
#: The longest an alert command may run; it is killed after.
COMMAND_TIMEOUT = 60.0
#: The longest a process that exits waits for its alerts to be run.
EXIT_WAIT = 30.0
#: An incident opened this long ago and never seen to end alerts again (once a day).
REMIND_AFTER = 24 * 3600.0
#: The longest value of an MLAUTH_ALERT_* variable (a server's message can be anything).
VALUE_LIMIT = 4096
# Removed from the command's environment: they may hold a secret.
_SECRET_VARIABLES = ("ML_CLIENT_SECRET", "ML_ACCESS_TOKEN", "ML_REFRESH_TOKEN", "ML_TOKEN_STORE")

_MESSAGES = {
    "reauthorization_required": "the seller must authorize the app again: run `mlauth login`",
    "refresh_failing": "token refreshes have been failing since {since}",
    "store_unavailable": "the token store cannot be read or written",
}
# The same, for one seller's chain in a store of many.
_SELLER_MESSAGES = {
    "reauthorization_required": (
        "seller {seller} must authorize the app again: run `mlauth login --seller {seller}`"
    ),
    "refresh_failing": "seller {seller}'s token refreshes have been failing since {since}",
}
# The events the alerts act on.
_KINDS = (
    "refreshed",
    "adopted",
    "refresh_failed",
    "reauthorization_required",
    "store_unavailable",
    "store_back",
)
# The events about the whole store: its sellers share its database, and go down with it.
_STORE_KINDS = frozenset(("store_unavailable", "store_back"))


def _incident_part(seller: str) -> str:
    """``seller`` as part of an incident's name, which becomes a file name beside the
    ``.env`` or a Redis key: a user id as it is, anything else (a custom store's seller) as
    a digest, so no ``/`` or ``..`` ever reaches a path."""
    if re.fullmatch(r"[0-9A-Za-z_-]{1,64}", seller):
        return seller
    return "sha256-" + hashlib.sha256(seller.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class _Alerter:
    """One chain's incidents (a store's, or one seller's in a store of many): opens and
    closes them as its events come, runs the command."""

    def __init__(
        self,
        command: str,
        store: str,
        incidents: Incidents,
        failing_after: float,
        known: Callable[[], Iterable[Secret | None]],
        seller: str | None = None,
    ) -> None:
        self.command = command
        self.store = store
        self.seller = seller
        # A seller's incidents are named for it: its peers keep theirs in the same place.
        self._suffix = "" if seller is None else "." + _incident_part(seller)
        self.incidents = incidents
        self.failing_after = failing_after
        self.known = known  # the client secret and the tokens: never in the command's input
        self._me = uuid.uuid4().hex  # who opened an incident, beside when
        self._alone = MemoryIncidents()  # when the store cannot say (it is down)

    def _open(self, name: str, value: str) -> tuple[bool, str]:
        try:
            return self.incidents.open(name, value)
        except Exception as exc:  # noqa: BLE001 (Redis down, a folder gone: alert alone)
            log.debug(
                "incidents of %s unavailable (%s); this process decides alone", self.store, exc
            )
            return self._alone.open(name, value)

    def _close(self, name: str) -> None:
        self._alone.close(name)
        try:
            self.incidents.close(name)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not close the incident %s of %s: %s", name, self.store, exc)

    def __call__(self, event: events.Event) -> None:
        kind = event.kind
        failing = "failing" + self._suffix
        try:
            if kind in ("refreshed", "adopted"):
                # Refreshes work again, here or in a peer. A dead chain's incident is its own
                # (named by its fingerprint): the next chain that dies alerts again.
                for name in (failing, "alert.refresh_failing" + self._suffix):
                    self._close(name)
            elif kind == "store_back":
                self._close("alert.store_unavailable")
            elif kind == "reauthorization_required":
                chain = str(event.fields()["chain"]).replace(":", "-")
                self._begin(kind, event, event.at, name=f"{kind}{self._suffix}.{chain}")
            elif kind == "store_unavailable":
                self._begin(kind, event, event.at, name=kind)  # the whole store's
            elif kind == "refresh_failed":
                started = self._failing_since(failing, event.at)
                if event.at - started >= self.failing_after:
                    self._begin("refresh_failing", event, started)
        except Exception:  # a bug here must not stop the other chains' alerts
            log.warning("could not handle the incident for %s", self.store, exc_info=True)

    def _failing_since(self, name: str, now: float) -> float:
        """When refreshes began failing, as the first process to see it recorded (in the
        incident ``name``); a record older than :data:`REMIND_AFTER` is a leftover (its end
        went unseen) and starts over."""
        _, since = self._open(name, repr(now))
        started = _number(since.split()[0] if since.strip() else "", now)
        if now - started > REMIND_AFTER:
            self._close(name)
            _, since = self._open(name, repr(now))
            started = _number(since.split()[0] if since.strip() else "", now)
        return started

    def _begin(
        self, incident: str, event: events.Event, since: float, *, name: str | None = None
    ) -> None:
        """Open the incident and alert, unless a process (this one or a peer) opened it less
        than :data:`REMIND_AFTER` ago: an incident whose end nobody saw (a cron job that
        exited first) reminds once a day rather than silencing every later one."""
        key = f"alert.{name or incident + self._suffix}"
        opened, held = self._open(key, f"{event.at!r} {self._me}")
        if not opened and event.at - _number(held.split()[0] if held else "", event.at) > (
            REMIND_AFTER
        ):
            self._close(key)
            opened, _ = self._open(key, f"{event.at!r} {self._me}")
        if opened and not self.run(incident, event, since):
            self._close(key)  # the command could not start: the next process may try

    def run(self, incident: str, event: events.Event, since: float) -> bool:
        """Run the command for ``incident``; whether it could be started."""
        when = datetime.datetime.fromtimestamp(since, datetime.timezone.utc).isoformat()
        known = [secret for secret in self.known() if secret is not None]
        # An unavailable store is every seller's: the event names the one who met it first.
        seller = None if incident == "store_unavailable" else self.seller
        text = (_MESSAGES if seller is None else _SELLER_MESSAGES)[incident]
        message = mask(f"mlauth: {text.format(since=when, seller=seller)} ({self.store})", known)
        fields = {k: mask(v, known) if isinstance(v, str) else v for k, v in event.fields().items()}
        document: dict[str, object] = {
            "alert": incident,
            "message": message,
            "store": self.store,
            "seller": seller,
            "since": since,
            "host": socket.gethostname(),
            "event": fields,
        }
        variables = {
            "MLAUTH_ALERT": incident,
            "MLAUTH_ALERT_MESSAGE": message,
            "MLAUTH_ALERT_STORE": self.store,
            "MLAUTH_ALERT_SELLER": seller or "",
            "MLAUTH_ALERT_SINCE": when,
            "MLAUTH_ALERT_HOST": str(document["host"]),
            "MLAUTH_ALERT_PID": str(fields["pid"]),
            "MLAUTH_ALERT_REASON": str(fields.get("reason", "")),
        }
        try:
            done = subprocess.run(  # noqa: S603 (the user's own command, from their .env)
                ["/bin/sh", "-c", self.command],
                input=json.dumps(document).encode(),
                env=_environment(variables, known),
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            # Not the exception's text: it quotes the command, and a webhook's URL is a secret.
            log.warning("the alert command (%s) timed out after %gs", COMMAND_KEY, COMMAND_TIMEOUT)
            return True
        except (OSError, ValueError) as exc:
            log.warning(
                "the alert command (%s) could not start: %s",
                COMMAND_KEY,
                exc.strerror if isinstance(exc, OSError) else type(exc).__name__,
            )
            return False
        if done.returncode != 0:
            tail = printable(done.stderr.decode(errors="replace").strip()).splitlines()[-3:]
            log.warning(
                "the alert command (%s) exited with %d: %s",
                COMMAND_KEY,
                done.returncode,
                mask(" | ".join(tail), known) or "no output",
            )
        else:
            log.info("alert %s sent for %s", incident, self.store)
        return True


def _number(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


def _value(text: str) -> str:
    """An environment variable's value: no NUL (which no environment can hold), no control
    character, at most :data:`VALUE_LIMIT` characters."""
    text = printable(text.replace("\0", "\\x00"))
    return text if len(text) <= VALUE_LIMIT else text[: VALUE_LIMIT - 1] + "…"


@sealed  # its locals hold the secrets in plain text, to compare with the environment's values
def _environment(variables: Mapping[str, str], known: Iterable[Secret]) -> dict[str, str]:
    """This process's environment without what may hold a secret, and the incident's
    variables: the ``ML_*`` keys that hold credentials or a store URL, and any variable whose
    value holds a secret this process knows or a URL with a password (a ``MELI_SECRET=`` from
    ``docker --env-file`` is dropped as surely as ``ML_CLIENT_SECRET``)."""
    values = [secret.reveal() for secret in known]
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in _SECRET_VARIABLES
        and not any(value and value in v for value in values)
        and redact_url(v) == v
    }
    environment.update({k: _value(v) for k, v in variables.items()})
    return environment


class _Watch:
    """One alert command's subscriber: every event goes to the one chain it is about, found
    by (store, seller) in a dict, so its cost does not grow with the chains watched."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.chains: dict[tuple[str, str | None], _Alerter] = {}
        # Per store location, the chain that handles the store's own incidents (the first
        # watched there): one of them, so they open and close in one place.
        self.stores: dict[str, _Alerter] = {}
        self.subscription = events.subscribe(self, kinds=_KINDS)

    def add(self, alerter: _Alerter) -> None:
        self.chains[(alerter.store, alerter.seller)] = alerter
        self.stores.setdefault(alerter.store, alerter)

    def __call__(self, event: events.Event) -> None:
        if event.kind in _STORE_KINDS:
            alerter = self.stores.get(event.store)
        else:
            alerter = self.chains.get((event.store, event.seller))
        if alerter is not None:
            alerter(event)

    def __repr__(self) -> str:
        return f"<alerts for {len(self.chains)} chains>"  # not the command: a URL may be secret


# Per command (a process whose auths name two commands runs both).
_watching: dict[str, _Watch] = {}
_watching_lock = threading.Lock()


def watch(
    command: str,
    store: TokenStore,
    failing_after: float,
    known: Callable[[], Iterable[Secret | None]],
) -> None:
    """Run ``command`` for the incidents of ``store``'s chain (its seller's, in a store of
    many) from now on, once per process however many auths share it; ``known`` gives the
    secrets to keep out of it."""
    chain = (store.location, store.seller)
    with _watching_lock:
        watching = _watching.get(command)
        if watching is not None and chain in watching.chains:
            return
        if watching is None:
            watching = _watching[command] = _Watch(command)
            if len(_watching) == 1:
                atexit.register(events.flush, EXIT_WAIT)  # before the events' own, shorter wait
        watching.add(
            _Alerter(command, store.location, store.incidents(), failing_after, known, store.seller)
        )
