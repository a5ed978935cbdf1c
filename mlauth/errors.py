"""The exceptions mlauth raises.

Every one derives from :class:`requests.RequestException`, so a pipeline's existing
``except requests.RequestException`` keeps catching them. None of them carries the token
call's ``response`` or ``request``: that request's body holds the client secret and the
refresh token, and whoever logs ``exc.request.body`` would leak both. They keep only what is
safe to print: the HTTP status, the provider's error code and its description.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

import requests

from .secret import Secret, mask

__all__ = [
    "AUTHORIZE",
    "REAUTHORIZE",
    "ConfigError",
    "InvalidGrantError",
    "LockLostError",
    "LockTimeoutError",
    "MLAuthError",
    "RefreshError",
    "StaleCommitError",
    "StoreError",
    "StoreMovedError",
    "UnexpectedError",
    "WrongSellerError",
    "as_client_error",
    "masked",
    "scrub",
    "sealed",
]


# The one fix for a dead refresh token, in every message that reports one.
REAUTHORIZE = (
    "Re-authorization required: run `mlauth login` (or authorize the app again and put the "
    "new ML_REFRESH_TOKEN in the .env)."
)
# The fix for no refresh token at all: most often a first setup, whose seller has never
# authorized the app, so nothing is "again" (a deleted line gets the same fix).
AUTHORIZE = (
    "Authorization required: run `mlauth login` to authorize the app and save its first "
    "tokens (or put a refresh token from an authorization in ML_REFRESH_TOKEN)."
)


class MLAuthError(requests.RequestException):
    """Base class of every mlauth error."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its fields, rebuilt without __init__: the constructors differ by class
        # (LockTimeoutError's lock_path is keyword-only, which the default pickling cannot
        # pass), and a pool's worker or a task queue hands errors to another process this way.
        return (rebuilt, (type(self), self.args, vars(self)))


def scrub(error: MLAuthError, secrets: Iterable[Secret | None]) -> None:
    """Mask ``secrets`` (and anything shaped like a token) in ``error``'s text, in place.

    For an error whose message or fields quote someone else's text: a server's error answer
    may echo the request body, an exception may quote a value it was handed.
    """
    known = list(secrets)
    error.args = tuple(mask(arg, known) if isinstance(arg, str) else arg for arg in error.args)
    for name, value in list(vars(error).items()):
        if isinstance(value, str):
            setattr(error, name, mask(value, known))


@contextlib.contextmanager
def masked(secrets: Iterable[Secret | None]) -> Iterator[None]:
    """An MLAuthError raised in the block leaves with ``secrets`` masked in its text.

    For code that checks values read beside secrets and quotes a value it refuses: a token
    or the client secret pasted under the wrong key of a ``.env`` must not be quoted back
    into a log or a terminal.
    """
    try:
        yield
    except MLAuthError as exc:
        scrub(exc, secrets)
        raise


_P = ParamSpec("_P")
_R = TypeVar("_R")


def sealed(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function``, whose errors leave without its frames and the frames below it, and
    without the exceptions they were raised while handling.

    For code that holds secrets in plain text in its locals: the text of a ``.env`` and the
    values read from it, a Redis hash, the values a save writes. Crash reporters (Sentry's
    Python SDK by default) send every frame's locals and every chained exception (and a
    UnicodeDecodeError carries the very bytes it could not decode). The frame that raises
    the error again holds only the arguments: seal functions whose arguments hold no secret
    in plain text. An error keeps its message, which for mlauth's own names the file, the
    key and the fix; what is lost is only where below the seal it was raised.
    """

    @functools.wraps(function)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (raised again, trimmed)
            exc.__cause__ = exc.__context__ = None
            raise exc.with_traceback(None)  # noqa: B904 (the same exception, not a new one)

    return run


def rebuilt(cls: type[MLAuthError], args: tuple[Any, ...], state: dict[str, Any]) -> MLAuthError:
    """An error of class ``cls`` with ``args`` and the attributes in ``state`` (unpickling)."""
    error = cls.__new__(cls)
    # OSError, under requests' errors, takes its args in __init__: they are set here.
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(MLAuthError, ValueError):
    """Configuration is missing or malformed: the message names the file, the key and the fix."""


class StoreError(MLAuthError, OSError):
    """The token store cannot be read or written (permissions, a read-only folder, a full disk)."""


class LockTimeoutError(MLAuthError, TimeoutError):
    """The cross-process refresh lock could not be had in time; no refresh was attempted."""

    def __init__(self, message: str, *, lock_path: str) -> None:
        super().__init__(message)
        self.lock_path = lock_path


class StaleCommitError(StoreError):
    """A peer committed newer tokens after this process read them; ours were not written.

    Raised by a fenced store (Redis) when a holder whose lock expired tries to commit: the
    newer tokens win, and the caller adopts them.
    """


class StoreMovedError(ConfigError):
    """The ``.env`` no longer holds the tokens: they moved to the store its ML_TOKEN_STORE names."""


class LockLostError(LockTimeoutError):
    """The refresh lock expired before the refresh token was spent; nothing was spent."""


class RefreshError(MLAuthError):
    """The token endpoint did not give us a new access token.

    ``status_code`` is the HTTP status (None when no answer arrived), ``error`` the provider's
    error code (``invalid_client``, ``local_rate_limited``, ...) and ``description`` its text.
    ``retry_after`` is how many seconds the server asked us to wait, when it said so.
    ``possibly_spent`` says why the refresh token may have been spent all the same (a request
    that may have reached the server without its answer arriving: a timeout after sending, a
    reset, a 5xx, an unusable 200), or is None when the server cannot have rotated it (nothing
    was sent, or it refused the grant outright). The token endpoint code sets it: it is the
    only code that knows how far each attempt got. A possibly spent token is tried once more,
    never in a retry series.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error: str | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error
        self.description = description
        self.retry_after: float | None = None
        self.possibly_spent: str | None = None


class UnexpectedError(MLAuthError):
    """Something the auth relies on failed in a way mlauth does not handle (a bug, here or in
    a dependency or a custom store).

    Raised in place of that exception, which is kept as ``__cause__``, so that a request
    fails with a :class:`requests.RequestException` the caller's ``except`` clauses expect.
    The message names the original; token values in it are replaced by fingerprints.
    """


class InvalidGrantError(RefreshError):
    """The refresh token is dead (used, expired or revoked): the seller must authorize again."""


class WrongSellerError(RefreshError):
    """The token endpoint answered for another seller than the one whose chain was refreshed
    (a refresh token filed under the wrong seller): the answer was not saved to that chain.

    ``expected`` and ``found`` are the two user ids. The raw answer stays where the store
    keeps answers (its journal or answer field), so the other seller's new tokens are not lost.
    """

    def __init__(self, message: str, *, expected: str = "", found: str = "", **fields: Any) -> None:
        super().__init__(message, **fields)
        self.expected = expected
        self.found = found


# -- errors that are also an HTTP client's -------------------------------------------------
# Raised while a request is being sent, an mlauth error is one of the HTTP client's errors as
# much as ours: httpx's code catches httpx.HTTPError. Its class is made here, at run time,
# from the client's error class handed in, so this module imports no HTTP client.

_flavours: dict[tuple[type[MLAuthError], type[Exception]], type[MLAuthError]] = {}
# Per made class: the instance keys the client's fields were stored under (httpx keeps
# ``.request`` as ``_request``), which a pickle or a copy to another process leaves out.
_client_keys: dict[type[MLAuthError], frozenset[str]] = {}


def _reduce_to_plain(error: MLAuthError) -> tuple[Any, ...]:
    """Pickle a made error as the plain mlauth error, without the client's fields.

    Its class is made at run time, so pickle could not find it by name; and httpx's request
    carries the ``Authorization`` header, which must not travel to a pool's parent or a broker.
    """
    plain = type(error).__mro__[1]
    dropped = _client_keys.get(type(error), frozenset())
    state = {key: value for key, value in vars(error).items() if key not in dropped}
    return (rebuilt, (plain, error.args, state))


def _copy(error: MLAuthError, memo: object = None) -> MLAuthError:
    """copy.copy and copy.deepcopy keep the made class and the client's fields, which the
    pickling rule above drops."""
    return rebuilt(type(error), error.args, vars(error))


def _flavoured(cls: type[MLAuthError], base: type[Exception]) -> type[MLAuthError]:
    """``cls`` that is also a ``base``, named and shown as ``cls``."""
    made = _flavours.get((cls, base))
    if made is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__reduce__": _reduce_to_plain,
            "__copy__": _copy,
            "__deepcopy__": _copy,
        }
        made = type(cls.__name__, (cls, base), namespace)
        _flavours[(cls, base)] = made  # one class per pair; a race makes two, no harm
    return made


def as_client_error(exc: MLAuthError, base: type[Exception], **fields: object) -> MLAuthError:
    """The same error, also catchable as ``base`` (an HTTP client's error class), with the
    client's ``fields`` set (httpx's ``request``: the API request that failed, never the
    token POST). Raise it ``from exc.__cause__``: an :class:`UnexpectedError` keeps its
    original there. Pickled, it is the plain error without those fields.
    """
    cls = _flavoured(type(exc), base)
    # Not cls(...): each error class has its own constructor. OSError (the base of requests'
    # errors) takes its args in __init__ when a subclass has one, so they are set here.
    converted = cls.__new__(cls)
    converted.args = exc.args
    converted.__dict__.update(exc.__dict__)
    before = set(vars(converted))
    for name, value in fields.items():
        setattr(converted, name, value)
    _client_keys[cls] = _client_keys.get(cls, frozenset()) | (set(vars(converted)) - before)
    return converted.with_traceback(exc.__traceback__)
