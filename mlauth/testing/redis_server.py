"""A throwaway ``redis-server`` for tests: a free loopback port, its own folder, stopped at the
end. mlauth's own tests and its storm benchmark start theirs with it; your tests can too::

    server = RedisServer(tmp_path).start()
    try:
        auth = mlauth.MLAuth(client_id, client_secret, mlauth.RedisStore(server.url))
        ...
    finally:
        server.stop()

It needs the ``redis-server`` program (Debian's ``redis-server`` package) and, to start one,
redis-py (``pip install 'mlauth[redis]'``). redis-py is imported only when a server is
started or a client asked for, so this module imports without it: :func:`unavailable` says
what is missing (the benchmarks then report their Redis row as not run).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

__all__ = ["RedisServer", "free_port", "unavailable"]

INSTALL_SERVER = "install Debian's redis-server package (mlauth's `make test` does)"
INSTALL_CLIENT = "pip install 'mlauth[redis]'"


def unavailable() -> str | None:
    """Why a Redis server cannot be run here (what is missing and how to get it), or None."""
    if shutil.which("redis-server") is None:
        return f"redis-server is not installed: {INSTALL_SERVER}"
    if importlib.util.find_spec("redis") is None:
        return f"the redis package is not installed: {INSTALL_CLIENT}"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """``redis-server`` in the foreground on 127.0.0.1, data in ``folder``.

    With ``persistent`` every write is fsynced to an append-only file, so a restart keeps the
    data; without it a restart loses everything (what Redis does with persistence off).
    """

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(f"redis-server is not installed; {INSTALL_SERVER}")
        self.binary = binary
        self.folder = folder
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def start(self) -> RedisServer:
        import redis

        durability = ["--appendonly", "yes", "--appendfsync", "always"]
        command = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)),
            *("--daemonize", "no", "--save", "", "--logfile", str(self.folder / "redis.log")),
            *(durability if self.persistent else ["--appendonly", "no"]),
        ]
        self.proc = subprocess.Popen(  # noqa: S603 (the redis-server on PATH, our own arguments)
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 20
        with self.client() as probe:
            while True:
                try:
                    if probe.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None:
                    _, err = self.proc.communicate()
                    log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server exited: {err.decode()[-500:]} {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING within 20 s")
                time.sleep(0.01)  # polling for readiness, with a deadline

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: a clean shutdown (the append-only file is already synced)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()
