"""One process that holds, waits for or probes a refresh lock on command, for the lock tests.

Run by tests/test_lock_wait.py as ``python lock_agent.py KIND PATH`` where KIND is ``file``
(:class:`~mlauth.stores.lock.ProcessLock` on PATH) or ``inode``
(:class:`~mlauth.stores.mounted.InodeLock` on PATH). It prints ``ready``, then reads one
command a line from stdin and answers each with one JSON line on stdout:

- ``take SECONDS``: take the lock (waiting up to SECONDS) and keep it; ``{"took": bool}``.
- ``release``: let go of the lock taken by ``take``; ``{"released": true}``.
- ``wait SECONDS``: ``wait_released(SECONDS)``; ``{"waited": bool}``.
- ``keep-shared``: take a shared lock on the same object as the lock's waiters do, blocking
  until the kernel grants it, and keep it; ``{"kept": true}``.
- ``release-shared``: let go of it; ``{"released": true}``.
- ``settle``: wait (polling, with a deadline) until no thread of this process is waiting for
  a release any more; ``{"settled": bool}``.
- ``fork SECONDS``: fork a child that reports whether it kept a descriptor of the lock's
  file open and then calls ``wait_released(SECONDS)``; ``{"child_fds": [...],
  "child_waited": bool}``, once the child has finished.
- ``exit``: exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from contextlib import AbstractContextManager

from mlauth.stores.lock import ProcessLock
from mlauth.stores.mounted import REFRESH_BYTE, InodeLock, _lock

WATCH_THREAD = "mlauth-wait-released"


def lock_files_open(path: str) -> list[int]:
    """This process's descriptors open on ``path`` (the lock's file)."""
    target = os.stat(path)
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            info = os.stat(f"/proc/self/fd/{name}")
            if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(name))
    return found


def watching() -> bool:
    return any(t.name == WATCH_THREAD for t in threading.enumerate())


def say(answer: dict[str, object]) -> None:
    print(json.dumps(answer), flush=True)


def main() -> None:
    kind, path = sys.argv[1:3]
    lock = ProcessLock(path) if kind == "file" else InodeLock(path)
    held: AbstractContextManager[None] | None = None
    shared: int | None = None
    say({"ready": os.getpid()})
    for line in sys.stdin:
        command, *args = line.split()
        if command == "take":
            hold = lock.hold(float(args[0]))
            try:
                hold.__enter__()
            except Exception:  # noqa: BLE001 (reported to the test: busy)
                say({"took": False})
            else:
                held = hold
                say({"took": True})
        elif command == "release":
            assert held is not None
            held.__exit__(None, None, None)
            held = None
            say({"released": True})
        elif command == "keep-shared":
            shared = os.open(path, os.O_RDONLY)
            if kind == "file":
                fcntl.flock(shared, fcntl.LOCK_SH)
            else:
                _lock(shared, fcntl.F_RDLCK, REFRESH_BYTE, 1, wait=True)
            say({"kept": True})
        elif command == "release-shared":
            assert shared is not None
            os.close(shared)
            shared = None
            say({"released": True})
        elif command == "wait":
            say({"waited": lock.wait_released(float(args[0]))})
        elif command == "settle":
            deadline = time.monotonic() + 30
            while watching() and time.monotonic() < deadline:
                time.sleep(0.01)
            say({"settled": not watching()})
        elif command == "fork":
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(read)
                    fds = lock_files_open(path)
                    waited = lock.wait_released(float(args[0]))
                    os.write(write, json.dumps([fds, waited]).encode())
                finally:
                    os._exit(0)
            os.close(write)
            with os.fdopen(read) as pipe:
                fds, waited = json.loads(pipe.read())
            os.waitpid(pid, 0)
            say({"child_fds": fds, "child_waited": waited})
        elif command == "exit":
            break


if __name__ == "__main__":
    main()
