"""Stores of many sellers: one token chain per seller who authorized the app.

An app that works for many sellers keeps one refresh chain per seller (MercadoLibre's
``user_id``). A :class:`SellerStores` holds them all; :meth:`SellerStores.store` hands out
the :class:`~mlauth.stores.base.TokenStore` of one seller, which the refresh engine uses as
it uses any store: single flight per seller, the genuine-401 rule, the raw answer kept before
it is read, fenced commits. Each seller's store has its own lock, so one seller's refresh
never waits for another's.

Three ship, chosen by ``ML_TOKEN_STORE`` (:func:`sellers_from_url`): SQLite
(``sqlite:///sellers.db``) and PostgreSQL (``postgresql://...``) in :mod:`.sql`, and Redis, a
hash per seller, in :mod:`.redis_sellers`. A store loads only the sellers it is asked for:
an app of 10,000 sellers whose worker touches 10 holds 10 chains. The contract itself is in
:mod:`.sellers_base`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mlauth.errors import ConfigError
from mlauth.secret import redact_url, url_scheme

from .sellers_base import (
    FAILING,
    OK,
    REAUTHORIZE,
    SELLER_SCHEMES,
    SellerRow,
    SellerStores,
    check_user_id,
)

__all__ = [
    "FAILING",
    "OK",
    "REAUTHORIZE",
    "SELLER_SCHEMES",
    "SellerRow",
    "SellerStores",
    "check_user_id",
    "lock_timeout",
    "sellers_from_url",
    "sqlite_path",
]

_SQLITE_FORMS = (
    "write sqlite:///sellers.db for a file beside the .env (a path relative to its folder) "
    "or sqlite:////srv/app/sellers.db (four slashes) for an absolute path"
)


def sqlite_path(url: str, folder: str, where: str) -> str:
    """The database file a ``sqlite:`` URL names: ``sqlite:///NAME`` is relative to
    ``folder`` (the ``.env``'s), ``sqlite:////PATH`` absolute. ConfigError, with both forms,
    for anything else: a host, no path, ``:memory:`` (one process's alone), a query or a
    fragment (no options are read: better refused than silently ignored)."""
    prefix = url[: len("sqlite:///")]
    rest = url[len("sqlite:///") :]
    problem = None
    if prefix.lower() != "sqlite:///":
        problem = "it does not start with sqlite:/// (a host, or too few slashes)"
    elif not rest.strip("/") or rest.endswith("/"):
        problem = "it names no file"
    elif rest == ":memory:" or rest.startswith("file:"):
        problem = "an in-memory database is one process's alone"
    elif any(char in rest for char in "?#\0"):
        problem = "it has a query, a fragment or a NUL (no options are read from it)"
    if problem is not None:
        raise ConfigError(
            f"{where}: ML_TOKEN_STORE={redact_url(url)!r}: {problem}; {_SQLITE_FORMS}"
        )
    return os.path.join(folder, rest)  # an absolute rest ('/srv/...') ignores the folder


def lock_timeout(values: Mapping[str, str | None], where: str) -> float:
    raw = (values.get("ML_TOKEN_LOCK_TIMEOUT") or "").strip()
    try:
        timeout = float(raw) if raw else 30.0
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout < float("inf"):
        raise ConfigError(
            f"{where}: ML_TOKEN_LOCK_TIMEOUT={raw!r} is not a number of seconds above 0"
        )
    return timeout


def sellers_from_url(url: str, values: Mapping[str, str | None], where: str) -> SellerStores:
    """The store of many sellers ``url`` (an ``ML_TOKEN_STORE`` value) names, with the
    options of the ``.env`` values ``values``; ``where`` is that ``.env``'s path: a relative
    SQLite path is taken from its folder. Not bound to a client id yet
    (:meth:`SellerStores.bind_client`)."""
    scheme = url_scheme(url)
    timeout = lock_timeout(values, where)
    if scheme == "sqlite":
        from .sql import SqlSellers

        folder = os.path.dirname(os.path.abspath(where))
        return SqlSellers.sqlite(sqlite_path(url, folder, where), lock_timeout=timeout)
    if scheme in ("postgresql", "postgres"):
        from .sql import SqlSellers

        return SqlSellers.postgresql(url, lock_timeout=timeout)
    raise ConfigError(
        f"{where}: ML_TOKEN_STORE={redact_url(url)!r} names no store of many sellers; write "
        "sqlite:///sellers.db or postgresql://USER@HOST/DB"
    )
