"""Several real processes sharing one .env against a real loopback server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mlauth.stores.envfile import TOKEN_KEYS, read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.demo_workers import (
    LIFETIME,
    check_storm,
    kill_holder_mid_post,
    result_of,
    worker,
)

pytestmark = pytest.mark.processes


def test_eight_processes_share_one_token_chain_without_a_failed_call(tmp_path: Path) -> None:
    processes, threads, seconds = 8, 4, 8.0
    with FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake:
        env = tmp_path / ".env"
        fake.write_env(env, expires_at=time.time() + LIFETIME)
        started = time.time()
        procs = [
            worker(env, fake.base_url, threads=threads, seconds=seconds) for _ in range(processes)
        ]
        results = [result_of(proc) for proc in procs]
        span = time.time() - started  # longer than `seconds` when starting processes is slow
        stats = fake.stats()
        refresh_times = fake.refresh_times()

    check_storm(
        f"{processes} processes x {threads} threads",
        results,
        stats,
        refresh_times,
        seconds=seconds,
        span=span,
        threads=processes * threads,
    )


def test_sigkilled_refresher_frees_the_lock_and_a_peer_proceeds(tmp_path: Path) -> None:
    with FakeMercadoLibre(token_lifetime=3600.0) as fake:
        env = tmp_path / ".env"
        # The file says the token expired: the first request of each process must refresh.
        fake.write_env(env, expires_at=time.time() - 10, extra={"PIPELINE_SETTING": "keep"})
        original = env.read_text()
        result, killed_at = kill_holder_mid_post(
            fake,
            lambda: worker(env, fake.base_url, threads=1, seconds=60, requests=1),
            lambda log: worker(
                env, fake.base_url, threads=1, seconds=60, requests=1, debug=True, stderr=log
            ),
            tmp_path / "peer.log",
        )
        stats = fake.stats()

    # No bound on the wait is asserted (timing is reported, not tested): had the kernel not
    # released the flock, the peer would have waited out its 120 s lock_timeout and failed,
    # well past communicate()'s 60 s.
    waited = float(result["finished_at"]) - killed_at
    print(f"\n[figures] peer finished {waited * 1000:.0f} ms after the lock holder was SIGKILLed")
    assert result["ok"] == 1 and result["failed"] == 0
    assert stats["invalid_grant"] == 0
    assert stats["refreshes"] == 1
    # The .env is whole: every line but the token keys is as it was, and the tokens are new.
    after = read_env_file(env)
    before = {k: v for k, v in read_env_file_text(original).items() if k not in TOKEN_KEYS}
    assert {k: v for k, v in after.items() if k not in TOKEN_KEYS} == before
    assert after["ML_REFRESH_TOKEN"] != read_env_file_text(original)["ML_REFRESH_TOKEN"]
    # The holder's intent was left in the journal; the peer's refresh settled and emptied it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".env",
        ".env.generation",
        ".env.journal",
        ".env.lock",
        "peer.log",
    ]
    assert (tmp_path / ".env.journal").read_bytes() == b""


def read_env_file_text(text: str) -> dict[str, str | None]:
    import io

    from dotenv import dotenv_values

    return dict(dotenv_values(stream=io.StringIO(text), interpolate=False))
