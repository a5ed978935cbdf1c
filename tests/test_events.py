"""The event stream (mlauth.events): each kind, through requests and httpx (Client and
AsyncClient), in one process and across processes, against the loopback fake; and its
delivery: a slow subscriber delays no request, a raising one breaks nothing, a process that
exits delivers what it queued, a forked child does not deliver its parent's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import mlauth
from mlauth import events
from mlauth.cli.migrate import migrate_to_redis
from mlauth.httpx import HttpxAuth
from mlauth.stores.envfile import read_env_file
from mlauth.stores.redis import RedisStore
from mlauth.testing import FakeMercadoLibre, MemoryStore
from mlauth.testing.redis_server import RedisServer
from mlauth.tokens import this_process
from tests.support import SCRIPTS
from tests.support.dead_access import DEAD_ACCESS, dead_access_env
from tests.support.httpx_calls import request as httpx_request
from tests.support.kernel_locks import DEADLINE, blocked_readers, poll_until
from tests.support.leaks import assert_no_secret

CLIENTS = ("requests", "sync", "async")


@pytest.fixture
def seen() -> Iterator[list[events.Event]]:
    """Every event this process emits during the test, delivered before it is read."""
    got: list[events.Event] = []
    with mlauth.subscribe(got.append):
        yield got


def kinds(seen: list[events.Event]) -> list[str]:
    assert events.flush(DEADLINE)
    return [event.kind for event in seen]


def call(client: str, env: Path, url: str, **kwargs: Any) -> int:
    """One GET through a new auth on ``env`` with ``client``: its status."""
    if client == "requests":
        session = requests.Session()
        session.trust_env = False
        session.auth = mlauth.MLAuth.from_env(env)
        return session.get(url, timeout=30, **kwargs).status_code
    mode = "sync" if client == "sync" else "async"
    return httpx_request(mode, HttpxAuth.from_env(env), "GET", url, **kwargs).status_code


def secrets_of(fake: FakeMercadoLibre, *envs: Path) -> list[str]:
    found = [fake.client_secret, DEAD_ACCESS]
    for env in envs:
        values = read_env_file(env)
        found += [v for k, v in values.items() if v and k.endswith(("_TOKEN", "_SECRET"))]
    return found


# -- one process ------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_a_401_absorbed_by_a_refresh(
    client: str, fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=3600)
    assert call(client, env, f"{fake_ml.base_url}/users/me") == 200
    assert kinds(seen) == ["refreshed", "unauthorized_absorbed"]
    refreshed, absorbed = seen
    assert isinstance(refreshed, events.Refreshed) and refreshed.by == this_process()
    assert refreshed.store == str(env) and refreshed.pid == os.getpid()
    assert 0 <= refreshed.duration_s < DEADLINE and refreshed.reason
    assert isinstance(absorbed, events.UnauthorizedAbsorbed)
    assert (absorbed.method, absorbed.host) == ("GET", "127.0.0.1")
    assert fake_ml.stats()["refreshes"] == 1
    assert_no_secret(repr([e.fields() for e in seen]), secrets_of(fake_ml, env), "events")


@pytest.mark.parametrize("client", CLIENTS)
def test_a_genuine_401_is_returned(
    client: str, fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    # Refreshed two seconds ago: a 401 on it is about something else, and nothing is spent.
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=2)
    assert call(client, env, f"{fake_ml.base_url}/users/me") == 401
    assert kinds(seen) == ["unauthorized_returned"]
    assert seen[0].fields()["reason"] == "genuine"
    assert fake_ml.stats()["token_requests"] == 0


@pytest.mark.parametrize("client", ["requests", "sync"])
def test_a_401_on_a_body_that_cannot_be_sent_again_is_returned(
    client: str, fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=3600)
    body = (chunk for chunk in [b"a generator", b" body"])
    sent = {"content": body} if client == "sync" else {"data": body}
    assert call(client, env, f"{fake_ml.base_url}/users/me", **sent) == 401
    assert kinds(seen) == ["refreshed", "unauthorized_returned"]
    assert seen[1].fields()["reason"] == "not_resendable"


@pytest.mark.parametrize("client", CLIENTS)
def test_a_dead_refresh_token_fails_and_asks_for_reauthorization_once(
    client: str, fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    fake_ml.revoke_refresh_tokens()
    for _ in range(2):
        with pytest.raises(mlauth.InvalidGrantError):
            call(client, env, f"{fake_ml.base_url}/users/me")
    # Each auth is new (a process's second look): the marker stops the second POST, and
    # each engine says once that the seller must authorize again.
    assert kinds(seen) == ["refresh_failed", "reauthorization_required", "reauthorization_required"]
    failed = seen[0]
    assert isinstance(failed, events.RefreshFailed)
    assert (failed.error, failed.retry_at) == ("InvalidGrantError", None)
    assert "mlauth login" in seen[1].fields()["reason"]  # type: ignore[operator]
    assert fake_ml.stats()["invalid_grant"] == 1
    assert_no_secret(repr([e.fields() for e in seen]), secrets_of(fake_ml, env), "events")


def test_one_engine_tells_a_dead_chain_once(
    fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    fake_ml.revoke_refresh_tokens()
    session = requests.Session()
    session.trust_env = False
    session.auth = mlauth.MLAuth.from_env(env)
    for _ in range(3):
        with pytest.raises(mlauth.InvalidGrantError):
            session.get(f"{fake_ml.base_url}/users/me", timeout=30)
    assert kinds(seen) == ["refresh_failed", "reauthorization_required"]


def test_a_failing_endpoint_says_when_it_will_be_tried_again(
    fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    fake_ml.fail_next_token_requests(10, status=503, retry_after=7)
    auth = mlauth.MLAuth.from_env(env, max_attempts=1)
    before = time.time()
    with pytest.raises(mlauth.RefreshError):
        auth.refresh()
    assert kinds(seen) == ["refresh_failed"]
    failed = seen[0]
    assert isinstance(failed, events.RefreshFailed) and failed.retry_at is not None
    assert before + 7 <= failed.retry_at <= time.time() + 7
    assert fake_ml.is_live(read_env_file(env)["ML_REFRESH_TOKEN"])  # nothing was lost


class FlakyStore(MemoryStore):
    """A store in memory whose reads fail while ``down`` is set."""

    down = False

    def stamp(self) -> Any:
        if self.down:
            raise mlauth.StoreError("the store is down (a test's switch)")
        return super().stamp()


def test_a_store_that_goes_down_and_comes_back(
    fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env)
    tokens = mlauth.EnvFileStore(env).load()[0]
    store = FlakyStore(tokens, location=f"memory {tmp_path}")  # its own: "down" is per store
    auth = mlauth.MLAuth.from_env(env, store=store)
    store.down = True
    for _ in range(2):  # told once, however many requests meet it
        with pytest.raises(mlauth.StoreError):
            auth.valid_tokens()
    store.down = False
    auth.valid_tokens()  # a read is not enough to say a store is back: a save is
    auth.refresh()
    assert kinds(seen) == ["store_unavailable", "store_back", "refreshed"]
    down, back, _ = seen
    assert down.fields()["error"] == "StoreError" and "a test's switch" in str(down.fields())
    assert isinstance(back, events.StoreBack) and back.down_s >= 0


@pytest.mark.parametrize("client", CLIENTS)
def test_an_auth_that_waits_for_another_auths_refresh_adopts_it(
    client: str, fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    # Two auths in one process (a requests session and an httpx client on one .env): each is
    # the other's peer, as two processes would be.
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    here = mlauth.MLAuth.from_env(env)
    answered: list[int] = []
    with here._engine.store.lock(DEADLINE):
        other = threading.Thread(
            target=lambda: answered.append(call(client, env, f"{fake_ml.base_url}/users/me"))
        )
        other.start()
        lock = Path(f"{env}.lock")
        poll_until("the other auth waits for the lock", lambda: blocked_readers(lock) > 0)
        here.refresh()  # under the lock held above
    other.join(DEADLINE)
    assert answered == [200]
    assert kinds(seen) == ["refreshed", "lock_waited", "adopted"]
    assert seen[2].fields()["by"] == this_process()
    assert fake_ml.stats()["refreshes"] == 1


# -- across processes ---------------------------------------------------------------------


def worker(client: str, env: Path, url: str, count: int = 1) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "event_worker.py"), client, str(env), url, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    found: dict[str, Any] = json.loads(out)
    return found


@pytest.mark.parametrize("client", CLIENTS)
def test_a_process_that_waits_for_a_peers_refresh_adopts_its_token(
    client: str, fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    here = mlauth.MLAuth.from_env(env)
    store = here._engine.store
    with store.lock(DEADLINE):  # this process is the peer refreshing
        peer = worker(client, env, f"{fake_ml.base_url}/users/me")
        poll_until(
            "the worker waits for the lock", lambda: blocked_readers(Path(f"{env}.lock")) > 0
        )
        here.refresh()  # under the lock held above
    found = report(peer)
    assert found["statuses"] == [200]
    got = [event["kind"] for event in found["events"]]
    assert got == ["lock_waited", "adopted"], got
    waited, adopted = found["events"]
    assert waited["waited_ms"] >= 1 and waited["pid"] == peer.pid
    assert adopted["by"] == this_process()  # this process refreshed it
    assert kinds(seen) == ["refreshed"]
    assert fake_ml.stats()["refreshes"] == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_two_processes_meeting_one_dead_token_each_say_so(
    client: str, fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    fake_ml.revoke_refresh_tokens()
    url = f"{fake_ml.base_url}/users/me"
    found = [report(proc) for proc in [worker(client, env, url, 2) for _ in range(2)]]
    assert [f["statuses"] for f in found] == [["InvalidGrantError"] * 2] * 2
    # Whether one waits for the other's lock depends on timing: that event is not the point.
    said = [[e["kind"] for e in f["events"] if e["kind"] != "lock_waited"] for f in found]
    # One POST for both (the marker stops the other), and each process says once that the
    # seller must authorize again.
    assert sorted(said) == [
        ["reauthorization_required"],
        ["refresh_failed", "reauthorization_required"],
    ], said
    assert fake_ml.stats()["invalid_grant"] == 1


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    ("refreshed_ago", "expected"),
    [(3600, ["refreshed", "unauthorized_absorbed"]), (2, ["unauthorized_returned"])],
    ids=["absorbed", "genuine"],
)
def test_a_worker_process_reports_its_401s(
    client: str,
    refreshed_ago: float,
    expected: list[str],
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    seen: list[events.Event],
) -> None:
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=refreshed_ago)
    found = report(worker(client, env, f"{fake_ml.base_url}/users/me"))
    assert found["statuses"] == [200 if expected[0] == "refreshed" else 401]
    assert [e["kind"] for e in found["events"]] == expected
    assert {e["pid"] for e in found["events"]} != {os.getpid()}
    assert kinds(seen) == []  # each process reports its own events only


@pytest.mark.parametrize("client", CLIENTS)
def test_a_worker_process_reports_its_redis_going_down_and_back(
    client: str, fake_ml: FakeMercadoLibre, persistent_redis: RedisServer, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env)
    migrate_to_redis(env, persistent_redis.url)
    url = f"{fake_ml.base_url}/users/me"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "event_worker.py"), client, str(env), url, "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "EVENT_WORKER_STEPS": "1", "EVENT_WORKER_REDIS": persistent_redis.url},
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    for change in (persistent_redis.stop, persistent_redis.start):
        assert proc.stdout.readline().strip() == "step"  # a request answered; the next waits
        change()
        proc.stdin.write("go\n")
        proc.stdin.flush()
    found = report(proc)
    assert found["statuses"] == [200, 200, 200]  # the cached token while Redis was down
    assert [e["kind"] for e in found["events"]] == ["store_unavailable", "store_back"]
    assert {e["pid"] for e in found["events"]} == {proc.pid}


# -- delivery -----------------------------------------------------------------------------


def test_a_slow_subscriber_delays_no_request(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=3600)
    entered, release = threading.Event(), threading.Event()

    def stuck(event: events.Event) -> None:
        entered.set()
        release.wait(DEADLINE)

    with mlauth.subscribe(stuck):
        try:
            # The subscriber is stuck on the first event while the request goes on to its end.
            assert call("requests", env, f"{fake_ml.base_url}/users/me") == 200
            assert entered.wait(DEADLINE)
            assert not release.is_set()
        finally:
            release.set()
        assert events.flush(DEADLINE)


def test_a_raising_subscriber_breaks_nothing_and_is_logged_once(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    seen: list[events.Event],
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=3600)

    def broken(event: events.Event) -> None:
        raise RuntimeError("a subscriber's bug")

    with mlauth.subscribe(broken):
        assert call("requests", env, f"{fake_ml.base_url}/users/me") == 200
        assert kinds(seen) == ["refreshed", "unauthorized_absorbed"]  # the others got all
    failures = [r for r in caplog.records if "event subscriber" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_an_event_that_cannot_be_queued_costs_the_event_not_the_refresh(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    seen: list[events.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As at interpreter shutdown on Python 3.12+, where no thread can start.
    def refuse(event: events.Event) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(events._bus, "put", refuse)
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    before = events.dropped()
    tokens = mlauth.MLAuth.from_env(env).refresh()
    assert fake_ml.is_live(tokens.refresh_token.reveal() if tokens.refresh_token else None)
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == tokens.refresh_token.reveal()  # type: ignore[union-attr]
    assert events.dropped() == before + 1


def test_kinds_filter_and_unknown_kinds(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=3600)
    got: list[events.Event] = []
    with mlauth.subscribe(got.append, kinds=["refreshed"]):
        assert call("requests", env, f"{fake_ml.base_url}/users/me") == 200
        assert events.flush(DEADLINE)
    assert [e.kind for e in got] == ["refreshed"]
    with pytest.raises(ValueError, match="unknown event kinds"):
        mlauth.subscribe(got.append, kinds=["refresh"])


EXITING = """
import json, sys, mlauth
out = open(sys.argv[2], "a")
mlauth.subscribe(lambda e: (out.write(json.dumps(e.fields()) + "\\n"), out.flush()))
mlauth.MLAuth.from_env(sys.argv[1]).refresh()
"""  # and exits at once: the queue is drained at exit


def test_a_process_that_exits_right_after_a_refresh_delivers_it(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env, out = tmp_path / ".env", tmp_path / "events.jsonl"
    fake_ml.write_env(env)
    done = subprocess.run(
        [sys.executable, "-c", EXITING, str(env), str(out)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["kind"] for line in out.read_text().splitlines()] == ["refreshed"]


def test_a_forked_child_does_not_deliver_its_parents_events(tmp_path: Path) -> None:
    out = tmp_path / "child.txt"
    release = threading.Event()
    got: list[str] = []

    def slow(event: events.Event) -> None:
        release.wait(DEADLINE)
        got.append(f"{os.getpid()}:{event.kind}")

    with mlauth.subscribe(slow):
        events.emit(events.StoreBack(store="memory", down_s=0.0))  # queued, held by `slow`
        events.emit(events.StoreBack(store="memory", down_s=1.0))
        pid = os.fork()
        if pid == 0:  # the child: its queue starts empty, and it exits without delivering
            code = 1
            try:
                release.set()
                out.write_text(f"{events.flush(5)} {got}")
                code = 0
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        release.set()
        assert events.flush(DEADLINE)
    assert out.read_text() == "True []"
    assert got == [f"{os.getpid()}:store_back"] * 2


def test_events_are_logged_with_their_fields(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = tmp_path / ".env"
    dead_access_env(fake_ml, env, refreshed_ago=3600)
    with caplog.at_level("INFO", logger="mlauth.events"):
        assert call("requests", env, f"{fake_ml.base_url}/users/me") == 200
    records = [r for r in caplog.records if r.name == "mlauth.events"]
    fields = [r.mlauth_event for r in records]  # type: ignore[attr-defined]
    assert [f["kind"] for f in fields] == ["refreshed", "unauthorized_absorbed"]
    assert all(json.loads(json.dumps(f)) == f for f in fields)  # JSON as they are
    assert_no_secret(" ".join(r.getMessage() for r in records), secrets_of(fake_ml, env), "log")


def test_no_event_without_a_refresh_or_a_401(
    fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env)
    for client in CLIENTS:
        assert call(client, env, f"{fake_ml.base_url}/users/me") == 200
    assert kinds(seen) == []


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_redis_that_goes_down_and_comes_back(
    client: str,
    fake_ml: FakeMercadoLibre,
    persistent_redis: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    seen: list[events.Event],
) -> None:
    # The Redis store watches itself: a look that fails while a cached token is still good
    # says the store is down (the request goes on with that token); the next look that
    # works says it is back.
    monkeypatch.setattr("mlauth.stores.redis.PROBE_BACKOFF", 0.0)  # look again at once
    env = tmp_path / ".env"
    fake_ml.write_env(env)
    migrate_to_redis(env, persistent_redis.url)
    store = RedisStore(persistent_redis.url, check_interval=0.0)
    auth = HttpxAuth.from_env(env, store=store)
    url = f"{fake_ml.base_url}/users/me"
    mode = "sync" if client == "sync" else "async"
    assert httpx_request(mode, auth, "GET", url).status_code == 200
    persistent_redis.stop()
    assert httpx_request(mode, auth, "GET", url).status_code == 200  # the cached token
    assert httpx_request(mode, auth, "GET", url).status_code == 200  # said once
    persistent_redis.start()
    assert httpx_request(mode, auth, "GET", url).status_code == 200
    assert kinds(seen) == ["store_unavailable", "store_back"]
    down = seen[0].fields()
    assert down["store"] == store.location and "redis-server" in str(down["reason"])
