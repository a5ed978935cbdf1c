"""``mlauth sellers``: the table and the JSON document made from a store's rows, the schema
they follow, and the refresh token ``mlauth sellers add`` reads from standard input."""

from __future__ import annotations

import copy
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import jsonschema
import pytest

import mlauth
from mlauth.cli.sellers import (
    SCHEMA,
    Masker,
    document,
    read_refresh_token,
    render,
    store_kind,
    summary,
    table,
)
from mlauth.schemas import sellers_schema
from mlauth.secret import Secret
from mlauth.stores.sellers import FAILING, OK, REAUTHORIZE, SellerRow
from tests.support.sellers_json import VALIDATOR, valid

NOW = 1_796_000_000.0  # 2026-11-30: a fixed clock, so the words are known
SECRET = "fake-client-secret-for-the-sellers-table"
REFRESH = "TG-fakefakefakefakefake0123456789-8035443"


def rows() -> list[SellerRow]:
    return [
        SellerRow("8035443", NOW + 3600, NOW - 60, "pid 10@web1", OK),
        SellerRow(
            "12",
            NOW - 90,
            NOW - 7 * 3600,
            "pid 11@worker",
            FAILING,
            "503 from the token endpoint (3 tries)",
        ),
        SellerRow("987654321", None, None, None, REAUTHORIZE, None),
    ]


def masker() -> Masker:
    return Masker([Secret(SECRET), None])


# -- the schema --------------------------------------------------------------------------------


def test_the_shipped_schema_is_a_valid_closed_draft_2020_12_schema() -> None:
    schema = sellers_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    shipped = Path(mlauth.__file__).parent / "schemas" / "sellers.schema.json"
    assert json.loads(shipped.read_text()) == schema
    assert schema["properties"]["schema"] == {"const": SCHEMA} == {"const": "mlauth-sellers/1"}
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["seller"]["additionalProperties"] is False


def test_the_document_of_every_state_follows_the_schema() -> None:
    doc = valid(
        document(
            rows(), env=".env", location="/x/sellers.db", kind="sqlite", masker=masker(), now=NOW
        )
    )
    assert doc["schema"] == "mlauth-sellers/1" and doc["env"] == os.path.abspath(".env")
    assert doc["store"] == {"kind": "sqlite", "location": "/x/sellers.db"}
    assert doc["counts"] == {
        "total": 3,
        "ok": 1,
        "refresh_failing": 1,
        "reauthorization_required": 1,
    }
    ok, failing, dead = doc["sellers"]
    assert ok["user_id"] == "8035443" and ok["state"] == "ok" and ok["detail"] is None
    assert ok["seconds_left"] == 3600 and ok["expired"] is False
    assert ok["expires_at"] == {"unix": NOW + 3600, "utc": "2026-11-30T01:53:20Z"}
    assert ok["last_refresh"] == {
        "at": {"unix": NOW - 60, "utc": "2026-11-30T00:52:20Z"},
        "by": "pid 10@web1",
    }
    assert failing["state"] == "refresh_failing" and failing["expired"] is True
    assert failing["detail"] == "503 from the token endpoint (3 tries)"
    assert failing["seconds_left"] == -90
    # No reason kept by the store: the document still says why, as the schema requires.
    assert dead["state"] == "reauthorization_required" and "invalid_grant" in dead["detail"]
    assert dead["expires_at"] is None and dead["seconds_left"] is None and dead["expired"] is None
    assert dead["last_refresh"] == {"at": None, "by": None}


def test_an_empty_store_is_a_document_with_no_sellers() -> None:
    doc = valid(document([], env=".env", location="l", kind="redis", masker=masker(), now=NOW))
    assert doc["sellers"] == [] and doc["counts"]["total"] == 0


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(extra=1),
        lambda d: d["sellers"][0].update(token="x"),
        lambda d: d["sellers"][0].update(state="refresh failing"),
        lambda d: d["sellers"][0].update(user_id="08035443"),
        lambda d: d["sellers"][0].update(user_id=8035443),
        lambda d: d["sellers"][0].update(detail="ok needs no detail"),
        lambda d: d["sellers"][2].update(detail=None),
        lambda d: d["counts"].pop("refresh_failing"),
        lambda d: d["store"].update(kind="mysql"),
        lambda d: d.update(schema="mlauth-sellers/2"),
    ],
)
def test_the_schema_refuses_what_the_document_never_holds(change: object) -> None:
    doc = document(rows(), env=".env", location="l", kind="sqlite", masker=masker(), now=NOW)
    VALIDATOR.validate(doc)
    broken = copy.deepcopy(doc)
    change(broken)  # type: ignore[operator]
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(broken)


@pytest.mark.parametrize("stamp", [float("nan"), float("inf"), 1e300, -1e300])
def test_impossible_times_from_a_store_are_null_never_a_traceback(stamp: float) -> None:
    row = SellerRow("5", stamp, stamp, "pid 1@h", OK)
    doc = valid(document([row], env=".env", location="l", kind="sqlite", masker=masker(), now=NOW))
    text = render(doc)  # no NaN, no Infinity: strict JSON
    seller = json.loads(text)["sellers"][0]
    assert seller["expires_at"] is None and seller["last_refresh"]["at"] is None
    lines = table([row], masker=masker(), now=NOW)
    assert len(lines) == 2 and ("impossible" in lines[1] or "not a valid time" in lines[1])


def test_text_from_the_store_is_masked_and_escaped() -> None:
    hostile = SellerRow(
        "7",
        NOW + 10,
        NOW,
        f"pid 1@h \x1b[2J{SECRET}",
        FAILING,
        f"echoed refresh_token={REFRESH} and APP_USR-1234567890123456-010101-abcdef-7",
    )
    doc = document([hostile], env=".env", location="l", kind="sqlite", masker=masker(), now=NOW)
    text = render(valid(doc))
    lines = "\n".join(table([hostile], masker=masker(), now=NOW))
    for out in (text, lines):
        assert SECRET not in out and REFRESH not in out and "APP_USR-1234" not in out
        assert mlauth.fingerprint(SECRET) in out and mlauth.fingerprint(REFRESH) in out
        assert "\x1b" not in out
    assert "\\x1b[2J" in lines and "\\u001b[2J" in text


# -- the table ---------------------------------------------------------------------------------


def test_the_table_has_a_header_and_one_aligned_line_per_seller() -> None:
    lines = table(rows(), masker=masker(), now=NOW)
    assert len(lines) == 4
    header = lines[0]
    assert re.fullmatch(r"USER ID +EXPIRES +LAST REFRESH +BY +STATE", header)
    for column in ("EXPIRES", "LAST REFRESH", "BY", "STATE"):
        start = header.index(column)  # every line's cell starts under its header
        for line in lines[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " ", (column, line)
    ok, failing, dead = lines[1:]
    assert ok.startswith("8035443 ")
    assert "2026-11-30 01:53:20 UTC (in 1h00m)" in ok and "(1m00s ago)" in ok
    assert re.search(r"pid 10@web1 +ok\Z", ok)
    assert "(expired 1m30s ago)" in failing
    assert failing.endswith("refresh failing: 503 from the token endpoint (3 tries)")
    assert re.search(r"987654321 +unknown +unknown +- +re-authorization required: ", dead)
    assert all(line == line.rstrip() for line in lines)


def test_a_state_the_contract_does_not_know_is_shown_and_counted_as_the_worst() -> None:
    odd = SellerRow("3", None, None, None, "exploded", "why")
    assert "unknown state 'exploded': why" in table([odd], masker=masker(), now=NOW)[1]
    doc = valid(document([odd], env=".env", location="l", kind="other", masker=masker()))
    assert doc["sellers"][0]["state"] == "reauthorization_required"
    assert summary([odd], "l") == "1 seller in l: 1 re-authorization required"


def test_the_summary_counts_the_states_present() -> None:
    assert summary(rows(), "/x/s.db") == (
        "3 sellers in /x/s.db: 1 ok, 1 refresh failing, 1 re-authorization required"
    )
    assert summary(rows()[:1], "db") == "1 seller in db: 1 ok"


def test_the_masker_masks_each_text_once() -> None:
    calls = []
    masker_ = Masker([Secret(SECRET)])
    original = mlauth.cli.sellers.mask

    def counting(text: str, secrets: object = ()) -> str:
        calls.append(text)
        return original(text, secrets)  # type: ignore[arg-type]

    mlauth.cli.sellers.mask = counting  # type: ignore[assignment]
    try:
        for _ in range(1000):
            assert masker_(f"pid 1@h {SECRET}") == f"pid 1@h {mlauth.fingerprint(SECRET)}"
        assert masker_(None) is None
    finally:
        mlauth.cli.sellers.mask = original  # type: ignore[assignment]
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("sqlite:///sellers.db", "sqlite"),
        ("sqlite:////var/lib/app/sellers.db", "sqlite"),
        ("postgresql://u:p@h/db", "postgresql"),
        ("postgres://h/db", "postgresql"),
        ("redis://h:6379/0", "redis"),
        ("rediss://h/0", "redis"),
        ("unix:///run/redis.sock", "redis"),
        ("", "other"),
    ],
)
def test_the_store_kind_comes_from_the_url(url: str, kind: str) -> None:
    assert store_kind(url) == kind


# -- the refresh token on standard input -------------------------------------------------------


@pytest.fixture
def terminal() -> Iterator[TextIO]:
    """A real terminal (a pseudo-terminal's end), as an interactive shell gives stdin."""
    leader, follower = os.openpty()
    with open(follower, encoding="utf-8") as stream:
        yield stream
    os.close(leader)


def test_a_terminal_is_refused_before_anything_is_read(terminal: TextIO) -> None:
    with pytest.raises(mlauth.ConfigError) as caught:
        read_refresh_token(terminal)
    message = str(caught.value)
    assert "standard input is a terminal" in message
    assert "mlauth sellers add < refresh-token.txt" in message


def test_the_token_alone_on_stdin_is_read_stripped() -> None:
    token = read_refresh_token(io.StringIO(f"  {REFRESH}\n"))
    assert token.reveal() == REFRESH


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("", "nothing on standard input"),
        ("  \n\n", "nothing on standard input"),
        (f"{REFRESH}\n{REFRESH}\n", "more than one word"),
        (f"ML_REFRESH_TOKEN= {REFRESH}", "more than one word"),
        ("APP_USR-1234567890123456-010101-abcdef-8035443", "an access token"),
        (f"{REFRESH}\x00", "holds"),
        (f"'{REFRESH}'", "holds"),
        ("TG-" + "a" * 9000, "more than 8192 characters"),
    ],
)
def test_what_is_not_one_refresh_token_is_refused_without_quoting_it(given: str, said: str) -> None:
    with pytest.raises(mlauth.ConfigError) as caught:
        read_refresh_token(io.StringIO(given))
    message = str(caught.value)
    assert said in message and "mlauth sellers add <" in message
    assert REFRESH not in message and "APP_USR-1234" not in message and "aaaaaaaa" not in message


def test_no_stdin_at_all_is_refused() -> None:
    with pytest.raises(mlauth.ConfigError, match="nothing on standard input"):
        read_refresh_token(None)
