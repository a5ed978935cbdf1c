"""An alert when people must act: a command run once per incident, for every process at once.

``ML_ALERT_COMMAND`` (a ``.env`` key or an environment variable; ``mlauth run --alert CMD``
sets the latter) is run with ``/bin/sh -c`` when one of these incidents begins on the store:

- ``reauthorization_required``: the refresh token is dead; a person must run ``mlauth login``;
- ``refresh_failing``: refreshes have been failing for ``ML_ALERT_FAILING_MINUTES`` (10);
- ``store_unavailable``: the token store cannot be read or written.

A dead chain is one incident (named by its fingerprint: the next chain that dies alerts
again); failing refreshes end when a refresh succeeds, an unavailable store when it answers
again, and the next such incident alerts again. The processes on one store agree through it:
the first to
open the incident runs the command, the others see it open (the store's
:meth:`~mlauth.stores.base.TokenStore.incidents`: files beside the ``.env`` made with
``O_EXCL``, keys in Redis set with ``NX``). A store that cannot keep them (a custom one, or one
that is down) alerts once per process.

The command gets the incident in environment variables (``MLAUTH_ALERT``,
``MLAUTH_ALERT_MESSAGE``, ...) and as JSON on stdin; never a token or the client secret, and
the ``ML_*`` variables
that could hold one are removed from its environment. It runs on mlauth's event thread
(:mod:`mlauth.events`), never in a request, and a process that exits waits for it up to
:data:`EXIT_WAIT` seconds.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Mapping

from . import events
from .stores.incidents import Incidents, MemoryIncidents

__all__ = ["COMMAND_KEY", "FAILING_KEY", "watch"]

log = logging.getLogger("mlauth")

COMMAND_KEY = "ML_ALERT_COMMAND"
FAILING_KEY = "ML_ALERT_FAILING_MINUTES"
DEFAULT_FAILING_MINUTES = 10.0
#: The longest an alert command may run; it is killed after.
COMMAND_TIMEOUT = 60.0
#: The longest a process that exits waits for its alerts to be run.
EXIT_WAIT = 30.0
# Removed from the command's environment: they may hold a secret.
_SECRET_VARIABLES = ("ML_CLIENT_SECRET", "ML_ACCESS_TOKEN", "ML_REFRESH_TOKEN")

_MESSAGES = {
    "reauthorization_required": "the seller must authorize the app again: run `mlauth login`",
    "refresh_failing": "token refreshes have been failing since {since}",
    "store_unavailable": "the token store cannot be read or written",
}


class _Alerter:
    """Subscribed to one store's events: opens and closes its incidents, runs the command."""

    def __init__(
        self, command: str, store: str, incidents: Incidents, failing_after: float
    ) -> None:
        self.command = command
        self.store = store
        self.incidents = incidents
        self.failing_after = failing_after
        self._me = uuid.uuid4().hex  # what this process writes when it opens an incident
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
        if event.store != self.store:
            return
        kind = event.kind
        try:
            if kind == "refreshed":
                # A dead chain's incident is its own (named by its fingerprint): a new chain
                # that dies alerts again, whoever saved it and whether or not it refreshed.
                for name in ("failing", "alert.refresh_failing"):
                    self._close(name)
            elif kind == "store_back":
                self._close("alert.store_unavailable")
            elif kind == "reauthorization_required":
                chain = str(event.fields()["chain"]).replace(":", "-")
                self._begin(kind, event, event.at, name=f"{kind}.{chain}")
            elif kind == "store_unavailable":
                self._begin(kind, event, event.at)
            elif kind == "refresh_failed":
                _, since = self._open("failing", repr(event.at))
                started = _number(since, event.at)
                if event.at - started >= self.failing_after:
                    self._begin("refresh_failing", event, started)
        except Exception:  # a bug here must not stop the other subscribers
            log.warning("could not handle the incident for %s", self.store, exc_info=True)

    def _begin(
        self, incident: str, event: events.Event, since: float, *, name: str | None = None
    ) -> None:
        opened, _ = self._open(f"alert.{name or incident}", self._me)
        if opened:
            self.run(incident, event, since)

    def run(self, incident: str, event: events.Event, since: float) -> None:
        when = datetime.datetime.fromtimestamp(since, datetime.timezone.utc).isoformat()
        message = f"mlauth: {_MESSAGES[incident].format(since=when)} ({self.store})"
        fields = event.fields()
        document: dict[str, object] = {
            "alert": incident,
            "message": message,
            "store": self.store,
            "since": since,
            "host": socket.gethostname(),
            "event": fields,
        }
        variables = {
            "MLAUTH_ALERT": incident,
            "MLAUTH_ALERT_MESSAGE": message,
            "MLAUTH_ALERT_STORE": self.store,
            "MLAUTH_ALERT_SINCE": when,
            "MLAUTH_ALERT_HOST": str(document["host"]),
            "MLAUTH_ALERT_PID": str(fields["pid"]),
            "MLAUTH_ALERT_REASON": str(fields.get("reason", "")),
        }
        environment = _environment(variables)
        try:
            done = subprocess.run(  # noqa: S603 (the user's own command, from their .env)
                ["/bin/sh", "-c", self.command],
                input=json.dumps(document).encode(),
                env=environment,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("the alert command (%s) failed: %s", COMMAND_KEY, exc)
            return
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
            log.warning(
                "the alert command (%s) exited with %d: %s",
                COMMAND_KEY,
                done.returncode,
                " | ".join(tail) or "no output",
            )
        else:
            log.info("alert %s sent for %s", incident, self.store)


def _number(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


def _environment(variables: Mapping[str, str]) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in _SECRET_VARIABLES}
    environment.update(variables)
    return environment


_watching: dict[tuple[str, str], events.Subscription] = {}
_watching_lock = threading.Lock()


def watch(command: str, store: str, incidents: Incidents, failing_after: float) -> None:
    """Run ``command`` for the incidents of ``store`` (its location) from now on, once per
    process however many auths share it."""
    with _watching_lock:
        if (store, command) in _watching:
            return
        alerter = _Alerter(command, store, incidents, failing_after)
        kinds = (
            "refreshed",
            "refresh_failed",
            "reauthorization_required",
            "store_unavailable",
            "store_back",
        )
        _watching[(store, command)] = events.subscribe(alerter, kinds=kinds)
        if len(_watching) == 1:
            atexit.register(events.flush, EXIT_WAIT)  # before the events' own, shorter wait
