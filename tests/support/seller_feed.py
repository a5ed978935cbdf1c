"""The change feed of the stores of many sellers under test: one store kind behind one face
(SQLite, PostgreSQL, Redis), every query or round trip to it counted, a clock that moves on
by hand, and a peer process that commits a seller's new tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from mlauth.stores.redis_sellers import RedisSellers
from mlauth.stores.sellers_base import SellerStores
from mlauth.stores.sql_db import Database
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import TokenSet
from tests.support.sql_sellers import Db, tokens_of

# A peer process: opens the store as the test's Store.spec says, and commits the tokens read
# on stdin over the version of the seller it reads (a refresh, as far as the store can tell).
PEER = """
import json, sys
from mlauth.secret import Secret
from mlauth.stores.redis_sellers import RedisSellers
from mlauth.stores.sql import SqlSellers
from mlauth.tokens import TokenSet
spec = json.loads(sys.stdin.read())
kind, where, client = spec["kind"], spec["where"], spec["client_id"]
if kind == "sqlite":
    sellers = SqlSellers.sqlite(where, client_id=client)
elif kind == "postgresql":
    sellers = SqlSellers.postgresql(where, client_id=client)
else:
    sellers = RedisSellers(where, client_id=client)
store = sellers.store(spec["user_id"])
_, version = store.load()
tokens = TokenSet(Secret(spec["access"]), Secret(spec["refresh"]), expires_at=spec["expires_at"])
print(json.dumps(list(store.save(tokens, replaces=version))))
sellers.close()
"""


class Store:
    """One kind of store of many sellers: ``kind`` "sqlite", "postgresql" or "redis",
    ``where`` its path or URL."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where

    def __repr__(self) -> str:
        return f"Store({self.kind})"

    def open(self, client_id: str, **options: Any) -> SellerStores:
        """A new SellerStores on it: what another process of the app would make."""
        if self.kind == "redis":
            return RedisSellers(self.where, client_id=client_id, **options)
        return Db(self.kind, self.where).open(client_id, **options)

    def count(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """From now on, every statement (SQL) or round trip (Redis: a command, or a
        pipeline) this process sends to the store, by name, in the list returned."""
        sent: list[str] = []
        if self.kind != "redis":
            run = Database.run

            def counted(self: Database, text: str, *args: Any, **kwargs: Any) -> Any:
                sent.append(text)
                return run(self, text, *args, **kwargs)

            monkeypatch.setattr(Database, "run", counted)
            return sent
        command = redis.Redis.execute_command
        execute = redis.client.Pipeline.execute

        def one(self: redis.Redis, *args: Any, **kwargs: Any) -> Any:
            sent.append(str(args[0]))
            return command(self, *args, **kwargs)

        def pipeline(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
            sent.append("pipeline: " + ", ".join(str(c[0][0]) for c in self.command_stack))
            return execute(self, *args, **kwargs)

        monkeypatch.setattr(redis.Redis, "execute_command", one)
        monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline)
        return sent

    def peer_commits(self, fake: FakeMercadoLibre, client_id: str, user_id: str) -> TokenSet:
        """Another process commits new tokens for seller ``user_id``; returns them."""
        issued = fake.issue_tokens(user_id=int(user_id))
        tokens = tokens_of(issued, expires_at=time.time() + 3600)
        assert tokens.access_token is not None and tokens.refresh_token is not None
        spec = {
            "kind": self.kind,
            "where": self.where,
            "client_id": client_id,
            "user_id": user_id,
            "access": tokens.access_token.reveal(),
            "refresh": tokens.refresh_token.reveal(),
            "expires_at": tokens.expires_at,
        }
        done = subprocess.run(
            [sys.executable, "-c", PEER],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return tokens


class Clock:
    """``time.monotonic`` as the stores read it, moved on by hand (the engine's own clock
    is bound when it is made and keeps real time)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ahead = 0.0
        real = time.monotonic
        monkeypatch.setattr(time, "monotonic", lambda: real() + self.ahead)

    def advance(self, seconds: float) -> None:
        self.ahead += seconds


# -- a fork while another thread looks -------------------------------------------------------

# The seller's store the parent made and used, for the forked child (fork copies it).
_FORKED: list[Any] = []


def share_with_fork(store: Any) -> None:
    _FORKED[:] = [store]


def stamp_in_child(advance: float) -> tuple[int, Any]:
    """In a forked child: move the stores' clock past check_interval, ask the stamp, and
    return how many looks the feed had begun, and the stamp."""
    (store,) = _FORKED
    ahead = time.monotonic() + advance
    pytest.MonkeyPatch().setattr(time, "monotonic", lambda: ahead)
    stamp = store.stamp()
    return store._feed.seq, stamp
