"""The PostgreSQL server the tests start (mlauth/testing/postgres_server.py): it starts, takes
psycopg connections over loopback and its own socket, gives each test an empty database of its
own, runs as nobody under root, leaves no process behind, and says how to install what is
missing."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mlauth.testing import postgres_server
from mlauth.testing.postgres_server import PostgresServer, find_bindir, unavailable


def public_tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return sorted(name for (name,) in rows)


def databases(server: PostgresServer) -> set[str]:
    with server.connect() as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database")}


def processes_mentioning(text: str) -> list[int]:
    """The live processes whose command line holds ``text`` (the server's data folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue  # gone meanwhile
            if text.encode() in command:
                found.append(int(entry.name))
    return found


def uid_of(pid: int) -> int:
    (line,) = [
        x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:")
    ]
    return int(line.split()[1])


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder nobody may go through (pytest's tmp_path is root's alone), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="mlauth-test-postgres-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


# -- connections ----------------------------------------------------------------------------


def test_psycopg_connects_over_loopback_tcp_and_over_the_servers_own_socket(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT current_database(), current_user, inet_server_addr()::text")
        assert row.fetchone() == (postgres_url.rsplit("/", 1)[1], "mlauth", "127.0.0.1/32")
    assert postgres_url.startswith(f"postgresql://mlauth@127.0.0.1:{postgres_server.port}/")
    # The unix socket is in the server's folder, not in /var/run/postgresql.
    assert (postgres_server.socket_dir / f".s.PGSQL.{postgres_server.port}").is_socket()
    with psycopg.connect(postgres_server.socket_url) as conn:
        assert conn.execute("SELECT inet_server_addr()").fetchone() == (None,)  # not TCP


def test_the_server_runs_as_nobody_under_root_and_as_this_user_otherwise(
    postgres_server: PostgresServer,
) -> None:
    assert postgres_server.proc is not None
    expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert uid_of(postgres_server.proc.pid) == expected


# -- a database per test --------------------------------------------------------------------


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_an_empty_database_of_its_own(postgres_url: str, turn: str) -> None:
    # Both turns make the same table: the second would find the first's (and CREATE TABLE
    # would fail) if the database were shared or kept.
    assert public_tables(postgres_url) == []
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE marks (turn text)")
        conn.execute("INSERT INTO marks VALUES (%s)", (turn,))
    assert public_tables(postgres_url) == ["marks"]


def test_two_fresh_databases_do_not_see_each_others_tables(
    postgres_server: PostgresServer,
) -> None:
    with postgres_server.fresh_database() as one, postgres_server.fresh_database() as two:
        assert one != two
        with psycopg.connect(one) as conn:
            conn.execute("CREATE TABLE only_in_one (x int)")
        assert public_tables(one) == ["only_in_one"]
        assert public_tables(two) == []


def test_a_fresh_database_is_dropped_after_its_block_even_with_a_client_still_connected(
    postgres_server: PostgresServer,
) -> None:
    with postgres_server.fresh_database() as url:
        name = url.rsplit("/", 1)[1]
        assert name in databases(postgres_server)
        lingering = psycopg.connect(url)  # a test that forgot to close its connection
    try:
        assert name not in databases(postgres_server)
        with pytest.raises(psycopg.OperationalError):  # it was disconnected by the drop
            lingering.execute("SELECT 1")
    finally:
        lingering.close()


def test_a_restart_keeps_the_databases_of_a_server_in_a_given_folder(
    shared_folder: Path,
) -> None:
    server = PostgresServer(shared_folder).start()
    try:
        name = server.create_database()
        with psycopg.connect(server.url_for(name)) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (7)")
        server.restart()
        with psycopg.connect(server.url_for(name)) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(7,)]
    finally:
        server.stop()


# -- nothing left running -------------------------------------------------------------------


def test_stop_ends_the_server_and_its_backends_and_removes_its_own_folder() -> None:
    server = PostgresServer().start()
    assert server.proc is not None
    client = server.connect()  # a backend process serves it
    try:
        assert processes_mentioning(str(server.data)) == [server.proc.pid]
        pids = [server.proc.pid, *postgres_server._children(server.proc.pid)]
        assert client.info.backend_pid in pids
        server.stop()
        assert processes_mentioning(str(server.data)) == []
        assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
        assert not server.folder.exists()
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
    finally:
        client.close()
        server.stop()


@pytest.mark.processes
def test_a_server_left_running_stops_when_its_process_exits_but_not_when_a_fork_does(
    tmp_path: Path,
) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from mlauth.testing.postgres_server import PostgresServer

        server = PostgresServer().start()
        print(server.folder, flush=True)
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # runs the atexit handlers the child inherited: not its server
        os.waitpid(pid, 0)
        with server.connect() as conn:
            print(conn.execute("SELECT 'alive after the fork exited'").fetchone()[0])
        # and exits without stopping it
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    folder, said = done.stdout.splitlines()
    assert said == "alive after the fork exited"
    assert processes_mentioning(folder) == []
    assert not Path(folder).exists()


# -- what is missing ------------------------------------------------------------------------


def program(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\nexit 1\n")
    (folder / name).chmod(0o755)


def test_missing_server_programs_are_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # initdb alone on PATH is not an installation: postgres must be beside it.
    program(tmp_path / "bin", "initdb")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no pg_config there either
    monkeypatch.setattr(postgres_server, "DEBIAN_ROOT", tmp_path / "no-debian")
    with pytest.raises(RuntimeError) as caught:
        PostgresServer()
    message = str(caught.value)
    assert "(initdb, postgres) are not installed" in message
    assert "apt-get install postgresql" in message
    assert "make test" in message
    assert unavailable() == message


def test_debian_folders_are_searched_when_path_lacks_the_programs_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib-postgresql"
    for version in ("9.6", "15"):
        for name in ("initdb", "postgres"):
            program(root / version / "bin", name)
    program(root / "16" / "bin", "initdb")  # a half-removed newer version: not that one
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(postgres_server, "DEBIAN_ROOT", root)
    assert find_bindir() == root / "15" / "bin"


def test_as_root_a_folder_nobody_cannot_go_through_is_refused_with_the_fix(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root's server runs as nobody (CI runs as root)")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(RuntimeError) as caught:
        PostgresServer(private / "pg").start()
    message = str(caught.value)
    assert f"nobody may not go through {private} (mode drwx------)" in message
    assert "give PostgresServer a folder under one it may" in message
    assert not (private / "pg" / "data").exists()
