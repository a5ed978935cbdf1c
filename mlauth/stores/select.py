"""The one place a store is chosen from configuration: what ``ML_TOKEN_STORE`` names.

At start (:func:`mlauth.stores.store_from_env`) and at run time, when a migration writes
``ML_TOKEN_STORE`` into a ``.env`` that running processes use (the ``.env`` store follows it),
the same function decides, so both always agree.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlauth.errors import ConfigError, StoreError
from mlauth.secret import redact_url, url_scheme
from mlauth.tokens import seller_of

from .base import TokenStore
from .sellers import (
    SELLER_SCHEMES,
    SellerStores,
    check_user_id,
    lock_timeout,
    sellers_from_url,
)

__all__ = ["SELLER_KEY", "STORE_KEY", "one_seller", "seller_store", "sellers_store", "shared_store"]

# Set when the tokens moved out of the file (``mlauth migrate``): it names the shared store.
STORE_KEY = "ML_TOKEN_STORE"
# In a .env that names a store of many sellers: the seller its scripts act for when they name
# none (a migration of a one-seller .env writes it, so they go on without a flag).
SELLER_KEY = "ML_TOKEN_SELLER"


def _client_id(values: Mapping[str, str | None], where: str) -> str:
    value = (values.get("ML_CLIENT_ID") or "").strip()
    if not value:
        raise ConfigError(f"{where}: ML_CLIENT_ID is missing or empty; copy it from your app")
    return value


def shared_store(values: Mapping[str, str | None], where: str) -> TokenStore | None:
    """The store ``ML_TOKEN_STORE`` names in these ``.env`` values, or None if it names none."""
    url = (values.get(STORE_KEY) or "").strip()
    if not url:
        return None
    scheme = url_scheme(url)
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{where}: {STORE_KEY}={redact_url(url)!r} is not a store mlauth "
            "knows; write redis://HOST:PORT/DB (or rediss:// for TLS), sqlite:///sellers.db "
            "or postgresql://USER@HOST/DB (many sellers), or delete the line to keep the "
            "tokens in this file"
        )
    try:
        from .redis import RedisStore  # an optional extra: imported only when named
    except ImportError as exc:
        raise ConfigError(f"{where}: {STORE_KEY} names Redis, but {exc}") from None
    return RedisStore(
        url,
        key=(values.get("ML_TOKEN_KEY") or "").strip() or None,
        client_id=_client_id(values, where),
        lock_timeout=lock_timeout(values, where),
    )


def sellers_store(
    values: Mapping[str, str | None], where: str, *, wanted: bool
) -> SellerStores | None:
    """The store of many sellers ``ML_TOKEN_STORE`` names in these ``.env`` values, bound
    to the app's client id; None when it names none (or a one-seller store).

    SQLite and PostgreSQL always hold many sellers. Redis holds either kind: many when a
    seller is asked for (``wanted``), when the ``.env`` names its seller
    (``ML_TOKEN_SELLER``), or when the one-seller hash is empty and sellers are listed.
    """
    url = (values.get(STORE_KEY) or "").strip()
    if not url:
        return None
    scheme = url_scheme(url)
    wanted = wanted or bool((values.get(SELLER_KEY) or "").strip())
    if scheme in ("redis", "rediss", "unix"):
        stores = _redis_sellers(url, values, where, wanted=wanted)
        if stores is None:
            return None
    elif scheme in SELLER_SCHEMES:
        stores = None
    else:
        return None
    if (values.get("ML_REFRESH_TOKEN") or "").strip():
        raise ConfigError(
            f"{where} holds ML_REFRESH_TOKEN and names a store of many sellers in "
            f"{STORE_KEY}; move this file's seller there with `mlauth migrate`, or delete "
            f"the {STORE_KEY} line to keep using this file alone"
        )
    if stores is None:
        stores = sellers_from_url(url, values, where)
    stores.bind_client(_client_id(values, where))
    return stores


def _redis_sellers(
    url: str, values: Mapping[str, str | None], where: str, *, wanted: bool
) -> SellerStores | None:
    """The Redis at ``url`` as a store of many sellers, if it is one (see above)."""
    try:
        from .redis import RedisStore  # noqa: F401 (an optional extra: is it there?)
        from .redis_sellers import RedisSellers, redis_sellers_held
    except ImportError:
        return None  # shared_store says what is missing
    client_id = _client_id(values, where)
    key = (values.get("ML_TOKEN_KEY") or "").strip() or None
    if not wanted:
        try:
            if not redis_sellers_held(url, client_id, key=key):
                return None
        except StoreError:
            # Down at start: a one-seller store is what it always was, and reports that
            # itself (a pipeline with a valid token may still finish before it is needed).
            return None
    return RedisSellers(url, client_id=client_id, lock_timeout=lock_timeout(values, where))


_SHOWN = 10  # sellers named in a message; the rest are counted


def _named(held: list[str]) -> str:
    shown = ", ".join(held[:_SHOWN])
    return shown if len(held) <= _SHOWN else f"{shown} and {len(held) - _SHOWN} more"


def seller_store(
    stores: SellerStores,
    seller: str | int | None,
    where: str,
    values: Mapping[str, str | None] | None = None,
) -> TokenStore:
    """Seller ``seller``'s store in ``stores``; without one, the ``.env``'s
    ``ML_TOKEN_SELLER`` (in ``values``), else the only seller held."""
    default = ((values or {}).get(SELLER_KEY) or "").strip()
    if seller is None and default:
        return stores.store(check_user_id(default, f"{where}: {SELLER_KEY}"))
    if seller is not None:
        return stores.store(check_user_id(seller, where))
    held = stores.sellers()
    if len(held) == 1:
        return stores.store(held[0])
    if not held:
        raise ConfigError(
            f"{where}: {stores.location} holds no seller yet; add one with `mlauth login` "
            "or `mlauth sellers add` (a refresh token on stdin)"
        )
    raise ConfigError(
        f"{where}: {stores.location} holds {len(held)} sellers ({_named(held)}); say which: "
        "MLAuth.from_env(path, seller=USER_ID), mlauth.Sellers.from_env(path) to route by "
        "seller, or --seller USER_ID on the command line"
    )


def one_seller(store: TokenStore, seller: str, where: str) -> None:
    """A one-seller store asked for ``seller``: fine if its tokens are that seller's (or
    name none); ConfigError if they are another's."""
    try:
        tokens, _ = store.load()
    except ConfigError:
        return  # no tokens yet: the first refresh says so
    held = seller_of(tokens)
    if held is not None and held != seller:
        raise ConfigError(
            f"{where} holds seller {held}'s tokens, not seller {seller}'s; use that seller's "
            "own .env, or a store of many sellers (ML_TOKEN_STORE=sqlite:///sellers.db)"
        )
