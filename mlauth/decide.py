"""The engine's decision, as a pure function: adopt the tokens at hand, return the 401, or spend.

:func:`decide` looks at one :class:`~mlauth.tokens.TokenSet` (what the store holds under the
lock, after tokens whose save failed were reconciled with it), the :class:`Need` that brought
the caller here and the time, and nothing else: no store, no lock, no clock of its own. The
engine (:mod:`mlauth.engine`) does the waiting, locking and spending around it; the tests
(``tests/test_engine.py``) check it by table.

A need is named once, where a request meets it, and never re-decided (botocore's
``_protected_refresh`` keeps one ``is_mandatory`` flag the same way): a refresh ahead of
expiry, an expired token, a 401 on token T, a refresh asked for (as a 401 on the token
held), or a forced one.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable

from .secret import Secret
from .tokens import MAX_MARGIN_SHARE, Freshness, TokenSet

__all__ = ["REAL_CLOCK", "Clock", "Decision", "Need", "answers", "decide", "other_than", "young"]


@dataclasses.dataclass(frozen=True)
class Clock:
    """Where the engine reads the time: ``wall`` (unix seconds) for expiries, which processes
    share through the store, and ``monotonic`` for its own windows (a backoff, a retry),
    which a change of the system clock must not stretch or cut. Tests pass fake ones."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


REAL_CLOCK = Clock()


class Decision(enum.Enum):
    ADOPT = "adopt"  # the tokens at hand meet the need: nothing is spent
    RETURN_401 = "return the 401"  # a genuine 401: the token was refreshed moments ago
    SPEND = "spend"  # spend the refresh token and commit its successor


@dataclasses.dataclass(frozen=True)
class Need:
    """Why a refresh is considered. Build one with the class methods.

    ``failed``: the access token that must not be sent again (after a 401 on it, or the one
    held when a refresh is asked for). ``mandatory``: the caller waits for both locks and gets
    the failure raised; a refresh ahead of expiry does neither. ``forced``: the refresh token
    found under the lock is spent whatever the tokens look like; only tokens that follow
    another refresh token (``spends``: a writer that takes no lock rotated it meanwhile) are
    as good as the ones this refresh would get.
    """

    reason: str
    failed: Secret | None = None
    mandatory: bool = True
    forced: bool = False
    spends: Secret | None = None

    @classmethod
    def ahead(cls) -> Need:
        return cls("ahead of expiry", mandatory=False)

    @classmethod
    def expired(cls) -> Need:
        return cls("expired")

    @classmethod
    def after_401(cls, failed: Secret) -> Need:
        return cls("401", failed)

    @classmethod
    def requested(cls, held: Secret | None) -> Need:
        return cls("requested", held)

    @classmethod
    def forced_refresh(cls) -> Need:
        return cls("forced", forced=True)

    def found(self, tokens: TokenSet) -> Need:
        """This need, told what the store held when the lock was taken: a forced refresh
        spends that refresh token (the need stays forced; only what it spends is filled in)."""
        if not self.forced or self.spends is not None:
            return self
        return dataclasses.replace(self, spends=tokens.refresh_token)


def other_than(token: Secret | None, failed: Secret | None) -> bool:
    """Whether ``token`` can be re-sent after ``failed`` got a 401: there is one, and it is
    not the one that failed. The one place this rule is written."""
    return token is not None and token is not failed and token != failed


def answers(tokens: TokenSet, need: Need, now: float, refresh_margin: float) -> bool:
    """Whether ``tokens`` already meet ``need``, so no refresh token is spent.

    After a 401 the failed token never does; another only while FRESH: after a long wait for
    the lock, a peer's token may be near expiry, and the re-sent request would meet a second
    401. A token a peer refreshed moments ago is far from it. A forced refresh is met only by
    tokens that follow a refresh token other than the one it found.
    """
    if need.forced and (need.spends is None or tokens.refresh_token == need.spends):
        return False
    if not other_than(tokens.access_token, need.failed):
        return False
    return tokens.freshness(refresh_margin, now) is Freshness.FRESH


def young(tokens: TokenSet, now: float, min_token_age: float) -> bool:
    """Refreshed so recently that a 401 on it cannot be expiry (the genuine-401 rule):
    ``min_token_age``, capped at a share of the token's lifetime."""
    age = tokens.age(now)
    if age is None:
        return False
    lifetime = tokens.lifetime
    window = min_token_age if lifetime is None else min(min_token_age, lifetime * MAX_MARGIN_SHARE)
    return 0 <= age < window


def decide(
    tokens: TokenSet, need: Need, now: float, *, refresh_margin: float, min_token_age: float
) -> Decision:
    """Adopt ``tokens``, return the 401, or spend their refresh token, for ``need`` at ``now``."""
    if answers(tokens, need, now, refresh_margin):
        return Decision.ADOPT
    if need.failed is not None and young(tokens, now, min_token_age):
        return Decision.RETURN_401
    return Decision.SPEND
