"""MLAuth: the requests auth that injects the token, refreshes it, and re-sends on a 401.

The decisions live in three methods that read top to bottom:

- :meth:`MLAuth._current` (before every request): pick up a token a peer wrote, refresh
  ahead of expiry;
- :meth:`MLAuth._handle_401` (after a response): refresh or adopt, then re-send once;
- :meth:`MLAuth._refresh_locked` (under both locks): re-read, decide, refresh, persist.

Nothing per request is kept on the instance: one MLAuth serves every thread and session of
a process. Its shared state is the cached ``(tokens, stamp)`` tuple, swapped whole, plus the
rarely used ``_unsaved`` pair for tokens whose save failed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable
from http.cookiejar import CookieJar
from typing import Any, cast

import requests
from requests.cookies import extract_cookies_to_jar
from requests.utils import rewind_body

from mlauth.config import (
    DEFAULT_HOSTS,
    DEFAULT_TOKEN_URL,
    check_hosts,
    check_token_url,
    env_settings,
    store_from_env,
)
from mlauth.endpoint import REAUTHORIZE_HINT, TokenEndpoint
from mlauth.errors import (
    ConfigError,
    InvalidGrantError,
    LockTimeoutError,
    MLAuthError,
    RefreshError,
    StaleCommitError,
    UnexpectedError,
)
from mlauth.preflight import refresh_problem
from mlauth.secret import Secret, mask
from mlauth.stores.base import TokenStore
from mlauth.stores.journal import journal_of, recover
from mlauth.tokens import MAX_MARGIN_SHARE, TokenSet

from .runner import ENV_VARIABLE as RUN_ENV_VARIABLE

__all__ = ["MLAuth"]

log = logging.getLogger("mlauth")

# After a failed refresh ahead of expiry, the still-valid token is used and the refresh is
# not tried again for this long (or a quarter of the time left, if shorter).
ADVISORY_RETRY_DELAY = 30.0
# While refreshed tokens could not be saved, saving is retried at most this often.
PERSIST_RETRY_DELAY = 5.0
# After a refresh failed, the same refresh token is not tried again for this long (or for as
# long as the server's Retry-After asked, up to MAX_FAILURE_MEMORY): the threads queued behind
# a failed refresh get its error at once instead of each running a retry series of its own.
FAILURE_COOLDOWN = 5.0
MAX_FAILURE_MEMORY = 60.0

_instances: weakref.WeakSet[MLAuth] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # A thread of the parent may have held the mutex at fork time; in the child that thread
    # does not exist and the mutex would stay locked for ever.
    # Nor may the child share the parent's pooled connection to the token endpoint: two
    # processes reading one socket could each take the other's token answer.
    for auth in list(_instances):
        auth._mutex = threading.Lock()
        auth._endpoint.reset_session()


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
    return copy


def _possibly_spent_by(error: RefreshError, attempts: int) -> str | None:
    """Why a failed refresh may still have spent the token, or None if it cannot have.

    Only a definite refusal proves the token unspent: an OAuth error answer (400
    invalid_request, 401 invalid_client, 403 unauthorized_client...) is given instead of
    processing the grant. It must be the only attempt: an earlier one of the series may have
    timed out after the server rotated the token. A timeout, a reset connection, a 5xx (the
    server may have failed after rotating), a 200 we could not read, a 408 or 429 at the end
    of a series: all leave the token possibly spent. (A connection refused before anything
    was sent is counted here too; the endpoint's error does not tell it apart, and the
    cost is only that the next refresh makes one attempt instead of a series.)
    """
    if attempts == 0:
        return None  # nothing was sent
    status = error.status_code
    if attempts == 1 and status is not None and 400 <= status < 500 and status not in (408, 429):
        return None
    if status == 200:
        return "HTTP 200 with an unusable body"
    # The error's first sentence names the last failure ("gave up after 1 attempt: HTTP 502");
    # mlauth's errors never hold a token or the secret.
    return str(error).split(". ", 1)[0]


def _bearer(header: str | bytes | None) -> str | None:
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


def _replayable(request: requests.PreparedRequest) -> bool:
    """Whether the body can be sent a second time: in memory, or a stream we can rewind."""
    body: object = request.body
    if body is None or isinstance(body, (bytes, str)):
        return True
    # requests records the stream's position before the first send; a generator has none
    # (and would be re-sent empty, silently), a failed tell() left a non-int marker.
    return isinstance(getattr(request, "_body_position", None), int)


class MLAuth(requests.auth.AuthBase):
    """A :class:`requests.auth.AuthBase` that keeps a MercadoLibre token chain alive.

    ``session.auth = MLAuth.from_env(".env")`` is all a session needs. See the README for the
    single-flight refresh and for every option.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str | Secret,
        store: TokenStore,
        *,
        token_url: str = DEFAULT_TOKEN_URL,
        hosts: Iterable[str] = DEFAULT_HOSTS,
        refresh_margin: float = 300.0,
        lock_timeout: float = 120.0,
        min_token_age: float = 10.0,
        timeout: float | tuple[float, float] = (5.0, 15.0),
        max_attempts: int = 3,
        backoff: float = 0.5,
        on_refresh: Callable[[TokenSet], None] | None = None,
    ) -> None:
        if not isinstance(client_id, str) or not client_id.strip():
            raise ConfigError("client_id is empty; pass the app's client id (ML_CLIENT_ID)")
        secret = client_secret if isinstance(client_secret, Secret) else Secret(client_secret)
        if not secret.reveal().strip():
            raise ConfigError("client_secret is empty; pass the app's secret (ML_CLIENT_SECRET)")
        if not isinstance(store, TokenStore):
            raise ConfigError(f"store must be a TokenStore such as EnvFileStore, got {store!r}")
        if refresh_margin < 0 or lock_timeout <= 0 or min_token_age < 0:
            raise ConfigError("refresh_margin and min_token_age must be >= 0, lock_timeout > 0")
        self.client_id = client_id.strip()
        self.store = store
        bind_client = getattr(store, "bind_client", None)
        if bind_client is not None:  # a shared store (Redis) names its key after the app
            bind_client(self.client_id)
        self.token_url = check_token_url(token_url, "token_url")
        self._hosts = check_hosts(hosts if isinstance(hosts, str) else list(hosts), "hosts")
        self.refresh_margin = float(refresh_margin)
        self.lock_timeout = float(lock_timeout)
        self.min_token_age = float(min_token_age)
        self.on_refresh = on_refresh
        self._endpoint = TokenEndpoint(
            self.token_url,
            self.client_id,
            secret,
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
            # Retries must end well before peers waiting on the lock give up.
            budget=self.lock_timeout / 2,
        )
        expiry = getattr(store, "lock_timeout", None)  # a lock that expires (Redis)
        if isinstance(expiry, float) and expiry <= self._endpoint.attempt_time:
            # Allowed (the commit stays fenced), but a slow answer then lets the lock lapse
            # mid-call and the refresh fails with LockLostError; say so once, at set-up.
            log.warning(
                "%s: the refresh lock expires after %gs (lock_timeout, ML_TOKEN_LOCK_TIMEOUT), "
                "not longer than one token call (%gs connect + read timeout); a slow token "
                "endpoint will make refreshes fail with LockLostError. Raise it above %gs.",
                store.location,
                expiry,
                self._endpoint.attempt_time,
                self._endpoint.attempt_time,
            )
        # A thread waiting for the mutex waits out the holder's whole turn: its wait for the
        # file lock and its retry series (two, when it adopts a token rotated outside the lock).
        self._mutex_timeout = self.lock_timeout + 2 * self._endpoint.budget
        # Serializes refreshes inside this process, so threads wait here and only one of them
        # goes on to the cross-process lock.
        self._mutex = threading.Lock()
        tokens, stamp = store.load()
        if tokens.refresh_token is None:
            raise ConfigError(
                f"{store.location}: ML_REFRESH_TOKEN is missing or empty. " + REAUTHORIZE_HINT
            )
        self._cache: tuple[TokenSet, Hashable] = (tokens, stamp)
        # Tokens whose save failed (the only live copy of the chain), and the refresh token the
        # store still holds (the base a later save must find there).
        self._unsaved: tuple[TokenSet, Secret] | None = None
        # The last failed refresh: (when, retry not before (monotonic); the token; the error).
        self._last_failure: tuple[float, float, Secret, RefreshError] | None = None
        self._advisory_retry_at = 0.0
        self._persist_retry_at = 0.0
        # journal: the store's write-ahead refresh journal, None if it has none.
        self._journal = journal_of(store)
        _instances.add(self)

    @classmethod
    def from_env(cls, path: str | os.PathLike[str] = ".env", **kwargs: Any) -> MLAuth:
        """Build from a ``.env``: credentials, token URL and hosts from the file, tokens in it.

        Keyword arguments override the file and are passed on to :class:`MLAuth`; ``store=``
        keeps the credentials in the file and the tokens elsewhere, as ``ML_TOKEN_STORE`` does.
        If a refresh could not be saved or locked (:func:`~mlauth.preflight.refresh_problem`),
        an ERROR says so now.
        """
        settings = env_settings(path)
        settings.update(kwargs)
        store = settings.pop("store", None) or store_from_env(path)
        auth = cls(store=store, **settings)  # type: ignore[arg-type]
        # Said at start, not at the first refresh hours later; not raised: a pipeline whose
        # token is still valid may finish its work before a refresh is due.
        # Under `mlauth run` the command's .env was checked before the command started; every
        # Python it starts would otherwise check it again.
        checked = os.environ.get(RUN_ENV_VARIABLE)
        if not checked or os.path.realpath(checked) != os.path.realpath(path):
            problem = refresh_problem(auth.store)
            if problem is not None:
                log.error("the next token refresh will fail: %s", problem)
        return auth

    def __repr__(self) -> str:
        tokens = self._cache[0]
        return (
            f"MLAuth(client_id={self.client_id!r}, store={self.store!r}, "
            f"hosts={self._hosts!r}, {tokens.describe()})"
        )

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A pickle would carry the client secret and live tokens into whatever transports it
        # (a pool's pipe, a task queue's broker), and the copy would share none of this
        # process's state anyway. Each process builds its own; fork children inherit it.
        raise TypeError(
            "an MLAuth cannot be pickled (nor a Session holding one): with a spawn or "
            "forkserver pool, or a task queue, build one in each worker, e.g. "
            "MLAuth.from_env(path) in the pool's initializer; forked workers inherit a "
            "module-level one and may use it as is"
        )

    @property
    def tokens(self) -> TokenSet:
        """The tokens this process uses now (values wrapped in :class:`Secret`)."""
        unsaved = self._unsaved
        return unsaved[0] if unsaved is not None else self._cache[0]

    def handles(self, url: str) -> bool:
        """Whether a request to ``url`` would carry the token (an allowed host, https)."""
        return self._hosts.allows(url)

    def valid_tokens(self) -> TokenSet:
        """Tokens with a usable access token, as the next request would send them.

        A peer's newer token is picked up; an expired token is refreshed (waiting for the
        locks), and one within the refresh margin is refreshed if nobody else is doing it.
        """
        return self._current()

    def refresh(self, *, force: bool = True) -> TokenSet:
        """Refresh now under both locks and return the tokens to use.

        ``force=True`` always spends the refresh token found under the lock (``mlauth
        refresh``). ``force=False`` treats the token this process holds as failed, as a 401
        would: if a peer has already replaced it, or it was refreshed less than
        ``min_token_age`` ago, those tokens are returned and nothing is spent. That is the
        right answer to a legacy "refresh now" call made by several processes at once.
        """
        if not force:
            failed = self._sync().access_token
            tokens = self._single_flight(failed=failed, reason="requested", wait=True)
            return self.tokens if tokens is None else tokens
        if not self._mutex.acquire(timeout=self._mutex_timeout):
            raise LockTimeoutError(
                f"another thread of this process has been refreshing for over "
                f"{self._mutex_timeout:g}s; no refresh was attempted",
                lock_path="<in-process>",
            )
        try:
            with self.store.lock(self.lock_timeout):
                new = self._refresh(self._reread_locked(), "forced")
        finally:
            self._mutex.release()
        self._notify(new)
        return new

    # -- before the request -------------------------------------------------------------

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if not self._hosts.allows(r.url):
            return r  # other hosts get nothing from us, not even a removed header
        try:
            tokens = self._current()
        except MLAuthError:
            raise
        except Exception as exc:
            raise self._unexpected(exc, "getting a token for the request") from exc
        assert tokens.access_token is not None  # _current refreshes when there is none
        # Replaces whatever the caller set: legacy code passes stale headers.
        r.headers["Authorization"] = f"Bearer {tokens.access_token.reveal()}"
        r.register_hook("response", self._handle_401)
        return r

    def _current(self) -> TokenSet:
        """The token to send: a peer's newer one if the store changed, refreshed if due."""
        tokens = self._sync()
        if not tokens.needs_refresh(self.refresh_margin):
            return tokens
        if not tokens.is_expired():
            return self._refresh_ahead(tokens)
        # Mandatory: no valid token to send, so wait for the refresh and fail loudly.
        refreshed = self._single_flight(failed=None, reason="expired", wait=True)
        assert refreshed is not None
        return refreshed

    def _sync(self) -> TokenSet:
        """The tokens to use now; the store is re-read only when its stamp changed.

        Unsaved tokens (a refresh whose save failed) come first: they are the only live copy
        of the chain, and saving them is retried now and then.
        """
        unsaved = self._unsaved
        if unsaved is not None and not self._retry_persist():
            return unsaved[0]
        tokens, stamp = self._cache
        if self.store.stamp() != stamp:
            tokens, stamp = self.store.load()
            log.debug("store changed; picked up %s", tokens.describe())
            self._cache = (tokens, stamp)
        return tokens

    def _refresh_ahead(self, tokens: TokenSet) -> TokenSet:
        """Advisory refresh: the current token still works, so never wait and never fail."""
        if time.monotonic() < self._advisory_retry_at:
            return tokens  # a recent attempt failed; don't hammer the endpoint
        try:
            refreshed = self._single_flight(failed=None, reason="ahead of expiry", wait=False)
        except LockTimeoutError:
            log.debug("another process is refreshing; sending the current token meanwhile")
            return tokens
        except Exception as caught:  # noqa: BLE001 (the current token works: use it, say why)
            exc = caught
            if not isinstance(exc, MLAuthError):
                exc = self._unexpected(exc, "refreshing ahead of expiry")
            left = tokens.expires_in() or 0.0
            self._advisory_retry_at = time.monotonic() + min(ADVISORY_RETRY_DELAY, left / 4)
            bad = isinstance(exc, (InvalidGrantError, UnexpectedError))
            level = logging.ERROR if bad else logging.WARNING
            log.log(level, "refresh ahead of expiry failed; using the current token: %s", exc)
            return tokens
        return refreshed or tokens  # None: another thread of ours is refreshing

    # -- after the response -------------------------------------------------------------

    def _handle_401(self, r: requests.Response, **kwargs: Any) -> requests.Response:
        if r.status_code != 401:
            return r  # 403 is about permissions, never about expiry
        request = r.request
        # Hooks run on every redirect hop: another host's 401 is none of our business, and
        # a request whose header requests stripped on a redirect did not carry our token.
        if not self._hosts.allows(request.url):
            return r
        failed = _bearer(request.headers.get("Authorization"))
        if failed is None:
            return r
        try:
            new = self._recover(Secret(failed))
        except BaseException as exc:
            r.close()  # the caller never sees this response: give its connection back
            if isinstance(exc, MLAuthError) or not isinstance(exc, Exception):
                raise
            raise self._unexpected(exc, "recovering from a 401") from exc
        if new is None:
            return r
        if not _replayable(request):
            log.warning(
                "got a 401 on %s %s; the token is refreshed but the body cannot be sent again "
                "(a generator or unrewindable stream), so the 401 is returned",
                request.method,
                request.path_url,
            )
            return r
        # Read and release the first answer so the re-send can reuse its connection.
        r.content  # noqa: B018
        r.close()
        prep = request.copy()  # never mutate r.request: it becomes history[0].request
        if not isinstance(cast(object, prep.body), (bytes, str, type(None))):
            rewind_body(prep)
        jar = cast(CookieJar, prep._cookies)
        extract_cookies_to_jar(jar, request, r.raw)
        prep.headers.pop("Cookie", None)  # prepare_cookies never replaces an existing header
        prep.prepare_cookies(jar)
        prep.headers["Authorization"] = f"Bearer {new.reveal()}"
        # The hooks dict is shared with the copy; the re-sent answer does not go through the
        # hooks again, so one 401 can never loop.
        retried: requests.Response = r.connection.send(prep, **kwargs)
        retried.history.append(r)
        retried.request = prep
        return retried

    def _recover(self, failed: Secret) -> Secret | None:
        """The token to re-send with after ``failed`` got a 401, or None to return the 401."""
        current = self._sync()  # a thread may have cached an older read
        if self._satisfied(current, failed):
            return current.access_token  # another thread or process has moved on already
        tokens = self._single_flight(failed=failed, reason="401", wait=True)
        return None if tokens is None else tokens.access_token

    # -- the refresh itself ---------------------------------------------------------------

    def _single_flight(self, *, failed: Secret | None, reason: str, wait: bool) -> TokenSet | None:
        """Refresh at most once for all threads and processes; return the tokens to use.

        With ``wait`` False (the advisory path) neither lock is waited for: None means another
        thread holds the mutex, and LockTimeoutError that another process holds the lock.
        With ``wait`` True, None means ``failed`` got a genuine 401 (see _refresh_locked).
        """
        if not wait:
            if not self._mutex.acquire(blocking=False):
                return None
        elif not self._mutex.acquire(timeout=self._mutex_timeout):
            raise LockTimeoutError(
                f"another thread of this process has been refreshing for over "
                f"{self._mutex_timeout:g}s; no refresh was attempted",
                lock_path="<in-process>",
            )
        try:
            tokens, refreshed = self._refresh_locked(failed=failed, reason=reason, patient=wait)
        finally:
            self._mutex.release()
        if refreshed is not None:
            # Outside both locks: a slow or re-entrant callback must not stall the others.
            self._notify(refreshed)
        return tokens

    def _satisfied(self, tokens: TokenSet, failed: Secret | None) -> bool:
        """Whether ``tokens`` already answer the need, so no refresh token is spent."""
        # After a 401 (``failed`` set) the failed token never satisfies, and a peer's token
        # only while it has time left: after a long wait for the lock (a Redis lock orphaned
        # by a restart lasts lock_timeout) it may have expired, or be so close to expiry that
        # the re-sent request meets a second 401. The same margin as before a request; a
        # token a peer refreshed moments ago is young, far from it, so this spends nothing
        # more in the common case.
        if tokens.access_token is None or tokens.access_token == failed:
            return False
        return not tokens.needs_refresh(self.refresh_margin)

    def _young(self, tokens: TokenSet) -> bool:
        """Refreshed so recently that a 401 on it cannot be expiry."""
        age = tokens.age()
        if age is None:
            return False
        lifetime = tokens.lifetime
        window = self.min_token_age
        if lifetime is not None:
            window = min(window, lifetime * MAX_MARGIN_SHARE)
        return 0 <= age < window

    def _refresh_locked(
        self, *, failed: Secret | None, reason: str, patient: bool
    ) -> tuple[TokenSet | None, TokenSet | None]:
        """Re-read, decide, refresh, persist. Called with the mutex held.

        Returns (tokens to use, the new tokens if this call spent a refresh token). The
        tokens to use are None when ``failed`` got a genuine 401: it is the current token and
        was refreshed moments ago, so refreshing again would not help. An impatient call (the
        advisory refresh: the current token still works) takes the file lock only if it is
        free and makes one attempt, so its own request is not held up either.
        """
        tokens = self._sync()
        if self._satisfied(tokens, failed):
            return tokens, None  # a thread of ours refreshed while we waited for the mutex
        with self.store.lock(self.lock_timeout if patient else 0.0):
            tokens = self._reread_locked()  # the re-read that makes refreshes single-flight
            if self._satisfied(tokens, failed):
                log.debug(
                    "adopted a token refreshed by %s (%s)", tokens.refreshed_by, tokens.describe()
                )
                return tokens, None
            if failed is not None and self._young(tokens):
                log.debug("401 on a token refreshed %.1fs ago: not an expiry", tokens.age())
                return None, None
            new = self._refresh(tokens, reason, patient=patient)
            return new, new

    def _reread_locked(self) -> TokenSet:
        """The freshest tokens, read under the store lock (unsaved ones saved first if possible)."""
        unsaved = self._unsaved
        if unsaved is not None:
            return self._cache[0] if self._persist_unsaved_locked() else unsaved[0]
        tokens, stamp = self.store.load()
        if self._journal is not None:  # journal: finish a refresh a dead process left half-done
            tokens, stamp, _ = recover(self._journal, self.store, tokens, stamp)
        self._cache = (tokens, stamp)
        return tokens

    def _refresh(self, tokens: TokenSet, reason: str, *, patient: bool = True) -> TokenSet:
        """Spend the refresh token and persist its successor. Called under both locks."""
        spent = tokens.refresh_token
        if spent is None:
            raise ConfigError(
                f"{self.store.location}: ML_REFRESH_TOKEN is missing or empty. " + REAUTHORIZE_HINT
            )
        # What the store holds: the spent token, or (while tokens are unsaved) an older one.
        base = self._unsaved[1] if self._unsaved is not None else spent
        failure = self._last_failure
        if patient and failure is not None and failure[2] == spent:
            failed_at, not_before, _, error = failure
            if isinstance(error, InvalidGrantError) or time.monotonic() < not_before:
                # The same token, just refused: don't ask again yet.
                ago = time.monotonic() - failed_at
                raise _fresh(
                    error, f"not retried: this refresh token failed {ago:.1f}s ago: {error}"
                )
        # A refresh token spent whose successor cannot be saved is lost for good: check first
        # (and again before each retry, where a locking store also renews its lock).
        orphan = None  # who sent this token before and died without its answer
        journal = self._journal
        if journal is not None:  # journal: a token known dead is not sent
            journal.check_reauthorization(spent)
        self.store.check_writable()
        if journal is not None:  # journal: the intent on disk before the POST
            orphan = journal.intent(spent)
        # Expiry counts from just before the first POST, not from the answer, and not from
        # before the store's check either: that check fsyncs (or asks Redis), which under load
        # can take a good part of a second that the token would then seem older by.
        started = time.time()
        attempts_made = 0

        def before_attempt() -> None:
            nonlocal attempts_made
            attempts_made += 1
            if attempts_made > 1:
                self.store.check_writable()

        try:
            # A token possibly spent by a dead refresher is tried exactly once.
            answer = self._endpoint.refresh(
                spent,
                attempts=None if patient and not orphan else 1,
                before_attempt=before_attempt,
            )
        except InvalidGrantError as exc:
            # A process that does not take our lock (a legacy script) may have rotated it.
            again, stamp = self.store.load()
            if again.refresh_token is not None and again.refresh_token not in (spent, base):
                log.info("refresh token was rotated outside the lock; adopting the new one")
                self._cache = (again, stamp)
                self._unsaved = None
                if again.access_token is not None and not again.is_expired():
                    return again
                return self._refresh(again, reason, patient=patient)
            if journal is not None:  # journal: tell every process to stop trying this token
                refused = journal.refused(spent, exc, orphan)
                if refused is not exc:
                    self._remember_failure(spent, refused, patient)
                    raise refused from None
            self._remember_failure(spent, exc, patient)
            raise
        except RefreshError as exc:
            if journal is not None:  # journal: keep the token "possibly spent" unless proven not
                journal.abort(spent, unanswered=_possibly_spent_by(exc, attempts_made))
            self._remember_failure(spent, exc, patient)
            raise
        if answer.refresh_token is None:
            log.warning(
                "the token answer had no refresh_token (does the app have offline_access?); "
                "keeping the current one"
            )
        new = TokenSet(
            access_token=answer.access_token,
            refresh_token=answer.refresh_token or spent,
            expires_at=None if answer.expires_in is None else started + answer.expires_in,
            refreshed_at=started,
            refreshed_by=f"pid {os.getpid()}@{socket.gethostname()}",
        )
        # Persist before anything else uses the new tokens: the old refresh token is dead.
        if journal is not None:  # journal: the answer first, so a crash from here loses nothing
            journal.answer(spent, new)
        try:
            stamp = self.store.save(new)
        except StaleCommitError as exc:
            # Our lock expired during the call and a peer committed since: theirs win.
            tokens, stamp = self.store.load()
            self._cache = (tokens, stamp)
            self._unsaved = None
            if journal is not None:  # journal: the answer is void, the store holds a newer chain
                journal.commit()
            log.warning("%s; using %s", exc, tokens.describe())
            return tokens
        except Exception as exc:  # noqa: BLE001 (whatever failed, `new` is the only live copy)
            self._unsaved = (new, base)
            self._persist_retry_at = time.monotonic() + PERSIST_RETRY_DELAY
            rescue = None if journal is None else journal.write_rescue(base, new)  # journal
            where = rescue or "none could be written"
            if journal is not None and rescue == journal.fallback_rescue_path:
                # Each process finds the state dir from its own environment: say so, and how
                # to put the file where every process looks.
                where += (
                    " (in the state dir of this process's $XDG_STATE_HOME or $HOME: processes "
                    "run with another user, $HOME or $XDG_STATE_HOME do not look there; moving "
                    f"it to {journal.rescue_path} makes every process find it)"
                )
            log.error(
                "refreshed tokens could not be saved to %s (%s: %s); this process keeps them "
                "in memory and retries saving, but other processes cannot see them until then. "
                "Rescue copy: %s",
                self.store.location,
                type(exc).__name__,
                exc,
                where,
            )
            return new
        if journal is not None:  # journal: the store has the answer; commit (empty) it
            journal.commit()
        self._cache = (new, stamp)
        self._unsaved = None
        log.info(
            "refreshed MercadoLibre token (%s) in pid %d: %s",
            reason,
            os.getpid(),
            new.describe(),
        )
        return new

    def _retry_persist(self) -> bool:
        """Now and then, try again to save unsaved tokens, without waiting for any lock.

        Returns whether they are settled; False keeps using them from memory.
        """
        if time.monotonic() < self._persist_retry_at or not self._mutex.acquire(blocking=False):
            return self._unsaved is None
        try:
            self._persist_retry_at = time.monotonic() + PERSIST_RETRY_DELAY
            if self._unsaved is None:
                return True  # another thread settled them while we took the mutex
            with self.store.lock(0.0):
                return self._persist_unsaved_locked()
        except MLAuthError as exc:  # the lock is busy or cannot be opened: try again later
            log.debug("could not retry saving the refreshed tokens yet: %s", exc)
            return False
        finally:
            self._mutex.release()

    def _persist_unsaved_locked(self) -> bool:
        """Save unsaved tokens, but only over the refresh token they replaced (compare-and-set).

        If the store holds anything else, either our save landed after all (the rename worked
        and something after it failed) or a peer has moved the chain on from it: writing ours
        then would put a spent token over a live one, so the store's tokens win. Returns
        whether the tokens are settled (no longer unsaved).
        """
        unsaved = self._unsaved
        assert unsaved is not None
        tokens, spent = unsaved
        try:
            stored, stamp = self.store.load()
            if stored.refresh_token == spent:
                stamp = self.store.save(tokens)
                stored = tokens
                log.info("saved the refreshed tokens to %s at last", self.store.location)
            else:
                log.warning(
                    "%s moved on while our tokens were unsaved; using its tokens",
                    self.store.location,
                )
        except Exception as exc:  # noqa: BLE001 (keep the only live copy, whatever failed)
            log.error("still cannot save refreshed tokens to %s: %s", self.store.location, exc)
            return False
        if self._journal is not None:  # journal: settled, so nothing is left to replay
            self._journal.settled()
        self._cache = (stored, stamp)
        self._unsaved = None
        return True

    def _remember_failure(self, spent: Secret, error: RefreshError, patient: bool) -> None:
        # A single advisory attempt says little about the endpoint: a 401 or an expiry after
        # it still gets a full retry series.
        if not patient and not isinstance(error, InvalidGrantError):
            return
        wait = error.retry_after if error.retry_after is not None else FAILURE_COOLDOWN
        now = time.monotonic()
        remembered = _fresh(error, str(error))
        self._last_failure = (now, now + min(wait, MAX_FAILURE_MEMORY), spent, remembered)

    def _unexpected(self, exc: Exception, doing: str) -> UnexpectedError:
        """``exc``, which is no MLAuthError, as one: callers catch RequestException.

        Its message is someone else's and may quote a value it was handed: the tokens this
        process knows, the client secret and anything token-shaped are fingerprinted.
        """
        known: list[Secret | None] = [self._endpoint._client_secret]
        for tokens in (self._cache[0], self._unsaved[0] if self._unsaved else None):
            if tokens is not None:
                known += [tokens.access_token, tokens.refresh_token]
        return UnexpectedError(
            f"mlauth failed unexpectedly while {doing}: "
            + mask(f"{type(exc).__name__}: {exc}", known)
            + " (the original exception is this one's __cause__)"
        )

    def _notify(self, tokens: TokenSet) -> None:
        if self.on_refresh is None:
            return
        try:
            self.on_refresh(tokens)
        except Exception:  # a user's callback must not break the request that refreshed
            log.exception("on_refresh callback failed")
