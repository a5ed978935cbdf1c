"""Fuzzing the token endpoint's answers, through the real engine, endpoint and .env store.

Any status (2xx other than 200 too), any body (objects with every JSON type in every field,
tokens with every character class put in, huge numbers, deep nesting, fields given twice,
JSON that is no object, no JSON at all, bytes that are no UTF-8, cut short), error answers
that quote the request or the tokens the client holds. For each, whichever way a pipeline
meets it (a requests or httpx request, expired or answered 401, ``refresh()``,
``valid_tokens()``):

- only an MLAuthError leaves the library;
- no secret (the client secret, any token of the chain, raw or encoded) is in the error (its
  message, repr, pickle and every frame's locals along its chain), in any DEBUG log line, or
  in what ``mlauth status`` prints afterwards;
- the .env gains no line and no key, and every other line stays byte for byte;
- when the server rotated and its answer held a usable refresh token (or it did not rotate),
  the chain survives: the next refresh, in a new process's auth, presents the live token.

``MLAUTH_FUZZ_EXAMPLES`` sets the number of examples (tests/support/fuzz.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from hypothesis import event, given
from hypothesis import strategies as st

import mlauth
from mlauth.httpx import HttpxAuth
from tests.support.fuzz import (
    API,
    AUTH_OPTIONS,
    STYLES,
    Answer,
    Issuer,
    TokenStub,
    answers,
    assert_env_gained_nothing,
    assert_nothing_secret,
    assert_only_mlauth_error,
    every_log_record,
    example_folder,
    fuzz_settings,
    outcome,
    said,
    status_output,
    use_requests_auth,
    write_env,
)
from tests.support.leaks import ODD_SECRET

ENTRIES = ("requests", "httpx", "httpx async", "refresh", "valid_tokens")


class HttpxApi:
    """MercadoLibre's API for httpx (a MockTransport handler): 401 to the stale token."""

    def __init__(self, stale: str) -> None:
        self.stale = stale

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") == f"Bearer {self.stale}":
            return httpx.Response(401, json={"message": "invalid_token", "status": 401})
        return httpx.Response(200, json={})


def use(entry: str, env: Path, stub: TokenStub) -> None:
    """One use of the chain, as a pipeline makes it. No token is a local here: this frame
    is on the traceback of what it raises."""
    if entry.startswith("httpx"):
        auth = HttpxAuth.from_env(env, **AUTH_OPTIONS)
        stub.mount_on(auth)
        transport = httpx.MockTransport(HttpxApi(stub.access))
        if entry == "httpx":
            with httpx.Client(auth=auth, transport=transport) as client:
                client.get(f"{API}/users/me")
            return

        async def main() -> None:
            async with httpx.AsyncClient(auth=auth, transport=transport) as client:
                await client.get(f"{API}/users/me")

        asyncio.run(main())
        return
    use_requests_auth(entry, env, stub)


@fuzz_settings(short=200)
@given(
    entry=st.sampled_from(ENTRIES),
    expired=st.booleans(),
    style=st.sampled_from(STYLES),
    seed=st.integers(0, 2**32),
    plans=st.lists(answers(), min_size=1, max_size=2),
)
def test_any_token_answer_leaks_nothing_and_never_costs_a_chain_it_delivered(
    entry: str, expired: bool, style: str, seed: int, plans: list[Answer]
) -> None:
    stub = TokenStub(Issuer(style, seed))
    stub.plans = list(plans)
    with example_folder() as folder, every_log_record() as records:
        env = write_env(folder, stub, expired=expired or entry == "valid_tokens")
        before = env.read_bytes()
        error = outcome(lambda: use(entry, env, stub))
        assert_only_mlauth_error(error, entry)
        event(f"{entry}: {'ok' if error is None else type(error).__name__}")
        if isinstance(error, mlauth.UnexpectedError):
            event(f"unexpected: {error}")
        assert_env_gained_nothing(before, env.read_bytes())
        if not stub.lost and not stub.refused:
            # The chain is alive on the server's side: the store must hold its live token.
            assert stub.wrong == 0, "a refresh token the server no longer accepts was sent"
            stub.plans.clear()
            live, first = stub.live, len(stub.sent)
            event("the chain lives on: the next refresh checked")
            follow = outcome(lambda: use("refresh", env, stub))
            assert follow is None, f"the next refresh failed: {follow!r}"
            assert stub.sent[first] == live, "the next refresh presented another token"
            assert_env_gained_nothing(before, env.read_bytes())
        shown = status_output(env)
        secrets = [ODD_SECRET, *stub.issuer.issued]
        assert_nothing_secret(said(error, records), secrets, f"what {entry} said")
        assert_nothing_secret(shown, secrets, "mlauth status")
