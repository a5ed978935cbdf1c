"""What the fuzz properties (tests/test_fuzz_*.py) found, each pinned down as a plain test.

Each case is the shrunk example of a property, replayed with the same stub token endpoint:
the properties may stop finding it once the strategies change; these never stop asking.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import mlauth
from mlauth.secret import Secret
from mlauth.stores import store_from_env
from mlauth.stores.envfile import read_env_file
from mlauth.stores.redis import RedisStore
from mlauth.testing.redis_server import RedisServer
from mlauth.tokens import TokenSet
from tests.support.fuzz import (
    AUTH_OPTIONS,
    CLIENT_ID,
    NATURAL,
    Answer,
    ErrorBody,
    Issuer,
    ObjectBody,
    TextBody,
    TokenStub,
    Val,
    assert_nothing_secret,
    closing_redis_clients,
    every_log_record,
    outcome,
    said,
    status_output,
    write_env,
)
from tests.support.leaks import ODD_SECRET, everything_said


def test_an_access_token_the_token_endpoint_quotes_is_masked_in_logs_journal_and_status(
    tmp_path: Path,
) -> None:
    # A 5xx whose error code quotes the access token the client holds (not one of ML's
    # shape, which is masked by its shape): the retry's DEBUG line, the journal's record of
    # an unanswered attempt and what `mlauth status` shows of it copied it as it was.
    stub = TokenStub(Issuer("opaque", 1))
    echo = Answer(500, ErrorBody(Val("old access"), None))
    stub.plans = [echo, echo]
    env = write_env(tmp_path, stub, expired=True)
    with every_log_record() as records:
        auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
        stub.mount_on(auth)
        error = outcome(auth.refresh)
    assert isinstance(error, mlauth.RefreshError), repr(error)
    assert "HTTP 500" in str(error)
    secrets = [ODD_SECRET, *stub.issuer.issued]
    assert_nothing_secret(said(error, records), secrets, "the error and the log")
    assert_nothing_secret((tmp_path / ".env.journal").read_text(), secrets, "the journal")
    assert_nothing_secret(status_output(env), secrets, "mlauth status")


def test_a_token_type_holding_a_token_is_not_quoted_in_the_warning(tmp_path: Path) -> None:
    # A short token (20 characters or less) in token_type was quoted in the WARNING about it.
    stub = TokenStub(Issuer("short", 2))
    fields = {**dict(NATURAL), "token_type": Val("new access")}
    stub.plans = [Answer(200, ObjectBody(tuple(fields.items())))]
    env = write_env(tmp_path, stub, expired=True)
    with every_log_record() as records:
        auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
        stub.mount_on(auth)
        auth.refresh()
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == stub.live  # kept: only a warning
    (warning,) = [r for r in records if r.levelno == logging.WARNING and "odd" in r.msg]
    assert "token_type is a string of" in warning.getMessage()
    assert_nothing_secret(said(None, records), [ODD_SECRET, *stub.issuer.issued], "the log")


def test_an_error_answer_nested_too_deeply_is_a_refusal_not_an_unexpected_error(
    tmp_path: Path,
) -> None:
    # requests' Response.json() raises RecursionError (no ValueError) on such a body, and the
    # refusal became an UnexpectedError that said nothing of the server's error code.
    stub = TokenStub(Issuer("ml", 3))
    deep = "[" * 5000 + "]" * 5000
    body = TextBody((Val("json", '{"error": "invalid_client", "cause": ' + deep + "}"),))
    stub.plans = [Answer(400, body)]
    env = write_env(tmp_path, stub, expired=True)
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
    stub.mount_on(auth)
    error = outcome(auth.refresh)
    assert type(error) is mlauth.RefreshError, repr(error)
    assert "invalid_client" in str(error) and "ML_CLIENT_SECRET" in str(error)


# -- frames that held the .env, a Redis hash or the values a save writes ------------------------

# Each breaks the .env so that reading it raises, with the tokens and the client secret in
# the file: the frames that read and checked it held them all (and a UnicodeDecodeError, as
# the error's cause, the file's very bytes).
BROKEN_ENV: dict[str, bytes] = {
    "bad expiry": b"ML_TOKEN_EXPIRES_AT=abc\n",
    "not UTF-8": b"OTHER=\xff\n",
    "a key set twice": b"ML_TOKEN_EXPIRES_AT=1\nML_TOKEN_EXPIRES_AT=2\n",
    "bad write mode": b"ML_ENV_WRITE=bogus\n",
    "bad hosts": b"ML_API_HOSTS=bad host!\n",
    "bad store": b"ML_TOKEN_STORE=memcached://127.0.0.1\n",
    "bad lock timeout": b"ML_TOKEN_STORE=redis://127.0.0.1/0\nML_TOKEN_LOCK_TIMEOUT=abc\n",
}
READERS: dict[str, Callable[[Path], object]] = {
    "from_env": lambda env: mlauth.MLAuth.from_env(env),
    "the store": lambda env: mlauth.EnvFileStore(env).load(),
}
# The store reads neither the settings of the auth nor those of another store.
STORE_READS = ("bad expiry", "not UTF-8", "a key set twice", "bad write mode")


@pytest.mark.parametrize(
    ("broken", "reader"),
    [(broken, "from_env") for broken in BROKEN_ENV]
    + [(broken, "the store") for broken in STORE_READS],
)
def test_an_env_that_cannot_be_read_leaves_no_frame_holding_it(
    broken: str, reader: str, tmp_path: Path
) -> None:
    stub = TokenStub(Issuer("opaque", 4))
    env = write_env(tmp_path, stub, expired=False)
    with env.open("ab") as handle:
        handle.write(BROKEN_ENV[broken])
    error = outcome(lambda: READERS[reader](env))
    assert isinstance(error, mlauth.ConfigError), repr(error)
    secrets = [ODD_SECRET, *stub.issuer.issued]
    assert_nothing_secret(everything_said(error), secrets, "the error")


def test_a_bad_value_a_peer_writes_mid_run_leaves_no_frame_holding_the_env(
    tmp_path: Path,
) -> None:
    stub = TokenStub(Issuer("opaque", 5))
    env = write_env(tmp_path, stub, expired=False)
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
    with env.open("a") as handle:  # another program's edit: the next request re-reads
        handle.write("ML_TOKEN_REFRESHED_AT=yesterday\n")
    error = outcome(auth.valid_tokens)
    assert isinstance(error, mlauth.ConfigError), repr(error)
    assert_nothing_secret(everything_said(error), [ODD_SECRET, *stub.issuer.issued], "the error")


def test_a_failed_save_leaves_no_frame_holding_the_new_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = TokenStub(Issuer("opaque", 6))
    env = write_env(tmp_path, stub, expired=False)
    store = mlauth.EnvFileStore(env)
    new_access, new_refresh = stub.issuer.pair()
    tokens = TokenSet(Secret(new_access), Secret(new_refresh), None)

    def full(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    error = outcome(lambda: store.save(tokens))
    monkeypatch.undo()
    assert isinstance(error, mlauth.StoreError), repr(error)
    assert_nothing_secret(everything_said(error), [ODD_SECRET, *stub.issuer.issued], "the error")


def test_an_odd_redis_hash_leaves_no_frame_holding_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    stub = TokenStub(Issuer("opaque", 7))
    with redis_server.client() as client:
        client.hset(
            "fuzz:tokens",
            mapping={
                "chain": "c0ffee",
                "generation": "one",
                "access_token": stub.access,
                "refresh_token": stub.live,
            },
        )
    store = mlauth.RedisStore(redis_server.url, key="fuzz:tokens")
    try:
        error = outcome(store.load)
    finally:
        store._client.close()
        store._probe.close()
    assert isinstance(error, mlauth.StoreError), repr(error)
    assert_nothing_secret(everything_said(error), stub.issuer.issued, "the error")


def test_host_rules_that_fail_to_build_can_be_shown_with_their_frames(tmp_path: Path) -> None:
    # capture_locals calls repr() on the half-built object, in the frame of the ValueError
    # the ConfigError was raised from: it raised AttributeError, so a crash reporter or
    # pytest -l failed on a bad ML_API_HOSTS instead of showing the error.
    store = mlauth.EnvFileStore(write_env(tmp_path, TokenStub(Issuer("ml", 8)), expired=False))
    error = outcome(lambda: mlauth.MLAuth("1234567890", "a-secret", store, hosts=["bad host!"]))
    assert isinstance(error, mlauth.ConfigError), repr(error)
    assert "HostRules([])" in everything_said(error)


# -- a secret where another value belongs ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "token"),
    [
        ("ML_TOKEN_EXPIRES_AT", "old access"),
        ("ML_TOKEN_URL", "old refresh"),
        ("ML_API_HOSTS", "old refresh"),
        ("ML_TOKEN_LOCK_TIMEOUT", "old access"),
    ],
)
def test_a_token_pasted_under_another_key_is_not_quoted_in_the_error(
    key: str, token: str, tmp_path: Path
) -> None:
    stub = TokenStub(Issuer("ml", 9))
    env = write_env(tmp_path, stub, expired=False)
    value = stub.access if token == "old access" else stub.live
    store = "ML_TOKEN_STORE=redis://127.0.0.1:1/0\n" if key == "ML_TOKEN_LOCK_TIMEOUT" else ""
    with env.open("a") as handle:
        handle.write(f"{store}{key}= {value}+\n")  # not a valid value: refused, quoted
    error = outcome(lambda: mlauth.MLAuth.from_env(env))
    assert isinstance(error, mlauth.ConfigError), repr(error)
    assert key in str(error)
    assert_nothing_secret(everything_said(error), [ODD_SECRET, *stub.issuer.issued], "the error")


def test_status_shows_a_token_pasted_where_another_value_belongs_as_its_fingerprint(
    tmp_path: Path,
) -> None:
    stub = TokenStub(Issuer("opaque", 10))
    env = write_env(tmp_path, stub, expired=False)
    with env.open("a") as handle:
        handle.write(f"ML_TOKEN_REFRESHED_AT=1700000000\nML_TOKEN_REFRESHED_BY={stub.live}\n")
    shown = status_output(env)
    assert mlauth.fingerprint(stub.live) in shown
    assert_nothing_secret(shown, [ODD_SECRET, *stub.issuer.issued], "mlauth status")


# -- the .env a refresh writes -------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\r", "\r\n"], ids=["CR", "CRLF"])
def test_a_token_line_rewritten_whole_keeps_its_line_ending(ending: str, tmp_path: Path) -> None:
    # A token line the writer cannot edit in place (here: a comment glued to a quoted value)
    # is written anew; it kept its ending only if it was LF. With old Mac endings (CR) the
    # next line was glued to it: ML_REFRESH_TOKEN became part of the access token's value,
    # and the new refresh token was lost. With CRLF the line lost its CR.
    stub = TokenStub(Issuer("ml", 11))
    lines = [
        f"ML_CLIENT_ID={CLIENT_ID}",
        f"ML_CLIENT_SECRET={ODD_SECRET}",
        f"ML_ACCESS_TOKEN='{stub.access}'#set by hand",
        f"ML_REFRESH_TOKEN={stub.live}",
        "ML_TOKEN_EXPIRES_AT=1000000000",
    ]
    env = tmp_path / ".env"
    env.write_bytes("".join(line + ending for line in lines).encode())
    env.chmod(0o600)
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
    stub.mount_on(auth)
    auth.refresh()
    assert read_env_file(env)["ML_REFRESH_TOKEN"] == stub.live
    assert read_env_file(env)["ML_ACCESS_TOKEN"] == stub.access
    written = env.read_bytes().decode()
    assert f"ML_ACCESS_TOKEN={stub.access}{ending}ML_REFRESH_TOKEN=" in written


def test_keys_added_to_a_env_ending_in_an_unclosed_quote_read_back_and_are_added_once(
    tmp_path: Path,
) -> None:
    # They were appended after the unclosed quote, which took them into its value: unread,
    # so the access token was missing at every start and the keys were added again at every
    # save, the .env growing by four lines per refresh.
    stub = TokenStub(Issuer("ml", 12))
    env = tmp_path / ".env"
    env.write_text(
        f"ML_CLIENT_ID={CLIENT_ID}\nML_CLIENT_SECRET={ODD_SECRET}\n"
        f'ML_REFRESH_TOKEN={stub.live}\nNOTE="ask Ana about this\n'
    )
    env.chmod(0o600)
    for _ in range(2):
        auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
        stub.mount_on(auth)
        auth.refresh()
        values = read_env_file(env)
        assert (values["ML_ACCESS_TOKEN"], values["ML_REFRESH_TOKEN"]) == (stub.access, stub.live)
        assert values["ML_TOKEN_REFRESHED_BY"] is not None
    assert len(env.read_text().splitlines()) == 4 + 4  # the four added keys, once
    assert env.read_text().endswith('NOTE="ask Ana about this\n')


def test_a_save_an_unclosed_quote_would_swallow_is_refused_before_the_token_is_spent(
    tmp_path: Path,
) -> None:
    # An unclosed quote above the token lines swallowed everything up to the next quote once
    # a save quoted a value (a token with '~' or '='): ML_REFRESH_TOKEN went unread, and the
    # new refresh token with it.
    stub = TokenStub(Issuer("opaque", 13))
    env = tmp_path / ".env"
    env.write_text(
        f'ML_CLIENT_ID={CLIENT_ID}\nML_CLIENT_SECRET={ODD_SECRET}\nNOTE="unfinished\n'
        f"ML_ACCESS_TOKEN={stub.access}\nML_REFRESH_TOKEN={stub.live}\n"
    )
    env.chmod(0o600)
    before = env.read_bytes()
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
    stub.mount_on(auth)
    error = outcome(auth.refresh)
    assert isinstance(error, mlauth.StoreError), repr(error)
    assert "line 3" in str(error) and "Refusing to spend" in str(error)
    assert stub.sent == []  # nothing spent
    assert env.read_bytes() == before


def test_a_secret_under_ml_token_store_is_not_logged_when_the_store_cannot_follow(
    tmp_path: Path,
) -> None:
    # The store logs (once, at ERROR) why it cannot follow the tokens to the store the file
    # names; that line quoted the value the masked error did not.
    stub = TokenStub(Issuer("opaque", 14))
    env = write_env(tmp_path, stub, expired=False)
    with env.open("a") as handle:
        handle.write(f"ML_TOKEN_STORE={stub.live}\n")
    with every_log_record() as records:
        error = outcome(mlauth.EnvFileStore(env).load)
    assert isinstance(error, mlauth.StoreMovedError), repr(error)
    assert any(record.levelno == logging.ERROR for record in records)
    assert_nothing_secret(said(error, records), [ODD_SECRET, *stub.issuer.issued], "the log")


# -- the Redis hash ------------------------------------------------------------------------------


@pytest.fixture
def closed_redis() -> Iterator[None]:
    with closing_redis_clients():
        yield


def redis_env(folder: Path, url: str, key: str) -> Path:
    env = folder / ".env"
    env.write_text(
        f"ML_CLIENT_ID={CLIENT_ID}\nML_CLIENT_SECRET={ODD_SECRET}\n"
        f"ML_TOKEN_STORE={url}\nML_TOKEN_KEY={key}\n"
    )
    env.chmod(0o600)
    return env


@pytest.mark.usefixtures("closed_redis")
def test_a_redis_value_that_is_no_utf8_is_a_store_error_and_spends_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # redis-py decodes every value it reads: a UnicodeDecodeError left the library, from
    # from_env, a request and `mlauth status`.
    stub = TokenStub(Issuer("ml", 15))
    hash_ = {"chain": "c0ffee", "generation": "1", "refresh_token": stub.live}
    with redis.Redis.from_url(redis_server.url) as client:
        client.hset("fuzz:tokens", mapping={**hash_, "refreshed_by": b"pid 1@\xff"})
    env = redis_env(tmp_path, redis_server.url, "fuzz:tokens")
    error = outcome(lambda: mlauth.MLAuth.from_env(env, **AUTH_OPTIONS))
    assert isinstance(error, mlauth.StoreError), repr(error)
    assert "no UTF-8 text" in str(error) and "HDEL fuzz:tokens" in str(error)
    assert "no UTF-8 text" in status_output(env)
    assert stub.sent == []


@pytest.mark.usefixtures("closed_redis")
def test_an_empty_redis_generation_is_a_store_error_and_spends_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # It read as generation 0, but the commit script cannot compare it: the refresh spent the
    # token and its commit failed, and the next process spent the dead token (invalid_grant).
    stub = TokenStub(Issuer("ml", 16))
    with redis.Redis.from_url(redis_server.url) as client:
        client.hset(
            "fuzz:tokens", mapping={"chain": "c0ffee", "generation": "", "refresh_token": stub.live}
        )
    env = redis_env(tmp_path, redis_server.url, "fuzz:tokens")
    error = outcome(lambda: mlauth.MLAuth.from_env(env, **AUTH_OPTIONS).refresh())
    assert isinstance(error, mlauth.StoreError), repr(error)
    assert "generation" in str(error)
    assert stub.sent == []


@pytest.mark.usefixtures("closed_redis")
def test_a_kept_answer_that_cannot_be_committed_stops_the_refresh_before_spending(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refresher died after keeping its answer; the stored token was spent for it. When the
    # replay failed, the refresh went on and sent the spent token (invalid_grant), and the
    # answer's live token was lost with the next commit.
    stub = TokenStub(Issuer("ml", 17))
    spent, (access, live) = stub.live, stub.issuer.pair()
    answer = {"access_token": access, "refresh_token": live, "expires_in": 21600}
    record = {
        "kind": "raw",
        "spent": mlauth.fingerprint(spent),
        "grant": "refresh_token",
        "started": 1_700_000_000.0,
        "at": 1_700_000_001.0,
        "by": "pid 1@host",
        "size": 1,
        "body": json.dumps(answer),
        "chain": "c0ffee",
        "generation": 1,
    }
    mapping = {"chain": "c0ffee", "generation": "1", "refresh_token": spent}
    with redis.Redis.from_url(redis_server.url) as client:
        client.hset("fuzz:tokens", mapping={**mapping, "answer": json.dumps(record)})
    stub.live = live  # the server rotated when the refresher that died spent the token
    env = redis_env(tmp_path, redis_server.url, "fuzz:tokens")

    def refused(self: RedisStore, tokens: TokenSet, *, replaces: object = None) -> object:
        raise mlauth.StoreError("the commit failed")

    monkeypatch.setattr(RedisStore, "save", refused)
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)
    stub.mount_on(auth)
    error = outcome(auth.refresh)
    assert isinstance(error, mlauth.StoreError), repr(error)
    assert "nothing was sent" in str(error)
    assert stub.sent == []
    monkeypatch.undo()
    auth = mlauth.MLAuth.from_env(env, **AUTH_OPTIONS)  # the commit works again: replayed
    stub.mount_on(auth)
    auth.refresh()
    assert stub.sent == [live]


def test_a_secret_under_refreshed_by_shows_as_its_fingerprint_in_frames(tmp_path: Path) -> None:
    # Found by the long run of the .env property: the tokens read from the file (TokenSet,
    # whose repr shows refreshed_by) were a local of the frames of the error about the
    # missing refresh token, and ML_TOKEN_REFRESHED_BY held the client secret's value.
    stub = TokenStub(Issuer("opaque", 18))
    env = tmp_path / ".env"
    env.write_text(
        f"ML_CLIENT_ID={CLIENT_ID}\nML_CLIENT_SECRET={stub.access}\n"
        f"ML_TOKEN_REFRESHED_BY={stub.access}\n"
    )
    env.chmod(0o600)
    error = outcome(lambda: mlauth.MLAuth.from_env(env))
    assert isinstance(error, mlauth.ConfigError), repr(error)
    assert mlauth.fingerprint(stub.access) in everything_said(error)
    assert_nothing_secret(everything_said(error), [stub.access], "the error")


@pytest.mark.usefixtures("closed_redis")
def test_a_token_under_redis_refreshed_by_shows_as_its_fingerprint(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    stub = TokenStub(Issuer("opaque", 19))
    mapping = {"chain": "c0ffee", "generation": "1", "refresh_token": stub.live}
    with redis.Redis.from_url(redis_server.url) as client:
        client.hset("fuzz:tokens", mapping={**mapping, "refreshed_by": f"by {stub.live}"})
    tokens, _ = store_from_env(redis_env(tmp_path, redis_server.url, "fuzz:tokens")).load()
    assert tokens.refreshed_by == f"by {mlauth.fingerprint(stub.live)}"
