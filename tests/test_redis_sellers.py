"""The Redis store of many sellers (a hash per seller, a set that lists them) against a real
redis-server and the loopback fake serving several sellers: the contract, the engine through
one seller's store, real processes, a kill after the raw answer was kept, and scale."""

from __future__ import annotations

import gc
import multiprocessing
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

import mlauth
from mlauth.stores.redis import RedisStore
from mlauth.stores.redis_sellers import ROWS_BATCH, redis_sellers_held
from mlauth.stores.sellers import FAILING, OK, REAUTHORIZE
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.hostile_answers import spend_outside
from tests.support.redis_sellers import (
    SellerWorker,
    auth_for,
    calls_to_random_sellers,
    chain_of,
    go,
    hash_of,
    seller_keys,
    sellers_in,
    share_with_fork_pool,
)

A, B, C = 1001, 2002, 3003


def key(fake: FakeMercadoLibre, user_id: int) -> str:
    return f"mlauth:{fake.client_id}:seller:{user_id}"


def prefix(fake: FakeMercadoLibre) -> str:
    return f"mlauth:{fake.client_id}"


def me(auth: mlauth.MLAuth, fake: FakeMercadoLibre) -> requests.Response:
    return requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)


# -- the contract ----------------------------------------------------------------------------


def test_added_sellers_are_listed_and_each_store_holds_its_own_chain(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        chains = {uid: chain_of(fake_ml, uid) for uid in (C, A, B, 99)}
        for uid, tokens in chains.items():
            sellers.add(str(uid), tokens)

        assert sellers.sellers() == ["99", "1001", "2002", "3003"]  # numerically
        for uid, tokens in chains.items():
            store = sellers.store(str(uid))
            assert store.seller == str(uid)
            assert store.load()[0] == tokens
            assert hash_of(redis_server.url, key(fake_ml, uid))["seller"] == str(uid)
        assert sellers.store(str(A)) is sellers.store(A)  # type: ignore[arg-type]
    assert seller_keys(redis_server.url, prefix(fake_ml)) == ({"99", "1001", "2002", "3003"},) * 2


def test_a_redis_is_a_sellers_store_when_it_holds_sellers_and_no_one_seller_hash(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    url, client_id = redis_server.url, fake_ml.client_id
    assert not redis_sellers_held(url, client_id)  # empty
    with sellers_in(url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A))
    assert redis_sellers_held(url, client_id)
    assert not redis_sellers_held(url, "another-app")
    one = RedisStore(url, client_id=client_id)
    one.seed(chain_of(fake_ml, fake_ml.user_id))
    assert not redis_sellers_held(url, client_id)  # the one-seller hash is there: that store
    assert redis_sellers_held(url, client_id, key="mlauth:elsewhere")


def test_a_held_seller_is_added_again_only_with_replace(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A))
        before = hash_of(redis_server.url, key(fake_ml, A))
        with pytest.raises(mlauth.ConfigError, match="holds seller 1001 already"):
            sellers.add(str(A), chain_of(fake_ml, A))
        assert hash_of(redis_server.url, key(fake_ml, A)) == before

        newer = chain_of(fake_ml, A)
        sellers.add(str(A), newer, replace=True)
        after = hash_of(redis_server.url, key(fake_ml, A))
    assert after["refresh_token"] == newer.refresh_token.reveal()  # type: ignore[union-attr]
    assert after["chain"] != before["chain"]
    assert int(after["generation"]) == int(before["generation"]) + 1


def test_another_sellers_tokens_are_refused_and_nothing_is_written(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        with pytest.raises(mlauth.WrongSellerError) as added:
            sellers.add(str(A), chain_of(fake_ml, B))
        assert (added.value.expected, added.value.found) == (str(A), str(B))
        assert sellers.sellers() == []
        assert hash_of(redis_server.url, key(fake_ml, A)) == {}

        store = sellers.add(str(A), chain_of(fake_ml, A))
        _, version = store.load()
        before = hash_of(redis_server.url, key(fake_ml, A))
        with pytest.raises(mlauth.WrongSellerError):
            store.save(chain_of(fake_ml, B), replaces=version)
        with pytest.raises(mlauth.WrongSellerError):
            store.seed(chain_of(fake_ml, B), replace=True)
        assert hash_of(redis_server.url, key(fake_ml, A)) == before
        assert sellers.sellers() == [str(A)]


def test_an_unknown_seller_is_a_config_error_naming_ten_held_ones(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        with pytest.raises(mlauth.ConfigError, match="holds no seller under"):
            sellers.store("5")
        for uid in range(1, 13):
            sellers.add(str(uid), chain_of(fake_ml, uid))
        with pytest.raises(mlauth.ConfigError) as unknown:
            sellers.store("77")
        with pytest.raises(mlauth.ConfigError, match="not a seller's user id"):
            sellers.store("12; DEL x")
    message = str(unknown.value)
    assert "no seller 77; it holds 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 2 more" in message


def test_a_removed_seller_is_gone_and_a_process_holding_it_cannot_put_it_back(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with (
        sellers_in(redis_server.url, fake_ml) as sellers,
        sellers_in(redis_server.url, fake_ml) as elsewhere,
    ):
        sellers.add(str(A), chain_of(fake_ml, A))
        sellers.add(str(B), chain_of(fake_ml, B))
        held = elsewhere.store(str(A))  # another process, with the chain in memory
        tokens, version = held.load()

        assert sellers.remove(str(A)) is True
        assert sellers.remove(str(A)) is False
        assert sellers.sellers() == [str(B)]
        with pytest.raises(mlauth.ConfigError, match="holds no seller 1001"):
            sellers.store(str(A))
        # Redis lost nothing: the seller was removed, so the memory of it is not put back...
        with pytest.raises(mlauth.ConfigError, match="was removed"):
            held.load()
        # ...nor written by a refresh that was in flight.
        with pytest.raises(mlauth.StoreError, match="was removed"):
            held.save(chain_of(fake_ml, A), replaces=version)
        assert hash_of(redis_server.url, key(fake_ml, A)) == {}
        assert seller_keys(redis_server.url, prefix(fake_ml)) == ({str(B)}, {str(B)})

        sellers.add(str(A), chain_of(fake_ml, A))  # added again: the removal is over
        assert elsewhere.sellers() == [str(A), str(B)]
        assert elsewhere.store(str(A)).load()[0] != tokens


def test_the_set_lists_again_a_seller_whose_chain_a_process_put_back_after_redis_lost_all(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A))
        store = sellers.store(str(A))
        tokens, _ = store.load()
        redis_server.restart()  # no persistence: the hash and the set are gone
        assert seller_keys(redis_server.url, prefix(fake_ml)) == (set(), set())

        assert store.load()[0] == tokens  # put back from this process's memory
        assert seller_keys(redis_server.url, prefix(fake_ml)) == ({str(A)}, {str(A)})


def test_rows_read_every_seller_in_one_pipeline_per_batch_and_hold_no_token(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        chains = {uid: chain_of(fake_ml, uid) for uid in (A, B, C)}
        for uid, tokens in chains.items():
            sellers.add(str(uid), tokens)
        calls: list[int] = []
        execute = redis.client.Pipeline.execute

        def counted(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
            calls.append(len(self.command_stack))
            return execute(self, *args, **kwargs)

        monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
        rows = sellers.rows()
        some = sellers.rows([str(C), str(A)])

    assert calls == [3, 2]
    assert [row.user_id for row in rows] == ["1001", "2002", "3003"]
    assert [row.user_id for row in some] == ["1001", "3003"]
    for row in rows:
        tokens = chains[int(row.user_id)]
        assert (row.state, row.detail) == (OK, None)
        assert row.expires_at == tokens.expires_at
        assert row.refreshed_by == "the test"
        for secret in (tokens.access_token, tokens.refresh_token):
            assert secret is not None and secret.reveal() not in repr(row)


def test_a_value_mlauth_never_writes_spoils_only_its_own_row(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        for uid in (A, B, C):
            sellers.add(str(uid), chain_of(fake_ml, uid))
        with redis.Redis.from_url(redis_server.url) as client:
            client.hset(key(fake_ml, B), "refreshed_by", b"\xff\xfe by hand")
            client.hset(key(fake_ml, C), "expires_at", "tomorrow")
        rows = {row.user_id: row for row in sellers.rows()}

    assert rows[str(A)].state == OK
    assert rows[str(B)].state == FAILING
    assert key(fake_ml, B) in (rows[str(B)].detail or "")
    assert "no UTF-8" in (rows[str(B)].detail or "")
    assert rows[str(C)].state == FAILING
    assert "expires_at" in (rows[str(C)].detail or "")


# -- the engine through one seller's store ------------------------------------------------------


def test_a_sellers_auth_refreshes_its_own_chain_only(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A, expired=True))
        sellers.add(str(B), chain_of(fake_ml, B, expired=True))
        others = hash_of(redis_server.url, key(fake_ml, B))

        response = me(auth_for(fake_ml, sellers.store(str(A))), fake_ml)

        assert response.status_code == 200 and response.json()["user_id"] == A
        assert fake_ml.refreshes_by_user() == {A: 1}
        stored = hash_of(redis_server.url, key(fake_ml, A))
        assert fake_ml.is_live(stored["refresh_token"])
        assert hash_of(redis_server.url, key(fake_ml, B)) == others


def test_a_401_adopts_the_chain_a_peer_refreshed(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with (
        sellers_in(redis_server.url, fake_ml, check_interval=3600.0) as sellers,
        sellers_in(redis_server.url, fake_ml) as elsewhere,
    ):
        sellers.add(str(A), chain_of(fake_ml, A))
        auth = auth_for(fake_ml, sellers.store(str(A)))
        assert me(auth, fake_ml).status_code == 200
        auth_for(fake_ml, elsewhere.store(str(A))).refresh()  # the old access token dies

        response = me(auth, fake_ml)

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert fake_ml.refreshes_by_user() == {A: 1}  # adopted, not refreshed again


def test_invalid_grant_marks_that_seller_only_and_no_process_sends_its_token_again(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with (
        sellers_in(redis_server.url, fake_ml) as sellers,
        sellers_in(redis_server.url, fake_ml) as elsewhere,
    ):
        for uid in (A, B, C):
            sellers.add(str(uid), chain_of(fake_ml, uid, expired=True))
        fake_ml.revoke_refresh_tokens(A)

        with pytest.raises(mlauth.InvalidGrantError):
            me(auth_for(fake_ml, sellers.store(str(A))), fake_ml)
        assert me(auth_for(fake_ml, sellers.store(str(B))), fake_ml).status_code == 200
        with pytest.raises(mlauth.InvalidGrantError, match="not sent"):
            me(auth_for(fake_ml, elsewhere.store(str(A))), fake_ml)  # another process
        rows = {row.user_id: row for row in sellers.rows()}
        dead = mlauth.reauthorization_required(elsewhere.store(str(A)))

    assert fake_ml.stats()["invalid_grant"] == 1  # sent once, by the first process only
    assert rows[str(A)].state == REAUTHORIZE
    assert "invalid_grant" in (rows[str(A)].detail or "")
    assert (rows[str(B)].state, rows[str(C)].state) == (OK, OK)
    assert dead is not None and "seller 1001 must authorize the app again" in dead


def test_a_failing_refresh_shows_since_when_until_a_refresh_commits(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A, expired=True))
        sellers.add(str(B), chain_of(fake_ml, B))
        fake_ml.fail_next_token_requests(2, status=503, error="server_error")
        before = time.time()
        for _ in range(2):
            with pytest.raises(mlauth.RefreshError):
                auth_for(fake_ml, sellers.store(str(A)), max_attempts=1).refresh()
        failing = {row.user_id: row for row in sellers.rows()}
        since = float(hash_of(redis_server.url, key(fake_ml, A))["failing_since"])

        auth_for(fake_ml, sellers.store(str(A))).refresh()
        healed = {row.user_id: row for row in sellers.rows()}

    assert failing[str(A)].state == FAILING
    assert "503" in (failing[str(A)].detail or "")
    assert failing[str(B)].state == OK
    assert before <= since <= time.time()  # the first failure's time, kept by the second
    assert healed[str(A)].state == OK and healed[str(A)].detail is None


def test_an_answer_for_another_seller_is_kept_out_of_the_chain(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A, expired=True))
        misfiled = chain_of(fake_ml, B).refresh_token
        assert misfiled is not None
        with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
            client.hset(key(fake_ml, A), "refresh_token", misfiled.reveal())  # by hand
        auth = auth_for(fake_ml, sellers.store(str(A)))

        with pytest.raises(mlauth.WrongSellerError):
            auth.refresh()
        stored = hash_of(redis_server.url, key(fake_ml, A))
        row = sellers.rows([str(A)])[0]
        with pytest.raises(mlauth.RefreshError):
            auth_for(fake_ml, sellers.store(str(A))).refresh()  # known dead: not sent

    assert fake_ml.refreshes_by_user() == {B: 1}
    assert stored["refresh_token"] == misfiled.reveal()  # B's new tokens never went in
    assert str(B) in stored["answer"]  # kept for a human (the raw answer names user B)
    assert row.state == REAUTHORIZE and "user 2002" in (row.detail or "")
    assert fake_ml.stats()["token_requests"] == 1


def test_a_dead_holders_answer_for_another_seller_is_never_recovered_into_the_chain(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        store = sellers.add(str(A), chain_of(fake_ml, A, expired=True))
        misfiled = chain_of(fake_ml, B).refresh_token
        assert misfiled is not None
        with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
            client.hset(key(fake_ml, A), "refresh_token", misfiled.reveal())  # by hand
        # A holder that spent it, kept the raw answer (seller B's), and died before its commit.
        with store.refresh(5.0) as txn:
            txn.begin(misfiled)
            answer = spend_outside(fake_ml, misfiled.reveal())
            txn.answered(answer.content, started=time.time(), at=time.time())
        assert str(B) in hash_of(redis_server.url, key(fake_ml, A))["answer"]

        with pytest.raises(mlauth.RefreshError):
            auth_for(fake_ml, sellers.store(str(A))).refresh()  # recovery meets it first
        stored = hash_of(redis_server.url, key(fake_ml, A))
        row = sellers.rows([str(A)])[0]

    assert stored["refresh_token"] == misfiled.reveal()  # B's new tokens never went in
    assert not fake_ml.is_live(stored["refresh_token"])
    assert "answer" in stored  # kept for a human until a login
    assert row.state == REAUTHORIZE


# -- real processes ------------------------------------------------------------------------------


@pytest.mark.processes
def test_processes_refreshing_one_seller_refresh_once(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A, expired=True))
        sellers.add(str(B), chain_of(fake_ml, B))
    fake_ml.token_delay = 0.2  # the others reach the lock while the first holds it
    workers = [SellerWorker(tmp_path, f"w{n}", redis_server.url, fake_ml, A) for n in range(4)]
    for worker in workers:
        worker.wait_ready()
    go(tmp_path)
    results = [worker.result() for worker in workers]

    assert [(r.get("status"), r.get("user")) for r in results] == [(200, A)] * 4, results
    assert fake_ml.refreshes_by_user() == {A: 1}
    assert fake_ml.stats()["invalid_grant"] == 0


@pytest.mark.processes
def test_a_seller_whose_refresh_hangs_delays_no_other_seller(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A, expired=True))
        sellers.add(str(B), chain_of(fake_ml, B, expired=True))
    hanging = SellerWorker(tmp_path, "a", redis_server.url, fake_ml, A, phase="before-post")
    hanging.wait_ready()
    go(tmp_path)
    hanging.wait_paused()  # it holds seller A's lock, and its POST does not leave
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        assert client.exists(f"{key(fake_ml, A)}:lock")
        result = SellerWorker(tmp_path, "b", redis_server.url, fake_ml, B).result()
        # B refreshed and called while A's holder still held A's lock, alive.
        assert client.exists(f"{key(fake_ml, A)}:lock")
    assert hanging.proc.poll() is None
    hanging.proc.send_signal(signal.SIGKILL)
    hanging.proc.communicate(timeout=10)

    assert (result.get("status"), result.get("user")) == (200, B), result
    assert fake_ml.refreshes_by_user() == {B: 1}


@pytest.mark.processes
def test_a_refresher_killed_after_its_raw_answer_was_kept_is_recovered_by_the_next(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    with sellers_in(redis_server.url, fake_ml) as sellers:
        sellers.add(str(A), chain_of(fake_ml, A, expired=True))
    victim = SellerWorker(
        tmp_path, "victim", redis_server.url, fake_ml, A, phase="after-raw", lock_timeout=2
    )
    victim.wait_ready()
    go(tmp_path)
    victim.wait_paused()
    kept = hash_of(redis_server.url, key(fake_ml, A))
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.communicate(timeout=10)

    later = SellerWorker(tmp_path, "later", redis_server.url, fake_ml, A, lock_timeout=2)
    result = later.result()
    after = hash_of(redis_server.url, key(fake_ml, A))

    assert "answer" in kept  # the victim died holding only the raw answer
    assert (result.get("status"), result.get("user")) == (200, A), result
    assert fake_ml.refreshes_by_user() == {A: 1}  # recovered, not refreshed again
    assert fake_ml.stats()["invalid_grant"] == 0
    assert "answer" not in after and fake_ml.is_live(after["refresh_token"])
    assert "recovered a refresh that was not committed" in later.log.read_text()


# -- scale ---------------------------------------------------------------------------------------


def test_ten_thousand_sellers_of_whom_ten_are_touched_hold_ten_stores(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 10_000
    touched = [str(uid) for uid in range(500, count, 1000)]
    with sellers_in(redis_server.url, fake_ml) as adding:
        for uid in touched:
            adding.add(uid, chain_of(fake_ml, int(uid)))
    del adding
    # The others as a peer's adds leave them, written in bulk (10,000 adds take a while).
    with (
        redis.Redis.from_url(redis_server.url, decode_responses=True) as client,
        client.pipeline(transaction=False) as pipe,
    ):
        for uid in map(str, range(1, count + 1)):
            if uid not in touched:
                fields = {
                    "chain": "c0ffee",
                    "generation": 1,
                    "refresh_token": f"TG-fake-not-real-{uid}",
                    "expires_at": repr(time.time() + 3600),
                    "seller": uid,
                }
                pipe.hset(key(fake_ml, int(uid)), mapping=fields)
                pipe.sadd(f"{prefix(fake_ml)}:sellers", uid)
        pipe.execute()
    gc.collect()
    before = sum(isinstance(o, RedisStore) for o in gc.get_objects())

    with sellers_in(redis_server.url, fake_ml) as sellers:  # a process that starts now
        for round_ in range(3):
            for uid in touched:
                auth = auth_for(fake_ml, sellers.store(uid))
                assert me(auth, fake_ml).status_code == 200, (round_, uid)
        calls: list[int] = []
        execute = redis.client.Pipeline.execute

        def counted(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
            calls.append(len(self.command_stack))
            return execute(self, *args, **kwargs)

        monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
        rows = sellers.rows()
        gc.collect()
        held = sum(isinstance(o, RedisStore) for o in gc.get_objects()) - before
        with redis.Redis.from_url(redis_server.url) as client:
            connections = len(client.client_list())

    assert held == len(touched) == 10
    assert len(rows) == count and {row.state for row in rows} == {OK}
    assert calls == [ROWS_BATCH] * (count // ROWS_BATCH)
    # Every seller's store shares the pools: this client's connection, and a few of theirs.
    assert connections <= 3


@pytest.mark.processes
def test_a_fork_pool_built_after_the_parent_used_the_store_shares_every_sellers_chain(
    redis_server: RedisServer,
) -> None:
    lifetime, seconds, workers = 2.0, 5.0, 3
    uids = [str(uid) for uid in (A, B, C, 4004, 5005)]
    with (
        FakeMercadoLibre(token_lifetime=lifetime, kill_old_access_on_refresh=True) as fake,
        sellers_in(redis_server.url, fake) as sellers,
    ):
        for uid in uids:
            sellers.add(uid, chain_of(fake, int(uid)))
        auths = {uid: auth_for(fake, sellers.store(uid)) for uid in uids}
        for auth in auths.values():  # the parent's pools hold connections before the fork
            assert me(auth, fake).status_code == 200
        share_with_fork_pool(auths)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            jobs = [
                pool.apply_async(calls_to_random_sellers, (fake.base_url, seconds, n))
                for n in range(workers)
            ]
            results = [job.get(timeout=120) for job in jobs]
        stats, by_user = fake.stats(), fake.refreshes_by_user()

    print(f"\n[figures] fork pool over {len(uids)} sellers: {results} refreshes={by_user}")
    assert sum(r["calls"] for r in results) > workers * len(uids)
    assert [r["failed"] for r in results] == [0] * workers, [r["errors"] for r in results]
    assert stats["invalid_grant"] == 0
    # At most one refresh per token lifetime per seller (a quarter early), plus the first.
    assert set(by_user) <= set(map(int, uids))
    assert all(count <= seconds / (lifetime * 0.75) + 2 for count in by_user.values()), by_user
