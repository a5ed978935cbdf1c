"""What one refresh costs in code and in file opens: the measure issue 19 set ceilings on.

One request meets a 401 on a ``.env`` store, refreshes and is re-sent. A ``sys.setprofile``
hook counts the distinct mlauth functions that run and the calls from one mlauth file into
another; an audit hook counts the opens of the ``.env`` (reads, writes) and the renames onto
it. Used by tests/test_refresh_trace.py, which keeps the ceilings, and printable on its own:
``python -m tests.support.refresh_trace`` (every function, by file).

A comprehension or generator expression is counted as part of the function it is written
in, not as one of its own: Python 3.12 inlines list comprehensions (PEP 709), and the count
must not depend on the interpreter.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import sys
import tempfile
import time
from types import FrameType
from typing import Any

import requests

import mlauth
from mlauth import events
from mlauth.testing import FakeMercadoLibre

PACKAGE = os.path.dirname(mlauth.__file__) + os.sep
# The fake server ships in the package but is not mlauth's refresh path (it runs in its own
# thread anyway, which the profile hook does not see).
TESTING = os.path.join(PACKAGE, "testing") + os.sep
_EXPRESSIONS = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


@dataclasses.dataclass
class Trace:
    functions: set[tuple[str, int, str]] = dataclasses.field(default_factory=set)
    hops: int = 0  # calls from one mlauth file into another
    reads: int = 0  # opens of the .env for reading
    writes: int = 0  # opens of the .env for writing, and renames onto it
    status: int = 0  # of the re-sent request
    refreshes: int = 0  # the fake server's count

    @property
    def files(self) -> set[str]:
        return {path for path, _, _ in self.functions}

    def summary(self) -> str:
        return (
            f"{len(self.functions)} functions in {len(self.files)} files, {self.hops} hops, "
            f"{self.reads} reads and {self.writes} writes of the .env, status {self.status}, "
            f"{self.refreshes} refresh"
        )


def _ours(path: str) -> bool:
    return path.startswith(PACKAGE) and not path.startswith(TESTING)


def trace_401_refresh(folder: str) -> Trace:
    """Run one request that meets a 401, refreshes and is re-sent, and trace it."""
    trace = Trace()
    env = os.path.join(folder, ".env")
    with FakeMercadoLibre() as fake:
        # A FRESH-looking access token the server does not know: the request gets a 401.
        fake.write_env(
            env,
            include_access=False,
            extra={
                "ML_ACCESS_TOKEN": "APP_USR-dead-access-token-not-real",
                "ML_TOKEN_EXPIRES_AT": repr(time.time() + 20000),
            },
        )
        session = requests.Session()
        session.trust_env = False
        session.auth = mlauth.MLAuth.from_env(env)
        real = os.path.realpath(env)

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            if event != "call" or not _ours(path := frame.f_code.co_filename):
                return
            code = frame.f_code
            if code.co_name in _EXPRESSIONS:
                return
            trace.functions.add((path, code.co_firstlineno, code.co_name))
            caller = frame.f_back
            if caller is not None and _ours(caller.f_code.co_filename):
                trace.hops += caller.f_code.co_filename != path

        def audit(event: str, args: tuple[Any, ...]) -> None:
            if not active:
                return
            if event == "open" and isinstance(args[0], (str, bytes)):
                if os.path.realpath(os.fsdecode(args[0])) != real:
                    return
                mode, flags = args[1], args[2] or 0
                written = (mode is not None and any(c in mode for c in "wax+")) or (
                    mode is None and flags & _WRITE_FLAGS
                )
                if written:
                    trace.writes += 1
                else:
                    trace.reads += 1
            elif event in ("os.rename", "os.replace") and (
                os.path.realpath(os.fsdecode(args[1])) == real
            ):
                trace.writes += 1

        # The logging levels mlauth uses when nobody configured it: a level an earlier test
        # left (an INFO logger formats each event's fields) must not change what is counted.
        loggers = [logging.getLogger(name) for name in ("mlauth", "mlauth.events")]
        levels = [logger.level for logger in loggers]
        for logger, level in zip(loggers, (logging.WARNING, logging.NOTSET), strict=True):
            logger.setLevel(level)
        # No subscriber: the path measured is the one every program takes, whatever
        # subscriptions earlier code in this process left.
        subscriptions, events._bus.subscriptions = events._bus.subscriptions, ()
        active = True
        sys.addaudithook(audit)  # cannot be removed: ``active`` turns it off
        sys.setprofile(profile)
        try:
            response = session.get(f"{fake.base_url}/users/me")
        finally:
            sys.setprofile(None)
            active = False
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            events._bus.subscriptions = subscriptions
        trace.status = response.status_code
        trace.refreshes = fake.stats()["refreshes"]
    return trace


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        trace = trace_401_refresh(folder)
    print(trace.summary())
    counts = collections.Counter(os.path.relpath(path, PACKAGE) for path in trace.files)
    for path, _, name in sorted(trace.functions):
        print(f"  {os.path.relpath(path, PACKAGE)}:{name}")
    print(dict(counts))


if __name__ == "__main__":
    main()
