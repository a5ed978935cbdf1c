"""Where a ``.env``'s tokens went: the store a migration named, or one that refuses all use.

A migration (``mlauth migrate``) writes ``ML_TOKEN_STORE`` into the file and removes the token
keys, under the file's lock. A process already running on the file finds that in the values of
a read, once, and from then on its :class:`~mlauth.stores.envfile.EnvFileStore` forwards every
call to the store :func:`follow` returns; it never writes tokens into the file again.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from contextlib import AbstractContextManager

from mlauth.errors import ConfigError, StoreMovedError, masked
from mlauth.secret import Secret
from mlauth.tokens import TokenSet

from .base import RefreshTransaction, TokenStore
from .select import STORE_KEY, seller_store, sellers_store, shared_store

__all__ = ["Unfollowable", "follow"]

log = logging.getLogger("mlauth")


def follow(values: Mapping[str, str | None], path: str, secrets: list[Secret]) -> TokenStore:
    """The store the tokens of ``path`` moved to, as these values name it (logged once)."""
    try:
        with masked(secrets):  # logged and kept: quoted nowhere
            stores = sellers_store(values, path, wanted=False)
            if stores is not None:  # the seller of a one-seller .env, in a store of many
                target: TokenStore | None = seller_store(stores, None, path, values)
            else:
                target = shared_store(values, path)
    except ConfigError as exc:
        refusal = Unfollowable(
            f"{path}: the tokens moved out of this file ({STORE_KEY} is set) and this process "
            f"cannot follow them: {exc}. Fix that and restart it; it will not refresh into "
            "the file."
        )
        log.error("%s", refusal.message)
        return refusal
    assert target is not None, "follow() is asked only when the values name a store"
    log.warning("%s: tokens moved to %s; following them", path, target)
    return target


class Unfollowable(TokenStore):
    """Where tokens went that this process cannot reach: every use raises StoreMovedError."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.location = message

    def _refuse(self) -> StoreMovedError:
        # A new object each time: one exception raised in several threads would mix their
        # tracebacks.
        return StoreMovedError(self.message)

    def stamp(self) -> Hashable:
        raise self._refuse()

    def local_stamp(self) -> Hashable:
        raise self._refuse()

    def load(self) -> tuple[TokenSet, Hashable]:
        raise self._refuse()

    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        raise self._refuse()

    def check_writable(self) -> None:
        raise self._refuse()

    def lock(self, timeout: float) -> AbstractContextManager[None]:
        raise self._refuse()

    def transaction(self, *, login: bool = False) -> RefreshTransaction:
        raise self._refuse()

    def wait_unlocked(self, timeout: float) -> bool:
        raise self._refuse()

    def reauthorization_required(self) -> str | None:
        raise self._refuse()

    def clear_reauthorization(self) -> None:
        raise self._refuse()

    def refresh_in_progress(self) -> bool | None:
        raise self._refuse()

    def status_details(self) -> list[tuple[str, str]]:
        raise self._refuse()
