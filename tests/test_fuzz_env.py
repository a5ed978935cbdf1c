"""Fuzzing the .env: what people, editors and other tools write, and worse.

Token keys with odd values (mangled tokens, any text, values over several lines), every
quoting style, ``export``, inline comments, CRLF and lone CR endings, a BOM, keys set twice,
settings with odd values (expiry times, hosts, token URL, write mode, store), junk lines,
bytes that are no UTF-8. For each, whichever way it is used (``from_env`` and a refresh, a
request, ``valid_tokens()``, the store's ``load``, ``mlauth status``):

- only an MLAuthError leaves the library;
- no secret the file holds (the values of ML_CLIENT_SECRET, ML_ACCESS_TOKEN and
  ML_REFRESH_TOKEN, as the file spells them, wherever else they appear too) nor any token
  the server issued is in the error, the DEBUG log or what ``mlauth status`` prints;
- the .env gains no line and no key (but one line per token key mlauth keeps), and every
  other line stays byte for byte;
- a refresh that succeeded left the live refresh token where the next reader finds it.

``MLAUTH_FUZZ_EXAMPLES`` sets the number of examples (tests/support/fuzz.py).
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import event, given
from hypothesis import strategies as st

import mlauth
from tests.support.fuzz import (
    STYLES,
    EnvFile,
    Issuer,
    TokenStub,
    assert_env_gained_nothing,
    assert_nothing_secret,
    assert_only_mlauth_error,
    env_context,
    env_files,
    every_log_record,
    example_folder,
    fuzz_settings,
    outcome,
    said,
    status_output,
    use_requests_auth,
)

USES = ("refresh", "valid_tokens", "requests", "load", "status")


def use(entry: str, env: Path, stub: TokenStub) -> None:
    """One use of the .env; no secret is a local here (this frame is on the traceback)."""
    if entry == "load":
        mlauth.EnvFileStore(env).load()
        return
    if entry == "status":
        status_output(env)
        return
    use_requests_auth(entry, env, stub)


@fuzz_settings(short=250)
@given(
    entry=st.sampled_from(USES),
    style=st.sampled_from(STYLES),
    seed=st.integers(0, 2**32),
    plan=env_files(),
)
def test_any_env_file_leaks_nothing_and_gains_nothing(
    entry: str, style: str, seed: int, plan: EnvFile
) -> None:
    stub = TokenStub(Issuer(style, seed))
    ctx = env_context(stub)
    with example_folder() as folder, every_log_record() as records:
        env = folder / ".env"
        env.write_bytes(plan.render(ctx))
        env.chmod(0o600)
        before = env.read_bytes()
        error = outcome(lambda: use(entry, env, stub))
        assert_only_mlauth_error(error, entry)
        event(f"{entry}: {'ok' if error is None else type(error).__name__}")
        if error is not None:
            event("why: " + str(error).replace(str(folder), "")[:70])
        after = env.read_bytes()
        assert_env_gained_nothing(before, after)
        if after != before:
            event("the .env was written")
            # Whoever reads it next finds the live refresh token (or the one mlauth kept).
            stored = mlauth.EnvFileStore(env).load()[0].refresh_token
            assert stored is not None and stored.reveal() == stub.live
        shown = status_output(env) if entry != "status" else ""
        # The secrets the file declares as such (wherever else they appear), and the tokens
        # the server issued since; a secret only under another key cannot be told from any
        # other value there.
        secrets = [*plan.secrets(ctx), *stub.issuer.issued[2:]]
        assert_nothing_secret(said(error, records), secrets, f"what {entry} said")
        assert_nothing_secret(shown, secrets, "mlauth status")
