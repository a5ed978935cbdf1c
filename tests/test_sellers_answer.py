"""The seller a token answer is for (issue 20): read from ``user_id``, else the tokens'
suffix; an answer for another seller than the chain's is refused before it is saved."""

from __future__ import annotations

import json
from collections.abc import Hashable

import pytest

from mlauth import Secret, TokenSet, WrongSellerError
from mlauth.answers import answer_of, read_answer
from mlauth.errors import ConfigError
from mlauth.stores.base import TokenStore, check_seller
from mlauth.stores.sellers import check_user_id
from mlauth.tokens import seller_of, user_id_of


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (8035443, "8035443"),
        ("8035443", "8035443"),
        (True, None),
        (0, None),
        (-5, None),
        ("", None),
        ("0123", None),
        ("12 3", None),
        ("123\n", None),
        (1.5, None),
        ([1], None),
        ({"id": 1}, None),
        (None, None),
        ("9" * 21, None),
    ],
)
def test_user_id_of_takes_a_positive_integer_or_its_digits_only(
    value: object, expected: str | None
) -> None:
    assert user_id_of(value) == expected


def _answer(**fields: object) -> bytes:
    body = {
        "access_token": "APP_USR-fake-access-111",
        "refresh_token": "TG-fake-refresh-111",
        "expires_in": 21600,
        "token_type": "bearer",
    }
    body.update(fields)
    return json.dumps(body).encode()


def test_the_answers_user_id_reaches_the_token_answer() -> None:
    answer = answer_of(read_answer(_answer(user_id=222)))
    assert not isinstance(answer, str)
    assert answer.user_id == "222"
    assert answer_of(read_answer(_answer(user_id="not a number"))).user_id is None  # type: ignore[union-attr]


def test_seller_of_prefers_the_answer_then_the_refresh_tokens_suffix() -> None:
    tokens = TokenSet(Secret("APP_USR-fake-access-333"), Secret("TG-fake-refresh-444"))
    assert seller_of(tokens) == "444"
    assert seller_of(TokenSet(Secret("APP_USR-fake-access-333"), None)) == "333"
    assert seller_of(TokenSet(Secret("fake-access"), Secret("fake-refresh"))) is None
    named = TokenSet(Secret("a-1"), Secret("r-2"), user_id="555")
    assert seller_of(named) == "555"
    # user_id is not part of equality: a store that does not keep it reads the same link
    assert named == TokenSet(Secret("a-1"), Secret("r-2"))


class _Seller(TokenStore):
    location = "memory"

    def __init__(self, seller: str | None) -> None:
        self.seller = seller

    def stamp(self) -> Hashable:
        return None

    def load(self) -> tuple[TokenSet, Hashable]:
        raise NotImplementedError

    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        check_seller(self, tokens)
        return None

    def check_writable(self) -> None:
        return None

    def lock(self, timeout: float):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_check_seller_refuses_another_sellers_tokens_and_names_both_without_a_token() -> None:
    other = TokenSet(Secret("APP_USR-fake-access-999"), Secret("TG-fake-refresh-999"))
    with pytest.raises(WrongSellerError) as caught:
        _Seller("111").save(other)
    assert (caught.value.expected, caught.value.found) == ("111", "999")
    assert "999" in str(caught.value) and "111" in str(caught.value)
    assert "TG-fake-refresh" not in str(caught.value)
    _Seller("999").save(other)  # the right seller
    _Seller(None).save(other)  # a one-seller store takes whoever's tokens it is given
    _Seller("111").save(TokenSet(Secret("fake-access"), Secret("fake-refresh")))  # names none


@pytest.mark.parametrize("bad", ["", "abc", "0", "-1", True, None, 1.0, "1" * 25])
def test_check_user_id_names_the_problem(bad: object) -> None:
    with pytest.raises(ConfigError, match="not a seller's user id"):
        check_user_id(bad, "here")
    assert check_user_id(42, "here") == "42"
