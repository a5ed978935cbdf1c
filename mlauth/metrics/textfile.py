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
import stat
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import prometheus_client
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mlauth import events
from mlauth.errors import ConfigError, StoreError
from mlauth.metrics import printable

__all__ = ["JOB_LABEL", "Textfile"]

log = logging.getLogger("mlauth.metrics")

#: The label naming the job a textfile belongs to.
JOB_LABEL = "job_name"
# Samples that add up across runs; the others (gauges, _created) are the writer's own.
_ADDITIVE_TYPES = ("counter", "histogram", "summary")
_ADDITIVE_SUFFIXES = ("_total", "_bucket", "_count", "_sum")

# This writes a few kilobytes; a file much larger is not one it wrote, and reading it whole
# (under the lock) would cost every run seconds and memory.
MAX_BYTES = 4 << 20
# Longer than any write takes, short enough that a cron job stuck behind a hung one fails.
LOCK_TIMEOUT = 10.0
# A temp file this old, of this file's name, was left by a writer that was killed.
STALE_TEMP_S = 600.0

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
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix != ".prom":
            raise ConfigError(
                f"{self.path}: node_exporter's textfile collector reads only *.prom files; "
                "name the file NAME.prom"
            )
        self.registry = registry
        self.job = printable(job if job is not None else self.path.stem)
        self.lock_timeout = lock_timeout
        self._written: dict[_Key, float] = {}  # what this process has added to the file
        self._at_fork: dict[_Key, float] = {}
        # A forked child (os.fork, then sys.exit: exit handlers run) inherits the registry
        # with the parent's counts in it; it must add only what it counts itself. The hooks
        # hold the writer weakly: they cannot be unregistered.
        me = weakref.ref(self)
        os.register_at_fork(
            before=lambda: _call(me, Textfile._snapshot),
            after_in_child=lambda: _call(me, Textfile._forked),
        )

    def write(self) -> None:
        """Deliver pending events, then add this process's counts to the file, atomically.

        Raises :class:`~mlauth.StoreError` (an ``OSError``) if the folder cannot be written
        or another writer of the file holds its lock for more than ``lock_timeout`` seconds.
        """
        events.flush()
        try:
            with self._locked():
                self._remove_stale_temp_files()
                families, written = self._merge(self._read())
                self._replace(prometheus_client.generate_latest(_registry_of(families)))
                # Only now: after a failed write the next one must add these counts again.
                self._written = written
        except StoreError:
            raise
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
            log.error("%s", exc)  # the message names the file already

    def _counted(self) -> dict[_Key, float]:
        """This process's additive samples, keyed as in the file."""
        return {
            _key(s.name, {**s.labels, JOB_LABEL: self.job}): s.value
            for family in self.registry.collect()
            for s in family.samples
            if _additive(family, s.name)
        }

    def _snapshot(self) -> None:
        # In the parent, before fork(): collecting in the child could wait forever on a
        # metric's lock that a thread of the parent held at the fork.
        self._at_fork = self._counted()

    def _forked(self) -> None:
        self._written, self._at_fork = self._at_fork, {}

    def _merge(self, before: dict[str, Metric]) -> tuple[list[Metric], dict[_Key, float]]:
        """The families to write, and what this process will then have added to the file."""
        old = {
            _key(s.name, s.labels): s.value
            for family in before.values()
            for s in family.samples
            if _additive(family, s.name)
        }
        ours = list(self.registry.collect())
        self._restart_mismatched_histograms(ours, before, old)
        written = dict(self._written)
        out: dict[str, Metric] = {}
        for family in ours:
            merged = out.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue  # this process's start: meaningless for the job's sums
                labels = {**s.labels, JOB_LABEL: self.job}
                key, value = _key(s.name, labels), s.value
                if _additive(family, s.name):
                    value = old.pop(key, 0.0) + s.value - written.get(key, 0.0)
                    written[key] = s.value
                merged.add_sample(s.name, labels, value)
        for family in before.values():  # series earlier runs counted and this one did not
            carried = [s for s in family.samples if _key(s.name, s.labels) in old]
            if carried:
                kept = out.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for s in carried:
                    kept.add_sample(s.name, s.labels, s.value)
        return list(out.values()), written

    def _restart_mismatched_histograms(
        self, ours: list[Metric], before: dict[str, Metric], old: dict[_Key, float]
    ) -> None:
        """Drop from ``old`` each histogram series whose bucket bounds differ from ours (a
        file an older version or another program wrote): added bucket by bucket, they would
        make a broken histogram (cumulative counts going down, stray ``le``). Restarted, the
        series reads to Prometheus as a counter reset."""
        theirs = _bucket_bounds(before.values(), None)
        mismatched = {
            series
            for series, les in _bucket_bounds(ours, self.job).items()
            if theirs.get(series, les) != les
        }
        if not mismatched:
            return
        for key in list(old):
            if _series(*key) in mismatched:
                del old[key]
        log.warning(  # names of ours only: nothing read from the file
            "metrics textfile %s: the histogram buckets of %s differ from this version's; "
            "those series restart",
            self.path,
            ", ".join(sorted({name for name, _ in mismatched})),
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A lock file of its own, never the .prom (renamed over at each write) and never
        # deleted: a waiter on a deleted lock file locks an inode no one else does.
        lock = f"{self.path}.lock"
        fd = _open_lock(lock)
        try:
            # Polled, with a deadline: a writer stuck while holding it (a hung NFS read, a
            # stopped process) must not hang every later run of the job in turn.
            deadline = time.monotonic() + self.lock_timeout
            pause = 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreError(
                            f"could not write the metrics textfile {self.path}: its lock "
                            f"{lock} stayed held by another process for {self.lock_timeout:g} "
                            "s; look for a stuck run of this job (fuser -v on the lock file)"
                        ) from None
                    time.sleep(min(pause, left))
                    pause = min(pause * 2, 0.05)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Metric]:
        """The file's families by name; none if it is missing, or not what this writes."""
        text = self._read_text()
        if text is None:
            return {}
        try:
            return {f.name: f for f in text_string_to_metric_families(text)}
        except ValueError:  # the parser's message quotes the line: not logged
            log.warning("metrics textfile %s is not Prometheus text: its counts restart", self.path)
            return {}

    def _read_text(self) -> str | None:
        # O_NONBLOCK: a FIFO planted at the path would otherwise block the open forever, the
        # lock held. O_NOFOLLOW: a symlink is not ours to read.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a symlink (ELOOP) or no permission
            log.warning("metrics textfile %s not read (%s): its counts restart", self.path, exc)
            return None
        with open(fd, "rb") as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                log.warning(
                    "metrics textfile %s is not a regular file: its counts restart", self.path
                )
                return None
            data = file.read(MAX_BYTES + 1)  # it may have grown since the fstat
        if info.st_size > MAX_BYTES or len(data) > MAX_BYTES:
            log.warning(
                "metrics textfile %s is larger than %d bytes, more than this writes: "
                "its counts restart",
                self.path,
                MAX_BYTES,
            )
            return None
        return data.decode("utf-8", "replace")

    def _remove_stale_temp_files(self) -> None:
        # Under the lock no writer of this file is between mkstemp and rename, so the temp
        # files of its name are left by killed writers; the age check spares one that some
        # other path to this folder (another lock file) might be writing.
        prefix = f".{self.path.name}."
        folder = self.path.parent
        now = time.time()
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
                    continue
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_TEMP_S:
                        os.unlink(entry.path)

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


def _open_lock(lock: str) -> int:
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | flags, 0o644)
    except PermissionError:
        # A lock file this user may not write (another user's, or immutable): flock needs
        # only an open descriptor, and a read-only one will do.
        return os.open(lock, os.O_RDONLY | flags)


def _call(ref: weakref.ref[Textfile], method: Callable[[Textfile], None]) -> None:
    writer = ref()
    if writer is not None:
        method(writer)


_Series = tuple[str, tuple[tuple[str, str], ...]]  # a histogram's name, its labels but le
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _series(sample_name: str, labels: tuple[tuple[str, str], ...]) -> _Series | None:
    for suffix in _HISTOGRAM_SUFFIXES:
        if sample_name.endswith(suffix):
            return sample_name.removesuffix(suffix), tuple(kv for kv in labels if kv[0] != "le")
    return None


def _bucket_bounds(families: Iterable[Metric], job: str | None) -> dict[_Series, frozenset[str]]:
    """Each histogram series: its set of ``le`` bounds (``job``: the job label to add)."""
    bounds: dict[_Series, set[str]] = {}
    for family in families:
        if family.type != "histogram":
            continue
        for s in family.samples:
            labels = {**s.labels, JOB_LABEL: job} if job is not None else s.labels
            series = _series(s.name, tuple(sorted(labels.items())))
            if series is not None and series[0] == family.name:
                les = bounds.setdefault(series, set())
                if "le" in s.labels:
                    les.add(s.labels["le"])
    return {series: frozenset(les) for series, les in bounds.items()}


def _registry_of(families: list[Metric]) -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return registry
