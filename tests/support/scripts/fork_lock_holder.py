"""A process whose thread holds the refresh lock while its main thread forks a child.

Run by tests/test_deploy_pools.py as ``python fork_lock_holder.py ENV URL CHILD_LOG RESULT``.
The ``.env`` must hold an expired token, so the child's first request has to refresh and so
has to wait for the lock. Prints ``forked <child pid>`` once the child exists; the thread
releases the lock when a line arrives on stdin (never, if the test kills this process).

The child logs mlauth at DEBUG to CHILD_LOG, makes one request and writes
``{"status": ..., "error": ...}`` to RESULT (atomically), then exits. Either lock kind logs
``waiting for refresh lock`` in the child once it waits: the sibling lock file by itself, the
inode lock of a ``.env`` mounted alone through :func:`log_inode_lock_refusals`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sys
import threading
from typing import Any

import requests

from mlauth import EnvFileStore, MLAuth


def log_inode_lock_refusals() -> None:
    """Log the first time this process is refused an OFD lock: the inode lock is held.

    InodeLock polls a non-blocking OFD lock and logs nothing while it waits, so the test
    could not tell a child that waits from one that has not got there yet.
    """
    logger, real_fcntl, noted = logging.getLogger("mlauth"), fcntl.fcntl, []

    def fcntl_noting_refusals(fd: Any, cmd: int, arg: Any = 0) -> Any:
        try:
            return real_fcntl(fd, cmd, arg)
        except OSError as exc:
            refused = exc.errno in (errno.EAGAIN, errno.EACCES)
            if cmd == getattr(fcntl, "F_OFD_SETLK", None) and refused and not noted:
                noted.append(True)
                logger.debug("waiting for refresh lock: the inode is locked (pid %d)", os.getpid())
            raise

    fcntl.fcntl = fcntl_noting_refusals


def child(auth: MLAuth, url: str, log_path: str, result_path: str) -> None:
    handler = logging.FileHandler(log_path)
    logger = logging.getLogger("mlauth")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    if isinstance(auth.store, EnvFileStore) and auth.store.in_place:
        log_inode_lock_refusals()
    result: dict[str, object]
    try:
        response = requests.get(f"{url}/users/me", auth=auth, timeout=30)
        result = {"status": response.status_code, "error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        result = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
    handler.flush()
    with open(result_path + ".tmp", "w") as out:
        json.dump(result, out)
    os.replace(result_path + ".tmp", result_path)


def main() -> None:
    env, url, log_path, result_path = sys.argv[1:5]
    # A long lock timeout: a child that the parent's death left blocked must show as a hang
    # the test notices, not as a LockTimeoutError after a while.
    auth = MLAuth.from_env(env, lock_timeout=60.0)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with auth.store.lock(30.0):
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        try:
            child(auth, url, log_path, result_path)
        finally:
            os._exit(0)
    print(f"forked {pid}", flush=True)
    sys.stdin.readline()
    release.set()
    thread.join()
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
