"""mlauth.testing.redis_server, the throwaway redis-server the tests and the storm benchmark
start (and users' tests may): it imports without redis-py, and a server it starts answers
and is gone after stop()."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from mlauth.testing.redis_server import RedisServer


def python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_launcher_does_not_import_redis() -> None:
    code = "import sys\nimport mlauth.testing.redis_server\nprint('redis' in sys.modules)\n"
    assert python(code) == "False"


def test_without_redis_py_the_launcher_imports_and_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['redis'] = None  # as if the extra were not installed\n"
        "from mlauth.testing.redis_server import unavailable\n"
        "print(unavailable())\n"
    )
    assert python(code) == "the redis package is not installed: pip install 'mlauth[redis]'"


def test_a_started_server_answers_and_is_gone_after_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        with server.client() as client:
            assert client.ping() is True
    finally:
        server.stop()
    assert server.proc is None
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0  # nothing listens there now
