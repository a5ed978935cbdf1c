"""Helpers for the save-counter tests (tests/test_watch.py): a clock a test moves by hand,
a count of the ``stat``s of one file, a refresh in another process, and a writer that is not
mlauth."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlauth
from mlauth.stores.watch import COUNTER_SUFFIX, StampWatch


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        # From the real clock's reading: a watch that looked under the real clock keeps
        # its deadlines, and this one only ever moves forward.
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def counted_stats(path: Path) -> Iterator[list[str]]:
    """Every file system call of this process about ``path``'s folder while inside, as a
    growing list: ``stat``/``lstat``/``open`` of any file in it (the ``.env``, its counter,
    its lock), and every ``fstat``/``pread`` of any descriptor (which cannot be told apart)."""
    seen: list[str] = []
    folder = os.path.dirname(os.path.abspath(path)) + os.sep
    patched = {name: getattr(os, name) for name in ("stat", "lstat", "open", "fstat", "pread")}

    def counting(name: str) -> Callable[..., Any]:
        real = patched[name]

        def call(target: Any, *args: Any, **kwargs: Any) -> Any:
            # abspath, not realpath: realpath itself calls os.lstat.
            if isinstance(target, int) or os.path.abspath(os.fspath(target)).startswith(folder):
                seen.append(f"{name}({target!r})")
            return real(target, *args, **kwargs)

        return call

    for name in patched:
        setattr(os, name, counting(name))
    try:
        yield seen
    finally:
        for name, real in patched.items():
            setattr(os, name, real)


def watch_of(auth: mlauth.MLAuth) -> StampWatch:
    """The stamp watch of an MLAuth's ``.env`` store."""
    watch: StampWatch = auth._engine.store._file._watch  # type: ignore[attr-defined]
    return watch


def frozen(auth: mlauth.MLAuth) -> FakeClock:
    """Stop the clock of ``auth``'s stamp watch: a change can then show only through the
    save counter (or a precise stamp), never because the stat interval ran out."""
    clock = FakeClock()
    watch = watch_of(auth)
    clock.now += watch.interval  # past any look taken on the real clock: look again now
    watch.clock = clock
    watch.precise()  # the last look now carries the frozen clock's deadline
    return clock


def make_counter(env: Path) -> None:
    """The save counter beside ``env``, as the first save by mlauth leaves it."""
    StampWatch(lambda: None, f"{env}{COUNTER_SUFFIX}").bump()


def refresh_in_another_process(env: Path) -> None:
    """A real refresh by another mlauth process: it spends the token and saves."""
    code = textwrap.dedent(
        f"""
        import mlauth
        mlauth.MLAuth.from_env({str(env)!r}).refresh()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


def write_like_a_legacy_script(env: Path, access: str, refresh: str, *, replace: bool) -> None:
    """Put new tokens in ``env`` the way a program without mlauth does: a plain rewrite
    (``replace``: a new file renamed over it, as an editor saves; else in place)."""
    text = env.read_text()
    text = re.sub(r"(?m)^ML_ACCESS_TOKEN=.*$", f"ML_ACCESS_TOKEN={access}", text)
    text = re.sub(r"(?m)^ML_REFRESH_TOKEN=.*$", f"ML_REFRESH_TOKEN={refresh}", text)
    if not replace:
        env.write_text(text)
        return
    staging = env.with_name(env.name + ".editor-tmp")
    staging.write_text(text)
    staging.chmod(0o600)
    os.replace(staging, env)


def sent_token(call: Callable[[], Any]) -> str:
    """The bearer token the request made by ``call`` carried on its final send."""
    response = call()
    assert response.status_code == 200, response.text
    header = response.request.headers["Authorization"]
    assert isinstance(header, str)
    return header.removeprefix("Bearer ")
