"""Events and metrics of a store of many sellers (issue 20): every event names the seller
whose chain it is about; metrics stay one series per store, however many sellers share it.

The sellers' chains are in memory on one shared location (tests/support/seller_stores.py),
their token calls go to the loopback fake.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mlauth
from mlauth import events
from mlauth.logs import JsonFormatter
from mlauth.metrics import otel, prometheus
from mlauth.testing import FakeMercadoLibre
from tests.support.dead_access import DEAD_ACCESS
from tests.support.kernel_locks import DEADLINE
from tests.support.leaks import assert_no_secret
from tests.support.metrics import otel_points, otel_total, prom_samples, prom_total
from tests.support.seller_stores import seller_auth, seller_store

ALICE, BOB, CAROL = 111111, 222222, 333333


@pytest.fixture
def seen() -> Iterator[list[events.Event]]:
    got: list[events.Event] = []
    with mlauth.subscribe(got.append):
        yield got


def delivered(seen: list[events.Event]) -> list[tuple[str, str | None]]:
    assert events.flush(DEADLINE)
    return [(event.kind, event.seller) for event in seen]


# -- events ---------------------------------------------------------------------------------


def test_every_event_of_a_sellers_chain_names_the_seller(
    fake_ml: FakeMercadoLibre, tmp_path: Path, seen: list[events.Event]
) -> None:
    alice = seller_store(fake_ml, tmp_path, ALICE, access=DEAD_ACCESS)
    bob = seller_store(fake_ml, tmp_path, BOB)
    assert alice.location == bob.location
    peer = seller_auth(fake_ml, alice)
    assert peer.valid_tokens().access_token == mlauth.Secret(DEAD_ACCESS)
    session = requests.Session()
    session.trust_env = False
    session.auth = seller_auth(fake_ml, alice)
    # A 401 absorbed by a refresh; another auth on the chain adopts that refresh.
    assert session.get(f"{fake_ml.base_url}/users/me", timeout=30).status_code == 200
    assert peer.valid_tokens().access_token != mlauth.Secret(DEAD_ACCESS)
    # A refresh that fails, a store that cannot save and comes back, a dead chain.
    fake_ml.fail_next_token_requests(1, status=503)
    with pytest.raises(mlauth.RefreshError):
        seller_auth(fake_ml, alice, max_attempts=1).refresh()
    alice.fail_saves(1)
    seller_auth(fake_ml, alice).refresh()  # kept in memory: the save failed
    seller_auth(fake_ml, bob).refresh()  # bob's save goes through: the store is back
    dead = seller_store(fake_ml, tmp_path, ALICE)
    fake_ml.revoke_refresh_tokens(ALICE)
    with pytest.raises(mlauth.InvalidGrantError):
        seller_auth(fake_ml, dead).refresh()
    got = delivered(seen)
    assert {kind for kind, _ in got} >= {
        "refreshed",
        "unauthorized_absorbed",
        "adopted",
        "refresh_failed",
        "store_unavailable",
        "store_back",
        "reauthorization_required",
    }, got
    # Bob's refresh, whose save saw the store answer; everything else was alice's.
    bobs = [(kind, seller) for kind, seller in got if seller != str(ALICE)]
    assert bobs == [("store_back", str(BOB)), ("refreshed", str(BOB))], got
    assert all(e.fields()["seller"] == e.seller and e.store == alice.location for e in seen)


def test_the_seller_is_in_the_log_line_and_the_json_log_and_one_seller_lines_are_unchanged(
    fake_ml: FakeMercadoLibre, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env)
    with caplog.at_level(logging.INFO, logger="mlauth.events"):
        seller_auth(fake_ml, seller_store(fake_ml, tmp_path, ALICE)).refresh()
        mlauth.MLAuth.from_env(env).refresh()
    records = [r for r in caplog.records if r.name == "mlauth.events"]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 2, lines
    assert f" seller={ALICE} " in lines[0] and "seller=" not in lines[1]
    logged = [json.loads(JsonFormatter().format(r)) for r in records]
    assert [(f["kind"], f["seller"]) for f in logged] == [
        ("refreshed", str(ALICE)),
        ("refreshed", None),
    ]
    assert_no_secret(" ".join(lines), [fake_ml.client_secret], "event log lines")


# -- metrics --------------------------------------------------------------------------------


def test_sellers_sharing_a_store_count_in_its_series_with_no_seller_label(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    reader = InMemoryMetricReader()
    registry = prometheus_client.CollectorRegistry()
    on_otel = otel.install(MeterProvider(metric_readers=[reader]))
    on_prom = prometheus.install(registry)
    try:
        alice = seller_store(fake_ml, tmp_path, ALICE)
        bob = seller_store(fake_ml, tmp_path, BOB)
        for store in (alice, bob, alice):
            seller_auth(fake_ml, store).refresh()
        fake_ml.revoke_refresh_tokens(BOB)
        with pytest.raises(mlauth.InvalidGrantError):
            seller_auth(fake_ml, bob).refresh()
        assert events.flush(DEADLINE)
        samples = [s for s in prom_samples(registry) if s.name.startswith("mlauth_")]
        points = otel_points(reader)
    finally:
        on_otel.cancel()
        on_prom.cancel()
    assert fake_ml.refreshes_by_user() == {ALICE: 2, BOB: 1}
    refreshes = [s for s in samples if s.name == "mlauth_refreshes_total"]
    assert [(s.labels["store"], s.value) for s in refreshes] == [(alice.location, 3.0)]
    assert prom_total(samples, "mlauth_reauthorization_required_total") == 1
    assert all("seller" not in s.labels for s in samples)
    name = "mlauth.refreshes [{refresh}]"
    assert otel_total(points, name, **{"mlauth.store": alice.location}) == 3
    assert len(points[name]) == 1  # one series
    assert all("seller" not in key for pts in points.values() for a, _ in pts for key in a)
