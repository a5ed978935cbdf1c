"""Sellers' chains on one location, as a store of many sellers keeps them (issue 20), in
memory: each seller's :class:`SellerStore` holds its own chain, all of them share one
``location`` (the database) and one place where incidents are kept (files beside a path, as
the ``.env`` store keeps them), so alerts and metrics meet what they meet on a real one."""

from __future__ import annotations

import time
from collections.abc import Hashable
from pathlib import Path

import mlauth
from mlauth.stores.base import check_seller
from mlauth.stores.incidents import FileIncidents, Incidents
from mlauth.testing import FakeMercadoLibre, MemoryStore
from mlauth.tokens import TokenSet


class SellerStore(MemoryStore):
    """One seller's chain (``seller``: the user id) on the shared ``location``."""

    def __init__(
        self, tokens: TokenSet | None, *, seller: str, location: str, incidents: Path
    ) -> None:
        super().__init__(tokens, location=location)
        self.seller = seller
        self._incidents = str(incidents)

    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        check_seller(self, tokens)  # as every save of a sellers store does
        return super().save(tokens, replaces=replaces)

    def incidents(self) -> Incidents:
        return FileIncidents(self._incidents)


def seller_store(
    fake: FakeMercadoLibre,
    folder: Path,
    user_id: int,
    *,
    expires_in: float = 3600.0,
    access: str | None = None,
) -> SellerStore:
    """A chain the fake issued for ``user_id``, on the location ``folder/sellers.db``;
    ``access``: an access token to hold instead of the chain's (one the server does not
    know, so the first request meets a 401)."""
    answer = fake.issue_tokens(user_id=user_id)
    now = time.time()
    tokens = TokenSet(
        mlauth.Secret(access or str(answer["access_token"])),
        mlauth.Secret(str(answer["refresh_token"])),
        expires_at=now + expires_in,
        refreshed_at=now - 3600,
    )
    database = folder / "sellers.db"
    return SellerStore(tokens, seller=str(user_id), location=str(database), incidents=database)


def seller_auth(fake: FakeMercadoLibre, store: SellerStore, **kwargs: object) -> mlauth.MLAuth:
    """An auth on ``store`` that talks to the fake (``kwargs``: the auth's options)."""
    kwargs.setdefault("backoff", 0.0)
    return mlauth.MLAuth(
        fake.client_id,
        fake.client_secret,
        store,
        token_url=fake.token_url,
        hosts=[fake.host],
        **kwargs,  # type: ignore[arg-type]
    )
