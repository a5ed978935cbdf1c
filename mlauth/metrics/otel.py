"""mlauth's events as OpenTelemetry metrics (``pip install 'mlauth[otel]'``)::

    import mlauth.metrics.otel

    mlauth.metrics.otel.install()  # the global MeterProvider, or install(meter_provider=...)

Only the OpenTelemetry *API* is needed: until the application configures an SDK (a
``MeterProvider`` with a reader and an exporter), every measurement is a no-op, and once it
does, instruments made earlier through the global provider start recording. The Meter is
named ``mlauth``; names and units follow OpenTelemetry's semantic-convention style (dotted
lower-case names, durations in seconds, ``{annotation}`` units for counts, ``error.type`` for
an error's class). See docs/monitoring.md#metrics for the table.

The function is ``install`` like :func:`mlauth.install`: a process-wide switch, on once and
left on (a second call with the same provider returns the first handle).
"""

from __future__ import annotations

import threading

try:
    from opentelemetry import metrics as otel_metrics
except ImportError as exc:  # pragma: no cover - exercised in a test by hiding the package
    raise ImportError(
        "mlauth.metrics.otel needs the OpenTelemetry API: pip install 'mlauth[otel]'"
    ) from exc

import mlauth
from mlauth import events
from mlauth.metrics import SPECS, measurements

__all__ = ["ATTRIBUTES", "INSTRUMENTS", "OtelMetrics", "install"]

#: Each metric of :data:`mlauth.metrics.SPECS`: its OpenTelemetry name and unit.
INSTRUMENTS: dict[str, tuple[str, str]] = {
    "refreshes": ("mlauth.refreshes", "{refresh}"),
    "refresh_duration": ("mlauth.refresh.duration", "s"),
    "adoptions": ("mlauth.adoptions", "{adoption}"),
    "unauthorized": ("mlauth.unauthorized", "{response}"),
    "lock_wait": ("mlauth.lock.wait_time", "s"),
    "refresh_failures": ("mlauth.refresh.failures", "{failure}"),
    "reauthorization_required": ("mlauth.reauthorizations_required", "{event}"),
    "store_unavailable": ("mlauth.store.unavailable", "{outage}"),
    "store_outage": ("mlauth.store.outage.duration", "s"),
}

#: Each label's attribute name (``error.type`` is the semantic conventions' own).
ATTRIBUTES: dict[str, str] = {
    "store": "mlauth.store",
    "seller": "mlauth.seller",
    "reason": "mlauth.reason",
    "outcome": "mlauth.outcome",
    "error": "error.type",
}


class OtelMetrics:
    """The instruments made on one MeterProvider, fed by an event subscription."""

    def __init__(self, meter_provider: otel_metrics.MeterProvider | None) -> None:
        self.meter_provider = meter_provider  # kept alive: install() knows it by its id
        meter = otel_metrics.get_meter("mlauth", mlauth.__version__, meter_provider)
        self._record: dict[str, otel_metrics.Counter | otel_metrics.Histogram] = {}
        for key, spec in SPECS.items():
            name, unit = INSTRUMENTS[key]
            if spec.kind == "counter":
                self._record[key] = meter.create_counter(name, unit, spec.description)
            else:
                self._record[key] = meter.create_histogram(
                    name, unit, spec.description, explicit_bucket_boundaries_advisory=spec.buckets
                )
        self.subscription = events.subscribe(self.record)

    def record(self, event: events.Event) -> None:
        """Add ``event`` to the instruments (called on mlauth's event thread)."""
        for m in measurements(event):
            attributes = {ATTRIBUTES[k]: v for k, v in m.labels.items()}
            instrument = self._record[m.key]
            if isinstance(instrument, otel_metrics.Counter):
                instrument.add(int(m.value), attributes)  # counts: whole numbers
            else:
                instrument.record(m.value, attributes)

    def cancel(self) -> None:
        """Stop recording (OpenTelemetry has no way to remove the instruments themselves)."""
        self.subscription.cancel()
        with _lock:
            for key, handle in list(_installed.items()):
                if handle is self:
                    del _installed[key]


_lock = threading.Lock()
_installed: dict[int | None, OtelMetrics] = {}


def install(meter_provider: otel_metrics.MeterProvider | None = None) -> OtelMetrics:
    """Record mlauth's events as metrics through ``meter_provider`` (default: the global one,
    a no-op until the application sets an SDK's). Returns the handle; ``.cancel()`` stops."""
    key = None if meter_provider is None else id(meter_provider)
    with _lock:
        if key not in _installed:
            _installed[key] = OtelMetrics(meter_provider)
        return _installed[key]
