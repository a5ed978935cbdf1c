"""The Redis store against a real redis-server and the loopback fake MercadoLibre."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

import mlauth
from mlauth import Secret
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores import store_from_env
from mlauth.stores.envfile import STORE_KEY, TOKEN_KEYS, read_env_file, update_env_file
from mlauth.stores.redis import RedisStore, redact_url
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from mlauth.tokens import TokenSet


def redis_env(
    fake: FakeMercadoLibre,
    folder: Path,
    url: str,
    *,
    expires_at: float | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """A .env for ``fake`` whose tokens were moved into the Redis at ``url``."""
    folder.mkdir(parents=True, exist_ok=True)
    env = folder / ".env"
    fake.write_env(env, expires_at=expires_at, extra=extra)
    migrate_to_redis(env, url)
    return env


def commands(server: RedisServer, name: str) -> int:
    """How many times the server ran command ``name`` (Redis counts them itself)."""
    with server.client() as client:
        stats = client.info("commandstats")
    entry = stats.get(f"cmdstat_{name}")
    return int(entry["calls"]) if entry else 0


def stored(server: RedisServer, env: Path) -> dict[str, str]:
    client_id = read_env_file(env)["ML_CLIENT_ID"]
    with server.client() as client:
        values: dict[str, str] = client.hgetall(f"mlauth:{client_id}:tokens")
    return values


def test_ml_token_store_in_the_env_selects_redis_and_refreshes_land_there(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url, expires_at=time.time() - 10)
    auth = mlauth.MLAuth.from_env(env)
    assert isinstance(auth.store, RedisStore)
    before = stored(redis_server, env)

    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200

    after = stored(redis_server, env)
    assert fake_ml.stats()["refreshes"] == 1
    assert after["refresh_token"] != before["refresh_token"]
    assert int(after["generation"]) == int(before["generation"]) + 1
    assert after["refresh_token"] == auth.tokens.refresh_token.reveal()  # type: ignore[union-attr]
    assert not set(TOKEN_KEYS) & set(read_env_file(env))  # nothing went back into the file


def test_api_calls_cost_no_redis_round_trip_between_checks(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url)
    store = store_from_env(env)
    assert isinstance(store, RedisStore)
    store.check_interval = 3600.0
    auth = mlauth.MLAuth.from_env(env, store=store)
    reads = commands(redis_server, "hmget") + commands(redis_server, "hgetall")
    with requests.Session() as session:
        session.auth = auth
        for _ in range(50):
            assert session.get(f"{fake_ml.base_url}/users/me").status_code == 200
    assert commands(redis_server, "hmget") + commands(redis_server, "hgetall") == reads


def test_a_401_rereads_redis_at_once_and_adopts_a_peers_token(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url)
    slow = store_from_env(env)
    assert isinstance(slow, RedisStore)
    slow.check_interval = 3600.0  # would not look for a day on its own
    auth = mlauth.MLAuth.from_env(env, store=slow)
    peer = mlauth.MLAuth.from_env(env)
    peer_store = peer.store
    assert isinstance(peer_store, RedisStore)
    peer.refresh()  # a peer refreshes; the old access token dies at once

    response = requests.get(f"{fake_ml.base_url}/users/me", auth=auth)

    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert fake_ml.stats()["refreshes"] == 1  # adopted, not refreshed again
    assert auth.tokens.access_token == peer.tokens.access_token


def test_a_commit_over_a_version_a_peer_replaced_is_refused(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url)
    first, second = store_from_env(env), store_from_env(env)
    _, read_first = first.load()
    _, read_second = second.load()
    newer = mlauth.TokenSet(mlauth.Secret("APP_USR-new"), mlauth.Secret("TG-new"))
    first.save(newer, replaces=read_first)

    stale = mlauth.TokenSet(mlauth.Secret("APP_USR-stale"), mlauth.Secret("TG-stale"))
    with pytest.raises(mlauth.StaleCommitError, match="peer committed newer tokens"):
        second.save(stale, replaces=read_second)

    assert stored(redis_server, env)["refresh_token"] == "TG-new"
    assert second.load()[0].refresh_token == mlauth.Secret("TG-new")


def test_stale_holder_whose_lock_expired_adopts_the_newer_token(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(
        fake_ml,
        tmp_path,
        redis_server.url,
        expires_at=time.time() - 10,
        extra={"ML_TOKEN_LOCK_TIMEOUT": "0.5"},
    )
    holder = mlauth.MLAuth.from_env(env, backoff=0.001)
    store = holder.store
    assert isinstance(store, RedisStore)
    fake_ml.token_delay = 3.0  # the holder's POST outlives its 0.5 s lock
    result: dict[str, object] = {}

    def call() -> None:
        result["response"] = requests.get(f"{fake_ml.base_url}/users/me", auth=holder)

    thread = threading.Thread(target=call)
    thread.start()
    assert fake_ml.token_requests_in_flight.wait(10)
    # A peer takes the lock once it expired and commits a newer generation (here: a chain
    # issued afresh, as a second `mlauth login` would), while the holder's POST is pending.
    peer = store_from_env(env)
    with peer.lock(10):
        _, version = peer.load()
        newer = fake_ml.issue_tokens()
        peer.save(
            mlauth.TokenSet(
                mlauth.Secret(str(newer["access_token"])),
                mlauth.Secret(str(newer["refresh_token"])),
                expires_at=time.time() + 3600,
            ),
            replaces=version,
        )
    thread.join(30)

    response = result["response"]
    assert isinstance(response, requests.Response)
    assert response.status_code == 200
    assert fake_ml.stats()["refreshes"] == 1  # the holder's POST did succeed...
    # ...but its commit was refused: the peer's tokens stay, and the holder uses them.
    assert stored(redis_server, env)["refresh_token"] == newer["refresh_token"]
    assert holder.tokens.refresh_token == mlauth.Secret(str(newer["refresh_token"]))
    assert response.request.headers["Authorization"] == f"Bearer {newer['access_token']}"


def test_a_holder_commits_after_its_lock_lapsed_and_the_loser_adopts_on_invalid_grant(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(
        fake_ml,
        tmp_path,
        redis_server.url,
        expires_at=time.time() - 10,
        extra={"ML_TOKEN_LOCK_TIMEOUT": "0.5"},
    )
    holder = mlauth.MLAuth.from_env(env, backoff=0.001)
    peer = mlauth.MLAuth.from_env(env, backoff=0.001)  # another machine: its own store
    before = stored(redis_server, env)
    fake_ml.token_delay = 2.0  # every POST is slow: the holder's outlives its 0.5 s lock
    responses: dict[str, requests.Response] = {}

    def call(name: str, auth: mlauth.MLAuth) -> None:
        responses[name] = requests.get(f"{fake_ml.base_url}/users/me", auth=auth)

    first = threading.Thread(target=call, args=("holder", holder))
    first.start()
    assert fake_ml.token_requests_in_flight.wait(10)
    # The peer gets the lock once it lapses, reads the same (unspent) tokens and presents the
    # same refresh token; the holder's earlier POST wins at the server.
    second = threading.Thread(target=call, args=("peer", peer))
    second.start()
    first.join(30)
    second.join(30)

    assert responses["holder"].status_code == 200 and responses["peer"].status_code == 200
    stats = fake_ml.stats()
    assert stats["refreshes"] == 1 and stats["invalid_grant"] == 1
    after = stored(redis_server, env)
    # The holder committed on the generation alone, though the peer held the lock by then...
    assert int(after["generation"]) == int(before["generation"]) + 1
    assert after["refresh_token"] == holder.tokens.refresh_token.reveal()  # type: ignore[union-attr]
    # ...and the peer, refused by the server, re-read Redis and adopted it.
    assert peer.tokens == holder.tokens


def test_a_lock_lost_during_retries_stops_before_the_token_is_spent_again(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(
        fake_ml,
        tmp_path,
        redis_server.url,
        expires_at=time.time() - 10,
        extra={"ML_TOKEN_LOCK_TIMEOUT": "0.3"},
    )
    auth = mlauth.MLAuth.from_env(env, backoff=0.001)
    # The first attempt gets a 503 asking for 1 s: the 0.3 s lock lapses in the wait.
    fake_ml.fail_next_token_requests(1, status=503, retry_after=1.0)

    with pytest.raises(mlauth.LockLostError, match="expired before the refresh token was spent"):
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)

    assert fake_ml.stats()["token_requests"] == 1
    assert fake_ml.stats()["refreshes"] == 0
    # Nothing was spent: the stored refresh token still works.
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1


def test_invalid_grant_marks_the_chain_dead_for_every_process_until_a_new_chain(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url, expires_at=time.time() - 10)
    fake_ml.revoke_refresh_tokens()
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    peer = mlauth.MLAuth.from_env(env)  # another process: no memory of the failure
    with pytest.raises(mlauth.InvalidGrantError, match="not sent"):
        peer.refresh()
    dead = mlauth.reauthorization_required(peer.store)
    values = stored(redis_server, env)

    fresh = fake_ml.issue_tokens()
    peer.store.seed(  # type: ignore[attr-defined]
        TokenSet(Secret(str(fresh["access_token"])), Secret(str(fresh["refresh_token"]))),
        replace=True,  # a login or a migration
    )

    assert fake_ml.stats()["invalid_grant"] == 1  # sent once, by the first process only
    assert dead is not None and "invalid_grant" in dead and "mlauth login" in dead
    # The token named by its fingerprint, never its value.
    assert values["refresh_token"] not in values["dead"]
    assert mlauth.fingerprint(values["refresh_token"]) in values["dead"]
    assert mlauth.reauthorization_required(store_from_env(env)) is None
    assert "dead" not in stored(redis_server, env)


def test_a_failing_refresh_is_recorded_from_its_first_failure_until_a_commit(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url)
    fake_ml.fail_next_token_requests(2, status=503)
    first = time.time()
    for _ in range(2):
        with pytest.raises(mlauth.RefreshError):
            mlauth.MLAuth.from_env(env, max_attempts=1).refresh()
    failing = stored(redis_server, env)
    details = dict(store_from_env(env).status_details())

    mlauth.MLAuth.from_env(env).refresh()

    assert first <= float(failing["failing_since"]) <= first + 10  # the first failure's
    assert "HTTP 503" in failing["failure"]
    assert "HTTP 503" in details["refresh failing"]
    assert mlauth.reauthorization_required(store_from_env(env)) is None  # failing, not dead
    assert not {"failing_since", "failure"} & set(stored(redis_server, env))


def test_redis_that_lost_its_data_is_reseeded_from_memory(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url)
    auth = mlauth.MLAuth.from_env(env)
    store = auth.store
    assert isinstance(store, RedisStore)
    store.check_interval = 0.0
    refresh = auth.tokens.refresh_token
    redis_server.restart()  # no persistence: everything is gone
    assert stored(redis_server, env) == {}

    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200

    assert stored(redis_server, env)["refresh_token"] == refresh.reveal()  # type: ignore[union-attr]
    # And the chain goes on from there: the next refresh commits over the re-seeded copy.
    auth.refresh()
    assert stored(redis_server, env)["refresh_token"] != refresh.reveal()  # type: ignore[union-attr]
    assert fake_ml.stats()["invalid_grant"] == 0


def test_a_stale_reseed_after_data_loss_does_not_roll_the_chain_back(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(fake_ml, tmp_path, redis_server.url, expires_at=time.time() + 3600)
    idle, busy = mlauth.MLAuth.from_env(env), mlauth.MLAuth.from_env(env)  # two machines
    assert isinstance(idle.store, RedisStore) and isinstance(busy.store, RedisStore)
    old = idle.tokens.refresh_token
    busy.refresh()
    busy.refresh()  # the idle machine still knows the refresh token spent two links ago
    live = busy.tokens.refresh_token
    assert live is not None and live != old
    redis_server.restart()  # no persistence: the live token is only in the busy one's memory

    idle.store.load()  # the stale machine reads first and puts back what it knows
    tokens, _ = busy.store.load()  # the busy one must not adopt that older link...
    assert tokens.refresh_token == live
    assert stored(redis_server, env)["refresh_token"] == live.reveal()
    assert idle.store.load()[0].refresh_token == live  # ...and the stale one follows it
    idle.refresh()
    assert fake_ml.stats()["invalid_grant"] == 0


def test_a_machine_knowing_a_replaced_chain_never_reseeds_it_over_the_new_one(
    redis_server: RedisServer,
) -> None:
    def tokens(name: str) -> mlauth.TokenSet:
        return mlauth.TokenSet(
            mlauth.Secret(f"fake-access-{name}"),
            mlauth.Secret(f"fake-refresh-{name}"),
            expires_at=time.time() + 3600,
        )

    stale, fresh = RedisStore(redis_server.url, key="k"), RedisStore(redis_server.url, key="k")
    stale.seed(tokens("old"))
    stale.load()
    version = fresh.seed(tokens("new"), replace=True)  # `migrate --force`: next generation
    fresh.save(tokens("newer"), replaces=version)
    redis_server.restart()

    stale.load()  # puts back the replaced chain, the only one it knows
    assert fresh.load()[0].refresh_token == mlauth.Secret("fake-refresh-newer")
    assert stale.load()[0].refresh_token == mlauth.Secret("fake-refresh-newer")


def test_unreachable_redis_keeps_a_valid_token_and_never_refreshes_without_the_lock(
    fake_ml: FakeMercadoLibre, redis_server: RedisServer, tmp_path: Path
) -> None:
    valid = redis_env(fake_ml, tmp_path / "valid", redis_server.url, expires_at=time.time() + 3600)
    expired = redis_env(
        fake_ml,
        tmp_path / "expired",
        redis_server.url,
        expires_at=time.time() - 10,
        extra={"ML_TOKEN_KEY": "other-seller"},
    )
    fresh, stale = mlauth.MLAuth.from_env(valid), mlauth.MLAuth.from_env(expired)
    for auth in (fresh, stale):
        assert isinstance(auth.store, RedisStore)
        auth.store.check_interval = 0.0
    redis_server.stop()

    assert requests.get(f"{fake_ml.base_url}/users/me", auth=fresh).status_code == 200
    with pytest.raises(mlauth.StoreError, match=f"Redis at {redis_server.url}"):
        requests.get(f"{fake_ml.base_url}/users/me", auth=stale)
    assert fake_ml.stats()["token_requests"] == 0


def test_a_hanging_redis_costs_one_short_try_per_backoff_not_per_check() -> None:
    hole = socket.socket()  # accepts connections (the kernel does) and never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        store = RedisStore(
            f"redis://127.0.0.1:{hole.getsockname()[1]}/0",
            key="k",
            check_interval=0.0,  # would look at every call
            socket_timeout=0.2,
        )
        for _ in range(3):  # three API calls in a row, all while Redis hangs
            assert store.stamp() is None  # nothing changed as far as the caller can tell
        hole.setblocking(False)
        attempts = 0
        while True:  # every connection the store opened waits in the backlog
            try:
                conn, _ = hole.accept()
            except BlockingIOError:
                break
            conn.close()
            attempts += 1
    finally:
        hole.close()
    # One try, no retries, then no look at all until the back-off has passed.
    assert attempts == 1


def test_a_commit_script_resent_after_a_lost_reply_is_not_taken_for_a_peers(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class LostReplies(redis.Redis):
        """Every script runs, its reply is lost on the way back, and redis-py's Retry sends
        the same EVALSHA again."""

        def evalsha(self, *args: Any, **kwargs: Any) -> Any:
            super().evalsha(*args, **kwargs)
            return super().evalsha(*args, **kwargs)

    client = LostReplies.from_url(redis_server.url, decode_responses=True)
    store = RedisStore(redis_server.url, key="k", client=client)
    first = mlauth.TokenSet(mlauth.Secret("fake-access-1"), mlauth.Secret("fake-refresh-1"))
    assert store.seed(first)[1] == 1  # type: ignore[index]
    _, version = store.load()
    second = mlauth.TokenSet(mlauth.Secret("fake-access-2"), mlauth.Secret("fake-refresh-2"))
    assert store.save(second, replaces=version)[1] == 2  # type: ignore[index]
    with redis_server.client() as client:
        assert client.hget("k", "refresh_token") == "fake-refresh-2"
        assert client.hget("k", "generation") == "2"


@pytest.mark.parametrize(("lock_timeout", "warned"), [(10.0, True), (20.0, True), (25.0, False)])
def test_a_lock_timeout_not_above_one_token_call_is_warned_about(
    fake_ml: FakeMercadoLibre,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    lock_timeout: float,
    warned: bool,
) -> None:
    env = redis_env(
        fake_ml,
        tmp_path,
        redis_server.url,
        extra={"ML_TOKEN_LOCK_TIMEOUT": f"{lock_timeout:g}"},
    )
    with caplog.at_level("WARNING", logger="mlauth"):
        mlauth.MLAuth.from_env(env, timeout=(5.0, 15.0))  # one call: up to 20 s
    hits = [r for r in caplog.records if "ML_TOKEN_LOCK_TIMEOUT" in r.getMessage()]
    assert bool(hits) is warned
    if warned:
        assert f"after {lock_timeout:g}s" in hits[0].getMessage()


def test_missing_tokens_in_redis_name_the_key_and_the_migration(
    redis_server: RedisServer,
) -> None:
    with pytest.raises(mlauth.ConfigError, match="holds no tokens under 'mlauth:42:tokens'"):
        mlauth.MLAuth("42", "fake-secret", RedisStore(redis_server.url))


def test_url_passwords_never_reach_messages() -> None:
    assert redact_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    store = RedisStore("redis://user:hunter2@127.0.0.1:1/0", client_id="1")
    assert "hunter2" not in repr(store)
    with pytest.raises(mlauth.StoreError) as caught:
        store.load()
    assert "hunter2" not in str(caught.value) and "127.0.0.1:1" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?password=hunter2",
        "redis://127.0.0.1:1/0?username=hunter2&password=hunter2&socket_timeout=1",
        "unix:///tmp/mlauth-test.sock?db=0&password=hunter2",
    ],
)
def test_query_string_passwords_never_reach_messages(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert "hunter2" not in redact_url(url) and "***" in redact_url(url)
    store = RedisStore(url, client_id="1")
    assert "hunter2" not in repr(store) and "hunter2" not in store.location
    with caplog.at_level("DEBUG", logger="mlauth"):
        with pytest.raises(mlauth.StoreError) as caught:
            store.load()
        store._quiet_until = -float("inf")
        store.stamp()  # logs a warning naming the store
    assert "hunter2" not in str(caught.value)
    assert caplog.records and "hunter2" not in caplog.text


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/0?password=hunter2", "memcached://u:hunter2@h?password=hunter2"]
)
def test_a_wrong_scheme_message_shows_no_password(url: str, env_file: Path) -> None:
    with pytest.raises(mlauth.ConfigError) as caught:
        RedisStore(url)
    assert "hunter2" not in str(caught.value)
    update_env_file(env_file, {STORE_KEY: url})
    with pytest.raises(mlauth.ConfigError) as caught:
        mlauth.MLAuth.from_env(env_file)
    assert "hunter2" not in str(caught.value)


def test_without_the_redis_package_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env_file: Path
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "mlauth.stores.redis")
    with pytest.raises(ImportError, match=r"pip install 'mlauth\[redis\]'"):
        mlauth.RedisStore  # noqa: B018
    update_env_file(env_file, {STORE_KEY: "redis://127.0.0.1:6379/0"})
    with pytest.raises(mlauth.ConfigError, match=r"ML_TOKEN_STORE names Redis.*mlauth\[redis\]"):
        mlauth.MLAuth.from_env(env_file)


def test_an_unknown_store_url_is_a_config_error(env_file: Path) -> None:
    update_env_file(env_file, {STORE_KEY: "memcached://127.0.0.1:11211"})
    with pytest.raises(mlauth.ConfigError, match=r"ML_TOKEN_STORE=.* is not a store"):
        mlauth.MLAuth.from_env(env_file)


def test_wait_unlocked_returns_when_the_holder_lets_go_without_taking_the_lock(
    redis_server: RedisServer,
) -> None:
    holder, waiter = (RedisStore(redis_server.url, key="k") for _ in range(2))
    assert waiter.wait_unlocked(0.0) is True  # free: at once
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.lock(5):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    assert waiter.wait_unlocked(0.1) is False  # still held: gives up
    release.set()
    assert waiter.wait_unlocked(30) is True
    thread.join()
    with waiter.lock(0.0):  # it never took the lock: free for the next taker at once
        pass


def test_the_first_stamp_after_wait_unlocked_is_a_real_look(redis_server: RedisServer) -> None:
    # The engine's waiter adopts what the lock's holder saved only through the stamp (it
    # loads only when the stamp changed): a coarse stamp must look again once the lock is free.
    waiter = RedisStore(redis_server.url, key="k", check_interval=3600.0)
    writer = RedisStore(redis_server.url, key="k")
    first = TokenSet(Secret("APP_USR-fake-1"), Secret("TG-fake-1"))
    with writer.lock(5):
        writer.save(first, replaces=None)
    _, before = waiter.load()
    with writer.lock(5):
        writer.save(TokenSet(Secret("APP_USR-fake-2"), Secret("TG-fake-2")), replaces=before)
    assert waiter.stamp() == before  # coarse: no look for an hour on its own
    assert waiter.wait_unlocked(5.0) is True
    assert waiter.stamp() != before
    assert waiter.load()[0].access_token == Secret("APP_USR-fake-2")
