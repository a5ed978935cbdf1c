"""How a ``.env``'s bytes are written, and so how they are read: one class per way, one API.

Two ways ship, chosen once per file when its store is built (:func:`mlauth.stores.parts.parts_for`):
a new file renamed over the old one (:class:`~mlauth.stores.replace.ReplaceWriter`, readers see
the old or the new file whole) and a write in place (:class:`~mlauth.stores.inplace.InPlaceWriter`,
for a file bind-mounted alone, fenced from readers by a shared lock on its content). The store
calls them alike and never asks which one it has.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Hashable

__all__ = ["Writer"]


class Writer(abc.ABC):
    """Writes (and reads, and proves it could write) one ``.env``; raises as documented."""

    #: Whether the file is written in place (for ``repr``-like messages and tests; the store
    #: never branches on it).
    in_place: bool

    @abc.abstractmethod
    def read(self, path: str) -> tuple[bytes, os.stat_result]:
        """The file's bytes and its ``fstat`` (taken before the read); raises OSError.

        A read is fenced from a write as the write needs: a renamed file needs nothing.
        """

    @abc.abstractmethod
    def stamp_of(self, info: os.stat_result) -> Hashable:
        """The store's stamp of a file with this ``stat``: what changes at every save."""

    @abc.abstractmethod
    def write(self, real: str, data: bytes, before: os.stat_result) -> None:
        """Replace the content of ``real`` (whose ``stat`` was ``before``) with ``data``,
        durably; StoreError, with the fix, if it could not be done."""

    @abc.abstractmethod
    def probe(self, real: str, before: os.stat_result) -> None:
        """Raise OSError unless :meth:`write` would work now; changes nothing a reader sees."""

    @abc.abstractmethod
    def reason(self, exc: OSError) -> str:
        """Why :meth:`probe` failed with ``exc``, for a message that goes on to name the fix."""

    @abc.abstractmethod
    def fix(self, exc: OSError) -> str:
        """The fix to name after :meth:`reason`."""

    @abc.abstractmethod
    def check_peers(self, real: str) -> None:
        """StoreError if the processes sharing the file no longer agree on how it is written
        (asked under the lock, before anything is decided)."""

    def tidy(self, real: str) -> None:  # noqa: B027 (a writer without leftovers)
        """Remove what a writer killed mid-save left beside ``real`` (asked by recovery)."""

    def status_rows(self) -> list[tuple[str, str]]:
        """``mlauth status`` rows about the way the file is written (none for the usual way)."""
        return []
