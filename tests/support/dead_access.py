"""A ``.env`` on the loopback fake whose access token the server does not know: the first
request meets a 401 (refreshed, or genuine when the file says it was refreshed moments ago)."""

from __future__ import annotations

import time
from pathlib import Path

from mlauth.testing import FakeMercadoLibre

DEAD_ACCESS = "APP_USR-dead-access-token-not-real"


def dead_access_env(fake: FakeMercadoLibre, env: Path, *, refreshed_ago: float) -> None:
    """A .env whose access token looks fresh to mlauth but that the server does not know."""
    now = time.time()
    fake.write_env(
        env,
        include_access=False,
        extra={
            "ML_ACCESS_TOKEN": DEAD_ACCESS,
            "ML_TOKEN_EXPIRES_AT": repr(now + 20000),
            "ML_TOKEN_REFRESHED_AT": repr(now - refreshed_ago),
        },
    )
