"""Which incidents are open on a store, agreed by every process that uses it (for
:mod:`mlauth.alerts`): the first process to open one is the one that alerts."""

from __future__ import annotations

import logging
import os
import threading
from typing import Protocol

from .private import open_own

__all__ = ["FileIncidents", "Incidents", "MemoryIncidents"]

log = logging.getLogger("mlauth")


class Incidents(Protocol):
    """Where the processes of one store record which incidents are open."""

    def open(self, name: str, value: str) -> tuple[bool, str]:
        """Open ``name`` with ``value`` unless it is open: (whether this call opened it, the
        value it holds)."""

    def close(self, name: str) -> None:
        """Close ``name`` (nothing if it is not open)."""


class MemoryIncidents:
    """Incidents this process alone knows of: a store that cannot keep them."""

    def __init__(self) -> None:
        self._open: dict[str, str] = {}
        self._lock = threading.Lock()

    def open(self, name: str, value: str) -> tuple[bool, str]:
        with self._lock:
            held = self._open.setdefault(name, value)
            return held is value, held

    def close(self, name: str) -> None:
        with self._lock:
            self._open.pop(name, None)


class FileIncidents:
    """One file per open incident beside the ``.env`` (``<.env>.incident.<name>``), made with
    ``O_EXCL``: of all the processes that open one at once, exactly one makes it. A folder
    they cannot write falls back to this process's memory."""

    def __init__(self, real: str) -> None:
        self._prefix = f"{real}.incident."
        self._memory = MemoryIncidents()

    def open(self, name: str, value: str) -> tuple[bool, str]:
        path = self._prefix + name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return False, self._read(path) or value
        except OSError as exc:
            log.debug("cannot record the incident %s: %s", path, exc)
            return self._memory.open(name, value)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        return True, value

    def _read(self, path: str) -> str | None:
        try:
            fd = open_own(path, os.O_RDONLY, "incident record")
        except (OSError, ValueError):
            return None
        try:
            return os.read(fd, 4096).decode(errors="replace") or None
        finally:
            os.close(fd)

    def close(self, name: str) -> None:
        self._memory.close(name)
        try:
            os.unlink(self._prefix + name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.debug("cannot close the incident %s: %s", name, exc)
