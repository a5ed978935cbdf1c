"""Threads at one auth: run a target in many at once, and see from outside whether the
auth's refresh turn is free."""

from __future__ import annotations

import threading
from collections.abc import Callable

import mlauth


def run_threads(target: Callable[[], None], count: int) -> None:
    """Run ``target`` in ``count`` threads at once and wait for all of them."""
    workers = [threading.Thread(target=target) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def refresh_turn_is_free(auth: mlauth.MLAuth, within: float = 20.0) -> bool:
    """Whether another thread can take the auth's refresh turn now (its in-process lock and
    the store's lock), seen from outside: a ``refresh(force=False)`` of a token refreshed
    moments ago takes both and spends nothing. False if it did not finish ``within`` seconds.
    """
    done: list[mlauth.TokenSet] = []
    thread = threading.Thread(target=lambda: done.append(auth.refresh(force=False)), daemon=True)
    thread.start()
    thread.join(within)
    return bool(done)
