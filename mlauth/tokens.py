"""The token set a store holds, and how fresh it is: fresh, stale or invalid.

The vocabulary is google-auth's, used everywhere in mlauth: a FRESH token is sent as it is; a
STALE one (within the refresh margin of its expiry) still works, so it is refreshed ahead if
nobody else is doing it, never waited for; an INVALID one (none, or expired) must be replaced
before anything is sent, so the refresh is waited for and its failure raised.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
import time

from .secret import Secret

__all__ = ["Freshness", "TokenAnswer", "TokenSet", "this_process"]

# A refresh is started ahead of expiry by ``refresh_margin`` seconds, but never by more than
# this share of the token's lifetime: with the 2-second tokens of a test server a 300-second
# margin would refresh on every call.
MAX_MARGIN_SHARE = 0.25
# The last second of the year 9999: a stored time outside 0..LATEST_TIME (or not finite) is
# no unix time in seconds (milliseconds, a common slip, land far past it); stores refuse it.
LATEST_TIME = 253402300799.0


def this_process() -> str:
    """``pid N@host``: who refreshed, in the store and in journal records."""
    return f"pid {os.getpid()}@{socket.gethostname()}"


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"  # still valid, within the refresh margin of its expiry
    INVALID = "invalid"  # no access token, or past its known expiry


@dataclasses.dataclass(frozen=True)
class TokenAnswer:
    """A successful answer from the token endpoint."""

    access_token: Secret
    refresh_token: Secret | None
    expires_in: float | None


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """One link of the token chain, as stored.

    ``expires_at`` and ``refreshed_at`` are unix seconds (wall clock, shared by processes);
    either is None when unknown, for instance in a ``.env`` written by hand or by legacy code.
    """

    access_token: Secret | None
    refresh_token: Secret | None
    expires_at: float | None = None
    refreshed_at: float | None = None
    refreshed_by: str | None = None

    @classmethod
    def from_answer(
        cls, answer: TokenAnswer, spent: Secret, started: float, *, refreshed_by: str
    ) -> TokenSet:
        """The link that follows ``spent``: the answer's tokens, expiring from ``started``.

        An answer without a refresh token (an app without offline_access) keeps ``spent``.
        """
        return cls(
            access_token=answer.access_token,
            refresh_token=answer.refresh_token or spent,
            expires_at=None if answer.expires_in is None else started + answer.expires_in,
            refreshed_at=started,
            refreshed_by=refreshed_by,
        )

    @property
    def lifetime(self) -> float | None:
        if self.expires_at is None or self.refreshed_at is None:
            return None
        return max(self.expires_at - self.refreshed_at, 0.0)

    def margin(self, refresh_margin: float) -> float:
        """The effective proactive margin: ``refresh_margin`` capped by the token's lifetime."""
        lifetime = self.lifetime
        if lifetime is None:
            return refresh_margin
        return min(refresh_margin, lifetime * MAX_MARGIN_SHARE)

    def expires_in(self, now: float | None = None) -> float | None:
        if self.expires_at is None:
            return None
        return self.expires_at - (time.time() if now is None else now)

    def freshness(self, refresh_margin: float, now: float | None = None) -> Freshness:
        """FRESH, STALE (within the effective margin of expiry) or INVALID (see the module)."""
        if self.access_token is None:
            return Freshness.INVALID
        left = self.expires_in(now)
        if left is None or left > self.margin(refresh_margin):
            return Freshness.FRESH  # an unknown expiry counts as valid until its 401
        return Freshness.STALE if left > 0 else Freshness.INVALID

    def age(self, now: float | None = None) -> float | None:
        if self.refreshed_at is None:
            return None
        return (time.time() if now is None else now) - self.refreshed_at

    def describe(self) -> str:
        """A loggable summary: fingerprints and times, never a token."""
        access = self.access_token.fingerprint if self.access_token else "<none>"
        refresh = self.refresh_token.fingerprint if self.refresh_token else "<none>"
        left = self.expires_in()
        expiry = "unknown expiry" if left is None else f"expires in {left:.0f}s"
        return f"access={access} refresh={refresh} {expiry}"
