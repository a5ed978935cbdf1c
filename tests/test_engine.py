"""The refresh engine's decisions, on a MemoryStore with a fake clock and a fake token client:
no network, no files, no sleeps. What processes and real stores do is tested elsewhere
(test_processes.py, test_chain_safety.py); here each decision is driven on its own, the way
botocore tests ``RefreshableCredentials`` with ``refresh_using`` and ``time_fetcher``."""

from __future__ import annotations

import contextlib
import doctest
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import mlauth.engine
import mlauth.testing.memory
from mlauth.decide import Decision, Need, decide
from mlauth.errors import (
    InvalidGrantError,
    LockLostError,
    LockTimeoutError,
    RefreshError,
    StaleCommitError,
    StoreError,
)
from mlauth.secret import Secret
from mlauth.testing import MemoryStore
from mlauth.tokens import TokenAnswer, TokenSet
from tests.support.engine_support import (
    LIFETIME,
    MARGIN,
    MIN_AGE,
    FakeClock,
    FakeTokenClient,
    access,
    answer,
    engine_on,
    link,
    refresh,
)

WAIT = 10.0  # the longest a test waits for a thread it started (never reached when green)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _no_sleep_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """What these tests promise: time moves only with the fake clock, nothing goes out."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an engine test slept or opened a connection")

    monkeypatch.setattr(time, "sleep", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# -- the decision, by table ---------------------------------------------------------------


def _tokens(clock: FakeClock, *, age: float, lifetime: float = LIFETIME, n: int = 1) -> TokenSet:
    return link(n, clock, age=age, lifetime=lifetime)


@pytest.mark.parametrize(
    ("age", "lifetime", "need", "expected"),
    [
        # FRESH tokens meet any need but their own 401 and a forced refresh.
        (3600.0, LIFETIME, Need.expired(), Decision.ADOPT),
        (3600.0, LIFETIME, Need.ahead(), Decision.ADOPT),
        (3600.0, LIFETIME, Need.after_401(access(2)), Decision.ADOPT),
        (3600.0, LIFETIME, Need.requested(access(2)), Decision.ADOPT),
        (3600.0, LIFETIME, Need.forced_refresh(), Decision.SPEND),
        # The token that failed: an old one is spent, a young one's 401 is genuine.
        (3600.0, LIFETIME, Need.after_401(access(1)), Decision.SPEND),
        (MIN_AGE - 1, LIFETIME, Need.after_401(access(1)), Decision.RETURN_401),
        (MIN_AGE + 1, LIFETIME, Need.after_401(access(1)), Decision.SPEND),
        (MIN_AGE - 1, LIFETIME, Need.requested(access(1)), Decision.RETURN_401),
        # A forced refresh never calls a 401 genuine: it has none.
        (MIN_AGE - 1, LIFETIME, Need.forced_refresh(), Decision.SPEND),
        # STALE (within the margin) and INVALID (expired) tokens are spent.
        (LIFETIME - MARGIN + 1, LIFETIME, Need.after_401(access(2)), Decision.SPEND),
        (LIFETIME + 1, LIFETIME, Need.expired(), Decision.SPEND),
        (LIFETIME - MARGIN + 1, LIFETIME, Need.ahead(), Decision.SPEND),
        # min_token_age is capped at a quarter of a short lifetime: 2 s tokens, 1 s old.
        (0.4, 2.0, Need.after_401(access(1)), Decision.RETURN_401),
        (0.6, 2.0, Need.after_401(access(1)), Decision.SPEND),
        # A clock that went back (age < 0) is no reason to call a 401 genuine.
        (-5.0, LIFETIME, Need.after_401(access(1)), Decision.SPEND),
    ],
)
def test_the_decision_by_table(
    clock: FakeClock, age: float, lifetime: float, need: Need, expected: Decision
) -> None:
    tokens = _tokens(clock, age=age, lifetime=lifetime)
    got = decide(tokens, need, clock.now, refresh_margin=MARGIN, min_token_age=MIN_AGE)
    assert got is expected


def test_the_decision_on_tokens_without_an_access_token_or_times(clock: FakeClock) -> None:
    rules = {"refresh_margin": MARGIN, "min_token_age": MIN_AGE}
    no_access = TokenSet(None, refresh(1))
    assert decide(no_access, Need.after_401(access(1)), clock.now, **rules) is Decision.SPEND
    # A hand-written .env: no expiry, no refresh time. FRESH until its 401, never young.
    bare = TokenSet(access(1), refresh(1))
    assert decide(bare, Need.expired(), clock.now, **rules) is Decision.ADOPT
    assert decide(bare, Need.after_401(access(1)), clock.now, **rules) is Decision.SPEND


def test_a_forced_refresh_is_met_only_by_tokens_after_another_refresh_token(
    clock: FakeClock,
) -> None:
    rules = {"refresh_margin": MARGIN, "min_token_age": MIN_AGE}
    found = Need.forced_refresh().found(_tokens(clock, age=3600.0, n=1))
    assert found.forced and found.spends == refresh(1)
    # What it found is spent; what a lock-free writer rotated to is as good as its own.
    assert decide(_tokens(clock, age=3600.0, n=1), found, clock.now, **rules) is Decision.SPEND
    rotated = _tokens(clock, age=0.0, n=2)
    assert decide(rotated, found, clock.now, **rules) is Decision.ADOPT
    # Found once: the need is not re-decided by a second look.
    assert found.found(rotated) is found


# -- FRESH, STALE, INVALID -----------------------------------------------------------------


def test_a_fresh_token_is_sent_without_a_refresh_or_a_read(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock)
    engine = engine_on(store, client)
    loads = store.loads
    for _ in range(5):
        assert engine.token_for_request() == access(1)
        clock.advance(60)
    assert (client.calls, store.loads) == ([], loads)


def test_a_stale_token_is_refreshed_ahead_once_and_saved(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(2))
    engine = engine_on(store, client)
    clock.advance(LIFETIME - 3600 - MARGIN + 1)  # within the margin now
    assert engine.token_for_request() == access(2)
    assert client.sent == [refresh(1)]
    assert client.calls[0].attempts == 1  # ahead of expiry: one try, never a series
    assert store.tokens is not None and store.tokens.refresh_token == refresh(2)
    # Its expiry counts from just before the POST, on the injected clock.
    assert store.tokens.expires_at == clock.now + LIFETIME


def test_an_expired_token_is_refreshed_with_retries_before_it_is_sent(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(2))
    seen: list[TokenSet] = []
    engine = engine_on(store, client, on_refresh=seen.append)
    clock.advance(LIFETIME)
    assert engine.token_for_request() == access(2)
    assert [(c.refresh_token, c.attempts) for c in client.calls] == [(refresh(1), None)]
    assert [t.access_token for t in seen] == [access(2)]


def test_a_failed_refresh_ahead_keeps_the_token_and_backs_off(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, RefreshError("503 from the fake", status_code=503), answer(2))
    engine = engine_on(store, client)
    clock.advance(LIFETIME - 3600 - MARGIN + 1)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert engine.token_for_request() == access(1)
    assert "refresh ahead of expiry failed" in caplog.text
    # Inside the backoff window (30 s, or a quarter of the time left) nothing is tried.
    clock.advance(29)
    assert engine.token_for_request() == access(1)
    assert len(client.calls) == 1
    clock.advance(2)
    assert engine.token_for_request() == access(2)
    assert client.sent == [refresh(1), refresh(1)]


def test_a_stale_token_is_sent_while_a_peer_holds_the_lock(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(2))
    engine = engine_on(store, client)
    clock.advance(LIFETIME - 3600 - 0.02)  # 20 ms left: the wait for the peer is 10 ms
    with held_by_another_thread(store):
        assert engine.token_for_request() == access(1)
        assert engine.token_for_request() == access(1)  # and again: nothing is spent meanwhile
    assert client.calls == []
    assert engine.token_for_request() == access(2)  # the lock is free: refreshed ahead


def test_a_failure_is_remembered_as_long_as_retry_after_asked(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    limited = RefreshError("429 from the fake", status_code=429, error="local_rate_limited")
    limited.retry_after = 20.0
    client = FakeTokenClient(clock, limited, answer(2))
    engine = engine_on(store, client)
    with pytest.raises(RefreshError, match="429 from the fake"):
        engine.after_401(access(1))
    clock.advance(19)
    with pytest.raises(RefreshError, match="not retried"):
        engine.after_401(access(1))
    clock.advance(1)
    assert engine.after_401(access(1)) == access(2)


# -- adopting a peer's token ------------------------------------------------------------------


def test_a_peers_token_is_adopted_when_the_stamp_changes(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock)
    engine = engine_on(store, client)
    loads = store.loads
    store.put(link(2, clock, age=1.0))
    assert engine.token_for_request() == access(2)
    assert (client.calls, store.loads) == ([], loads + 1)


def test_a_401_waits_for_the_lock_holder_and_adopts_with_one_load(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock)
    engine = engine_on(store, client)
    got: list[Secret | None] = []
    with store.lock(0.0):
        waiter = threading.Thread(target=lambda: got.append(engine.after_401(access(1))))
        waiter.start()
        assert store.wait_for_waiters(1, WAIT)
        loads = store.loads
        store.save(link(2, clock, age=0.0), replaces=store.stamp())
    waiter.join(WAIT)
    assert got == [access(2)]
    assert client.calls == []
    assert store.loads == loads + 1  # through the stamp: one load, none unconditional


# -- 401s -------------------------------------------------------------------------------------


def test_a_401_on_an_old_token_spends_the_refresh_token(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(2))
    engine = engine_on(store, client)
    assert engine.after_401(access(1)) == access(2)
    assert client.sent == [refresh(1)]
    assert store.saves[-1].access_token == access(2)


def test_a_401_on_a_young_token_is_genuine_and_spends_nothing(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock, age=2.0))
    client = FakeTokenClient(clock)
    engine = engine_on(store, client)
    assert engine.after_401(access(1)) is None
    clock.advance(MIN_AGE)  # old enough now: the same 401 means expiry
    client.script.append(answer(2))
    assert engine.after_401(access(1)) == access(2)


def test_a_401_on_a_token_already_replaced_resends_the_current_one(clock: FakeClock) -> None:
    store = MemoryStore(link(2, clock))
    client = FakeTokenClient(clock)
    engine = engine_on(store, client)
    assert engine.after_401(access(1)) == access(2)
    assert engine.resend_at_hand(access(1)) == access(2)
    assert engine.resend_at_hand(access(2)) is None  # the failed one is never re-sent
    assert engine.resend_at_hand(access(2), offered=access(3)) == access(3)
    assert client.calls == []


# -- refresh() -----------------------------------------------------------------------------


def test_a_forced_refresh_spends_a_fresh_token(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock, age=1.0))
    client = FakeTokenClient(clock, answer(2))
    engine = engine_on(store, client)
    assert engine.refresh(force=True).access_token == access(2)
    assert client.sent == [refresh(1)]


def test_a_requested_refresh_of_a_young_token_spends_nothing(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock, age=1.0))
    client = FakeTokenClient(clock)
    engine = engine_on(store, client)
    assert engine.refresh(force=False).access_token == access(1)
    assert client.calls == []


def test_a_requested_refresh_adopts_a_peers_token_and_spends_an_old_one(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(3))
    engine = engine_on(store, client)
    engine.token_for_request()
    # held: link 1; a peer's link 2 is in the store, and is what "requested" settles for.
    store.put(link(2, clock, age=1.0))
    assert engine.refresh(force=False).access_token == access(2)
    assert client.calls == []
    clock.advance(3600)
    assert engine.refresh(force=False).access_token == access(3)
    assert client.sent == [refresh(2)]


# -- failures are remembered ------------------------------------------------------------------


def test_a_failed_refresh_is_not_retried_within_its_cooldown(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    failure = RefreshError("503 from the fake", status_code=503)
    client = FakeTokenClient(clock, failure, answer(2))
    engine = engine_on(store, client)
    with pytest.raises(RefreshError, match="503 from the fake"):
        engine.after_401(access(1))
    clock.advance(1)
    with pytest.raises(RefreshError, match=r"not retried: this refresh token failed 1\.0s ago"):
        engine.after_401(access(1))
    assert len(client.calls) == 1
    clock.advance(mlauth.engine.FAILURE_COOLDOWN)
    assert engine.after_401(access(1)) == access(2)


def test_invalid_grant_is_remembered_for_good(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    dead = InvalidGrantError("invalid_grant from the fake", status_code=400, error="invalid_grant")
    client = FakeTokenClient(clock, dead)
    engine = engine_on(store, client)
    with pytest.raises(InvalidGrantError):
        engine.after_401(access(1))
    clock.advance(3600)
    with pytest.raises(InvalidGrantError, match="not retried"):
        engine.after_401(access(1))
    assert client.sent == [refresh(1)]


def test_threads_queued_behind_a_failed_refresh_get_its_error(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    engine_box: list[mlauth.engine.RefreshEngine] = []
    queued: list[BaseException] = []

    def queue_up() -> None:
        try:
            engine_box[0].after_401(access(1))
        except RefreshError as exc:
            queued.append(exc)

    waiter = threading.Thread(target=queue_up)

    def fail_with_a_waiter() -> RefreshError:
        waiter.start()
        assert store.wait_for_waiters(1, WAIT)  # queued behind this refresh's lock
        return RefreshError("503 from the fake", status_code=503)

    client = FakeTokenClient(clock, fail_with_a_waiter)
    engine_box.append(engine_on(store, client))
    with pytest.raises(RefreshError, match="503 from the fake"):
        engine_box[0].after_401(access(1))
    waiter.join(WAIT)
    assert len(queued) == 1 and "not retried" in str(queued[0])
    assert queued[0].__traceback__ is not None and queued[0].__context__ is None
    assert len(client.calls) == 1


# -- tokens whose save failed ---------------------------------------------------------------


def test_unsaved_tokens_are_used_from_memory_and_saved_later(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(2))
    engine = engine_on(store, client)
    store.fail_saves(1)
    with caplog.at_level(logging.ERROR, logger="mlauth"):
        assert engine.after_401(access(1)) == access(2)
    assert "could not be saved" in caplog.text
    assert store.tokens is not None and store.tokens.refresh_token == refresh(1)
    assert engine.tokens.access_token == access(2)
    saves = len(store.saves)
    assert engine.token_for_request() == access(2)
    assert len(store.saves) == saves  # not retried before PERSIST_RETRY_DELAY
    clock.advance(mlauth.engine.PERSIST_RETRY_DELAY)
    assert engine.token_for_request() == access(2)
    assert store.tokens.refresh_token == refresh(2)  # compare and set over refresh(1)
    assert client.sent == [refresh(1)]


def test_unsaved_tokens_never_overwrite_a_peer_that_moved_on(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(2))
    engine = engine_on(store, client)
    store.fail_saves(1)
    assert engine.after_401(access(1)) == access(2)
    store.put(link(7, clock, age=1.0))  # the chain moved on elsewhere
    saves = len(store.saves)
    clock.advance(mlauth.engine.PERSIST_RETRY_DELAY)
    assert engine.token_for_request() == access(7)
    assert len(store.saves) == saves
    assert store.tokens is not None and store.tokens.refresh_token == refresh(7)


def test_unsaved_tokens_are_the_base_of_the_next_refresh(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, answer(2), answer(3))
    engine = engine_on(store, client)
    store.fail_saves(2)  # the refresh's save, and the retry under the next lock
    assert engine.after_401(access(1)) == access(2)
    clock.advance(3600)
    assert engine.after_401(access(2)) == access(3)
    # The unsaved link 2 was spent (never the dead refresh(1)) and link 3 saved over link 1.
    assert client.sent == [refresh(1), refresh(2)]
    assert store.tokens is not None and store.tokens.refresh_token == refresh(3)


# -- fences and lock-free writers --------------------------------------------------------------


def test_a_commit_after_the_lock_lapsed_yields_to_the_peer(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))

    def a_peer_commits_meanwhile() -> TokenAnswer:
        store.lapse_lock()
        with store.lock(0.0):
            store.save(link(5, clock, age=0.0), replaces=store.stamp())
        return answer(2)

    client = FakeTokenClient(clock, a_peer_commits_meanwhile)
    engine = engine_on(store, client)
    assert engine.after_401(access(1)) == access(5)
    assert store.tokens is not None and store.tokens.refresh_token == refresh(5)
    assert engine.tokens.access_token == access(5)


def test_a_lock_free_writer_rotating_the_token_is_adopted_after_invalid_grant(
    clock: FakeClock,
) -> None:
    store = MemoryStore(link(1, clock))

    def a_legacy_script_rotated_it() -> RefreshError:
        store.put(link(4, clock, age=0.0))
        return InvalidGrantError("invalid_grant from the fake", status_code=400)

    client = FakeTokenClient(clock, a_legacy_script_rotated_it)
    engine = engine_on(store, client)
    assert engine.refresh(force=True).access_token == access(4)  # forced, and not spent twice
    assert client.sent == [refresh(1)]


def test_a_lock_free_writers_stale_token_is_spent_in_a_second_round(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))

    def rotated_to_a_stale_link() -> RefreshError:
        store.put(link(4, clock, age=LIFETIME - 60))
        return InvalidGrantError("invalid_grant from the fake", status_code=400)

    client = FakeTokenClient(clock, rotated_to_a_stale_link, answer(5))
    engine = engine_on(store, client)
    assert engine.after_401(access(1)) == access(5)
    assert client.sent == [refresh(1), refresh(4)]


def test_a_writer_rotating_twice_during_one_refresh_stops_it(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))

    def rotated(n: int) -> RefreshError:
        store.put(link(n, clock, age=LIFETIME - 60))
        return InvalidGrantError("invalid_grant from the fake", status_code=400)

    client = FakeTokenClient(clock, lambda: rotated(4), lambda: rotated(5))
    engine = engine_on(store, client)
    with pytest.raises(RefreshError, match="rotated the refresh token twice"):
        engine.after_401(access(1))
    assert client.sent == [refresh(1), refresh(4)]


# -- odd answers and odd stores ---------------------------------------------------------------


def test_an_answer_without_a_refresh_token_keeps_the_spent_one(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore(link(1, clock))
    client = FakeTokenClient(clock, TokenAnswer(access(2), None, LIFETIME))
    engine = engine_on(store, client)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert engine.after_401(access(1)) == access(2)
    assert "no refresh_token" in caplog.text
    assert store.tokens is not None and store.tokens.refresh_token == refresh(1)


def test_an_answer_without_a_usable_access_token_saves_its_refresh_token(
    clock: FakeClock,
) -> None:
    store = MemoryStore(link(1, clock))
    unusable = TokenAnswer(None, refresh(2), LIFETIME, access_problem="holds a line break")
    client = FakeTokenClient(clock, unusable, answer(3))
    engine = engine_on(store, client)
    with pytest.raises(RefreshError, match="no usable access token"):
        engine.after_401(access(1))
    assert store.tokens is not None and store.tokens.refresh_token == refresh(2)
    assert engine.token_for_request() == access(3)  # the next request refreshes with it
    assert client.sent == [refresh(1), refresh(2)]


def test_an_unusable_stored_access_token_is_never_sent(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    bad = TokenSet(Secret("APP_USR-fake\r\nX-Injected: 1"), refresh(1), clock.now + 3600)
    store = MemoryStore()
    store.put(bad)  # as a custom store might hand it over
    client = FakeTokenClient(clock, answer(2))
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        engine = engine_on(store, client)
        assert engine.token_for_request() == access(2)
    assert "it is not sent" in caplog.text
    assert "X-Injected" not in caplog.text


def test_a_refresh_token_that_cannot_be_sent_is_not_sent(clock: FakeClock) -> None:
    store = MemoryStore()
    store.put(TokenSet(None, Secret("TG-fake\nrefresh")))
    client = FakeTokenClient(clock)
    engine = engine_on(store, client)
    with pytest.raises(StoreError, match="the stored refresh token holds a line break"):
        engine.token_for_request()
    assert client.calls == []


# -- MemoryStore keeps the contract ------------------------------------------------------------


def test_memory_store_fences_times_out_and_tells_a_lapsed_holder(clock: FakeClock) -> None:
    store = MemoryStore(link(1, clock))
    _, version = store.load()
    store.put(link(2, clock))
    with pytest.raises(StaleCommitError):
        store.save(link(3, clock), replaces=version)
    with store.lock(0.0):
        assert store.refresh_in_progress()
        other: list[BaseException] = []
        thread = threading.Thread(target=lambda: _try_lock(store, other))
        thread.start()
        thread.join(WAIT)
        assert len(other) == 1 and isinstance(other[0], LockTimeoutError)
        store.lapse_lock()
        with pytest.raises(LockLostError):
            store.check_writable()
    assert not store.refresh_in_progress() and store.wait_unlocked(0.0)


@contextlib.contextmanager
def held_by_another_thread(store: MemoryStore) -> Iterator[None]:
    """The store's lock held by a peer (another thread: the lock is re-entrant for its own
    holder) until the block ends."""
    taken, done = threading.Event(), threading.Event()

    def peer() -> None:
        with store.lock(WAIT):
            taken.set()
            done.wait(WAIT)

    thread = threading.Thread(target=peer)
    thread.start()
    assert taken.wait(WAIT)
    try:
        yield
    finally:
        done.set()
        thread.join(WAIT)


def _try_lock(store: MemoryStore, errors: list[BaseException]) -> None:
    try:
        with store.lock(0.0):
            pass
    except LockTimeoutError as exc:
        errors.append(exc)


def test_memory_store_docstring_example_runs() -> None:
    result = doctest.testmod(mlauth.testing.memory, optionflags=doctest.ELLIPSIS)
    assert (result.failed, result.attempted) == (0, result.attempted)
    assert result.attempted > 0


def test_memory_store_lock_is_reentrant_for_its_holder_as_the_file_lock_is() -> None:
    # Code inside `with store.lock()` that calls the API (a login, a migration) must not wait
    # for itself.
    store = MemoryStore(TokenSet(Secret("APP_USR-not-real"), Secret("TG-not-real-1")))
    with store.lock(1.0):
        assert store.wait_unlocked(0.0)
        with store.lock(0.0):
            assert store.refresh_in_progress()
        assert store.refresh_in_progress()  # the inner hold let go of nothing
    assert not store.refresh_in_progress()
