"""A throwaway PostgreSQL server for tests: a free loopback port, its own folder and unix socket,
stopped at the end (and at interpreter exit, if a test forgot). mlauth's own tests start one per
session and give each test a fresh database; your tests can too::

    server = PostgresServer().start()
    try:
        with server.fresh_database() as url:  # postgresql://mlauth@127.0.0.1:PORT/NAME
            ...
    finally:
        server.stop()

It needs PostgreSQL's server programs, ``initdb`` and ``postgres`` (Debian's ``postgresql``
package; they are looked for on PATH, then in ``pg_config --bindir``, then in Debian's
``/usr/lib/postgresql/VERSION/bin``), and psycopg (``pip install 'mlauth[postgresql]'``) for
databases and connections. psycopg is imported only when a database is made or a connection
asked for, so this module imports without it: :func:`unavailable` says what is missing.

PostgreSQL refuses to run as root. Run as root (CI is), the server runs as ``nobody``: its data
folder and socket folder are given to ``nobody``, so the folder they are in (and every folder
above it) must be one ``nobody`` may go through. Without a folder, the server makes its own
under the system's temporary folder (pytest's ``tmp_path`` is private to root: not that one).

The server is tuned to start fast and to lose its data on a crash of the machine (fsync off):
a test server, never a model for a real one.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlauth.testing.redis_server import free_port

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresServer", "find_bindir", "unavailable"]

INSTALL_SERVER = (
    "install Debian's postgresql package (`apt-get install postgresql`; mlauth's `make test` "
    "does), or put the folder holding initdb and postgres on PATH"
)
INSTALL_CLIENT = "pip install 'mlauth[postgresql]'"
PROGRAMS = ("initdb", "postgres")
# Where Debian's packages put the server programs (one folder per major version); they are not
# on PATH there.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "mlauth"
# Settings for a fast, small, disposable server: no fsync (a test server may lose its data
# with the machine), no WAL beyond what recovery from a crash of the server itself needs, logs
# on stderr (into postgres.log), no TCP but loopback.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "shared_buffers": "16MB",
    "logging_collector": "off",
    # Files in the data folder, not /dev/shm (small in containers: 64 MB under Docker).
    "dynamic_shared_memory_type": "mmap",
}


def _candidates() -> Iterator[Path]:
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder:
            yield Path(folder)
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(  # noqa: S603 (pg_config on PATH, a fixed argument)
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            yield Path(done.stdout.strip())
    # The newest major version first (numerically: 9.6 is older than 15).
    versions = [
        path for path in DEBIAN_ROOT.glob("*/bin") if re.fullmatch(r"[\d.]+", path.parent.name)
    ]
    versions.sort(
        key=lambda path: [int(part) for part in path.parent.name.split(".")], reverse=True
    )
    yield from versions


def find_bindir() -> Path:
    """The folder holding ``initdb`` and ``postgres`` (both, from one installation); a
    RuntimeError naming what is missing and how to install it when there is none."""
    for folder in _candidates():
        if all(os.access(folder / name, os.X_OK) for name in PROGRAMS):
            return folder
    raise RuntimeError(
        "PostgreSQL's server programs (initdb, postgres) are not installed: not on PATH, not in "
        f"`pg_config --bindir`, not in {DEBIAN_ROOT}/VERSION/bin; {INSTALL_SERVER}"
    )


def unavailable() -> str | None:
    """Why a PostgreSQL server cannot be run here (what is missing and how to get it), or None."""
    try:
        find_bindir()
    except RuntimeError as error:
        return str(error)
    if importlib.util.find_spec("psycopg") is None:
        return f"the psycopg package is not installed: {INSTALL_CLIENT}"
    return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the postmaster's backends and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # The command name is in parentheses and may hold spaces: the parent pid is the
            # second field after the last ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


# The servers started by this process, stopped at its exit if a caller forgot (a forked child
# that exits must not stop its parent's: each server remembers which process started it).
_running: set[PostgresServer] = set()


@atexit.register
def _stop_forgotten() -> None:
    for server in list(_running):
        if server.owner == os.getpid():
            server.stop()


class PostgresServer:
    """``postgres`` in the foreground on 127.0.0.1 and on a unix socket in its folder.

    Without ``folder`` it makes one of its own (removed by :meth:`stop`); with one, it keeps
    its data there (``data/``, ``socket/``, ``postgres.log``), so a :meth:`restart` keeps the
    databases.
    """

    def __init__(self, folder: Path | None = None, *, max_connections: int = 100) -> None:
        self.bindir = find_bindir()
        self.own_folder = folder is None
        self.folder = (
            Path(tempfile.mkdtemp(prefix="mlauth-postgres-")) if folder is None else folder
        )
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "socket"
        self.max_connections = max_connections
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.owner = os.getpid()
        # PostgreSQL refuses root: as root, the server is nobody's.
        self.user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    def __repr__(self) -> str:
        return f"PostgresServer({str(self.folder)!r}, port={self.port})"

    @property
    def url(self) -> str:
        """The server's own database (``postgres``), over loopback TCP."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def socket_url(self) -> str:
        """The ``postgres`` database over the unix socket in the server's folder."""
        return f"postgresql://{SUPERUSER}@/postgres?host={self.socket_dir}&port={self.port}"

    # -- starting and stopping -------------------------------------------------------------

    def _run(self, command: list[str], **options: Any) -> subprocess.Popen[bytes]:
        """Start ``command`` in the server's folder, as nobody when this process is root."""
        user = self.user
        return subprocess.Popen(  # noqa: S603 (PostgreSQL's own programs, our own arguments)
            command,
            cwd=self.folder,
            stdin=subprocess.DEVNULL,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
            **options,
        )

    def _prepare_folders(self) -> None:
        if self.own_folder:
            self.folder.chmod(0o755)  # mkdtemp makes it 0700: nobody could not go through
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            folder = self.folder.resolve()
            for path in (folder, *folder.parents):
                self._check_reachable(path)
        self.socket_dir.mkdir(exist_ok=True)
        self.data.mkdir(mode=0o700, exist_ok=True)
        if self.user is not None:
            for path in (self.data, self.socket_dir):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _check_reachable(self, path: Path) -> None:
        assert self.user is not None
        info = path.stat()
        mode = info.st_mode
        if not (
            mode & stat.S_IXOTH
            or (info.st_uid == self.user.pw_uid and mode & stat.S_IXUSR)
            or (info.st_gid == self.user.pw_gid and mode & stat.S_IXGRP)
        ):
            raise RuntimeError(
                f"the PostgreSQL server runs as nobody (PostgreSQL refuses root), and nobody "
                f"may not go through {path} (mode {stat.filemode(mode)}) to reach "
                f"{self.folder}: give PostgresServer a folder under one it may (or none: "
                "it then makes its own in the system's temporary folder)"
            )

    def _initdb(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return  # made by an earlier start: a restart keeps the databases
        command = [
            str(self.bindir / "initdb"),
            *("--pgdata", str(self.data), "--username", SUPERUSER, "--auth", "trust"),
            *("--encoding", "UTF8", "--no-locale", "--no-sync", "--no-instructions"),
        ]
        with self._run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            said = output.decode(errors="replace")[-1500:]
            raise RuntimeError(f"initdb failed (exit {proc.returncode}): {said}")

    def start(self) -> PostgresServer:
        if self.proc is not None:
            raise RuntimeError(f"{self!r} is already running")
        try:
            self._prepare_folders()
            self._initdb()
            # The port is free when chosen but may be taken before postgres binds it: again.
            for _ in range(3):
                self.port = free_port()
                if self._launch():
                    _running.add(self)
                    return self
            raise RuntimeError(f"postgres could not bind a free port; its log: {self._log_tail()}")
        except BaseException:
            self.stop()  # nothing left running, and a folder of its own removed
            raise

    def _log_tail(self) -> str:
        try:
            return (self.folder / "postgres.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _launch(self) -> bool:
        """Start postgres and wait until it accepts connections; False if the port was taken."""
        settings = {
            **SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(self.max_connections),
        }
        command = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with (self.folder / "postgres.log").open("ab") as log:
            # In the caller's process group: a Ctrl-C at the terminal reaches it too (SIGINT is
            # PostgreSQL's fast shutdown).
            self.proc = self._run(command, stdout=log, stderr=log)
        # postmaster.pid's eighth line is the server's state: "ready" once it accepts connections.
        pid_file = self.data / "postmaster.pid"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if (
                    len(lines) >= 8
                    and lines[0] == str(self.proc.pid)
                    and lines[7].strip() == "ready"
                ):
                    return True
            if self.proc.poll() is not None:
                self.proc = None
                log_tail = self._log_tail()
                if "could not bind" in log_tail and "Address already in use" in log_tail:
                    return False
                raise RuntimeError(f"postgres exited while starting; its log: {log_tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"postgres was not ready within 60 s; its log: {self._log_tail()}"
                )
            time.sleep(0.01)  # polling for readiness, with a deadline

    def stop(self) -> None:
        """Stop the server (a fast shutdown: clients are disconnected) and every process it
        started; then remove its folder if it made its own."""
        if os.getpid() != self.owner:
            # A forked child holds a copy of this object, not the server: the parent stops it.
            raise RuntimeError(f"{self!r} was started by process {self.owner}: stop it there")
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # fast shutdown (SIGTERM would wait for clients)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # Its backends first: killed alone, the postmaster would leave them to notice.
                for child in _children(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                proc.kill()
                proc.wait()
        if self.own_folder and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)

    def restart(self) -> None:
        if self.own_folder:
            raise RuntimeError("a server in a folder of its own loses it at stop: give a folder")
        self.stop()
        self.start()

    # -- databases and connections ---------------------------------------------------------

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A psycopg connection (autocommit) to ``database`` over loopback TCP."""
        import psycopg

        return psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        """A new, empty database; its name."""
        from psycopg import sql

        name = f"mlauth_test_{secrets.token_hex(6)}"
        # About 0.15 s here (a server per test would cost 1 s); template0 is the empty one.
        create = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
        with self.connect() as conn:
            conn.execute(create)
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still connected to it."""
        from psycopg import sql

        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        with self.connect() as conn:
            conn.execute(drop)

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new, empty database for the block (its URL), dropped after it."""
        name = self.create_database()
        try:
            yield self.url_for(name)
        finally:
            self.drop_database(name)
