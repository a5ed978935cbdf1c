"""A host `.env` bind-mounted as a single file into two "containers", as Docker does it.

``docker run -v "$PWD/.env:/app/.env"`` is a bind mount of one file onto a file in the
container's own folder. Here each "container" is a folder of its own whose `.env` is a real
``mount --bind`` of the host file (CI runs as root), and every process is a real subprocess
against the loopback FakeMercadoLibre. What a container adds beyond that (its own mount
namespace, its own hostname) changes nothing mlauth relies on: the inode is shared, the
folders are not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlauth
from mlauth.stores.envfile import read_env_file
from mlauth.stores.mounted import JOURNAL_ATTR, is_mount_point
from mlauth.testing import FakeMercadoLibre
from tests.support.demo_workers import LIFETIME, check_storm, result_of, worker
from tests.support.fault_kills import assert_chain_lives, kill_after_the_rotation, kill_at, peer
from tests.support.mounts import bind_file
from tests.support.pools import run_pool

pytestmark = pytest.mark.processes

CHATTR = shutil.which("chattr")


def assert_run_refuses(env: Path, tmp_path: Path, *needles: str) -> None:
    """`mlauth run` stops before the command starts: exit 1, one line naming the fix."""
    marker = tmp_path / "the-command-ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    done = subprocess.run(
        [sys.executable, "-m", "mlauth", "run", "--env", str(env), "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert not marker.exists()
    (line,) = done.stderr.splitlines()
    assert "the command was not started" in line and "Refusing to spend" in line
    for needle in needles:
        assert needle in line, line


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


@pytest.fixture
def host_env(fake: FakeMercadoLibre, tmp_path: Path) -> Path:
    path = tmp_path / "host" / ".env"
    path.parent.mkdir()
    # Expired: the first request of each process must refresh.
    fake.write_env(path, expires_at=time.time() - 10, extra={"PIPELINE_SETTING": "keep me"})
    return path


@pytest.fixture
def containers(host_env: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    with (
        bind_file(host_env, tmp_path / "c1" / ".env") as one,
        bind_file(host_env, tmp_path / "c2" / ".env") as two,
    ):
        yield one, two


def test_a_refresh_through_a_single_file_mount_reaches_the_host_file(
    fake: FakeMercadoLibre, host_env: Path, containers: tuple[Path, Path]
) -> None:
    one, two = containers
    inode = host_env.stat().st_ino
    assert not mlauth.EnvFileStore(host_env).in_place  # a plain file, before any container
    store = mlauth.EnvFileStore(one)
    assert store.in_place  # mounted alone; it marks the inode, so the host follows from now on
    assert mlauth.EnvFileStore(host_env).in_place
    result = peer(one, fake, one.parent)
    assert result["status"] == 200
    assert fake.stats()["refreshes"] == 1
    # The host file holds the live chain, in the same inode, and the mounts stay in place.
    host = read_env_file(host_env)
    assert fake.is_live(host["ML_REFRESH_TOKEN"])
    assert host["PIPELINE_SETTING"] == "keep me"
    assert host_env.stat().st_ino == inode
    assert is_mount_point(str(one)) and is_mount_point(str(two))
    assert read_env_file(two) == host
    # No sibling lock file or journal in any folder: the inode carries both.
    for folder in (host_env.parent, one.parent, two.parent):
        assert not list(folder.glob(".env.lock")) and not list(folder.glob(".env.journal"))
    assert JOURNAL_ATTR not in os.listxattr(host_env)
    status = subprocess.run(
        [sys.executable, "-m", "mlauth", "status"], cwd=two.parent, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert "in place, for single-file mounts" in status.stdout
    assert "refresh running:  no" in status.stdout


def test_two_containers_spend_each_refresh_token_once_through_expiries(tmp_path: Path) -> None:
    per_container, threads, seconds = 3, 2, 8.0
    with FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake:
        host_env = tmp_path / "host" / ".env"
        host_env.parent.mkdir()
        fake.write_env(host_env, expires_at=time.time() + LIFETIME)
        with (
            bind_file(host_env, tmp_path / "c1" / ".env") as one,
            bind_file(host_env, tmp_path / "c2" / ".env") as two,
        ):
            started = time.time()
            procs = [
                worker(env, fake.base_url, threads=threads, seconds=seconds)
                for env in (one, two)
                for _ in range(per_container)
            ]
            results = [result_of(proc) for proc in procs]
            span = time.time() - started
        stats = fake.stats()
        refresh_times = fake.refresh_times()
        assert fake.is_live(read_env_file(host_env)["ML_REFRESH_TOKEN"])

    check_storm(
        f"2 containers x {per_container} processes x {threads} threads, one mounted .env",
        results,
        stats,
        refresh_times,
        seconds=seconds,
        span=span,
        threads=2 * per_container * threads,
    )


# The writer's fault hook: each pwrite of write_in_place copies half the bytes, pauses, then
# copies the rest, still under the exclusive content lock. A single pwrite of < 4 KiB is
# copied too fast for a reader to land in the middle of it, so without the pause a reader
# that took no lock would pass as well; with it, such a reader sees torn files every run.
SPLIT_PAUSE = 0.003
WRITES = 150

WRITER = textwrap.dedent(
    """
    import os, sys, time
    import mlauth
    import mlauth.stores.mounted
    from mlauth.secret import Secret

    real_pwrite, splits = os.pwrite, 0

    def pwrite_in_two_halves(fd, data, offset):
        global splits
        half = len(data) // 2
        done = real_pwrite(fd, data[:half], offset)
        if done < half:
            return done
        splits += 1
        time.sleep(float(sys.argv[3]))  # widens the window a lock-free reader would hit
        return done + real_pwrite(fd, data[half:], offset + half)

    mlauth.stores.mounted.os.pwrite = pwrite_in_two_halves
    store = mlauth.EnvFileStore(sys.argv[1])
    assert store.in_place
    for i in range(int(sys.argv[2])):
        # Lengths that grow and shrink: a torn write would leave a fragment of the old file.
        token = "TG-" + "x" * (10 + (i * 37) % 200) + "-" + str(i)
        with store.lock(10):
            store.save(mlauth.TokenSet(
                access_token=Secret("APP_USR-fake-" + str(i)), refresh_token=Secret(token),
                expires_at=time.time() + 3600, refreshed_at=time.time(), refreshed_by="writer"))
    print("splits", splits, flush=True)
    """
)

READER = textwrap.dedent(
    """
    import os, sys
    from mlauth.stores.envfile import read_env_file
    from mlauth.errors import ConfigError
    reads = torn = 0
    seen, first_torn = set(), None
    ready, stop = sys.argv[2], sys.argv[3]
    while not os.path.exists(stop) or reads == 0:
        if reads == 0:
            open(ready, "w").close()  # imported and about to read
        reads += 1
        try:
            values = read_env_file(sys.argv[1])
        except ConfigError as exc:  # a torn file can hold a key twice, or cut UTF-8
            torn += 1
            first_torn = first_torn or str(exc)
            continue
        token = values.get("ML_REFRESH_TOKEN") or ""
        access = values.get("ML_ACCESS_TOKEN") or ""
        seen.add(token)
        whole = (
            values.get("PIPELINE_SETTING") == "keep me"
            and values.get("ML_CLIENT_ID")
            and token.startswith("TG-")
            and (token.rsplit("-", 1)[-1] == access.rsplit("-", 1)[-1] or token.count("-") != 2)
            and all(k.startswith(("ML_", "PIPELINE_")) for k in values)
        )
        if not whole:
            torn += 1
            first_torn = first_torn or repr(values)
    print(reads, torn, len(seen), flush=True)
    print(first_torn or "", flush=True)
    """
)


def _wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process exited ({proc.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"{path.name} not created within {timeout:g}s"
        time.sleep(0.01)


def test_a_reader_in_another_container_never_sees_a_half_written_file(
    host_env: Path, containers: tuple[Path, Path], tmp_path: Path
) -> None:
    one, two = containers
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(two), str(ready), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_file(ready, reader, 60)  # reading before the first write starts
        writer = subprocess.run(
            [sys.executable, "-c", WRITER, str(one), str(WRITES), str(SPLIT_PAUSE)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    assert writer.returncode == 0, writer.stderr
    # Every write went through the hook: each one had a window to be caught in.
    assert writer.stdout.split() == ["splits", str(WRITES)], writer.stdout
    counts, first_torn = out.split("\n", 1)
    reads, torn, seen = (int(n) for n in counts.split())
    print(
        f"\n[figures] {WRITES} in-place writes, each paused {SPLIT_PAUSE * 1000:g} ms halfway; "
        f"{reads} reads from the other mount saw {seen} versions, {torn} torn"
    )
    assert seen > 2  # the reads overlapped the writes, not just before or after them
    assert torn == 0, f"first torn read: {first_torn.strip()}"
    final = read_env_file(host_env)["ML_REFRESH_TOKEN"]
    assert final is not None and final.endswith(f"-{WRITES - 1}")


PHASES = ["before-post", "after-answer", "during-write", "after-write"]


@pytest.mark.parametrize("phase", PHASES)
def test_a_refresher_killed_at_any_phase_in_one_container_loses_nothing(
    phase: str,
    fake: FakeMercadoLibre,
    host_env: Path,
    containers: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    one, two = containers
    spent = read_env_file(host_env)["ML_REFRESH_TOKEN"]
    kill_at(phase, one, fake, tmp_path)
    sent = fake.stats()["token_requests"]
    assert sent == (0 if phase == "before-post" else 1)
    # A process in the *other* container carries the chain on: it replays the answer the
    # victim journaled on the shared inode, or finds the saved one, or tries the token once.
    result = peer(two, fake, tmp_path)
    assert result["status"] == 200
    assert fake.stats()["refreshes"] == 1  # one rotation in all: nothing spent twice
    host = read_env_file(host_env)
    assert host["ML_REFRESH_TOKEN"] != spent and fake.is_live(host["ML_REFRESH_TOKEN"])
    if phase in ("during-write", "after-write"):
        # The answer was in the file before the kill: the peer simply used it.
        assert fake.stats()["token_requests"] == 1
    # The next refresh, from either container, settles what the victim journaled.
    mlauth.MLAuth.from_env(one).refresh()
    assert JOURNAL_ATTR not in os.listxattr(host_env)
    assert_chain_lives(one, fake, tmp_path)


def test_a_read_only_single_file_mount_refuses_before_spending(
    fake: FakeMercadoLibre, host_env: Path, tmp_path: Path
) -> None:
    before = host_env.read_bytes()
    with bind_file(host_env, tmp_path / "ro" / ".env", read_only=True) as env:
        with pytest.raises(OSError, match="Read-only"):
            env.write_text("x")  # the mount really refuses root
        auth = mlauth.MLAuth.from_env(env)
        with pytest.raises(mlauth.StoreError) as caught:
            auth.valid_tokens()
        assert_run_refuses(env, tmp_path, "read-only", ":ro")
    message = str(caught.value)
    assert "read-only" in message and "Refusing to spend" in message
    assert "mount" in message and "Redis" in message  # names the fixes
    assert fake.stats()["token_requests"] == 0
    assert host_env.read_bytes() == before


@pytest.mark.parametrize("mounted", [False, True], ids=["plain", "mounted-alone"])
def test_an_immutable_env_refuses_before_spending(
    mounted: bool, fake: FakeMercadoLibre, host_env: Path, tmp_path: Path
) -> None:
    if CHATTR is None:
        pytest.skip("environment limit: no chattr command on PATH")
    done = subprocess.run([CHATTR, "+i", str(host_env)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"environment limit: chattr +i refused here: {done.stderr}")
    before = host_env.read_bytes()
    try:
        with contextlib.ExitStack() as stack:
            env = host_env
            if mounted:
                env = stack.enter_context(bind_file(host_env, tmp_path / "c" / ".env"))
            auth = mlauth.MLAuth.from_env(env)
            with pytest.raises(mlauth.StoreError) as caught:
                auth.valid_tokens()
            assert_run_refuses(env, tmp_path, "chattr")
    finally:
        subprocess.run([CHATTR, "-i", str(host_env)], check=True)
    message = str(caught.value)
    assert "chattr" in message and "Refusing to spend" in message
    assert fake.stats()["token_requests"] == 0
    assert host_env.read_bytes() == before


def test_a_host_process_and_a_container_share_the_chain_with_the_in_place_key(
    fake: FakeMercadoLibre, host_env: Path, tmp_path: Path
) -> None:
    # The host process sees a plain file; the key makes it lock and write the way the
    # containers do, so it never replaces the inode they pin.
    with host_env.open("a") as handle:
        handle.write("ML_ENV_WRITE=in-place\n")
    with bind_file(host_env, tmp_path / "c1" / ".env") as inside:
        inode = host_env.stat().st_ino
        for env in (host_env, inside, host_env, inside):
            assert mlauth.EnvFileStore(env).in_place
            auth = mlauth.MLAuth.from_env(env)
            auth.refresh()  # forced: each one spends the token the other left
            assert read_env_file(inside) == read_env_file(host_env)
        assert host_env.stat().st_ino == inode
    assert fake.stats()["refreshes"] == 4 and fake.stats()["invalid_grant"] == 0
    assert fake.is_live(read_env_file(host_env)["ML_REFRESH_TOKEN"])


def test_an_unknown_write_mode_is_a_clear_error(host_env: Path) -> None:
    with host_env.open("a") as handle:
        handle.write("ML_ENV_WRITE=inplace\n")
    with pytest.raises(mlauth.ConfigError, match=r"ML_ENV_WRITE='inplace'.*in-place"):
        mlauth.MLAuth.from_env(host_env)


def test_the_lost_answer_window_stops_every_container_with_the_fix(
    fake: FakeMercadoLibre, host_env: Path, containers: tuple[Path, Path], tmp_path: Path
) -> None:
    # The one window no client closes: the server rotated the token and the answer died with
    # the process. The marker that says so lives on the shared inode, so the other container
    # learns it too, and stops without sending the dead token again.
    one, two = containers
    before = host_env.read_bytes()
    kill_after_the_rotation(one, fake, tmp_path)

    result = peer(two, fake, tmp_path)
    assert result["error"] == "InvalidGrantError"
    assert "possibly spent already" in str(result["message"])
    assert "mlauth login" in str(result["message"])
    assert fake.stats()["token_requests"] == 2  # the victim's, and exactly one try
    for env in (one, two):
        later = peer(env, fake, tmp_path, "later")
        assert later["error"] == "InvalidGrantError" and "not sent" in str(later["message"])
        assert mlauth.reauthorization_required(mlauth.EnvFileStore(env)) is not None
    assert fake.stats()["token_requests"] == 2
    assert host_env.read_bytes() == before


def test_a_fork_pool_on_a_mounted_env_shares_the_chain(tmp_path: Path) -> None:
    with FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake:
        host_env = tmp_path / "host" / ".env"
        host_env.parent.mkdir()
        fake.write_env(host_env, expires_at=time.time() + LIFETIME)
        with bind_file(host_env, tmp_path / "c1" / ".env") as env:
            assert mlauth.EnvFileStore(env).in_place
            # The inode lock's descriptors are process-bound too: rebuilt in every child.
            run_pool("fork", fake, env, " (a .env mounted alone)")
        assert fake.is_live(read_env_file(host_env)["ML_REFRESH_TOKEN"])


def test_a_mounted_env_over_one_page_is_refused_before_spending(
    fake: FakeMercadoLibre, host_env: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Written in place, a file over one page could be cut between its pages by a kill -9,
    # garbling the token lines while the journal still held the answer.
    with host_env.open("a") as handle:
        handle.write("# a long comment\n" * 300)
    before = host_env.read_bytes()
    with bind_file(host_env, tmp_path / "c1" / ".env") as env:
        with caplog.at_level("ERROR", logger="mlauth"):
            auth = mlauth.MLAuth.from_env(env)
        assert "too large to be written in place" in caplog.text  # said at start
        with pytest.raises(mlauth.StoreError) as caught:
            auth.valid_tokens()
    message = str(caught.value)
    assert f"it has {len(before)} bytes" in message and "mount the .env's folder" in message
    assert fake.stats()["token_requests"] == 0
    assert host_env.read_bytes() == before


def test_a_host_process_started_before_the_containers_stops_before_splitting_the_chain(
    fake: FakeMercadoLibre, host_env: Path, tmp_path: Path
) -> None:
    host_auth = mlauth.MLAuth.from_env(host_env)  # a plain file: sibling lock, os.replace
    with bind_file(host_env, tmp_path / "c1" / ".env") as env:
        mlauth.MLAuth.from_env(env)  # a container starts: it marks the inode
        with pytest.raises(mlauth.StoreError, match="Restart this process"):
            host_auth.refresh()
        assert fake.stats()["token_requests"] == 0
        # Restarted, the host process follows the containers: in place, on the same inode.
        inode = host_env.stat().st_ino
        assert mlauth.EnvFileStore(host_env).in_place
        mlauth.MLAuth.from_env(host_env).refresh()
        assert host_env.stat().st_ino == inode and read_env_file(env) == read_env_file(host_env)
    assert fake.stats()["refreshes"] == 1 and fake.stats()["invalid_grant"] == 0


def test_a_container_whose_file_was_replaced_on_the_host_refuses_to_refresh(
    fake: FakeMercadoLibre, host_env: Path, tmp_path: Path
) -> None:
    with bind_file(host_env, tmp_path / "c1" / ".env") as env:
        auth = mlauth.MLAuth.from_env(env)
        # An editor on the host saves by replacing the file: the mount keeps the old inode.
        fresh = host_env.with_name(".env.edited")
        fresh.write_bytes(host_env.read_bytes() + b"# edited\n")
        os.replace(fresh, host_env)
        with pytest.raises(mlauth.StoreError, match=r"replaced on the host.*Restart the container"):
            auth.refresh()
    assert fake.stats()["token_requests"] == 0


def test_the_save_probe_leaves_no_second_name_of_the_env(
    fake: FakeMercadoLibre, host_env: Path
) -> None:
    store = mlauth.EnvFileStore(host_env)
    # Left by a probe killed between its link and its unlink: a second name of an older
    # .env (tokens and secret). One naming the current file may be a probe running now.
    older = host_env.parent / ".older"
    older.write_bytes(host_env.read_bytes())
    stale = host_env.parent / "..env.dead.link.mlauth-tmp"
    os.link(older, stale)
    live = host_env.parent / "..env.live.link.mlauth-tmp"
    os.link(host_env, live)
    store.check_writable()
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in host_env.parent.glob("..env.*")) == [live.name]
    assert host_env.stat().st_nlink == 2  # the probe's own link came and went


def test_protected_hardlinks_do_not_refuse_a_save_that_works(fake: FakeMercadoLibre) -> None:
    # A .env owned by root (0644) in a folder the pipeline's user may write: that user may not
    # hard-link it under fs.protected_hardlinks, yet replacing it works.
    setting = Path("/proc/sys/fs/protected_hardlinks")
    if os.geteuid() != 0 or not setting.exists() or setting.read_text().strip() != "1":
        pytest.skip("environment limit: needs root and fs.protected_hardlinks=1")
    nobody = 65534
    folder = Path(tempfile.mkdtemp(prefix="mlauth-owner-"))
    try:
        # The pipeline's user's own folder (a world-writable one is refused before spending).
        os.chown(folder, nobody, nobody)
        env = folder / ".env"
        fake.write_env(env, expires_at=time.time() - 10)
        env.chmod(0o644)
        store = mlauth.EnvFileStore(env)
        tokens, _ = store.load()
        os.seteuid(nobody)  # this process becomes the pipeline's user, as far as files go
        try:
            with pytest.raises(PermissionError):
                os.link(env, folder / "alias")  # the kernel's rule really applies
            store.check_writable()  # no refusal
            store.save(tokens)  # and the save it vouched for works
        finally:
            os.seteuid(0)
        assert env.stat().st_uid == nobody  # replaced by the pipeline's user
    finally:
        shutil.rmtree(folder)
