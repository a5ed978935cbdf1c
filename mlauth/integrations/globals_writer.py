"""Token globals of a legacy module, written whenever the token changes.

Kept apart from :mod:`mlauth.integrations.legacy` so that both the public helpers and the
automatic redirect (:mod:`mlauth.integrations.redirect`) reach the writers of an auth.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from mlauth.secret import Secret
from mlauth.stores.lock import fork_bound
from mlauth.tokens import TokenSet

if TYPE_CHECKING:
    from .adapter import AuthAdapter

__all__ = ["GlobalsWriter", "register", "write_module_globals", "writers_of"]

TOKEN_NAME = "ML_ACCESS_TOKEN"  # noqa: S105 (a variable name)
HEADERS_NAME = "HEADERS"


class GlobalsWriter:
    """Writes the current access token into a namespace whenever it changes."""

    def __init__(
        self, namespace: MutableMapping[str, Any], token_name: str, headers_name: str
    ) -> None:
        self.namespace = namespace
        self.token_name = token_name
        self.headers_name = headers_name
        self._written: Secret | None = None
        self._lock = threading.Lock()
        fork_bound.add(self)

    def _after_fork_in_child(self) -> None:
        # A thread of the parent may have been writing the globals at the fork.
        self._lock = threading.Lock()

    def __call__(self, auth: AuthAdapter) -> None:
        self.write(auth.tokens)

    def write(self, tokens: TokenSet) -> None:
        token = tokens.access_token
        if token is None or token == self._written:
            return
        with self._lock:
            self.namespace[self.token_name] = token.reveal()
            headers = self.namespace.get(self.headers_name)
            # In place: other modules may hold a reference to the same dict.
            if isinstance(headers, MutableMapping):
                headers["Authorization"] = f"Bearer {token.reveal()}"
            self._written = token


# The writers of each auth, so a redirected refresh can update them too.
_writers: weakref.WeakKeyDictionary[AuthAdapter, list[GlobalsWriter]] = weakref.WeakKeyDictionary()


def register(auth: AuthAdapter, writer: GlobalsWriter) -> None:
    _writers.setdefault(auth, []).append(writer)


def writers_of(auth: AuthAdapter) -> list[GlobalsWriter]:
    return list(_writers.get(auth, ()))


def write_module_globals(namespace: MutableMapping[str, Any], tokens: TokenSet) -> None:
    """What a legacy refresh function leaves behind, for the globals the module really has:
    ``ML_ACCESS_TOKEN`` if it is defined, and the ``Authorization`` entry of ``HEADERS`` if
    that dict has one (updated in place). Nothing is added that the module did not have."""
    token = tokens.access_token
    if token is None:
        return
    if TOKEN_NAME in namespace:
        namespace[TOKEN_NAME] = token.reveal()
    headers = namespace.get(HEADERS_NAME)
    if isinstance(headers, MutableMapping):
        for key in list(headers):
            if isinstance(key, str) and key.lower() == "authorization":
                headers[key] = f"Bearer {token.reveal()}"
