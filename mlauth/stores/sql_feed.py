"""The change feed of the SQL store of many sellers (:mod:`.feed`): which sellers' rows
changed since a time, in one query.

Every statement that writes a seller's version (a commit, a seed, a replacement) sets the
row's ``changed_at`` to the database's time in the same statement, and a removal leaves the
time in ``mlauth_removals``; an index on ``(client_id, changed_at)`` makes the look read only
what changed. The time is the database's own ("now" of :class:`~.sql_db.Dialect`): on
PostgreSQL, the one clock all machines share.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable

from mlauth.errors import StoreError

from .feed import CHANGED_ODDLY, ChangeFeed, Found
from .sql_db import Database

__all__ = ["SqlFeed"]

_CLOCK = "SELECT {now}"
# The database's time first (its own row, so it comes even when nothing changed), then the
# rows written and the sellers removed since the time given. The time's row leads: PostgreSQL
# types the NULLs of the later branches after the columns of the first.
_CHANGES = (
    "SELECT NULL, NULL, NULL, {now} "
    "UNION ALL SELECT user_id, chain, generation, NULL FROM mlauth_sellers "
    "WHERE client_id = ? AND changed_at > ? "
    "UNION ALL SELECT user_id, NULL, NULL, NULL FROM mlauth_removals "
    "WHERE client_id = ? AND removed_at > ?"
)
# Before every time mlauth writes: "since the beginning".
_EVER = -1.0


class SqlFeed(ChangeFeed):
    """The feed of one :class:`~.sql.SqlSellers` in one process. ``client_id`` gives the app
    whose rows these are; ``valid`` tells a version mlauth can have written from a hand edit
    (which the seller's ``load()`` then names)."""

    def __init__(
        self,
        db: Database,
        location: str,
        check_interval: float,
        loaded: Container[str],
        *,
        client_id: Callable[[], str],
        valid: Callable[[object, object], bool],
    ) -> None:
        super().__init__(location, check_interval, loaded)
        self._db = db
        self._client_id = client_id
        self._valid = valid

    def clock(self) -> float:
        rows, _ = self._db.run(_CLOCK, (), "read the time of")
        return self._time(rows[0][0] if rows else None)

    def changes(self, since: float | None, loaded: Container[str]) -> Found:
        client = self._client_id()
        after = _EVER if since is None else since
        rows, _ = self._db.run(_CHANGES, (client, after, client, after), "read")
        at: float | None = None
        written: dict[str, Hashable] = {}
        removed: set[str] = set()
        for user_id, chain, generation, now in rows:
            if user_id is None:
                at = self._time(now)
            elif not isinstance(user_id, str) or user_id not in loaded:
                continue
            elif chain is None and generation is None:
                removed.add(user_id)
            else:
                valid = self._valid(chain, generation)
                written[user_id] = (chain, generation) if valid else CHANGED_ODDLY
        if at is None:
            raise StoreError(f"{self.location} gave no time with its changes")
        # A row there now wins over a removal: the seller was added again since.
        gone: list[tuple[str, Hashable]] = [(u, None) for u in removed if u not in written]
        return at, [*written.items(), *gone]

    def _time(self, value: object) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise StoreError(f"{self.location} gave no time for {{now}} ({type(value).__name__})")
