"""Showing mlauth's warnings and errors on stderr when nothing else would.

The library adds only a ``NullHandler`` (a library must not configure logging), and that
one handler is enough to switch off Python's last-resort handler: a script that never set
up logging would then never see an ERROR such as "refreshed tokens could not be saved". So
the entry points mlauth owns (the ``mlauth`` command, :func:`mlauth.install` and with it
``mlauth run``) attach :class:`StderrFallback`, which prints a record only when no other
handler on the record's way to the root would. An app that configures logging itself,
before or after (``logging.basicConfig()`` in a script under ``mlauth run`` runs after the
``sitecustomize`` that installed mlauth), sees each line once, through its own handlers.

``MLAUTH_LOG_LEVEL`` (``debug``, ``info``, ``warning``, ``error`` or ``off``; default
``warning``) sets what the fallback shows; the command line's ``-v``/``-q`` override it.
"""

from __future__ import annotations

import logging
import os
import sys

from .terminal import printable

__all__ = ["LEVEL_VARIABLE", "OFF", "StderrFallback", "level_from_environment", "show_on_stderr"]

LEVEL_VARIABLE = "MLAUTH_LOG_LEVEL"
OFF = "off"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS.update(error=logging.ERROR, critical=logging.CRITICAL)

log = logging.getLogger("mlauth")


class StderrFallback(logging.Handler):
    """Writes a record to ``sys.stderr`` unless another handler on its way will handle it.

    Decided per record, not once at set-up: handlers an app adds later take over at once.
    """

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.setFormatter(_PrintableFormatter("mlauth: %(levelname)s: %(message)s"))

    def handle(self, record: logging.LogRecord) -> bool:
        if _handled_elsewhere(self, logging.getLogger(record.name)):
            return False
        return bool(super().handle(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Looked up at each record, as Python's last-resort handler does: a test harness
            # or the app may have replaced sys.stderr since.
            stream = sys.stderr
            if stream is None:  # pythonw, or a daemon that closed it
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging must never break the pipeline)
            self.handleError(record)


class _PrintableFormatter(logging.Formatter):
    """The record's line with control characters escaped (:func:`mlauth.terminal.printable`):
    messages quote what stores and files hold. A traceback, added after, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def _handled_elsewhere(ours: logging.Handler, logger: logging.Logger) -> bool:
    """Whether a handler other than ours (and other than a NullHandler) gets the record."""
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if handler is not ours and not isinstance(handler, logging.NullHandler):
                return True
        if not node.propagate:
            break
        node = node.parent
    return False


_fallback: StderrFallback | None = None


def level_from_environment(environ: dict[str, str] | None = None) -> int | None:
    """The level ``MLAUTH_LOG_LEVEL`` asks for (None for ``off``); WARNING if unset or bad."""
    raw = (os.environ if environ is None else environ).get(LEVEL_VARIABLE, "").strip().lower()
    if raw == OFF:
        return None
    if not raw:
        return logging.WARNING
    level = _LEVELS.get(raw)
    if level is None:
        # Not an error: a typo in a logging knob must not stop a pipeline.
        show_on_stderr(logging.WARNING)
        log.warning(
            "%s=%r is not a level; use debug, info, warning, error or off (showing warnings)",
            LEVEL_VARIABLE,
            raw,
        )
        return logging.WARNING
    return level


def show_on_stderr(level: int | None) -> None:
    """Show mlauth's records of ``level`` and above on stderr when no app handler would.

    ``None`` switches the fallback off. Idempotent: one handler, whose level is updated. For
    levels below WARNING the ``mlauth`` logger's own level is lowered too (it inherits the
    root's WARNING otherwise), which an app's own handlers then also see.
    """
    global _fallback
    if level is None:
        if _fallback is not None:
            log.removeHandler(_fallback)
            _fallback = None
        return
    if _fallback is None:
        _fallback = StderrFallback(level)
        log.addHandler(_fallback)
    else:
        _fallback.setLevel(level)
    if log.getEffectiveLevel() > level:
        log.setLevel(level)
