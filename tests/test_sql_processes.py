"""The SQL store of many sellers across real processes: many processes and threads on one
seller refresh once; one seller's refresh in flight holds up no other seller; and a
refresher killed with SIGKILL at each phase loses nothing (tests/support/scripts/sql_worker.py
freezes it there)."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth.stores.sellers import OK, REAUTHORIZE
from mlauth.testing import FakeMercadoLibre
from tests.support.fault_kills import kill, wait_until
from tests.support.sql_sellers import (
    Db,
    build_before_fork,
    finished,
    pool_calls,
    seed,
    start_worker,
)

pytestmark = pytest.mark.processes


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


@pytest.fixture
def db(sql_db: Db) -> Db:
    return sql_db


@pytest.fixture
def victims() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test freezes; killed at teardown if a failed test left them running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill(proc)


@pytest.fixture
def expired(db: Db, fake: FakeMercadoLibre) -> dict[int, dict[str, object]]:
    """Sellers 111 and 222, whose tokens the rows say expired: a first request refreshes."""
    sellers = db.open(fake.client_id)
    issued = {user: seed(sellers, fake, user, expires_at=time.time() - 10) for user in (111, 222)}
    sellers.close()
    return issued


def test_processes_and_threads_on_one_seller_refresh_it_once(
    db: Db, fake: FakeMercadoLibre, expired: dict[int, dict[str, object]], tmp_path: Path
) -> None:
    go = tmp_path / "go"
    procs = [
        (start_worker(db, fake, 111, log, threads=4, requests=3, go=go), log)
        for log in (tmp_path / f"worker{n}.log" for n in range(4))
    ]
    go.touch()  # every thread of every process starts now, on an expired token
    results = [finished(proc, log) for proc, log in procs]
    statuses = [status for result in results for status in result["statuses"]]
    assert [error for result in results for error in result["errors"]] == []
    assert statuses == [200] * 4 * 4 * 3
    stats = fake.stats()
    print(f"\n[figures] sql {db.kind}: 4 processes x 4 threads, {stats}")
    assert stats["refreshes"] == 1 and stats["invalid_grant"] == 0
    assert fake.refreshes_by_user() == {111: 1}
    (generation, answer) = db.row("111", "generation", "answer")
    assert generation == 2 and answer is None
    assert db.execute("SELECT COUNT(*) FROM mlauth_leases") == [(0,)]  # every lease released


def test_a_seller_whose_refresh_hangs_in_one_process_holds_up_no_other_seller(
    db: Db,
    fake: FakeMercadoLibre,
    expired: dict[int, dict[str, object]],
    tmp_path: Path,
    victims: list[subprocess.Popen[str]],
) -> None:
    slow_log = tmp_path / "slow.log"
    slow = start_worker(db, fake, 111, slow_log, phase="after-lease")
    victims.append(slow)
    wait_until(slow_log.with_suffix(".paused").exists, "seller 111's lease", slow_log)
    # Seller 222's process waits for no lease of 111's: with one lock for all sellers it
    # would time out (lock_timeout 2 s) while 111's holder hangs.
    log = tmp_path / "other.log"
    result = finished(start_worker(db, fake, 222, log, lock_timeout=2.0), log)
    assert result["statuses"] == [200] and result["errors"] == []
    assert fake.refreshes_by_user() == {222: 1}
    assert slow.poll() is None  # 111's refresher still holds its lease, frozen
    kill(slow)


def _peer(db: Db, fake: FakeMercadoLibre, tmp_path: Path, name: str) -> dict[str, object]:
    log = tmp_path / f"{name}.log"
    return finished(start_worker(db, fake, 111, log), log)


def _chain_lives(db: Db, fake: FakeMercadoLibre, tmp_path: Path, before: str) -> None:
    """A later process gets through, nothing was burned, and the other seller is as it was."""
    later = _peer(db, fake, tmp_path, "later")
    assert later["statuses"] == [200], later
    assert fake.stats()["invalid_grant"] == 0
    (refresh, answer) = db.row("111", "refresh_token", "answer")
    assert refresh != before and fake.is_live(refresh) and answer is None
    sellers = db.open(fake.client_id)
    assert {row.user_id: row.state for row in sellers.rows()} == {"111": OK, "222": OK}
    assert mlauth.reauthorization_required(sellers.store("111")) is None
    sellers.close()
    assert db.row("222", "generation") == (1,)


@pytest.mark.parametrize(
    ("phase", "posts"),
    [
        ("after-lease", 1),  # nothing was sent: the peer sends the same token
        ("after-raw", 1),  # the answer is in the row: the peer commits it, sending nothing
        ("after-commit", 1),  # the row has the new tokens: the peer adopts them
    ],
)
def test_a_refresher_killed_at_a_phase_loses_nothing_and_a_peer_carries_on_at_once(
    phase: str,
    posts: int,
    db: Db,
    fake: FakeMercadoLibre,
    expired: dict[int, dict[str, object]],
    tmp_path: Path,
    victims: list[subprocess.Popen[str]],
) -> None:
    before = str(expired[111]["refresh_token"])
    log = tmp_path / "victim.log"
    victim = start_worker(db, fake, 111, log, phase=phase)
    victims.append(victim)
    wait_until(log.with_suffix(".paused").exists, f"pause at {phase}", log)
    if phase == "after-raw":
        (answer,) = db.row("111", "answer")
        assert json.loads(answer)["grant"] == "refresh_token"  # kept before it was read
    kill(victim)
    # The lease is 600 s and the peer waits 20 s at most for it: it gets through only by
    # taking over the lease of a holder that died on this machine.
    result = _peer(db, fake, tmp_path, "peer")
    assert result["statuses"] == [200], result
    assert fake.stats()["token_requests"] == posts and fake.stats()["refreshes"] == 1
    _chain_lives(db, fake, tmp_path, before)


def test_a_refresher_killed_while_its_post_is_in_flight_leaves_a_token_the_peer_spends(
    db: Db,
    fake: FakeMercadoLibre,
    expired: dict[int, dict[str, object]],
    tmp_path: Path,
    victims: list[subprocess.Popen[str]],
) -> None:
    fake.token_delay = 30.0  # the server reads the POST, then waits before processing it
    log = tmp_path / "victim.log"
    victim = start_worker(db, fake, 111, log)
    victims.append(victim)
    assert fake.token_requests_in_flight.wait(30), log.read_text()
    kill(victim)
    fake.token_delay = 0.0
    result = _peer(db, fake, tmp_path, "peer")
    assert result["statuses"] == [200], result
    assert fake.stats()["refreshes"] == 1
    _chain_lives(db, fake, tmp_path, str(expired[111]["refresh_token"]))


def test_a_refresher_killed_after_the_rotation_marks_that_seller_alone_for_reauthorization(
    db: Db,
    fake: FakeMercadoLibre,
    expired: dict[int, dict[str, object]],
    tmp_path: Path,
    victims: list[subprocess.Popen[str]],
) -> None:
    # The one window no client can close: the server rotated the token, and its successor
    # died with the process before it reached the row.
    fake.token_answer_delay = 30.0
    log = tmp_path / "victim.log"
    victim = start_worker(db, fake, 111, log)
    victims.append(victim)
    wait_until(lambda: fake.stats()["refreshes"] == 1, "the server's rotation", log)
    kill(victim)
    fake.token_answer_delay = 0.0
    peer = _peer(db, fake, tmp_path, "peer")
    assert peer["statuses"] == [] and "InvalidGrantError" in str(peer["errors"])
    assert "mlauth login" in str(peer["errors"])
    later = _peer(db, fake, tmp_path, "later")
    assert "not sent" in str(later["errors"])
    assert fake.stats()["token_requests"] == 2  # the victim's and the peer's, no more
    sellers = db.open(fake.client_id)
    assert {row.user_id: row.state for row in sellers.rows()} == {"111": REAUTHORIZE, "222": OK}
    sellers.close()
    log = tmp_path / "other.log"
    assert finished(start_worker(db, fake, 222, log), log)["statuses"] == [200]


def test_fork_pool_workers_make_their_own_connections_and_share_the_chain(
    db: Db, tmp_path: Path
) -> None:
    lifetime, seconds, workers = 2.0, 5.0, 3
    with FakeMercadoLibre(token_lifetime=lifetime) as fake:
        sellers = db.open(fake.client_id)
        seed(sellers, fake, 111, expires_at=time.time() + lifetime)
        auth = build_before_fork(sellers, fake, 111)
        # Used before the fork: the parent's connection exists when the workers inherit it.
        assert requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30).status_code == 200
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            # Bounded: workers that shared the parent's PostgreSQL socket would hang.
            calls = pool.starmap_async(pool_calls, [(fake.base_url, seconds)] * workers)
            results = calls.get(timeout=60)
        # The parent's own connection still works: no worker used it, or closed it.
        assert requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30).status_code == 200
        stats = fake.stats()
        sellers.close()
    print(f"\n[figures] sql {db.kind}: fork pool of {workers}, {seconds:g}s, {stats}")
    assert len({result["pid"] for result in results}) == workers
    assert [error for result in results for error in result["errors"]] == []
    assert all(set(result["statuses"]) == {200} for result in results)
    assert stats["invalid_grant"] == 0
    assert stats["refreshes"] >= seconds / lifetime - 1  # the chain rotated along the run
