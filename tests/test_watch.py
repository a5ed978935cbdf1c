"""No system call per request: a peer's save shows through the save counter in shared memory,
any other writer's change within the stat interval or at its first 401
(mlauth.stores.watch)."""

from __future__ import annotations

import logging
import os
import select
import sys
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import mlauth
from mlauth.stores import watch as watch_module
from mlauth.stores.envfile import EnvFileStore, read_env_file
from mlauth.stores.watch import COUNTER_SUFFIX, STAT_INTERVAL, StampWatch
from mlauth.testing import FakeMercadoLibre
from tests.support.hostile_answers import spend_outside
from tests.support.mounts import bind_file
from tests.support.planting import NOBODY, in_child_as_nobody, run_as_nobody, shared_folders
from tests.support.save_counter import (
    FakeClock,
    counted_stats,
    frozen,
    make_counter,
    refresh_in_another_process,
    sent_token,
    watch_of,
    write_like_a_legacy_script,
)

# -- the watch alone: a stamp function that counts, a clock moved by hand -------------------


class Stamps:
    """The precise stamp of a file (inode, mtime, size), counting how often it is taken."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.taken = 0

    def __call__(self) -> Hashable:
        self.taken += 1
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


@pytest.fixture
def env(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    path.write_text("ML_ACCESS_TOKEN=one\n")
    return path


def counter(env: Path) -> str:
    return f"{env}{COUNTER_SUFFIX}"


def replace(env: Path, text: str) -> None:
    staging = env.with_name("staging")
    staging.write_text(text)
    os.replace(staging, env)


def watching(env: Path, clock: FakeClock) -> tuple[StampWatch, Stamps]:
    stamps = Stamps(env)
    return StampWatch(stamps, counter(env), clock=clock), stamps


def test_a_counted_save_shows_at_the_next_check_and_nothing_else_stats(env: Path) -> None:
    clock = FakeClock()
    saver, _ = watching(env, clock)
    saver.bump()  # the first save makes the counter
    reader, stamps = watching(env, clock)
    first = reader.precise()
    for _ in range(100):
        assert reader.quick() == first
    assert stamps.taken == 1  # answered from memory
    replace(env, "ML_ACCESS_TOKEN=two\n")
    saver.bump()
    after = reader.quick()  # the clock has not moved: only the counter can tell
    assert after != first and stamps.taken == 2
    assert reader.quick() == after and stamps.taken == 2


def test_a_writer_that_does_not_count_shows_within_the_interval(env: Path) -> None:
    clock = FakeClock()
    watching(env, clock)[0].bump()
    reader, stamps = watching(env, clock)
    first = reader.precise()
    replace(env, "ML_ACCESS_TOKEN=two, by an editor\n")
    clock.now += STAT_INTERVAL * 0.9
    assert reader.quick() == first  # not yet: this is the window the interval allows
    clock.now += STAT_INTERVAL * 0.2
    assert reader.quick() != first
    assert stamps.taken == 2


def test_the_precise_stamp_sees_an_uncounted_change_at_once(env: Path) -> None:
    clock = FakeClock()
    watching(env, clock)[0].bump()
    reader, _ = watching(env, clock)
    first = reader.precise()
    replace(env, "ML_ACCESS_TOKEN=two, by a legacy script\n")
    assert reader.precise() != first  # what the engine asks after a 401 and under the lock


def test_the_first_reader_makes_the_counter_and_a_save_shows_through_it(env: Path) -> None:
    clock = FakeClock()
    reader, stamps = watching(env, clock)
    first = reader.quick()  # finds no counter: makes it, and maps it at the next look
    assert os.path.getsize(counter(env)) == 8
    assert os.stat(counter(env)).st_mode & 0o777 == 0o400  # read-only between saves
    assert reader.quick() == first and stamps.taken == 2  # the count is read before the stat
    for _ in range(5):
        assert reader.quick() == first
    assert stamps.taken == 2  # from memory
    replace(env, "ML_ACCESS_TOKEN=two\n")
    watching(env, clock)[0].bump()
    assert reader.quick() != first and stamps.taken == 3


def test_a_missing_store_gets_no_counter(env: Path) -> None:
    env.unlink()
    reader, stamps = watching(env, FakeClock())
    reader.quick()
    reader.quick()
    assert stamps.taken == 2 and not os.path.exists(counter(env))


def test_without_a_counter_path_every_check_is_a_stat(env: Path) -> None:
    stamps = Stamps(env)
    reader = StampWatch(stamps, None, clock=FakeClock())
    for _ in range(3):
        reader.quick()
    reader.bump()
    assert stamps.taken == 3


def test_a_counter_deleted_and_made_again_is_followed_within_the_interval(env: Path) -> None:
    clock = FakeClock()
    saver, _ = watching(env, clock)
    saver.bump()
    reader, stamps = watching(env, clock)
    first = reader.precise()
    os.unlink(counter(env))
    saver.bump()  # a new file: the reader still maps the old one
    clock.now += STAT_INTERVAL
    assert reader.quick() == first  # looked again, and mapped the new file
    replace(env, "ML_ACCESS_TOKEN=two\n")
    saver.bump()
    taken = stamps.taken
    assert reader.quick() != first and stamps.taken == taken + 1  # through the new counter


# -- planted, odd or damaged counter files: refused or ignored, never a crash ----------------


def plant_symlink(env: Path) -> None:
    target = env.with_name("elsewhere")
    target.write_bytes(b"\0" * 8)
    os.symlink(target, counter(env))


def plant_hard_link(env: Path) -> None:
    Path(counter(env)).write_bytes(b"\0" * 8)
    os.link(counter(env), env.with_name("second-name"))


def plant_fifo(env: Path) -> None:
    os.mkfifo(counter(env))


def plant_directory(env: Path) -> None:
    os.mkdir(counter(env))


def plant_other_users_file(env: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("environment limit: giving a file to another user needs root")
    Path(counter(env)).write_bytes(b"\0" * 8)
    os.chown(counter(env), 65534, 65534)


@pytest.mark.parametrize(
    "plant",
    [plant_symlink, plant_hard_link, plant_fifo, plant_directory, plant_other_users_file],
)
def test_a_planted_counter_is_refused_and_every_check_stats(
    env: Path, plant: object, caplog: pytest.LogCaptureFixture
) -> None:
    assert callable(plant)
    plant(env)
    clock = FakeClock()
    reader, stamps = watching(env, clock)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        first = reader.quick()
        replace(env, "ML_ACCESS_TOKEN=two\n")
        assert reader.quick() != first  # a stat per check: nothing missed
        clock.now += STAT_INTERVAL  # looked at again: refused again, said once
        reader.quick()
        reader.bump()  # refused too, with a warning: never written through
    assert stamps.taken == 3
    refusals = [r for r in caplog.records if "a stat per request instead" in r.getMessage()]
    assert len(refusals) == 1 and counter(env) in refusals[0].getMessage()
    assert "could not bump the save counter" in caplog.text
    elsewhere = env.with_name("elsewhere")
    if elsewhere.exists():
        assert elsewhere.read_bytes() == b"\0" * 8


@pytest.mark.parametrize("size", [0, 3])
def test_a_short_counter_is_not_mapped_until_a_save_rewrites_it(env: Path, size: int) -> None:
    Path(counter(env)).write_bytes(b"\1" * size)
    clock = FakeClock()
    reader, stamps = watching(env, clock)
    reader.quick()
    reader.quick()
    assert stamps.taken == 2  # not mapped: a read past its end would be SIGBUS
    watching(env, clock)[0].bump()
    assert os.path.getsize(counter(env)) == 8
    clock.now += STAT_INTERVAL
    reader.quick()
    taken = stamps.taken
    reader.quick()
    assert stamps.taken == taken


def test_a_forked_child_keeps_seeing_saves_through_the_inherited_mapping(env: Path) -> None:
    clock = FakeClock()
    saver, _ = watching(env, clock)
    saver.bump()
    reader, stamps = watching(env, clock)
    first = reader.precise()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: frozen clock, so only the counter can show the save
        code = 1
        try:
            os.write(ready_w, b"r")
            select.select([go_r], [], [], 30)
            taken = stamps.taken
            seen = reader.quick()
            code = 0 if seen != first and stamps.taken == taken + 1 else 2
        finally:
            os._exit(code)
    os.read(ready_r, 1)
    replace(env, "ML_ACCESS_TOKEN=two\n")
    saver.bump()
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)


# -- end to end: MLAuth on a .env, peers in real processes -----------------------------------


def session_of(auth: mlauth.MLAuth) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.auth = auth
    return session


def test_a_peer_process_save_is_sent_on_the_next_request_without_a_stat(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    auth = mlauth.MLAuth.from_env(fake_ml_env)
    session = session_of(auth)
    url = f"{fake_ml.base_url}/users/me"
    first = sent_token(lambda: session.get(url, timeout=30))
    refresh_in_another_process(fake_ml_env)  # makes the counter, on its first save
    assert sent_token(lambda: session.get(url, timeout=30)) != first  # (a stat per request)
    frozen(auth)  # from here the stat interval never runs out
    with counted_stats(fake_ml_env) as stats:
        for _ in range(20):
            token = sent_token(lambda: session.get(url, timeout=30))
    assert stats == []  # no system call on the common path
    refresh_in_another_process(fake_ml_env)  # a real refresh: spends, saves, counts
    new = read_env_file(fake_ml_env)["ML_ACCESS_TOKEN"]
    assert new != token
    # The clock is frozen and no request stats: only the counter can have told.
    assert sent_token(lambda: session.get(url, timeout=30)) == new
    with counted_stats(fake_ml_env) as stats:
        for _ in range(5):
            assert sent_token(lambda: session.get(url, timeout=30)) == new
    assert stats == []
    assert fake_ml.stats()["api_401"] == 0  # seen before the request, not after its 401
    assert fake_ml.stats()["refreshes"] == 2


def test_a_legacy_writer_is_seen_within_the_interval(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    make_counter(fake_ml_env)
    auth = mlauth.MLAuth.from_env(fake_ml_env)
    session = session_of(auth)
    url = f"{fake_ml.base_url}/users/me"
    first = sent_token(lambda: session.get(url, timeout=30))
    clock = frozen(auth)
    other = fake_ml.issue_tokens()  # a script that logs in on its own: both chains live
    write_like_a_legacy_script(
        fake_ml_env, str(other["access_token"]), str(other["refresh_token"]), replace=False
    )
    assert sent_token(lambda: session.get(url, timeout=30)) == first  # inside the window
    clock.now += STAT_INTERVAL
    assert sent_token(lambda: session.get(url, timeout=30)) == other["access_token"]
    assert fake_ml.stats()["refreshes"] == 0


def test_a_legacy_refresh_is_adopted_at_its_first_401(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    make_counter(fake_ml_env)
    auth = mlauth.MLAuth.from_env(fake_ml_env)
    session = session_of(auth)
    url = f"{fake_ml.base_url}/users/me"
    sent_token(lambda: session.get(url, timeout=30))
    frozen(auth)  # the interval cannot help: only the 401 can
    refresh = read_env_file(fake_ml_env)["ML_REFRESH_TOKEN"]
    answer = spend_outside(fake_ml, refresh).json()  # a legacy refresh: the old token dies
    write_like_a_legacy_script(
        fake_ml_env, answer["access_token"], answer["refresh_token"], replace=True
    )
    response = session.get(url, timeout=30)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert response.request.headers["Authorization"] == f"Bearer {answer['access_token']}"
    assert fake_ml.stats()["refreshes"] == 1  # the script's: adopted, nothing spent
    assert fake_ml.is_live(answer["refresh_token"])


@pytest.mark.processes
def test_a_env_mounted_alone_sees_a_containers_save_before_its_next_request(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    host = tmp_path / "host" / ".env"
    host.parent.mkdir()
    fake_ml.write_env(host)
    with (
        bind_file(host, tmp_path / "c1" / ".env") as one,
        bind_file(host, tmp_path / "c2" / ".env") as two,
    ):
        auth = mlauth.MLAuth.from_env(one)
        assert isinstance(auth._engine.store, EnvFileStore) and auth._engine.store.in_place
        assert watch_of(auth).counter_path is None  # each container's folder is its own
        session = session_of(auth)
        url = f"{fake_ml.base_url}/users/me"
        first = sent_token(lambda: session.get(url, timeout=30))
        frozen(auth)
        with counted_stats(one) as stats:
            sent_token(lambda: session.get(url, timeout=30))
            assert len(stats) == 1  # this shape keeps its stat per request
            refresh_in_another_process(two)  # "another container" saves, in place
            new = read_env_file(host)["ML_ACCESS_TOKEN"]
            assert new != first
            assert sent_token(lambda: session.get(url, timeout=30)) == new
        assert fake_ml.stats()["api_401"] == 0
        for folder in (host.parent, one.parent, two.parent):
            assert not list(folder.glob(f"*{COUNTER_SUFFIX}"))


def test_a_save_in_this_process_needs_no_counter_look_to_show(env: Path) -> None:
    env.write_text(
        "ML_CLIENT_ID=1\nML_CLIENT_SECRET=fake\nML_ACCESS_TOKEN=fake-one\nML_REFRESH_TOKEN=TG-fake-1\n"
    )
    store = EnvFileStore(env)
    tokens, version = store.load()
    saved = store.save(tokens, replaces=version)
    assert saved != version and store.local_stamp() == saved == store.stamp()
    assert os.path.getsize(counter(env)) == 8


def test_a_missing_env_gets_no_counter(tmp_path: Path) -> None:
    store = EnvFileStore(tmp_path / ".env")
    assert store.local_stamp() is None
    with pytest.raises(mlauth.ConfigError):
        store.load()
    assert list(tmp_path.iterdir()) == []


def test_a_counter_that_cannot_be_made_is_tried_once_per_look(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder this user may not write refuses the counter every time: one failed try per
    # interval, not one per request.
    from mlauth.stores import watch

    tries: list[str | None] = []
    monkeypatch.setattr(watch, "_make", lambda path: tries.append(path) or False)
    clock = FakeClock()
    reader, stamps = watching(env, clock)
    for _ in range(20):
        reader.quick()
    assert len(tries) == 1 and stamps.taken == 20
    clock.now += STAT_INTERVAL
    for _ in range(20):
        reader.quick()
    assert len(tries) == 2


def test_a_sparse_counter_is_not_mapped(env: Path) -> None:
    # Eight bytes long and no block behind them (`truncate -s 8`, `cp --sparse`): on a full
    # tmpfs the mapping's first read would have no page to fill, and the reader dies (SIGBUS).
    with open(counter(env), "wb") as handle:
        handle.truncate(8)
    assert os.stat(counter(env)).st_blocks == 0
    clock = FakeClock()
    reader, stamps = watching(env, clock)
    reader.quick()
    reader.quick()
    assert stamps.taken == 2  # not mapped: every check is a stat


# -- a copy over the counter: it would truncate a file every process maps -------------------


def count_in(path: str) -> int:
    with open(path, "rb") as file:
        return int.from_bytes(file.read(), sys.byteorder)


def test_a_save_leaves_the_counter_counted_and_read_only(env: Path) -> None:
    watch, _ = watching(env, FakeClock())
    for expected in (1, 2, 3):
        watch.bump()
        assert count_in(counter(env)) == expected
        assert os.stat(counter(env)).st_mode & 0o777 == 0o400


@pytest.fixture
def nobodys_env() -> Iterator[Path]:
    """A .env in a folder of nobody's, both nobody's, with a counter nobody's mlauth made."""
    if os.geteuid() != 0:
        pytest.skip("environment limit: acting as another user (nobody) needs root")
    with shared_folders() as folders:
        env = folders.attacker / ".env"
        env.write_text("ML_ACCESS_TOKEN=one\n")
        os.chown(env, NOBODY.pw_uid, NOBODY.pw_gid)

        def two_saves() -> None:
            watch = StampWatch(lambda: None, counter(env))
            watch.bump()
            watch.bump()
            assert count_in(counter(env)) == 2  # the owner's saves write it, mode or not

        assert in_child_as_nobody(two_saves) == 0
        yield env


def test_the_owner_keeps_counting_a_counter_that_is_read_only(nobodys_env: Path) -> None:
    path = counter(nobodys_env)
    assert os.stat(path).st_uid == NOBODY.pw_uid
    assert os.stat(path).st_mode & 0o777 == 0o400

    def one_more() -> None:
        StampWatch(lambda: None, path).bump()

    assert in_child_as_nobody(one_more) == 0
    assert count_in(path) == 3


def test_a_save_that_races_a_peer_making_the_counter_is_counted(nobodys_env: Path) -> None:
    # The first save and another process's first look at once: the look finds no counter
    # and makes one while the save, which made it a moment before, holds it writable for its
    # write. The maker must not make it read-only under the save (root ignores modes: as
    # nobody).
    path = counter(nobodys_env)
    os.remove(path)

    def save_with_a_peer_making_it_meanwhile() -> None:
        own = watch_module.open_own

        def open_own(name: str, flags: int, what: str, **kwargs: Any) -> int:
            if flags == os.O_WRONLY:  # the save's write, between its two chmods
                assert watch_module._make(name)  # the peer: it is there
            return own(name, flags, what, **kwargs)

        watch_module.open_own = open_own  # in this child only
        StampWatch(lambda: None, path).bump()

    assert in_child_as_nobody(save_with_a_peer_making_it_meanwhile) == 0
    assert count_in(path) == 1  # the save's count, not lost to a refused write
    assert os.stat(path).st_mode & 0o777 == 0o400


def test_a_copy_over_the_counter_by_its_owner_fails_and_leaves_it_whole(
    nobodys_env: Path,
) -> None:
    # `cp -a backup/. app/` while processes run: cp truncates an existing file in place, and
    # every process that maps the counter would die of SIGBUS at its next request.
    path = counter(nobodys_env)
    backup = nobodys_env.with_name("backup.generation")
    backup.write_bytes((7).to_bytes(8, sys.byteorder))
    os.chown(backup, NOBODY.pw_uid, NOBODY.pw_gid)
    before = os.stat(path)

    for copy in (
        ["cp", str(backup), path],
        ["sh", "-c", 'cat "$1" > "$2"', "sh", str(backup), path],
    ):
        done = run_as_nobody(*copy)
        assert done.returncode != 0, copy
        assert b"Permission denied" in done.stderr, done.stderr
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert count_in(path) == 2
