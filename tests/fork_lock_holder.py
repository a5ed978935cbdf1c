"""A process whose thread holds the refresh lock while its main thread forks a child.

Run by tests/test_deploy_pools.py as ``python fork_lock_holder.py ENV URL CHILD_LOG RESULT``.
The ``.env`` must hold an expired token, so the child's first request has to refresh and so
has to wait for the lock. Prints ``forked <child pid>`` once the child exists; the thread
releases the lock when a line arrives on stdin (never, if the test kills this process).

The child logs mlauth at DEBUG to CHILD_LOG, makes one request and writes
``{"status": ..., "error": ...}`` to RESULT (atomically), then exits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

import requests

from mlauth import MLAuth


def child(auth: MLAuth, url: str, log_path: str, result_path: str) -> None:
    handler = logging.FileHandler(log_path)
    logger = logging.getLogger("mlauth")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
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
