"""The change feed of the stores of many sellers (issue 20's per-call cost): a process asks
its store whether a peer committed at most once per ``check_interval`` for all the sellers
it holds together, on SQLite, PostgreSQL and Redis; a peer's commit still shows after the
next look, a commit that became visible only after a look is seen by the next one, and only
the sellers the process holds are kept."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

import mlauth
from mlauth import events
from mlauth.errors import StoreError
from mlauth.stores import sql_db
from mlauth.stores.base import NOT_LOCAL
from mlauth.stores.feed import PROBE_BACKOFF
from mlauth.stores.sellers_base import SellerStores
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.seller_feed import Clock, Store, share_with_fork, stamp_in_child
from tests.support.sql_sellers import tokens_of

SELLERS = [str(user_id) for user_id in range(5001, 5101)]  # a hundred
# Long, so that no look is due by real time while a test runs (a slow machine, a peer
# process starting): the looks come when the test moves the stores' clock on past it.
INTERVAL = 60.0


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return Store("sqlite", str(tmp_path / "sellers.db"))
    if request.param == "postgresql":
        return Store("postgresql", request.getfixturevalue("postgres_url"))
    server: RedisServer = request.getfixturevalue("redis_server")
    return Store("redis", server.url)


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


@contextmanager
def opened(
    store: Store, fake: FakeMercadoLibre, interval: float = INTERVAL
) -> Iterator[SellerStores]:
    sellers = store.open(fake.client_id, check_interval=interval)
    try:
        yield sellers
    finally:
        sellers.close()


def add_all(store: Store, fake: FakeMercadoLibre, user_ids: list[str]) -> None:
    with opened(store, fake) as sellers:
        for user_id in user_ids:
            issued = fake.issue_tokens(user_id=int(user_id))
            sellers.add(user_id, tokens_of(issued, expires_at=9e9))


def auth_of(sellers: SellerStores, fake: FakeMercadoLibre, user_id: str) -> mlauth.MLAuth:
    return mlauth.MLAuth(
        fake.client_id,
        fake.client_secret,
        store=sellers.store(user_id),
        token_url=fake.token_url,
        hosts=[fake.host],
    )


def feed_of(sellers: SellerStores) -> Any:
    return sellers.feed  # type: ignore[attr-defined]


def test_calls_over_a_hundred_sellers_cost_one_look_per_check_interval(
    store: Store, fake: FakeMercadoLibre, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_all(store, fake, SELLERS)
    clock = Clock(monkeypatch)
    chooser = random.Random(20)
    with opened(store, fake) as sellers, requests.Session() as session:
        auths = {user_id: auth_of(sellers, fake, user_id) for user_id in SELLERS}
        for auth in auths.values():  # each seller loaded once: not what is counted
            assert session.get(f"{fake.base_url}/users/me", auth=auth).status_code == 200
        sent = store.count(monkeypatch)
        for _ in range(3):
            # Every seller's last look is over a check_interval old: a store that looked
            # for itself would send one query per seller called from here on.
            clock.advance(INTERVAL * 1.5)
            before = len(sent)
            for _ in range(300):
                user_id = chooser.choice(SELLERS)
                answer = session.get(f"{fake.base_url}/users/me", auth=auths[user_id])
                assert answer.status_code == 200 and str(answer.json()["user_id"]) == user_id
            # One look (Redis: and the hashes of those among them written in the look's
            # overlap, here the adds just made, in one more round trip).
            assert len(sent) - before <= 2, sent[before:]


def test_a_peer_processs_commit_shows_after_the_next_look(
    store: Store, fake: FakeMercadoLibre, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_all(store, fake, SELLERS[:3])
    clock = Clock(monkeypatch)
    with opened(store, fake) as sellers:
        x, y = sellers.store(SELLERS[0]), sellers.store(SELLERS[1])
        _, x_version = x.load()
        _, y_version = y.load()
        assert x.stamp() == x_version  # the feed's first look: nothing changed
        committed = store.peer_commits(fake, fake.client_id, SELLERS[0])
        assert x.local_stamp() == x_version  # from memory until the next look
        clock.advance(INTERVAL * 1.5)
        assert x.local_stamp() is NOT_LOCAL
        sent = store.count(monkeypatch)
        seen = y.stamp()  # another seller's call makes the look for all
        assert seen == y_version
        assert len(sent) <= 2, sent  # Redis: the changes, then the hash of X, held here
        new = x.local_stamp()
        assert new not in (NOT_LOCAL, x_version) and x.stamp() == new
        assert len(sent) <= 2, sent
        tokens, version = x.load()
        assert version == new and tokens.refresh_token == committed.refresh_token
        assert x.local_stamp() == new  # read: the store's own version again


def test_a_seller_removed_by_a_peer_shows_as_gone_after_the_next_look(
    store: Store, fake: FakeMercadoLibre, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_all(store, fake, SELLERS[:2])
    clock = Clock(monkeypatch)
    with opened(store, fake) as sellers, opened(store, fake) as peer:
        x = sellers.store(SELLERS[0])
        _, version = x.load()
        assert x.stamp() == version
        assert peer.remove(SELLERS[0]) is True
        clock.advance(INTERVAL * 1.5)
        assert x.stamp() is None
        with pytest.raises(mlauth.ConfigError, match="removed"):
            x.load()
        # Added again: the new chain wins over the removal the next look sees too.
        issued = fake.issue_tokens(user_id=int(SELLERS[0]))
        peer.add(SELLERS[0], tokens_of(issued, expires_at=9e9))
        clock.advance(INTERVAL * 1.5)
        again = x.stamp()
        assert isinstance(again, tuple) and again[0] != version[0]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_commit_stamped_before_a_look_and_visible_only_after_it_is_seen_by_the_next(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    fake: FakeMercadoLibre,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A peer's commit statement takes changed_at from the clock when it runs, and becomes
    # visible when its transaction commits: a look in between cannot see it, and the next
    # look starts from a time after that changed_at. The overlap is what finds it.
    if kind == "sqlite":
        store = Store(kind, str(tmp_path / "sellers.db"))
    else:
        store = Store(kind, request.getfixturevalue("postgres_url"))
    add_all(store, fake, SELLERS[:2])
    clock = Clock(monkeypatch)
    with opened(store, fake) as sellers:
        x, y = sellers.store(SELLERS[0]), sellers.store(SELLERS[1])
        _, version = x.load()
        _, y_version = y.load()
        with held_transaction(store) as run:
            run(
                "UPDATE mlauth_sellers SET generation = generation + 1, changed_at = {now} "
                "WHERE user_id = ?",
                (SELLERS[0],),
            )
            clock.advance(INTERVAL * 1.5)
            assert y.stamp() == y_version  # a look, which cannot see the update
            assert x.local_stamp() == version
        assert x.local_stamp() == version  # committed now: shows at the next look
        clock.advance(INTERVAL * 1.5)
        assert y.stamp() == y_version
        assert x.local_stamp() == (version[0], version[1] + 1)


def test_only_the_sellers_a_process_holds_are_kept(
    store: Store, fake: FakeMercadoLibre, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_all(store, fake, SELLERS[:20])
    clock = Clock(monkeypatch)
    held = SELLERS[:5]
    with opened(store, fake) as sellers, opened(store, fake) as peer:
        stores = [sellers.store(user_id) for user_id in held]
        for one in stores:
            one.load()
        stores[0].stamp()
        for user_id in SELLERS[:20]:  # a peer rotates every seller's chain
            other = peer.store(user_id)
            tokens, version = other.load()
            other.save(tokens, replaces=version)
        clock.advance(INTERVAL * 1.5)
        stores[0].stamp()
        feed = feed_of(sellers)
        assert sorted(feed.changed) == sorted(held)
        for one in stores:
            assert one.local_stamp() == peer.store(one.seller or "").load()[1]


def test_a_failed_look_is_said_once_for_all_sellers_and_backs_off(
    store: Store, fake: FakeMercadoLibre, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_all(store, fake, SELLERS[:30])
    clock = Clock(monkeypatch)
    seen: list[events.Event] = []
    with events.subscribe(seen.append), opened(store, fake, interval=1.0) as sellers:
        stores = [sellers.store(user_id) for user_id in SELLERS[:30]]
        versions = [one.load()[1] for one in stores]
        feed = feed_of(sellers)
        real = feed.changes
        looks: list[object] = []

        def down(*args: Any) -> Any:
            looks.append(args)
            raise StoreError("the store is down (test)")

        monkeypatch.setattr(feed, "changes", down)
        clock.advance(1.5)
        sent = store.count(monkeypatch)
        for _ in range(3):
            for one, version in zip(stores, versions, strict=True):
                assert one.stamp() == version  # what was read: the calls go on
                assert one.local_stamp() == version  # answered during the back-off
            clock.advance(1.5)  # past check_interval, not past the back-off
        assert len(looks) == 1 and sent == []
        monkeypatch.setattr(feed, "changes", real)
        clock.advance(PROBE_BACKOFF)
        assert stores[0].stamp() == versions[0]
        assert 1 <= len(sent) <= 2, sent  # Redis: the adds, within the overlap
        assert events.flush()
    assert [event.kind for event in seen] == ["store_unavailable", "store_back"]
    assert seen[0].store == sellers.location


@contextmanager
def held_transaction(store: Store) -> Iterator[Callable[[str, tuple[object, ...]], None]]:
    """Statements run in one transaction, committed at the end (a peer's slow commit)."""
    if store.kind == "sqlite":
        dialect = sql_db.sqlite(store.where)
        connection: Any = sqlite3.connect(store.where, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
    else:
        import psycopg  # type: ignore[import-not-found,unused-ignore]

        dialect = sql_db.postgresql(store.where)
        connection = psycopg.connect(store.where)
    try:
        yield lambda text, params: connection.execute(dialect.sql(text), params) and None
        connection.execute("COMMIT") if store.kind == "sqlite" else connection.commit()
    finally:
        connection.close()


def test_the_first_stamp_after_wait_unlocked_looks_at_that_seller_itself(
    store: Store, fake: FakeMercadoLibre, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A waiter adopts what the lock's holder saved only through the stamp: it must not wait
    # for the feed's next look (the store contract, TokenStore.wait_unlocked).
    add_all(store, fake, SELLERS[:2])
    with opened(store, fake) as sellers:
        x = sellers.store(SELLERS[0])
        _, version = x.load()
        assert x.stamp() == version
        store.peer_commits(fake, fake.client_id, SELLERS[0])
        assert x.stamp() == version  # the feed looked less than check_interval ago
        assert x.wait_unlocked(5.0) is True
        sent = store.count(monkeypatch)
        new = x.stamp()
        assert new != version and x.load()[1] == new
        assert len(sent) == 2, sent  # that row or hash alone, then the load


def test_redis_keeps_an_hour_of_changes(redis_server: RedisServer, fake: FakeMercadoLibre) -> None:
    store = Store("redis", redis_server.url)
    add_all(store, fake, SELLERS[:2])
    changes = f"mlauth:{fake.client_id}:changes"
    with redis_server.client() as client:
        assert set(client.zrange(changes, 0, -1)) == set(SELLERS[:2])
        (seconds, _) = client.time()
        client.zadd(changes, {"999": (seconds - 3601) * 1000})  # a change over an hour old
        store.peer_commits(fake, fake.client_id, SELLERS[0])
        assert set(client.zrange(changes, 0, -1)) == set(SELLERS[:2])
        with opened(store, fake) as sellers:
            assert sellers.remove(SELLERS[1]) is True
        score = client.zscore(changes, SELLERS[1])
        assert score is not None and abs(score / 1000 - client.time()[0]) < 60


def test_a_child_forked_while_a_thread_looked_makes_its_own_looks(
    store: Store, fake: FakeMercadoLibre
) -> None:
    # The lock that lets one thread look is the parent's: held by a thread that does not
    # exist in the child, it would keep the child from ever looking again.
    add_all(store, fake, SELLERS[:2])
    with opened(store, fake) as sellers:
        x = sellers.store(SELLERS[0])
        _, version = x.load()
        x.stamp()
        feed = feed_of(sellers)
        looks = feed.seq
        share_with_fork(x)
        with feed._lock, multiprocessing.get_context("fork").Pool(1) as pool:
            seq, stamp = pool.apply(
                stamp_in_child,
                (INTERVAL * 1.5,),
            )
        assert (seq, stamp) == (looks + 1, version)
