"""Root and the ``.env``'s owner take turns on one chain.

A pipeline runs as its user from cron, and root runs mlauth on the same ``.env`` now and
then: ``sudo mlauth status``, a root cron job, a container running as root on the
bind-mounted folder. The lock, the journal, the save counter and the re-authorization marker
root creates beside the file go to the ``.env``'s owner (mlauth.stores.private.check_own_fd), so
the user's next run can open them; files an older run as root left get an error that names
the owner and the fix, before any refresh token is spent.

Each user's turn is a real process: the user's is a child forked from the test that became
``nobody`` (tests.support.planting.in_child_as_nobody), refreshing against the loopback fake.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth.testing import FakeMercadoLibre
from tests.support.planting import NOBODY, in_child_as_nobody

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="environment limit: needs root")

SIBLINGS = (".env.lock", ".env.journal", ".env.generation")


@pytest.fixture
def folder() -> Iterator[Path]:
    """The pipeline user's own folder (0700) in /tmp, which ``nobody`` can reach."""
    path = Path(tempfile.mkdtemp(prefix="mlauth-root-runs-"))
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _users_env(fake: FakeMercadoLibre, folder: Path) -> Path:
    env = folder / ".env"
    fake.write_env(env)
    os.chown(env, NOBODY.pw_uid, NOBODY.pw_gid)
    return env


def _as_user(action: Callable[[], object]) -> tuple[int, str]:
    """Run ``action`` as ``nobody`` in a forked child: its exit status, and what it said
    (``ok``, or the class and message of what it raised)."""
    read, write = os.pipe()

    def run() -> None:
        os.close(read)
        try:
            action()
        except BaseException as exc:
            os.write(write, f"{type(exc).__name__}: {exc}".encode())
            raise
        os.write(write, b"ok")

    code = in_child_as_nobody(run)
    os.close(write)
    with os.fdopen(read, "rb") as said:
        return code, said.read().decode()


def _refresh(env: Path) -> Callable[[], object]:
    return lambda: mlauth.MLAuth.from_env(env).refresh()


def _request(env: Path, url: str) -> Callable[[], object]:
    def get() -> None:
        session = requests.Session()
        session.trust_env = False
        session.auth = mlauth.MLAuth.from_env(env)
        session.get(url, timeout=10).raise_for_status()

    return get


def test_a_refresh_as_root_leaves_files_the_env_owner_can_use(
    fake_ml: FakeMercadoLibre, folder: Path
) -> None:
    env = _users_env(fake_ml, folder)
    mlauth.MLAuth.from_env(env).refresh()  # root's turn: it creates the files beside the .env
    for name in SIBLINGS:
        info = (folder / name).stat()
        assert (info.st_uid, info.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), name
    # The user's turn: a refresh, then a request (which reads the save counter root made).
    assert _as_user(_refresh(env)) == (0, "ok")
    assert _as_user(_request(env, f"{fake_ml.base_url}/users/me")) == (0, "ok")
    # Root again, on files that are the user's now: accepted, not refused as planted.
    mlauth.MLAuth.from_env(env).refresh()
    stats = fake_ml.stats()
    assert (stats["refreshes"], stats["invalid_grant"]) == (3, 0)
    assert (env.stat().st_uid, env.stat().st_mode & 0o777) == (NOBODY.pw_uid, 0o600)


def test_files_a_run_as_root_left_get_an_error_naming_the_fix(
    fake_ml: FakeMercadoLibre, folder: Path
) -> None:
    env = _users_env(fake_ml, folder)
    before = env.read_bytes()
    left = [folder / ".env.lock", folder / ".env.journal"]  # what an older run as root left
    for path in left:
        path.touch(mode=0o600)
    code, said = _as_user(_refresh(env))
    assert code == 1
    assert said.startswith("StoreError: cannot open the refresh lock"), said
    assert "belongs to root (uid 0)" in said and f"chown {NOBODY.pw_uid} " in said, said
    # Refused before anything was spent: the chain and the file are as they were.
    assert fake_ml.stats()["token_requests"] == 0
    assert env.read_bytes() == before
    # Root gives away only files it makes itself, never one it finds under the name.
    mlauth.MLAuth.from_env(env).refresh()
    assert [path.stat().st_uid for path in left] == [0, 0]
    for path in left:  # the fix the message gives
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    assert _as_user(_refresh(env)) == (0, "ok")
    assert fake_ml.stats()["refreshes"] == 2


def test_a_file_of_roots_renamed_beside_the_env_is_not_given_away(
    fake_ml: FakeMercadoLibre, folder: Path
) -> None:
    # Root's own .env in the user's folder; the user renames it to the lock's name and puts
    # a .env of its own in its place. Root's next run must not hand its tokens over.
    roots = folder / "roots.env"
    fake_ml.write_env(roots)
    secret = roots.read_bytes()
    os.rename(roots, folder / ".env.lock")  # the folder's owner may rename anything in it
    env = _users_env(fake_ml, folder)
    mlauth.MLAuth.from_env(env).refresh()
    lock = folder / ".env.lock"
    assert (lock.stat().st_uid, lock.stat().st_mode & 0o777, lock.read_bytes()) == (
        0,
        0o600,
        secret,
    )


def test_a_hard_link_beside_the_env_is_refused_before_anything_is_given(
    fake_ml: FakeMercadoLibre, folder: Path
) -> None:
    # A root file elsewhere on the same file system, linked under the counter's name (made
    # here as root: fs.protected_hardlinks would stop nobody, but not every kernel sets it).
    victim_folder = Path(tempfile.mkdtemp(prefix="mlauth-victim-"))
    try:
        victim = victim_folder / "shadow"
        victim.write_bytes(b"root's own secret\n")
        victim.chmod(0o600)
        env = _users_env(fake_ml, folder)
        os.link(victim, folder / ".env.generation")
        mlauth.MLAuth.from_env(env).refresh()  # the counter is refused; the refresh goes on
        assert (victim.stat().st_uid, victim.stat().st_mode & 0o777) == (0, 0o600)
        assert victim.read_bytes() == b"root's own secret\n"
    finally:
        shutil.rmtree(victim_folder)


def test_nothing_is_given_in_a_folder_others_may_write(
    fake_ml: FakeMercadoLibre, folder: Path
) -> None:
    # A group-writable team folder: a member other than the .env's owner could swap the .env
    # for one of theirs and be given root's files, so nothing is given.
    folder.chmod(0o770)
    env = _users_env(fake_ml, folder)
    mlauth.MLAuth.from_env(env).refresh()
    for name in SIBLINGS:
        assert (folder / name).stat().st_uid == 0, name


def test_the_marker_root_writes_is_readable_by_the_env_owner(
    fake_ml: FakeMercadoLibre, folder: Path
) -> None:
    env = _users_env(fake_ml, folder)
    fake_ml.revoke_refresh_tokens()
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    assert (folder / ".env.reauth").stat().st_uid == NOBODY.pw_uid
    # The user's run reads the marker, and sends no dead token again.
    code, said = _as_user(_refresh(env))
    assert (code, said.split(":")[0]) == (1, "InvalidGrantError"), said
    assert fake_ml.stats()["invalid_grant"] == 1


def test_files_beside_a_root_env_stay_roots(fake_ml: FakeMercadoLibre, folder: Path) -> None:
    # Root's own .env in the user's folder: its journal holds root's tokens, and stays root's.
    env = folder / ".env"
    fake_ml.write_env(env)
    mlauth.MLAuth.from_env(env).refresh()
    for name in SIBLINGS:
        assert (folder / name).stat().st_uid == 0, name
