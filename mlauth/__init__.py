"""mlauth: MercadoLibre OAuth tokens that never stop a pipeline."""

from __future__ import annotations

import logging

from .auth import MLAuth
from .envfile import EnvFileStore
from .errors import (
    ConfigError,
    InvalidGrantError,
    LockTimeoutError,
    MLAuthError,
    RefreshError,
    StoreError,
)
from .journal import reauthorization_required
from .legacy import keep_globals_current, redirect_refresh
from .patch import install, installed, uninstall
from .secret import Secret, fingerprint
from .store import TokenStore
from .token import TokenSet

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EnvFileStore",
    "InvalidGrantError",
    "LockTimeoutError",
    "MLAuth",
    "MLAuthError",
    "RefreshError",
    "Secret",
    "StoreError",
    "TokenSet",
    "TokenStore",
    "fingerprint",
    "install",
    "installed",
    "keep_globals_current",
    "reauthorization_required",
    "redirect_refresh",
    "uninstall",
]

# A library must not configure logging; the NullHandler keeps "no handler" warnings away.
logging.getLogger("mlauth").addHandler(logging.NullHandler())
