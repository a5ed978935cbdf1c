"""A damaged, odd or unwritable store: a clear error before anything is spent, or it just works.

The read-only folder and the full disk are real: a small tmpfs mounted for the test (root may
mount one; chmod would not stop root from writing). Where mounting is not permitted, those
tests are skipped with the reason; nothing is simulated behind their names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path

import pytest
import requests

import mlauth
import mlauth.engine
import mlauth.integrations.requests_auth
from mlauth.stores.envfile import read_env_file
from mlauth.stores.journal import Journal
from mlauth.stores.lock import ProcessLock
from mlauth.testing import FakeMercadoLibre
from tests.support.mounts import remount_read_only, tmpfs


def call(fake: FakeMercadoLibre, auth: mlauth.MLAuth) -> requests.Response:
    return requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)


def write_expired(fake: FakeMercadoLibre, path: Path, **kwargs: object) -> dict[str, object]:
    return fake.write_env(path, expires_at=time.time() - 10, **kwargs)  # type: ignore[arg-type]


# -- odd or damaged files -------------------------------------------------------------------


def test_a_missing_env_is_a_clear_error_and_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(mlauth.ConfigError, match=r"no such \.env file"):
        mlauth.MLAuth.from_env(tmp_path / ".env")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_env_names_the_missing_key(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("")
    with pytest.raises(mlauth.ConfigError, match="ML_CLIENT_ID"):
        mlauth.MLAuth.from_env(tmp_path / ".env")
    assert (tmp_path / ".env").read_text() == ""


def test_malformed_lines_are_kept_as_they_are(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    write_expired(fake_ml, env)
    junk = "this line is not an assignment\n=no key\n'unterminated\n"
    env.write_text(junk + env.read_text())
    auth = mlauth.MLAuth.from_env(env)
    assert call(fake_ml, auth).status_code == 200
    assert env.read_text().startswith(junk)
    assert fake_ml.stats()["refreshes"] == 1


def test_duplicate_token_keys_are_refused_before_anything_is_spent(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    write_expired(fake_ml, env)
    # python-dotenv lets the last line win: a stale token there would be spent for nothing.
    env.write_text(f"{env.read_text()}ML_REFRESH_TOKEN=TG-an-old-line-fake\n")
    before = env.read_text()
    with pytest.raises(mlauth.ConfigError, match="ML_REFRESH_TOKEN is set twice, on lines 4 and"):
        mlauth.MLAuth.from_env(env)
    assert env.read_text() == before
    assert fake_ml.stats()["token_requests"] == 0


def test_crlf_line_endings_survive_a_refresh(fake_ml: FakeMercadoLibre, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    write_expired(fake_ml, env, extra={"OTHER": "kept"})
    env.write_bytes(env.read_bytes().replace(b"\n", b"\r\n"))
    auth = mlauth.MLAuth.from_env(env)
    assert call(fake_ml, auth).status_code == 200
    raw = env.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n")  # every line still ends in CRLF
    assert read_env_file(env)["OTHER"] == "kept"
    assert call(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200


def test_a_symlinked_env_stays_a_link_and_its_files_sit_by_the_target(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    real_dir, link_dir = tmp_path / "secrets", tmp_path / "project"
    real_dir.mkdir()
    link_dir.mkdir()
    write_expired(fake_ml, real_dir / "ml.env")
    (link_dir / ".env").symlink_to(real_dir / "ml.env")
    auth = mlauth.MLAuth.from_env(link_dir / ".env")
    assert call(fake_ml, auth).status_code == 200
    assert (link_dir / ".env").is_symlink()
    live = auth.tokens.refresh_token
    assert live is not None
    assert read_env_file(real_dir / "ml.env")["ML_REFRESH_TOKEN"] == live.reveal()
    assert sorted(p.name for p in link_dir.iterdir()) == [".env"]
    assert {"ml.env.lock", "ml.env.journal"} <= {p.name for p in real_dir.iterdir()}


# -- the lock ---------------------------------------------------------------------------------


def test_a_lock_held_past_the_timeout_fails_clearly_and_spends_nothing(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    write_expired(fake_ml, env)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with ProcessLock(f"{env}.lock").hold(timeout=5):
            held.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        auth = mlauth.MLAuth.from_env(env, lock_timeout=0.3)
        with pytest.raises(mlauth.LockTimeoutError, match="fuser -v") as caught:
            call(fake_ml, auth)
    finally:
        done.set()
        holder.join()
    assert caught.value.lock_path == f"{env}.lock"
    assert fake_ml.stats()["token_requests"] == 0
    assert call(fake_ml, auth).status_code == 200  # once the holder is gone


# -- real read-only folder and full disk -------------------------------------------------------


def test_read_only_folder_refuses_before_spending_and_keeps_working(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "ro", "1m") as folder:
        env = folder / ".env"
        write_expired(fake_ml, env)
        before = env.read_bytes()
        remount_read_only(folder)
        with pytest.raises(OSError, match="Read-only"):
            (folder / "probe").write_text("x")  # the mount really refuses root
        auth = mlauth.MLAuth.from_env(env)
        with pytest.raises(mlauth.StoreError, match="writable") as caught:
            call(fake_ml, auth)
        assert "Read-only file system" in str(caught.value)
        assert fake_ml.stats()["token_requests"] == 0  # refused before spending
        assert env.read_bytes() == before
        assert mlauth.reauthorization_required(mlauth.EnvFileStore(env)) is None


def fill(folder: Path) -> None:
    """Write until the file system is full (ENOSPC), in ever smaller pieces."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
        with pytest.raises(OSError, match="No space left") as full:
            os.write(fd, b"\0")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_journal_append_cut_short_by_a_full_disk_is_undone(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "full", "256k") as folder:
        journal = Journal(str(folder / ".env"))
        # One whole record, padded so the file ends 5 bytes before a page boundary: on a
        # full tmpfs the next append writes those 5 bytes and then fails (a short write).
        record = b'{"kind":"commit","spent":"sha256:0"}\n'
        before = record + b" " * (4096 - 5 - len(record) - 1) + b"\n"
        Path(journal.path).write_bytes(before)
        fill(folder)
        with pytest.raises(mlauth.StoreError, match="free disk space"):
            journal.intent(mlauth.Secret("TG-fake-token-1"))
        assert Path(journal.path).read_bytes() == before
        (folder / "filler").unlink()
        assert journal.intent(mlauth.Secret("TG-fake-token-1")) is None
        assert [r["kind"] for r in journal.records()] == ["commit", "intent"]


def test_full_disk_refuses_before_spending_then_recovers_when_space_returns(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "full", "256k") as folder:
        env = folder / ".env"
        write_expired(fake_ml, env)
        auth = mlauth.MLAuth.from_env(env)
        before = env.read_bytes()
        fill(folder)
        with pytest.raises(mlauth.StoreError, match="free disk space"):
            call(fake_ml, auth)
        assert fake_ml.stats()["token_requests"] == 0
        assert env.read_bytes() == before
        for path in folder.iterdir():
            if path.name == "filler":
                path.unlink()
        assert call(fake_ml, auth).status_code == 200
        assert fake_ml.stats()["refreshes"] == 1
        assert os.stat(env).st_mode & 0o777 == 0o600


def test_disk_full_after_the_check_keeps_tokens_in_memory_until_space_comes_back(
    fake_ml: FakeMercadoLibre,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlauth.endpoint import TokenEndpoint

    monkeypatch.setattr(mlauth.engine, "PERSIST_RETRY_DELAY", 0.0)
    with tmpfs(tmp_path / "full", "256k") as folder:
        env = folder / ".env"
        write_expired(fake_ml, env)
        before = env.read_bytes()
        original = TokenEndpoint.refresh

        def refresh_as_the_disk_fills(self: TokenEndpoint, *args: object, **kw: object) -> object:
            fill(folder)  # another program takes the last bytes while our POST is out
            return original(self, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(TokenEndpoint, "refresh", refresh_as_the_disk_fills)
        auth = mlauth.MLAuth.from_env(env)
        assert call(fake_ml, auth).status_code == 200  # served from memory
        assert env.read_bytes() == before
        assert "keeps them in memory and retries saving" in caplog.text
        live = auth.tokens.refresh_token
        assert live is not None and live.reveal() not in caplog.text

        (folder / "filler").unlink()  # space comes back: the next call saves at last
        monkeypatch.setattr(TokenEndpoint, "refresh", original)
        assert call(fake_ml, auth).status_code == 200
        assert read_env_file(env)["ML_REFRESH_TOKEN"] == live.reveal()
        assert fake_ml.stats()["refreshes"] == 1 and fake_ml.stats()["invalid_grant"] == 0
