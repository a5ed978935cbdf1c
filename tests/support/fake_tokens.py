"""Obviously fake credentials and tokens for the unit tests, the ``.env`` text that holds them,
and the token endpoint's answer that rotates them."""

from __future__ import annotations

import time

TOKEN_URL = "https://api.mercadolibre.com/oauth/token"
API = "https://api.mercadolibre.com"
CLIENT_ID = "1234567890123456"
CLIENT_SECRET = "fake-secret-for-tests-only"
ACCESS_1 = "APP_USR-1234567890123456-010101-fakeaccess0000000000000000000001-8035443"
REFRESH_1 = "TG-fakerefresh000000000000001-8035443"
ACCESS_2 = "APP_USR-1234567890123456-010101-fakeaccess0000000000000000000002-8035443"
REFRESH_2 = "TG-fakerefresh000000000000002-8035443"


def env_text(**overrides: str | None) -> str:
    values: dict[str, str | None] = {
        "ML_CLIENT_ID": CLIENT_ID,
        "ML_CLIENT_SECRET": CLIENT_SECRET,
        "ML_ACCESS_TOKEN": ACCESS_1,
        "ML_REFRESH_TOKEN": REFRESH_1,
        "ML_TOKEN_EXPIRES_AT": str(int(time.time()) + 6 * 3600),
    }
    values.update(overrides)
    body = "".join(f"{k}={v}\n" for k, v in values.items() if v is not None)
    return "# pipeline settings\nOTHER_SETTING=keep me\n" + body


def token_answer(
    access: str = ACCESS_2, refresh: str | None = REFRESH_2, **extra: object
) -> dict[str, object]:
    answer: dict[str, object] = {
        "access_token": access,
        "token_type": "bearer",
        "expires_in": 21600,
        "scope": "offline_access read write",
        "user_id": 8035443,
    }
    if refresh is not None:
        answer["refresh_token"] = refresh
    answer.update(extra)
    return answer
