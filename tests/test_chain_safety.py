"""The token chain survives failures around a refresh: saves that fail, peers, locks, forks."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Hashable
from pathlib import Path

import pytest
import requests

import mlauth
import mlauth.engine
import mlauth.integrations.requests_auth
import mlauth.stores.envfile
from mlauth.stores.envfile import read_env_file, update_env_file
from mlauth.stores.lock import ProcessLock
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import Freshness
from tests.support.hostile_answers import spend_outside
from tests.support.threads import refresh_turn_is_free, run_threads

DEAD_ACCESS = "APP_USR-1234-010101-deadbeef-8035443"


class FlakyStore(mlauth.EnvFileStore):
    """An .env store whose next saves fail with a chosen error (fault injection at the edge)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failures: list[BaseException] = []
        self.broken = False  # every save fails while set (the disk filled after the check)

    def save(self, tokens: mlauth.TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        if self.failures:
            raise self.failures.pop(0)
        if self.broken:
            raise mlauth.StoreError("No space left on device")
        return super().save(tokens, replaces=replaces)


@pytest.fixture
def stale_env(fake_ml: FakeMercadoLibre, fake_ml_env: Path) -> Path:
    update_env_file(fake_ml_env, {"ML_ACCESS_TOKEN": DEAD_ACCESS})
    return fake_ml_env


@pytest.fixture
def no_persist_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlauth.engine, "PERSIST_RETRY_DELAY", 0.0)


def refresh_with_a_failed_save(
    fake: FakeMercadoLibre, env: Path, failure: BaseException
) -> tuple[FlakyStore, mlauth.MLAuth]:
    """An MLAuth whose first refresh (after a 401) could not be saved: its tokens are unsaved."""
    store = FlakyStore(env)
    store.failures.append(failure)
    auth = mlauth.MLAuth.from_env(env, store=store)
    assert requests.get(f"{fake.base_url}/users/me", auth=auth).status_code == 200
    return store, auth


@pytest.mark.parametrize(
    "failure",
    [
        mlauth.StoreError("disk full"),
        mlauth.ConfigError(".env vanished during an editor's save"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ],
    ids=["store-error", "config-error", "unicode-error"],
)
def test_a_failed_save_keeps_the_new_tokens_and_saves_them_later(
    fake_ml: FakeMercadoLibre, stale_env: Path, no_persist_delay: None, failure: BaseException
) -> None:
    store = FlakyStore(stale_env)
    store.failures.append(failure)
    spent = read_env_file(stale_env)["ML_REFRESH_TOKEN"]
    session = requests.Session()
    session.auth = mlauth.MLAuth.from_env(stale_env, store=store)

    first = session.get(f"{fake_ml.base_url}/users/me")
    assert first.status_code == 200  # re-sent with the unsaved new token
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == spent  # not on disk yet

    second = session.get(f"{fake_ml.base_url}/users/me")
    assert second.status_code == 200 and second.history == []
    saved = read_env_file(stale_env)
    assert saved["ML_REFRESH_TOKEN"] != spent  # saved at the next request
    # A new process reading the .env now continues the chain.
    fresh = requests.get(f"{fake_ml.base_url}/x", auth=mlauth.MLAuth.from_env(stale_env))
    assert fresh.status_code == 200
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["invalid_grant"] == 0


def test_unsaved_tokens_never_overwrite_a_chain_that_moved_on(
    fake_ml: FakeMercadoLibre, stale_env: Path, no_persist_delay: None
) -> None:
    _, auth = refresh_with_a_failed_save(fake_ml, stale_env, mlauth.StoreError("fsync failed"))
    unsaved = auth.tokens.refresh_token
    # Meanwhile a peer wrote a newer chain into the .env.
    peer = fake_ml.issue_tokens()
    update_env_file(
        stale_env,
        {
            "ML_ACCESS_TOKEN": str(peer["access_token"]),
            "ML_REFRESH_TOKEN": str(peer["refresh_token"]),
        },
    )
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    assert response.status_code == 200
    assert response.request.headers["Authorization"] == f"Bearer {peer['access_token']}"
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == peer["refresh_token"]
    assert auth.tokens.refresh_token != unsaved


def test_unsaved_tokens_that_die_are_not_resent_and_nothing_is_spent_blind(
    fake_ml: FakeMercadoLibre, stale_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FlakyStore(stale_env)
    store.failures.append(mlauth.StoreError("disk full"))
    auth = mlauth.MLAuth.from_env(stale_env, store=store, min_token_age=0)
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    # The folder stays unwritable.
    store.failures.extend(mlauth.StoreError("disk full") for _ in range(5))

    def unwritable() -> None:
        raise mlauth.StoreError("disk still full")

    monkeypatch.setattr(store, "check_writable", unwritable)
    # Somebody spends the unsaved refresh token: the server kills the unsaved access token.
    unsaved = auth.tokens.refresh_token
    assert unsaved is not None
    rotated = spend_outside(fake_ml, unsaved.reveal())
    assert rotated.status_code == 200
    token_calls = fake_ml.stats()["token_requests"]
    with pytest.raises(mlauth.StoreError, match="disk still full"):
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    assert fake_ml.stats()["token_requests"] == token_calls  # the unsaved token was not spent


def test_folder_fsync_failure_after_the_rename_counts_as_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\nML_REFRESH_TOKEN=TG-old\n")

    def fsync_fails(folder: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mlauth.stores.envfile, "fsync_dir", fsync_fails)
    update_env_file(path, {"ML_REFRESH_TOKEN": "TG-new"})
    assert read_env_file(path)["ML_REFRESH_TOKEN"] == "TG-new"
    assert "could not fsync its folder" in caplog.text


def test_on_refresh_runs_outside_both_locks(fake_ml: FakeMercadoLibre, stale_env: Path) -> None:
    seen: list[tuple[bool, bool]] = []

    def callback(tokens: mlauth.TokenSet) -> None:
        try:
            with ProcessLock(f"{stale_env}.lock").hold(timeout=0):
                file_lock_free = True
        except mlauth.LockTimeoutError:
            file_lock_free = False
        seen.append((file_lock_free, refresh_turn_is_free(auth)))

    # A short lock timeout: a callback run inside the locks fails the probe in seconds.
    auth = mlauth.MLAuth.from_env(stale_env, on_refresh=callback, lock_timeout=2.0)
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert seen == [(True, True)]
    assert fake_ml.stats()["refreshes"] == 1  # the probe spent nothing


def test_refresh_ahead_of_expiry_waits_for_a_peer_only_briefly_and_then_not_again(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    env = tmp_path / ".env"
    tokens = fake_ml.write_env(env, expires_at=time.time() + 100)  # inside the 300 s margin
    auth = mlauth.MLAuth.from_env(env, lock_timeout=600)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with ProcessLock(f"{env}.lock").hold(timeout=5):
            held.set()
            done.wait(60)  # released when the requests are done, or after 60 s at the latest

    holder = threading.Thread(target=hold)
    holder.start()
    caplog.set_level(logging.DEBUG, logger="mlauth")
    try:
        assert held.wait(5)
        first = requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
        assert "gave up waiting for refresh lock" in caplog.text  # at most a second
        caplog.clear()
        second = requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
        assert "to be released" not in caplog.text  # a peer this slow is not waited for again
    finally:
        done.set()
        holder.join()
    # Had it waited for the lock, it would have refreshed once the holder let go.
    for response in (first, second):
        assert response.status_code == 200
        assert response.request.headers["Authorization"] == f"Bearer {tokens['access_token']}"
    assert fake_ml.stats()["token_requests"] == 0


def test_a_store_whose_save_lacks_replaces_is_refused_before_anything_is_spent(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    class OldStore(mlauth.EnvFileStore):
        def save(self, tokens: mlauth.TokenSet) -> Hashable:  # type: ignore[override]
            return super().save(tokens)

    with pytest.raises(mlauth.ConfigError, match="replaces="):
        mlauth.MLAuth.from_env(fake_ml_env, store=OldStore(fake_ml_env))
    assert fake_ml.stats()["token_requests"] == 0


def test_lost_answer_gives_a_clear_invalid_grant_and_keeps_the_env(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    # The one window no client can close: the server rotated the token, its answer was lost.
    before = stale_env.read_bytes()
    fake_ml.fail_next_token_requests(1, status=502, consume=True)
    auth = mlauth.MLAuth.from_env(stale_env, backoff=0.001)
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    message = str(caught.value)
    assert "may have spent it without its answer arriving" in message
    assert "authorize the app again" in message
    assert stale_env.read_bytes() == before


def test_retries_stop_within_the_budget(fake_ml: FakeMercadoLibre) -> None:
    from mlauth.endpoint import TokenEndpoint

    slept: list[float] = []
    endpoint = TokenEndpoint(
        fake_ml.token_url,
        fake_ml.client_id,
        mlauth.Secret(fake_ml.client_secret),
        budget=2.0,
        sleep=slept.append,
    )
    fake_ml.fail_next_token_requests(3, status=429, error="local_rate_limited", retry_after=7)
    with pytest.raises(mlauth.RefreshError, match=r"after 1 attempt \(the server asked to wait 7s"):
        endpoint.refresh(mlauth.Secret(str(fake_ml.issue_tokens()["refresh_token"])))
    assert slept == []  # a 7 s Retry-After does not fit a 2 s budget: no sleep, no retry


def test_a_child_forked_while_a_thread_refreshes_can_refresh_itself(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    # A short lock timeout: a child that inherited the busy in-process lock gives up in
    # seconds (LockTimeoutError) instead of waiting for a thread it does not have.
    auth = mlauth.MLAuth.from_env(fake_ml_env, lock_timeout=3.0)
    before = auth.tokens.access_token
    fake_ml.token_delay = 1.0
    refreshing = threading.Thread(target=auth.refresh)
    refreshing.start()
    assert fake_ml.token_requests_in_flight.wait(10)  # the thread holds both locks now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        try:
            # Waits for the parent's file lock, then adopts what the parent saved.
            ok = auth.refresh(force=False).access_token not in (None, before)
        except BaseException:  # noqa: BLE001 (reported through the pipe)
            ok = False
        os.write(write_end, b"1" if ok else b"0")
        os._exit(0)
    os.close(write_end)
    refreshing.join()
    _, status = os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    assert status == 0
    assert fake_ml.stats()["refreshes"] == 1  # the child adopted the parent's refresh


def test_two_refreshes_while_saves_fail_keep_the_chain(
    fake_ml: FakeMercadoLibre, stale_env: Path, no_persist_delay: None
) -> None:
    import time

    fake_ml.token_lifetime = 0.4
    original = read_env_file(stale_env)["ML_REFRESH_TOKEN"]
    store = FlakyStore(stale_env)
    store.broken = True
    auth = mlauth.MLAuth.from_env(stale_env, store=store)
    session = requests.Session()
    session.auth = auth
    assert session.get(f"{fake_ml.base_url}/users/me").status_code == 200  # refresh 1, unsaved
    deadline = time.monotonic() + 10
    while (
        auth.tokens.freshness(auth.refresh_margin) is Freshness.FRESH
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert session.get(f"{fake_ml.base_url}/users/me").status_code == 200  # refresh 2, unsaved
    assert fake_ml.stats()["refreshes"] == 2
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == original

    store.broken = False  # the disk has room again
    assert session.get(f"{fake_ml.base_url}/users/me").status_code == 200
    live = auth.tokens.refresh_token
    assert live is not None and read_env_file(stale_env)["ML_REFRESH_TOKEN"] == live.reveal()
    fresh = requests.get(f"{fake_ml.base_url}/x", auth=mlauth.MLAuth.from_env(stale_env))
    assert fresh.status_code == 200
    assert fake_ml.stats()["invalid_grant"] == 0


def test_threads_queued_behind_a_failed_refresh_do_not_each_retry(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    fake_ml.fail_next_token_requests(100, status=503)
    auth = mlauth.MLAuth.from_env(stale_env, max_attempts=3, backoff=0.001)
    threads = 8
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def call() -> None:
        start.wait()
        try:
            requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
        except mlauth.RefreshError as exc:
            errors.append(exc)

    run_threads(call, threads)
    assert len(errors) == threads
    assert all("503" in str(e) for e in errors)
    assert fake_ml.stats()["token_requests"] == 3  # one retry series, not one per thread
    assert sum("not retried: this refresh token failed" in str(e) for e in errors) == threads - 1


def test_a_failed_advisory_attempt_does_not_stop_the_refresh_at_expiry(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    import time

    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 100)  # inside the 300 s margin
    auth = mlauth.MLAuth.from_env(env, backoff=0.001)
    fake_ml.fail_next_token_requests(1, status=503)  # a blip during the advisory attempt
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert fake_ml.stats()["token_requests"] == 1 and fake_ml.stats()["refreshes"] == 0
    # The token reaches its expiry: the mandatory refresh runs its own attempts and succeeds.
    update_env_file(env, {"ML_TOKEN_EXPIRES_AT": str(time.time() - 1)})
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1


def test_a_long_retry_after_is_remembered_only_up_to_the_cap(
    fake_ml: FakeMercadoLibre, stale_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mlauth.engine, "MAX_FAILURE_MEMORY", 0.0)
    fake_ml.fail_next_token_requests(1, status=429, error="local_rate_limited", retry_after=3600)
    auth = mlauth.MLAuth.from_env(stale_env)
    with pytest.raises(mlauth.RefreshError, match="asked to wait 3600s") as caught:
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    assert caught.value.retry_after == 3600
    # With the memory capped (here at 0 s), the next request asks the endpoint again.
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert fake_ml.stats()["token_requests"] == 2


def test_retries_get_the_full_read_timeout(fake_ml: FakeMercadoLibre) -> None:
    from requests.adapters import HTTPAdapter

    from mlauth.endpoint import TokenEndpoint

    timeouts: list[object] = []

    class Recording(HTTPAdapter):
        def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
            timeouts.append(kwargs["timeout"])
            return super().send(request, **kwargs)  # type: ignore[arg-type]

    endpoint = TokenEndpoint(
        fake_ml.token_url,
        fake_ml.client_id,
        mlauth.Secret(fake_ml.client_secret),
        timeout=(2.0, 3.0),
        budget=6.0,
        sleep=lambda seconds: None,
    )
    endpoint._session.mount("http://", Recording())
    fake_ml.fail_next_token_requests(1, status=429, error="local_rate_limited", retry_after=0)
    endpoint.refresh(mlauth.Secret(str(fake_ml.issue_tokens()["refresh_token"])))
    # A read cut short after the server rotated the token would lose the chain.
    assert timeouts == [(2.0, 3.0), (2.0, 3.0)]

    # With too little budget left for a whole attempt, the retry is not started at all.
    timeouts.clear()
    endpoint.budget = 4.0
    fake_ml.fail_next_token_requests(1, status=429, error="local_rate_limited", retry_after=0)
    with pytest.raises(mlauth.RefreshError, match="would not end within the 4s retry budget"):
        endpoint.refresh(mlauth.Secret(str(fake_ml.issue_tokens()["refresh_token"])))
    assert timeouts == [(2.0, 3.0)]


def test_unsaved_tokens_are_used_even_if_the_lock_cannot_be_opened(
    fake_ml: FakeMercadoLibre, stale_env: Path, no_persist_delay: None
) -> None:
    _, auth = refresh_with_a_failed_save(fake_ml, stale_env, mlauth.StoreError("disk full"))
    lock = Path(f"{stale_env}.lock")
    lock.unlink()
    lock.mkdir()  # opening the lock now fails (EISDIR), as on a broken mount
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    assert response.status_code == 200 and response.history == []


def kept_exceptions(root: object) -> list[BaseException]:
    """The exceptions reachable from ``root`` through instance attributes and containers."""
    found: list[BaseException] = []
    seen: set[int] = set()
    todo = [root]
    while todo:
        value = todo.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float, type)):
            continue
        seen.add(id(value))
        if isinstance(value, BaseException):
            found.append(value)
        elif isinstance(value, (tuple, list, set, frozenset)):
            todo.extend(value)
        elif isinstance(value, dict):
            todo.extend(value.values())
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("mlauth"):
            todo.extend(vars(value).values())
    return found


def test_a_remembered_failure_keeps_no_traceback_with_the_secret(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    import traceback

    fake_ml.revoke_refresh_tokens()
    auth = mlauth.MLAuth.from_env(stale_env)
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    del caught
    # What the auth keeps of the failure, wherever it keeps it, must not lead back to the
    # token POST's frame.
    errors = kept_exceptions(auth)
    assert errors, "the failure is remembered"
    for error in errors:
        assert error.__traceback__ is None and error.__context__ is None
        assert fake_ml.client_secret not in "".join(traceback.format_exception(error))
    with pytest.raises(mlauth.InvalidGrantError, match="not retried"):
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
