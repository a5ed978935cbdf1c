"""``mlauth sellers``, ``--seller`` and ``login``/``migrate`` with a store of many sellers, each
command a real process against the loopback fake, on SQLite (and Redis where it matters).
No command's stdout or stderr ever holds a token or the client secret."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlauth
from mlauth.stores.envfile import read_env_file
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from tests.support.cli import REDIRECT, assert_clean_failure, mlauth_cli
from tests.support.leaks import assert_no_secret
from tests.support.sellers_json import sellers_json
from tests.support.status_json import status_json

pytestmark = pytest.mark.processes

ALICE, BOB, CAROL = 111111, 222222, 333333


class App:
    """An app's .env naming a store of many sellers, and every secret the fake handed out
    for it (so that each command's output can be searched for them)."""

    def __init__(self, fake: FakeMercadoLibre, env: Path) -> None:
        self.fake = fake
        self.env = env
        self.secrets = [fake.client_secret]

    def refresh_token(self, user_id: int) -> str:
        tokens = self.fake.issue_tokens(user_id=user_id)
        self.secrets += [str(tokens["access_token"]), str(tokens["refresh_token"])]
        return str(tokens["refresh_token"])

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = mlauth_cli(*args, "--env", str(self.env), input=input)
        # `mlauth token` prints the access token: that is its whole job (and all it prints).
        self.check_quiet(done.stderr if args[0] == "token" else done.stdout + done.stderr)
        return done

    def add(self, user_id: int) -> str:
        done = self.run("sellers", "add", input=self.refresh_token(user_id) + "\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{user_id}\n"
        return done.stdout.strip()

    def check_quiet(self, text: str) -> None:
        """Nothing a command printed holds a token or the secret (those issued by the fake,
        and those the store holds now)."""
        for user_id in self.fake.grants():
            self.secrets += self.stored(str(user_id))
        assert_no_secret(text, self.secrets, "the command's output")

    def stored(self, user_id: str) -> list[str]:
        try:
            stores = mlauth.stores.sellers_from_env(self.env)
        except mlauth.ConfigError:
            return []
        try:
            if user_id not in stores.sellers():
                return []
            tokens = stores.store(user_id).load()[0]
        finally:
            stores.close()
        return [t.reveal() for t in (tokens.access_token, tokens.refresh_token) if t]


def sellers_env(folder: Path, fake: FakeMercadoLibre, url: str = "sqlite:///sellers.db") -> Path:
    env = folder / ".env"
    env.write_text(
        f"ML_CLIENT_ID={fake.client_id}\n"
        f"ML_CLIENT_SECRET={fake.client_secret}\n"
        f"ML_TOKEN_URL={fake.token_url}\n"
        f"ML_AUTH_URL={fake.base_url}\n"
        f"ML_API_HOSTS={fake.host}\n"
        f"ML_TOKEN_STORE={url}\n"
    )
    env.chmod(0o600)
    return env


@pytest.fixture
def app(fake_ml: FakeMercadoLibre, tmp_path: Path) -> App:
    return App(fake_ml, sellers_env(tmp_path, fake_ml))


# -- sellers, sellers add, sellers remove --------------------------------------------------------


def test_sellers_added_on_stdin_are_listed_as_a_table_and_a_document(app: App) -> None:
    empty = app.run("sellers")
    assert empty.returncode == 0, empty.stderr
    assert "no sellers in" in empty.stdout and "mlauth sellers add" in empty.stdout
    for user_id in (BOB, ALICE):
        app.add(user_id)
    assert app.fake.refreshes_by_user() == {ALICE: 1, BOB: 1}  # each proven by one refresh

    table = app.run("sellers")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["USER", "ID", "EXPIRES", "LAST", "REFRESH", "BY", "STATE"]
    assert lines[1].startswith(f"{ALICE} ") and lines[2].startswith(f"{BOB} ")  # numeric order
    for line in lines[1:3]:
        assert re.search(r" UTC \(in 5h5\dm\) ", line) and line.endswith(" ok"), line
        assert "pid " in line
    assert lines[3].startswith("2 sellers in ") and lines[3].endswith(": 2 ok")

    done, doc = sellers_json("--env", str(app.env))
    app.check_quiet(done.stdout + done.stderr)
    assert doc["store"]["kind"] == "sqlite"
    assert doc["store"]["location"].endswith("sellers.db")
    assert doc["counts"] == {
        "total": 2,
        "ok": 2,
        "refresh_failing": 0,
        "reauthorization_required": 0,
    }
    assert [s["user_id"] for s in doc["sellers"]] == [str(ALICE), str(BOB)]
    assert all(s["state"] == "ok" and s["expired"] is False for s in doc["sellers"])
    assert all(s["last_refresh"]["by"].startswith("pid ") for s in doc["sellers"])


def test_a_seller_whose_chain_died_shows_in_the_table_and_the_document(app: App) -> None:
    app.add(ALICE)
    app.add(BOB)
    app.fake.revoke_refresh_tokens(BOB)
    refresh = app.run("refresh", "--seller", str(BOB))
    assert_clean_failure(refresh, 3)
    assert f"--seller {BOB}" in refresh.stderr  # the fix names the seller

    table = app.run("sellers")
    bob = next(line for line in table.stdout.splitlines() if line.startswith(f"{BOB} "))
    assert "re-authorization required" in bob
    assert "1 must authorize the app again" in table.stdout
    _, doc = sellers_json("--env", str(app.env))
    states = {s["user_id"]: s["state"] for s in doc["sellers"]}
    assert states == {str(ALICE): "ok", str(BOB): "reauthorization_required"}
    assert doc["counts"]["reauthorization_required"] == 1
    # Alice goes on.
    assert app.run("refresh", "--seller", str(ALICE)).returncode == 0


def test_sellers_add_refuses_a_terminal_and_the_wrong_input_before_spending_anything(
    app: App,
) -> None:
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mlauth", "sellers", "add", "--env", str(app.env)],
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert_clean_failure(done, 1)
    assert "standard input is a terminal" in done.stderr
    token = app.refresh_token(ALICE)
    wrong_seller = app.run("sellers", "add", "--seller", str(BOB), input=token)
    assert_clean_failure(wrong_seller, 1)
    assert f"seller {ALICE}'s" in wrong_seller.stderr
    for bad in ("", f"{token} {token}", "APP_USR-1-2-3-111111"):
        assert_clean_failure(app.run("sellers", "add", input=bad), 1)
    assert app.fake.stats()["token_requests"] == 0
    assert app.fake.is_live(token)


def test_sellers_add_of_a_dead_token_saves_nothing_and_a_held_seller_is_kept(app: App) -> None:
    app.add(ALICE)
    dead = app.refresh_token(BOB)
    app.fake.revoke_refresh_tokens(BOB)
    done = app.run("sellers", "add", input=dead)
    assert_clean_failure(done, 1)
    assert "refused the refresh token" in done.stderr and "Nothing was saved" in done.stderr
    again = app.run("sellers", "add", input=app.refresh_token(ALICE))
    assert_clean_failure(again, 1)
    assert f"holds seller {ALICE} already" in again.stderr
    assert app.fake.refreshes_by_user() == {ALICE: 1}  # the second token was never spent
    _, doc = sellers_json("--env", str(app.env))
    assert [s["user_id"] for s in doc["sellers"]] == [str(ALICE)]


def test_sellers_remove_forgets_one_seller(app: App) -> None:
    app.add(ALICE)
    app.add(BOB)
    done = app.run("sellers", "remove", str(ALICE))
    assert done.returncode == 0, done.stderr
    assert f"removed seller {ALICE}" in done.stdout
    _, doc = sellers_json("--env", str(app.env))
    assert [s["user_id"] for s in doc["sellers"]] == [str(BOB)]
    missing = app.run("sellers", "remove", str(ALICE))
    assert_clean_failure(missing, 1)
    assert f"seller {ALICE} is not in" in missing.stderr
    assert mlauth_cli("sellers", "remove", "not-a-number").returncode == 2


def test_sellers_of_an_env_without_a_store_of_many_says_how_to_make_one(
    fake_ml_env: Path,
) -> None:
    done = mlauth_cli("sellers", "--env", str(fake_ml_env))
    assert_clean_failure(done, 1)
    assert "names no store of many sellers" in done.stderr and "mlauth migrate" in done.stderr


def test_the_common_options_reach_the_nested_commands(app: App) -> None:
    folder = app.env.parent
    token = app.refresh_token(ALICE)
    # --env before the action (`sellers --env X add`) and after it both count; no flags: ./.env.
    first = subprocess.run(
        [sys.executable, "-m", "mlauth", "sellers", "--env", str(app.env), "add"],
        input=token,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    listed = mlauth_cli("sellers", cwd=folder)
    assert listed.returncode == 0 and listed.stdout.startswith("USER ID")


# -- --seller on the commands that act on one chain ---------------------------------------------


def test_one_seller_is_used_without_seller_and_several_need_it(app: App) -> None:
    app.add(ALICE)
    for command in ("status", "check", "token", "refresh"):
        done = app.run(command)
        assert done.returncode == 0, (command, done.stderr)
    _, doc = status_json("--env", str(app.env))
    assert doc["store"]["seller"] == str(ALICE) and doc["store"]["kind"] == "sqlite"

    app.add(BOB)
    for command in ("status", "check", "token", "refresh"):
        done = app.run(command)
        assert_clean_failure(done, 1)
        assert f"{ALICE}, {BOB}" in done.stderr and "--seller" in done.stderr, done.stderr
    before = app.fake.refreshes_by_user()
    token = app.run("token", "--seller", str(BOB))
    assert token.returncode == 0, token.stderr
    assert token.stdout.strip() in app.stored(str(BOB))
    refresh = app.run("refresh", "--seller", str(BOB))
    assert refresh.returncode == 0, refresh.stderr
    after = app.fake.refreshes_by_user()
    assert after[BOB] == before[BOB] + 1 and after[ALICE] == before[ALICE]
    status = app.run("status", "--seller", str(ALICE))
    assert f"seller:           {ALICE}" in status.stdout
    _, doc = status_json("--seller", str(BOB), "--env", str(app.env))
    assert doc["store"]["seller"] == str(BOB) and doc["state"] == "ok"
    unknown = app.run("status", "--seller", str(CAROL))
    assert_clean_failure(unknown, 1)
    assert str(CAROL) in unknown.stderr
    assert app.run("status", "--seller", "12x").returncode == 2


def test_seller_on_a_one_seller_env_must_be_its_seller(
    fake_ml: FakeMercadoLibre, fake_ml_env: Path
) -> None:
    own = str(fake_ml.user_id)
    assert mlauth_cli("status", "--env", str(fake_ml_env), "--seller", own).returncode == 0
    other = mlauth_cli("refresh", "--env", str(fake_ml_env), "--seller", str(ALICE))
    assert_clean_failure(other, 1)
    assert fake_ml.stats()["token_requests"] == 0


# -- login ----------------------------------------------------------------------------------------


def test_login_adds_the_seller_who_authorizes_and_replaces_a_dead_chain(app: App) -> None:
    for user_id in (ALICE, BOB):
        code = app.fake.issue_authorization_code(REDIRECT, user_id=user_id)
        done = app.run("login", "--redirect-uri", REDIRECT, "--code", code)
        assert done.returncode == 0, done.stderr
        assert f"seller {user_id}'s tokens saved" in done.stdout
    _, doc = sellers_json("--env", str(app.env))
    assert [s["user_id"] for s in doc["sellers"]] == [str(ALICE), str(BOB)]

    app.fake.revoke_refresh_tokens(ALICE)
    assert app.run("refresh", "--seller", str(ALICE)).returncode == 3
    code = app.fake.issue_authorization_code(REDIRECT, user_id=ALICE)
    again = app.run("login", "--redirect-uri", REDIRECT, "--code", code, "--seller", str(ALICE))
    assert again.returncode == 0, again.stderr
    _, doc = sellers_json("--env", str(app.env))
    assert {s["user_id"]: s["state"] for s in doc["sellers"]} == {str(ALICE): "ok", str(BOB): "ok"}
    assert app.run("refresh", "--seller", str(ALICE)).returncode == 0
    assert app.fake.stats()["invalid_grant"] == 1  # the revoked chain's, once


def test_login_of_another_seller_than_expected_saves_theirs_and_says_so(app: App) -> None:
    code = app.fake.issue_authorization_code(REDIRECT, user_id=BOB)
    done = app.run("login", "--redirect-uri", REDIRECT, "--code", code, "--seller", str(ALICE))
    assert_clean_failure(done, 1)
    assert f"seller {BOB} authorized the app, not seller {ALICE}" in done.stderr
    _, doc = sellers_json("--env", str(app.env))
    assert [s["user_id"] for s in doc["sellers"]] == [str(BOB)]  # the spent code's chain kept


# -- migrate ---------------------------------------------------------------------------------------


def test_migrate_moves_a_one_seller_env_into_sqlite_and_its_scripts_go_on(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600, extra={"PIPELINE": "keep me"})
    secrets = [
        fake_ml.client_secret,
        *(v for k, v in read_env_file(env).items() if "TOKEN" in k and v),
    ]
    auth = mlauth.MLAuth.from_env(env)  # a process running on the .env before the move
    done = mlauth_cli("migrate", "--env", str(env), "--to", "sqlite:///sellers.db")
    assert done.returncode == 0, done.stderr
    assert f"moved seller(s) {fake_ml.user_id}" in done.stdout
    assert_no_secret(done.stdout + done.stderr, secrets, "migrate")
    values = read_env_file(env)
    assert values["ML_TOKEN_STORE"] == "sqlite:///sellers.db" and values["PIPELINE"] == "keep me"
    assert values["ML_TOKEN_SELLER"] == str(fake_ml.user_id)
    assert "ML_REFRESH_TOKEN" not in values and (tmp_path / "sellers.db").is_file()
    # The scripts go on with no flag; the running process follows the move.
    assert mlauth_cli("refresh", "--env", str(env)).returncode == 0
    auth.refresh()
    _, doc = sellers_json("--env", str(env))
    assert [s["user_id"] for s in doc["sellers"]] == [str(fake_ml.user_id)]
    again = mlauth_cli("migrate", "--env", str(env), "--to", "sqlite:///sellers.db")
    assert again.returncode == 0 and "already migrated" in again.stdout
    assert fake_ml.stats()["invalid_grant"] == 0


def test_migrate_refuses_another_chain_of_the_seller_unless_forced(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    first, second = tmp_path / "a" / ".env", tmp_path / "b" / ".env"
    for env in (first, second):
        env.parent.mkdir()
        fake_ml.write_env(env)  # two chains of one seller
    database = f"sqlite:///{tmp_path}/sellers.db"  # an absolute path: sqlite:////tmp/...
    assert mlauth_cli("migrate", "--env", str(first), "--to", database).returncode == 0
    untouched = second.read_text()
    refused = mlauth_cli("migrate", "--env", str(second), "--to", database)
    assert_clean_failure(refused, 1)
    assert "already holds another chain of seller" in refused.stderr
    assert second.read_text() == untouched
    forced = mlauth_cli("migrate", "--env", str(second), "--to", database, "--force")
    assert forced.returncode == 0, forced.stderr
    assert mlauth_cli("refresh", "--env", str(second)).returncode == 0


def test_migrate_moves_every_seller_from_sqlite_to_redis(
    app: App, redis_server: RedisServer
) -> None:
    for user_id in (ALICE, BOB, CAROL):
        app.add(user_id)
    app.fake.revoke_refresh_tokens(CAROL)
    assert app.run("refresh", "--seller", str(CAROL)).returncode == 3
    held = {str(u): app.stored(str(u)) for u in (ALICE, BOB, CAROL)}
    running = mlauth.Sellers.from_env(app.env)  # a process started on SQLite
    running.auth(ALICE).valid_tokens()

    done = app.run("migrate", "--to", redis_server.url)
    assert done.returncode == 0, done.stderr
    assert f"moved seller(s) {ALICE}, {BOB}, {CAROL}" in done.stdout
    assert read_env_file(app.env)["ML_TOKEN_STORE"] == redis_server.url
    _, doc = sellers_json("--env", str(app.env))
    assert doc["store"]["kind"] == "redis"
    assert [s["user_id"] for s in doc["sellers"]] == [str(ALICE), str(BOB), str(CAROL)]
    for user_id, tokens in held.items():
        assert app.stored(user_id) == tokens  # the same chains, moved
    old = mlauth.stores.sellers.sellers_from_url(
        "sqlite:///sellers.db", read_env_file(app.env), str(app.env)
    )
    old.bind_client(app.fake.client_id)
    assert old.sellers() == []  # none left behind to be refreshed there
    old.close()
    asked = app.fake.stats()["token_requests"]
    with pytest.raises(mlauth.MLAuthError):  # it finds its seller gone, and spends nothing
        running.auth(ALICE).refresh()
    assert app.fake.stats()["token_requests"] == asked
    for user_id in (ALICE, BOB):
        assert app.run("refresh", "--seller", str(user_id)).returncode == 0
    assert app.fake.stats()["invalid_grant"] == 1  # Carol's, before the move


def test_migrate_between_stores_refuses_a_conflict_before_moving_anyone(
    app: App, fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    app.add(ALICE)
    app.add(BOB)
    (tmp_path / "other").mkdir()
    other = App(fake_ml, sellers_env(tmp_path / "other", fake_ml, f"sqlite:///{tmp_path}/b.db"))
    other.add(BOB)  # another chain of Bob's is there already
    target = read_env_file(other.env)["ML_TOKEN_STORE"]
    done = app.run("migrate", "--to", target)
    assert_clean_failure(done, 1)
    assert f"another chain of seller(s) {BOB}" in done.stderr
    _, doc = sellers_json("--env", str(app.env))
    assert [s["user_id"] for s in doc["sellers"]] == [str(ALICE), str(BOB)]  # nothing moved


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_migrate_moves_a_one_seller_env_into_postgresql_or_a_redis_of_many_sellers(
    fake_ml: FakeMercadoLibre, tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    if kind == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = request.getfixturevalue("redis_server").url
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    values = read_env_file(env)
    secrets = [fake_ml.client_secret, *(v for k, v in values.items() if "TOKEN" in k and v)]
    # Into Redis, --seller says "as a store of many sellers" (else the one-seller hash).
    seller = ["--seller", str(fake_ml.user_id)] if kind == "redis" else []
    done = mlauth_cli("migrate", "--env", str(env), "--to", url, *seller)
    assert done.returncode == 0, done.stderr
    assert_no_secret(done.stdout + done.stderr, secrets, "migrate")
    after = read_env_file(env)
    assert after["ML_TOKEN_SELLER"] == str(fake_ml.user_id) and "ML_REFRESH_TOKEN" not in after
    listed, doc = sellers_json("--env", str(env))
    assert_no_secret(listed.stdout, secrets, "sellers --json")
    assert doc["store"]["kind"] == kind
    assert [s["user_id"] for s in doc["sellers"]] == [str(fake_ml.user_id)]
    refreshed = mlauth_cli("refresh", "--env", str(env))
    assert refreshed.returncode == 0, refreshed.stderr
    assert fake_ml.stats()["invalid_grant"] == 0 and fake_ml.refreshes_by_user() == {
        fake_ml.user_id: 1
    }
