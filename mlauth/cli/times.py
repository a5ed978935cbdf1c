"""Moments and durations as the commands print them: for people (``in 5h59m``, ``2026-12-07
08:40:00 UTC``) and for the JSON documents (``{"unix", "utc"}``). A store may hand over any
float: an impossible time is said to be one, never a traceback."""

from __future__ import annotations

import datetime
import math
from typing import Any

__all__ = ["duration", "moment", "when"]


def duration(seconds: float) -> str:
    """``1h01m``, ``3m05s``, ``42s`` (the sign is dropped: callers say "ago" or "in")."""
    if not math.isfinite(seconds):
        return "an unknown time"
    seconds = abs(int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def when(stamp: float) -> str:
    """``2026-12-07 08:40:00 UTC``, or why ``stamp`` is no time at all."""
    try:
        utc = datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{stamp!r}: not a valid time"
    return utc.strftime("%Y-%m-%d %H:%M:%S UTC")


def moment(stamp: float | None) -> dict[str, Any] | None:
    """A moment as unix seconds and as RFC 3339 UTC text; None if unknown or impossible."""
    if stamp is None or not math.isfinite(stamp):
        return None
    try:
        utc = datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return {"unix": round(stamp, 3), "utc": utc.strftime("%Y-%m-%dT%H:%M:%SZ")}
