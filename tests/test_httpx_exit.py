"""A process that returns while an abandoned async refresh is in flight waits for its save.

A task cancelled while ``HttpxAuth`` refreshes abandons only its wait; the refresh goes on in
a worker thread. If the program then ends normally, that thread must still reach the save, or
the refresh token the server just rotated is lost with the process. anyio's asyncio workers
are non-daemon threads, which the interpreter waits for at exit; trio's are daemon threads,
which it does not, so under trio the call runs in a thread of mlauth's own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre

pytestmark = pytest.mark.processes

# Sends one request on an expired token, and cancels it when told to on stdin (the parent
# says so once the server has rotated the refresh token), then returns from main.
CLIENT = """\
import sys

import anyio
import anyio.to_thread
import httpx

from mlauth.httpx import HttpxAuth


async def main(url):
    async with httpx.AsyncClient(auth=HttpxAuth.from_env(".env")) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(client.get, url)
            print("sent", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            group.cancel_scope.cancel()
    print("cancelled", flush=True)


anyio.run(main, sys.argv[1], backend=sys.argv[2])
"""


def wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)  # a poll with a deadline: the server gives no event to wait on


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_normal_exit_waits_for_an_abandoned_refresh_to_save(backend: str, tmp_path: Path) -> None:
    (tmp_path / "client.py").write_text(CLIENT)
    with FakeMercadoLibre() as fake:
        fake.write_env(tmp_path / ".env", expires_at=time.time() - 10)  # the request refreshes
        # The server rotates the token, then holds its answer: the cancel and the end of main
        # fall between the spend and the save.
        fake.token_answer_delay = 3.0
        proc = subprocess.Popen(
            [sys.executable, "client.py", f"{fake.base_url}/users/me", backend],
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: fake.stats()["refreshes"] == 1)
            out, err = proc.communicate("cancel\n", timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, err[-2000:]
        assert out.split() == ["sent", "cancelled"]
        saved = read_env_file(tmp_path / ".env")["ML_REFRESH_TOKEN"]
        assert fake.is_live(saved), f"{backend}: the process exited before its save"
        assert fake.stats()["invalid_grant"] == 0
