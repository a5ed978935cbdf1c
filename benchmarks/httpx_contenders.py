"""The httpx contenders, each set up as its own documentation says.

- mlauth: ``httpx.Client(auth=HttpxAuth.from_env(".env"))``, or the same auth object in an
  ``httpx.AsyncClient``.
- Authlib: ``authlib.integrations.httpx_client.OAuth2Client`` / ``AsyncOAuth2Client``
  ``(client_id, client_secret, token=..., token_endpoint=..., update_token=saver)`` ("Auto
  Update Token"); ``client_secret_post`` because MercadoLibre takes the credentials in the form
  body. The async client awaits ``update_token``, so its saver is a coroutine; it writes the
  JSON file the way the requests peers do (:func:`benchmarks.contenders.save_json_token`).
- the floor: an ``httpx.Auth`` whose ``auth_flow`` only sets a constant header.

Every client has ``trust_env`` off: httpx would otherwise look at proxy variables and
``~/.netrc`` for each client, a cost of the environment, not of the auth layer.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.contenders import load_json_token, save_json_token
from mlauth.httpx import HttpxAuth

MLAUTH = "mlauth"
AUTHLIB = "authlib"
# Not a library: a constant header and a token that outlives the run, the floor of a run.
STATIC = "static"
ASYNC_LIBRARIES = (STATIC, MLAUTH, AUTHLIB)


class StaticHttpxBearer(httpx.Auth):
    """The cheapest httpx auth: sets a header that never changes."""

    def __init__(self, token: str) -> None:
        self.header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = self.header
        yield request


class StatHttpxBearer(StaticHttpxBearer):
    """The floor plus one ``os.stat`` of the ``.env`` per request (mlauth's before issue 19)."""

    def __init__(self, token: str, path: Path) -> None:
        super().__init__(token)
        self.path = str(path)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        os.stat(self.path)
        request.headers["Authorization"] = self.header
        yield request


def _authlib_options(
    store: Path, *, token_url: str, client_id: str, client_secret: str, margin: float
) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_secret": client_secret,
        "token": load_json_token(store),
        "token_endpoint": token_url,
        "token_endpoint_auth_method": "client_secret_post",
        "leeway": margin,
        "trust_env": False,
    }


def authlib_client(
    store: Path,
    *,
    token_url: str,
    client_id: str,
    client_secret: str,
    margin: float,
    **client_options: Any,
) -> httpx.Client:
    """Authlib's ``OAuth2Client`` for a token kept in the JSON file ``store``."""
    from authlib.integrations.httpx_client import OAuth2Client

    def update_token(new: dict[str, Any], refresh_token: str | None = None, **_: Any) -> None:
        save_json_token(store, new)

    options = _authlib_options(
        store, token_url=token_url, client_id=client_id, client_secret=client_secret, margin=margin
    )
    return OAuth2Client(  # type: ignore[no-any-return]
        **options, update_token=update_token, **client_options
    )


def authlib_async_client(
    store: Path,
    *,
    token_url: str,
    client_id: str,
    client_secret: str,
    margin: float,
    refreshed: list[int] | None = None,
    **client_options: Any,
) -> httpx.AsyncClient:
    """Authlib's ``AsyncOAuth2Client`` for a token kept in the JSON file ``store``.

    ``refreshed[0]`` counts the refreshes this client made (its ``update_token`` calls).
    """
    from authlib.integrations.httpx_client import AsyncOAuth2Client

    async def update_token(new: dict[str, Any], refresh_token: str | None = None, **_: Any) -> None:
        if refreshed is not None:
            refreshed[0] += 1
        save_json_token(store, new)

    options = _authlib_options(
        store, token_url=token_url, client_id=client_id, client_secret=client_secret, margin=margin
    )
    return AsyncOAuth2Client(  # type: ignore[no-any-return]
        **options, update_token=update_token, **client_options
    )


def static_async_client(store: Path, **client_options: Any) -> httpx.AsyncClient:
    """An ``AsyncClient`` sending the access token of the JSON file ``store``, unchanged."""
    token = load_json_token(store)["access_token"]
    return httpx.AsyncClient(auth=StaticHttpxBearer(token), trust_env=False, **client_options)


def mlauth_async_client(store: Path, **client_options: Any) -> httpx.AsyncClient:
    """An ``AsyncClient`` whose auth is ``HttpxAuth.from_env(store)``."""
    return httpx.AsyncClient(auth=HttpxAuth.from_env(store), trust_env=False, **client_options)
