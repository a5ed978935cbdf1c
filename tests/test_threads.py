"""One MLAuth shared by many threads: one refresh however many threads see the 401."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import requests

import mlauth
from mlauth.stores.envfile import update_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.threads import run_threads


def test_twenty_threads_hitting_401_together_cause_one_refresh(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    update_env_file(fake_ml_env, {"ML_ACCESS_TOKEN": "APP_USR-1234-010101-deadbeef-8035443"})
    auth = mlauth.MLAuth.from_env(fake_ml_env)
    threads, per_thread = 20, 25
    start = threading.Barrier(threads)
    statuses: list[int] = []
    guard = threading.Lock()

    def run() -> None:
        session = requests.Session()
        session.auth = auth
        start.wait()
        for _ in range(per_thread):
            status = session.get(f"{fake_ml.base_url}/users/me").status_code
            with guard:
                statuses.append(status)

    run_threads(run, threads)
    assert statuses == [200] * threads * per_thread
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["invalid_grant"] == 0


def test_threads_under_proactive_refresh_never_see_a_401(
    tmp_path: Path,
) -> None:
    with FakeMercadoLibre(token_lifetime=1.0) as fake:
        env = tmp_path / ".env"
        fake.write_env(env, expires_at=time.time() + 1.0)
        auth = mlauth.MLAuth.from_env(env)
        stop = threading.Event()
        surfaced: list[int] = []
        absorbed: list[int] = []

        def run() -> None:
            session = requests.Session()
            session.auth = auth
            while not stop.is_set():
                response = session.get(f"{fake.base_url}/users/me")
                if response.status_code != 200:
                    surfaced.append(response.status_code)
                absorbed.extend(r.status_code for r in response.history)

        workers = [threading.Thread(target=run) for _ in range(8)]
        for worker in workers:
            worker.start()
        # Wait until several token lifetimes have passed, measured by the server's refreshes.
        deadline = time.monotonic() + 30
        while fake.stats()["refreshes"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for worker in workers:
            worker.join()
        stats = fake.stats()
    assert stats["refreshes"] >= 4
    assert surfaced == []
    # Requests already on the wire when the token rotates meet a dead token (this server kills
    # the old one at once); each such 401 is absorbed by one re-send and none reaches a caller.
    assert absorbed == [401] * stats["api_401"]
    assert stats["invalid_grant"] == 0
