"""The token set a store holds, and when it counts as fresh, stale or expired."""

from __future__ import annotations

import dataclasses
import time

from .secret import Secret

__all__ = ["TokenSet"]

# A refresh is started ahead of expiry by ``refresh_margin`` seconds, but never by more than
# this share of the token's lifetime: with the 2-second tokens of a test server a 300-second
# margin would refresh on every call.
MAX_MARGIN_SHARE = 0.25
# The last second of the year 9999: a stored time outside 0..LATEST_TIME (or not finite) is
# no unix time in seconds (milliseconds, a common slip, land far past it); stores refuse it.
LATEST_TIME = 253402300799.0


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

    def is_expired(self, now: float | None = None) -> bool:
        """No access token, or one past its known expiry. Unknown expiry counts as valid."""
        if self.access_token is None:
            return True
        left = self.expires_in(now)
        return left is not None and left <= 0

    def needs_refresh(self, refresh_margin: float, now: float | None = None) -> bool:
        """Expired, or within the margin of its known expiry."""
        if self.access_token is None:
            return True
        left = self.expires_in(now)
        return left is not None and left <= self.margin(refresh_margin)

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
