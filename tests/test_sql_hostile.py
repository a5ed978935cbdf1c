"""The SQL store of many sellers against hostile files and rows: a link planted where the
database (or its -wal, -shm) goes, and rows edited by hand with values of every kind. Each
is a StoreError (or a ConfigError) naming the file or the row and the fix; never a crash,
never the value."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth.errors import MLAuthError, StoreError
from mlauth.stores.sql import SqlSellers
from mlauth.testing import FakeMercadoLibre
from tests.support.sql_sellers import Db, seed, tokens_of


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


@pytest.fixture
def db(sql_db: Db) -> Db:
    return sql_db


@pytest.fixture
def sellers(db: Db, fake: FakeMercadoLibre) -> Iterator[SqlSellers]:
    stores = db.open(fake.client_id)
    yield stores
    stores.close()


# -- files ------------------------------------------------------------------------------------


def test_the_database_is_created_private(tmp_path: Path, fake: FakeMercadoLibre) -> None:
    os.umask(0o022)
    path = tmp_path / "sellers.db"
    sellers = SqlSellers.sqlite(path, client_id=fake.client_id)
    seed(sellers, fake, 111)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        companion = Path(f"{path}{suffix}")
        assert not companion.exists() or stat.S_IMODE(companion.stat().st_mode) == 0o600
    sellers.close()


def test_a_loose_database_is_made_private_before_it_is_written(
    tmp_path: Path, fake: FakeMercadoLibre
) -> None:
    path = tmp_path / "sellers.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    sellers = SqlSellers.sqlite(path, client_id=fake.client_id)
    seed(sellers, fake, 111)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sellers.close()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_link_planted_at_the_database_is_refused_naming_it(
    suffix: str, tmp_path: Path, fake: FakeMercadoLibre
) -> None:
    path = tmp_path / "sellers.db"
    target = tmp_path / "victim"
    target.write_bytes(b"someone else's file")
    os.symlink(target, f"{path}{suffix}")
    sellers = SqlSellers.sqlite(path, client_id=fake.client_id)
    with pytest.raises(StoreError) as caught:
        sellers.sellers()
    message = str(caught.value)
    assert f"{path}{suffix}" in message and "symbolic link" in message
    assert f"rm {path}{suffix}" in message
    assert target.read_bytes() == b"someone else's file"
    sellers.close()


def test_a_link_planted_after_the_first_connection_is_refused_by_the_next(
    tmp_path: Path, fake: FakeMercadoLibre
) -> None:
    path = tmp_path / "sellers.db"
    sellers = SqlSellers.sqlite(path, client_id=fake.client_id)
    seed(sellers, fake, 111)
    sellers.close()
    os.rename(path, tmp_path / "moved.db")
    os.symlink(tmp_path / "moved.db", path)
    again = SqlSellers.sqlite(path, client_id=fake.client_id)
    with pytest.raises(StoreError, match="symbolic link"):
        again.store("111")
    again.close()


def test_a_database_of_another_schema_version_is_refused(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    db.execute("UPDATE mlauth_schema SET version = 99")
    again = db.open(fake.client_id)
    with pytest.raises(StoreError, match=r"schema version 99\b.*Upgrade mlauth"):
        again.sellers()
    again.close()


# -- rows edited by hand ------------------------------------------------------------------------

SECRETISH = "hand-typed-value-not-a-token"
# Every kind of value a hand (or another program) can put in a column: SQL NULL, the JSON
# types as SQLite stores them (true is 1), text that is JSON, bytes, extremes.
ODD_VALUES: list[object] = [
    None,
    1,
    0,
    -1,
    1.5,
    -1e308,
    1e308,
    2**63 - 1,
    "",
    SECRETISH,
    f"TG-{SECRETISH}\r\nX-Injected: 1",
    "[1, 2]",
    '{"refresh_token": "TG-x"}',
    "null",
    "true",
    "NaN",
    b"\xff\x00binary",
]
COLUMNS = [
    "chain",
    "generation",
    "access_token",
    "refresh_token",
    "expires_at",
    "refreshed_at",
    "refreshed_by",
    "answer",
    "dead",
    "failing_since",
    "failing_reason",
]


def _judge(action: str, call: object) -> str | None:
    """Run ``call``; its MLAuthError's text (None if it passed). Anything else fails."""
    try:
        call()  # type: ignore[operator]
    except MLAuthError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("column", COLUMNS)
def test_a_row_edited_by_hand_is_read_or_refused_by_name_never_crashes_or_leaks(
    column: str, db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111)
    seed(sellers, fake, 222)
    refused = 0
    for value in ODD_VALUES:
        if not db.edit("111", column, value):
            # Refused by the database itself (NOT NULL, or a typed PostgreSQL column).
            assert db.kind == "postgresql" or value is None, value
            continue
        fresh = db.open(fake.client_id)  # no cached version: every read is a real look
        store = fresh.store("111")
        for action, call in (
            ("load", store.load),
            ("stamp", store.stamp),
            ("status", store.status_details),
            ("reauthorization", store.reauthorization_required),
            ("rows", fresh.rows),
        ):
            text = _judge(action, call)
            if text is None:
                continue
            refused += 1
            assert "seller 111" in text, (action, value, text)
            assert SECRETISH not in text, (action, value)
        # The other seller's row is untouched and its line is whole.
        assert [row.user_id for row in fresh.rows()] == ["111", "222"]
        assert fresh.store("222").load()[0].refresh_token is not None
        fresh.close()
    if column in ("chain", "generation", "refresh_token", "expires_at", "refreshed_at"):
        assert refused > 0  # mlauth cannot have written most of those values


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("refresh_token", f"TG-{SECRETISH}\r\nX-Injected: 1"),
        ("refresh_token", b"TG-binary\xff"),
        ("generation", "twelve"),
        ("generation", -5),
        ("expires_at", "tomorrow"),
        ("expires_at", "NaN"),
        ("expires_at", "-Infinity"),
        ("chain", ""),
    ],
)
def test_a_request_on_a_row_edited_by_hand_fails_with_the_row_and_the_fix(
    column: str, value: object, db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111, expires_at=time.time() - 10)
    if not db.edit("111", column, value):
        assert db.kind == "postgresql"  # a typed column refused it: nothing to read
        return

    def request() -> None:  # refused at the first load, or at the request's refresh
        auth = mlauth.MLAuth(
            fake.client_id,
            fake.client_secret,
            store=sellers.store("111"),
            token_url=fake.token_url,
            hosts=[fake.host],
        )
        requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)

    with pytest.raises(StoreError) as caught:
        request()
    message = str(caught.value)
    assert f"row of seller 111 (client {fake.client_id})" in message
    assert "never writes" in message and "value is not shown" in message
    assert SECRETISH not in message and "X-Injected" not in message
    assert fake.stats()["token_requests"] == 0  # nothing was spent on a row in doubt


def test_a_kept_answer_of_every_json_type_is_ignored_or_replayed_never_a_crash(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    seed(sellers, fake, 111, expires_at=time.time() - 10)
    auth = mlauth.MLAuth(
        fake.client_id,
        fake.client_secret,
        store=sellers.store("111"),
        token_url=fake.token_url,
        hosts=[fake.host],
    )
    (chain,) = db.row("111", "chain")
    for answer in [
        "null",
        "[]",
        "7",
        '"text"',
        "{",
        f'{{"chain": "{chain}", "generation": 1}}',
        f'{{"chain": "{chain}", "generation": 1, "body": 5}}',
        f'{{"chain": "{chain}", "generation": 1, "body": "{{}}", "spent": []}}',
    ]:
        db.edit("111", "answer", answer)
        db.edit("111", "expires_at", time.time() - 10)
        response = requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)
        assert response.status_code == 200, answer
    assert fake.stats()["invalid_grant"] == 0


def test_a_database_error_on_a_save_never_quotes_the_row(db: Db, fake: FakeMercadoLibre) -> None:
    # A rule someone added to the table refuses the save. PostgreSQL's error then carries
    # the failing row (the tokens) in its DETAIL; SQLite's names what the rule says.
    if db.kind == "postgresql":
        # The user in the query: a URL's user information is masked, and so is every
        # message that quotes it (the user "mlauth" is in the table's name), which would
        # hide the driver's words this test is about.
        user, _, rest = db.spec.removeprefix("postgresql://").partition("@")
        db = Db("postgresql", f"postgresql://{rest}?user={user}")
    sellers = db.open(fake.client_id)
    seed(sellers, fake, 111)
    store = sellers.store("111")
    _, version = store.load()
    if db.kind == "postgresql":
        db.execute(
            "ALTER TABLE mlauth_sellers ADD CONSTRAINT short CHECK (length(refresh_token) < 5) "
            "NOT VALID"
        )
    else:
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON mlauth_sellers "
            "BEGIN SELECT RAISE(ABORT, 'refused by a rule'); END"
        )
    new = fake.issue_tokens(user_id=111)
    with pytest.raises(StoreError) as caught:
        store.save(tokens_of(new), replaces=version)
    message = str(caught.value)
    sellers.close()
    assert "cannot save the tokens to" in message and db.kind in message.lower()
    assert "violates check constraint" in message or "refused by a rule" in message
    assert str(new["refresh_token"]) not in message
    assert str(new["access_token"]) not in message
    # Nor do the frames a crash reporter would send (this test's own is the first).
    frames = [frame for frame, _ in traceback.walk_tb(caught.value.__traceback__)][1:]
    assert frames and all(str(new["refresh_token"]) not in repr(f.f_locals) for f in frames)


def _locked_elsewhere(path: str, offset: int) -> bool:
    """Whether another process finds the byte at ``offset`` of ``path`` locked (POSIX)."""
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]))\n"
        "except OSError:\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, path, str(offset)], check=False)
    return done.returncode == 3


def test_a_new_connection_keeps_every_lock_this_process_holds_on_the_files(
    tmp_path: Path, fake: FakeMercadoLibre
) -> None:
    # SQLite's locks are POSIX locks on the database and on -shm (WAL's), which a process
    # loses on a file when it closes any descriptor of that file. The checks made before
    # each new connection must never open and close either. (SQLite locks nothing in -wal,
    # and closes its own descriptor of it with the connection.)
    path = tmp_path / "sellers.db"
    sellers = SqlSellers.sqlite(path, client_id=fake.client_id)
    seed(sellers, fake, 111)  # the database, -wal and -shm exist now
    offset = 2**40  # far from the bytes SQLite locks
    held = []
    for name in (str(path), f"{path}-shm"):
        fd = os.open(name, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        held.append((name, fd))
    try:
        assert all(_locked_elsewhere(name, offset) for name, _ in held)
        thread = threading.Thread(target=sellers.sellers)  # a thread's first connection
        thread.start()
        thread.join()
        assert [name for name, _ in held if not _locked_elsewhere(name, offset)] == []
    finally:
        for _, fd in held:
            os.close(fd)
        sellers.close()


def test_a_token_written_into_refreshed_by_is_never_shown(
    db: Db, sellers: SqlSellers, fake: FakeMercadoLibre
) -> None:
    issued = seed(sellers, fake, 111)
    token = str(issued["refresh_token"])
    for by in (f"a script holding {token}", f"pid 12@{token}", "pid 12@worker-3"):
        db.edit("111", "refreshed_by", by)
        fresh = db.open(fake.client_id)
        (row,) = fresh.rows()
        shown = [row.refreshed_by, fresh.store("111").load()[0].refreshed_by]
        fresh.close()
        assert all(value is not None and token not in value for value in shown), by
        assert by != "pid 12@worker-3" or shown == [by, by]
