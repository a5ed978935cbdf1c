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
    "reauthorization_required",
]

# A library must not configure logging; the NullHandler keeps "no handler" warnings away.
logging.getLogger("mlauth").addHandler(logging.NullHandler())
