"""Where the tokens live between processes: the store contract and its two stores.

:mod:`.base` holds the contract, :mod:`.envfile` the ``.env`` store, made of parts chosen
once per file in :mod:`.parts`: a writer (:mod:`.replace`, or :mod:`.inplace` for a file
mounted alone), a lock (:mod:`.lock`, or :mod:`.ofd` on the inode) and a journal
(:mod:`.journal`, or :mod:`.xattr_journal` in the inode's attributes); :mod:`.moved` is where
tokens a migration moved are followed, :mod:`.redis` the Redis store, :mod:`.sellers` the
stores of many sellers (:mod:`.sql`, :mod:`.redis_sellers`), and :mod:`.select` the one place
a store is chosen.
"""

from __future__ import annotations

import os

from mlauth.errors import ConfigError, masked, sealed

from .base import RefreshTransaction, TokenStore
from .envfile import EnvFileStore, read_env_file, secrets_of
from .select import one_seller, seller_store, sellers_store, shared_store
from .sellers import SellerStores, check_user_id

__all__ = [
    "EnvFileStore",
    "RefreshTransaction",
    "SellerStores",
    "TokenStore",
    "sellers_from_env",
    "store_from_env",
]


@sealed  # the .env's values are an argument below
def store_from_env(path: str | os.PathLike[str], *, seller: str | int | None = None) -> TokenStore:
    """The token store a ``.env`` selects: the one ``ML_TOKEN_STORE`` names, else the file.

    With a store of many sellers (:mod:`.sellers`), the store of seller ``seller`` (a user
    id); without it, the ``.env``'s ``ML_TOKEN_SELLER``, else the only seller held, and a
    ConfigError naming them when there are several. With a one-seller store, ``seller``
    must be the seller whose tokens it holds.

    :meth:`MLAuth.from_env`, :func:`mlauth.install` (so ``mlauth run``) and every CLI command
    go through it; a running ``.env`` store follows a migration through the same
    :func:`~mlauth.stores.select.shared_store`.
    """
    where = os.fspath(path)
    values = read_env_file(where)
    with masked(secrets_of(values)):  # a token pasted under another key is not quoted
        stores = sellers_store(values, where, wanted=seller is not None)
        if stores is not None:
            return seller_store(stores, seller, where, values)
        store = shared_store(values, where) or EnvFileStore(where)
        if seller is not None:
            one_seller(store, check_user_id(seller, where), where)
        return store


@sealed
def sellers_from_env(path: str | os.PathLike[str]) -> SellerStores:
    """The store of many sellers a ``.env``'s ``ML_TOKEN_STORE`` names; ConfigError (with
    the fix) when it names none."""
    where = os.fspath(path)
    values = read_env_file(where)
    with masked(secrets_of(values)):
        stores = sellers_store(values, where, wanted=True)
    if stores is None:
        raise ConfigError(
            f"{where} names no store of many sellers; set ML_TOKEN_STORE=sqlite:///sellers.db "
            "(or postgresql://... or redis://...) and add sellers with `mlauth login` or "
            "`mlauth sellers add`, or move this file's seller there with `mlauth migrate`"
        )
    return stores
