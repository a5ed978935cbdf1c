"""Metrics from the events (mlauth.metrics): OpenTelemetry through an in-memory SDK reader and
Prometheus through a registry, both counting what the loopback fake itself counted over a
storm; the textfile a cron job leaves for node_exporter; and the package without the extras.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

import mlauth
from mlauth import events
from mlauth.metrics import otel, prometheus
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support import SCRIPTS
from tests.support.dead_access import DEAD_ACCESS, dead_access_env
from tests.support.kernel_locks import DEADLINE
from tests.support.leaks import assert_no_secret
from tests.support.lock_holder import flock_held_by_another_process
from tests.support.metrics import (
    label_values,
    otel_points,
    otel_total,
    prom_samples,
    prom_total,
    samples_of,
)

LIFETIME = 2.0


@pytest.fixture
def both() -> Iterator[tuple[InMemoryMetricReader, prometheus_client.CollectorRegistry]]:
    """mlauth's metrics installed on a fresh SDK MeterProvider and a fresh registry."""
    reader = InMemoryMetricReader()
    registry = prometheus_client.CollectorRegistry()
    on_otel = otel.install(MeterProvider(metric_readers=[reader]))
    on_prom = prometheus.install(registry)
    try:
        yield reader, registry
    finally:
        on_otel.cancel()
        on_prom.cancel()


def session_on(auth: mlauth.MLAuth) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.auth = auth
    return session


def storm(envs: list[Path], url: str, *, threads: int, seconds: float) -> list[int]:
    """An auth on each of ``envs`` (each an engine of its own, as processes would have; an
    ``.env`` may be listed more than once), each called from ``threads`` threads for
    ``seconds``: every status the callers saw."""
    statuses: list[int] = []
    stop = time.monotonic() + seconds

    def call(session: requests.Session) -> None:
        while time.monotonic() < stop:
            statuses.append(session.get(url, timeout=30).status_code)

    sessions = [session_on(mlauth.MLAuth.from_env(env)) for env in envs]
    workers = [threading.Thread(target=call, args=(s,)) for s in sessions for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statuses


def test_counters_match_the_fake_servers_counts_over_a_storm(
    both: tuple[InMemoryMetricReader, prometheus_client.CollectorRegistry], tmp_path: Path
) -> None:
    reader, registry = both
    with FakeMercadoLibre(token_lifetime=LIFETIME, kill_old_access_on_refresh=True) as fake:
        url = f"{fake.base_url}/users/me"
        # A chain whose access token the server does not know, refreshed moments ago as far
        # as mlauth can tell: its 401s are genuine and go back to the caller.
        other = tmp_path / "other.env"
        dead_access_env(fake, other, refreshed_ago=0)
        genuine = session_on(mlauth.MLAuth.from_env(other, min_token_age=3600))
        returned = [genuine.get(url, timeout=30).status_code for _ in range(3)]
        # The storm: one chain shared by three auths whose tokens rotate every LIFETIME
        # (each refresh kills the access token the others may be sending), and four chains
        # whose access token the server does not know and mlauth thinks old: their first
        # calls are 401s, absorbed by a refresh and a re-send.
        env = tmp_path / ".env"
        fake.write_env(env, expires_at=time.time() + LIFETIME)
        stale = [tmp_path / f"stale{i}.env" for i in range(4)]
        for path in stale:
            dead_access_env(fake, path, refreshed_ago=3600)
        statuses = storm([env, env, env, *stale], url, threads=3, seconds=3 * LIFETIME)
        stats = fake.stats()
        secrets = [fake.client_secret, DEAD_ACCESS]
        for path in [env, *stale]:
            secrets += [v for k, v in read_env_file(path).items() if k.endswith("_TOKEN")]
    assert events.flush(DEADLINE)

    assert returned == [401, 401, 401] and set(statuses) == {200}
    assert stats["refreshes"] >= 2 + len(stale) and stats["invalid_grant"] == 0
    absorbed, genuine_401s = stats["api_401"] - 3, 3
    assert absorbed >= len(stale)
    store, other_store = str(env), str(other)

    points = otel_points(reader)
    assert otel_total(points, "mlauth.refreshes [{refresh}]") == stats["refreshes"]
    assert otel_total(points, "mlauth.refresh.duration [s]") == stats["refreshes"]
    unauthorized = "mlauth.unauthorized [{response}]"
    assert otel_total(points, unauthorized, **{"mlauth.outcome": "absorbed"}) == absorbed
    assert otel_total(
        points,
        unauthorized,
        **{"mlauth.outcome": "returned", "mlauth.reason": "genuine", "mlauth.store": other_store},
    ) == (genuine_401s)
    assert otel_total(points, unauthorized) == stats["api_401"]

    samples = prom_samples(registry)
    assert prom_total(samples, "mlauth_refreshes_total") == stats["refreshes"]
    for path in stale:
        assert prom_total(samples, "mlauth_refreshes_total", store=str(path), reason="401") == 1
    for path in [env, *stale]:  # each chain's refreshes under its own store label
        on_chain = prom_total(samples, "mlauth_refreshes_total", store=str(path))
        assert on_chain >= 1
        assert otel_total(
            points, "mlauth.refreshes [{refresh}]", **{"mlauth.store": str(path)}
        ) == (on_chain)
    assert prom_total(samples, "mlauth_refresh_duration_seconds_count") == stats["refreshes"]
    assert prom_total(samples, "mlauth_unauthorized_total", outcome="absorbed") == absorbed
    assert (
        prom_total(samples, "mlauth_unauthorized_total", outcome="returned", reason="genuine")
        == genuine_401s
    )
    assert prom_total(samples, "mlauth_unauthorized_total") == stats["api_401"]
    assert set(label_values(samples, "mlauth_refreshes_total", "store")) == {
        store,
        *map(str, stale),
    }
    exposed = prometheus_client.generate_latest(registry).decode()
    assert_no_secret(exposed + repr(points), secrets, "metrics")


def cron_run(env: Path, url: str, prom: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "metrics_cron.py"), str(env), url, str(prom)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "200"), done.stderr[-2000:]


@pytest.mark.processes
def test_a_cron_job_leaves_a_textfile_that_holds_its_refreshes(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env, prom = tmp_path / ".env", tmp_path / "textfile" / "sync-orders.prom"
    prom.parent.mkdir()
    for run in (1, 2):  # each run finds the token expired, refreshes once and exits
        fake_ml.write_env(env, expires_at=time.time() - 10)
        cron_run(env, f"{fake_ml.base_url}/users/me", prom)
        assert fake_ml.stats()["refreshes"] == run
        samples = samples_of(text_string_to_metric_families(prom.read_text()))
        # The file is the job's: the second run adds its refresh to the first's.
        labels = {"store": str(env), "job_name": "sync-orders", "reason": "expired"}
        assert prom_total(samples, "mlauth_refreshes_total", **labels) == run
        assert prom_total(samples, "mlauth_refresh_duration_seconds_count") == run
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644  # node_exporter reads as another user
    assert sorted(p.name for p in prom.parent.iterdir()) == [prom.name, f"{prom.name}.lock"]
    assert not any(s.name.endswith("_created") for s in samples)


def emit_and_flush(*emitted: events.Event) -> None:
    for event in emitted:
        events.emit(event)
    assert events.flush(DEADLINE)


def refreshed(store: str) -> events.Refreshed:
    return events.Refreshed(store=store, duration_s=0.2, reason="expired", by="pid 1@host")


def test_a_textfile_adds_each_write_once_and_keeps_what_earlier_runs_counted(
    tmp_path: Path,
) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    earlier = prometheus.install(prometheus_client.CollectorRegistry())  # an earlier run
    try:
        failed = events.RefreshFailed(store=store, error="RefreshError", reason="503", retry_at=1)
        emit_and_flush(failed, refreshed(store))
        prometheus.Textfile(prom, earlier.registry).write()
    finally:
        earlier.cancel()
    this = prometheus.install(prometheus_client.CollectorRegistry())
    try:
        writer = prometheus.Textfile(prom, this.registry)
        emit_and_flush(refreshed(store))
        writer.write()
        writer.write()  # on demand and again at exit: what was added once is not added twice
        emit_and_flush(refreshed(store))
        writer.write()
    finally:
        this.cancel()
    samples = samples_of(text_string_to_metric_families(prom.read_text()))
    assert prom_total(samples, "mlauth_refreshes_total", store=store, job_name="job") == 3
    assert prom_total(samples, "mlauth_refresh_duration_seconds_count") == 3
    assert prom_total(samples, "mlauth_refresh_duration_seconds_sum") == pytest.approx(0.6)
    # A series only the earlier run counted is kept.
    assert prom_total(samples, "mlauth_refresh_failures_total", error="RefreshError") == 1


def test_a_textfile_replaces_a_planted_symlink_and_never_writes_through_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = str(tmp_path / ".env")
    # Valid Prometheus text of this very job: read through the link, it would be added to.
    victim = tmp_path / "victim"
    victim.write_text(bucket_lines(store, [("+Inf", 1000)]))
    before = victim.read_text()
    prom = tmp_path / "job.prom"
    prom.symlink_to(victim)
    registry = prometheus_client.CollectorRegistry()
    installed = prometheus.install(registry)
    try:
        emit_and_flush(refreshed(store))
        prometheus.Textfile(prom, registry).write()
    finally:
        installed.cancel()
    assert victim.read_text() == before
    assert not prom.is_symlink() and prom.is_file()
    assert prom_file_total(prom, "mlauth_refreshes_total", store=store) == 1
    assert "its counts restart" in caplog.text


def test_a_textfile_must_be_named_for_the_collector(tmp_path: Path) -> None:
    with pytest.raises(mlauth.ConfigError, match=r"only \*\.prom files"):
        prometheus.Textfile(tmp_path / "job.txt", prometheus_client.CollectorRegistry())


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE
    )


@pytest.mark.parametrize(
    ("hidden", "module", "extra"),
    [
        ("opentelemetry", "mlauth.metrics.otel", "otel"),
        ("prometheus_client", "mlauth.metrics.prometheus", "prometheus"),
    ],
)
def test_without_the_extra_mlauth_works_and_the_integration_names_it(
    hidden: str, module: str, extra: str
) -> None:
    done = python(
        "import sys\n"
        f"sys.modules[{hidden!r}] = None  # as if the extra were not installed\n"
        "import mlauth, mlauth.metrics, mlauth.events\n"
        "print(mlauth.subscribe(print).cancel())\n"
        f"import {module}\n"
    )
    assert done.stdout == "None\n"
    assert f"pip install 'mlauth[{extra}]'" in done.stderr.strip().splitlines()[-1]


OTEL_LATE_SDK = """\
import sys, requests, mlauth
import mlauth.metrics.otel
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

mlauth.metrics.otel.install()  # the API's global provider: a no-op so far
env, url = sys.argv[1:3]
session = requests.Session()
session.trust_env = False
session.auth = mlauth.MLAuth.from_env(env)
session.get(url, timeout=30).raise_for_status()
mlauth.events.flush()
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))  # the app's SDK, late
session.auth.refresh(force=True)
mlauth.events.flush()
for resource in reader.get_metrics_data().resource_metrics:
    for scope in resource.scope_metrics:
        for metric in scope.metrics:
            for point in metric.data.data_points:
                if metric.name == "mlauth.refreshes":
                    print(metric.name, point.value)
"""


@pytest.mark.processes
def test_with_the_api_alone_nothing_is_recorded_until_the_app_sets_an_sdk(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)
    done = subprocess.run(
        [sys.executable, "-c", OTEL_LATE_SDK, str(env), f"{fake_ml.base_url}/users/me"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Two refreshes, one before the SDK (a no-op) and one after, which is counted.
    assert fake_ml.stats()["refreshes"] == 2
    assert done.stdout == "mlauth.refreshes 1\n"


EVERY_KIND = [
    (events.Adopted(store="s", by="pid 2@host"), "mlauth.adoptions", "mlauth_adoptions_total", {}),
    (
        events.LockWaited(store="s", waited_ms=1500.0),
        "mlauth.lock.wait_time",
        "mlauth_lock_wait_seconds_sum",
        {},
    ),
    (
        events.RefreshFailed(store="s", error="RefreshError", reason="503", retry_at=None),
        "mlauth.refresh.failures",
        "mlauth_refresh_failures_total",
        {"error": "RefreshError"},
    ),
    (
        events.ReauthorizationRequired(store="s", reason="run mlauth login", chain="sha256:0"),
        "mlauth.reauthorizations_required",
        "mlauth_reauthorization_required_total",
        {},
    ),
    (
        events.StoreUnavailable(store="s", error="StoreError", reason="down"),
        "mlauth.store.unavailable",
        "mlauth_store_unavailable_total",
        {"error": "StoreError"},
    ),
    (
        events.StoreBack(store="s", down_s=42.0),
        "mlauth.store.outage.duration",
        "mlauth_store_outage_seconds_sum",
        {},
    ),
]


@pytest.mark.parametrize(
    ("event", "otel_name", "prom_name", "labels"), EVERY_KIND, ids=lambda v: str(v)[:30]
)
def test_each_event_kind_reaches_both_backends(
    both: tuple[InMemoryMetricReader, prometheus_client.CollectorRegistry],
    event: events.Event,
    otel_name: str,
    prom_name: str,
    labels: dict[str, str],
) -> None:
    reader, registry = both
    emit_and_flush(event)
    points = otel_points(reader)
    (found,) = [name for name, values in points.items() if values]
    assert found.startswith(f"{otel_name} [")
    expected = {"lock_waited": 1.5, "store_back": 42.0}.get(event.kind, 1.0)
    assert prom_total(prom_samples(registry), prom_name, store="s", **labels) == expected
    attributes = {"mlauth.store": "s"}
    if "error" in labels:
        attributes["error.type"] = labels["error"]
    assert otel_total(points, found, **attributes) == 1  # one count or one observation


def prom_file_total(prom: Path, name: str, **labels: str) -> float:
    return prom_total(samples_of(text_string_to_metric_families(prom.read_text())), name, **labels)


def test_a_store_path_that_is_not_utf8_is_exposed_escaped_by_both_backends(
    both: tuple[InMemoryMetricReader, prometheus_client.CollectorRegistry], tmp_path: Path
) -> None:
    reader, registry = both
    # A .env in a folder named with the byte 0xE9 (Latin-1 "é"): os.fsdecode keeps the byte
    # as a lone surrogate, which no exporter can encode.
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    store = str(folder / ".env")
    emit_and_flush(refreshed(store))
    escaped = str(tmp_path / "caf\\xe9" / ".env")
    exposed = prometheus_client.generate_latest(registry).decode()  # the whole /metrics page
    assert f'store="{escaped}"' in exposed.replace("\\\\", "\\")
    points = otel_points(reader)
    assert otel_total(points, "mlauth.refreshes [{refresh}]", **{"mlauth.store": escaped}) == 1
    prom = tmp_path / "job.prom"
    prometheus.Textfile(prom, registry).write()
    assert prom_file_total(prom, "mlauth_refreshes_total", store=escaped) == 1


def test_a_failed_write_leaves_its_counts_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    registry = prometheus_client.CollectorRegistry()
    installed = prometheus.install(registry)
    try:
        writer = prometheus.Textfile(prom, registry)
        emit_and_flush(refreshed(store), refreshed(store), refreshed(store))
        real_fsync = os.fsync

        def full_disk(fd: int) -> None:
            monkeypatch.setattr(os, "fsync", real_fsync)  # this once only
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full_disk)
        with pytest.raises(mlauth.StoreError, match="No space left"):
            writer.write()
        assert not prom.exists()
        writer.write()
    finally:
        installed.cancel()
    assert prom_file_total(prom, "mlauth_refreshes_total", store=store) == 3
    assert prom_file_total(prom, "mlauth_refresh_duration_seconds_count") == 3


def bucket_lines(store: str, bounds: list[tuple[str, int]]) -> str:
    labels = f'job_name="job",store="{store}"'
    lines = [
        f'mlauth_refresh_duration_seconds_bucket{{{labels},le="{le}"}} {n}' for le, n in bounds
    ]
    total = bounds[-1][1]
    return (
        "# TYPE mlauth_refresh_duration_seconds histogram\n"
        + "\n".join(lines)
        + f"\nmlauth_refresh_duration_seconds_count{{{labels}}} {total}\n"
        + f"mlauth_refresh_duration_seconds_sum{{{labels}}} 99.0\n"
        + "# TYPE mlauth_refreshes_total counter\n"
        + f'mlauth_refreshes_total{{{labels},reason="expired"}} {total}\n'
    )


def test_a_histogram_with_other_buckets_restarts_whole_and_counters_still_add_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    # An older version's file, with other bounds (0.3 is not one of ours).
    prom.write_text(bucket_lines(store, [("0.3", 4), ("1.0", 5), ("+Inf", 5)]))
    registry = prometheus_client.CollectorRegistry()
    installed = prometheus.install(registry)
    try:
        emit_and_flush(refreshed(store))  # 0.2 s: in every bucket from 0.25 up
        prometheus.Textfile(prom, registry).write()
    finally:
        installed.cancel()
    samples = samples_of(text_string_to_metric_families(prom.read_text()))
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in samples
        if s.name == "mlauth_refresh_duration_seconds_bucket"
    ]
    assert [le for le, _ in buckets] == [*mlauth.metrics.SECONDS, float("inf")]
    assert [n for _, n in buckets] == [0.0 if le < 0.2 else 1.0 for le, _ in buckets]
    assert prom_total(samples, "mlauth_refresh_duration_seconds_count") == 1
    assert prom_total(samples, "mlauth_refresh_duration_seconds_sum") == pytest.approx(0.2)
    assert prom_total(samples, "mlauth_refreshes_total") == 6  # the counter adds up as ever
    (warning,) = [r for r in caplog.records if "buckets" in r.getMessage()]
    assert "mlauth_refresh_duration_seconds" in warning.getMessage()
    assert "0.3" not in warning.getMessage() and "99" not in warning.getMessage()


def write_in_thread(writer: prometheus.Textfile) -> list[BaseException]:
    """``writer.write()`` on a thread: the errors it raised (an assertion if still running
    after DEADLINE)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            writer.write()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    if thread.is_alive():
        errors.append(AssertionError("write() still running"))
    return errors


def test_a_fifo_planted_at_the_path_neither_hangs_the_writer_nor_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prom = tmp_path / "job.prom"
    os.mkfifo(prom)
    try:
        errors = write_in_thread(prometheus.Textfile(prom, prometheus_client.CollectorRegistry()))
    finally:
        if stat.S_ISFIFO(prom.lstat().st_mode):  # let a reader stuck in open() go
            with contextlib.suppress(OSError):
                os.close(os.open(prom, os.O_WRONLY | os.O_NONBLOCK))
    assert errors == []
    assert stat.S_ISREG(prom.lstat().st_mode)
    assert "not a regular file" in caplog.text


def test_a_huge_file_at_the_path_is_not_read_and_its_counts_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    # Valid Prometheus text (a long comment, then a counter): read, it would be added to.
    padding = "# " + "x" * (5 << 20) + "\n"
    prom.write_text(padding + bucket_lines(store, [("+Inf", 1000)]))
    registry = prometheus_client.CollectorRegistry()
    installed = prometheus.install(registry)
    try:
        emit_and_flush(refreshed(store))
        prometheus.Textfile(prom, registry).write()
    finally:
        installed.cancel()
    assert prom_file_total(prom, "mlauth_refreshes_total") == 1
    assert "larger than" in caplog.text and "xxxx" not in caplog.text


@pytest.mark.processes
def test_a_lock_held_too_long_is_a_store_error_naming_the_lock_logged_once_at_exit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prom = tmp_path / "job.prom"
    lock = Path(f"{prom}.lock")
    writer = prometheus.Textfile(prom, prometheus_client.CollectorRegistry(), lock_timeout=0.3)
    with flock_held_by_another_process(lock):
        (error,) = write_in_thread(writer)
        writer.write_at_exit()
    assert isinstance(error, mlauth.StoreError)
    assert str(lock) in str(error)
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage().count("could not write the metrics textfile") == 1
    assert str(lock) in record.getMessage()
    assert not prom.exists()
    writer.write()  # the lock free again: written
    assert prom.is_file()


def test_a_lock_file_this_user_cannot_write_still_locks(tmp_path: Path) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    lock = Path(f"{prom}.lock")
    lock.touch()
    if os.geteuid() == 0:  # root writes any file mode: an immutable file refuses even root
        chattr = shutil.which("chattr") or "chattr"
        if subprocess.run([chattr, "+i", str(lock)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here")
    else:
        lock.chmod(0o444)
    registry = prometheus_client.CollectorRegistry()
    installed = prometheus.install(registry)
    try:
        emit_and_flush(refreshed(store))
        prometheus.Textfile(prom, registry).write()
    finally:
        installed.cancel()
        if os.geteuid() == 0:
            subprocess.run([chattr, "-i", str(lock)], check=True)
    assert prom_file_total(prom, "mlauth_refreshes_total") == 1


def test_temp_files_killed_writers_left_are_removed(tmp_path: Path) -> None:
    prom = tmp_path / "job.prom"
    old, fresh, other = (
        tmp_path / name
        for name in (".job.prom.k1ll3d00.tmp", ".job.prom.wr1t1ng0.tmp", ".other.prom.k1ll3d00.tmp")
    )
    for path in (old, fresh, other):
        path.write_text("half a file")
    an_hour_ago = time.time() - 3600
    for path in (old, other):
        os.utime(path, (an_hour_ago, an_hour_ago))
    prometheus.Textfile(prom, prometheus_client.CollectorRegistry()).write()
    assert not old.exists()
    assert fresh.exists() and other.exists()  # one maybe being written; another job's


COUNTING_WRITER = """\
import sys
from mlauth import events
from mlauth.metrics import prometheus

prom, store, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
writer = prometheus.textfile(prom, at_exit=False)
print("ready", flush=True)
sys.stdin.readline()  # all start together
for _ in range(count):  # a write after each event: many read-modify-writes to interleave
    events.emit(events.Refreshed(store=store, duration_s=0.2, reason="expired", by="w"))
    writer.write()
"""


@pytest.mark.processes
def test_concurrent_writers_lose_no_count(tmp_path: Path) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    writers, count = 8, 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COUNTING_WRITER, str(prom), store, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(writers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            _, err = proc.communicate(timeout=DEADLINE)
            assert proc.returncode == 0, err[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert prom_file_total(prom, "mlauth_refreshes_total", store=store) == writers * count
    assert prom_file_total(prom, "mlauth_refresh_duration_seconds_count") == writers * count


FORKING_JOB = """\
import os, sys
from prometheus_client.parser import text_string_to_metric_families
from mlauth import events
from mlauth.metrics import prometheus

prom, store = sys.argv[1:3]
prometheus.textfile(prom)


def refreshed():
    events.emit(events.Refreshed(store=store, duration_s=0.2, reason="expired", by="job"))
    events.flush()


def total():
    with open(prom) as file:
        return sum(s.value for f in text_string_to_metric_families(file.read())
                   for s in f.samples if s.name == "mlauth_refreshes_total")


refreshed()
refreshed()  # not written yet when the child is forked
pid = os.fork()
if pid == 0:
    refreshed()
    sys.exit(0)  # exit handlers run: the child writes what it counted, and only that
os.waitpid(pid, 0)
print("after the child:", total(), flush=True)
"""


@pytest.mark.processes
def test_a_forked_child_writes_only_its_own_counts(
    tmp_path: Path,
) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    done = python_args(FORKING_JOB, str(prom), store)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "after the child: 1.0\n"
    # The parent writes its two at exit.
    assert prom_file_total(prom, "mlauth_refreshes_total", store=store) == 3


TWICE = """\
import sys
from mlauth import events
from mlauth.metrics import prometheus

prom, store = sys.argv[1:3]
first = prometheus.textfile(prom)  # say, in a library the job uses
second = prometheus.textfile(prom)  # and in the job itself
print(first is second)
events.emit(events.Refreshed(store=store, duration_s=0.2, reason="expired", by="job"))
"""


@pytest.mark.processes
def test_a_textfile_set_up_twice_in_a_process_counts_each_event_once(tmp_path: Path) -> None:
    prom, store = tmp_path / "job.prom", str(tmp_path / ".env")
    done = python_args(TWICE, str(prom), store)
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr[-2000:]
    assert prom_file_total(prom, "mlauth_refreshes_total", store=store) == 1


def python_args(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=DEADLINE
    )
