"""The refresh journal: what a crashed or failed refresh leaves behind is finished by the next."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Hashable
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth.stores.envfile import read_env_file, update_env_file
from mlauth.stores.journal import Journal, recover
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import TokenSet
from tests.support.hostile_answers import spend_outside

DEAD_ACCESS = "APP_USR-1234-010101-deadbeef-8035443"


class BrokenStore(mlauth.EnvFileStore):
    """An .env store whose saves fail while ``broken`` is set (the disk filled after the check)."""

    broken = True

    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        if self.broken:
            raise mlauth.StoreError("No space left on device")
        return super().save(tokens, replaces=replaces)


@pytest.fixture
def stale_env(fake_ml: FakeMercadoLibre, fake_ml_env: Path) -> Path:
    update_env_file(fake_ml_env, {"ML_ACCESS_TOKEN": DEAD_ACCESS})
    return fake_ml_env


def journal_for(env: Path) -> Journal:
    return Journal(os.path.realpath(env))


def answer_tokens(answer: dict[str, object]) -> TokenSet:
    return TokenSet(
        access_token=mlauth.Secret(str(answer["access_token"])),
        refresh_token=mlauth.Secret(str(answer["refresh_token"])),
        expires_at=time.time() + 3600,
        refreshed_at=time.time(),
        refreshed_by="pid 1@crashed",
    )


def test_a_refresh_leaves_an_empty_private_journal(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    auth = mlauth.MLAuth.from_env(stale_env)
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    journal = Path(f"{stale_env}.journal")
    assert fake_ml.stats()["refreshes"] == 1
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    assert journal.read_bytes() == b""  # committed and compacted


def test_journal_records_intent_then_the_raw_answer_and_never_the_spent_token(
    fake_ml: FakeMercadoLibre, stale_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    spent = str(read_env_file(stale_env)["ML_REFRESH_TOKEN"])
    original_save = mlauth.EnvFileStore.save

    def save(
        store: mlauth.EnvFileStore, tokens: TokenSet, *, replaces: Hashable | None = None
    ) -> Hashable:
        seen.append(Path(f"{stale_env}.journal").read_text())  # what a crash here would leave
        return original_save(store, tokens, replaces=replaces)

    monkeypatch.setattr(mlauth.EnvFileStore, "save", save)
    auth = mlauth.MLAuth.from_env(stale_env)
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    records = [json.loads(line) for line in seen[0].splitlines()]
    assert [r["kind"] for r in records] == ["intent", "raw"]
    assert records[0]["spent"] == records[1]["spent"] == mlauth.fingerprint(spent)
    assert spent not in seen[0]  # only its fingerprint
    new = auth.tokens.refresh_token
    # The answer's bytes as they came, with no field of them read before they were on disk.
    assert new is not None and json.loads(records[1]["body"])["refresh_token"] == new.reveal()


def test_recovery_replays_an_answer_the_store_never_got(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    # A refresher spent the stored token, journaled the answer and died before the save.
    spent = mlauth.Secret(str(read_env_file(stale_env)["ML_REFRESH_TOKEN"]))
    rotated = spend_outside(fake_ml, spent.reveal()).json()
    journal = journal_for(stale_env)
    journal.intent(spent)
    journal.answer(spent, answer_tokens(rotated))
    fake_ml.reset_stats()

    auth = mlauth.MLAuth.from_env(stale_env)
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    assert response.status_code == 200
    assert response.request.headers["Authorization"] == f"Bearer {rotated['access_token']}"
    assert fake_ml.stats()["token_requests"] == 0  # adopted from the journal, nothing spent
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == rotated["refresh_token"]
    assert Path(journal.path).read_bytes() == b""


def test_recovery_follows_several_unsaved_answers_to_the_newest(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    tokens, stamp = mlauth.EnvFileStore(stale_env).load()
    journal = journal_for(stale_env)
    first, second = fake_ml.issue_tokens(), fake_ml.issue_tokens()
    assert tokens.refresh_token is not None
    journal.intent(tokens.refresh_token)
    journal.answer(tokens.refresh_token, answer_tokens(first))
    middle = mlauth.Secret(str(first["refresh_token"]))
    journal.intent(middle)
    journal.answer(middle, answer_tokens(second))
    store = mlauth.EnvFileStore(stale_env)
    with store.lock(5):
        after, _, found = recover(journal, store, tokens, stamp)
    assert found.replayed == after
    assert after.refresh_token == mlauth.Secret(str(second["refresh_token"]))
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == second["refresh_token"]


def test_a_torn_last_record_is_ignored(stale_env: Path) -> None:
    journal = journal_for(stale_env)
    journal.intent(mlauth.Secret("TG-fake-token-1"))
    with open(journal.path, "ab") as handle:
        handle.write(b'{"kind":"answer","spent":"sha')  # the crash came mid-append
    assert [r["kind"] for r in journal.records()] == ["intent"]


def test_an_intent_after_a_torn_record_starts_its_own_line_and_is_read_back(
    stale_env: Path,
) -> None:
    journal = journal_for(stale_env)
    with open(journal.path, "wb") as handle:
        handle.write(b'{"kind":"answer","spent":"sha')  # a writer killed mid-append
    token = mlauth.Secret("TG-fake-token-1")
    assert journal.intent(token) is None
    assert [r["kind"] for r in journal.records()] == ["intent"]
    # The guarantee the intent exists for: the next refresher sees the token may be spent.
    assert journal.intent(token) is not None


def test_possibly_spent_token_that_still_works_is_tried_once_and_saved(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    # A refresher died with its POST in flight, before the server processed it.
    spent = mlauth.Secret(str(read_env_file(stale_env)["ML_REFRESH_TOKEN"]))
    journal_for(stale_env).intent(spent)
    auth = mlauth.MLAuth.from_env(stale_env)
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert fake_ml.stats()["refreshes"] == 1
    assert Path(f"{stale_env}.journal").read_bytes() == b""


def test_possibly_spent_token_that_died_gets_one_try_and_the_exact_fix(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    # The one window no client can close: the server rotated it, the answer died with the
    # process. A retry series would change nothing; one attempt says what happened.
    spent = mlauth.Secret(str(read_env_file(stale_env)["ML_REFRESH_TOKEN"]))
    journal_for(stale_env).intent(spent)
    fake_ml.revoke_refresh_tokens()
    fake_ml.fail_next_token_requests(5, status=503)  # a retry series would eat these
    auth = mlauth.MLAuth.from_env(stale_env, max_attempts=3, backoff=0.001)
    with pytest.raises(mlauth.RefreshError):
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    assert fake_ml.stats()["token_requests"] == 1  # exactly one try


def test_invalid_grant_after_a_crash_in_flight_names_the_window_and_the_command(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    spent = mlauth.Secret(str(read_env_file(stale_env)["ML_REFRESH_TOKEN"]))
    journal_for(stale_env).intent(spent)
    fake_ml.revoke_refresh_tokens()
    auth = mlauth.MLAuth.from_env(stale_env)
    with pytest.raises(mlauth.InvalidGrantError) as caught:
        requests.get(f"{fake_ml.base_url}/users/me", auth=auth)
    message = str(caught.value)
    assert "possibly spent already" in message and "died" in message
    assert "mlauth login" in message
    assert fake_ml.stats()["token_requests"] == 1


def test_invalid_grant_stops_every_process_until_the_store_changes(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    fake_ml.revoke_refresh_tokens()
    store = mlauth.EnvFileStore(stale_env)
    assert mlauth.reauthorization_required(store) is None
    with pytest.raises(mlauth.InvalidGrantError):
        requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(stale_env))
    assert fake_ml.stats()["token_requests"] == 1
    marker = Path(f"{stale_env}.reauth")
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600

    status = mlauth.reauthorization_required(store)
    assert status is not None and "mlauth login" in status
    # Another process (a new MLAuth) does not send the dead token again.
    with pytest.raises(mlauth.InvalidGrantError, match=r"not sent: .*mlauth login"):
        requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(stale_env))
    assert fake_ml.stats()["token_requests"] == 1

    # The seller authorizes again: new tokens in the store, the marker no longer applies.
    fresh = fake_ml.issue_tokens()
    update_env_file(stale_env, {"ML_REFRESH_TOKEN": str(fresh["refresh_token"])})
    assert mlauth.reauthorization_required(store) is None
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(stale_env))
    assert response.status_code == 200
    assert fake_ml.stats()["refreshes"] == 1


def test_a_failed_save_is_kept_in_the_journal_and_a_peer_recovers_it(
    fake_ml: FakeMercadoLibre, stale_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = BrokenStore(stale_env)
    auth = mlauth.MLAuth.from_env(stale_env, store=store)
    with caplog.at_level(logging.ERROR, logger="mlauth"):
        assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    assert f"the refresh journal {os.path.realpath(stale_env)}.journal holds them" in caplog.text
    live = auth.tokens.refresh_token
    assert live is not None and live.reveal() not in caplog.text
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] != live.reveal()  # not saved
    journal = Path(f"{stale_env}.journal")
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600

    # Another process, whose store works, replays the journal and continues the chain.
    peer = mlauth.MLAuth.from_env(stale_env)
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=peer)
    assert response.status_code == 200
    assert fake_ml.stats()["refreshes"] == 1  # recovered, not refreshed again
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == live.reveal()
    assert journal.read_bytes() == b""
