"""Several "machines" (processes with their own folder and .env) sharing one real Redis."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mlauth.cli.demo import total
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.demo_workers import (
    LIFETIME,
    check_storm,
    kill_holder_mid_post,
    result_of,
    worker,
)

pytestmark = pytest.mark.processes


def machines(
    fake: FakeMercadoLibre,
    redis_url: str,
    root: Path,
    count: int,
    *,
    expires_at: float,
    extra: dict[str, str] | None = None,
) -> list[Path]:
    """``count`` folders, each with a copy of one migrated .env: credentials + ML_TOKEN_STORE."""
    seed = root / "seed" / ".env"
    seed.parent.mkdir()
    issued = time.time()
    fake.write_env(
        seed, expires_at=expires_at, extra={"ML_TOKEN_REFRESHED_AT": str(issued), **(extra or {})}
    )
    migrate_to_redis(seed, redis_url)
    folders = []
    for number in range(count):
        folder = root / f"machine{number}"
        folder.mkdir()
        (folder / ".env").write_text(seed.read_text())
        folders.append(folder)
    return folders


def machine(folder: Path, url: str, **options: Any) -> subprocess.Popen[str]:
    """A demo worker whose working folder is the machine's own: it shares nothing with its
    peers but Redis."""
    return worker(Path(".env"), url, cwd=folder, **options)


def stored(server: RedisServer, folder: Path) -> dict[str, str]:
    client_id = read_env_file(folder / ".env")["ML_CLIENT_ID"]
    with server.client() as client:
        values: dict[str, str] = client.hgetall(f"mlauth:{client_id}:tokens")
    return values


def test_several_machines_share_one_chain_through_redis_without_a_failed_call(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    count, threads, seconds = 4, 4, 8.0
    with FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake:
        folders = machines(
            fake, redis_server.url, tmp_path, count, expires_at=time.time() + LIFETIME
        )
        started = time.time()
        procs = [machine(f, fake.base_url, threads=threads, seconds=seconds) for f in folders]
        results = [result_of(proc) for proc in procs]
        span = time.time() - started  # longer than `seconds` when starting processes is slow
        stats = fake.stats()
        refresh_times = fake.refresh_times()

    check_storm(
        f"redis: {count} machines x {threads} threads",
        results,
        stats,
        refresh_times,
        seconds=seconds,
        span=span,
        threads=count * threads,
    )
    # Every refresh was one committed generation (the migration wrote the first).
    assert int(stored(redis_server, folders[0])["generation"]) == stats["refreshes"] + 1
    assert all(not (f / ".env.lock").exists() for f in folders)  # no file lock was involved


def test_killed_lock_holder_blocks_peers_only_until_the_lock_times_out(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with FakeMercadoLibre(token_lifetime=3600.0) as fake:
        holder_dir, peer_dir = machines(
            fake,
            redis_server.url,
            tmp_path,
            2,
            expires_at=time.time() - 10,  # the first request of each machine must refresh
            extra={"ML_TOKEN_LOCK_TIMEOUT": "3"},
        )
        before = stored(redis_server, holder_dir)
        result, killed_at = kill_holder_mid_post(
            fake,
            lambda: machine(holder_dir, fake.base_url, threads=1, seconds=60, requests=1),
            lambda log: machine(
                peer_dir, fake.base_url, threads=1, seconds=60, requests=1, debug=True, stderr=log
            ),
            tmp_path / "peer.log",
        )
        stats = fake.stats()
        after = stored(redis_server, holder_dir)

    waited = float(result["finished_at"]) - killed_at
    print(f"\n[figures] redis: peer finished {waited * 1000:.0f} ms after the holder was killed")
    assert result["ok"] == 1 and result["failed"] == 0
    assert stats["invalid_grant"] == 0
    assert stats["refreshes"] == 1
    # No token lost: the killed POST was never answered, the peer spent the same refresh
    # token and committed its successor as the next generation.
    assert after["refresh_token"] != before["refresh_token"]
    assert int(after["generation"]) == int(before["generation"]) + 1


def test_a_run_continues_across_a_redis_restart_with_persistence(
    persistent_redis: RedisServer, tmp_path: Path
) -> None:
    count, threads, seconds, lifetime = 3, 3, 9.0, 3.0
    with FakeMercadoLibre(token_lifetime=lifetime, kill_old_access_on_refresh=True) as fake:
        folders = machines(
            fake, persistent_redis.url, tmp_path, count, expires_at=time.time() + lifetime
        )
        procs = [machine(f, fake.base_url, threads=threads, seconds=seconds) for f in folders]
        deadline = time.monotonic() + 30
        while fake.stats()["refreshes"] < 1:  # mid-run: after the first rotation
            assert time.monotonic() < deadline, "no refresh happened"
            time.sleep(0.01)
        persistent_redis.restart()
        restarted_at = time.time()
        results = [result_of(proc) for proc in procs]
        stats = fake.stats()
        refresh_times = fake.refresh_times()

    calls, failed = total(results, "calls"), total(results, "failed")
    after_restart = [t for t in refresh_times if t > restarted_at]
    print(
        f"\n[figures] redis restarted mid-run: calls={calls} failed={failed} "
        f"refreshes={stats['refreshes']} (after the restart: {len(after_restart)}) "
        f"invalid_grant={stats['invalid_grant']}"
    )
    assert failed == 0, [r["errors"] for r in results]
    assert stats["invalid_grant"] == 0
    assert after_restart, "no refresh after the restart"
    assert int(stored(persistent_redis, folders[0])["generation"]) == stats["refreshes"] + 1


def test_processes_running_on_a_env_follow_a_migration_mid_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    count, threads, seconds = 3, 2, 8.0
    with FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake:
        env = tmp_path / ".env"
        issued = time.time()
        fake.write_env(
            env, expires_at=issued + LIFETIME, extra={"ML_TOKEN_REFRESHED_AT": str(issued)}
        )
        procs = [
            machine(tmp_path, fake.base_url, threads=threads, seconds=seconds) for _ in range(count)
        ]
        deadline = time.monotonic() + 30
        while fake.stats()["refreshes"] < 1:  # mid-run: after a refresh into the file
            assert time.monotonic() < deadline, "no refresh happened"
            time.sleep(0.01)
        migrating_at = time.time()
        migrate_to_redis(env, redis_server.url)
        results = [result_of(proc) for proc in procs]
        stats = fake.stats()
        refresh_times = fake.refresh_times()

    calls, failed = total(results, "calls"), total(results, "failed")
    into_redis = [t for t in refresh_times if t > migrating_at]
    print(
        f"\n[figures] {count} processes followed a migration mid-run: calls={calls} "
        f"failed={failed} refreshes={stats['refreshes']} (into Redis: {len(into_redis)}) "
        f"invalid_grant={stats['invalid_grant']}"
    )
    assert failed == 0, [r["errors"] for r in results]
    assert stats["invalid_grant"] == 0
    assert into_redis, "no refresh after the migration"
    # Every refresh after the move went to Redis, and none back into the file.
    assert int(stored(redis_server, tmp_path)["generation"]) == len(into_redis) + 1
    assert "ML_REFRESH_TOKEN" not in read_env_file(env)
