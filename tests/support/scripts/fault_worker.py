"""A process that makes one API call through MLAuth, and can be frozen at a refresh phase.

Run as ``python tests/support/scripts/fault_worker.py ENV URL``; prints one JSON line with the
outcome. With
``--login CODE REDIRECT_URI`` in place of ``URL`` it runs ``mlauth login``'s code exchange. With
``MLAUTH_TEST_PAUSE_AT=<phase>`` and ``MLAUTH_TEST_PAUSE_MARKER=<path>`` it creates the marker
file when it reaches the phase and then waits to be killed (the fault-injection tests send
SIGKILL). The hooks are installed here, by wrapping library functions, so that production
code carries no test switch. Phases:

- ``before-post``: the intent is journaled and the token POST is about to be sent;
- ``after-raw``: the raw answer arrived and is kept (journal, Redis); nothing has read it;
- ``after-answer``: the answer arrived (and is journaled); the store is not written yet;
- ``during-write``: the new .env is written to its temporary file, not renamed into place;
- ``after-write``: the store holds the new tokens; the journal is not committed yet.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Hashable
from typing import Any

import requests

import mlauth
import mlauth.endpoint
import mlauth.stores.envfile
import mlauth.stores.journal
import mlauth.stores.mounted
from mlauth.cli.login import complete_login
from mlauth.stores import store_from_env


def pause(phase: str) -> None:
    marker = os.environ["MLAUTH_TEST_PAUSE_MARKER"]
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, phase.encode())
    os.close(fd)
    while True:  # until the test's SIGKILL
        signal.pause()


def install_pause(phase: str, env: str) -> None:
    real_env = os.path.realpath(env)
    if phase == "before-post":
        refresh = mlauth.endpoint.TokenEndpoint.refresh

        def paused_refresh(self: Any, *args: Any, **kwargs: Any) -> Any:
            pause(phase)
            return refresh(self, *args, **kwargs)

        mlauth.endpoint.TokenEndpoint.refresh = paused_refresh  # type: ignore[method-assign]
    elif phase == "after-raw":
        transactions: list[Any] = [mlauth.stores.journal.JournaledRefresh]
        try:
            from mlauth.stores.redis import RedisRefresh

            transactions.append(RedisRefresh)
        except ImportError:  # no redis extra: only the .env is tried
            pass
        for transaction in transactions:
            answered = transaction.answered

            def paused_answered(
                self: Any, raw: bytes, *, started: float, at: float, _answered: Any = answered
            ) -> None:
                _answered(self, raw, started=started, at=at)
                pause(phase)

            transaction.answered = paused_answered
    elif phase == "after-answer":
        save = mlauth.EnvFileStore.save

        def paused_save(
            self: mlauth.EnvFileStore, tokens: mlauth.TokenSet, **kwargs: Any
        ) -> Hashable:
            pause(phase)
            return save(self, tokens, **kwargs)

        mlauth.EnvFileStore.save = paused_save  # type: ignore[method-assign]
    elif phase == "during-write":
        replace: Callable[..., None] = os.replace

        def paused_replace(src: Any, dst: Any, **kwargs: Any) -> None:
            # Only the save of the answer: the writability probe before the POST replaces the
            # file with its own bytes, and the journal has no answer then.
            answered = any(
                r.get("kind") in ("answer", "raw")
                for r in mlauth.stores.journal.Journal(real_env).records()
            )
            if os.fspath(dst) == real_env and answered:
                pause(phase)
            replace(src, dst, **kwargs)

        mlauth.stores.envfile.os.replace = paused_replace  # type: ignore[assignment]

        # A .env mounted alone is written in place: pause once the new bytes are written over
        # the old, before they are fsynced and the padding is cut off.
        pwrite: Callable[..., int] = os.pwrite

        def paused_pwrite(fd: int, data: Any, offset: int) -> int:
            written = pwrite(fd, data, offset)
            answered = any(
                r.get("kind") in ("answer", "raw")
                for r in mlauth.stores.mounted.InodeJournal(real_env).records()
            )
            if os.path.samestat(os.fstat(fd), os.stat(real_env)) and answered:
                pause(phase)
            return written

        mlauth.stores.mounted.os.pwrite = paused_pwrite  # type: ignore[assignment]
    elif phase == "after-write":
        commit = mlauth.stores.journal.Journal.commit

        def paused_commit(self: mlauth.stores.journal.Journal) -> None:
            pause(phase)
            commit(self)

        mlauth.stores.journal.Journal.commit = paused_commit  # type: ignore[method-assign]
        inode_commit = mlauth.stores.mounted.InodeJournal.commit

        def paused_inode_commit(self: mlauth.stores.mounted.InodeJournal) -> None:
            pause(phase)
            inode_commit(self)

        mlauth.stores.mounted.InodeJournal.commit = paused_inode_commit  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown phase {phase!r}")


def main() -> int:
    env, url = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
    phase = os.environ.get("MLAUTH_TEST_PAUSE_AT")
    if phase:
        install_pause(phase, env)
    outcome: dict[str, object] = {"pid": os.getpid()}
    try:
        if url == "--login":
            tokens = complete_login(
                env, store_from_env(env), code=mlauth.Secret(sys.argv[3]), redirect_uri=sys.argv[4]
            )
            outcome["refresh"] = tokens.refresh_token.fingerprint if tokens.refresh_token else None
        else:
            auth = mlauth.MLAuth.from_env(env, backoff=0.01)
            response = requests.get(f"{url}/users/me", auth=auth, timeout=60)
            outcome["status"] = response.status_code
    except requests.RequestException as exc:
        outcome["error"] = type(exc).__name__
        outcome["message"] = str(exc)
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
