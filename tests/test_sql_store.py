"""The SQL store of many sellers (issue 20): its contract, and the engine through it against
the loopback fake. Processes and kills are in test_sql_processes.py, hostile rows and
files in test_sql_hostile.py."""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth import InvalidGrantError, WrongSellerError
from mlauth.cli.migrate_sellers import _move
from mlauth.errors import (
    ConfigError,
    LockLostError,
    LockTimeoutError,
    StaleCommitError,
    StoreError,
)
from mlauth.stores import sql
from mlauth.stores.sellers import FAILING, OK, REAUTHORIZE, sellers_from_url, sqlite_path
from mlauth.stores.sql import SqlSellers
from mlauth.stores.sql_db import Database
from mlauth.testing import FakeMercadoLibre
from tests.support.sql_sellers import Db, seed, tokens_of


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


@pytest.fixture
def db(sql_db: Db) -> Db:
    return sql_db


@pytest.fixture
def sellers(db: Db, fake: FakeMercadoLibre) -> Iterator[SqlSellers]:
    stores = db.open(fake.client_id)
    yield stores
    stores.close()


def auth_for(
    sellers: SqlSellers, fake: FakeMercadoLibre, user_id: int, **options: object
) -> mlauth.MLAuth:
    return mlauth.MLAuth(
        fake.client_id,
        fake.client_secret,
        store=sellers.store(str(user_id)),
        token_url=fake.token_url,
        hosts=[fake.host],
        backoff=0.001,
        **options,  # type: ignore[arg-type]
    )


def me(auth: mlauth.MLAuth, fake: FakeMercadoLibre) -> requests.Response:
    return requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)


# -- the contract ------------------------------------------------------------------------------


def test_sellers_are_added_listed_numerically_and_removed(
    sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    for user_id in (111, 9, 1000):
        seed(sellers, fake, user_id)
    assert sellers.sellers() == ["9", "111", "1000"]
    assert sellers.remove("111") is True
    assert sellers.remove("111") is False
    assert sellers.sellers() == ["9", "1000"]
    with pytest.raises(ConfigError, match="holds no seller 111"):
        sellers.store("111")


def test_the_store_of_a_seller_is_made_once(sellers: SqlSellers, fake: FakeMercadoLibre) -> None:
    seed(sellers, fake, 111)
    assert sellers.store("111") is sellers.store("111")
    assert sellers.store("111").seller == "111"
    assert "111" in repr(sellers.store("111"))


def test_an_unknown_seller_is_a_config_error_naming_at_most_ten_held(
    sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    with pytest.raises(ConfigError, match="it holds none yet"):
        sellers.store("5")
    for user_id in range(101, 113):
        seed(sellers, fake, user_id)
    with pytest.raises(ConfigError) as caught:
        sellers.store("5")
    message = str(caught.value)
    assert "holds no seller 5" in message and "mlauth login --seller 5" in message
    listed = message.split("it holds 12: ", 1)[1].split(". ", 1)[0]  # not the folder's name
    assert listed == "101, 102, 103, 104, 105, 106, 107, 108, 109, 110 and 2 more", message
    with pytest.raises(ConfigError, match="not a seller's user id"):
        sellers.store("12 OR 1=1")


def test_adding_a_held_seller_needs_replace_and_replacing_fences_out_the_old_chain(
    sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    store = sellers.store("111")
    old_tokens, old_version = store.load()
    with pytest.raises(ConfigError, match="holds seller 111 already"):
        seed(sellers, fake, 111)
    assert store.load()[0] == old_tokens
    newer = fake.issue_tokens(user_id=111)
    sellers.add("111", tokens_of(newer), replace=True)
    tokens, version = store.load()
    assert tokens.refresh_token is not None
    assert tokens.refresh_token.reveal() == newer["refresh_token"]
    assert isinstance(version, tuple) and isinstance(old_version, tuple)
    assert version[0] != old_version[0] and version[1] == old_version[1] + 1
    with pytest.raises(StaleCommitError):  # a refresher that read the old chain
        store.save(old_tokens, replaces=old_version)


def test_a_commit_over_a_version_a_peer_moved_past_is_stale(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    peer = db.open(fake.client_id)
    mine, peers = sellers.store("111"), peer.store("111")
    tokens, version = mine.load()
    _, peer_version = peers.load()
    peers.save(tokens_of(fake.issue_tokens(user_id=111)), replaces=peer_version)
    with pytest.raises(StaleCommitError, match="generation 1"):
        mine.save(tokens, replaces=version)
    assert mine.load()[0] != tokens  # the peer's tokens stayed
    peer.close()


def test_a_save_of_another_sellers_tokens_is_refused_and_writes_nothing(
    sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    store = sellers.store("111")
    before, version = store.load()
    other = tokens_of(fake.issue_tokens(user_id=222))
    with pytest.raises(WrongSellerError) as caught:
        store.save(other, replaces=version)
    assert (caught.value.expected, caught.value.found) == ("111", "222")
    assert store.load() == (before, version)
    with pytest.raises(WrongSellerError):
        sellers.add("111", other, replace=True)
    with pytest.raises(WrongSellerError):
        sellers.add("333", other)
    assert sellers.sellers() == ["111"]
    # The right seller's tokens are saved, as the next generation.
    right = tokens_of(fake.issue_tokens(user_id=111))
    new_version = store.save(right, replaces=version)
    assert store.load() == (right, new_version)


def test_one_database_keeps_two_apps_apart(db: Db, fake: FakeMercadoLibre) -> None:
    first, second = db.open("1111"), db.open("2222")
    seed(first, fake, 111)
    assert second.sellers() == []
    with pytest.raises(ConfigError):
        second.store("111")
    with pytest.raises(ConfigError, match="app 1111"):
        first.store("111").bind_client("2222")
    unbound = db.open(None)
    with pytest.raises(ConfigError, match="no client id"):
        unbound.sellers()
    unbound.bind_client("1111")
    assert unbound.sellers() == ["111"]
    with pytest.raises(ConfigError, match="bound to app 1111"):
        unbound.bind_client("2222")
    unbound.close()
    first.close()
    second.close()


def test_rows_are_read_in_one_query_whatever_the_number_of_sellers(
    sellers: SqlSellers, fake: FakeMercadoLibre, monkeypatch: pytest.MonkeyPatch
) -> None:
    for user_id in range(201, 241):
        seed(sellers, fake, user_id)
    statements: list[str] = []
    run = Database.run

    def counted(self: Database, text: str, *args: object, **kwargs: object) -> object:
        statements.append(text)
        return run(self, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Database, "run", counted)
    rows = sellers.rows()
    assert len(statements) == 1
    assert [row.user_id for row in rows] == [str(u) for u in range(201, 241)]
    assert all(row.state == OK and row.expires_at is not None for row in rows)
    statements.clear()
    picked = sellers.rows(["205", "230", "999"])
    assert len(statements) == 1
    assert [row.user_id for row in picked] == ["205", "230"]


def test_the_lease_excludes_other_processes_and_wait_unlocked_sees_it_go(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    peer = db.open(fake.client_id)
    mine, theirs = sellers.store("111"), peer.store("111")
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with mine.lock(5):
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(30)
    assert theirs.refresh_in_progress() is True
    with pytest.raises(LockTimeoutError, match="lease of seller 111"), theirs.lock(0):
        pass
    assert theirs.wait_unlocked(0.05) is False
    release.set()
    assert theirs.wait_unlocked(30) is True
    holder.join()
    assert theirs.refresh_in_progress() is False
    with theirs.lock(0):
        pass
    peer.close()


def test_a_lapsed_lease_is_taken_and_its_old_holder_may_not_spend(
    db: Db, fake: FakeMercadoLibre
) -> None:
    short = db.open(fake.client_id, lock_timeout=0.2)
    seed(short, fake, 111)
    peer = db.open(fake.client_id, lock_timeout=0.2)
    mine, theirs = short.store("111"), peer.store("111")
    with mine.lock(5):
        mine.check_writable()  # renewed while held
        deadline = time.monotonic() + 30
        while True:  # until the lease lapses and the peer takes it
            try:
                with theirs.lock(0):
                    break
            except LockTimeoutError:
                assert time.monotonic() < deadline, "the lease never lapsed"
                time.sleep(0.01)
        # The peer holds it now.
        with theirs.lock(0), pytest.raises(LockLostError, match="nothing was spent"):
            mine.check_writable()
    short.close()
    peer.close()


def test_incidents_are_opened_once_for_the_whole_fleet(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    seed(sellers, fake, 222)
    peer = db.open(fake.client_id)
    first, second = sellers.store("111").incidents(), peer.store("111").incidents()
    assert first.open("refresh_failing", "since 10:00") == (True, "since 10:00")
    assert second.open("refresh_failing", "since 10:01") == (False, "since 10:00")
    assert peer.store("222").incidents().open("refresh_failing", "x") == (True, "x")
    second.close("refresh_failing")
    assert first.open("refresh_failing", "since 11:00") == (True, "since 11:00")
    peer.close()


# -- the URL ---------------------------------------------------------------------------------


def test_sqlite_urls_are_relative_to_the_env_folder_or_absolute(tmp_path: Path) -> None:
    env = tmp_path / "app" / ".env"
    assert sqlite_path("sqlite:///sellers.db", str(env.parent), str(env)) == str(
        env.parent / "sellers.db"
    )
    assert sqlite_path("sqlite:///data/s.db", "/srv", "x") == "/srv/data/s.db"
    assert sqlite_path("sqlite:////var/lib/app/s.db", "/srv", "x") == "/var/lib/app/s.db"
    stores = sellers_from_url("sqlite:///sellers.db", {"ML_TOKEN_LOCK_TIMEOUT": "7"}, str(env))
    assert isinstance(stores, SqlSellers)
    assert stores.location == str(env.parent / "sellers.db")
    assert stores.lock_timeout == 7.0


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://sellers.db",
        "sqlite://host/sellers.db",
        "sqlite:",
        "sqlite:///",
        "sqlite:///data/",
        "sqlite:///:memory:",
        "sqlite:///file:x.db?mode=ro",
        "sqlite:///s.db?timeout=5",
        "sqlite:///s.db#x",
    ],
)
def test_a_sqlite_url_of_another_form_is_a_config_error_with_both_forms(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        sellers_from_url(url, {}, "/srv/app/.env")
    message = str(caught.value)
    assert "/srv/app/.env" in message
    assert "sqlite:///sellers.db" in message and "sqlite:////" in message


def test_a_store_url_never_shows_its_password(tmp_path: Path) -> None:
    for url in ("mysql://app:hunter2secret@db/x", "sqlite://app:hunter2secret@db/x"):
        with pytest.raises(ConfigError) as caught:
            sellers_from_url(url, {}, str(tmp_path / ".env"))
        assert "hunter2secret" not in str(caught.value)
    with pytest.raises(ConfigError, match="ML_TOKEN_LOCK_TIMEOUT"):
        sellers_from_url("sqlite:///s.db", {"ML_TOKEN_LOCK_TIMEOUT": "soon"}, "/x/.env")
    with pytest.raises(ConfigError) as caught:
        SqlSellers.postgresql("redis://app:hunter2secret@db/0")
    assert "hunter2secret" not in str(caught.value)
    # Nothing listens on port 1: the error names the database, never the password.
    unreachable = SqlSellers.postgresql(
        "postgresql://app:hunter2secret@127.0.0.1:1/sellers", client_id="1"
    )
    assert "hunter2secret" not in repr(unreachable)
    with pytest.raises(StoreError) as failed:
        unreachable.sellers()
    assert "hunter2secret" not in str(failed.value)
    assert "postgresql://app:***@127.0.0.1:1/sellers" in str(failed.value)


def test_postgres_urls_name_the_postgresql_store(postgres_url: str, fake: FakeMercadoLibre) -> None:
    for url in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        stores = sellers_from_url(url, {}, "/srv/app/.env")
        assert isinstance(stores, SqlSellers)
        stores.bind_client(fake.client_id)
        seed(stores, fake, 111)
        assert stores.sellers() == ["111"]
        stores.remove("111")
        stores.close()


# -- the engine through it -----------------------------------------------------------------------


def test_a_seller_whose_token_expired_is_refreshed_and_the_others_are_untouched(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111, expires_at=time.time() - 10)
    other = seed(sellers, fake, 222, expires_at=time.time() - 10)
    response = me(auth_for(sellers, fake, 111), fake)
    assert response.status_code == 200 and response.json()["user_id"] == 111
    assert fake.refreshes_by_user() == {111: 1}
    (refresh, generation, answer) = db.row("111", "refresh_token", "generation", "answer")
    assert fake.is_live(refresh) and generation == 2 and answer is None
    assert db.row("222", "refresh_token") == (other["refresh_token"],)
    # Another process adopts the committed tokens, without a refresh.
    peer = db.open(fake.client_id)
    assert me(auth_for(peer, fake, 111), fake).status_code == 200
    assert fake.stats()["refreshes"] == 1
    peer.close()


def test_a_401_on_a_token_the_row_says_is_valid_is_absorbed_by_one_refresh(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    db.edit("111", "access_token", "APP_USR-1234567890123456-010101-deadbeef-111")
    response = me(auth_for(sellers, fake, 111), fake)
    assert response.status_code == 200
    assert fake.stats()["api_401"] == 1 and fake.stats()["refreshes"] == 1


def test_invalid_grant_marks_that_seller_only_and_is_not_sent_again(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111, expires_at=time.time() - 10)
    seed(sellers, fake, 222, expires_at=time.time() - 10)
    fake.revoke_refresh_tokens(111)
    with pytest.raises(InvalidGrantError):
        me(auth_for(sellers, fake, 111), fake)
    assert fake.stats()["invalid_grant"] == 1
    message = mlauth.reauthorization_required(sellers.store("111"))
    assert message is not None and "mlauth login --seller 111" in message
    assert mlauth.reauthorization_required(sellers.store("222")) is None
    states = {row.user_id: row.state for row in sellers.rows()}
    assert states == {"111": REAUTHORIZE, "222": OK}
    # Another process stops at once, sending nothing; the other seller goes on.
    peer = db.open(fake.client_id)
    with pytest.raises(InvalidGrantError, match="not sent"):
        me(auth_for(peer, fake, 111), fake)
    assert fake.stats()["token_requests"] == 1
    assert me(auth_for(peer, fake, 222), fake).status_code == 200
    # A new authorization clears the mark.
    sellers.add("111", tokens_of(fake.issue_tokens(user_id=111)), replace=True)
    assert mlauth.reauthorization_required(sellers.store("111")) is None
    assert me(auth_for(peer, fake, 111), fake).status_code == 200
    peer.close()


def test_a_failing_refresh_is_shown_with_its_reason_until_a_commit_clears_it(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    issued = seed(sellers, fake, 111, expires_at=time.time() - 10)
    fake.fail_next_token_requests(1, status=400, error="invalid_client")
    with pytest.raises(mlauth.RefreshError):
        me(auth_for(sellers, fake, 111), fake)
    (row,) = sellers.rows(["111"])
    assert row.state == FAILING and row.detail is not None and "invalid_client" in row.detail
    assert str(issued["refresh_token"]) not in row.detail
    assert ("failing" in dict(sellers.store("111").status_details())) is True
    peer = db.open(fake.client_id)  # a process without the failure in memory
    assert me(auth_for(peer, fake, 111), fake).status_code == 200
    assert sellers.rows(["111"])[0].state == OK
    assert db.row("111", "failing_since", "failing_reason") == (None, None)
    peer.close()


def test_an_answer_for_another_seller_is_kept_and_never_written_to_either_chain(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111, expires_at=time.time() - 10)
    theirs = seed(sellers, fake, 222)
    # Seller 111's row holds seller 222's refresh token (filed under the wrong seller).
    db.edit("111", "refresh_token", fake.issue_tokens(user_id=222)["refresh_token"])
    with pytest.raises(WrongSellerError) as caught:
        me(auth_for(sellers, fake, 111), fake)
    assert (caught.value.expected, caught.value.found) == ("111", "222")
    answer, generation = db.row("111", "answer", "generation")
    assert json.loads(answer)["body"].endswith("}") and generation == 1
    assert db.row("222", "refresh_token") == (theirs["refresh_token"],)
    assert sellers.rows(["111"])[0].state == REAUTHORIZE
    # Another process finds the kept answer: it says so and sends nothing.
    peer = db.open(fake.client_id)
    with pytest.raises(WrongSellerError, match="stays kept there"):
        me(auth_for(peer, fake, 111), fake)
    assert fake.stats()["token_requests"] == 1
    assert db.row("111", "answer") == (answer,)
    assert db.row("222", "refresh_token") == (theirs["refresh_token"],)
    peer.close()


def test_a_lease_held_on_one_seller_does_not_hold_up_anothers_refresh(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111, expires_at=time.time() - 10)
    seed(sellers, fake, 222, expires_at=time.time() - 10)
    peer = db.open(fake.client_id)
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with peer.store("111").lock(5):  # seller 111 is "refreshing" in another process
            taken.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(30)
        # Seller 222's refresh needs no wait: a store that serialized sellers would time
        # out here (lock_timeout 1 s) while 111's lease is held.
        assert me(auth_for(sellers, fake, 222, lock_timeout=1.0), fake).status_code == 200
        assert fake.refreshes_by_user() == {222: 1}
        assert sellers.store("111").refresh_in_progress() is True  # still held
    finally:
        release.set()
        holder.join()
    peer.close()


def _connections(db: Db) -> int:
    """This process's connections to the database: SQLite's open descriptors of the file,
    PostgreSQL's sessions on the database (the count's own included)."""
    if db.kind == "sqlite":
        folder = Path("/proc/self/fd")
        targets = []
        for fd in folder.iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:
                continue  # the listing's own descriptor, gone by now
        return targets.count(db.spec)
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    ((count,),) = db.execute(query)
    return int(count)


def test_threads_that_come_and_go_leave_no_connection_behind(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    store = sellers.store("111")
    store.load()
    before = _connections(db)
    for _ in range(20):  # a server's threads: each does one request's reads, then ends
        thread = threading.Thread(target=lambda: (store.load(), store.check_writable()))
        thread.start()
        thread.join()
    gc.collect()
    # SQLite keeps the descriptor of one closed connection open for the next (the
    # process's locks on the file are held through it): one more at most, not twenty.
    assert _connections(db) <= before + (1 if db.kind == "sqlite" else 0)
    sellers.close()
    assert _connections(db) < before  # close() lets go of the main thread's too


def test_a_live_lease_of_a_machine_with_the_same_name_is_not_taken_over(
    tmp_path: Path,
) -> None:
    """Two machines named alike share the initial pid namespace's inode (a kernel constant):
    a holder whose pid is not running here is judged dead only if it is of this very boot."""
    sellers = SqlSellers.sqlite(str(tmp_path / "sellers.db"), client_id="123", lock_timeout=30)
    store = sellers.add(
        "111111", mlauth.TokenSet(mlauth.Secret("APP_USR-a-111111"), mlauth.Secret("TG-r-111111"))
    )
    name, boot, namespace = sql._HOST.split("/")
    assert boot not in ("", "-")  # this machine has a boot id, so it is in the identity
    twin = f"{name}/another-boot/{namespace}"  # a clone: same name, same namespace inode
    with sqlite3.connect(tmp_path / "sellers.db") as db:
        db.execute(
            "INSERT INTO mlauth_leases VALUES ('123', '111111', 'owner', ?, 'pid 4000000@x', ?, ?)",
            (time.time() + 30, twin, 4_000_000),
        )
    db.close()
    with pytest.raises(LockTimeoutError), store.lock(0.3):
        pass
    sellers.close()


def test_a_store_in_a_missing_folder_is_a_store_error_naming_the_fix(tmp_path: Path) -> None:
    sellers = SqlSellers.sqlite(str(tmp_path / "data" / "sellers.db"), client_id="123")
    with pytest.raises(StoreError, match=r"cannot create the SQLite database .*create its folder"):
        sellers.sellers()
    sellers.close()


def test_a_migration_whose_lease_lapsed_removes_nothing_and_the_live_chain_stays(
    tmp_path: Path, fake: FakeMercadoLibre
) -> None:
    """A seller's move to another store holds the old store's lease from the read to the
    removal. If writing into the new store outlasts that lease, a refresher may take it and
    rotate the chain: the move must then stop (LockLostError) and leave the old row, which
    holds the live link, where it is."""
    uid = "111111"
    source = SqlSellers.sqlite(str(tmp_path / "a.db"), client_id=fake.client_id, lock_timeout=1.0)
    target = SqlSellers.sqlite(str(tmp_path / "b.db"), client_id=fake.client_id, lock_timeout=5.0)
    seed(source, fake, int(uid))
    busy, done = threading.Event(), threading.Event()

    def slow_target() -> None:  # the new store keeps the seller's lease for 2.5 s (another
        # add or move of that seller there: it is not held yet, so its store is made directly)
        with target._made(uid).lock(5):
            busy.set()
            done.wait(2.5)

    holder = threading.Thread(target=slow_target)
    holder.start()
    assert busy.wait(10)
    failures: list[BaseException] = []

    def move() -> None:
        try:
            _move(source, target, uid, lock_timeout=10)
        except BaseException as exc:  # noqa: BLE001 (checked below)
            failures.append(exc)

    mover = threading.Thread(target=move)
    mover.start()
    deadline = time.monotonic() + 10
    while not source.store(uid).refresh_in_progress():  # the move holds the lease
        assert time.monotonic() < deadline and mover.is_alive()
        time.sleep(0.01)
    worker = SqlSellers.sqlite(str(tmp_path / "a.db"), client_id=fake.client_id, lock_timeout=1.0)
    rotated = auth_for(worker, fake, int(uid), lock_timeout=10).refresh()
    mover.join(30)
    holder.join(30)
    assert len(failures) == 1 and isinstance(failures[0], LockLostError), failures
    live = rotated.refresh_token
    assert live is not None and fake.is_live(live.reveal())
    assert source.store(uid).load()[0].refresh_token == live  # nothing removed
    for stores in (source, target, worker):
        stores.close()
