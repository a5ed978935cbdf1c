"""Helpers for the hostile-answer tests: odd token answers and what each must cost.

A *mangle* takes the answer FakeMercadoLibre would send (its grant already processed: the
refresh token sent is spent, the one in the answer is live) and returns the body to send
instead (``FakeMercadoLibre.mangle_next_token_answers``): ``bytes`` as they are, anything
else as JSON. Each mangle records the answer it was given, so a test knows the live tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from mlauth.testing import FakeMercadoLibre

DELETE = object()  # a field value that removes the field

# Values a token can never be: each would break a header, a log line or the .env.
BAD_TOKENS: dict[str, object] = {
    "crlf": "APP_USR-fake\r\nX-Injected: 1",
    "lf": "APP_USR-fake\nsecond-line",
    "nul": "APP_USR-fake\x00nul",
    "latin1": "APP_USR-fake-\u00e9",
    "not-latin1": "APP_USR-fake-\u4e2d",
    "space": "APP_USR-fake token",
    "too-long": "A" * 3000,
    "empty": "",
    "number": 12345,
    "boolean": True,
    "array": ["APP_USR-fake"],
    "object": {"token": "APP_USR-fake"},
}
# The string ones, for the .env and Redis (which hold strings only).
BAD_TOKEN_STRINGS = {
    name: value for name, value in BAD_TOKENS.items() if isinstance(value, str) and value
}
_B64TOKEN = re.compile(r"Bearer [A-Za-z0-9\-._~+/]+=*")


class Mangle:
    """A mangle that records the answers it was given (their tokens are the live ones)."""

    def __init__(self, change: Callable[[dict[str, object]], object]) -> None:
        self.change = change
        self.given: list[dict[str, object]] = []

    def __call__(self, answer: dict[str, object]) -> object:
        self.given.append(dict(answer))
        return self.change(answer)

    @property
    def refresh_token(self) -> str:
        """The live refresh token the server put in the (last) answer before the mangle."""
        return str(self.given[-1]["refresh_token"])

    @property
    def access_token(self) -> str:
        return str(self.given[-1]["access_token"])


def fields(**changes: object) -> Callable[[dict[str, object]], object]:
    """Change (or, with DELETE, remove) fields of the answer."""

    def change(answer: dict[str, object]) -> object:
        for name, value in changes.items():
            if value is DELETE:
                answer.pop(name, None)
            else:
                answer[name] = value
        return answer

    return change


def raw(template: bytes) -> Callable[[dict[str, object]], object]:
    """A body of raw bytes; ``{access}`` and ``{refresh}`` become the answer's tokens."""

    def change(answer: dict[str, object]) -> object:
        return template.replace(b"{access}", str(answer["access_token"]).encode()).replace(
            b"{refresh}", str(answer["refresh_token"]).encode()
        )

    return change


def assert_valid_bearer(header: str | None) -> None:
    """An Authorization header that holds an RFC 6750 b64token and nothing else."""
    assert header is not None and _B64TOKEN.fullmatch(header), "not a valid bearer header"


def assert_not_in(text: str, *values: object) -> None:
    """None of the string ``values`` (tokens) appears in ``text``; says which, not what."""
    for number, value in enumerate(values):
        if isinstance(value, str) and len(value) > 4:
            assert value not in text, f"value #{number} appears in the text"


def warnings_about(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno >= logging.WARNING and needle in record.getMessage()
    ]


def journal_records(path: str | Path) -> list[dict[str, object]]:
    text = Path(path).read_text() if Path(path).exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def spend_outside(fake: FakeMercadoLibre, refresh_token: str) -> requests.Response:
    """Spend ``refresh_token`` at the fake's token endpoint as a program without mlauth
    would (a refresher that died after its POST, a legacy script): the fake rotates it."""
    return requests.post(
        fake.token_url,
        data={
            "grant_type": "refresh_token",
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
            "refresh_token": refresh_token,
        },
        timeout=30,
    )
