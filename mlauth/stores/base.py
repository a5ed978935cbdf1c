"""The token store contract: what the refresh engine asks of a store, and the defaults.

A store holds one token chain and the lock that serializes refreshes of it. The lock belongs
to the store and not to the engine: whoever can see the tokens must be able to exclude the
others from spending them. Two stores ship: the ``.env`` file
(:class:`~mlauth.stores.envfile.EnvFileStore`) and Redis (:class:`~mlauth.stores.redis.RedisStore`).

A refresh is a transaction the store provides (:meth:`TokenStore.refresh`): under the lock it
hands the engine what it holds, then hears the intent, the raw answer (before anything reads
it), and the commit or abort. The ``.env`` store journals inside it
(:class:`~mlauth.stores.journal.JournaledRefresh`), the Redis store keeps the raw answer beside
its hash and fences its commit on the version read; the engine sees neither.

A custom store subclasses :class:`TokenStore` and implements the abstract methods; every
other method has a default that is right for a store without the feature.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from mlauth.answers import RAW_LIMIT, raw_record
from mlauth.errors import (
    ConfigError,
    InvalidGrantError,
    RefreshError,
    StoreError,
    WrongSellerError,
)
from mlauth.secret import Secret, fingerprint
from mlauth.tokens import TokenSet, seller_of, this_process, token_problem

from .incidents import Incidents, MemoryIncidents

__all__ = ["NOT_LOCAL", "RefreshTransaction", "TokenStore", "check_seller", "savable"]


def savable(tokens: TokenSet, where: str) -> TokenSet:
    """``tokens`` as a store may write them: an access token that cannot be one is left out
    (the next request refreshes it); StoreError, before anything is written, for a refresh
    token that cannot be one. Every value mlauth saves passed this check when it was read; a
    caller of ``save()`` may hand over anything, and a line break would add a line to a
    ``.env``."""
    refresh = tokens.refresh_token
    problem = None if refresh is None else token_problem(refresh.reveal())
    if problem is not None:
        raise StoreError(
            f"refusing to save a refresh token that {problem} to {where} (its value is not "
            "shown); nothing was written"
        )
    access = tokens.access_token
    if access is not None and token_problem(access.reveal()) is not None:
        return dataclasses.replace(tokens, access_token=None)
    return tokens


def check_seller(store: TokenStore, tokens: TokenSet) -> None:
    """Raise :class:`~mlauth.WrongSellerError` if ``tokens`` are another seller's than the
    one whose chain ``store`` holds (the answer's ``user_id``, else the tokens' suffix).

    Every save of a sellers store asks it first, so a refresh token filed under the wrong
    seller never writes another seller's tokens into this one's chain. Tokens that name no
    seller at all are taken: MercadoLibre's always do.
    """
    expected = store.seller
    found = None if expected is None else seller_of(tokens)
    if expected is None or found is None or found == expected:
        return
    raise WrongSellerError(
        f"the token endpoint answered for user {found}, but the chain refreshed is seller "
        f"{expected}'s at {store.location}: its refresh token was filed under the wrong "
        f"seller. Nothing was saved to seller {expected}; the answer is kept where the store "
        f"keeps answers (`mlauth status --seller {expected}`). Run `mlauth login --seller "
        f"{expected}` to give seller {expected} its own chain again.",
        expected=expected,
        found=found,
    )


class _NotLocal(enum.Enum):
    NOT_LOCAL = "NOT_LOCAL"


#: What :meth:`TokenStore.local_stamp` returns when only :meth:`TokenStore.stamp` can answer.
NOT_LOCAL = _NotLocal.NOT_LOCAL


class TokenStore(abc.ABC):
    """Where the tokens live between processes."""

    #: Where the store is, for messages: a path, or a URL without credentials.
    location: str
    #: The seller (user id) whose chain this store holds, in a store of many sellers
    #: (:mod:`.sellers`); None for a one-seller store, which takes whoever's tokens it is given.
    seller: str | None = None

    # -- what every store implements ------------------------------------------------------

    @abc.abstractmethod
    def stamp(self) -> Hashable:
        """A cheap identity of the stored version, without reading the tokens.

        When it differs from the version :meth:`load` returned, someone wrote. Asked after a
        401, under the lock, and before every request whose :meth:`local_stamp` cannot
        answer; the ``.env`` store takes it with one ``stat``, so a change by any writer shows
        at once.

        A stamp may be coarse (Redis looks at most once a ``check_interval`` and reports
        the version last seen in between); such a store makes the first stamp after
        :meth:`wait_unlocked` returns True a real look, because a waiter adopts what the
        lock's holder saved only through it (it loads only when the stamp changed).
        """

    def local_stamp(self) -> Hashable:
        """The stamp at hand: answered without waiting on anything (the network, a lock),
        and where the store can, without a system call; else :data:`NOT_LOCAL`.

        Asked before every request (the engine's fast path, and an event loop, which asks
        :meth:`stamp` from a worker thread only when it gets :data:`NOT_LOCAL`). It may lag
        :meth:`stamp`, but never for a save through this store's :meth:`save` by any process
        that shares the store: that shows at the next call. A writer outside that contract
        (an editor, a legacy script, an older mlauth) may show only after a bound the store
        documents (the ``.env``: :data:`~mlauth.stores.watch.STAT_INTERVAL`; Redis: its
        ``check_interval``), and shows in :meth:`stamp` at once, which the engine asks after
        a 401. One call, not a "may I?" and then :meth:`stamp`: between two such calls the
        answer could change. The default is :data:`NOT_LOCAL`: a custom store whose stamp
        is a round trip is never asked on a loop, and its :meth:`stamp` is asked instead.
        """
        return NOT_LOCAL

    @abc.abstractmethod
    def load(self) -> tuple[TokenSet, Hashable]:
        """The stored tokens and the version read (its stamp, taken before the read)."""

    @abc.abstractmethod
    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        """Persist ``tokens`` atomically and durably; return the new version.

        ``replaces`` is the version, as :meth:`load` returned it, that these tokens follow. A
        store whose lock can expire commits only over it and raises
        :class:`~mlauth.StaleCommitError` when a peer committed since (the newer tokens win).
        None starts a chain (``mlauth login``). A store with a lock that cannot lapse may
        ignore it.
        """

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Raise :class:`~mlauth.StoreError` unless :meth:`save` would succeed now.

        Asked before every attempt to spend a refresh token: a token spent whose successor
        cannot be saved is lost for good. A store whose lock expires renews it here and
        raises :class:`~mlauth.LockLostError` if it was lost.
        """

    @abc.abstractmethod
    def lock(self, timeout: float) -> AbstractContextManager[None]:
        """The lock every process refreshing this chain takes first.

        Raises :class:`~mlauth.LockTimeoutError` when it cannot be had in ``timeout``
        seconds (0: only if it is free now).
        """

    # -- with defaults ---------------------------------------------------------------------

    @contextmanager
    def refresh(self, timeout: float) -> Iterator[RefreshTransaction]:
        """Take the lock and open a refresh transaction on what the store holds under it."""
        with self.lock(timeout):
            yield self.transaction()

    def transaction(self, *, login: bool = False) -> RefreshTransaction:
        """A refresh transaction on what the store holds; called with :meth:`lock` held.

        ``login``: for ``mlauth login``, which replaces whatever is stored: a store that holds
        no usable tokens (a :class:`~mlauth.ConfigError` from :meth:`load`) is no error.
        """
        return RefreshTransaction(self, login=login)

    def wait_unlocked(self, timeout: float) -> bool:
        """Return once no process holds the refresh lock (True), or after ``timeout`` (False).

        For a waiter that only needs the holder's outcome: it compares :meth:`stamp`
        afterwards (and loads only if it changed) instead of queueing for the lock, so a store
        with a coarse stamp must make its next stamp a real look before returning True. The
        default takes the lock and lets it go.
        """
        try:
            with self.lock(timeout):
                return True
        except TimeoutError:
            return False

    def bind_client(self, client_id: str) -> None:  # noqa: B027 (optional, no-op default)
        """Called once with the app's client id (a shared store may name its key after it)."""

    @property
    def lock_expiry(self) -> float | None:
        """Seconds after which a held lock lapses by itself (Redis), or None if it never does."""
        return None

    def reauthorization_required(self) -> str | None:
        """Why the seller must authorize again (after ``invalid_grant``), or None."""
        return None

    def clear_reauthorization(self) -> None:  # noqa: B027 (optional, no-op default)
        """A new chain was saved (``mlauth login``, under the lock): forget that the old one
        died, wherever :meth:`reauthorization_required` keeps it."""

    def refresh_in_progress(self) -> bool | None:
        """Whether a process holds the refresh lock now; None when the store cannot tell."""
        return None

    def status_details(self) -> list[tuple[str, str]]:
        """Extra ``mlauth status`` rows (label, value)."""
        return []

    def incidents(self) -> Incidents:
        """Where the processes on this store agree which incidents are open, for alerts
        (:mod:`mlauth.alerts`). This default is each process's own memory: a store that
        processes share should override it."""
        return MemoryIncidents()


class RefreshTransaction:
    """One refresh under the store's lock: what the store holds, then intent, answer, commit.

    The engine calls, in order: :meth:`begin` before the first POST, :meth:`before_attempt`
    before every POST, :meth:`answered` with the raw bytes of a 2xx answer before anything
    reads them, then :meth:`commit` with the tokens or :meth:`abort` with the error.
    ``mlauth login`` calls :meth:`begin_login` instead of :meth:`begin`.
    This base class is a store without a journal: it checks the store is writable and commits
    over the version it read. Subclasses keep the raw answer and a write-ahead journal
    (:class:`~mlauth.stores.journal.JournaledRefresh`).
    """

    def __init__(self, store: TokenStore, *, login: bool = False) -> None:
        self.store = store
        #: What the store holds, read under the lock, and its version.
        self.tokens: TokenSet
        self.version: Hashable
        try:
            self.tokens, self.version = store.load()
        except ConfigError:
            if not login:
                raise
            self.tokens, self.version = TokenSet(None, None), None  # replaced by the login
        #: How the stored refresh token was sent before without a usable answer, if it was:
        #: it may be spent already, so it is tried once and not in a series.
        self.possibly_spent: str | None = None
        #: Where the answer is kept besides the store once :meth:`commit` began (a journal),
        #: for the message when the save itself fails; None if nowhere.
        self.answer_kept: str | None = None
        self._attempts = 0
        # The fingerprint the answer follows and its grant, once begun, and whether its raw
        # bytes were kept (None: no raw answer was offered); a store that keeps raw answers
        # (:class:`KeptAnswerRefresh`) records them with it.
        self._follows: str | None = None
        self._grant = "refresh_token"
        self._raw_kept: bool | None = None

    def reload(self) -> TokenSet:
        """Read the store again (after a writer that takes no lock may have rotated it)."""
        self.tokens, self.version = self.store.load()
        return self.tokens

    def begin(self, spent: Secret) -> None:
        """About to spend ``spent``: raise unless its successor could be saved."""
        self.store.check_writable()
        self._follows = spent.fingerprint

    def begin_login(self) -> None:
        """About to exchange an authorization code (``mlauth login``) for tokens that replace
        what the store holds: raise unless they could be saved."""
        self.store.check_writable()

    def answered(self, raw: bytes, *, started: float, at: float) -> None:
        """The raw bytes of a 2xx answer arrived at ``at`` (the first POST left at
        ``started``): keep them before anything reads them, if the store can.

        Never raises for a failed write (it logs an ERROR): the answer itself is still read.
        A store without a place for it keeps nothing.
        """

    def before_attempt(self) -> None:
        """Before each POST; the first was checked by :meth:`begin` (a lock is renewed here)."""
        self._attempts += 1
        if self._attempts > 1:
            self.store.check_writable()

    def commit(self, tokens: TokenSet) -> Hashable:
        """Save the refresh's answer over the version read; return the new version."""
        self.version = self.store.save(tokens, replaces=self.version)
        self.tokens = tokens
        return self.version

    def abort(self, spent: Secret, error: RefreshError) -> RefreshError:
        """The refresh with ``spent`` failed with ``error``: record it; return what to raise."""
        return error

    def settle(self, tokens: TokenSet) -> Hashable:
        """Save tokens a failed save left in memory, over what the store holds now."""
        return self.commit(tokens)

    def refused(self, spent: Secret) -> InvalidGrantError | None:
        """An error at once if ``spent`` is already known dead (nothing is sent), else None."""
        return None


def with_note(error: RefreshError, note: str) -> RefreshError:
    """A copy of ``error`` (same class and fields) whose message ends with ``note``."""
    copy = type(error)(
        f"{error} {note}",
        status_code=error.status_code,
        error=error.error,
        description=error.description,
    )
    vars(copy).update(vars(error))  # retry_after, possibly_spent, a subclass's own fields
    return copy


class KeptAnswerRefresh(RefreshTransaction):
    """A refresh transaction whose store keeps the raw answer before it is read (a journal,
    a Redis hash): what is the same in all of them, the record and what an error says of it.

    A subclass names the place (:attr:`raw_place`, :attr:`raw_limit`) and writes the record
    (:meth:`keep_raw`, which says where it went).
    """

    #: The largest body kept whole (a record over it keeps the answer's essentials).
    raw_limit = RAW_LIMIT

    @property
    def raw_place(self) -> str:
        """Where a raw answer is kept, for messages ("the refresh journal /srv/.env.journal")."""
        raise NotImplementedError

    def keep_raw(self, record: dict[str, Any]) -> str | None:
        """Write the record durably and return where it is (:attr:`raw_place`); None (having
        logged an ERROR) if it could not be written."""
        raise NotImplementedError

    def begin_login(self) -> None:
        super().begin_login()
        stored = self.tokens.refresh_token
        self._follows = fingerprint(stored.reveal() if stored else None)
        self._grant = "authorization_code"

    def answered(self, raw: bytes, *, started: float, at: float) -> None:
        assert self._follows is not None, "begin() first"
        record = raw_record(
            raw,
            replaces=self._follows,
            grant=self._grant,
            started=started,
            at=at,
            by=this_process(),
            limit=self.raw_limit,
        )
        kept = self.keep_raw(record)
        self._raw_kept = kept is not None
        if kept is not None:
            self.answer_kept = kept

    def raw_note(self, error: RefreshError, *, where: str, until: str) -> RefreshError:
        """``error``, told where the raw answer of the failed refresh is (if one came)."""
        if self._raw_kept is None:
            return error
        if not self._raw_kept:
            return with_note(error, "Its raw bytes could not be kept (see the error logged).")
        return with_note(
            error,
            f"Its raw bytes are kept in {where} for you to inspect (a proxy or a changed "
            f"endpoint in between? check ML_TOKEN_URL); `mlauth status` shows them {until}.",
        )
