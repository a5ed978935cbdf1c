"""Noticing a peer's save without a system call per request.

Before every request the engine asks whether the store changed since it read it. A ``stat``
of the ``.env`` answers exactly, but costs about 2 µs on requests' path, half of what mlauth
adds to a request. :class:`StampWatch` answers from memory instead, two ways:

- **Saves by mlauth**, in any process on this kernel that shares the folder (containers that
  mount it included), bump a counter in a small file beside the ``.env``
  (``<.env>.generation``, 8 bytes), which every process maps into memory: a change shows at
  the next request through a plain memory read, and only then is the ``.env`` ``stat``-ed.
  The bump comes after the file is replaced, and a reader reads the counter *before* its
  ``stat``, so a reader that sees the new count also sees the new file.
- **Any other writer** (an editor, a legacy script, an mlauth too old to bump the counter)
  is noticed by a ``stat`` at most every :data:`STAT_INTERVAL` seconds, and at once by
  :meth:`StampWatch.precise`, which the engine asks after a 401 and under the lock.

Where no counter can be mapped safely, every check is a ``stat``, as before: a ``.env``
bind-mounted alone (each container has its own folder, so a file beside it would be shared
by nobody; only the inode is, and the ``.env`` itself cannot be mapped: it shrinks), a
read-only folder that holds no counter yet, or a counter file that is refused (planted by
another user, a link, one with two names; :func:`mlauth.stores.private.open_own`).

Why a file of its own: a mapped file that another opener shrinks kills the reader with
``SIGBUS`` on its next read. The lock file is opened by filelock (older versions truncate it)
and the ``.env`` by everyone; the counter file is opened only here and never truncated. It is
also read-only (0400) between saves, each save making it writable for its one write: a copy
over it by its owner that truncates in place (``cp -a backup/. app/``, a shell's ``>``) then
fails instead of crashing every process that maps it. Not every copy: ``rsync --inplace``
makes a read-only file writable for its write, and root ignores the mode; stop the processes
before restoring the folder over itself. It is
made allocated (``posix_fallocate``), never as a hole: on a full tmpfs, the first touch of a
hole through a mapping is ``SIGBUS`` too. The first process that finds the ``.env`` and no
counter makes it; a missing ``.env`` gets nothing beside it. A counter file that is deleted
(or replaced) while mapped splits nobody for long: the name is looked at again with every
:data:`STAT_INTERVAL` ``stat`` and mapped anew.

A forked child inherits the shared mapping and the last look, both still right: nothing is
rebuilt after ``fork``. ``time.monotonic`` is a vDSO call on Linux, not a system call.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable, Hashable

from mlauth.errors import StoreError

from .private import open_own

__all__ = ["COUNTER_SUFFIX", "STAT_INTERVAL", "StampWatch"]

log = logging.getLogger("mlauth")

#: A change by a writer that does not bump the counter shows within this many seconds.
STAT_INTERVAL = 0.5
#: The counter file is the ``.env``'s real path plus this.
COUNTER_SUFFIX = ".generation"
_WHAT = "save counter"
_COUNT = struct.Struct("=Q")  # native order: every process on one kernel shares it
_SIZE = _COUNT.size
#: The counter file's mode between saves: read-only even for its owner, so that a copy over
#: it (``cp``, a shell's ``>``), which would truncate it in place and kill every process that
#: maps it (SIGBUS), fails instead. Root and ``rsync --inplace`` get past it: see the module's
#: docstring.
_MODE = stat.S_IRUSR

# The counter as mapped (a memoryview of one native unsigned 64-bit cell), the count read
# from it, the precise stamp taken after that read, and until when (monotonic) the stamp
# may be answered from memory if the count has not moved.
_Seen = tuple[memoryview, int, Hashable, float]
_Mapped = tuple[memoryview, int, int]  # the cell, and the (device, inode) it maps
_refused: set[str] = set()  # counter files refused as planted, warned about once
_fallocate: Callable[[int, int, int], None] | None = getattr(os, "posix_fallocate", None)


def _make(path: str | None) -> bool:
    """Make the counter file (read-only, :data:`_MODE`; one count of zero) beside a store
    that exists; whether it is there now. A read-only folder, or one this user may not
    write, gets none."""
    if path is None or _fallocate is None:
        return False  # (macOS has no posix_fallocate: there the first save makes it)
    try:
        # Born read-only (the open that creates it may still write it), never chmod-ed here:
        # a peer's save may be between its two chmods on a file that came meanwhile, and a
        # chmod back to read-only would refuse that save's write.
        fd = open_own(path, os.O_RDWR, _WHAT, create=True, mode=_MODE)
    except StoreError:
        return False  # planted meanwhile: _map says so when it looks
    except OSError as exc:  # also one made read-only by another process meanwhile: it is there
        log.debug("cannot make the save counter %s: %s", path, exc)
        return os.path.isfile(path)
    try:
        # Allocated, not truncated to size: a hole in a file on tmpfs gets its page only
        # when first touched, and a mapping that touches it on a full tmpfs gets SIGBUS.
        # fallocate never overwrites: a save's count written since the open is kept.
        _fallocate(fd, 0, _SIZE)
    except OSError as exc:
        log.debug("cannot size the save counter %s: %s", path, exc)
        return False
    finally:
        os.close(fd)
    return True


def _map(path: str) -> _Mapped | None:
    """The counter file mapped read-only, or None (every check is then a ``stat``).

    Readers never write it (:func:`_make` only creates it, beside a ``.env`` that exists); a
    file shorter than a count is left for the next save to rewrite, and until then each
    check is a ``stat``, which misses nothing.
    """
    try:
        fd = open_own(path, os.O_RDONLY, _WHAT)
    except StoreError as exc:  # planted: a link, another user's file, two names, a FIFO
        # Looked at again every interval: said once per process and file, not each time.
        if path not in _refused:
            _refused.add(path)
            log.warning("%s; peers' saves are noticed by a stat per request instead", exc)
        return None
    except OSError as exc:  # missing (no save yet), or not readable by this user
        log.debug("no save counter to map at %s: %s", path, exc)
        return None
    try:
        info = os.fstat(fd)
        if info.st_size < _SIZE or info.st_blocks == 0:
            # Mapped, a missing page (a short file), or a hole a full tmpfs cannot fill (a
            # sparse copy: `truncate -s`, `cp --sparse`), would kill the reader (SIGBUS).
            return None
        view = mmap.mmap(fd, _SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError) as exc:  # a filesystem that cannot map files
        log.debug("cannot map the save counter %s: %s", path, exc)
        return None
    finally:
        os.close(fd)  # the mapping keeps the file
    return memoryview(view).cast("Q"), info.st_dev, info.st_ino


class StampWatch:
    """The store's stamp, taken with a system call only when something may have changed.

    ``stamp`` is the precise stamp (for the ``.env``: a ``stat``); ``counter_path`` the save
    counter beside it, or None where none can be shared (then :meth:`quick` is
    :meth:`precise`). ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        stamp: Callable[[], Hashable],
        counter_path: str | None,
        *,
        interval: float = STAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stamp = stamp
        self.counter_path = counter_path
        self.interval = interval
        self.clock = clock
        self._seen: _Seen | None = None
        self._mapped: _Mapped | None = None
        self._looked_until = -float("inf")  # when the counter's name is looked at again
        self._absent = False  # no file has the counter's name (at the last look)

    def quick(self) -> Hashable:
        """The stamp, from memory while the counter has not moved and the interval runs."""
        seen = self._seen
        if seen is not None:
            cell, count, stamp, until = seen
            # The clock first: past the interval the counter's file is looked at before it
            # is read.
            if self.clock() < until and cell[0] == count:
                return stamp
        return self.precise()

    def precise(self) -> Hashable:
        """The stamp taken now; what :meth:`quick` answers next until something moves."""
        now = self.clock()
        cell = self._counter(now)
        count = cell[0] if cell is not None else 0  # read before the stamp: see the module
        stamp = self._stamp()
        if cell is None and self._absent and stamp is not None:
            # Tried once per look: a folder this user may not write refuses it every time.
            self._absent = False
            if _make(self.counter_path):
                self._looked_until = now  # made: mapped at the next look, the count read first
        self._seen = None if cell is None else (cell, count, stamp, now + self.interval)
        return stamp

    def bump(self) -> None:
        """Tell every process watching that the store was just saved (call after the save,
        under the refresh lock, so counts never race). Never raises: the save is done, and
        a peer that misses the bump still sees the change within the interval or at its
        next 401."""
        path = self.counter_path
        if path is None:
            return
        try:
            fd = open_own(path, os.O_RDONLY, _WHAT, create=True)
            try:
                old = os.pread(fd, _SIZE, 0)
                count = _COUNT.unpack(old)[0] + 1 if len(old) == _SIZE else 1
                os.fchmod(fd, _MODE | stat.S_IWUSR)  # writable for this one write (see _MODE)
                try:
                    writable = open_own(path, os.O_WRONLY, _WHAT)
                    try:
                        os.pwrite(writable, _COUNT.pack(count % (1 << 64)), 0)
                    finally:
                        os.close(writable)
                finally:
                    os.fchmod(fd, _MODE)
            finally:
                os.close(fd)
        except (OSError, StoreError) as exc:
            log.warning(
                "could not bump the save counter %s (%s): other processes notice this save "
                "within %gs or at their next 401",
                path,
                exc,
                self.interval,
            )

    def _counter(self, now: float) -> memoryview | None:
        """The mapped counter; its name is looked at again at most once per interval, and
        mapped anew if it names another file (deleted, replaced) or none fit to map."""
        if self.counter_path is None:
            return None
        mapped = self._mapped
        if now < self._looked_until:
            return None if mapped is None else mapped[0]
        # No lock: two threads that look at once map twice, and one mapping is dropped. (A
        # lock held by another thread at a fork would stay held in the child for ever.)
        self._looked_until = now + self.interval
        try:
            info = os.lstat(self.counter_path)
        except OSError as exc:
            self._absent = isinstance(exc, FileNotFoundError)  # new here, or deleted
            mapped = self._mapped = None
            return None
        self._absent = False
        if mapped is None or (info.st_dev, info.st_ino) != mapped[1:] or info.st_size < _SIZE:
            mapped = self._mapped = _map(self.counter_path)
        return None if mapped is None else mapped[0]
