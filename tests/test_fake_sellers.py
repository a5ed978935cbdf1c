"""The fake MercadoLibre serves many sellers of one app, each with a chain of their own.

One app, many users who authorized it (MercadoLibre's ``/applications/{id}/grants``), one
single-use rotating chain per user. The many-sellers store is tested against this fake, so its
rules are proven here first, with plain ``requests`` over real loopback sockets: a chain and
its answers belong to one user, refreshing or revoking one user touches no other, the API
answers each token's own user, and refreshes are counted per user.
"""

from __future__ import annotations

import concurrent.futures
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.hostile_answers import spend_outside

ALICE, BOB, CAROL = 111_000_001, 222_000_002, 333_000_003
REDIRECT = "https://example.invalid/cb"


def api(
    fake: FakeMercadoLibre, token: object | None, path: str = "/users/me", **params: object
) -> requests.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return requests.get(fake.base_url + path, headers=headers, params=params, timeout=10)


def grants(fake: FakeMercadoLibre, token: object, **params: object) -> requests.Response:
    return api(fake, token, f"/applications/{fake.client_id}/grants", **params)


def assert_belongs_to(answer: dict[str, object], user: int, client_id: str) -> None:
    """A token answer of ``user``'s chain: its ``user_id`` and both tokens name that user."""
    assert answer["user_id"] == user
    access = re.fullmatch(
        rf"APP_USR-{client_id}-\d{{6}}-[0-9a-f]{{32}}-(\d+)", answer["access_token"]
    )
    refresh_token = re.fullmatch(r"TG-[0-9a-f]{24}-(\d+)", str(answer["refresh_token"]))
    assert access is not None and refresh_token is not None, answer
    assert int(access.group(1)) == int(refresh_token.group(1)) == user


def test_each_chain_belongs_to_its_user_from_issue_through_every_refresh(
    fake_ml: FakeMercadoLibre,
) -> None:
    default = fake_ml.issue_tokens()
    assert_belongs_to(default, 8035443, fake_ml.client_id)
    chains = {user: fake_ml.issue_tokens(user_id=user) for user in (ALICE, BOB)}
    for _ in range(3):
        for user, tokens in chains.items():
            assert_belongs_to(tokens, user, fake_ml.client_id)
            answer = spend_outside(fake_ml, str(tokens["refresh_token"]))
            assert answer.status_code == 200
            chains[user] = answer.json()
    for user, tokens in chains.items():
        assert_belongs_to(tokens, user, fake_ml.client_id)


def test_an_authorization_code_starts_a_chain_for_the_user_who_said_yes(
    fake_ml: FakeMercadoLibre,
) -> None:
    code = fake_ml.issue_authorization_code(REDIRECT, user_id=CAROL)
    assert code.endswith(f"-{CAROL}")
    data = {
        "grant_type": "authorization_code",
        "client_id": fake_ml.client_id,
        "client_secret": fake_ml.client_secret,
        "code": code,
        "redirect_uri": REDIRECT,
    }
    answer = requests.post(fake_ml.token_url, data=data, timeout=10)
    assert answer.status_code == 200
    assert_belongs_to(answer.json(), CAROL, fake_ml.client_id)
    assert fake_ml.grants() == [CAROL]


def test_refreshing_one_user_never_kills_another_users_tokens(fake_ml: FakeMercadoLibre) -> None:
    alice = fake_ml.issue_tokens(user_id=ALICE)
    bob = fake_ml.issue_tokens(user_id=BOB)
    for _ in range(3):
        answer = spend_outside(fake_ml, str(alice["refresh_token"]))
        assert answer.status_code == 200
        alice = answer.json()
        # The rotation killed Alice's previous access token; Bob's chain is untouched.
        assert api(fake_ml, bob["access_token"]).status_code == 200
        assert fake_ml.is_live(str(bob["refresh_token"]))
    assert spend_outside(fake_ml, str(bob["refresh_token"])).status_code == 200


def test_users_me_answers_the_user_of_the_token_sent(fake_ml: FakeMercadoLibre) -> None:
    tokens = {user: fake_ml.issue_tokens(user_id=user) for user in (ALICE, BOB)}
    tokens[8035443] = fake_ml.issue_tokens()
    for user, chain in tokens.items():
        answer = api(fake_ml, chain["access_token"])
        assert answer.status_code == 200
        assert answer.json()["user_id"] == user
        assert answer.json()["path"] == "/users/me"


def test_grants_lists_every_user_who_authorized_the_app_to_any_of_them(
    fake_ml: FakeMercadoLibre,
) -> None:
    chains = [fake_ml.issue_tokens(user_id=user) for user in (ALICE, BOB, CAROL)]
    fake_ml.issue_tokens(user_id=ALICE)  # a second authorization: still one grant
    for chain in chains:
        answer = grants(fake_ml, chain["access_token"])
        assert answer.status_code == 200
        body = answer.json()
        assert body["paging"] == {"total": 3, "limit": 50, "offset": 0}
        assert [grant["user_id"] for grant in body["grants"]] == [ALICE, BOB, CAROL]
        for grant in body["grants"]:
            assert grant["app_id"] == int(fake_ml.client_id)
            assert set(grant["scopes"]) == {"offline_access", "read", "write"}
            assert re.fullmatch(
                r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000[+-]\d\d:\d\d", grant["date_created"]
            )
    assert fake_ml.grants() == [ALICE, BOB, CAROL]


def test_grants_come_a_page_at_a_time(fake_ml: FakeMercadoLibre) -> None:
    users = [500_000 + n for n in range(7)]
    token = [fake_ml.issue_tokens(user_id=user) for user in users][-1]["access_token"]
    seen: list[int] = []
    for offset in range(0, 7, 3):
        body = grants(fake_ml, token, offset=offset, limit=3).json()
        assert body["paging"] == {"total": 7, "limit": 3, "offset": offset}
        seen += [grant["user_id"] for grant in body["grants"]]
    assert seen == users
    for bad in ({"limit": 0}, {"limit": "x"}, {"offset": -1}):
        assert grants(fake_ml, token, **bad).status_code == 400


def test_grants_of_another_app_is_404_and_without_a_live_token_401(
    fake_ml: FakeMercadoLibre,
) -> None:
    tokens = fake_ml.issue_tokens(user_id=ALICE)
    other = api(fake_ml, tokens["access_token"], "/applications/999999/grants")
    assert other.status_code == 404
    assert other.json()["status"] == 404
    assert grants(fake_ml, None).status_code == 401
    assert grants(fake_ml, "APP_USR-not-a-token").status_code == 401
    assert spend_outside(fake_ml, str(tokens["refresh_token"])).status_code == 200
    assert grants(fake_ml, tokens["access_token"]).status_code == 401  # died at rotation


def test_revoking_one_users_refresh_tokens_leaves_the_others_alive(
    fake_ml: FakeMercadoLibre,
) -> None:
    alice = fake_ml.issue_tokens(user_id=ALICE)
    second_alice = fake_ml.issue_tokens(user_id=ALICE)
    bob = fake_ml.issue_tokens(user_id=BOB)
    fake_ml.revoke_refresh_tokens(ALICE)

    assert spend_outside(fake_ml, str(alice["refresh_token"])).status_code == 400
    assert spend_outside(fake_ml, str(second_alice["refresh_token"])).status_code == 400
    assert spend_outside(fake_ml, str(bob["refresh_token"])).status_code == 200
    # A password change: the access token lives until it expires, and the grant stays.
    assert api(fake_ml, alice["access_token"]).status_code == 200
    assert fake_ml.grants() == [ALICE, BOB]
    # A chain issued after the revocation works.
    assert spend_outside(fake_ml, str(fake_ml.issue_tokens(user_id=ALICE)["refresh_token"])).ok


def test_revoking_every_users_refresh_tokens_is_the_default(fake_ml: FakeMercadoLibre) -> None:
    chains = [fake_ml.issue_tokens(user_id=user) for user in (ALICE, BOB)]
    fake_ml.revoke_refresh_tokens()
    assert [
        spend_outside(fake_ml, str(chain["refresh_token"])).status_code for chain in chains
    ] == [400, 400]
    assert fake_ml.stats()["invalid_grant"] == 2


def test_a_user_who_removes_the_app_loses_every_token_and_the_grant(
    fake_ml: FakeMercadoLibre,
) -> None:
    alice = fake_ml.issue_tokens(user_id=ALICE)
    bob = fake_ml.issue_tokens(user_id=BOB)
    fake_ml.revoke_grant(ALICE)

    assert api(fake_ml, alice["access_token"]).status_code == 401
    assert spend_outside(fake_ml, str(alice["refresh_token"])).status_code == 400
    assert api(fake_ml, bob["access_token"]).status_code == 200
    body = grants(fake_ml, bob["access_token"]).json()
    assert [grant["user_id"] for grant in body["grants"]] == [BOB]


def test_refreshes_are_counted_per_user_and_add_up_to_the_total(
    fake_ml: FakeMercadoLibre,
) -> None:
    chains = {user: fake_ml.issue_tokens(user_id=user) for user in (ALICE, BOB, CAROL)}
    spent = chains[ALICE]["refresh_token"]
    for user, times in ((ALICE, 3), (BOB, 1)):
        for _ in range(times):
            chains[user] = spend_outside(fake_ml, str(chains[user]["refresh_token"])).json()
    assert spend_outside(fake_ml, spent).status_code == 400  # a failed refresh counts for nobody

    assert fake_ml.refreshes_by_user() == {ALICE: 3, BOB: 1}
    assert sum(fake_ml.refreshes_by_user().values()) == fake_ml.stats()["refreshes"] == 4
    fake_ml.reset_stats()
    assert fake_ml.refreshes_by_user() == {}


def test_concurrent_refreshes_of_many_users_never_cross_chains(
    fake_ml: FakeMercadoLibre,
) -> None:
    users = [700_000 + n for n in range(1000)]
    first = {user: fake_ml.issue_tokens(user_id=user) for user in users}
    picked = random.Random(20).sample(users, 40)

    def walk(user: int) -> None:
        tokens = first[user]
        for _ in range(4):
            answer = spend_outside(fake_ml, str(tokens["refresh_token"]))
            assert answer.status_code == 200
            tokens = answer.json()
            assert_belongs_to(tokens, user, fake_ml.client_id)
            assert api(fake_ml, tokens["access_token"]).json()["user_id"] == user

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(walk, picked))
    assert fake_ml.refreshes_by_user() == dict.fromkeys(picked, 4)
    untouched = [user for user in users if user not in picked]
    assert all(fake_ml.is_live(str(first[user]["refresh_token"])) for user in untouched)
    assert grants(fake_ml, first[users[0]]["access_token"]).json()["paging"]["total"] == 1000


def test_write_env_writes_the_chain_of_the_user_asked(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    tokens = fake_ml.write_env(tmp_path / ".env", user_id=BOB)
    assert_belongs_to(tokens, BOB, fake_ml.client_id)
    assert read_env_file(tmp_path / ".env")["ML_REFRESH_TOKEN"] == tokens["refresh_token"]


@pytest.mark.parametrize("user_id", [0, -5, True, "8035443", 1.5])
def test_a_user_id_that_is_no_positive_int_is_refused(
    fake_ml: FakeMercadoLibre, user_id: object
) -> None:
    with pytest.raises(ValueError, match="user_id must be a positive int"):
        fake_ml.issue_tokens(user_id=user_id)  # type: ignore[arg-type]
    assert fake_ml.grants() == []


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_one_sellers_hanging_token_post_leaves_the_others_answered_at_once(
    fake_ml: FakeMercadoLibre,
) -> None:
    alice = fake_ml.issue_tokens(user_id=ALICE)
    bob = fake_ml.issue_tokens(user_id=BOB)
    code = fake_ml.issue_authorization_code(REDIRECT, user_id=ALICE)
    # Far longer than the test: it ends only because the test releases it.
    fake_ml.token_delay_for[ALICE] = 600.0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        hanging = pool.submit(spend_outside, fake_ml, str(alice["refresh_token"]))
        wait_until(lambda: fake_ml.token_requests_in_flight_for(ALICE) == 1, "Alice's POST")
        # Bob's refresh, and Bob's again on the new link, while Alice's still hangs.
        for _ in range(2):
            answer = spend_outside(fake_ml, str(bob["refresh_token"]))
            assert answer.status_code == 200
            bob = answer.json()
            assert_belongs_to(bob, BOB, fake_ml.client_id)
        assert not hanging.done()
        assert fake_ml.token_requests_in_flight_for(ALICE) == 1
        assert fake_ml.token_requests_in_flight_for(BOB) == 0
        assert fake_ml.refreshes_by_user() == {BOB: 2}
        # Alice's code exchange hangs too: the delay is the seller's, whatever the grant.
        exchange = pool.submit(
            requests.post,
            fake_ml.token_url,
            data={
                "grant_type": "authorization_code",
                "client_id": fake_ml.client_id,
                "client_secret": fake_ml.client_secret,
                "code": code,
                "redirect_uri": REDIRECT,
            },
            timeout=30,
        )
        wait_until(lambda: fake_ml.token_requests_in_flight_for(ALICE) == 2, "Alice's code")
        fake_ml.release_token_delays()
        answer = hanging.result(timeout=30)
        assert exchange.result(timeout=30).status_code == 200
    assert answer.status_code == 200  # released, it is processed like any other
    assert_belongs_to(answer.json(), ALICE, fake_ml.client_id)
    assert fake_ml.refreshes_by_user() == {ALICE: 1, BOB: 2}
    assert fake_ml.token_requests_in_flight_for(ALICE) == 0


def test_refresh_times_are_kept_per_user_in_order(fake_ml: FakeMercadoLibre) -> None:
    chains = {user: fake_ml.issue_tokens(user_id=user) for user in (ALICE, BOB)}
    before = time.time()
    for user in (ALICE, BOB, ALICE):
        chains[user] = spend_outside(fake_ml, str(chains[user]["refresh_token"])).json()
    times = fake_ml.refresh_times_by_user()
    assert sorted(times) == [ALICE, BOB] and len(times[ALICE]) == 2 and len(times[BOB]) == 1
    assert before <= times[ALICE][0] <= times[BOB][0] <= times[ALICE][1] <= time.time()
    assert sorted(times[ALICE] + times[BOB]) == fake_ml.refresh_times()
    fake_ml.reset_stats()
    assert fake_ml.refresh_times_by_user() == {}
