"""Moving token chains into a store of many sellers: a one-seller ``.env``'s chain, or every
seller of another store of many sellers, under the locks of both sides.

The order is what keeps each chain, as for the move to Redis (:mod:`.migrate`): a chain is
written to the new store first and removed from the old one second, both while its lock is
held on each side, so no process can spend its refresh token in between, and a failure
leaves every chain in at least one of the two stores. The ``.env`` names the new store
(``ML_TOKEN_STORE``) last, once every chain is there; running the migration again after a
failure finishes it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from mlauth.errors import AUTHORIZE, ConfigError, masked, sealed
from mlauth.secret import redact_url, url_scheme
from mlauth.stores.envfile import TOKEN_KEYS, EnvFileStore, read_env_file, secrets_of
from mlauth.stores.select import SELLER_KEY, STORE_KEY, sellers_store
from mlauth.stores.sellers import SellerStores, sellers_from_url
from mlauth.stores.sellers import lock_timeout as env_lock_timeout
from mlauth.tokens import TokenSet, seller_of

from .migrate import ChainConflictError, _settled_tokens

__all__ = ["SellersMigration", "migrate_between_sellers", "migrate_env_to_sellers"]


@dataclasses.dataclass(frozen=True)
class SellersMigration:
    """What a migration into a store of many sellers moved (never a token)."""

    env_path: str
    location: str
    #: The user ids moved, and those the new store held already with the same chain.
    moved: list[str]
    already: list[str]

    def __str__(self) -> str:
        moved = ", ".join(self.moved) or "none"
        said = f"moved seller(s) {moved} to {self.location}"
        if self.already:
            said += f" ({', '.join(self.already)} were there already)"
        return f"{said}; {self.env_path} now says {STORE_KEY}: copy it to every machine"


def _client_id(values: Mapping[str, str | None], path: str) -> str:
    client_id = (values.get("ML_CLIENT_ID") or "").strip()
    if not client_id:
        raise ConfigError(f"{path}: ML_CLIENT_ID is missing or empty; copy it from your app")
    return client_id


def _target(url: str, values: Mapping[str, str | None], path: str) -> SellerStores:
    """The store of many sellers at ``url``, with the ``.env``'s options, bound to its app."""
    client_id = _client_id(values, path)
    with masked(secrets_of(values)):  # a token pasted under another key is not quoted
        if url_scheme(url) in ("redis", "rediss", "unix"):
            try:
                from mlauth.stores.redis_sellers import RedisSellers
            except ImportError as exc:  # names the extra: pip install 'mlauth[redis]'
                raise ConfigError(f"migrate: {exc}") from None
            target: SellerStores = RedisSellers(
                url, client_id=client_id, lock_timeout=env_lock_timeout(values, path)
            )
        else:
            target = sellers_from_url(url, values, path)
    target.bind_client(client_id)
    return target


def _seller_of_env(tokens: TokenSet, seller: str | None, path: str) -> str:
    """The seller whose chain the ``.env`` holds: what its tokens say, checked against
    ``seller`` (``--seller``), which is needed only if they say nothing."""
    found = seller_of(tokens)
    if found is not None and seller is not None and found != seller:
        raise ConfigError(
            f"{path}: its tokens are seller {found}'s, not seller {seller}'s; nothing was "
            f"changed. Migrate with --seller {found}, or without --seller"
        )
    if found is None and seller is None:
        raise ConfigError(
            f"{path}: its tokens do not say whose they are; migrate with --seller ID (the "
            "seller's user id, the `id` of GET /users/me with its access token)"
        )
    return found or seller  # type: ignore[return-value]


@sealed  # the .env's values and the tokens are locals here and below
def migrate_env_to_sellers(
    env_path: str | os.PathLike[str],
    url: str,
    *,
    seller: str | None = None,
    force: bool = False,
    lock_timeout: float = 120.0,
) -> SellersMigration:
    """Move the chain of ``env_path`` into the store of many sellers at ``url`` as its
    seller's, and point the file there.

    Refuses (:class:`ChainConflictError`) to replace a different chain of that seller
    already in the store unless ``force``. Under the ``.env``'s lock, and the seller's lock
    in the store while it is written there.
    """
    path = os.path.abspath(os.fspath(env_path))
    values = read_env_file(path)
    current = (values.get(STORE_KEY) or "").strip()
    if current:
        raise ConfigError(
            f"{path} already keeps its tokens in {redact_url(current)} ({STORE_KEY}); there is "
            "nothing left in the file to move"
        )
    target = _target(url, values, path)
    source = EnvFileStore(path)
    try:
        with source.file_lock(lock_timeout):
            values = read_env_file(path)  # under the lock: what no process can change any more
            if (values.get(STORE_KEY) or "").strip():
                raise ConfigError(f"{path} was migrated by another process meanwhile")
            tokens = _settled_tokens(source, values, path)
            if tokens.refresh_token is None:
                raise ConfigError(
                    f"{path}: ML_REFRESH_TOKEN is missing; nothing to move. {AUTHORIZE}"
                )
            user_id = _seller_of_env(tokens, seller, path)
            same = _put(target, user_id, tokens, force=force)
            # The seller goes in too: the file's scripts go on acting for them, with no flag.
            source.update_file({**dict.fromkeys(TOKEN_KEYS), STORE_KEY: url, SELLER_KEY: user_id})
    finally:
        target.close()
    moved, already = ([], [user_id]) if same else ([user_id], [])
    return SellersMigration(path, redact_url(target.location), moved, already)


def _put(target: SellerStores, user_id: str, tokens: TokenSet, *, force: bool) -> bool:
    """Write ``user_id``'s chain into ``target`` under that seller's lock there; True if it
    held that very chain already (nothing written)."""
    held = user_id in target.sellers()
    existing = target.store(user_id).load()[0] if held else None
    same = existing is not None and existing.refresh_token == tokens.refresh_token
    if same:
        return True
    if held and not force:
        fingerprint = (
            existing.refresh_token.fingerprint
            if existing is not None and existing.refresh_token
            else "-"
        )
        raise ChainConflictError(
            f"{target.location} already holds another chain of seller {user_id} (refresh "
            f"{fingerprint}, last refreshed by "
            f"{(existing.refreshed_by if existing else None) or 'unknown'}); nothing was "
            "changed. If that chain is dead or older, migrate with --force to replace it"
        )
    target.add(user_id, tokens, replace=held)
    return False


@sealed  # the chains are locals here and below
def migrate_between_sellers(
    env_path: str | os.PathLike[str],
    url: str,
    *,
    force: bool = False,
    lock_timeout: float = 120.0,
) -> SellersMigration:
    """Move every seller of the store of many sellers ``env_path`` names into the one at
    ``url``, then point the file there.

    Each seller is moved under its lock in the old store (held from the read to the removal,
    so no process refreshes it meanwhile) and its lock in the new one (while it is written).
    A seller the new store holds with another chain is refused before anything moves,
    unless ``force``. Interrupted, it leaves each chain in one store or both; run again, it
    moves what is left (a seller found in both with the same chain is only removed from the
    old one).
    """
    path = os.path.abspath(os.fspath(env_path))
    values = read_env_file(path)
    with masked(secrets_of(values)):
        source = sellers_store(values, path, wanted=True)
    if source is None:
        raise ConfigError(f"{path} names no store of many sellers to move sellers from")
    try:
        target = _target(url, values, path)
    except BaseException:
        source.close()
        raise
    del values
    try:
        users = source.sellers()
        _refuse_conflicts(source, target, users, force=force)
        moved, already = [], []
        for user_id in users:
            if _move(source, target, user_id, lock_timeout=lock_timeout):
                already.append(user_id)
            else:
                moved.append(user_id)
        EnvFileStore(path).update_file({STORE_KEY: url})
    finally:
        source.close()
        target.close()
    return SellersMigration(path, redact_url(target.location), moved, already)


def _refuse_conflicts(
    source: SellerStores, target: SellerStores, users: list[str], *, force: bool
) -> None:
    """ChainConflictError naming the sellers ``target`` holds with another chain, before
    anything is moved (unless ``force``)."""
    if force:
        return
    there = set(target.sellers())
    conflicts = []
    for user_id in users:
        if user_id in there:
            ours = source.store(user_id).load()[0].refresh_token
            if target.store(user_id).load()[0].refresh_token != ours:
                conflicts.append(user_id)
    if conflicts:
        raise ChainConflictError(
            f"{target.location} already holds another chain of seller(s) "
            f"{', '.join(conflicts)}; nothing was moved. If those chains are dead or older "
            "(an earlier migration that was interrupted leaves the old store's chain the "
            "live one), migrate with --force to replace them"
        )


def _move(source: SellerStores, target: SellerStores, user_id: str, *, lock_timeout: float) -> bool:
    """Move one seller under its lock in ``source``; True if ``target`` held that very
    chain already."""
    store = source.store(user_id)
    with store.lock(lock_timeout):
        txn = store.transaction()  # finishes what a refresher that died left
        if txn.possibly_spent is not None:
            raise ConfigError(
                f"seller {user_id} was not moved: {txn.possibly_spent}. Run `mlauth refresh "
                f"--seller {user_id}` first so the refresh is settled, then migrate again; "
                "the sellers moved before it are in the new store"
            )
        tokens = txn.tokens
        if tokens.refresh_token is None:
            raise ConfigError(f"seller {user_id} holds no refresh token in {source.location}")
        # The lock must still be ours on both sides of the copy: a lock that lapsed while
        # the new store was slow to answer may have let a refresher rotate the chain here,
        # and removing it then would delete the live link (LockLostError: nothing removed).
        store.check_writable()  # renews a lease, or raises if it was lost
        same = _put(target, user_id, tokens, force=True)  # conflicts were refused before
        store.check_writable()
        source.remove(user_id, held=True)  # in the same hold: nobody refreshed in between
    return same
