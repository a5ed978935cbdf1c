"""The token store interface.

A store holds one token chain and the lock that serializes refreshes of it. The ``.env``
store (:mod:`mlauth.stores.envfile`) is the first, the Redis store (:mod:`mlauth.stores.redis`) the
second; the lock belongs to the store and not to the auth, because whoever can see the tokens
must be able to exclude the others from spending them.

Two optional parts of the contract serve stores whose lock can expire (Redis): ``save`` may
raise :class:`~mlauth.StaleCommitError` when the chain changed since the calling thread last
loaded it (MLAuth then loads and adopts the newer tokens), and a store may have a
``bind_client(client_id)`` method, which MLAuth calls once so the store can name its key.
For ``mlauth status`` a store may also offer ``refresh_in_progress() -> bool | None`` (is
the refresh lock held now?) and ``status_details() -> list[tuple[str, str]]`` (extra rows,
such as the Redis key and generation).
"""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from mlauth.tokens import TokenSet

__all__ = ["TokenStore"]


@runtime_checkable
class TokenStore(Protocol):
    """Where the tokens live between processes."""

    @property
    def location(self) -> str:
        """Where the store is, for messages: a path or a URL without credentials."""
        ...

    def stamp(self) -> Hashable:
        """A cheap identity of the stored version, without reading the tokens.

        Called before every request, so it must cost next to nothing; when it differs from
        the stamp :meth:`load` returned, somebody else wrote new tokens.
        """
        ...

    def load(self) -> tuple[TokenSet, Hashable]:
        """The stored tokens and the stamp of the version read (taken before the read)."""
        ...

    def check_writable(self) -> None:
        """Raise :class:`~mlauth.StoreError` unless :meth:`save` would succeed.

        Called before every attempt to spend a refresh token: a token spent whose successor
        cannot be saved is lost for good. A store whose lock expires renews it here and raises
        :class:`~mlauth.LockLostError` if it was lost.
        """
        ...

    def save(self, tokens: TokenSet) -> Hashable:
        """Persist the tokens atomically and durably; return the new stamp.

        A fenced store commits only over the version this thread last loaded and raises
        :class:`~mlauth.StaleCommitError` otherwise.
        """
        ...

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        """The lock that every process refreshing this chain takes first.

        Raises :class:`~mlauth.LockTimeoutError` when it cannot be had in ``timeout`` seconds.
        """
        ...
