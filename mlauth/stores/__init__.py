"""Where the tokens live between processes: the store contract and its two stores.

:mod:`.base` holds the contract, :mod:`.envfile` the ``.env`` store, made of parts chosen
once per file in :mod:`.parts`: a writer (:mod:`.replace`, or :mod:`.inplace` for a file
mounted alone), a lock (:mod:`.lock`, or :mod:`.ofd` on the inode) and a journal
(:mod:`.journal`, or :mod:`.xattr_journal` in the inode's attributes); :mod:`.moved` is where
tokens a migration moved are followed, :mod:`.redis` the Redis store, and :mod:`.select` the
one place a store is chosen.
"""

from __future__ import annotations

import os

from mlauth.errors import masked, sealed

from .base import RefreshTransaction, TokenStore
from .envfile import EnvFileStore, read_env_file, secrets_of
from .select import shared_store

__all__ = ["EnvFileStore", "RefreshTransaction", "TokenStore", "store_from_env"]


@sealed  # the .env's values are an argument below
def store_from_env(path: str | os.PathLike[str]) -> TokenStore:
    """The token store a ``.env`` selects: the one ``ML_TOKEN_STORE`` names, else the file.

    :meth:`MLAuth.from_env`, :func:`mlauth.install` (so ``mlauth run``) and every CLI command
    go through it; a running ``.env`` store follows a migration through the same
    :func:`~mlauth.stores.select.shared_store`.
    """
    where = os.fspath(path)
    values = read_env_file(where)
    with masked(secrets_of(values)):  # a token pasted under another key is not quoted
        return shared_store(values, where) or EnvFileStore(where)
