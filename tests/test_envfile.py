"""The .env store: everything but the token values survives a save, byte for byte."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import mlauth
from mlauth.secret import Secret
from mlauth.stores.envfile import EnvFileStore, read_env_file, render_update, update_env_file
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import TokenSet

NEW = TokenSet(
    access_token=Secret("APP_USR-new-access-fake"),
    refresh_token=Secret("TG-new-refresh-fake"),
    expires_at=1900000000.5,
    refreshed_at=1899978400.5,
    refreshed_by="pid 7@host",
)

ORIGINAL = (
    "# MercadoLibre pipeline\n"
    "\n"
    "export ML_CLIENT_ID=1234567890123456\n"
    "ML_CLIENT_SECRET='fake secret # with hash'   # keep this comment\n"
    'AMAZON_KEY="quoted = value with spaces"\n'
    "export ML_ACCESS_TOKEN=APP_USR-old-access-fake  # current token\n"
    "   \n"
    "ML_REFRESH_TOKEN='TG-old-refresh-fake'\n"
    "not a valid line\n"
    "LAST=1"
)


def saved_text(tmp_path: Path, original: str, tokens: TokenSet = NEW) -> str:
    path = tmp_path / ".env"
    path.write_bytes(original.encode())
    EnvFileStore(path).save(tokens)
    return path.read_bytes().decode()


def test_save_changes_only_token_values(tmp_path: Path) -> None:
    text = saved_text(tmp_path, ORIGINAL)
    expected = (
        ORIGINAL.replace("APP_USR-old-access-fake", "APP_USR-new-access-fake").replace(
            "TG-old-refresh-fake", "TG-new-refresh-fake"
        )
        + "\nML_TOKEN_EXPIRES_AT=1900000000.5\nML_TOKEN_REFRESHED_AT=1899978400.5\n"
        + 'ML_TOKEN_REFRESHED_BY="pid 7@host"\n'
    )
    assert text == expected
    values = read_env_file(tmp_path / ".env")
    assert values["ML_CLIENT_SECRET"] == "fake secret # with hash"
    assert values["AMAZON_KEY"] == "quoted = value with spaces"
    assert values["ML_ACCESS_TOKEN"] == "APP_USR-new-access-fake"
    assert values["ML_TOKEN_REFRESHED_BY"] == "pid 7@host"


def test_second_save_updates_in_place_without_duplicating_keys(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    saved_text(tmp_path, ORIGINAL)
    first = path.read_text()
    later = TokenSet(Secret("APP_USR-third"), Secret("TG-third"), 1900000100.0, 1899978500.0, "p")
    EnvFileStore(path).save(later)
    second = path.read_text()
    assert second.count("ML_TOKEN_EXPIRES_AT=") == 1
    assert second.splitlines()[:3] == first.splitlines()[:3]
    assert "ML_TOKEN_EXPIRES_AT=1900000100\n" in second


def test_crlf_file_keeps_its_line_endings(tmp_path: Path) -> None:
    original = "A=1\r\nML_ACCESS_TOKEN=old\r\nML_REFRESH_TOKEN=old\r\n"
    text = saved_text(tmp_path, original)
    assert "\n" not in text.replace("\r\n", "")
    assert text.startswith("A=1\r\nML_ACCESS_TOKEN=APP_USR-new-access-fake\r\n")


def test_duplicate_keys_are_all_updated() -> None:
    # A store refuses such a file before saving (below); the renderer still never leaves a
    # stale copy behind.
    text = render_update("ML_REFRESH_TOKEN=a\nX=1\nML_REFRESH_TOKEN=b\n", {"ML_REFRESH_TOKEN": "n"})
    assert text == "ML_REFRESH_TOKEN=n\nX=1\nML_REFRESH_TOKEN=n\n"


def test_duplicate_ml_key_is_refused_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    live = ORIGINAL.replace("LAST=1", "LAST=1\n\n  ML_REFRESH_TOKEN=TG-stale\n")
    path.write_text(live)
    with pytest.raises(mlauth.ConfigError) as caught:
        read_env_file(path)
    assert str(caught.value) == (
        f"{path}: ML_REFRESH_TOKEN is set twice, on lines 8 and 12; delete the stale one "
        "(mlauth reads one value and will not guess which)."
    )
    with pytest.raises(mlauth.ConfigError, match="set twice"):
        EnvFileStore(path).save(NEW)
    assert path.read_text() == live  # nothing spent, nothing written
    # Other keys set twice are the user's business: the last one wins, as python-dotenv says.
    path.write_text("X=1\nX=2\n")
    assert read_env_file(path) == {"X": "2"}


def test_utf8_bom_is_dropped_on_read_and_kept_on_save(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    # A token key on line 1: read with the BOM glued to its name, the save would add it again.
    original = "\ufeff" + ORIGINAL.replace("export ML_ACCESS_TOKEN", "X").replace(
        "# MercadoLibre pipeline", "ML_ACCESS_TOKEN=APP_USR-old-access-fake"
    )
    path.write_bytes(original.encode("utf-8"))
    assert read_env_file(path)["ML_ACCESS_TOKEN"] == "APP_USR-old-access-fake"
    EnvFileStore(path).save(NEW)
    text = path.read_bytes().decode("utf-8")
    assert text.startswith("\ufeffML_ACCESS_TOKEN=APP_USR-new-access-fake\n")
    assert text.count("ML_ACCESS_TOKEN=") == 1
    assert read_env_file(path)["ML_ACCESS_TOKEN"] == "APP_USR-new-access-fake"


def test_dangling_symlink_names_the_missing_target(tmp_path: Path) -> None:
    link = tmp_path / ".env"
    link.symlink_to(tmp_path / "secrets" / "ml.env")
    with pytest.raises(mlauth.ConfigError) as caught:
        read_env_file(link)
    message = str(caught.value)
    assert f"{link} is a symlink to {tmp_path / 'secrets' / 'ml.env'}, which does not exist" in (
        message
    )
    assert "no such .env file" not in message


def test_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    EnvFileStore(path).save(NEW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_symlinked_env_is_followed_and_the_link_kept(tmp_path: Path) -> None:
    real_dir = tmp_path / "secrets"
    real_dir.mkdir()
    target = real_dir / "ml.env"
    target.write_text(ORIGINAL)
    link = tmp_path / ".env"
    link.symlink_to(target)
    store = EnvFileStore(link)
    store.save(NEW)
    assert link.is_symlink()
    assert read_env_file(target)["ML_ACCESS_TOKEN"] == "APP_USR-new-access-fake"
    # The lock sits beside the target, so every link to it shares one lock.
    assert store.lock_path == f"{target}.lock"


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    saved_text(tmp_path, ORIGINAL)
    # The save counter (mlauth.stores.watch) is no temporary file: it stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env", ".env.generation"]


def test_save_replaces_the_inode_so_peers_notice(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text(ORIGINAL)
    store = EnvFileStore(path)
    before = store.stamp()
    after = store.save(NEW)
    assert before != after
    assert store.stamp() == after


def test_missing_env_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / ".env"
    with pytest.raises(mlauth.ConfigError, match=str(missing)):
        EnvFileStore(missing).load()
    with pytest.raises(mlauth.ConfigError, match="never creates it"):
        update_env_file(missing, {"A": "1"})
    assert not missing.exists()


def test_write_failure_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / ".env"
    path.write_text(ORIGINAL)

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(mlauth.StoreError, match="No space left"):
        EnvFileStore(path).save(NEW)
    assert path.read_text() == ORIGINAL
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]


def test_malformed_expiry_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("ML_REFRESH_TOKEN=TG-x\nML_TOKEN_EXPIRES_AT=tomorrow\n")
    with pytest.raises(mlauth.ConfigError, match="ML_TOKEN_EXPIRES_AT='tomorrow'"):
        EnvFileStore(path).load()


@pytest.mark.parametrize("key", ["ML_TOKEN_EXPIRES_AT", "ML_TOKEN_REFRESHED_AT"])
@pytest.mark.parametrize("raw", ["1e400", "nan", "inf", "-inf", "-1", "99999999999999"])
def test_infinite_or_implausible_times_are_refused_naming_the_key(
    tmp_path: Path, key: str, raw: str
) -> None:
    path = tmp_path / ".env"
    path.write_text(f"ML_REFRESH_TOKEN=TG-x\n{key}={raw}\n")
    with pytest.raises(mlauth.ConfigError) as caught:
        EnvFileStore(path).load()
    message = str(caught.value)
    assert str(path) in message and f"{key}={raw!r}" in message
    assert "delete the line" in message


@pytest.mark.parametrize(
    "value",
    ["plain", "with space", "quote'single", 'quote"double', "hash # here", "a=b", "back\\slash"],
)
def test_values_round_trip_through_python_dotenv(tmp_path: Path, value: str) -> None:
    path = tmp_path / ".env"
    for style in ("K=x\n", "K='x'\n", 'K="x"\n'):
        path.write_text("A=1\n" + style)
        update_env_file(path, {"K": value})
        assert read_env_file(path) == {"A": "1", "K": value}


def test_removing_a_key_keeps_the_rest() -> None:
    assert render_update("A=1\nK=2\n\nB=3\n", {"K": None}) == "A=1\n\nB=3\n"


# A refresh transaction on the store, as the engine drives it, in a process of its own (an
# audit hook cannot be removed): every open of the .env and every rename onto it is counted.
_ONE_REFRESH = """
import json, os, sys
from mlauth.secret import Secret
from mlauth.stores.envfile import EnvFileStore
from mlauth.tokens import TokenSet

path = sys.argv[1]
real = os.path.realpath(path)
seen = {"read": 0, "write": 0, "replace": 0}

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        if os.path.realpath(os.fsdecode(args[0])) == real:
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in mode for c in "wa+") or flags & (os.O_WRONLY | os.O_RDWR)
            seen["write" if writes else "read"] += 1
    elif event in ("os.rename", "os.replace"):
        if os.path.realpath(os.fsdecode(args[1])) == real:
            seen["replace"] += 1

store = EnvFileStore(path)
sys.addaudithook(audit)
with store.refresh(5.0) as txn:
    txn.begin(txn.tokens.refresh_token)
    txn.before_attempt()
    txn.commit(TokenSet(Secret("APP_USR-next-access-fake"), Secret("TG-next-refresh-fake"),
                        expires_at=1900000000.0, refreshed_at=1899990000.0))
print(json.dumps(seen))
"""


@pytest.mark.parametrize("write", ["auto", "in-place"])
def test_a_refresh_reads_the_env_twice_under_the_lock_and_writes_it_once(
    tmp_path: Path, write: str
) -> None:
    # The read the lock begins with serves the move check, the tokens and the save probe; the
    # save reads again for its render (a lock-free writer's edit since, invisible to a stat on
    # coarse timestamps, must not be undone) and writes once (a rename, or one descriptor
    # written in place).
    path = tmp_path / ".env"
    path.write_text(f"ML_ENV_WRITE={write}\n{ORIGINAL}\n")
    path.chmod(0o600)
    done = subprocess.run(
        [sys.executable, "-c", _ONE_REFRESH, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    if write == "auto":
        assert seen == {"read": 2, "write": 0, "replace": 1}
    else:
        # Written in place: the inode's lock, the save probe (a read-only mount refuses it)
        # and the write open it for writing; besides the two reads, the journal in its
        # attributes fsyncs the inode through a descriptor of its own after each record
        # (intent, answer) and at the commit.
        assert seen == {"read": 2 + 3, "write": 3, "replace": 0}
    assert read_env_file(path)["ML_REFRESH_TOKEN"] == "TG-next-refresh-fake"


# -- what the read under the lock must not hide (review of issue 19) --------------------------


def test_a_symlink_pointed_elsewhere_while_running_refuses_to_refresh(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    # Its lock, journal and writes are beside the old target: a refresh would spend the new
    # target's token and save the successor into the old file, and the chain would split.
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    fake_ml.write_env(first)
    fake_ml.write_env(second)
    link = tmp_path / ".env"
    link.symlink_to(first)
    auth = mlauth.MLAuth.from_env(link)
    link.unlink()
    link.symlink_to(second)
    before = second.read_bytes(), first.read_bytes()
    with pytest.raises(mlauth.StoreError, match=r"now points to .*b\.env.*Restart"):
        auth.refresh()
    assert fake_ml.stats()["refreshes"] == 0
    assert (second.read_bytes(), first.read_bytes()) == before


def test_a_chmod_during_the_refresh_is_kept_by_its_save(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    fake_ml_env.chmod(0o644)
    auth = mlauth.MLAuth.from_env(fake_ml_env)
    fake_ml.token_delay = 0.5  # the POST is in flight while the user tightens the file

    def tighten() -> None:
        assert fake_ml.token_requests_in_flight.wait(10)
        fake_ml_env.chmod(0o600)

    user = threading.Thread(target=tighten)
    user.start()
    auth.refresh()
    user.join()
    assert fake_ml.stats()["refreshes"] == 1
    assert stat.S_IMODE(fake_ml_env.stat().st_mode) == 0o600


def test_a_save_under_the_lock_keeps_an_edit_a_stat_cannot_see(tmp_path: Path) -> None:
    # A writer that takes no lock rewrites the file in place at the same size within one
    # timestamp tick (coarse timestamps: older kernels, FAT, NFS): inode, size and mtime are
    # as the lock's read found them. The save must not render over that read.
    path = tmp_path / ".env"
    path.write_text(ORIGINAL + "\nOTHER=A\n")
    store = EnvFileStore(path)
    with store.lock(5.0):
        store.load()
        before = path.stat()
        with open(path, "r+b") as handle:  # in place: same inode, same size
            handle.write(path.read_bytes().replace(b"OTHER=A", b"OTHER=B"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns
        store.save(NEW)
    assert read_env_file(path)["OTHER"] == "B"
    assert read_env_file(path)["ML_REFRESH_TOKEN"] == "TG-new-refresh-fake"
