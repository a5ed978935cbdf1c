"""Metrics from the events (mlauth.metrics): OpenTelemetry through an in-memory SDK reader and
Prometheus through a registry, both counting what the loopback fake itself counted over a
storm; the textfile a cron job leaves for node_exporter; and the package without the extras.
"""

from __future__ import annotations

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
    victim = tmp_path / "victim"
    victim.write_text("not yours\n")
    prom = tmp_path / "job.prom"
    prom.symlink_to(victim)
    registry = prometheus_client.CollectorRegistry()
    prometheus.Textfile(prom, registry).write()
    assert victim.read_text() == "not yours\n"
    assert not prom.is_symlink() and prom.is_file()
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
