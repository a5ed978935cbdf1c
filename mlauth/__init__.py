"""mlauth: MercadoLibre OAuth tokens that never stop a pipeline."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import (
    ConfigError,
    InvalidGrantError,
    LockLostError,
    LockTimeoutError,
    MLAuthError,
    RefreshError,
    StaleCommitError,
    StoreError,
    StoreMovedError,
    UnexpectedError,
    WrongSellerError,
)
from .events import Event, subscribe
from .integrations.legacy import keep_globals_current, redirect_refresh
from .integrations.patch import install, installed, uninstall
from .integrations.requests_auth import MLAuth
from .secret import Secret, fingerprint
from .sellers import Sellers
from .stores.base import TokenStore
from .stores.envfile import EnvFileStore
from .tokens import TokenSet

if TYPE_CHECKING:
    from .stores.redis import RedisStore

# The one place the version is written: the package metadata reads it at build time
# (pyproject.toml, [tool.setuptools.dynamic]) and `mlauth --version` prints it.
__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EnvFileStore",
    "Event",
    "InvalidGrantError",
    "LockLostError",
    "LockTimeoutError",
    "MLAuth",
    "MLAuthError",
    "RedisStore",
    "RefreshError",
    "Secret",
    "Sellers",
    "StaleCommitError",
    "StoreError",
    "StoreMovedError",
    "TokenSet",
    "TokenStore",
    "UnexpectedError",
    "WrongSellerError",
    "fingerprint",
    "install",
    "installed",
    "keep_globals_current",
    "reauthorization_required",
    "redirect_refresh",
    "subscribe",
    "uninstall",
]


def reauthorization_required(store: TokenStore) -> str | None:
    """Why the seller must authorize again (with the command to run), or None.

    True after an ``invalid_grant`` until the store holds another refresh token; takes no
    lock and changes nothing (:meth:`TokenStore.reauthorization_required`).
    """
    return store.reauthorization_required()


# A library must not configure logging; the NullHandler keeps "no handler" warnings away.
logging.getLogger("mlauth").addHandler(logging.NullHandler())


def __getattr__(name: str) -> object:
    # The Redis store is imported on first use: redis is an optional extra, and a missing
    # package must fail only for whoever asks for the store (ImportError naming the extra).
    if name == "RedisStore":
        from .stores.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'mlauth' has no attribute {name!r}")
