"""Doubles for driving :class:`mlauth.engine.RefreshEngine` without a network, files or
sleeps: a clock that moves only when told, a token client that answers from a script and
records what it was sent, and tokens numbered so a test can say which link of the chain it
expects. The store is :class:`mlauth.testing.MemoryStore`.

The values are obviously fake: ``APP_USR-fake-access-N`` and ``TG-fake-refresh-N``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from mlauth.decide import Clock
from mlauth.engine import RefreshEngine
from mlauth.errors import RefreshError
from mlauth.secret import Secret
from mlauth.testing import MemoryStore
from mlauth.tokens import TokenAnswer, TokenSet

START = 1_800_000_000.0  # a wall time in 2027: every test starts here
LIFETIME = 21600.0  # ML's expires_in
MARGIN = 300.0
MIN_AGE = 10.0


class FakeClock:
    """Wall and monotonic time that move only with :meth:`advance`."""

    def __init__(self, wall: float = START) -> None:
        self.now = wall
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    @property
    def clock(self) -> Clock:
        return Clock(wall=self.wall, monotonic=self.monotonic)


def access(n: int) -> Secret:
    return Secret(f"APP_USR-fake-access-{n}")


def refresh(n: int) -> Secret:
    return Secret(f"TG-fake-refresh-{n}")


def link(n: int, clock: FakeClock, *, age: float = 3600.0, lifetime: float = LIFETIME) -> TokenSet:
    """Link ``n`` of the chain, refreshed ``age`` seconds ago, living ``lifetime``."""
    refreshed = clock.now - age
    return TokenSet(access(n), refresh(n), refreshed + lifetime, refreshed, "pid 1@peer")


def answer(n: int, *, expires_in: float | None = LIFETIME) -> TokenAnswer:
    """The token endpoint's answer that makes link ``n``."""
    return TokenAnswer(access(n), refresh(n), expires_in)


# A scripted step: an answer, an error to raise, or a callable run at the POST (a peer acting
# meanwhile) whose return value is the step taken.
Step = TokenAnswer | RefreshError | Callable[[], TokenAnswer | RefreshError]


@dataclasses.dataclass
class Call:
    """One call of :meth:`FakeTokenClient.refresh`: what it was sent and how."""

    refresh_token: Secret
    attempts: int | None


class FakeTokenClient:
    """A :class:`mlauth.engine.TokenClient` that answers from a script and records calls.

    Each refresh takes the next step of :attr:`script`; with none left it fails the test
    (an unexpected spend), which is the point of most engine tests.
    """

    budget = 10.0

    def __init__(self, clock: FakeClock, *steps: Step) -> None:
        self.clock = clock
        self.script: list[Step] = list(steps)
        self.calls: list[Call] = []
        self.resets = 0

    @property
    def sent(self) -> list[Secret]:
        return [call.refresh_token for call in self.calls]

    def refresh(
        self,
        refresh_token: Secret,
        *,
        attempts: int | None = None,
        before_attempt: Callable[[], None] | None = None,
        on_answer: Callable[[bytes, float], None] | None = None,
        known: Iterable[Secret | None] = (),
    ) -> TokenAnswer:
        self.calls.append(Call(refresh_token, attempts))
        assert self.script, f"unexpected refresh with {refresh_token.fingerprint}"
        if before_attempt is not None:
            before_attempt()
        step = self.script.pop(0)
        if callable(step):
            step = step()
        if isinstance(step, RefreshError):
            raise step
        if on_answer is not None:
            on_answer(b'{"access_token": "fake"}', self.clock.now)
        return step

    def reset_session(self) -> None:
        self.resets += 1


def engine_on(
    store: MemoryStore,
    client: FakeTokenClient,
    *,
    margin: float = MARGIN,
    min_age: float = MIN_AGE,
    lock_timeout: float = 5.0,
    on_refresh: Callable[[TokenSet], None] | None = None,
) -> RefreshEngine:
    return RefreshEngine(
        store,
        client,
        refresh_margin=margin,
        lock_timeout=lock_timeout,
        min_token_age=min_age,
        on_refresh=on_refresh,
        clock=client.clock.clock,
    )
