"""What one "did the .env change?" check costs, for each way of asking, side by side.

The ways weighed for issue 19 (no system call per request), timed in one process, one run,
interleaved (every way once per repeat, the order rotated):

- ``os.stat`` of the path: what mlauth did before every request;
- ``os.fstat`` of a descriptor kept open: no path walk, still a system call, and blind to a
  file replaced under the name (it keeps the old inode);
- inotify, asked without blocking (a ``read`` of the inotify descriptor that finds nothing):
  a system call too; asked by a watcher thread instead it costs nothing per request, but the
  thread needs the GIL to record an event, so a request sent right after a peer's save may
  go out before the thread has run;
- the save counter mapped from ``<.env>.generation`` (:mod:`mlauth.stores.watch`): a memory
  read and a comparison, plus ``time.monotonic`` (a vDSO call, no system call) for the stat
  interval;
- the whole of ``StampWatch.quick`` and ``EnvFileStore.local_stamp`` as mlauth runs them, and
  ``StampWatch.bump`` (once per save, under the lock).

    python -m benchmarks.watch_cost --number 200000 --repeat 7
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.overhead import env_text
from mlauth.stores.envfile import EnvFileStore
from mlauth.stores.watch import COUNTER_SUFFIX, StampWatch

_IN_MODIFY, _IN_ATTRIB, _IN_MOVE_SELF, _IN_DELETE_SELF = 0x2, 0x4, 0x800, 0x400
_IN_NONBLOCK = os.O_NONBLOCK


def inotify_fd(path: str) -> int | None:
    """A non-blocking inotify descriptor watching ``path``, or None without inotify."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    fd = int(libc.inotify_init1(_IN_NONBLOCK))
    if fd < 0:
        return None
    mask = _IN_MODIFY | _IN_ATTRIB | _IN_MOVE_SELF | _IN_DELETE_SELF
    if libc.inotify_add_watch(fd, path.encode(), mask) < 0:
        os.close(fd)
        return None
    return fd


def inotify_check(fd: int) -> Callable[[], object]:
    def check() -> object:
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            return None

    return check


def ways(tmp: Path) -> dict[str, Callable[[], object]]:
    env = tmp / ".env"
    env.write_text(env_text("APP_USR-fake-access", time.time() + 6 * 3600))
    env.chmod(0o600)
    path = str(env)
    store = EnvFileStore(env)
    tokens, version = store.load()
    store.save(tokens, replaces=version)  # the first save makes the counter
    store.local_stamp()
    watch = StampWatch(lambda: os.stat(path), path + COUNTER_SUFFIX)
    watch.precise()
    cell = watch._seen[0] if watch._seen is not None else None
    assert cell is not None, "the counter could not be mapped here"
    count = cell[0]
    unmapped = StampWatch(lambda: os.stat(path), None)
    kept = os.open(path, os.O_RDONLY)
    found: dict[str, Callable[[], object]] = {
        "os.stat(path)": lambda: os.stat(path),
        "os.fstat(kept fd)": lambda: os.fstat(kept),
    }
    notify = inotify_fd(path)
    if notify is not None:
        found["inotify, non-blocking read (nothing queued)"] = inotify_check(notify)
    found.update(
        {
            "mapped counter read + compare": lambda: cell[0] == count,
            "time.monotonic()": time.monotonic,
            "StampWatch.quick(), counter mapped": watch.quick,
            "StampWatch.quick(), no counter (a stat)": unmapped.quick,
            "EnvFileStore.local_stamp()": store.local_stamp,
            "StampWatch.precise() (counter + stat)": watch.precise,
        }
    )
    return found


def measure(
    found: dict[str, Callable[[], object]], number: int, repeat: int
) -> dict[str, list[float]]:
    """ns per call, one figure per repeat; every way once per repeat, the order rotated."""
    names = list(found)
    per: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(repeat):
        order = names[turn % len(names) :] + names[: turn % len(names)]
        for name in order:
            spent = timeit.timeit(found[name], number=number)
            per[name].append(spent / number * 1e9)
    return per


def bump_cost(tmp: Path, number: int) -> float:
    watch = StampWatch(lambda: None, str(tmp / ".env") + COUNTER_SUFFIX)
    return timeit.timeit(watch.bump, number=number) / number * 1e9


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watch_cost", description=__doc__)
    parser.add_argument("--number", type=int, default=200000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        per = measure(ways(Path(tmp)), args.number, args.repeat)
        bump = bump_cost(Path(tmp), max(args.number // 100, 100))
    print("| way of checking | ns/check (median) | best |")
    print("| --- | --- | --- |")
    for name, figures in per.items():
        print(f"| {name} | {statistics.median(figures):.0f} | {min(figures):.0f} |")
    print(f"| StampWatch.bump() (per save, not per request) | {bump:.0f} | |")
    print(
        f"\n{args.repeat} repeats x {args.number} calls each, wall time (timeit), "
        f"Python {sys.version.split()[0]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
