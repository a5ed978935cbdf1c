"""The Python API of many sellers (issue 20): ``mlauth.Sellers``, ``MLAuth.from_env(path,
seller=)`` and how a ``.env`` picks a seller, on SQLite and on a real PostgreSQL, against
the loopback fake."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

import mlauth
from mlauth import ConfigError, InvalidGrantError, Sellers
from mlauth.httpx import HttpxAuth
from mlauth.stores import select, store_from_env
from mlauth.stores.envfile import EnvFileStore, read_env_file
from mlauth.stores.redis_sellers import RedisSellers
from mlauth.stores.sellers import SellerStores
from mlauth.testing import FakeMercadoLibre
from tests.support.sql_sellers import Db

SELLERS = (111111, 222222, 333333)


@pytest.fixture
def fake() -> Iterator[FakeMercadoLibre]:
    with FakeMercadoLibre(token_lifetime=3600.0) as server:
        yield server


class Backend:
    """A store of many sellers as a .env names it, and as another process opens it."""

    def __init__(self, url: str, open_: Callable[[str], SellerStores]) -> None:
        self.url = url
        self.open = open_


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        return Backend(url, lambda client_id: RedisSellers(url, client_id=client_id))
    if request.param == "sqlite":  # beside the .env: a relative URL
        return Backend("sqlite:///sellers.db", Db("sqlite", str(tmp_path / "sellers.db")).open)
    db = Db("postgresql", request.getfixturevalue("postgres_url"))
    return Backend(db.spec, db.open)


def sellers_env(folder: Path, fake: FakeMercadoLibre, backend: Backend, **extra: str) -> Path:
    """An app's .env: its credentials and the store of many sellers, no tokens."""
    url = backend.url
    lines = [
        f"ML_CLIENT_ID={fake.client_id}",
        f"ML_CLIENT_SECRET={fake.client_secret}",
        f"ML_TOKEN_URL={fake.token_url}",
        f"ML_API_HOSTS={fake.host}",
        f"ML_TOKEN_STORE={url}",
        *(f"{key}={value}" for key, value in extra.items()),
    ]
    env = folder / ".env"
    env.write_text("\n".join(lines) + "\n")
    env.chmod(0o600)
    return env


def refresh_token(fake: FakeMercadoLibre, user_id: int) -> str:
    return str(fake.issue_tokens(user_id=user_id)["refresh_token"])


def whose(auth: requests.auth.AuthBase, fake: FakeMercadoLibre) -> int:
    answer = requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)
    assert answer.status_code == 200, answer.text
    found: int = answer.json()["user_id"]
    return found


@pytest.fixture(autouse=True)
def _stores_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every store of many sellers a test opened through a .env is closed after it (a
    PostgreSQL connection left to the garbage collector warns)."""
    opened: list[SellerStores] = []
    real = select.sellers_from_url

    def recorded(*args: Any, **kwargs: Any) -> SellerStores:
        stores = real(*args, **kwargs)
        opened.append(stores)
        return stores

    monkeypatch.setattr(select, "sellers_from_url", recorded)
    yield
    for stores in opened:
        stores.close()


@pytest.fixture
def app(tmp_path: Path, fake: FakeMercadoLibre, backend: Backend) -> Iterator[tuple[Path, Sellers]]:
    env = sellers_env(tmp_path, fake, backend)
    sellers = Sellers.from_env(env, backoff=0.001)
    yield env, sellers
    sellers.stores.close()


def test_sellers_added_from_refresh_tokens_each_act_as_themselves(
    app: tuple[Path, Sellers], fake: FakeMercadoLibre
) -> None:
    env, sellers = app
    for user in reversed(SELLERS):
        assert sellers.add(refresh_token(fake, user)) == str(user)
    assert sellers.ids() == [str(user) for user in SELLERS]
    assert fake.refreshes_by_user() == dict.fromkeys(SELLERS, 1)  # each proved once
    for user in SELLERS:
        assert whose(sellers.auth(user), fake) == user
    assert sellers.auth("222222") is sellers.auth(222222)  # built once, then the same
    # Another process of the app: from the .env, by seller.
    assert whose(mlauth.MLAuth.from_env(env, seller=333333), fake) == 333333
    # httpx, from the same Sellers and from the .env.
    with httpx.Client(auth=sellers.httpx_auth(111111)) as client:
        assert client.get(f"{fake.base_url}/users/me").json()["user_id"] == 111111
    with httpx.Client(auth=HttpxAuth.from_env(env, seller="222222")) as client:
        assert client.get(f"{fake.base_url}/users/me").json()["user_id"] == 222222
    assert fake.stats()["invalid_grant"] == 0


def test_from_env_without_a_seller_names_the_sellers_held_or_takes_the_only_one(
    app: tuple[Path, Sellers], fake: FakeMercadoLibre
) -> None:
    env, sellers = app
    # (An empty Redis may be a one-seller store as well: its message says how to fill it.)
    with pytest.raises(ConfigError, match=r"holds no seller yet|holds no tokens under"):
        mlauth.MLAuth.from_env(env)
    sellers.add(refresh_token(fake, 111111))
    assert whose(mlauth.MLAuth.from_env(env), fake) == 111111  # the only one
    sellers.add(refresh_token(fake, 222222))
    with pytest.raises(ConfigError, match=r"holds 2 sellers \(111111, 222222\); say which"):
        mlauth.MLAuth.from_env(env)
    with pytest.raises(ConfigError, match="444444"):
        mlauth.MLAuth.from_env(env, seller=444444)
    with pytest.raises(ConfigError, match="not a seller's user id"):
        mlauth.MLAuth.from_env(env, seller="../etc")


def test_the_envs_token_seller_is_the_default_seller(
    tmp_path: Path, fake: FakeMercadoLibre, backend: Backend
) -> None:
    env = sellers_env(tmp_path, fake, backend, ML_TOKEN_SELLER="222222")
    sellers = Sellers.from_env(env, backoff=0.001)
    for user in SELLERS:
        sellers.add(refresh_token(fake, user))
    assert whose(mlauth.MLAuth.from_env(env), fake) == 222222
    assert whose(mlauth.MLAuth.from_env(env, seller=111111), fake) == 111111  # named wins
    sellers.stores.close()


def test_a_dead_token_adds_no_seller_and_a_held_one_is_not_replaced(
    app: tuple[Path, Sellers], fake: FakeMercadoLibre
) -> None:
    _, sellers = app
    dead = refresh_token(fake, 111111)
    fake.revoke_refresh_tokens(111111)
    with pytest.raises(InvalidGrantError):
        sellers.add(dead)
    assert sellers.ids() == []
    live = refresh_token(fake, 111111)
    sellers.add(live)
    before = sellers.auth(111111).tokens
    with pytest.raises(ConfigError, match="111111"):
        sellers.add(refresh_token(fake, 111111))
    assert sellers.auth(111111).tokens == before
    with pytest.raises(ConfigError, match="does not end with a seller's user id"):
        sellers.add("TG-fake-token-with-no-user")
    with pytest.raises(ConfigError, match="not shown"):
        sellers.add("TG-fake\nline")


def test_a_seller_is_added_from_an_authorization_code_and_removed(
    app: tuple[Path, Sellers], fake: FakeMercadoLibre
) -> None:
    _, sellers = app
    redirect = "https://example.invalid/callback"
    code = fake.issue_authorization_code(redirect, user_id=222222)
    assert sellers.add_code(code, redirect) == "222222"
    assert whose(sellers.auth(222222), fake) == 222222
    assert sellers.remove(222222) is True
    assert sellers.remove(222222) is False
    assert sellers.ids() == []
    with pytest.raises(ConfigError):
        sellers.auth(222222)


def test_sellers_hold_no_secret_in_repr_and_refuse_pickling(
    app: tuple[Path, Sellers], fake: FakeMercadoLibre
) -> None:
    _, sellers = app
    token = refresh_token(fake, 111111)
    sellers.add(token)
    shown = repr(sellers) + repr(sellers.auth(111111)) + repr(sellers.rows())
    assert fake.client_secret not in shown
    assert token not in shown
    live = sellers.auth(111111).tokens
    assert live.refresh_token is not None and live.refresh_token.reveal() not in shown
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(sellers)


def test_a_one_seller_env_takes_its_own_seller_only(tmp_path: Path, fake: FakeMercadoLibre) -> None:
    env = tmp_path / ".env"
    fake.write_env(env, user_id=111111)
    assert whose(mlauth.MLAuth.from_env(env, seller=111111), fake) == 111111
    with pytest.raises(ConfigError, match="holds seller 111111's tokens, not seller 222222's"):
        mlauth.MLAuth.from_env(env, seller=222222)
    with pytest.raises(ConfigError, match="names no store of many sellers"):
        Sellers.from_env(env)


def test_an_env_with_its_own_refresh_token_and_a_sellers_store_is_refused(
    tmp_path: Path, fake: FakeMercadoLibre
) -> None:
    env = tmp_path / ".env"
    fake.write_env(env, extra={"ML_TOKEN_STORE": "sqlite:///sellers.db"})
    before = env.read_bytes()
    with pytest.raises(ConfigError, match="holds ML_REFRESH_TOKEN and names a store of many"):
        store_from_env(env)
    assert env.read_bytes() == before
    assert not (tmp_path / "sellers.db").exists()


def test_a_running_one_seller_process_follows_its_seller_into_the_store_of_many(
    tmp_path: Path, fake: FakeMercadoLibre, backend: Backend
) -> None:
    """What a migration leaves: the .env names the store and the seller, the tokens moved.
    A process already running on the file follows them there, to its own seller's chain."""
    env = tmp_path / ".env"
    fake.write_env(env, user_id=222222)
    running = mlauth.MLAuth.from_env(env, backoff=0.001)
    assert whose(running, fake) == 222222
    # The migration, by hand: the chain into the store (two other sellers there already),
    # then the file names the store and the seller, under its lock.
    stores = backend.open(fake.client_id)
    for user in (111111, 333333):
        stores.add(str(user), mlauth.TokenSet(None, mlauth.Secret(refresh_token(fake, user))))
    values = read_env_file(env)
    stores.add("222222", mlauth.TokenSet(None, mlauth.Secret(values["ML_REFRESH_TOKEN"] or "")))
    url = backend.url
    file = EnvFileStore(env)
    with file.file_lock(10):
        file.update_file(
            {
                "ML_TOKEN_STORE": url,
                "ML_TOKEN_SELLER": "222222",
                "ML_ACCESS_TOKEN": None,
                "ML_REFRESH_TOKEN": None,
                "ML_TOKEN_EXPIRES_AT": None,
            }
        )
    running.refresh()  # through the store it followed: seller 222222's row
    assert whose(running, fake) == 222222
    row = stores.rows(["222222"])[0]
    assert row.refreshed_at is not None
    assert "ML_REFRESH_TOKEN" not in read_env_file(env)  # never written into the file again
    assert fake.stats()["invalid_grant"] == 0
    stores.close()


def test_a_seller_whose_token_post_hangs_10s_holds_up_no_other_sellers_refresh(
    app: tuple[Path, Sellers], fake: FakeMercadoLibre
) -> None:
    """Issue 20's isolation figure: seller A's token POST hangs for 10 s; seller B's refresh
    (its token expired too) is made and answered while A's POST is still in flight."""
    _, sellers = app
    for user in (111111, 222222):
        sellers.add(refresh_token(fake, user))
    fake.token_delay_for[111111] = 10.0
    answers: dict[int, str] = {}

    def call(user: int) -> None:  # a refresh now, as at an expiry
        tokens = sellers.auth(user).refresh()
        assert tokens.refresh_token is not None
        answers[user] = tokens.refresh_token.reveal().rsplit("-", 1)[1]

    hanging = threading.Thread(target=call, args=(111111,))
    hanging.start()
    deadline = time.monotonic() + 30
    while fake.token_requests_in_flight_for(111111) == 0:  # a poll with a deadline
        assert time.monotonic() < deadline, "seller A's token POST never started"
        time.sleep(0.01)
    before = fake.refreshes_by_user().get(222222, 0)
    call(222222)  # in this thread, while A's POST hangs
    assert answers[222222] == "222222"
    assert whose(sellers.auth(222222), fake) == 222222
    assert fake.refreshes_by_user()[222222] == before + 1  # B refreshed...
    assert fake.token_requests_in_flight_for(111111) == 1  # ...while A's POST still hung
    fake.release_token_delays()
    hanging.join(30)
    assert answers[111111] == "111111"
    assert fake.stats()["invalid_grant"] == 0
