"""A Prometheus registry written to a ``.prom`` file for node_exporter's textfile collector.

A cron job exits long before a scrape; node_exporter reads the files of its textfile folder
at each scrape instead. Three rules shape the writer:

- **Atomic**: the collector may read at any moment, so the file is written whole under a
  random name in the same folder (``O_EXCL``, never followed through a symlink someone
  planted) and renamed over the old one. ``prometheus_client.write_to_textfile`` does the
  rename too, but from a predictable ``<path>.<pid>.<thread>`` name opened with ``open()``:
  a symlink planted there would redirect the write.
- **Counters add up over runs**: a file holds one process's values, and a counter that
  starts from zero at every run looks to Prometheus like the same value again (``increase()``
  sees nothing). So the file is the job's own: each write adds what this process counted
  since its last write to what the file holds (counters, histogram buckets, ``_sum`` and
  ``_count``), under an ``flock`` on ``<path>.lock`` so overlapping runs lose nothing. Gauges
  are this process's values. Delete the file to start again (Prometheus sees a reset).
- **One file per job**: each series gets a ``job_name`` label, so files of two jobs that use
  the same store hold different series (the collector refuses the same series twice).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mlauth import events
from mlauth.errors import ConfigError, StoreError

__all__ = ["JOB_LABEL", "Textfile"]

log = logging.getLogger("mlauth.metrics")

#: The label naming the job a textfile belongs to.
JOB_LABEL = "job_name"
# Samples that add up across runs; the others (gauges, _created) are the writer's own.
_ADDITIVE_TYPES = ("counter", "histogram", "summary")
_ADDITIVE_SUFFIXES = ("_total", "_bucket", "_count", "_sum")

_Key = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> _Key:
    return name, tuple(sorted(labels.items()))


def _additive(family: Metric, sample_name: str) -> bool:
    return family.type in _ADDITIVE_TYPES and sample_name.endswith(_ADDITIVE_SUFFIXES)


class _Families(Collector):
    """Ready metric families, as a registry's collector (to print them the standard way)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class Textfile:
    """``path``, kept as the sum of what this job's runs counted on ``registry``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        registry: prometheus_client.CollectorRegistry,
        *,
        job: str | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix != ".prom":
            raise ConfigError(
                f"{self.path}: node_exporter's textfile collector reads only *.prom files; "
                "name the file NAME.prom"
            )
        self.registry = registry
        self.job = job if job is not None else self.path.stem
        self._written: dict[_Key, float] = {}  # what this process has added to the file

    def write(self) -> None:
        """Deliver pending events, then add this process's counts to the file, atomically.

        Raises :class:`~mlauth.StoreError` (an ``OSError``) if the folder cannot be written.
        """
        events.flush()
        try:
            with self._locked():
                families = self._merge(self._read())
                self._replace(prometheus_client.generate_latest(_registry_of(families)))
        except OSError as exc:
            raise StoreError(
                f"could not write the metrics textfile {self.path}: {exc.strerror or exc}; "
                "make its folder writable by this user"
            ) from exc

    def write_at_exit(self) -> None:
        """:meth:`write`, logging instead of raising (an exit handler's traceback helps no one
        reading a cron mail)."""
        try:
            self.write()
        except StoreError as exc:
            log.error("could not write the metrics textfile %s: %s", self.path, exc)

    def _merge(self, before: dict[str, Metric]) -> list[Metric]:
        old = {
            _key(s.name, s.labels): s.value
            for family in before.values()
            for s in family.samples
            if _additive(family, s.name)
        }
        out: dict[str, Metric] = {}
        for family in self.registry.collect():
            merged = out.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue  # this process's start: meaningless for the job's sums
                labels = {**s.labels, JOB_LABEL: self.job}
                key, value = _key(s.name, labels), s.value
                if _additive(family, s.name):
                    value = old.pop(key, 0.0) + s.value - self._written.get(key, 0.0)
                    self._written[key] = s.value
                merged.add_sample(s.name, labels, value)
        for family in before.values():  # series earlier runs counted and this one did not
            carried = [s for s in family.samples if _key(s.name, s.labels) in old]
            if carried:
                kept = out.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for s in carried:
                    kept.add_sample(s.name, s.labels, s.value)
        return list(out.values())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A lock file of its own, never the .prom (renamed over at each write) and never
        # deleted: a waiter on a deleted lock file locks an inode no one else does.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(f"{self.path}.lock", flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Metric]:
        """The file's families by name; none if it is missing, or not what this writes."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:  # a symlink (ELOOP) or no permission
            log.warning("metrics textfile %s not read (%s): its counts restart", self.path, exc)
            return {}
        with open(fd, encoding="utf-8", errors="replace") as file:
            text = file.read()
        try:
            return {f.name: f for f in text_string_to_metric_families(text)}
        except ValueError:  # the parser's message quotes the line: not logged
            log.warning("metrics textfile %s is not Prometheus text: its counts restart", self.path)
            return {}

    def _replace(self, data: bytes) -> None:
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with open(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
                os.fchmod(file.fileno(), 0o644)  # node_exporter runs as another user
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _registry_of(families: list[Metric]) -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return registry
