"""Odd token answers in the other places a chain lives: Redis, a .env written in place (its
journal in extended attributes), and ``mlauth login``'s code exchange.

Each keeps the raw answer before reading it, keeps whatever is usable, and keeps an answer
with no usable refresh token where a human can find it (the error and ``mlauth status`` say
where). The attribute journal of a ``.env`` mounted alone stays under its size limit however
many unusable answers arrive.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Hashable
from pathlib import Path

import pytest
import requests

import mlauth
import mlauth.endpoint
from mlauth.cli.login import complete_login
from mlauth.cli.migrate import migrate_to_redis
from mlauth.secret import Secret
from mlauth.stores import store_from_env
from mlauth.stores.envfile import read_env_file
from mlauth.stores.mounted import JOURNAL_ATTR, JOURNAL_BUDGET, InodeJournal
from mlauth.testing import FakeMercadoLibre
from mlauth.testing.redis_server import RedisServer
from mlauth.tokens import TokenSet
from tests.support.cli import mlauth_cli as cli
from tests.support.hostile_answers import DELETE, Mangle, assert_not_in, fields, raw, spend_outside

REDIRECT = "https://example.com/callback"


def get(fake: FakeMercadoLibre, auth: mlauth.MLAuth) -> requests.Response:
    return requests.get(f"{fake.base_url}/users/me", auth=auth, timeout=30)


# -- Redis -----------------------------------------------------------------------------------


@pytest.fixture
def redis_env(fake_ml: FakeMercadoLibre, tmp_path: Path, redis_server: RedisServer) -> Path:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 10)  # expired: the first call refreshes
    migrate_to_redis(env, redis_server.url)
    return env


def stored(server: RedisServer, fake: FakeMercadoLibre) -> dict[str, str]:
    with server.client() as client:
        values: dict[str, str] = client.hgetall(f"mlauth:{fake.client_id}:tokens")
    return values


def test_redis_keeps_both_tokens_of_an_odd_answer_and_clears_the_raw_one_at_commit(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    mangle = Mangle(fields(expires_in="abc", token_type=[1]))
    fake_ml.mangle_next_token_answers(1, mangle)
    assert get(fake_ml, mlauth.MLAuth.from_env(redis_env)).status_code == 200
    values = stored(redis_server, fake_ml)
    assert values["refresh_token"] == mangle.refresh_token and values["expires_at"] == ""
    assert "answer" not in values  # the commit replaced the hash whole
    mlauth.MLAuth.from_env(redis_env).refresh()
    assert fake_ml.stats()["invalid_grant"] == 0 and fake_ml.stats()["refreshes"] == 2


def test_redis_keeps_the_raw_answer_in_the_hash_before_it_is_read(
    fake_ml: FakeMercadoLibre,
    redis_env: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, str]] = []
    original = mlauth.endpoint.read_answer

    def reading(body: bytes) -> object:
        seen.append(stored(redis_server, fake_ml))
        return original(body)

    monkeypatch.setattr(mlauth.endpoint, "read_answer", reading)
    before = stored(redis_server, fake_ml)
    mangle = Mangle(fields(expires_in=-5))
    fake_ml.mangle_next_token_answers(1, mangle)
    assert get(fake_ml, mlauth.MLAuth.from_env(redis_env)).status_code == 200
    (at_reading,) = seen
    record = json.loads(at_reading["answer"])
    assert (record["chain"], record["generation"]) == (before["chain"], int(before["generation"]))
    assert json.loads(record["body"])["refresh_token"] == mangle.refresh_token


def test_redis_saves_a_refresh_token_alone_and_the_next_request_spends_it(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    mangle = Mangle(fields(access_token="APP_USR-x\r\nInjected: 1"))
    fake_ml.mangle_next_token_answers(1, mangle)
    auth = mlauth.MLAuth.from_env(redis_env)
    with pytest.raises(mlauth.RefreshError, match="no usable access token"):
        get(fake_ml, auth)
    values = stored(redis_server, fake_ml)
    assert values["refresh_token"] == mangle.refresh_token and values["access_token"] == ""
    assert get(fake_ml, auth).status_code == 200
    assert fake_ml.stats()["invalid_grant"] == 0 and fake_ml.stats()["refreshes"] == 2


def test_redis_keeps_an_answer_without_a_usable_refresh_token_and_status_shows_it(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    before = stored(redis_server, fake_ml)
    mangle = Mangle(fields(refresh_token=""))
    fake_ml.mangle_next_token_answers(1, mangle)
    with pytest.raises(mlauth.RefreshError) as caught:
        get(fake_ml, mlauth.MLAuth.from_env(redis_env))
    key = f"mlauth:{fake_ml.client_id}:tokens"
    assert f"kept in the answer field of {key}" in str(caught.value)
    values = stored(redis_server, fake_ml)
    assert {k: values[k] for k in before} == before  # nothing else changed
    assert json.loads(json.loads(values["answer"])["body"])["access_token"] == mangle.access_token
    done = cli("status", "--env", str(redis_env))
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("answer:")]
    assert "no usable refresh token (refresh_token is empty)" in row and key in row
    assert_not_in(done.stdout + done.stderr + str(caught.value), mangle.access_token)
    # The stored token is tried once more (it may be spent), and found dead: still kept.
    with pytest.raises(mlauth.InvalidGrantError):
        mlauth.MLAuth.from_env(redis_env).refresh()
    assert fake_ml.stats()["token_requests"] == 2
    assert "answer" in stored(redis_server, fake_ml)


def put_raw_answer(
    server: RedisServer,
    fake: FakeMercadoLibre,
    env: Path,
    *,
    generation_offset: int = 0,
    started: float | None = None,
) -> dict[str, object]:
    """What a holder killed after keeping its answer leaves in the hash; returns the answer."""
    values = stored(server, fake)
    spent = values["refresh_token"]
    answer: dict[str, object] = spend_outside(fake, spent).json()
    record = {
        "kind": "raw",
        "spent": Secret(spent).fingerprint,
        "grant": "refresh_token",
        "started": time.time() if started is None else started,
        "at": time.time(),
        "by": "pid 1@killed",
        "body": json.dumps({**answer, "expires_in": "odd"}),
        "chain": values["chain"],
        "generation": int(values["generation"]) + generation_offset,
    }
    with server.client() as client:
        client.hset(f"mlauth:{fake.client_id}:tokens", "answer", json.dumps(record))
    fake.reset_stats()
    return answer


def test_redis_replays_a_raw_answer_left_by_a_holder_that_died(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    answer = put_raw_answer(redis_server, fake_ml, redis_env)
    generation = int(stored(redis_server, fake_ml)["generation"])
    response = get(fake_ml, mlauth.MLAuth.from_env(redis_env))
    assert response.status_code == 200
    assert response.request.headers["Authorization"] == f"Bearer {answer['access_token']}"
    assert fake_ml.stats()["token_requests"] == 0  # replayed, nothing spent
    values = stored(redis_server, fake_ml)
    assert values["refresh_token"] == answer["refresh_token"] and "answer" not in values
    assert int(values["generation"]) == generation + 1  # committed with the fence


def test_redis_never_replays_an_answer_to_an_older_generation(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    put_raw_answer(redis_server, fake_ml, redis_env, generation_offset=-1)
    before = stored(redis_server, fake_ml)["refresh_token"]
    # The stored token was spent by the (fake) answer above: the refresh finds it dead.
    with pytest.raises(mlauth.InvalidGrantError):
        get(fake_ml, mlauth.MLAuth.from_env(redis_env))
    assert stored(redis_server, fake_ml)["refresh_token"] == before


@pytest.mark.parametrize("peer", ["committed", "lost the key"])
def test_a_holder_whose_chain_moved_on_never_writes_its_raw_answer_into_the_hash(
    fake_ml: FakeMercadoLibre,
    redis_env: Path,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    peer: str,
) -> None:
    store = store_from_env(redis_env)
    store.bind_client(fake_ml.client_id)
    transaction = store.transaction()
    refresh = transaction.tokens.refresh_token
    assert refresh is not None
    transaction.begin(refresh)
    # Meanwhile (this holder's lock lapsed while its POST hung) a peer moved the chain on and
    # keeps its own answer in the hash, or Redis lost the key.
    key = f"mlauth:{fake_ml.client_id}:tokens"
    with redis_server.client() as client:
        if peer == "committed":
            client.hincrby(key, "generation", 1)
            client.hset(key, "answer", '{"kind": "raw", "by": "the peer"}')
        else:
            client.delete(key)
    before = stored(redis_server, fake_ml)
    with caplog.at_level("ERROR", logger="mlauth"):
        transaction.answered(b'{"access_token": "late"}', started=time.time(), at=time.time())
    assert stored(redis_server, fake_ml) == before
    assert "moved on while the token endpoint answered" in caplog.text
    assert transaction.answer_kept is None


def test_a_kept_answer_with_a_huge_start_is_replayed_and_the_hash_stays_readable(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    answer = put_raw_answer(redis_server, fake_ml, redis_env, started=1e300)
    response = get(fake_ml, mlauth.MLAuth.from_env(redis_env))
    assert response.request.headers["Authorization"] == f"Bearer {answer['access_token']}"
    values = stored(redis_server, fake_ml)
    # Counted from the answer's arrival ("at"); its expires_in is odd: an unknown expiry.
    assert 0 < float(values["refreshed_at"]) <= time.time() and values["expires_at"] == ""
    mlauth.MLAuth.from_env(redis_env).refresh()  # the hash reads back, and the chain lives
    assert fake_ml.stats()["invalid_grant"] == 0


def test_an_odd_hash_field_is_named_with_its_article(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    with redis_server.client() as client:
        client.hset(f"mlauth:{fake_ml.client_id}:tokens", "expires_at", "1e300")
    with pytest.raises(mlauth.StoreError, match="has an expires_at that "):
        mlauth.MLAuth.from_env(redis_env)


def test_a_hash_without_a_generation_still_keeps_the_raw_answer_before_it_is_read(
    fake_ml: FakeMercadoLibre,
    redis_env: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # load() reads a missing generation as 0 and the commit lands on it: the fence must too.
    with redis_server.client() as client:
        client.hdel(f"mlauth:{fake_ml.client_id}:tokens", "generation")
    seen: list[dict[str, str]] = []
    original = mlauth.endpoint.read_answer

    def reading(body: bytes) -> object:
        seen.append(stored(redis_server, fake_ml))
        return original(body)

    monkeypatch.setattr(mlauth.endpoint, "read_answer", reading)
    with caplog.at_level("ERROR", logger="mlauth"):
        assert get(fake_ml, mlauth.MLAuth.from_env(redis_env)).status_code == 200
    assert "could not keep the raw token answer" not in caplog.text
    (at_reading,) = seen
    assert "answer" in at_reading, "the raw answer was not in the hash when it was read"


def test_a_generation_that_cannot_grow_is_refused_before_anything_is_spent_or_seeded(
    fake_ml: FakeMercadoLibre, redis_env: Path, redis_server: RedisServer
) -> None:
    # A commit writes generation + 1: from 15 nines that has 16 digits, which no read accepts.
    key = f"mlauth:{fake_ml.client_id}:tokens"
    with redis_server.client() as client:
        client.hset(key, "generation", "9" * 15)
    before = stored(redis_server, fake_ml)
    fake_ml.reset_stats()
    with pytest.raises(mlauth.StoreError, match=rf"nothing was sent\. .*HSET {key} generation N"):
        mlauth.MLAuth.from_env(redis_env).refresh()
    assert fake_ml.stats()["token_requests"] == 0
    store = store_from_env(redis_env)  # what `mlauth migrate --force` seeds through
    store.bind_client(fake_ml.client_id)
    with pytest.raises(mlauth.StoreError, match="nothing was written"):
        store.seed(TokenSet(None, Secret("TG-fake-seeded-0000")), replace=True)
    assert stored(redis_server, fake_ml) == before


# -- a .env written in place: the journal in an extended attribute --------------------------


@pytest.fixture
def in_place_env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    env = tmp_path / ".env"
    # What a host process sharing a .env with containers that mount it alone sets.
    fake_ml.write_env(env, expires_at=time.time() - 10, extra={"ML_ENV_WRITE": "in-place"})
    return env


def attribute(env: Path) -> bytes:
    try:
        return os.getxattr(env, JOURNAL_ATTR)
    except OSError:
        return b""


def test_the_attribute_journal_stays_under_its_limit_through_many_unusable_answers(
    fake_ml: FakeMercadoLibre, in_place_env: Path
) -> None:
    sizes = []
    for _ in range(40):
        # A broken proxy answers 200 without processing the grant: the token stays live,
        # each refresh tries it once more and journals one more unusable answer.
        fake_ml.fail_next_token_requests(1, status=200, body="<html>" + "x" * 400 + "</html>")
        with pytest.raises(mlauth.RefreshError, match="unusable body"):
            mlauth.MLAuth.from_env(in_place_env).refresh()
        sizes.append(len(attribute(in_place_env)))
    assert max(sizes) <= JOURNAL_BUDGET
    records = [json.loads(line) for line in attribute(in_place_env).splitlines()]
    (kept,) = [r for r in records if r["kind"] == "raw"]  # the newest only
    assert "x" * 400 in kept["body"]
    # The chain is intact: the next good answer is saved and the journal emptied.
    mlauth.MLAuth.from_env(in_place_env).refresh()
    assert fake_ml.stats()["invalid_grant"] == 0 and attribute(in_place_env) == b""
    assert fake_ml.is_live(read_env_file(in_place_env)["ML_REFRESH_TOKEN"])


def test_compaction_never_drops_the_newest_answer_or_one_with_a_usable_token(
    tmp_path: Path,
) -> None:
    path = tmp_path / ".env"
    path.write_text("ML_CLIENT_ID=1\n")
    journal = InodeJournal(str(path))
    usable = json.dumps({"access_token": "APP_USR-kept", "refresh_token": "TG-kept"})

    def raw_record(spent: str, body: str) -> dict[str, object]:
        return {"kind": "raw", "spent": spent, "grant": "refresh_token", "at": 1.0, "body": body}

    journal.raw(raw_record("sha256:aaaaaaaa", usable))
    for number in range(60):
        spent = f"sha256:{number:08d}"
        journal.intent(Secret(f"TG-fake-{number}"))
        journal.raw(raw_record(spent, "<html>" + "y" * 300 + f"{number}</html>"))
        journal.abort(Secret(f"TG-fake-{number}"), unanswered="HTTP 200 with an unusable body")
        assert len(attribute(path)) <= JOURNAL_BUDGET
    records = journal.records()
    bodies = [str(r.get("body")) for r in records if r["kind"] == "raw"]
    assert bodies[0] == usable and bodies[-1].endswith("59</html>")


def test_a_large_answer_keeps_its_essentials_in_the_attribute_and_is_replayed(
    fake_ml: FakeMercadoLibre, in_place_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mangle = Mangle(fields(padding="p" * 20000, scope="s" * 3000))
    fake_ml.mangle_next_token_answers(1, mangle)
    original = mlauth.EnvFileStore.save

    def full_disk(
        self: mlauth.EnvFileStore, tokens: TokenSet, *, replaces: Hashable | None = None
    ) -> Hashable:
        raise mlauth.StoreError("No space left on device")

    monkeypatch.setattr(mlauth.EnvFileStore, "save", full_disk)
    mlauth.MLAuth.from_env(in_place_env).refresh()  # kept in memory: the save failed
    (record,) = [json.loads(line) for line in attribute(in_place_env).splitlines()][-1:]
    assert record["kind"] == "raw" and record["trimmed"] is True and record["size"] > 20000
    assert len(attribute(in_place_env)) <= JOURNAL_BUDGET
    monkeypatch.setattr(mlauth.EnvFileStore, "save", original)
    # Another process, the disk freed: the answer is replayed from the attribute.
    assert get(fake_ml, mlauth.MLAuth.from_env(in_place_env)).status_code == 200
    assert read_env_file(in_place_env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    assert fake_ml.stats()["refreshes"] == 1 and attribute(in_place_env) == b""


# -- mlauth login ----------------------------------------------------------------------------


@pytest.fixture
def first_env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    env = tmp_path / ".env"
    env.write_text(
        f"ML_CLIENT_ID={fake_ml.client_id}\nML_CLIENT_SECRET={fake_ml.client_secret}\n"
        f"ML_TOKEN_URL={fake_ml.token_url}\nML_API_HOSTS={fake_ml.host}\n"
    )
    env.chmod(0o600)
    return env


def login(fake: FakeMercadoLibre, env: Path) -> TokenSet:
    code = fake.issue_authorization_code(REDIRECT)
    return complete_login(str(env), store_from_env(env), code=Secret(code), redirect_uri=REDIRECT)


def test_login_keeps_the_tokens_of_an_odd_answer(
    fake_ml: FakeMercadoLibre, first_env: Path
) -> None:
    mangle = Mangle(fields(expires_in=[21600], token_type="mac"))
    fake_ml.mangle_next_token_answers(1, mangle)
    tokens = login(fake_ml, first_env)
    assert tokens.expires_at is None
    assert read_env_file(first_env)["ML_REFRESH_TOKEN"] == mangle.refresh_token
    assert get(fake_ml, mlauth.MLAuth.from_env(first_env)).status_code == 200
    assert fake_ml.stats()["invalid_grant"] == 0


def test_login_keeps_an_unusable_answer_and_says_where(
    fake_ml: FakeMercadoLibre, first_env: Path
) -> None:
    before = first_env.read_bytes()
    mangle = Mangle(fields(refresh_token=["TG-in-an-array"], access_token=DELETE))
    fake_ml.mangle_next_token_answers(1, mangle)
    with pytest.raises(mlauth.RefreshError) as caught:
        login(fake_ml, first_env)
    message = str(caught.value)
    assert "mlauth login" in message and f"kept in {first_env}.journal" in message
    assert first_env.read_bytes() == before
    lines = Path(f"{first_env}.journal").read_text().splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert record["grant"] == "authorization_code" and record["spent"] == "<none>"
    assert_not_in(message, mangle.refresh_token, mangle.access_token)


def test_a_login_whose_answer_body_is_not_json_spends_nothing_twice(
    fake_ml: FakeMercadoLibre, first_env: Path
) -> None:
    fake_ml.mangle_next_token_answers(1, Mangle(raw(b"<html>ok</html>")))
    with pytest.raises(mlauth.RefreshError, match="the body is not JSON"):
        login(fake_ml, first_env)
    assert fake_ml.stats()["code_exchanges"] == 1  # not retried: the code is spent
