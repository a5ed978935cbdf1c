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
``MLAUTH_LOG_FORMAT`` (``text``, the default, or ``json``) sets how: ``json`` writes each
record as one JSON object on one line (:class:`JsonFormatter`, which an app that configures
logging itself can give its own handlers).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping

from .errors import ConfigError
from .terminal import is_unsafe, printable

__all__ = [
    "EVENT_ATTRIBUTE",
    "FORMATS",
    "FORMAT_VARIABLE",
    "LEVEL_VARIABLE",
    "OFF",
    "JsonFormatter",
    "StderrFallback",
    "level_from_environment",
    "show_on_stderr",
]

LEVEL_VARIABLE = "MLAUTH_LOG_LEVEL"
FORMAT_VARIABLE = "MLAUTH_LOG_FORMAT"
OFF = "off"
TEXT, JSON = "text", "json"
FORMATS = (TEXT, JSON)
# The attribute a record carries the fields of an mlauth event in (a dict of JSON-safe
# values: kind, at, store, pid and the kind's own), which the JSON objects put at top level.
EVENT_ATTRIBUTE = "mlauth_event"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS.update(error=logging.ERROR, critical=logging.CRITICAL)

log = logging.getLogger("mlauth")


class StderrFallback(logging.Handler):
    """Writes a record to ``sys.stderr`` unless another handler on its way will handle it.

    Decided per record, not once at set-up: handlers an app adds later take over at once.
    """

    def __init__(self, level: int = logging.WARNING, log_format: str = TEXT) -> None:
        super().__init__(level)
        self.use_format(log_format)

    def use_format(self, log_format: str) -> None:
        """``text`` (``mlauth: LEVEL: message``) or ``json`` (:class:`JsonFormatter`)."""
        if log_format == JSON:
            self.setFormatter(JsonFormatter())
        elif log_format == TEXT:
            self.setFormatter(_PrintableFormatter("mlauth: %(levelname)s: %(message)s"))
        else:  # a caller's bug; the environment's value was checked (and forgiven) before
            raise ConfigError(f"log format {log_format!r}: use {TEXT!r} or {JSON!r}")

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


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line, for log collectors.

    Its fields: ``time`` (ISO 8601, UTC, milliseconds: ``2026-01-02T03:04:05.678Z``),
    ``level``, ``logger``, ``message``, ``pid``, and ``exception`` (the formatted traceback)
    when the record has one, ``stack`` when it has stack information. A record that carries
    an mlauth event (``kind``, ``at``, ``store``, ``seller``, ``pid`` and the kind's own
    fields) has those fields at the top level too; one named like a field above is written
    as ``event_<name>`` (but for the event's ``pid``, which is the record's own). For an app
    that configures logging itself::

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.getLogger("mlauth").addHandler(handler)

    Every line is one object whatever the values hold: CR, LF, NUL and every other character
    a terminal or a line-splitting reader may act on (U+2028, U+2029, bidi overrides, lone
    surrogates from undecodable paths) is written as a ``\\uXXXX`` escape, which a JSON
    parser turns back into the same text; a value JSON cannot hold (an object, NaN) is
    written as its ``str``. Formatting never raises.
    """

    def format(self, record: logging.LogRecord) -> str:
        try:
            fields = self._fields(record)
        except Exception as exc:  # noqa: BLE001 (logging must never break the pipeline)
            fields = self._unformattable(record, exc)
        return _dumps(fields)

    def _fields(self, record: logging.LogRecord) -> dict[str, object]:
        fields: dict[str, object] = {
            "time": _utc_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        event = getattr(record, EVENT_ATTRIBUTE, None)
        if isinstance(event, Mapping):
            for key, value in event.items():
                name = str(key)
                # The record's own fields stay what they say; the event's pid, the same
                # process's, simply agrees with the record's.
                while name in fields and not (name == "pid" and _same_int(value, record.process)):
                    name = f"event_{name}"
                fields[name] = value
        return fields

    @staticmethod
    def _unformattable(record: logging.LogRecord, exc: Exception) -> dict[str, object]:
        """What can still be said about a record whose message (or event) did not format:
        the template, never the arguments, which were what failed."""
        return {
            "time": _utc_time(record),
            "level": str(record.levelname),
            "logger": str(record.name),
            "message": _safe_str(record.msg),
            "pid": record.process,
            "format_error": f"{type(exc).__name__}: {_safe_str(exc)}",
        }


def _same_int(value: object, pid: int | None) -> bool:
    return type(value) is int and value == pid  # no foreign __eq__ runs


def _utc_time(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 (a value's own __str__ may raise)
        return f"<{type(value).__name__} that cannot be shown>"


def _dumps(fields: dict[str, object]) -> str:
    """One line of JSON; a field JSON cannot hold is written as its text instead."""
    try:
        text = json.dumps(fields, ensure_ascii=False, allow_nan=False, default=_safe_str)
    except (TypeError, ValueError, RecursionError):  # NaN, non-str keys, a cycle
        plain: dict[str, object] = {}
        for key, value in fields.items():
            try:
                json.dumps(value, allow_nan=False, default=_safe_str)
                plain[key] = value
            except (TypeError, ValueError, RecursionError):
                plain[key] = _safe_str(value)
        text = json.dumps(plain, ensure_ascii=False, default=_safe_str)
    # json escapes only C0 controls, the quote and the backslash; other characters that end
    # or rewrite a line somewhere (U+2028/2029 in JavaScript and some log shippers, C1, bidi
    # overrides, surrogates a strict UTF-8 stream refuses) become escapes too. Lossless: they
    # only occur inside strings, and a parser turns the escape back into the character.
    if text.isprintable():  # the common case, in one pass
        return text
    return _BEYOND_PRINTABLE_ASCII.sub(_escape, text)


# The candidates (json has escaped C0 already); is_unsafe then decides per character.
_BEYOND_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if not is_unsafe(char):
        return char
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # beyond the BMP: JSON spells it as a UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


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
        # Not an error: a typo in a logging knob must not stop a pipeline. (A bad format too
        # is said once, by the caller's show_on_stderr.)
        show_on_stderr(logging.WARNING, _format_from_environment(environ)[0])
        log.warning(
            "%s=%r is not a level; use debug, info, warning, error or off (showing warnings)",
            LEVEL_VARIABLE,
            raw,
        )
        return logging.WARNING
    return level


def show_on_stderr(level: int | None, log_format: str | None = None) -> None:
    """Show mlauth's records of ``level`` and above on stderr when no app handler would.

    ``None`` switches the fallback off. Idempotent: one handler, whose level and format are
    updated. For levels below WARNING the ``mlauth`` logger's own level is lowered too (it
    inherits the root's WARNING otherwise), which an app's own handlers then also see.
    ``log_format`` is ``text`` or ``json``; None reads ``MLAUTH_LOG_FORMAT``, where a value
    that is neither gets a warning and text.
    """
    global _fallback
    if level is None:
        if _fallback is not None:
            log.removeHandler(_fallback)
            _fallback = None
        return
    bad = None
    if log_format is None:
        log_format, bad = _format_from_environment()
    if _fallback is None:
        _fallback = StderrFallback(level, log_format)
        log.addHandler(_fallback)
    else:
        _fallback.setLevel(level)
        _fallback.use_format(log_format)
    if log.getEffectiveLevel() > level:
        log.setLevel(level)
    if bad is not None:
        # Not an error: a typo in a logging knob must not stop a pipeline. Said only where
        # warnings are shown (not under -q, MLAUTH_LOG_LEVEL=off or error).
        log.warning(
            "%s=%r is not a log format; use text or json (writing text)", FORMAT_VARIABLE, bad
        )


def _format_from_environment(environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """The format ``MLAUTH_LOG_FORMAT`` asks for, and the value itself when it is not one."""
    raw = (os.environ if environ is None else environ).get(FORMAT_VARIABLE, "").strip().lower()
    if not raw:
        return TEXT, None
    if raw in FORMATS:
        return raw, None
    return TEXT, raw
