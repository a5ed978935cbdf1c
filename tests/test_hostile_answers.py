"""Odd 200 answers from the token endpoint: whatever is usable in them is kept, and the chain
lives on.

The server has rotated by the time its answer arrives, so the answer holds the only live
refresh token. Each test makes FakeMercadoLibre process a real grant and then send its answer
changed (a field of another JSON type, a bad character, a body that is no JSON object), and
checks what mlauth kept, what the next refresh spends (the new refresh token: the fake's
``invalid_grant`` stays 0), what it said, and that no token reached a message.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

import mlauth
import mlauth.endpoint
from mlauth.answers import tokens_of
from mlauth.stores.envfile import read_env_file
from mlauth.stores.journal import Journal
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import LATEST_TIME, TokenSet
from tests.support.hostile_answers import (
    BAD_TOKENS,
    DELETE,
    Mangle,
    assert_not_in,
    assert_valid_bearer,
    fields,
    journal_records,
    raw,
    spend_outside,
    warnings_about,
)


@pytest.fixture
def env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    # Expired: the first request refreshes, and gets the mangled answer.
    fake_ml.write_env(path, expires_at=time.time() - 10)
    return path


def get(fake: FakeMercadoLibre, auth: mlauth.MLAuth) -> requests.Response:
    return requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)


def everything_said(caplog: pytest.LogCaptureFixture, *errors: BaseException) -> str:
    return caplog.text + "".join(f"{error}{error!r}" for error in errors)


def assert_next_refresh_spends_the_new_token(fake: FakeMercadoLibre, env: Path) -> None:
    """A later process refreshes from the .env: the server accepts what it finds there."""
    stored = read_env_file(env)["ML_REFRESH_TOKEN"]
    assert fake.is_live(stored)
    refreshes = fake.stats()["refreshes"]
    mlauth.MLAuth.from_env(env).refresh()
    assert fake.stats()["refreshes"] == refreshes + 1
    assert fake.stats()["invalid_grant"] == 0


# -- both tokens usable: kept, whatever else is odd ---------------------------------------

ODD_EXPIRY = {
    "string": "abc",
    "negative": -5,
    "zero": 0,
    "boolean": True,
    "array": [1],
    "object": {"seconds": 21600},
    "huge-float": 1e308,
    "nan": float("nan"),
    "infinity": float("inf"),
    "empty-string": "",
    "over-a-year": 366 * 24 * 3600 + 1,
}
ODD_TYPE = {
    "mac": "mac",
    "empty": "",
    "number": 42,
    "array": ["bearer"],
    "object": {"type": "bearer"},
    "long": "x" * 500,
    "crlf": "bearer\r\n",
}


@pytest.mark.parametrize("value", ODD_EXPIRY.values(), ids=ODD_EXPIRY.keys())
def test_an_unusable_expires_in_keeps_both_tokens_with_an_unknown_expiry(
    fake_ml: FakeMercadoLibre, env: Path, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    mangle = Mangle(fields(expires_in=value))
    fake_ml.mangle_next_token_answers(1, mangle)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        response = get(fake_ml, mlauth.MLAuth.from_env(env))
    assert response.status_code == 200
    stored = read_env_file(env)
    assert stored["ML_REFRESH_TOKEN"] == mangle.refresh_token
    assert stored["ML_ACCESS_TOKEN"] == mangle.access_token
    assert not stored.get("ML_TOKEN_EXPIRES_AT")  # unknown: the first 401 refreshes
    (warning,) = warnings_about(caplog, "expires_in")  # once
    assert "unknown expiry" in warning.getMessage()
    assert_not_in(caplog.text, mangle.refresh_token, mangle.access_token)
    assert_next_refresh_spends_the_new_token(fake_ml, env)


def test_a_huge_integer_expires_in_does_not_make_the_body_unreadable(
    fake_ml: FakeMercadoLibre, env: Path
) -> None:
    # Python refuses to read an integer of over 4300 digits; the tokens beside it count.
    body = b'{"access_token":"{access}","refresh_token":"{refresh}","expires_in":' + b"9" * 5000
    mangle = Mangle(raw(body + b',"token_type":"bearer"}'))
    fake_ml.mangle_next_token_answers(1, mangle)
    assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    assert_next_refresh_spends_the_new_token(fake_ml, env)


@pytest.mark.parametrize("value", ["21600", " 21600 ", 21600.5, "1.08e4"])
def test_a_numeric_expires_in_in_any_form_sets_the_expiry_without_a_warning(
    fake_ml: FakeMercadoLibre, env: Path, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    started = time.time()
    fake_ml.mangle_next_token_answers(1, Mangle(fields(expires_in=value)))
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    expires_at = float(read_env_file(env)["ML_TOKEN_EXPIRES_AT"] or 0)
    lifetime = float(str(value).strip())
    assert started - 5 <= expires_at - lifetime <= time.time()
    assert warnings_about(caplog, "odd") == []


@pytest.mark.parametrize("value", ODD_TYPE.values(), ids=ODD_TYPE.keys())
def test_a_token_type_other_than_bearer_is_a_warning_not_a_loss(
    fake_ml: FakeMercadoLibre, env: Path, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    mangle = Mangle(fields(token_type=value))
    fake_ml.mangle_next_token_answers(1, mangle)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    (warning,) = warnings_about(caplog, "token_type")
    assert "not bearer" in warning.getMessage()
    assert "\r" not in caplog.text and "x" * 50 not in caplog.text  # odd values not echoed
    assert_next_refresh_spends_the_new_token(fake_ml, env)


@pytest.mark.parametrize("value", ["BEARER", "Bearer", DELETE, None], ids=str)
def test_bearer_in_any_case_or_no_token_type_is_no_warning(
    fake_ml: FakeMercadoLibre, env: Path, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    fake_ml.mangle_next_token_answers(1, Mangle(fields(token_type=value)))
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    assert warnings_about(caplog, "odd") == []


def test_extra_fields_of_any_shape_and_deep_nesting_cost_nothing(
    fake_ml: FakeMercadoLibre, env: Path
) -> None:
    # Nested deeper than Python's JSON parser goes (it recurses): the tokens beside count.
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"access_token":"{access}","x":' + deep + b',"refresh_token":"{refresh}",'
    body += b'"y":{"a":"]}\\"["},"z":null,"expires_in":21600,"token_type":"bearer"}'
    mangle = Mangle(raw(body))
    fake_ml.mangle_next_token_answers(1, mangle)
    assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    assert read_env_file(env)["ML_TOKEN_EXPIRES_AT"]
    assert_next_refresh_spends_the_new_token(fake_ml, env)


def test_a_stray_byte_that_is_not_utf8_spoils_only_its_own_field(
    fake_ml: FakeMercadoLibre, env: Path
) -> None:
    body = b'{"access_token":"{access}","refresh_token":"{refresh}","scope":"r\xe9ad\xff"}'
    mangle = Mangle(raw(body))
    fake_ml.mangle_next_token_answers(1, mangle)
    assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    assert_next_refresh_spends_the_new_token(fake_ml, env)


# -- a usable refresh token only: kept, and the next request fetches an access token -------


@pytest.mark.parametrize(
    "value", [*BAD_TOKENS.values(), None, DELETE], ids=[*BAD_TOKENS.keys(), "null", "missing"]
)
def test_a_usable_refresh_token_alone_is_saved_and_the_next_request_spends_it(
    fake_ml: FakeMercadoLibre, env: Path, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    mangle = Mangle(fields(access_token=value))
    fake_ml.mangle_next_token_answers(1, mangle)
    auth = mlauth.MLAuth.from_env(env)
    with caplog.at_level(logging.DEBUG, logger="mlauth"):
        with pytest.raises(mlauth.RefreshError, match="no usable access token") as caught:
            get(fake_ml, auth)
        stored = read_env_file(env)
        assert stored["ML_REFRESH_TOKEN"] == mangle.refresh_token
        assert not stored.get("ML_ACCESS_TOKEN")
        # The same process goes on: its next request refreshes with the new refresh token.
        response = get(fake_ml, auth)
    assert response.status_code == 200
    assert_valid_bearer(response.request.headers["Authorization"])
    assert fake_ml.stats()["invalid_grant"] == 0 and fake_ml.stats()["refreshes"] == 2
    assert fake_ml.stats()["api_calls"] == 1  # nothing was sent with a broken header
    assert_not_in(everything_said(caplog, caught.value), value, mangle.refresh_token)
    assert_next_refresh_spends_the_new_token(fake_ml, env)


# -- no usable refresh token: nothing saved, the raw answer kept and shown ----------------

NOTHING_USABLE: dict[str, object] = {
    **{f"refresh-{name}": fields(refresh_token=value) for name, value in BAD_TOKENS.items()},
    "no-tokens": fields(access_token=DELETE, refresh_token=DELETE),
    "html": raw(b"<html>200 OK from a proxy</html>"),
    "empty-body": raw(b""),
    "array": raw(b'["{access}", "{refresh}"]'),
    "string": raw(b'"{refresh}"'),
    "number": raw(b"42"),
    "null": raw(b"null"),
    "true": raw(b"true"),
    "truncated": raw(b'{"access_token":"{access}","refresh_token":"{refresh}'),
}


@pytest.mark.parametrize("change", NOTHING_USABLE.values(), ids=NOTHING_USABLE.keys())
def test_an_answer_without_a_usable_refresh_token_is_kept_raw_and_the_error_says_where(
    fake_ml: FakeMercadoLibre, env: Path, caplog: pytest.LogCaptureFixture, change: Any
) -> None:
    before = env.read_bytes()
    mangle = Mangle(change)
    fake_ml.mangle_next_token_answers(1, mangle)
    with (
        caplog.at_level(logging.DEBUG, logger="mlauth"),
        pytest.raises(mlauth.RefreshError) as caught,
    ):
        get(fake_ml, mlauth.MLAuth.from_env(env))
    message = str(caught.value)
    journal = f"{os.path.realpath(env)}.journal"
    assert "unusable body" in message and f"kept in {journal}" in message
    assert "mlauth status" in message
    assert env.read_bytes() == before  # nothing half-saved
    assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600
    (kept,) = [r for r in journal_records(journal) if r["kind"] == "raw"]
    assert kept["size"] > 0 or kept["body"] == ""
    secrets = (mangle.refresh_token, mangle.access_token, *BAD_TOKENS.values())
    assert_not_in(everything_said(caplog, caught.value), *secrets)
    # Still kept after the next refresh, which tries the old token once and learns it is dead.
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(env).refresh()
    assert fake_ml.stats()["token_requests"] == 2
    assert [r["kind"] for r in journal_records(journal)].count("raw") == 1
    assert env.read_bytes() == before


def test_status_shows_a_kept_answer_and_no_token(fake_ml: FakeMercadoLibre, env: Path) -> None:
    mangle = Mangle(fields(refresh_token=12345))
    fake_ml.mangle_next_token_answers(1, mangle)
    with pytest.raises(mlauth.RefreshError):
        get(fake_ml, mlauth.MLAuth.from_env(env))
    done = subprocess.run(
        [sys.executable, "-m", "mlauth", "status", "--env", str(env)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("journal:")]
    assert "no usable refresh token (refresh_token is a number, not a string)" in row
    assert f"kept in {os.path.realpath(env)}.journal" in row and "mlauth login" in row
    assert_not_in(done.stdout + done.stderr, mangle.access_token, mangle.refresh_token)


def test_no_refresh_token_at_all_keeps_the_current_one(
    fake_ml: FakeMercadoLibre, env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # ML-FACTS: an app without offline_access gets no refresh token; null reads the same.
    before = read_env_file(env)["ML_REFRESH_TOKEN"]
    mangle = Mangle(fields(refresh_token=None))
    fake_ml.mangle_next_token_answers(1, mangle)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        response = get(fake_ml, mlauth.MLAuth.from_env(env))
    assert response.status_code == 200
    stored = read_env_file(env)
    assert stored["ML_ACCESS_TOKEN"] == mangle.access_token
    assert stored["ML_REFRESH_TOKEN"] == before
    assert "offline_access" in caplog.text
    assert journal_records(f"{env}.journal") == []  # saved: nothing kept


# -- the raw answer is on disk before it is read ------------------------------------------


def test_the_raw_answer_is_journaled_before_any_field_is_read(
    fake_ml: FakeMercadoLibre, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journaled: list[list[dict[str, object]]] = []
    original = mlauth.endpoint.read_answer

    def reading(raw: bytes) -> object:
        journaled.append(journal_records(f"{env}.journal"))
        return original(raw)

    monkeypatch.setattr(mlauth.endpoint, "read_answer", reading)
    mangle = Mangle(fields(expires_in="abc"))
    fake_ml.mangle_next_token_answers(1, mangle)
    arrived = time.time()
    assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    ((intent, record),) = journaled
    assert intent["kind"] == "intent" and record["kind"] == "raw"
    assert json.loads(str(record["body"]))["refresh_token"] == mangle.refresh_token
    assert arrived <= float(record["at"]) <= time.time()  # type: ignore[arg-type]
    assert float(record["started"]) <= float(record["at"])  # type: ignore[arg-type]


def test_a_journal_that_cannot_take_the_raw_answer_costs_nothing_but_an_error_log(
    fake_ml: FakeMercadoLibre,
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = Journal._append

    def append(self: Journal, record: dict[str, Any]) -> None:
        if record.get("kind") == "raw":  # the disk filled between the intent and the answer
            raise OSError(28, "No space left on device")
        original(self, record)

    monkeypatch.setattr(Journal, "_append", append)
    mangle = Mangle(fields(token_type="mac"))
    fake_ml.mangle_next_token_answers(1, mangle)
    with caplog.at_level(logging.WARNING, logger="mlauth"):
        assert get(fake_ml, mlauth.MLAuth.from_env(env)).status_code == 200
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "could not write the raw token answer" in errors[0].getMessage()
    assert_next_refresh_spends_the_new_token(fake_ml, env)


def test_a_raw_answer_left_by_a_refresher_is_replayed_through_the_same_reading(
    fake_ml: FakeMercadoLibre, env: Path
) -> None:
    # What a refresher killed right after journaling an odd answer leaves behind.
    spent = mlauth.Secret(str(read_env_file(env)["ML_REFRESH_TOKEN"]))
    answer = spend_outside(fake_ml, spent.reveal()).json()
    answer.update(expires_in="abc", token_type="mac", access_token=["not", "usable"])
    journal = Journal(os.path.realpath(env))
    journal.intent(spent)
    journal.raw(
        {
            "kind": "raw",
            "spent": spent.fingerprint,
            "grant": "refresh_token",
            "started": time.time(),
            "at": time.time(),
            "by": "pid 1@crashed",
            "body": json.dumps(answer),
        }
    )
    fake_ml.reset_stats()
    response = get(fake_ml, mlauth.MLAuth.from_env(env))
    assert response.status_code == 200
    # Replayed (the refresh token), then refreshed once for an access token with it.
    assert fake_ml.stats()["refreshes"] == 1 and fake_ml.stats()["invalid_grant"] == 0
    assert Path(journal.path).read_bytes() == b""
    assert_next_refresh_spends_the_new_token(fake_ml, env)


# -- a kept record's own fields are input too (a journal line, a Redis hash's answer field) --

RECORD_BODY = json.dumps(
    {
        "access_token": "APP_USR-1234567890123456-010101-fakerecordaccess0000-8035443",
        "refresh_token": "TG-fakerecordrefresh000000000-8035443",
        "expires_in": 21600,
    }
)


@pytest.mark.parametrize(
    "started",
    [10**400, 1e300, -1e300, -5, float("nan"), "1700000000", True, None],
    ids=["huge-int", "huge", "negative-huge", "negative", "nan", "string", "bool", "null"],
)
def test_a_records_start_that_is_no_time_counts_the_expiry_from_its_arrival(
    started: object,
) -> None:
    at = 1_700_000_000.0
    record = {"kind": "raw", "grant": "refresh_token", "body": RECORD_BODY, "at": at}
    record["started"] = started
    found = tokens_of(record, None)
    assert isinstance(found, TokenSet)
    assert (found.refreshed_at, found.expires_at) == (at, at + 21600)


@pytest.mark.parametrize("at", [10**400, 1e300, None], ids=["huge-int", "huge", "null"])
def test_a_record_with_no_usable_time_at_all_gives_an_unknown_expiry(at: object) -> None:
    record = {"kind": "raw", "grant": "refresh_token", "body": RECORD_BODY}
    record.update(started=at, at=at)
    found = tokens_of(record, None)
    assert isinstance(found, TokenSet) and found.access_token is not None
    assert found.expires_at is None and found.refreshed_at is None


def test_an_expiry_past_the_latest_time_a_store_keeps_is_unknown() -> None:
    record = {"kind": "raw", "grant": "refresh_token", "body": RECORD_BODY}
    record.update(started=LATEST_TIME - 1, at=LATEST_TIME - 1)
    found = tokens_of(record, None)
    assert isinstance(found, TokenSet)
    assert found.refreshed_at == LATEST_TIME - 1 and found.expires_at is None


@pytest.mark.parametrize(
    "by",
    ["pid 1@host\rML_REFRESH_TOKEN=planted", "pid 1\n", "\x1b[2J", "x" * 301, 7, ""],
    ids=["cr", "lf", "escape", "long", "number", "empty"],
)
def test_a_records_writer_that_no_process_could_be_is_not_saved(by: object) -> None:
    record = {"kind": "raw", "grant": "refresh_token", "body": RECORD_BODY, "by": by}
    found = tokens_of(record, None)
    assert isinstance(found, TokenSet) and found.refreshed_by is None


def test_a_records_writer_is_saved_as_who_refreshed() -> None:
    record = {"kind": "raw", "grant": "refresh_token", "body": RECORD_BODY, "by": "pid 7@web-1"}
    found = tokens_of(record, None)
    assert isinstance(found, TokenSet) and found.refreshed_by == "pid 7@web-1"
