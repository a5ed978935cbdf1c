"""Moving a token chain out of a ``.env`` into Redis, once, under both locks.

The order is what keeps the chain: the tokens are written to Redis first and removed from the
file second, both while holding the file's lock and the Redis lock, so no process can spend
the refresh token in between and a crash in the middle leaves the tokens in at least one
place (running the migration again then finishes it). Afterwards the ``.env`` keeps every
other line and gains ``ML_TOKEN_STORE=<url>``: a second machine needs only a copy of it.
"""

from __future__ import annotations

import dataclasses
import os

from mlauth.errors import AUTHORIZE, ConfigError, MLAuthError, masked, sealed
from mlauth.stores.envfile import (
    TOKEN_KEYS,
    EnvFileStore,
    read_env_file,
    secrets_of,
    tokens_from_values,
)
from mlauth.stores.journal import recover
from mlauth.stores.redis import RedisStore, redact_url
from mlauth.stores.select import STORE_KEY, shared_store
from mlauth.tokens import TokenSet

__all__ = ["ChainConflictError", "MigrationResult", "migrate_to_redis"]


class ChainConflictError(MLAuthError):
    """Redis already holds a different token chain under the key; nothing was changed."""


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    env_path: str
    location: str
    key: str
    tokens: TokenSet

    def __str__(self) -> str:
        fingerprint = self.tokens.refresh_token.fingerprint if self.tokens.refresh_token else "-"
        return (
            f"moved the tokens (refresh {fingerprint}) from {self.env_path} to {self.location} "
            f"key {self.key}; the .env now says {STORE_KEY}, copy it to every machine"
        )


@sealed  # the .env's values and the tokens are locals here and below
def migrate_to_redis(
    env_path: str | os.PathLike[str],
    url: str,
    *,
    force: bool = False,
    lock_timeout: float = 120.0,
) -> MigrationResult:
    """Move the tokens of ``env_path`` into the Redis at ``url`` and point the file there.

    Refuses (:class:`ChainConflictError`) to overwrite a different chain already in Redis
    unless ``force``. ``ML_TOKEN_KEY`` and ``ML_TOKEN_LOCK_TIMEOUT`` in the file are honoured.
    """
    path = os.path.abspath(os.fspath(env_path))
    values = read_env_file(path)
    current = (values.get(STORE_KEY) or "").strip()
    if current:
        raise ConfigError(
            f"{path} already keeps its tokens in {redact_url(current)} ({STORE_KEY}); there is "
            "nothing left in the file to move"
        )
    with masked(secrets_of(values)):  # a token pasted under another key is not quoted
        target = shared_store({**values, STORE_KEY: url}, path)
    assert isinstance(target, RedisStore)
    source = EnvFileStore(path)
    # The file lock is taken directly, not through EnvFileStore.lock(): once the file names
    # the Redis store, that one would follow it and take the Redis lock a second time.
    with (
        source.file_lock(lock_timeout),
        target.lock(lock_timeout),
    ):
        values = read_env_file(path)  # under the locks: what no process can change any more
        if (values.get(STORE_KEY) or "").strip():
            raise ConfigError(f"{path} was migrated by another process meanwhile")
        tokens = _settled_tokens(source, values, path)
        if tokens.refresh_token is None:
            raise ConfigError(f"{path}: ML_REFRESH_TOKEN is missing; nothing to move. {AUTHORIZE}")
        existing = target.peek()
        same = existing is not None and existing.refresh_token == tokens.refresh_token
        if existing is not None and not same and not force:
            raise ChainConflictError(
                f"{target.location} already holds another token chain under {target.key!r} "
                f"(refresh {existing.refresh_token.fingerprint if existing.refresh_token else '-'}"
                f", last refreshed by {existing.refreshed_by or 'unknown'}); nothing was changed. "
                "If that chain is dead or belongs to this seller, migrate with --force "
                "(force=True) to replace it; otherwise set ML_TOKEN_KEY or use another database."
            )
        if not same:
            target.seed(tokens, replace=force)
        source.update_file({**dict.fromkeys(TOKEN_KEYS), STORE_KEY: url})
    return MigrationResult(path, target.location, target.key, tokens)


def _settled_tokens(source: EnvFileStore, values: dict[str, str | None], path: str) -> TokenSet:
    """The ``.env``'s tokens after replaying what its refresh journal holds.

    A refresh whose answer never reached the file (its writer died, or the disk refused)
    left the successor only there; the file's refresh token is then already spent, and
    moving it would seed Redis with a dead chain. Called under the file lock, as every
    recovery is. Refuses when something is left that cannot be settled.
    """
    journal = source.journal()
    stamp = source.stamp()
    tokens, _, found = recover(journal, source, tokens_from_values(values, path), stamp)
    leftover = bool(journal.records())
    if found.possibly_spent is not None or leftover:
        if found.possibly_spent is not None:
            what = (
                f"its refresh token was sent by a refresh that never got an answer ({found.died})"
            )
        elif found.kept is not None:
            what = f"its refresh token may have been spent for {found.kept}"
        else:
            what = f"{journal.where} holds tokens that could not be written back"
        raise ConfigError(
            f"{path}: not migrated, {what}. Run any API call or `mlauth refresh` with this "
            "`.env` first so the refresh is settled, then migrate again; nothing was changed."
        )
    return tokens
