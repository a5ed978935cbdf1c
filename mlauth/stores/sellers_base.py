"""The contract of a store of many sellers: one token chain per seller who authorized the app.

An app that works for many sellers keeps one refresh chain per seller (MercadoLibre's
``user_id``). A :class:`SellerStores` holds them all; :meth:`SellerStores.store` hands out
the :class:`~mlauth.stores.base.TokenStore` of one seller, which the refresh engine uses as
it uses any store: single flight per seller, the genuine-401 rule, the raw answer kept before
it is read, fenced commits. Each seller's store has its own lock, so one seller's refresh
never waits for another's.

The stores themselves (:mod:`.sql`, :mod:`.redis_sellers`) import this module, and
:mod:`.sellers`, which picks one from a URL, imports them: so the contract lives apart from
the choice, and no import goes round in a circle.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

from mlauth.errors import ConfigError
from mlauth.tokens import USER_ID, TokenSet

from .base import TokenStore

__all__ = [
    "FAILING",
    "OK",
    "REAUTHORIZE",
    "SELLER_SCHEMES",
    "SellerRow",
    "SellerStores",
    "check_user_id",
]

#: The states ``mlauth sellers`` shows.
OK = "ok"
FAILING = "refresh failing"
REAUTHORIZE = "re-authorization required"

#: The ``ML_TOKEN_STORE`` schemes that name a store of many sellers (Redis serves both kinds).
SELLER_SCHEMES = ("sqlite", "postgresql", "postgres")


def check_user_id(user_id: object, where: str) -> str:
    """``user_id`` as mlauth keeps it (the digits of a positive integer); ConfigError if it
    cannot be one. An int is taken as well as its digits."""
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if isinstance(user_id, str) and USER_ID.match(user_id):
        return user_id
    shown = repr(user_id) if isinstance(user_id, (str, int)) else type(user_id).__name__
    if isinstance(user_id, str) and len(user_id) > 24:
        shown = f"a string of {len(user_id)} characters"
    raise ConfigError(
        f"{where}: {shown} is not a seller's user id; give the number MercadoLibre calls "
        "user_id (`mlauth sellers` lists them)"
    )


@dataclasses.dataclass(frozen=True)
class SellerRow:
    """One line of ``mlauth sellers``: never a token."""

    user_id: str
    expires_at: float | None
    refreshed_at: float | None
    refreshed_by: str | None
    #: :data:`OK`, :data:`FAILING` or :data:`REAUTHORIZE`
    state: str
    #: why, when the state is not OK (the error's words, with no token in them)
    detail: str | None = None


class SellerStores(abc.ABC):
    """Where the chains of many sellers live, each with its own lock."""

    #: Where the store is, for messages: a path, or a URL without credentials.
    location: str

    def bind_client(self, client_id: str) -> None:  # noqa: B027 (optional, no-op default)
        """Called once with the app's client id (a shared store may name its keys after it)."""

    @abc.abstractmethod
    def sellers(self) -> list[str]:
        """The user ids of the sellers held, sorted numerically."""

    @abc.abstractmethod
    def store(self, user_id: str) -> TokenStore:
        """The store of one seller's chain (made once, then the same object); ConfigError
        naming the sellers held if there is no such seller."""

    @abc.abstractmethod
    def add(self, user_id: str, tokens: TokenSet, *, replace: bool = False) -> TokenStore:
        """Start seller ``user_id``'s chain with ``tokens`` (from ``mlauth login``, ``sellers
        add`` or a migration) under that seller's lock; return its store.

        ConfigError if the seller is held already and ``replace`` is False. Tokens that name
        another seller (:func:`~mlauth.stores.base.check_seller`) are refused.
        """

    @abc.abstractmethod
    def remove(self, user_id: str, *, held: bool = False) -> bool:
        """Forget seller ``user_id``'s chain, under its lock; False if it was not held.

        ``held``: the caller holds that seller's lock already (``mlauth migrate`` moving the
        chain out, which must remove it in the same hold as it read it)."""

    @abc.abstractmethod
    def rows(self, user_ids: Sequence[str] | None = None) -> list[SellerRow]:
        """The ``mlauth sellers`` lines of these sellers (all if None), read in as few round
        trips as the store allows: never one per seller."""

    def close(self) -> None:  # noqa: B027 (optional, no-op default)
        """Let go of connections (a process that ends need not call it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
