"""A real redis-server for the tests: a free loopback port, its own folder, stopped at the end."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
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
            raise RuntimeError("redis-server is not installed; `make test` installs it")
        self.binary = binary
        self.folder = folder
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def start(self) -> RedisServer:
        durability = ["--appendonly", "yes", "--appendfsync", "always"]
        command = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)),
            *("--daemonize", "no", "--save", "", "--logfile", str(self.folder / "redis.log")),
            *(durability if self.persistent else ["--appendonly", "no"]),
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
