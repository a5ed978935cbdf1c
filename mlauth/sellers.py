"""Many sellers, one app: an auth per seller, from one store of many sellers.

``Sellers.from_env(".env")`` reads the app's credentials from the ``.env`` and the sellers'
chains from the store its ``ML_TOKEN_STORE`` names (SQLite, PostgreSQL or Redis). An app that
routes by seller asks ``sellers.auth(user_id)`` (requests) or ``sellers.httpx_auth(user_id)``
per call: each auth is built once and cached, and is the same engine as a one-seller
``MLAuth`` (single flight per seller across threads, processes and machines). Nothing is
loaded for a seller nobody asks for.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

from mlauth.config import DEFAULT_TOKEN_URL, env_settings
from mlauth.endpoint import TokenEndpoint
from mlauth.errors import ConfigError, InvalidGrantError, RefreshError, sealed
from mlauth.integrations.adapter import AuthAdapter
from mlauth.integrations.requests_auth import MLAuth
from mlauth.secret import Secret
from mlauth.stores import sellers_from_env
from mlauth.stores.sellers import SellerRow, SellerStores, check_user_id
from mlauth.tokens import TokenSet, seller_of, this_process, token_problem

if TYPE_CHECKING:
    from mlauth.integrations.httpx_auth import HttpxAuth

__all__ = ["Sellers"]


class Sellers:
    """The sellers an app works for, each with its own token chain in ``stores``.

    ``settings`` are :class:`~mlauth.MLAuth`'s keyword arguments (``client_id``,
    ``client_secret``, ``token_url``, ...), given to every seller's auth.
    """

    def __init__(self, stores: SellerStores, **settings: Any) -> None:
        secret = settings.get("client_secret")
        if isinstance(secret, str):
            settings["client_secret"] = Secret(secret)
        del secret
        if not settings.get("client_id") or not settings.get("client_secret"):
            raise ConfigError("Sellers needs client_id and client_secret (or use from_env)")
        self.stores = stores
        stores.bind_client(str(settings["client_id"]).strip())
        self._settings = settings
        self._auths: dict[tuple[type[AuthAdapter], str], AuthAdapter] = {}
        self._lock = threading.Lock()

    @classmethod
    @sealed  # the .env's values, the client secret among them
    def from_env(cls, path: str | os.PathLike[str] = ".env", **kwargs: Any) -> Sellers:
        """The app's credentials from the ``.env`` at ``path``, the sellers from the store its
        ``ML_TOKEN_STORE`` names; keyword arguments override the file (``stores=`` gives the
        store itself)."""
        settings = env_settings(path)
        settings.update(kwargs)
        given = settings.pop("stores", None)
        stores = given if isinstance(given, SellerStores) else sellers_from_env(path)
        return cls(stores, **settings)

    def __repr__(self) -> str:
        return (
            f"Sellers(client_id={self._settings.get('client_id')!r}, "
            f"stores={self.stores!r}, {len(self._auths)} auths loaded)"
        )

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError(
            "a Sellers cannot be pickled: it holds the client secret; build one in each "
            "worker with Sellers.from_env(path)"
        )

    def ids(self) -> list[str]:
        """The user ids of the sellers held."""
        return self.stores.sellers()

    def rows(self) -> list[SellerRow]:
        """What ``mlauth sellers`` shows, per seller: expiry, last refresh, state."""
        return self.stores.rows()

    def auth(self, user_id: str | int) -> MLAuth:
        """The requests auth of seller ``user_id`` (built once, then the same object)."""
        auth = self._auth(MLAuth, user_id)
        assert isinstance(auth, MLAuth)
        return auth

    def httpx_auth(self, user_id: str | int) -> HttpxAuth:
        """The httpx auth (``httpx.Client`` and ``AsyncClient``) of seller ``user_id``."""
        from mlauth.integrations.httpx_auth import HttpxAuth  # an optional extra

        auth = self._auth(HttpxAuth, user_id)
        assert isinstance(auth, HttpxAuth)
        return auth

    def _auth(self, kind: type[AuthAdapter], user_id: str | int) -> AuthAdapter:
        uid = check_user_id(user_id, "Sellers")
        key = (kind, uid)
        auth = self._auths.get(key)
        if auth is None:
            with self._lock:  # two threads asking at once share one engine
                auth = self._auths.get(key)
                if auth is None:
                    auth = kind(store=self.stores.store(uid), **self._settings)
                    self._auths[key] = auth
        return auth

    @sealed  # the refresh token is a local
    def add(self, refresh_token: str | Secret, *, user_id: str | int | None = None) -> str:
        """Add a seller from a refresh token: refreshed once (which proves it and tells the
        seller), then kept in the store. Returns the seller's user id.

        The user id is the one the token ends with, or ``user_id`` if the token names none.
        A seller held already is a ConfigError (remove it first, or ``mlauth login``). A
        dead token adds nothing (:class:`~mlauth.InvalidGrantError`).
        """
        token = refresh_token if isinstance(refresh_token, Secret) else Secret(refresh_token)
        del refresh_token
        problem = token_problem(token.reveal())
        if problem is not None:
            raise ConfigError(f"the refresh token given {problem} (its value is not shown)")
        named = seller_of(TokenSet(None, token))
        uid = check_user_id(user_id, "Sellers.add") if user_id is not None else named
        if uid is None:
            raise ConfigError(
                "the refresh token does not end with a seller's user id; say whose it is "
                "(user_id=, or --seller on the command line)"
            )
        self.stores.add(uid, TokenSet(None, token))  # ConfigError if held already
        try:
            self.auth(uid).refresh()
        except InvalidGrantError:
            self.remove(uid)  # the token was dead: nothing to keep
            raise
        return uid

    @sealed  # the code and the answer's tokens are locals
    def add_code(
        self, code: str | Secret, redirect_uri: str, *, code_verifier: str | Secret | None = None
    ) -> str:
        """Add (or replace) the seller who authorized the app, from the authorization
        code of the redirect; returns the seller's user id (the answer's ``user_id``)."""
        secret = code if isinstance(code, Secret) else Secret(code)
        del code
        verifier = Secret(code_verifier) if isinstance(code_verifier, str) else code_verifier
        endpoint = TokenEndpoint(
            self._settings.get("token_url") or DEFAULT_TOKEN_URL,
            str(self._settings["client_id"]).strip(),
            self._settings["client_secret"],
        )
        started = time.time()
        answer = endpoint.exchange_code(secret, redirect_uri, code_verifier=verifier)
        tokens = TokenSet(
            access_token=answer.access_token,
            refresh_token=answer.refresh_token,
            expires_at=None if answer.expires_in is None else started + answer.expires_in,
            refreshed_at=started,
            refreshed_by=f"mlauth login, {this_process()}",
            user_id=answer.user_id,
        )
        uid = seller_of(tokens)
        if uid is None or answer.refresh_token is None:
            raise RefreshError(
                "the code exchange's answer named no seller (user_id) or held no refresh "
                "token (does the app have offline_access?); nothing was saved"
            )
        self.stores.add(uid, tokens, replace=True)
        with self._lock:
            for key in [key for key in self._auths if key[1] == uid]:
                del self._auths[key]  # their engines hold the replaced chain
        return uid

    def remove(self, user_id: str | int) -> bool:
        """Forget seller ``user_id`` (its chain is deleted from the store); False if it was
        not held."""
        uid = check_user_id(user_id, "Sellers.remove")
        with self._lock:
            for key in [key for key in self._auths if key[1] == uid]:
                del self._auths[key]
        return self.stores.remove(uid)
