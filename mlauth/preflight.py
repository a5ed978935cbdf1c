"""Whether a refresh could be saved and locked, asked before anything depends on it.

A pipeline whose store cannot be written runs happily on its current token and fails hours
later, at the first refresh, possibly after spending the refresh token. :func:`refresh_problem`
is asked at start: ``mlauth run`` refuses to start the command, :meth:`MLAuth.from_env` and
:func:`mlauth.install` log an ERROR (a pipeline whose token is still valid may finish its work).
"""

from __future__ import annotations

from .errors import LockTimeoutError, MLAuthError
from .stores.base import TokenStore
from .stores.envfile import EnvFileStore

__all__ = ["refresh_problem"]


def refresh_problem(store: TokenStore) -> str | None:
    """One line naming why a refresh could not be saved or locked, and the fix; or None.

    "Saved" is the store's own :meth:`~mlauth.TokenStore.check_writable`, which performs the
    operation a save performs. A file store's lock is also taken, without waiting: its lock
    file lives beside the ``.env`` and may be refused on its own (an immutable or foreign
    lock file, a folder that allows replacing the ``.env`` but not creating files).
    """
    try:
        store.check_writable()
    except MLAuthError as exc:
        return str(exc)
    if isinstance(store, EnvFileStore):
        try:
            with store.lock(0.0):
                pass
        except LockTimeoutError:
            pass  # a peer holds it, refreshing: the lock works
        except MLAuthError as exc:
            return str(exc)
    return None
