"""Metrics from mlauth's events (:mod:`mlauth.events`), for OpenTelemetry or Prometheus.

Two integrations, each an optional extra imported only by whoever asks for it:

- :mod:`mlauth.metrics.otel` (``pip install 'mlauth[otel]'``): the OpenTelemetry *API* only,
  a no-op until the application configures an SDK;
- :mod:`mlauth.metrics.prometheus` (``pip install 'mlauth[prometheus]'``): counters and
  histograms on a ``prometheus_client`` registry, and a textfile writer for cron jobs.

Both translate events the same way: :func:`measurements` is the one table of what each event
counts, and each backend only names the results in its own ecosystem's style. Nothing here
runs per request: events come from refreshes, 401s, lock waits and store outages.
"""

from __future__ import annotations

import dataclasses
import re

from mlauth import events

__all__ = ["COMMON_LABELS", "SPECS", "Measurement", "Spec", "measurements", "printable"]

#: Labels on every metric. Events name the seller too (:attr:`mlauth.events.Event.seller`),
#: but it is not a label: ``store`` is the database all its sellers share, so they count in
#: its series. A label's every value is a series of its own in every metric: 10,000 sellers
#: would make each counter 10,000 series (times its ``reason``/``error`` values, and a
#: histogram's buckets), held in the exporter's memory and sent at every scrape, for numbers
#: nobody graphs per seller. The alerts say which seller needs a person.
COMMON_LABELS: tuple[str, ...] = ("store",)

# Refresh and lock-wait times: a refresh is a POST (tens of ms to seconds); the lock wait can
# reach the 120 s lock timeout.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# How long a store stayed unavailable: from a blip to a day.
OUTAGE = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One metric, named neutrally (each backend names it its own way)."""

    kind: str  # "counter" or "histogram"
    labels: tuple[str, ...]  # besides COMMON_LABELS
    description: str
    buckets: tuple[float, ...] = ()


SPECS: dict[str, Spec] = {
    "refreshes": Spec(
        "counter", ("reason",), "Refresh tokens this process spent (each one a refresh)"
    ),
    "refresh_duration": Spec(
        "histogram", (), "Time a refresh took, the wait for the lock included", SECONDS
    ),
    "adoptions": Spec("counter", (), "Tokens this process took up from another's refresh"),
    "unauthorized": Spec(
        "counter",
        ("outcome", "reason"),
        "401 answers: absorbed (sent again with a newer token) or returned to the caller",
    ),
    "lock_wait": Spec(
        "histogram", (), "Time spent waiting for another holder of the lock", SECONDS
    ),
    "refresh_failures": Spec("counter", ("error",), "Refreshes that failed, by error class"),
    "reauthorization_required": Spec(
        "counter", (), "Dead refresh tokens met: the seller must authorize the app again"
    ),
    "store_unavailable": Spec(
        "counter", ("error",), "Times the token store could not be read or written"
    ),
    "store_outage": Spec("histogram", (), "How long the token store was unavailable", OUTAGE),
}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One value for the metric ``key`` of :data:`SPECS`, with all its labels."""

    key: str
    value: float
    labels: dict[str, str]


def _common(event: events.Event) -> dict[str, str]:
    return {"store": printable(event.store)}


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a path's undecodable bytes (``os.fsdecode`` keeps them as lone
    surrogates) become ``\\xe9``. One such label would make Prometheus' whole exposition raise
    ``UnicodeEncodeError`` (an app's entire /metrics page), and OTLP exporters refuse it too."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no byte decoded to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _slug(text: str) -> str:
    # Label values read like the others (genuine, not_resendable): "ahead of expiry" becomes
    # ahead_of_expiry. The engine's reasons are a handful of fixed words, so no cardinality.
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def measurements(event: events.Event) -> list[Measurement]:
    """What ``event`` adds to the metrics (an unknown kind adds nothing)."""
    common = _common(event)

    def one(key: str, value: float = 1.0, **labels: str) -> Measurement:
        return Measurement(key, value, {**common, **labels})

    if isinstance(event, events.Refreshed):
        return [
            one("refreshes", reason=_slug(event.reason)),
            one("refresh_duration", event.duration_s),
        ]
    if isinstance(event, events.Adopted):
        return [one("adoptions")]
    if isinstance(event, events.UnauthorizedAbsorbed):
        # Absorbed 401s were all about a stale token: that is why a newer one was sent.
        return [one("unauthorized", outcome="absorbed", reason="stale_token")]
    if isinstance(event, events.UnauthorizedReturned):
        return [one("unauthorized", outcome="returned", reason=_slug(event.reason))]
    if isinstance(event, events.LockWaited):
        return [one("lock_wait", event.waited_ms / 1000.0)]
    if isinstance(event, events.RefreshFailed):
        return [one("refresh_failures", error=event.error)]
    if isinstance(event, events.ReauthorizationRequired):
        return [one("reauthorization_required")]
    if isinstance(event, events.StoreUnavailable):
        return [one("store_unavailable", error=event.error)]
    if isinstance(event, events.StoreBack):
        return [one("store_outage", event.down_s)]
    return []
