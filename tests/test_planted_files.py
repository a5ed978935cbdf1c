"""mlauth's own files beside the ``.env`` are never reached through a link, never another
user's, never a name someone predicted: a file planted under one of them is refused, with the
fix, before a refresh token is spent, and whatever it points at is left as it was.

The attacker is another local user (``nobody``, real subprocesses; tests/support/planting.py)
who can write the ``.env``'s folder; where who plants does not matter (a hard link, a FIFO),
the test plants as itself. The folder rule (who else may write the folder) is tested last.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import mlauth
import mlauth.stores.private
from mlauth.preflight import refresh_problem
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.mounts import bind_file
from tests.support.planting import (
    NOBODY,
    SharedFolders,
    Snapshot,
    as_nobody,
    plant_file,
    plant_link,
    shared_folders,
)

OWN_NAMES = [".env.journal", ".env.reauth", ".env.lock"]
ATTACKER_ACCESS = "APP_USR-1234567890123456-010101-attackeraccess0000000000000-6666"
ATTACKER_REFRESH = "TG-attackerrefresh000000000000-6666"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mlauth.stores.private, "_judged_folders", {})


@pytest.fixture
def shared() -> Iterator[SharedFolders]:
    if os.geteuid() != 0:
        pytest.skip("environment limit: acting as another user (nobody) needs root")
    with shared_folders() as folders:
        yield folders


def stale_env(fake_ml: FakeMercadoLibre, folder: Path) -> Path:
    """A .env whose access token has expired: the next API call refreshes."""
    env = folder / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    return env


def call_api(fake_ml: FakeMercadoLibre, env: Path) -> requests.Response:
    return requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(env))


def refused(fake_ml: FakeMercadoLibre, env: Path) -> str:
    """The StoreError message a refresh gets; and the check that nothing was spent."""
    with pytest.raises(mlauth.StoreError) as caught:
        call_api(fake_ml, env)
    assert fake_ml.stats()["token_requests"] == 0, "a refresh token was spent"
    return str(caught.value)


@pytest.mark.parametrize("target", ["the .env", "a file in another folder"])
@pytest.mark.parametrize("name", OWN_NAMES)
def test_a_link_planted_under_an_own_name_is_refused_before_spending(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, name: str, target: str
) -> None:
    env = stale_env(fake_ml, shared.project)
    victim = env if target == "the .env" else shared.elsewhere
    before = Snapshot.of(victim)
    link = shared.project / name
    plant_link(link, victim)

    message = refused(fake_ml, env)
    assert f"{link}: it is a symbolic link (to {victim})" in message
    assert f"`rm {link}`" in message  # the fix
    assert Snapshot.of(victim) == before  # not truncated, chmod-ed or written
    assert link.is_symlink()
    # Found out at start too: `mlauth run` refuses to start, from_env logs it.
    problem = refresh_problem(mlauth.EnvFileStore(env))
    assert problem is not None and f"{link}: it is a symbolic link" in problem


@pytest.mark.parametrize("name", OWN_NAMES)
def test_a_file_of_another_user_under_an_own_name_is_refused_before_spending(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, name: str
) -> None:
    env = stale_env(fake_ml, shared.project)
    stored = str(read_env_file(env)["ML_REFRESH_TOKEN"])
    # Empty for the lock and the journal; for the marker, a forged one naming the stored
    # token, which would stop every refresh ("not sent: re-authorize") if it were believed.
    forged = (
        json.dumps({"refresh_token": mlauth.fingerprint(stored), "at": time.time()}).encode()
        if name == ".env.reauth"
        else b""
    )
    planted = shared.project / name
    plant_file(planted, forged)
    before = Snapshot.of(env)

    auth = mlauth.MLAuth.from_env(env)
    with pytest.raises(mlauth.StoreError) as caught:
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    assert fake_ml.stats()["token_requests"] == 0, "a refresh token was spent"
    message = str(caught.value)
    assert f"{planted}: it belongs to nobody (uid {NOBODY.pw_uid})" in message
    assert f"`chown {os.geteuid()} {planted}`" in message and f"`rm {planted}`" in message
    assert Snapshot.of(env) == before
    assert planted.read_bytes() == forged  # never written to
    # The fix works in the running process: nothing (a lock half taken) is left behind.
    planted.unlink()
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1


@pytest.mark.parametrize("how", ["behind a link", "in a file of its own"])
def test_a_forged_journal_is_never_replayed_into_the_env(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, how: str
) -> None:
    # An "answer" record for the stored token: recovery would write the attacker's tokens
    # into the .env, and the pipeline would work on the attacker's account from then on.
    env = stale_env(fake_ml, shared.project)
    stored = str(read_env_file(env)["ML_REFRESH_TOKEN"])
    record = {
        "kind": "answer",
        "spent": mlauth.fingerprint(stored),
        "tokens": {
            "access_token": ATTACKER_ACCESS,
            "refresh_token": ATTACKER_REFRESH,
            "expires_at": time.time() + 3600,
            "refreshed_at": time.time(),
            "refreshed_by": "pid 1@attacker",
        },
    }
    forged = (json.dumps(record) + "\n").encode()
    journal = shared.project / ".env.journal"
    if how == "behind a link":
        plant_file(shared.attacker / "forged", forged)
        plant_link(journal, shared.attacker / "forged")
    else:
        plant_file(journal, forged)
    before = Snapshot.of(env)

    message = refused(fake_ml, env)
    assert f"refusing the refresh journal {journal}" in message
    assert Snapshot.of(env) == before
    assert ATTACKER_REFRESH not in env.read_text()
    assert mlauth.EnvFileStore(env).load()[0].refresh_token == mlauth.Secret(stored)


def test_the_reauthorization_marker_is_written_under_no_predictable_name(
    fake_ml: FakeMercadoLibre, shared: SharedFolders
) -> None:
    # Written through a temporary file: one named after the pid (as it was) can be planted.
    env = stale_env(fake_ml, shared.project)
    before = Snapshot.of(shared.elsewhere)
    predicted = shared.project / f".env.reauth.{os.getpid()}.tmp"
    plant_link(predicted, shared.elsewhere)
    fake_ml.revoke_refresh_tokens()

    with pytest.raises(mlauth.InvalidGrantError):
        call_api(fake_ml, env)
    assert fake_ml.stats()["token_requests"] == 1  # the dead token, once
    assert Snapshot.of(shared.elsewhere) == before
    marker = shared.project / ".env.reauth"
    assert not marker.is_symlink() and marker.stat().st_nlink == 1
    assert marker.stat().st_mode & 0o777 == 0o600
    assert predicted.is_symlink()  # never touched: its name was never used


def test_a_hard_link_planted_as_the_journal_is_refused(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    # A second name of a file someone else can read (protected_hardlinks off, or a file the
    # planter may read and write): every record, tokens included, would show there too.
    (tmp_path / "project").mkdir()
    env = stale_env(fake_ml, tmp_path / "project")
    victim = tmp_path / "victim.log"
    victim.write_text("another program's log\n")
    before = Snapshot.of(victim)
    journal = tmp_path / "project" / ".env.journal"
    os.link(victim, journal)

    message = refused(fake_ml, env)
    assert f"{journal}: it has 2 names (hard links)" in message
    assert f"find / -xdev -samefile {journal}" in message
    assert Snapshot.of(victim) == before


def test_a_fifo_planted_as_the_journal_cannot_hang_the_refresh(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = stale_env(fake_ml, tmp_path)
    journal = tmp_path / ".env.journal"
    os.mkfifo(journal)
    outcome: list[BaseException] = []

    def refresh() -> None:
        try:
            call_api(fake_ml, env)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    worker = threading.Thread(target=refresh, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the refresh hangs on a FIFO planted as the journal"
    assert len(outcome) == 1 and isinstance(outcome[0], mlauth.StoreError)
    assert f"{journal}: it is a FIFO" in str(outcome[0])
    assert fake_ml.stats()["token_requests"] == 0


def test_the_env_itself_may_stay_a_link_and_its_files_live_beside_its_target(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    real = tmp_path / "store"
    real.mkdir()
    env = stale_env(fake_ml, real)
    link = tmp_path / "app.env"
    link.symlink_to(env)  # Kubernetes, dotfile managers
    assert call_api(fake_ml, link).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1
    assert link.is_symlink() and (real / ".env.journal").is_file()
    assert not (tmp_path / "app.env.journal").exists()


# -- who else may write the folder -----------------------------------------------------------


def folder_with_mode(fake_ml: FakeMercadoLibre, tmp_path: Path, mode: int) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    env = stale_env(fake_ml, folder)
    folder.chmod(mode)
    return env


def test_a_world_writable_folder_is_refused_before_spending(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = folder_with_mode(fake_ml, tmp_path, 0o777)
    message = refused(fake_ml, env)
    assert "every user of this machine may write that folder (mode 0777)" in message
    assert f"`chmod o-w {env.parent}`" in message and f"`chmod +t {env.parent}`" in message
    problem = refresh_problem(mlauth.EnvFileStore(env))
    assert problem is not None and "chmod o-w" in problem


def test_a_sticky_world_writable_folder_is_accepted_silently(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Like /tmp: nobody else may rename or remove this user's files there, and a name they
    # plant in advance is refused file by file.
    env = folder_with_mode(fake_ml, tmp_path, 0o1777)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, env).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1
    assert [r.getMessage() for r in caplog.records] == []


def test_a_sticky_folder_another_user_owns_gets_one_warning(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, caplog: pytest.LogCaptureFixture
) -> None:
    # The sticky bit keeps others from renaming this user's files, never the folder's owner.
    folder = shared.attacker / "drop"
    as_nobody("mkdir", "-m", "1777", str(folder))
    env = stale_env(fake_ml, folder)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, env).status_code == 200
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder} (mode 1777) can be written by its owner, nobody (uid {NOBODY.pw_uid}): "
        "they can replace the .env and its refresh lock, so they hold its tokens as much as "
        f"this user does. If they should not, give it to this user (`chown {os.geteuid()} "
        f"{folder}`) or keep the .env in a folder of this user's."
    ]
    # Not a false alarm: nobody can do it.
    as_nobody("mv", str(env), str(shared.attacker / "taken"))
    assert not env.exists()


def test_a_folder_a_group_may_write_gets_one_warning_per_process(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("environment limit: giving a folder to nobody's group needs root")
    env = folder_with_mode(fake_ml, tmp_path, 0o2770)
    os.chown(env.parent, 0, NOBODY.pw_gid)  # a setgid team folder
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, env).status_code == 200
        fake_ml.write_env(env, expires_at=time.time() - 10)  # stale again: refresh again
        assert call_api(fake_ml, env).status_code == 200
    assert fake_ml.stats()["refreshes"] == 2  # a warning, never a refusal
    assert [r.getMessage() for r in caplog.records] == [
        f"{env.parent} (mode 2770) can be written by the members of group nogroup: they can "
        "replace the .env and its refresh lock, so they hold its tokens as much as this user "
        f"does. If they should not, make it writable only by this user (`chmod g-w "
        f"{env.parent}`, or `chown` it), or add the sticky bit (`chmod +t {env.parent}`)."
    ]


def test_a_folder_writable_by_the_owners_private_group_is_no_one_else(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # umask 002 with a group per user (Debian's and Ubuntu's default): 0775, group of one.
    if os.geteuid() != 0:
        pytest.skip("environment limit: needs root, whose group 'root' has no other member")
    env = folder_with_mode(fake_ml, tmp_path, 0o775)
    os.chown(env.parent, 0, 0)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, env).status_code == 200
    assert [r.getMessage() for r in caplog.records] == []


# -- who else may write the folders above it -------------------------------------------------
# Whoever may write a folder above the .env's can rename the folder below it away and put one
# of theirs, with a .env of theirs, in its place: OpenSSH's StrictModes checks every folder up
# to / (or the home folder) for that reason, and so does mlauth, up to /.


def nested_env(fake_ml: FakeMercadoLibre, top: Path, *below: str) -> Path:
    """A stale .env in ``top/below...``, every folder this user's (root's on CI), mode 0700."""
    folder = top.joinpath(*below)
    folder.mkdir(mode=0o700, parents=True)
    return stale_env(fake_ml, folder)


def test_a_world_writable_folder_above_is_refused_before_spending(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    env = nested_env(fake_ml, tmp_path, "shared", "team", "project")
    shared.chmod(0o777)  # two levels above the .env's folder, which is private
    message = refused(fake_ml, env)
    assert f"every user of this machine may write {shared} (mode 0777)" in message
    assert f"rename {shared / 'team'} away" in message
    assert f"`chmod o-w {shared}`" in message and f"`chmod +t {shared}`" in message
    problem = refresh_problem(mlauth.EnvFileStore(env))
    assert problem is not None and f"`chmod o-w {shared}`" in problem
    # The fix works in the running process.
    shared.chmod(0o755)
    assert call_api(fake_ml, env).status_code == 200


def test_a_sticky_world_writable_folder_above_is_silent(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # /tmp itself, and pytest's tmp_path under it: nobody else may rename this user's folder.
    env = nested_env(fake_ml, tmp_path, "scratch", "project")
    (tmp_path / "scratch").chmod(0o1777)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, env).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1
    assert [r.getMessage() for r in caplog.records] == []


def test_a_folder_above_owned_by_another_user_gets_one_warning_naming_it(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, caplog: pytest.LogCaptureFixture
) -> None:
    # A container running as root, the .env in a folder of root's on a volume the host's
    # user owns: that user can swap the folder, and is named once.
    volume = shared.attacker  # nobody's, 0755
    env = nested_env(fake_ml, volume, "state")
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, env).status_code == 200
        fake_ml.write_env(env, expires_at=time.time() - 10)  # stale again: refresh again
        assert call_api(fake_ml, env).status_code == 200
    assert fake_ml.stats()["refreshes"] == 2  # a warning, never a refusal
    assert [r.getMessage() for r in caplog.records] == [
        f"{volume} (mode 0755), a folder above {env.parent}, can be written by its owner, "
        f"nobody (uid {NOBODY.pw_uid}): they can rename {env.parent} away and put a folder of "
        f"theirs in its place, so they hold the tokens of the .env there as much as this user "
        f"does. If they should not, give it to this user (`chown {os.geteuid()} {volume}`) "
        "or keep the .env in a folder whose parents are this user's or root's."
    ]
    # Not a false alarm: nobody can do it.
    as_nobody("mv", str(env.parent), str(volume / "moved"))
    assert not env.exists()


def test_a_folder_above_a_group_may_write_is_named_once_for_all_below(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, caplog: pytest.LogCaptureFixture
) -> None:
    # A setgid team folder (shared.project, 2770 root:nogroup) holding two private projects.
    team = shared.project
    first = nested_env(fake_ml, team, "first")
    second = nested_env(fake_ml, team, "second")
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, first).status_code == 200
        assert call_api(fake_ml, second).status_code == 200
    assert fake_ml.stats()["refreshes"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith(
        f"{team} (mode 2770), a folder above {first.parent}, can be written by the members "
        f"of group nogroup: they can rename {first.parent} away"
    )
    assert f"(`chmod g-w {team}`, or `chown` it), or add the sticky bit" in messages[0]


def test_a_folder_above_adds_no_warning_for_writers_already_named(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, caplog: pytest.LogCaptureFixture
) -> None:
    # A volume bind-mounted from the host, owned by the host's user (nobody here) down to the
    # .env's folder, in a container running as root: one warning, for the folder itself.
    volume = shared.attacker
    state = volume / "state"
    as_nobody("mkdir", "-m", "0755", str(state))
    env = stale_env(fake_ml, state)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert call_api(fake_ml, env).status_code == 200
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{state} (mode 0755) can be written by its owner, nobody")


def test_a_bind_mounted_volume_of_another_user_is_checked_through_the_mount(
    fake_ml: FakeMercadoLibre, shared: SharedFolders, caplog: pytest.LogCaptureFixture
) -> None:
    # docker run -v /srv/volume:/data: the mount point shows the host folder's owner.
    data = shared.project.parent / "data"
    with bind_file(shared.attacker, data):
        env = nested_env(fake_ml, data, "mlauth")
        with caplog.at_level(logging.WARNING, logger="mlauth"):
            assert call_api(fake_ml, env).status_code == 200
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1, messages
        assert messages[0].startswith(
            f"{data} (mode 0755), a folder above {env.parent}, can be written by its owner, nobody"
        )
        # The MLAuth's mapping of its save counter (mlauth.stores.watch) pins the mount, as an
        # open file would, until the objects are collected: then it can be unmounted.
        gc.collect()
