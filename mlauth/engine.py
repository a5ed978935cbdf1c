"""The refresh engine: one token chain's state machine, for any HTTP client.

It owns the tokens this process uses and their freshness (FRESH, STALE, INVALID: see
:class:`~mlauth.tokens.Freshness`), the single flight across threads (a mutex) and processes
(the store's lock), adopting a token a peer refreshed, the genuine-401 rule, and the memory of
failed refreshes. An HTTP adapter (:class:`mlauth.MLAuth` for requests,
:class:`mlauth.httpx.HttpxAuth` for httpx) asks it:

- :meth:`RefreshEngine.token_for_request`: the access token to send now;
- :meth:`RefreshEngine.after_401`: a request carrying token T got a 401; what to re-send with;
- :meth:`RefreshEngine.refresh`: refresh now;
- :meth:`RefreshEngine.fresh_token`: the token to send, if that needs no wait at all (what an
  event loop may ask itself; everything else it asks from a worker thread);
- :meth:`RefreshEngine.unexpected`: the error boundary's conversion, for the adapter's own
  steps around these: only an :class:`~mlauth.errors.MLAuthError` leaves a request.

It never imports an HTTP client: the token endpoint is handed in (:class:`TokenClient`), and
the store does the storing, journaling and fencing inside its refresh transaction
(:meth:`mlauth.stores.base.TokenStore.refresh`).

Nothing per request is kept on the instance: one engine serves every thread of a process. Its
shared state is the cached ``(tokens, version)`` pair, swapped whole, plus the rarely used
memory of tokens whose save failed (:class:`_Unsaved`) and of the last failed refresh
(:class:`_FailureMemory`).

Whether to adopt the tokens at hand, return a 401 or spend the refresh token is
:func:`mlauth.decide.decide`, a pure function of the tokens, the :class:`~mlauth.decide.Need`
and the time; the engine reads the time from the :class:`~mlauth.decide.Clock` it was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Protocol

from . import events
from .decide import REAL_CLOCK, Clock, Decision, Need, answers, decide, other_than
from .errors import (
    AUTHORIZE,
    REAUTHORIZE,
    ConfigError,
    InvalidGrantError,
    LockTimeoutError,
    MLAuthError,
    RefreshError,
    StaleCommitError,
    StoreError,
    UnexpectedError,
    WrongSellerError,
    scrub,
)
from .secret import Secret, mask
from .stores.base import NOT_LOCAL, RefreshTransaction, TokenStore
from .tokens import Freshness, TokenAnswer, TokenSet, this_process, token_problem

__all__ = ["RefreshEngine", "TokenClient"]

log = logging.getLogger("mlauth")

# After a failed refresh ahead of expiry, the still-valid token is used and the refresh is
# not tried again for this long (or a quarter of the time left, if shorter).
ADVISORY_RETRY_DELAY = 30.0
# A STALE token waits at most this long (or half its time left) for a peer's refresh.
STALE_PEER_WAIT = 1.0
# While refreshed tokens could not be saved, saving is retried at most this often.
PERSIST_RETRY_DELAY = 5.0
# After a refresh failed, the same refresh token is not tried again for this long (or for as
# long as the server's Retry-After asked, up to MAX_FAILURE_MEMORY): the threads queued behind
# a failed refresh get its error at once instead of each running a retry series of its own.
FAILURE_COOLDOWN = 5.0
MAX_FAILURE_MEMORY = 60.0


class TokenClient(Protocol):
    """What the engine needs of the token endpoint (:class:`mlauth.endpoint.TokenEndpoint`)."""

    budget: float  # the longest a retry series may take

    def refresh(
        self,
        refresh_token: Secret,
        *,
        attempts: int | None = None,
        before_attempt: Callable[[], None] | None = None,
        on_answer: Callable[[bytes, float], None] | None = None,
        known: Iterable[Secret | None] = (),
    ) -> TokenAnswer: ...

    def reset_session(self) -> None: ...


_engines: weakref.WeakSet[RefreshEngine] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # A thread of the parent may have held the mutex at fork time; in the child that thread
    # does not exist and the mutex would stay locked for ever. Nor may the child share the
    # parent's pooled connection to the token endpoint: two processes reading one socket
    # could each take the other's token answer.
    for engine in list(_engines):
        engine._mutex = threading.Lock()
        engine._endpoint.reset_session()


os.register_at_fork(after_in_child=_reset_after_fork)


def _fresh(error: RefreshError, message: str) -> RefreshError:
    """A new error with ``error``'s fields and no traceback or context.

    Failures are remembered and reported again as new objects: one exception shared by
    threads would mix their tracebacks, and a traceback keeps the token POST's frame, whose
    locals hold the client secret and the refresh token, alive for as long as it is kept.
    """
    copy = type(error)(
        message, status_code=error.status_code, error=error.error, description=error.description
    )
    copy.retry_after = error.retry_after
    copy.possibly_spent = error.possibly_spent
    return copy


class _FailureMemory:
    """The last failed refresh, so the threads queued behind it do not each try again."""

    def __init__(self) -> None:
        # (when, retry not before (monotonic), the token, the error)
        self._last: tuple[float, float, Secret, RefreshError] | None = None

    def check(self, spent: Secret, now: float) -> None:
        """Raise the remembered error if ``spent`` just failed (or is dead); ``now`` is
        monotonic."""
        last = self._last
        if last is None or last[2] != spent:
            return
        failed_at, not_before, _, error = last
        if isinstance(error, InvalidGrantError) or now < not_before:
            ago = now - failed_at
            raise _fresh(error, f"not retried: this refresh token failed {ago:.1f}s ago: {error}")

    def remember(self, spent: Secret, error: RefreshError, now: float) -> None:
        wait = error.retry_after if error.retry_after is not None else FAILURE_COOLDOWN
        self._last = (now, now + min(wait, MAX_FAILURE_MEMORY), spent, _fresh(error, str(error)))


class _Unsaved:
    """Refreshed tokens whose save failed: the only live copy of the chain's newest link
    besides the journal's answer, used from memory until a save lands.

    They are written only over the refresh token they replaced (``base``, compare and set),
    and saving them is retried at most every PERSIST_RETRY_DELAY seconds.
    """

    def __init__(self) -> None:
        # (the tokens, the refresh token the store still holds), swapped whole; None once
        # they are saved, or a peer's tokens replaced them.
        self.held: tuple[TokenSet, Secret] | None = None
        self._retry_at = 0.0  # monotonic

    def base(self, spent: Secret) -> Secret:
        """What the store holds: the spent token, or (while ours are unsaved) an older one."""
        held = self.held
        return spent if held is None else held[1]

    def keep(self, tokens: TokenSet, base: Secret, now: float) -> None:
        self.held = (tokens, base)
        self.postpone(now)

    def due(self, now: float) -> bool:
        return now >= self._retry_at

    def postpone(self, now: float) -> None:
        self._retry_at = now + PERSIST_RETRY_DELAY

    def settle(self, txn: RefreshTransaction, where: str) -> TokenSet | None:
        """Save them under the lock if the store still holds their base; return them if they
        are still the ones to use (the save failed again), None if the store's are now.

        If the store holds anything else, either our save landed after all (or the
        journal's replay wrote them) or a peer moved the chain on: the store's tokens win.
        """
        held = self.held
        if held is None:
            return None
        tokens, base = held
        try:
            if txn.tokens.refresh_token == base:
                txn.settle(tokens)
                log.info("saved the refreshed tokens to %s at last", where)
            elif txn.tokens.refresh_token != tokens.refresh_token:
                log.warning("%s moved on while our tokens were unsaved; using its tokens", where)
        except Exception as exc:  # noqa: BLE001 (keep the live link in memory, whatever failed)
            log.error("still cannot save refreshed tokens to %s: %s", where, exc)
            return tokens
        self.held = None
        return None


def _check_contract(store: TokenStore) -> None:
    """ConfigError now, not after a refresh token was spent, for a store whose save() has
    the signature of older versions (no ``replaces``): its first commit would fail."""
    try:
        inspect.signature(store.save).bind(TokenSet(None, None), replaces=None)
    except TypeError:
        raise ConfigError(
            f"{type(store).__name__}.save() must accept the keyword argument replaces= (the "
            "version it replaces, as load() returned it): see mlauth.stores.base.TokenStore"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): assume it follows the contract


class RefreshEngine:
    """The token state machine of one chain (see the module docstring).

    ``refresh_margin``: refresh this long before expiry (capped at a quarter of the token's
    lifetime); ``lock_timeout``: how long to wait for the cross-process lock;
    ``min_token_age``: a 401 on a token refreshed more recently than this (capped likewise)
    is not an expiry; ``on_refresh``: called with the new tokens after each refresh this
    process made, outside the locks; ``clock``: where the time is read (tests pass a fake
    one, as botocore's ``time_fetcher``).
    """

    def __init__(
        self,
        store: TokenStore,
        endpoint: TokenClient,
        *,
        refresh_margin: float,
        lock_timeout: float,
        min_token_age: float,
        on_refresh: Callable[[TokenSet], None] | None = None,
        secrets: tuple[Secret, ...] = (),
        clock: Clock = REAL_CLOCK,
    ) -> None:
        _check_contract(store)
        self._clock = clock
        self._wall = clock.wall  # bound once: read before every request
        self.store = store
        self._endpoint = endpoint
        self._refresh_margin = refresh_margin
        self.lock_timeout = lock_timeout
        self.min_token_age = min_token_age
        self.on_refresh = on_refresh
        self._secrets = secrets  # masked in the messages of unexpected errors
        self._mutex = threading.Lock()
        self._warned: set[str] = set()  # fingerprints of unusable access tokens warned about
        tokens, version = self._first_load()
        # (tokens, their version, until when they are FRESH): the last saves the freshness
        # arithmetic on every request.
        self._cache: tuple[TokenSet, Hashable, float] = (tokens, version, -math.inf)
        self._keep(tokens, version)
        self._unsaved = _Unsaved()
        self._failures = _FailureMemory()
        # Monotonic times: no refresh ahead of expiry is tried before the first (after one
        # failed), and a STALE token waits for a peer's refresh only from the second on.
        self._advisory_retry_at = 0.0
        self._peer_wait_after = 0.0
        # For the events: whether this chain's death was told (once per process and chain),
        # and the refresh token this engine itself last got (its own tokens are not adopted).
        self._dead_told = False
        self._mine: Secret | None = None
        _engines.add(self)

    def _first_load(self) -> tuple[TokenSet, Hashable]:
        """The store's tokens. Without a refresh token, a refresh transaction is opened once:
        its recovery writes back what a login or a refresh that died left in the journal."""
        missing = ConfigError(
            f"{self.store.location}: ML_REFRESH_TOKEN is missing or empty. {AUTHORIZE}"
        )
        try:
            tokens, version = self.store.load()
        except ConfigError as exc:  # no tokens at all (an empty Redis key), or a bad value
            missing = exc
        else:
            if tokens.refresh_token is not None:
                return tokens, version
        try:
            with self.store.refresh(0.0) as txn:
                tokens, version = txn.tokens, txn.version
        except LockTimeoutError:
            raise missing from None  # somebody is at it; nothing to recover from here
        if tokens.refresh_token is None:
            raise missing
        return tokens, version

    @property
    def refresh_margin(self) -> float:
        return self._refresh_margin

    @refresh_margin.setter
    def refresh_margin(self, seconds: float) -> None:
        self._refresh_margin = seconds
        self._keep(*self._cache[:2])  # FRESH until a new time

    @property
    def _mutex_timeout(self) -> float:
        # A thread waiting for the mutex waits out the holder's whole turn: its wait for the
        # store lock and up to two retry series (when a lock-free writer rotated the token).
        return self.lock_timeout + 2 * self._endpoint.budget

    # -- what an adapter asks ----------------------------------------------------------------

    @property
    def tokens(self) -> TokenSet:
        """The tokens this process uses now."""
        held = self._unsaved.held
        return held[0] if held is not None else self._cache[0]

    def token_for_request(self) -> Secret:
        """The access token to send now: a peer's newer one, refreshed if due."""
        # Before every request: a plain try costs nothing, a context manager a microsecond.
        try:
            # The store's quick stamp first: no system call while nothing changed.
            token = self._fresh()
            if token is None:
                token = self._current().access_token
        except MLAuthError as exc:
            scrub(exc, self._known())
            self._told(exc)
            raise
        except Exception as exc:
            raise self.unexpected(exc, "getting a token for the request") from exc
        assert token is not None  # INVALID tokens are refreshed before they are returned
        return token

    def fresh_token(self) -> Secret | None:
        """The access token to send now if that needs no wait and no network; else None.

        For an event loop (and the first thing :meth:`token_for_request` tries): it only
        compares the store's stamp, when the store has it at hand
        (:meth:`~mlauth.stores.base.TokenStore.local_stamp`: a memory read for the ``.env``,
        a ``stat`` at most every half second), and the cached expiry. None means
        :meth:`token_for_request` may block (a peer's token to read, a refresh, unsaved
        tokens, a stamp that is a round trip): ask it from a worker thread.
        """
        try:
            return self._fresh()
        except MLAuthError:
            raise
        except Exception as exc:
            raise self.unexpected(exc, "getting a token for the request") from exc

    def _fresh(self) -> Secret | None:
        if self._unsaved.held is not None:
            return None
        stamp = self.store.local_stamp()
        tokens, version, fresh_until = self._cache
        if stamp is NOT_LOCAL or stamp != version or self._wall() >= fresh_until:
            return None
        return tokens.access_token

    def resend_at_hand(self, failed: Secret, offered: Secret | None = None) -> Secret | None:
        """After ``failed`` got a 401: a token to re-send with that needs no wait, else None
        (ask :meth:`after_401`, from a worker thread on an event loop).

        ``offered``: what another caller's :meth:`after_401` just returned, if anything. It,
        or the FRESH token, answers only if it is not the one that failed.
        """
        if other_than(offered, failed):
            return offered
        token = self.fresh_token()
        return token if other_than(token, failed) else None

    def valid_tokens(self) -> TokenSet:
        """The tokens with the access token the next request would send."""
        with self._guard("getting a token"):
            return self._current()

    def after_401(self, failed: Secret) -> Secret | None:
        """The token to re-send with after ``failed`` got a 401, or None to return the 401."""
        with self._guard("recovering from a 401"):
            current = self._sync()  # another thread may have moved on already
            held = current.access_token
            # Most often the token held is the one that failed: the need then names this copy,
            # so the checks before the locks find it by identity, and compare values only
            # with what the store holds under the lock.
            need = Need.after_401(held if held is not None and held == failed else failed)
            if answers(current, need, self._clock.wall(), self._refresh_margin):
                return current.access_token
            tokens = self._single_flight(need)
            return None if tokens is None else tokens.access_token

    def refresh(self, *, force: bool = True) -> TokenSet:
        """Refresh now under both locks and return the tokens to use.

        ``force=True`` always spends the refresh token found under the lock. ``force=False``
        treats the token this process holds as failed, as a 401 would: a peer's newer token,
        or one refreshed less than ``min_token_age`` ago, is returned and nothing is spent.
        """
        with self._guard("refreshing"):
            need = Need.forced_refresh() if force else Need.requested(self._sync().access_token)
            tokens = self._single_flight(need)
            return self.tokens if tokens is None else tokens

    # -- before a request ------------------------------------------------------------------

    def _current(self) -> TokenSet:
        tokens = self._sync()
        cached, _, fresh_until = self._cache
        now = self._clock.wall()
        if tokens is cached and now < fresh_until:
            return tokens  # FRESH, the common case: one comparison
        state = tokens.freshness(self._refresh_margin, now)
        if state is Freshness.FRESH:
            return tokens
        if state is Freshness.STALE:
            return self._refresh_ahead(tokens)
        refreshed = self._single_flight(Need.expired())
        assert refreshed is not None  # only a 401 can end without tokens
        return refreshed

    def _usable(self, tokens: TokenSet) -> TokenSet:
        """``tokens`` without an access token that cannot be one: it is refreshed, never sent.

        The .env and Redis stores drop one themselves; a custom store may hand over anything,
        and CR, LF or NUL in a header break the request with an error quoting the token.
        """
        access = tokens.access_token
        problem = None if access is None else token_problem(access.reveal())
        if access is None or problem is None:
            return tokens
        if access.fingerprint not in self._warned:
            self._warned.add(access.fingerprint)
            log.warning(
                "the access token in %s %s; it is not sent, and the next request refreshes it",
                self.store.location,
                problem,
            )
        return dataclasses.replace(tokens, access_token=None)

    def _keep(self, tokens: TokenSet, version: Hashable) -> TokenSet:
        """Cache the store's tokens and version, and until when the tokens are FRESH; return
        the tokens as cached (an unusable access token dropped)."""
        tokens = self._usable(tokens)
        self._note_adopted(self._cache[0], tokens)
        if tokens.access_token is None:
            fresh_until = -math.inf
        elif tokens.expires_at is None:
            fresh_until = math.inf  # an unknown expiry counts as valid until its 401
        else:
            fresh_until = tokens.expires_at - tokens.margin(self._refresh_margin)
        self._cache = (tokens, version, fresh_until)
        return tokens

    def _sync(self) -> TokenSet:
        """The tokens to use now; the store is re-read only when its stamp changed.

        Unsaved tokens come first: they are the newest link of the chain, and saving them is
        retried now and then.
        """
        held = self._unsaved.held
        if held is not None and not self._retry_persist():
            return held[0]
        tokens, version, _ = self._cache
        if self.store.stamp() != version:
            tokens = self._keep(*self.store.load())
            log.debug("store changed; picked up %s", tokens)
        return tokens

    def _refresh_ahead(self, tokens: TokenSet) -> TokenSet:
        """STALE: the current token still works, so never fail, and wait only briefly for a
        peer that is refreshing now."""
        clock = self._clock
        if clock.monotonic() < self._advisory_retry_at:
            return tokens  # a recent attempt failed; don't hammer the endpoint
        try:
            # A peer refreshing now will kill this token (ML does not say the old one lives
            # on): wait briefly for its token rather than send this one into a 401.
            left = tokens.expires_in(clock.wall()) or 0.0
            if clock.monotonic() >= self._peer_wait_after and not self._wait_unlocked(
                min(STALE_PEER_WAIT, left / 2)
            ):
                # Still refreshing (a slow endpoint, a dead holder): use the current token,
                # and do not wait again for a while; every request would pay the wait.
                self._peer_wait_after = clock.monotonic() + min(ADVISORY_RETRY_DELAY, left / 4)
                return tokens
            current = self._sync()
            if current.freshness(self._refresh_margin, clock.wall()) is Freshness.FRESH:
                return current
            refreshed = self._single_flight(Need.ahead())
        except LockTimeoutError:
            log.debug("another process is refreshing; sending the current token meanwhile")
            return tokens
        except Exception as caught:  # noqa: BLE001 (the current token works: use it, say why)
            exc = (
                caught
                if isinstance(caught, MLAuthError)
                else self.unexpected(caught, "refreshing ahead of expiry")
            )
            scrub(exc, self._known())
            self._told(exc)
            left = tokens.expires_in(clock.wall()) or 0.0
            self._advisory_retry_at = clock.monotonic() + min(ADVISORY_RETRY_DELAY, left / 4)
            bad = isinstance(exc, (InvalidGrantError, UnexpectedError))
            level = logging.ERROR if bad else logging.WARNING
            log.log(level, "refresh ahead of expiry failed; using the current token: %s", exc)
            return tokens
        return refreshed or tokens  # None: another thread of ours is refreshing

    # -- the single flight -----------------------------------------------------------------

    def _single_flight(self, need: Need) -> TokenSet | None:
        """Refresh at most once for all threads and processes; return the tokens to use.

        Not ``need.mandatory`` (STALE): neither lock is waited for; None means another thread
        holds the mutex, LockTimeoutError that another process holds the lock. Mandatory:
        None means ``need.failed`` got a genuine 401.
        """
        mandatory = need.mandatory
        if mandatory and not need.forced:
            adopted = self._await_peer(need)
            if adopted is not None:
                return adopted
        if not self._mutex.acquire(mandatory, self._mutex_timeout if mandatory else -1):
            if not mandatory:
                return None
            raise LockTimeoutError(
                f"another thread of this process has been refreshing for over "
                f"{self._mutex_timeout:g}s; no refresh was attempted",
                lock_path="<in-process>",
            )
        try:
            tokens, spent = self._turn(need)
        finally:
            self._mutex.release()
        if spent and self.on_refresh is not None:
            self._notify(tokens)  # outside both locks: a slow callback stalls nobody
        return tokens

    def _await_peer(self, need: Need) -> TokenSet | None:
        """Wait for a process holding the lock to let go, and adopt the token it saved.

        A holder is most likely refreshing this very token. Waiting for it without queueing
        for the lock (every waiter of every process wakes at once, none polls) and looking
        at the store's stamp is all most waiters need: one ``load()``, only if the stamp
        changed. A store whose stamp is coarse makes its next stamp a real look when its
        ``wait_unlocked`` returns (the store contract). The lock is taken only if that is
        not enough. Before the mutex: the threads of a process share one wait. Returns at
        once if the lock is free.
        """
        # As long as a thread of ours would wait for the mutex: the holder may be one.
        if not self._wait_unlocked(self._mutex_timeout):
            try:  # the store's own error names its lock and the fix
                with self.store.lock(0.0):
                    return None  # let go just now: the turn takes it again
            except LockTimeoutError as exc:
                raise type(exc)(
                    f"waited {self._mutex_timeout:g}s for the process holding the refresh "
                    f"lock to let go; {exc}",
                    lock_path=exc.lock_path,
                ) from None
        tokens = self._sync()
        if not answers(tokens, need, self._clock.wall(), self._refresh_margin):
            return None
        log.debug("adopted a token refreshed by %s without the lock", tokens.refreshed_by)
        return tokens

    def _turn(self, need: Need) -> tuple[TokenSet | None, bool]:
        """One thread's turn under the mutex: (tokens to use, whether it spent a token)."""
        # A thread of ours that refreshed while we waited left its tokens here; a peer
        # process's are read under the lock below, so the store's stamp is not asked again.
        held = self._unsaved.held
        current = held[0] if held is not None else self._cache[0]
        if answers(current, need, self._clock.wall(), self._refresh_margin):
            return current, False
        with self.store.refresh(self.lock_timeout if need.mandatory else 0.0) as txn:
            tokens = self._settle(txn)
            found = need.found(tokens)  # a forced refresh spends what it found here
            for _ in range(2):  # a second round only after a lock-free writer rotated it
                decision = decide(
                    tokens,
                    found,
                    self._clock.wall(),
                    refresh_margin=self._refresh_margin,
                    min_token_age=self.min_token_age,
                )
                if decision is Decision.ADOPT:
                    log.debug(
                        "adopted a token refreshed by %s (%s)",
                        tokens.refreshed_by,
                        tokens,
                    )
                    return tokens, False
                if decision is Decision.RETURN_401:
                    log.debug("401 on a token refreshed %.1fs ago: not an expiry", tokens.age())
                    return None, False
                new = self._spend(txn, tokens, found)
                if new is not None:
                    return new, True
                tokens = self._settle(txn)  # what the lock-free writer left
        raise RefreshError(
            "a process that takes no lock rotated the refresh token twice during this refresh; "
            "nothing more was sent. Stop it, or make it use mlauth (docs/legacy.md)"
        )

    def _spend(self, txn: RefreshTransaction, tokens: TokenSet, need: Need) -> TokenSet | None:
        """Spend the refresh token and commit its successor; None if the store moved on."""
        spent = self._spendable(tokens.refresh_token)
        if need.mandatory:
            self._failures.check(spent, self._clock.monotonic())
        txn.begin(spent)  # writable? known dead? the intent on disk before the POST
        # Expiry counts from just before the first POST, not from the answer, nor from before
        # the store's check (an fsync, or a Redis round trip, that can take a good part of a
        # second under load).
        started = self._clock.wall()
        # A token possibly spent by a dead or failed refresher is tried exactly once, and so
        # is the STALE path's, which must not hold up its own request.
        once = not need.mandatory or txn.possibly_spent is not None
        try:
            answer = self._endpoint.refresh(
                spent,
                attempts=1 if once else None,
                before_attempt=txn.before_attempt,
                # The raw answer goes to the store before anything reads it.
                on_answer=lambda raw, at: txn.answered(raw, started=started, at=at),
                known=self._known(),  # what the answer may quote: masked before it is logged
            )
        except RefreshError as exc:
            if isinstance(exc, InvalidGrantError) and self._rotated_outside(txn, spent):
                return None
            error = self._failed(txn, spent, exc, tokens, need)
            if error is exc:
                raise
            raise error from None
        if answer.refresh_token is None:
            log.warning(
                "the token answer had no refresh_token (does the app have offline_access?); "
                "keeping the current one"
            )
        new = TokenSet.from_answer(answer, spent, started, refreshed_by=this_process())
        try:
            committed = self._commit(txn, new, spent, reason=need.reason)
        except WrongSellerError as exc:  # the stored token was spent for another seller
            raise self._failed(txn, spent, exc, tokens, need) from None
        # Told once the new tokens are safe (saved, or held in memory if the save failed):
        # nothing runs between the spend and the save.
        events.emit(
            events.Refreshed(
                store=self.store.location,
                seller=self.store.seller,
                duration_s=round(self._clock.wall() - started, 6),
                reason=need.reason,
                by=new.refreshed_by or "",
            )
        )
        if committed.access_token is None:
            # Saved: the next refresh spends the new refresh token, never the old one.
            raise RefreshError(
                f"the token endpoint's answer held a new refresh token but no usable access "
                f"token ({answer.access_problem or 'none'}); the refresh token was saved, and "
                "the next request refreshes again with it"
            )
        return committed

    def _spendable(self, spent: Secret | None) -> Secret:
        """``spent``, if it can be sent as a refresh token; ConfigError or StoreError if not."""
        if spent is None:
            raise ConfigError(
                f"{self.store.location}: ML_REFRESH_TOKEN is missing or empty. {AUTHORIZE}"
            )
        problem = token_problem(spent.reveal())
        if problem is not None:  # a custom store's; ours refuse such a value when read
            raise StoreError(
                f"{self.store.location}: the stored refresh token {problem}, so it was not "
                f"sent (its value is not shown). Fix the store. {REAUTHORIZE}"
            )
        return spent

    def _rotated_outside(self, txn: RefreshTransaction, spent: Secret) -> bool:
        """After invalid_grant: whether a writer that takes no lock (a legacy script) rotated
        the token meanwhile; its tokens are then adopted."""
        stored = txn.reload()
        if stored.refresh_token is None or stored.refresh_token in (
            spent,
            self._unsaved.base(spent),
        ):
            return False
        log.info("refresh token was rotated outside the lock; adopting the new one")
        self._keep(stored, txn.version)
        self._unsaved.held = None
        return True

    def _commit(
        self, txn: RefreshTransaction, new: TokenSet, spent: Secret, *, reason: str
    ) -> TokenSet:
        """Persist ``new``, which follows ``spent``, before anything uses it: the old refresh
        token is dead."""
        self._mine = new.refresh_token  # cached below: ours, not adopted
        try:
            version = txn.commit(new)
        except StaleCommitError as exc:  # our lock lapsed and a peer committed since
            tokens = self._keep(txn.reload(), txn.version)
            self._unsaved.held = None
            log.warning("%s; using %s", exc, tokens.describe())
            return tokens
        except WrongSellerError:
            # Another seller's tokens: never this chain's, not even in memory (its requests
            # would act as that seller). The store kept the raw answer.
            self._mine = None
            raise
        except Exception as exc:  # noqa: BLE001 (whatever failed, `new` is the live link)
            self._unsaved.keep(new, self._unsaved.base(spent), self._clock.monotonic())
            events.store_failed(
                self.store.location, exc, mask(str(exc), self._known()), seller=self.store.seller
            )
            kept = (
                f"{txn.answer_kept} holds them for any process that takes the lock"
                if txn.answer_kept
                else "nothing else holds them"
            )
            log.error(
                "refreshed tokens could not be saved to %s (%s: %s); this process keeps them "
                "in memory and retries saving; %s, and other processes cannot use them until "
                "they are saved",
                self.store.location,
                type(exc).__name__,
                exc,
                kept,
            )
            return new
        self._keep(new, version)
        self._unsaved.held = None
        log.info("refreshed MercadoLibre token (%s) in pid %d: %s", reason, os.getpid(), new)
        # A save went through: it is back.
        events.store_answered(self.store.location, seller=self.store.seller)
        return new

    # -- tokens whose save failed ------------------------------------------------------------

    def _settle(self, txn: RefreshTransaction) -> TokenSet:
        """The tokens to decide on, under the lock: the store's, after saving unsaved ones
        over the refresh token they replaced (:meth:`_Unsaved.settle`)."""
        unsaved = self._unsaved
        held = None if unsaved.held is None else unsaved.settle(txn, self.store.location)
        return held if held is not None else self._keep(txn.tokens, txn.version)

    def _retry_persist(self) -> bool:
        """Now and then, try again to save unsaved tokens, without waiting for any lock.

        Returns whether they are settled; False keeps using them from memory.
        """
        unsaved = self._unsaved
        now = self._clock.monotonic()
        if not unsaved.due(now) or not self._mutex.acquire(blocking=False):
            return unsaved.held is None
        try:
            unsaved.postpone(now)
            if unsaved.held is not None:
                with self.store.refresh(0.0) as txn:
                    self._settle(txn)
        except MLAuthError as exc:  # the lock is busy or cannot be opened: try again later
            log.debug("could not retry saving the refreshed tokens yet: %s", exc)
        finally:
            self._mutex.release()
        return unsaved.held is None

    # -- events (mlauth.events): none per request ------------------------------------------

    def _wait_unlocked(self, timeout: float) -> bool:
        """The store's ``wait_unlocked``; a wait of a millisecond or more is an event."""
        started = self._clock.monotonic()
        free = self.store.wait_unlocked(timeout)
        waited_ms = (self._clock.monotonic() - started) * 1000
        if waited_ms >= 1:
            events.emit(
                events.LockWaited(
                    store=self.store.location,
                    seller=self.store.seller,
                    waited_ms=round(waited_ms, 3),
                )
            )
        return free

    def _note_adopted(self, before: TokenSet, tokens: TokenSet) -> None:
        """An event when the tokens cached now are another process's (or a lock-free
        writer's) newer ones; a new chain also makes a dead one's death worth telling again."""
        if tokens.refresh_token != before.refresh_token:
            self._dead_told = False
        if tokens.access_token is None or tokens.access_token == before.access_token:
            return
        if before.access_token is None and before.refresh_token is None:
            return  # the first load: nothing adopted
        if tokens.refresh_token is None or tokens.refresh_token != self._mine:
            # Another process's, or another auth's of this one (requests and httpx on one
            # .env), or a lock-free writer's.
            events.emit(
                events.Adopted(
                    store=self.store.location, seller=self.store.seller, by=tokens.refreshed_by
                )
            )

    def _failed(
        self,
        txn: RefreshTransaction,
        spent: Secret,
        exc: RefreshError,
        tokens: TokenSet,
        need: Need,
    ) -> RefreshError:
        """A refresh that spent (or tried) ``spent`` failed: the store records it, this
        process remembers it, subscribers hear of it; return what to raise."""
        error = txn.abort(spent, exc)
        # One STALE try says little; a token spent for another seller is spent all the same.
        if need.mandatory or isinstance(error, (InvalidGrantError, WrongSellerError)):
            self._failures.remember(spent, error, self._clock.monotonic())
        self._refresh_failed(error, tokens, need)
        return error

    def _refresh_failed(self, error: RefreshError, tokens: TokenSet, need: Need) -> None:
        wall = self._clock.wall()
        if isinstance(error, InvalidGrantError):
            retry_at = None
        elif need.mandatory:
            wait = error.retry_after if error.retry_after is not None else FAILURE_COOLDOWN
            retry_at = wall + min(wait, MAX_FAILURE_MEMORY)
        else:
            retry_at = wall + min(ADVISORY_RETRY_DELAY, (tokens.expires_in(wall) or 0.0) / 4)
        events.emit(
            events.RefreshFailed(
                store=self.store.location,
                seller=self.store.seller,
                error=type(error).__name__,
                reason=mask(str(error), self._known()),
                retry_at=retry_at,
            )
        )

    def _told(self, exc: MLAuthError) -> None:
        """The events an error that leaves the engine stands for, each told once."""
        if isinstance(exc, InvalidGrantError) and not self._dead_told:
            self._dead_told = True
            dead = self.tokens.refresh_token
            events.emit(
                events.ReauthorizationRequired(
                    store=self.store.location,
                    seller=self.store.seller,
                    reason=mask(str(exc), self._known()),
                    chain=dead.fingerprint if dead is not None else "<none>",
                )
            )
        elif isinstance(exc, StoreError) and not isinstance(exc, StaleCommitError):
            events.store_failed(
                self.store.location, exc, mask(str(exc), self._known()), seller=self.store.seller
            )

    # -- the edges ---------------------------------------------------------------------------

    def _notify(self, tokens: TokenSet | None) -> None:
        if self.on_refresh is None or tokens is None:
            return
        try:
            self.on_refresh(tokens)
        except Exception:  # a user's callback must not break the request that refreshed
            log.exception("on_refresh callback failed")

    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Only MLAuthError leaves the engine: callers catch RequestException."""
        try:
            yield
        except MLAuthError as exc:
            scrub(exc, self._known())
            self._told(exc)
            raise
        except Exception as exc:
            raise self.unexpected(exc, doing) from exc

    def unexpected(self, exc: Exception, doing: str) -> UnexpectedError:
        """``exc``, which is no MLAuthError, as one.

        Its message is someone else's and may quote a value it was handed: the tokens this
        process knows, the client secret and anything token-shaped are fingerprinted.
        """
        return UnexpectedError(
            f"mlauth failed unexpectedly while {doing}: "
            + mask(f"{type(exc).__name__}: {exc}", self._known())
            + " (the original exception is this one's __cause__)"
        )

    def known_secrets(self) -> list[Secret | None]:
        """The client secret and every token this process holds (for what mlauth hands to
        others, such as an alert command, to keep out)."""
        return self._known()

    def _known(self) -> list[Secret | None]:
        """The client secret and every token this process holds, to mask in the text of
        errors it raises or logs (which may quote a server's answer or someone's exception)."""
        known: list[Secret | None] = list(self._secrets)
        held = self._unsaved.held
        for tokens in (self._cache[0], held[0] if held is not None else None):
            if tokens is not None:
                known += [tokens.access_token, tokens.refresh_token]
        return known
