"""Events, metrics and alerts of a store of many sellers (issue 20): every event names the
seller whose chain it is about; metrics stay one series per store, however many sellers
share it; alerts are each seller's own, and an event costs one seller's alert state, not
one per seller watched.

The sellers' chains are in memory on one shared location (tests/support/seller_stores.py),
their token calls go to the loopback fake, and the alert command is a real ``/bin/sh -c``
that records what it was given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import requests
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mlauth
from mlauth import alerts, events
from mlauth.logs import JsonFormatter
from mlauth.metrics import otel, prometheus
from mlauth.testing import FakeMercadoLibre
from tests.support.alert_recorder import RECORDER, alert_variables, alerts_in, everything_given
from tests.support.dead_access import DEAD_ACCESS
from tests.support.kernel_locks import DEADLINE
from tests.support.leaks import assert_no_secret
from tests.support.metrics import otel_points, otel_total, prom_samples, prom_total
from tests.support.seller_stores import SellerStore, seller_auth, seller_store

ALICE, BOB, CAROL = 111111, 222222, 333333


@pytest.fixture
def seen() -> Iterator[list[events.Event]]:
    got: list[events.Event] = []
    with mlauth.subscribe(got.append):
        yield got


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the recorder writes what each alert gave it."""
    folder = tmp_path / "alerts"
    folder.mkdir()
    monkeypatch.setenv("MLAUTH_TEST_OUT", str(folder))
    return folder


def delivered(seen: list[events.Event]) -> list[tuple[str, str | None]]:
    assert events.flush(DEADLINE)
    return [(event.kind, event.seller) for event in seen]


def incident_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("sellers.db.incident.*"))


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


# -- alerts ---------------------------------------------------------------------------------


def test_a_sellers_dead_chain_alerts_once_and_names_the_seller(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    alice = seller_store(fake_ml, tmp_path, ALICE, expires_in=-10)
    bob = seller_store(fake_ml, tmp_path, BOB, expires_in=-10)
    fake_ml.revoke_refresh_tokens(ALICE)
    for _ in range(2):  # two auths on alice's chain (as two processes): one alert
        with pytest.raises(mlauth.InvalidGrantError):
            seller_auth(fake_ml, alice, alert_command=RECORDER).refresh()
    seller_auth(fake_ml, bob, alert_command=RECORDER).refresh()  # bob's chain lives on
    assert events.flush(DEADLINE)
    (alert,) = alerts_in(out)
    assert alert["alert"] == "reauthorization_required"
    assert (alert["seller"], alert["event"]["seller"]) == (str(ALICE), str(ALICE))
    assert alert["store"] == alice.location
    assert f"seller {ALICE} must authorize the app again" in alert["message"]
    (given,) = alert_variables(out)
    assert given["MLAUTH_ALERT_SELLER"] == str(ALICE)
    assert given["MLAUTH_ALERT_STORE"] == alice.location
    # Beside it, when alice's refreshes began failing (the refresh_failing incident's clock).
    assert [name.rsplit(".", 1)[0] for name in incident_files(tmp_path)] == [
        f"sellers.db.incident.alert.reauthorization_required.{ALICE}",
        "sellers.db.incident.failing",
    ]
    assert_no_secret(everything_given(out), [fake_ml.client_secret], "the alert's input")


def test_another_sellers_refresh_does_not_end_a_sellers_failing_refreshes(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    alice = seller_store(fake_ml, tmp_path, ALICE, expires_in=-10)
    bob = seller_store(fake_ml, tmp_path, BOB, expires_in=-10)

    def alice_fails() -> None:
        fake_ml.fail_next_token_requests(1, status=503)
        auth = seller_auth(
            fake_ml, alice, alert_command=RECORDER, alert_failing_minutes=0, max_attempts=1
        )
        with pytest.raises(mlauth.RefreshError):
            auth.refresh()
        assert events.flush(DEADLINE)

    alice_fails()
    assert [(a["alert"], a["seller"]) for a in alerts_in(out)] == [("refresh_failing", str(ALICE))]
    seller_auth(fake_ml, bob, alert_command=RECORDER).refresh()
    assert events.flush(DEADLINE)
    alice_fails()  # still the same incident: bob's refresh said nothing about alice's
    assert len(alerts_in(out)) == 1
    assert incident_files(tmp_path) == [
        f"sellers.db.incident.alert.refresh_failing.{ALICE}",
        f"sellers.db.incident.failing.{ALICE}",
    ]
    seller_auth(fake_ml, alice, alert_command=RECORDER).refresh()  # alice's own refresh ends it
    assert events.flush(DEADLINE)
    assert incident_files(tmp_path) == []


def test_an_unavailable_store_is_every_sellers_one_incident(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    stores = {user: seller_store(fake_ml, tmp_path, user) for user in (ALICE, BOB, CAROL)}
    auths = {user: seller_auth(fake_ml, s, alert_command=RECORDER) for user, s in stores.items()}
    stores[ALICE].fail_saves(1)
    auths[ALICE].refresh()  # held in memory: the save failed
    assert events.flush(DEADLINE)
    auths[BOB].refresh()  # bob's save goes through: the store is back, for everyone
    assert events.flush(DEADLINE)
    assert incident_files(tmp_path) == []
    stores[CAROL].fail_saves(1)
    auths[CAROL].refresh()  # a new outage, met by another seller: a new alert
    assert events.flush(DEADLINE)
    found = alerts_in(out)
    assert [(a["alert"], a["seller"]) for a in found] == [("store_unavailable", None)] * 2
    assert [a["event"]["seller"] for a in found] == [str(ALICE), str(CAROL)]  # who met it
    assert [v["MLAUTH_ALERT_SELLER"] for v in alert_variables(out)] == ["", ""]
    assert incident_files(tmp_path) == ["sellers.db.incident.alert.store_unavailable"]


def test_a_seller_that_is_not_a_user_id_never_makes_a_path_of_the_incident(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    # A custom store's seller, say "../../x/y": the incident's name is a file name beside
    # the location, so the seller appears only as a digest there.
    folder = tmp_path / "db"
    folder.mkdir()
    store = seller_store(fake_ml, folder, ALICE, expires_in=-10)
    store.seller = "../../x/y"
    fake_ml.revoke_refresh_tokens(ALICE)
    with pytest.raises(mlauth.InvalidGrantError):
        seller_auth(fake_ml, store, alert_command=RECORDER).refresh()
    assert events.flush(DEADLINE)
    (alert,) = alerts_in(out)
    assert alert["seller"] == "../../x/y"
    digest = "sha256-" + hashlib.sha256(b"../../x/y").hexdigest()[:16]
    assert sorted(name.rsplit(".", 1)[0] for name in os.listdir(folder)) == [
        f"sellers.db.incident.alert.reauthorization_required.{digest}",
        "sellers.db.incident.failing",
    ]
    assert f"sellers.db.incident.failing.{digest}" in os.listdir(folder)
    assert sorted(os.listdir(tmp_path)) == ["alerts", "db"]


def test_one_event_costs_one_sellers_alerter_among_a_thousand_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subscribers = len(events._bus.subscriptions)
    stores = [
        SellerStore(None, seller=str(1000 + n), location="db", incidents=tmp_path / "db")
        for n in range(1000)
    ]
    for store in stores:
        alerts.watch("true", store, 600.0, lambda: ())
    alerts.watch("true", stores[0], 600.0, lambda: ())  # a second auth of a watched chain
    assert len(events._bus.subscriptions) == subscribers + 1  # one for the command
    called: list[str | None] = []
    original = alerts._Alerter.__call__

    def counting(self: alerts._Alerter, event: events.Event) -> None:
        called.append(self.seller)
        original(self, event)

    monkeypatch.setattr(alerts._Alerter, "__call__", counting)
    event = events.Refreshed(store="db", seller="1500", duration_s=0.1, reason="expired", by="x")
    events.emit(event)
    assert events.flush(DEADLINE)
    assert called == ["1500"]
    # Another store's event, or a seller nobody watches, costs none.
    events.emit(events.Refreshed(store="other", seller="1500", duration_s=0.1, reason="x", by="x"))
    events.emit(events.Refreshed(store="db", seller="9", duration_s=0.1, reason="x", by="x"))
    assert events.flush(DEADLINE)
    assert called == ["1500"]


def test_the_alert_of_a_one_seller_store_names_no_seller(
    fake_ml: FakeMercadoLibre, tmp_path: Path, out: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10, extra={"ML_ALERT_COMMAND": RECORDER})
    fake_ml.revoke_refresh_tokens()
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    assert events.flush(DEADLINE)
    (alert,) = alerts_in(out)
    assert (alert["seller"], alert["event"]["seller"]) == (None, None)
    assert alert["message"].startswith("mlauth: the seller must authorize the app again")
    (given,) = alert_variables(out)
    assert given["MLAUTH_ALERT_SELLER"] == ""
