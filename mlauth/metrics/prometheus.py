"""mlauth's events as Prometheus metrics (``pip install 'mlauth[prometheus]'``).

For a service that is scraped::

    from mlauth.metrics import prometheus

    prometheus.install()  # on prometheus_client's REGISTRY, or install(registry=...)

For a cron job that exits before any scrape, node_exporter's textfile collector::

    prometheus.textfile("/var/lib/node_exporter/textfile/sync-orders.prom")

Counters and histograms follow Prometheus' conventions (``_total``, ``_seconds``, base units),
each with a ``store`` label (the redacted store location). See docs/monitoring.md#metrics.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - exercised in a test by hiding the package
    raise ImportError(
        "mlauth.metrics.prometheus needs prometheus_client: pip install 'mlauth[prometheus]'"
    ) from exc

from mlauth import events
from mlauth.errors import ConfigError
from mlauth.metrics import COMMON_LABELS, SPECS, measurements, printable
from mlauth.metrics.textfile import Textfile

__all__ = ["NAMES", "PrometheusMetrics", "Textfile", "install", "textfile"]

log = logging.getLogger("mlauth.metrics")

#: Each metric of :data:`mlauth.metrics.SPECS`: its name as exposed (a counter's ``_total``
#: is added by prometheus_client).
NAMES: dict[str, str] = {
    "refreshes": "mlauth_refreshes_total",
    "refresh_duration": "mlauth_refresh_duration_seconds",
    "adoptions": "mlauth_adoptions_total",
    "unauthorized": "mlauth_unauthorized_total",
    "lock_wait": "mlauth_lock_wait_seconds",
    "refresh_failures": "mlauth_refresh_failures_total",
    "reauthorization_required": "mlauth_reauthorization_required_total",
    "store_unavailable": "mlauth_store_unavailable_total",
    "store_outage": "mlauth_store_outage_seconds",
}


class PrometheusMetrics:
    """mlauth's counters and histograms on one registry, fed by an event subscription."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry
        self._metrics: dict[str, prometheus_client.Counter | prometheus_client.Histogram] = {}
        for key, spec in SPECS.items():
            labels = (*COMMON_LABELS, *spec.labels)
            if spec.kind == "counter":
                name = NAMES[key].removesuffix("_total")
                self._metrics[key] = prometheus_client.Counter(
                    name, spec.description, labels, registry=registry
                )
            else:
                self._metrics[key] = prometheus_client.Histogram(
                    NAMES[key], spec.description, labels, registry=registry, buckets=spec.buckets
                )
        self.subscription = events.subscribe(self.record)

    def record(self, event: events.Event) -> None:
        """Add ``event`` to the metrics (called on mlauth's event thread)."""
        for m in measurements(event):
            metric = self._metrics[m.key].labels(**m.labels)
            if isinstance(metric, prometheus_client.Counter):
                metric.inc(m.value)
            else:
                metric.observe(m.value)

    def cancel(self) -> None:
        """Stop recording and take the metrics off the registry."""
        self.subscription.cancel()
        with _lock:
            for metric in self._metrics.values():
                self.registry.unregister(metric)
            _installed.pop(id(self.registry), None)


_lock = threading.RLock()  # textfile() installs under it
_installed: dict[int, PrometheusMetrics] = {}


def install(registry: prometheus_client.CollectorRegistry | None = None) -> PrometheusMetrics:
    """Count mlauth's events on ``registry`` (default: prometheus_client's ``REGISTRY``, the
    one its HTTP server and ``generate_latest()`` serve). Once per registry: a second call
    returns the first handle. ``.cancel()`` stops and unregisters."""
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _lock:
        if id(registry) not in _installed:
            _installed[id(registry)] = PrometheusMetrics(registry)
        return _installed[id(registry)]


def textfile(
    path: str | os.PathLike[str],
    *,
    job: str | None = None,
    registry: prometheus_client.CollectorRegistry | None = None,
    at_exit: bool = True,
) -> Textfile:
    """Keep ``path`` (a ``.prom`` file in node_exporter's textfile folder) up to date with
    mlauth's metrics: written when the process exits (``at_exit``) and on each ``.write()``.

    The file is this *job's*: its counters add up over the job's runs (each run adds what it
    counted to what the file held), and every series has a ``job_name`` label (``job``, or the
    file's name without ``.prom``), so two jobs on one ``.env`` never clash in the collector.
    ``registry``: where the metrics are counted; by default a new one, installed here and
    holding mlauth's metrics only (the default REGISTRY's ``process_*`` metrics would clash
    with node_exporter's own). Once per path: a second call returns the first handle (two
    would each add every event to the file).
    """
    where = os.path.abspath(path)
    with _lock:
        writer = _textfiles.get(where)
        if writer is None:
            if registry is None:
                registry = prometheus_client.CollectorRegistry()
                install(registry)
            writer = _textfiles[where] = Textfile(path, registry, job=job)
        elif (job is not None and printable(job) != writer.job) or registry not in (
            None,
            writer.registry,
        ):
            raise ConfigError(
                f"{path}: prometheus.textfile() was already set up for this file with another "
                "job or registry; one file holds one job: give the other a file of its own"
            )
        if at_exit and id(writer) not in _at_exit:
            _at_exit.add(id(writer))
            atexit.register(writer.write_at_exit)
    return writer


_textfiles: dict[str, Textfile] = {}
_at_exit: set[int] = set()
