"""Fuzzing the Redis hash that holds the tokens, against a real redis-server.

Any field missing, odd (a generation or a time that is no number, a mangled token, bytes that
are no UTF-8, terminal escapes in ``refreshed_by``) or extra, and a raw answer in the
``answer`` field that a refresher who died left: any body, following the version the hash
holds or an older one, naming the stored token or another, with odd fields, or no record at
all. For each, whichever way it is used (``from_env`` and a refresh, a request,
``valid_tokens()``, the store's ``load``, ``mlauth status``):

- only an MLAuthError leaves the library, and one about the hash spends nothing;
- no secret (the client secret, any token of the chain, the token fields as written) is in
  the error, the DEBUG log or what ``mlauth status`` prints;
- when the chain is alive on the server's side (the dead refresher's answer held a usable
  refresh token, or the server did not rotate), the next refresh presents the live token.

One redis-server serves the module; each example has a key of its own.
``MLAUTH_FUZZ_EXAMPLES`` sets the number of examples (tests/support/fuzz.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import event, given
from hypothesis import strategies as st

import mlauth
from mlauth.stores import store_from_env
from mlauth.testing.redis_server import RedisServer
from tests.support.fuzz import (
    CLIENT_ID,
    STYLES,
    Context,
    Issuer,
    RedisHash,
    TokenStub,
    Val,
    assert_nothing_secret,
    assert_only_mlauth_error,
    closing_redis_clients,
    every_log_record,
    example_folder,
    fuzz_settings,
    outcome,
    redis_hashes,
    said,
    status_output,
    usable,
    use_requests_auth,
)
from tests.support.leaks import ODD_SECRET

USES = ("refresh", "valid_tokens", "requests", "load", "status")
_keys = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    started = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield started
    finally:
        started.stop()


def write_env(folder: Path, url: str, key: str) -> Path:
    env = folder / ".env"
    env.write_text(
        f"ML_CLIENT_ID={CLIENT_ID}\nML_CLIENT_SECRET={ODD_SECRET}\n"
        f"ML_TOKEN_STORE={url}\nML_TOKEN_KEY={key}\n"
    )
    env.chmod(0o600)
    return env


def use(entry: str, env: Path, stub: TokenStub) -> None:
    """One use of the chain; no token is a local here (this frame is on the traceback)."""
    if entry == "load":
        store_from_env(env).load()
        return
    if entry == "status":
        status_output(env)
        return
    use_requests_auth(entry, env, stub)


def expect_replay(plan: RedisHash, ctx: Context, stub: TokenStub) -> None:
    """The server's side of a refresher that died after its answer was kept: a record that
    follows what the hash holds says the server rotated, to what the answer delivered. Where
    the store holds no live token (none, or a rotation whose answer is no use), the chain
    is ``lost``: no property about it then."""
    stored = plan.field("refresh_token") == Val("old refresh")
    record = plan.answer
    found = record.delivers(ctx) if record is not None else None
    if record is None or not record.follows or not plan.readable or found is None:
        # No record, one the chain moved past, or one without a refresh_token (the server
        # kept the stored one, as for an app without offline_access).
        stub.lost = not stored
    elif usable(found):
        stub.live = found  # type: ignore[assignment]
    else:
        stub.lost = True


@fuzz_settings(short=200)
@given(
    entry=st.sampled_from(USES),
    style=st.sampled_from(STYLES),
    seed=st.integers(0, 2**32),
    plan=redis_hashes(),
)
def test_any_redis_hash_leaks_nothing_spends_nothing_it_cannot_read_and_keeps_the_chain(
    server: RedisServer, entry: str, style: str, seed: int, plan: RedisHash
) -> None:
    stub = TokenStub(Issuer(style, seed))
    dead = stub.issuer.pair()  # what the server gave the refresher that died
    ctx = Context({}, b"", dead[0], dead[1], stub.access, stub.live)
    key = f"fuzz:{next(_keys)}:tokens"
    mapping = plan.mapping(ctx)
    if mapping:
        with redis.Redis.from_url(server.url) as raw:
            raw.hset(key, mapping=mapping)
    expect_replay(plan, ctx, stub)
    with example_folder() as folder, every_log_record() as records, closing_redis_clients():
        env = write_env(folder, server.url, key)
        error = outcome(lambda: use(entry, env, stub))
        assert_only_mlauth_error(error, entry)
        event(f"{entry}: {'ok' if error is None else type(error).__name__}")
        if isinstance(error, (mlauth.ConfigError, mlauth.StoreError)):
            assert stub.sent == [], "a token was spent for a hash that could not be read"
        elif not stub.lost and outcome(lambda: store_from_env(env).load()) is None:
            assert stub.wrong == 0, "a refresh token the server no longer accepts was sent"
            live, first = stub.live, len(stub.sent)
            event("the chain lives on: the next refresh checked")
            follow = outcome(lambda: use("refresh", env, stub))
            assert follow is None, f"the next refresh failed: {follow!r}"
            assert stub.sent[first] == live, "the next refresh presented another token"
        shown = status_output(env)
        secrets = [ODD_SECRET, *stub.issuer.issued]
        secrets += [
            value.raw(ctx)
            for name, value in plan.fields
            if name.endswith("_token") and isinstance(value, Val) and value.secret
        ]
        assert_nothing_secret(said(error, records), secrets, f"what {entry} said")
        assert_nothing_secret(shown, secrets, "mlauth status")
