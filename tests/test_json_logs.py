"""`mlauth.logs.JsonFormatter`: one JSON object per record, on one line, whatever it holds.

In one process, on records built here; the environment variable and the fallback's choice
of handler are proven with real processes in tests/test_deploy_logging.py.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator

import pytest

from mlauth.errors import ConfigError
from mlauth.logs import JsonFormatter, StderrFallback
from mlauth.terminal import is_unsafe

EVENT = {"kind": "refreshed", "at": 1767236645.25, "store": "/srv/app/.env", "pid": os.getpid()}


def record(
    message: str = "refreshed in pid %s",
    *args: object,
    level: int = logging.INFO,
    event: object = None,
    exc_info: logging._SysExcInfoType | None = None,
) -> logging.LogRecord:
    made = logging.LogRecord("mlauth.engine", level, __file__, 1, message, args, exc_info)
    if event is not None:
        made.mlauth_event = event
    return made


def one_object(line: str) -> dict[str, object]:
    """``line`` as the single-line, strict JSON object it must be."""
    assert "\n" not in line and "\r" not in line
    assert not any(is_unsafe(char) for char in line), ascii(line)
    line.encode("utf-8")  # strict: no lone surrogate left raw
    found = json.loads(line, parse_constant=pytest.fail)  # NaN/Infinity are not JSON
    assert isinstance(found, dict)
    return found


@pytest.fixture
def json_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own, not propagating, with a JsonFormatter handler on a buffer."""
    logger = logging.getLogger("tests.json_logs")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.DEBUG
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_an_object_holds_time_level_logger_message_and_pid() -> None:
    made = record("refreshed in pid %s", 42, level=logging.WARNING)
    found = one_object(JsonFormatter().format(made))
    assert found == {
        "time": found["time"],
        "level": "WARNING",
        "logger": "mlauth.engine",
        "message": "refreshed in pid 42",
        "pid": os.getpid(),
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(found["time"]))
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(made.created))
    assert found["time"] == f"{expected}.{int(made.msecs):03d}Z"  # UTC, not local time


def test_a_record_with_an_exception_carries_its_traceback() -> None:
    try:
        raise ValueError("the store answered nonsense")
    except ValueError:
        made = record("could not save", exc_info=sys.exc_info())
    found = one_object(JsonFormatter().format(made))
    assert found["message"] == "could not save"
    exception = str(found["exception"])
    assert exception.startswith("Traceback (most recent call last):\n")
    assert exception.endswith("ValueError: the store answered nonsense")


def test_event_fields_are_at_the_top_level(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_logger
    event = {**EVENT, "kind": "lock_waited", "waited_ms": 12.5, "retry_at": None}
    logger.debug("waited for the lock", extra={"mlauth_event": event})
    logger.debug("nothing happened")
    with_event, without = (one_object(line) for line in stream.getvalue().splitlines())
    assert {key: with_event[key] for key in event} == event
    assert with_event["message"] == "waited for the lock"
    assert set(without) == {"time", "level", "logger", "message", "pid"}


def test_an_event_field_never_replaces_the_records_own() -> None:
    event = {
        **EVENT,
        "time": "yesterday",
        "level": "CRITICAL",
        "logger": "forged",
        "message": "forged line",
        "event_message": "already prefixed",
        "exception": "forged traceback",
    }
    try:
        raise KeyError("real")
    except KeyError:
        made = record("the real message", event=event, exc_info=sys.exc_info())
    found = one_object(JsonFormatter().format(made))
    assert (found["level"], found["logger"], found["message"]) == (
        "INFO",
        "mlauth.engine",
        "the real message",
    )
    assert found["time"] != "yesterday" and "KeyError: 'real'" in str(found["exception"])
    assert (found["event_time"], found["event_level"], found["event_logger"]) == (
        "yesterday",
        "CRITICAL",
        "forged",
    )
    assert (found["event_message"], found["event_event_message"]) == (
        "forged line",
        "already prefixed",
    )
    assert found["event_exception"] == "forged traceback"
    assert found["pid"] == os.getpid() and "event_pid" not in found  # the same process

    other = one_object(JsonFormatter().format(record(event={**EVENT, "pid": 1})))
    assert (other["pid"], other["event_pid"]) == (os.getpid(), 1)


HOSTILE = [
    "line\nbreak",
    "carriage\rreturn",
    "nul\x00byte",
    "js\u2028line\u2029separators",
    "lone \udcff surrogate",  # an undecodable byte of a path
    "esc \x1b[2J and csi \x9b2J and del \x7f",
    "bidi \u202eoverride",
    "private \U000f0000 astral",
    "ordinary café 😀",
]


@pytest.mark.parametrize("text", HOSTILE, ids=ascii)
def test_a_hostile_value_stays_on_one_line_and_reads_back_the_same(text: str) -> None:
    made = record("store %s", text, event={**EVENT, "reason": text, text: "as a key"})
    line = JsonFormatter().format(made)
    found = one_object(line)
    assert (found["message"], found["reason"], found[text]) == (f"store {text}", text, "as a key")
    if text.isprintable():
        assert text in line  # readable text is written as it is, not escaped


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_values_json_cannot_hold_are_written_as_text_and_nothing_raises() -> None:
    loop: list[object] = []
    loop.append(loop)
    event = {
        **EVENT,
        "duration_s": math.nan,
        "retry_at": math.inf,
        "raw": b"\x00\xff",
        "when": object(),
        "odd": Unprintable(),
        "nested": {(1, 2): "a tuple key"},
        "loop": loop,
        7: "a key that is not a string",
    }
    found = one_object(JsonFormatter().format(record(event=event)))
    assert (found["duration_s"], found["retry_at"]) == ("nan", "inf")
    assert found["raw"] == str(b"\x00\xff")
    assert str(found["when"]).startswith("<object object at ")
    assert found["odd"] == "<Unprintable that cannot be shown>"
    assert found["nested"] == "{(1, 2): 'a tuple key'}"
    assert found["loop"] == "[[...]]"
    assert found["7"] == "a key that is not a string"
    assert (found["kind"], found["at"], found["store"]) == (
        "refreshed",
        EVENT["at"],
        "/srv/app/.env",
    )


@pytest.mark.parametrize("event", [["not", "a", "dict"], "text", 3])
def test_an_event_that_is_not_a_mapping_is_left_out(event: object) -> None:
    found = one_object(JsonFormatter().format(record("plain", event=event)))
    assert set(found) == {"time", "level", "logger", "message", "pid"}


def test_a_message_whose_arguments_do_not_fit_is_still_one_object() -> None:
    found = one_object(JsonFormatter().format(record("took %s of %s", "one")))
    assert found["message"] == "took %s of %s"  # the template, not the arguments
    assert found["format_error"] == "TypeError: not enough arguments for format string"
    assert found["level"] == "INFO"


def test_the_fallback_writes_json_lines_to_stderr_and_text_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    made = record("tokens moved to %s", "/srv/\x1b[2J", level=logging.ERROR, event=EVENT)
    StderrFallback(logging.WARNING, "json").emit(made)
    StderrFallback(logging.WARNING).emit(made)
    as_json, as_text = capsys.readouterr().err.splitlines()
    assert one_object(as_json)["message"] == "tokens moved to /srv/\x1b[2J"
    assert one_object(as_json)["kind"] == "refreshed"
    assert as_text == "mlauth: ERROR: tokens moved to /srv/\\x1b[2J"


def test_a_format_that_is_neither_is_refused_when_a_caller_names_it() -> None:
    with pytest.raises(ConfigError, match="log format 'xml': use 'text' or 'json'"):
        StderrFallback(logging.WARNING, "xml")
