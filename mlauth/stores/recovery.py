"""Finishing a refresh a dead holder left, in a store whose commits are fenced on a version.

The Redis store and the SQL store of many sellers keep a refresh's raw answer beside the
chain (a field of the hash, a column of the row), tagged with the version it follows, before
anything reads it; their commit clears it. The next refresher opens its transaction on what
the holder left: :meth:`FencedRefresh.recover` commits a usable answer over the version it
follows, or keeps and shows one that is not usable. Both stores do it the same way, here.
"""

from __future__ import annotations

import logging
from typing import Any

from mlauth.answers import tokens_of
from mlauth.errors import StoreError, WrongSellerError
from mlauth.secret import Secret, fingerprint
from mlauth.tokens import TokenSet

from .base import KeptAnswerRefresh
from .journal import kept_note

__all__ = ["FencedRefresh", "answer_follows"]

log = logging.getLogger("mlauth")


def answer_follows(record: dict[str, Any]) -> tuple[str, int] | None:
    """The version (chain, generation) a raw answer record follows, if it names one."""
    chain, gen = record.get("chain"), record.get("generation")
    if not isinstance(chain, str) or isinstance(gen, bool) or not isinstance(gen, int):
        return None
    return (chain, gen)


class FencedRefresh(KeptAnswerRefresh):
    """A refresh transaction of a store that keeps the raw answer beside a versioned chain.

    A subclass names what holds the chain (:attr:`held_in`, for messages) and what to do with
    a kept answer for another seller (:meth:`other_seller`).
    """

    #: What holds the chain, for messages: "row", "hash".
    held_in = "store"
    #: Set by :meth:`recover` to where an unusable kept answer is, for messages.
    kept: str | None = None

    def recover(self, record: dict[str, Any] | None, *, login: bool) -> None:
        """Finish what a holder that died left: a raw answer that follows the version read
        is committed over it with the fence (a usable one), or kept and shown (one with no
        usable refresh token: the stored token is then tried once). A usable one that cannot
        be committed stops the refresh: the stored token was spent for it. One for another
        seller is never written (:meth:`other_seller`). ``login``: the chain is being
        replaced anyway, so nothing stops it."""
        version = self.version if isinstance(self.version, tuple) else None
        if record is None or answer_follows(record) != version:
            return  # none, or one the chain moved past (the next commit clears it)
        stored = self.tokens.refresh_token
        follows_stored = record.get("spent") == fingerprint(stored.reveal() if stored else None)
        found = tokens_of(record, stored if follows_stored else None)
        if not isinstance(found, TokenSet):
            self.kept = kept_note(record, found, self.raw_place)
            self.possibly_spent = self.kept
            return
        try:
            self.version = self.store.save(found, replaces=self.version)
        except WrongSellerError as exc:
            if not login:  # a login replaces the chain with its own tokens
                self.other_seller(exc, stored)
            return
        except StoreError as exc:  # a peer committed (stale), or the store failed
            if login:
                log.error("could not replay the raw answer kept in %s: %s", self.raw_place, exc)
                return
            # The stored refresh token was spent for this answer: sending it again could
            # only earn invalid_grant, and the answer's token would be lost for good.
            raise StoreError(
                f"{self.raw_place} at {self.store.location} keeps the answer of a refresh "
                f"that was not committed, and it could not be written back ({exc}); the "
                f"refresh token the {self.held_in} holds was spent for it, so nothing was "
                "sent. The next refresh tries again."
            ) from None
        self.tokens = found
        log.warning(
            "recovered a refresh that was not committed (a holder that died): wrote %s to %s",
            found.describe(),
            self.store.location,
        )

    def other_seller(self, exc: WrongSellerError, stored: Secret | None) -> None:
        """A kept answer is another seller's: it stays where it is, and the refresh stops."""
        raise exc
