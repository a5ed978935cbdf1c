"""One conversation with the token endpoint: the POST, its retries, and its error mapping."""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import random
import time
from collections.abc import Callable, Iterable

import requests
import urllib3.exceptions

from .answers import answer_of, parse_body, read_answer
from .errors import REAUTHORIZE, InvalidGrantError, RefreshError, scrub
from .secret import Secret, SecretForm
from .tokens import TokenAnswer

__all__ = ["TokenEndpoint"]

log = logging.getLogger("mlauth")


# Errors that no retry can fix; each gets the fix in its message.
_CODE_EXCHANGE = "the authorization code exchange"  # mlauth login's grant, in messages
_FATAL_HINTS = {
    "invalid_client": "check ML_CLIENT_ID and ML_CLIENT_SECRET (a renewed secret must be "
    "copied into the .env)",
    "unauthorized_client": "the app may not use this grant; check the app's settings",
    "unauthorized_application": "the app is blocked by MercadoLibre; see the developer panel",
    "invalid_scope": "the app lacks the offline_access scope needed for refresh tokens",
    "unsupported_grant_type": "the token URL does not accept refresh tokens; check ML_TOKEN_URL",
    "invalid_request": "the token endpoint rejected the request's shape; check ML_TOKEN_URL",
    "forbidden": "the token endpoint refused this client; check the app's status",
}


class _NoAuth(requests.auth.AuthBase):
    """Explicit "no auth": keeps netrc credentials and any global patch off the token POST."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


def _read_success(raw: bytes, status: int, what: str) -> TokenAnswer:
    """The tokens a 2xx answer holds (:mod:`mlauth.answers`); RefreshError if none is usable.

    Odd fields that cost nothing (an unusable expires_in, a token_type other than bearer)
    are one warning; the tokens are kept.
    """
    reading = read_answer(raw)
    answer = answer_of(reading)
    if isinstance(answer, str):
        fix = (
            "The code is spent: run `mlauth login` again."
            if what == _CODE_EXCHANGE
            else "The refresh token may have been spent; if the next refresh says "
            f"invalid_grant: {REAUTHORIZE}"
        )
        unusable = RefreshError(
            f"the token endpoint answered HTTP {status} to the {what} with an unusable body "
            f"({answer}). {fix}",
            status_code=status,
        )
        unusable.possibly_spent = f"HTTP {status} with an unusable body"
        raise unusable
    if reading.oddities:
        expiry = ", with an unknown expiry (the first 401 refreshes them)"
        log.warning(
            "the token answer was odd (%s); its tokens were kept%s",
            "; ".join(reading.oddities),
            expiry if answer.expires_in is None else "",
        )
    return answer


def _keep_raw(on_answer: Callable[[bytes, float], None] | None, raw: bytes, at: float) -> None:
    """Hand the raw answer to whoever keeps it, before anything reads it."""
    if on_answer is None:
        return
    try:
        on_answer(raw, at)
    except Exception as exc:  # noqa: BLE001 (a keeper that failed must not cost the answer)
        log.error(
            "could not keep the raw token answer (%s: %s); reading it all the same",
            type(exc).__name__,
            exc,
        )


def _retry_after(response: requests.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request certainly never reached the server (so no token was spent)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    inner = getattr(reason, "reason", reason)
    return isinstance(inner, urllib3.exceptions.NewConnectionError)


# Raised before anything is sent: the URL or a header cannot even be put on the wire.
_NEVER_SENT = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
)


def _error_fields(response: requests.Response) -> tuple[str | None, str | None]:
    # Read as leniently as a 2xx answer: response.json() raises RecursionError (no ValueError)
    # on a body nested too deeply, and a stray byte that is no UTF-8 spoils only its string.
    body, _ = parse_body(response.content)
    if body is None:
        return None, None
    error = body.get("error")
    # The text is under error_description in the docs and under message in some answers.
    description = body.get("error_description") or body.get("message")
    return (
        error if isinstance(error, str) else None,
        description if isinstance(description, str) else None,
    )


@dataclasses.dataclass
class _Failure:
    """What the failed attempts of one series said, for the next attempt and the error."""

    last: str = "no attempt made"
    retry_after: float | None = None  # what the server asked of the last attempt
    ambiguous: str | None = None  # why an attempt may have reached the server
    stop: str = ""  # why the series stopped before its last attempt

    def sent(self, why: str) -> None:
        """The attempt may have reached the server, and failed as ``why`` says."""
        self.last = why
        self.ambiguous = self.ambiguous or why

    def error(self, what: str, attempts: int) -> RefreshError:
        note = (
            f" An attempt may have reached the server without its answer arriving: "
            f"{self.ambiguous}."
            if self.ambiguous
            else ""
        )
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        fix = (
            " Run `mlauth login` again once the token endpoint answers: the code may be spent."
            if what == _CODE_EXCHANGE
            else ""
        )
        error = RefreshError(
            f"{what} gave up after {tries}{self.stop}: {self.last}.{note} The stored tokens "
            f"were left as they were.{fix}"
        )
        error.retry_after = self.retry_after
        error.possibly_spent = self.ambiguous
        return error


def _scrub(error: RefreshError, form: SecretForm) -> None:
    """Mask ``form``'s secrets in ``error``, whose text quotes the server (which may echo the
    form back), and cut its context: an exception from reading the answer holds the answer in
    its frames."""
    scrub(error, form.secrets)
    error.__context__ = None


class TokenEndpoint:
    """Calls the token endpoint through a private session.

    Retries: every failure that may be transient (no connection, a timeout, a reset, 5xx, 429)
    is retried a bounded number of times with jittered exponential backoff, honouring
    ``Retry-After``. A retry after the request may have reached the server (a read timeout, a
    reset, a 5xx) can present a refresh token the server already consumed; that retry is still
    the right move, since it cannot make things worse: if the token was consumed its successor
    is already lost and the retry only finds out (``invalid_grant``), and if it was not, the
    retry saves the chain. The error then says which earlier attempt was ambiguous.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: Secret,
        *,
        timeout: float | tuple[float, float] = (5.0, 15.0),
        max_attempts: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        budget: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.budget = budget
        self._sleep = sleep
        self._session = self._new_session()

    @staticmethod
    def _new_session() -> requests.Session:
        # A private session: under a global patch of requests every other session carries our
        # auth, and the token POST must neither get a Bearer header nor re-enter the auth.
        session = requests.Session()
        session.auth = _NoAuth()
        return session

    def reset_session(self) -> None:
        """A new connection pool, for a forked child (the parent's sockets are not ours)."""
        self._session = self._new_session()

    def __repr__(self) -> str:
        return f"TokenEndpoint({self.token_url!r}, client_id={self.client_id!r})"

    def refresh(
        self,
        refresh_token: Secret,
        *,
        attempts: int | None = None,
        before_attempt: Callable[[], None] | None = None,
        on_answer: Callable[[bytes, float], None] | None = None,
        known: Iterable[Secret | None] = (),
    ) -> TokenAnswer:
        """Spend ``refresh_token`` for a new token pair, in at most ``attempts`` tries.

        ``before_attempt`` runs before every POST; whatever it raises stops the series before
        the token is presented again (a store renews its lock there, or finds it lost).
        ``on_answer`` gets the raw bytes of a 2xx answer and their arrival time before
        anything reads them (the store journals them: they hold the only live refresh token).
        ``known``: the other secrets the caller holds (its access token), masked like the
        form's in whatever the server's answers put into logs, the journal and errors.
        """
        form = SecretForm(
            {
                "grant_type": "refresh_token",
                "client_id": self.client_id,
                "client_secret": self._client_secret,
                "refresh_token": refresh_token,
            },
            unsent=known,
        )
        return self._series(
            form, attempts or self.max_attempts, before_attempt, on_answer=on_answer
        )

    def exchange_code(
        self,
        code: Secret,
        redirect_uri: str,
        *,
        code_verifier: Secret | None = None,
        before_attempt: Callable[[], None] | None = None,
        on_answer: Callable[[bytes, float], None] | None = None,
    ) -> TokenAnswer:
        """Exchange an authorization code (``mlauth login``) for the first token pair.

        A code is single use like a refresh token, so the same retry rules apply, and
        ``before_attempt`` and ``on_answer`` as for :meth:`refresh`. A refused code raises
        :class:`InvalidGrantError`.
        """
        form = SecretForm(
            {
                "grant_type": "authorization_code",
                "client_id": self.client_id,
                "client_secret": self._client_secret,
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": code_verifier,  # left out when None
            }
        )
        return self._series(
            form, self.max_attempts, before_attempt, what=_CODE_EXCHANGE, on_answer=on_answer
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after + random.uniform(0, self.backoff / 2)
        # Full jitter: processes that failed together do not come back together.
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))

    @property
    def attempt_time(self) -> float:
        """The longest one attempt can take: its connect plus its read timeout."""
        return sum(self.timeout) if isinstance(self.timeout, tuple) else 2 * self.timeout

    def _series(
        self,
        form: SecretForm,
        attempts: int,
        before_attempt: Callable[[], None] | None,
        *,
        what: str = "token refresh",
        on_answer: Callable[[bytes, float], None] | None,
    ) -> TokenAnswer:
        failure = _Failure()
        give_up_at = time.monotonic() + self.budget
        attempt = 0
        try:
            while True:
                attempt += 1
                if before_attempt is not None:
                    before_attempt()  # outside the attempt: its errors are not the endpoint's
                answer = self._attempt(form, failure, what, on_answer)
                if answer is not None:
                    return answer
                delay = self._delay(attempt, failure.retry_after)
                if attempt >= attempts:
                    break
                if time.monotonic() + delay + self.attempt_time > give_up_at:
                    failure.stop = (
                        f" (the server asked to wait {failure.retry_after:g}s; another attempt "
                        f"after that would not end within the {self.budget:g}s retry budget)"
                        if failure.retry_after is not None
                        else f" (another attempt would not end within the {self.budget:g}s budget)"
                    )
                    break
                log.debug(
                    "token endpoint attempt %d/%d failed (%s); retrying in %.2fs",
                    attempt,
                    attempts,
                    failure.last,
                    delay,
                )
                self._sleep(delay)
            raise failure.error(what, attempt)
        except RefreshError as exc:
            _scrub(exc, form)  # whatever the server's words put in it (before_attempt's too)
            raise

    def _attempt(
        self,
        form: SecretForm,
        failure: _Failure,
        what: str,
        on_answer: Callable[[bytes, float], None] | None = None,
    ) -> TokenAnswer | None:
        """One POST: the answer, or None with ``failure`` updated; raises what no retry fixes.

        Whatever it raises (an error of ours, a bug, ^C) leaves without the frames below this
        one and without the exceptions it was raised while handling: their locals hold the
        encoded form (requests', urllib3's) or the server's answer before it was masked (the
        error fields read from it, the body), and crash reporters send locals.
        """
        try:
            return self._post_and_judge(form, failure, what, on_answer)
        except BaseException as exc:  # noqa: BLE001 (raised again, trimmed)
            exc.__cause__ = exc.__context__ = None
            raise exc.with_traceback(None)  # noqa: B904 (the same exception, not a new one)

    def _post_and_judge(
        self,
        form: SecretForm,
        failure: _Failure,
        what: str,
        on_answer: Callable[[bytes, float], None] | None,
    ) -> TokenAnswer | None:
        failure.retry_after = None
        unusable: str | None = None
        try:
            response = self._post(form)
        except (requests.ConnectionError, requests.Timeout) as exc:
            if _never_sent(exc):
                failure.last = f"could not connect to {self.token_url} ({type(exc).__name__})"
            else:
                failure.sent(f"no answer from {self.token_url} ({type(exc).__name__})")
        except _NEVER_SENT as exc:
            unusable = type(exc).__name__
        except requests.RequestException as exc:
            unusable = type(exc).__name__
            failure.ambiguous = failure.ambiguous or f"{unusable} after sending"
        else:
            outcome = self._judge(response, failure.ambiguous, what, on_answer)
            if isinstance(outcome, TokenAnswer):
                return outcome
            # The server's words (its error code) go into the retry log line and the error.
            failure.last, failure.retry_after = form.mask(outcome[0]), outcome[1]
            if response.status_code >= 500:
                failure.sent(failure.last)
        if unusable is not None:
            # Raised outside the except block so the error has no __context__: requests'
            # exception carries the request, whose body holds the secret and the token.
            error = RefreshError(
                f"cannot call the token endpoint {self.token_url}: {unusable}. Check ML_TOKEN_URL."
            )
            error.possibly_spent = failure.ambiguous
            raise error
        return None

    def _post(self, form: SecretForm) -> requests.Response:
        # Session.request is what mlauth.install() and other libraries patch, and what runs
        # on-request listeners (keep_globals_current): none of that belongs inside the locked
        # refresh, so the POST is prepared and sent here as Session.request would do it.
        session = self._session
        prepared = session.prepare_request(
            requests.Request(
                "POST",
                self.token_url,
                # The body, never the query string (urllib3 logs URLs), encoded only here.
                data=form.encode(),
                headers={
                    "Accept": "application/json",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
        )
        settings = session.merge_environment_settings(
            prepared.url or self.token_url, {}, None, None, None
        )
        # Never cut short: a read abandoned after the server rotated the token loses the
        # chain. The budget decides whether an attempt starts at all.
        response = session.send(prepared, timeout=self.timeout, allow_redirects=False, **settings)
        # The answer lives on in frames (on the traceback of the error it becomes) and maybe
        # in a caller's hands: its .request is a copy without the plain body.
        response.request = sent = prepared.copy()
        sent.body = None
        return response

    def _judge(
        self,
        response: requests.Response,
        ambiguous: str | None,
        what: str,
        on_answer: Callable[[bytes, float], None] | None = None,
    ) -> TokenAnswer | tuple[str, float | None]:
        """A TokenAnswer, or (reason, retry_after) for a retryable failure; raises otherwise."""
        status = response.status_code
        if 200 <= status < 300:
            # The body was read by send(). Kept before it is read: once the server rotated,
            # it holds the only live refresh token, and reading it may find fault.
            raw, arrived = response.content, time.time()
            response.close()
            _keep_raw(on_answer, raw, arrived)
            return _read_success(raw, status, what)
        error, description = _error_fields(response)
        response.close()
        if error == "invalid_grant":
            note = (
                f" An earlier attempt may have spent it without its answer arriving ({ambiguous})."
                if ambiguous
                else ""
            )
            raise InvalidGrantError(
                f"the refresh token was rejected (invalid_grant: {description or 'no detail'})."
                f"{note} {REAUTHORIZE}",
                status_code=status,
                error=error,
                description=description,
            )
        if status == 429 or error == "local_rate_limited":
            return f"rate limited (HTTP {status})", _retry_after(response)
        if status >= 500:
            return f"HTTP {status} {error or ''}".rstrip(), _retry_after(response)
        hint = _FATAL_HINTS.get(error or "", "check ML_TOKEN_URL and the app's credentials")
        refused = RefreshError(
            f"the token endpoint refused the {what} (HTTP {status} {error or 'no error code'}: "
            f"{description or 'no detail'}); {hint}. Not retried.",
            status_code=status,
            error=error,
            description=description,
        )
        # A refusal is given instead of processing the grant; only an earlier attempt of the
        # series may have spent the token.
        refused.possibly_spent = ambiguous
        raise refused
