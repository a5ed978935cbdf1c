"""The ``mlauth`` command: status, refresh, login, migrate, run and demo."""

from .commands import main

__all__ = ["main"]
