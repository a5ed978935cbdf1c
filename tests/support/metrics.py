"""Reading metrics back: an OpenTelemetry in-memory reader's points and a Prometheus
registry's samples, as plain sums keyed by name and labels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)
from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample


def otel_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, object], float]]]:
    """Each instrument of the ``mlauth`` meter: (attributes, value) per point; a histogram's
    value is its count."""
    found: dict[str, list[tuple[dict[str, object], float]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            if scope.scope.name != "mlauth":
                continue
            for metric in scope.metrics:
                points = found.setdefault(f"{metric.name} [{metric.unit}]", [])
                assert isinstance(metric.data, (Sum, Histogram))
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        points.append((dict(point.attributes or {}), float(point.count)))
                    else:
                        assert isinstance(point, NumberDataPoint)
                        points.append((dict(point.attributes or {}), float(point.value)))
    return found


def otel_total(
    points: dict[str, list[tuple[dict[str, object], float]]], name: str, **attributes: object
) -> float:
    """The sum of ``name``'s points whose attributes include ``attributes``."""
    return sum(
        value
        for attrs, value in points.get(name, [])
        if all(attrs.get(k) == v for k, v in attributes.items())
    )


def samples_of(families: Iterable[object]) -> list[Sample]:
    return [sample for family in families for sample in family.samples]  # type: ignore[attr-defined]


def prom_total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def prom_samples(registry: CollectorRegistry) -> list[Sample]:
    return samples_of(registry.collect())


def label_values(samples: Iterable[Sample], name: str, label: str) -> Counter[str]:
    return Counter(s.labels[label] for s in samples if s.name == name)
