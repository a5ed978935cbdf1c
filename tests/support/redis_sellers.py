"""A Redis store of many sellers against the loopback fake: sellers' chains issued by the fake,
an auth per seller, the keys read straight from Redis, and seller worker processes
(scripts/seller_worker.py) started, made ready, let go, paused or killed."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests

import mlauth
from mlauth.stores.redis_sellers import RedisSellers
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import TokenSet
from tests.support import SCRIPTS
from tests.support.fault_kills import wait_until

WORKER = SCRIPTS / "seller_worker.py"


def chain_of(fake: FakeMercadoLibre, user_id: int, *, expired: bool = False) -> TokenSet:
    """A new chain for seller ``user_id``, as an authorization gives it."""
    issued = fake.issue_tokens(user_id=user_id)
    now = time.time()
    return TokenSet(
        access_token=mlauth.Secret(str(issued["access_token"])),
        refresh_token=mlauth.Secret(str(issued["refresh_token"])),
        expires_at=now - 60 if expired else now + float(str(issued["expires_in"])),
        refreshed_at=now,
        refreshed_by="the test",
    )


@contextmanager
def sellers_in(url: str, fake: FakeMercadoLibre, **options: Any) -> Iterator[RedisSellers]:
    """A RedisSellers for the fake's app, closed at the end."""
    sellers = RedisSellers(url, client_id=fake.client_id, **options)
    try:
        yield sellers
    finally:
        sellers.close()


def auth_for(fake: FakeMercadoLibre, store: mlauth.TokenStore, **options: Any) -> mlauth.MLAuth:
    """An MLAuth on one seller's store, for the fake."""
    options.setdefault("backoff", 0.001)
    return mlauth.MLAuth(
        fake.client_id,
        fake.client_secret,
        store=store,
        token_url=fake.token_url,
        hosts=[fake.host],
        **options,
    )


def hash_of(url: str, key: str) -> dict[str, str]:
    with redis.Redis.from_url(url, decode_responses=True) as client:
        values: dict[str, str] = client.hgetall(key)
    return values


def seller_keys(url: str, prefix: str) -> tuple[set[str], set[str]]:
    """The user ids the set lists, and those a hash exists for (locks, removal marks and
    incidents are not hashes of a chain)."""
    with redis.Redis.from_url(url, decode_responses=True) as client:
        listed = set(client.smembers(f"{prefix}:sellers"))
        hashes = {
            key.rsplit(":", 1)[1]
            for key in client.scan_iter(f"{prefix}:seller:*", count=1000)
            if key.rsplit(":", 1)[1].isdigit() and client.type(key) == "hash"
        }
    return listed, hashes


class SellerWorker:
    """One seller_worker.py process; ``go`` lets every worker sharing its folder call."""

    def __init__(
        self,
        folder: Path,
        name: str,
        url: str,
        fake: FakeMercadoLibre,
        user_id: int,
        *,
        phase: str | None = None,
        lock_timeout: float = 30.0,
    ) -> None:
        self.log = folder / f"{name}.log"
        self.ready = folder / f"{name}.ready"
        self.paused = folder / f"{name}.paused"
        environ = {
            **os.environ,
            "MLAUTH_TEST_CLIENT_ID": fake.client_id,
            "MLAUTH_TEST_CLIENT_SECRET": fake.client_secret,
            "MLAUTH_TEST_LOCK_TIMEOUT": str(lock_timeout),
            "MLAUTH_TEST_READY": str(self.ready),
            "MLAUTH_TEST_GO": str(folder / "go"),
        }
        if phase is not None:
            environ["MLAUTH_TEST_PAUSE_AT"] = phase
            environ["MLAUTH_TEST_PAUSE_MARKER"] = str(self.paused)
        with self.log.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), url, fake.base_url, str(user_id)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=environ,
            )

    def wait_ready(self) -> None:
        wait_until(self.ready.exists, f"{self.log.stem} ready", self.log)

    def wait_paused(self) -> None:
        wait_until(self.paused.exists, f"{self.log.stem} paused", self.log)

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=90)
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        outcome: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return outcome


def go(folder: Path) -> None:
    """Let every worker started in ``folder`` make its call."""
    (folder / "go").touch()


# -- a fork pool over several sellers -------------------------------------------------------------

# The auths, one per seller, built in the parent before a fork pool starts: the workers inherit
# them, with the RedisSellers (and its connection pools) they were made from.
_AUTHS: dict[str, mlauth.MLAuth] = {}


def share_with_fork_pool(auths: dict[str, mlauth.MLAuth]) -> None:
    _AUTHS.clear()
    _AUTHS.update(auths)


def calls_to_random_sellers(url: str, seconds: float, seed: int) -> dict[str, Any]:
    """Call the API as random sellers until the deadline; each answer must be that seller's."""
    chooser = random.Random(seed)
    sellers = sorted(_AUTHS)
    calls = failed = 0
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seller = chooser.choice(sellers)
        calls += 1
        try:
            response = requests.get(f"{url}/users/me", auth=_AUTHS[seller], timeout=30)
            if response.status_code != 200 or str(response.json()["user_id"]) != seller:
                failed += 1
                errors.append(f"HTTP {response.status_code} for {seller}")
        except Exception as exc:  # noqa: BLE001 - every kind counts
            failed += 1
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"calls": calls, "failed": failed, "errors": errors[:5], "pid": os.getpid()}
