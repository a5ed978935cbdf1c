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

DEAD_ACCESS = "APP_USR-1234-010101-deadbeef-8035443"


class BrokenStore(mlauth.EnvFileStore):
    """An .env store whose saves fail while ``broken`` is set (the disk filled after the check)."""

    broken = True

    def save(self, tokens: TokenSet) -> Hashable:
        if self.broken:
            raise mlauth.StoreError("No space left on device")
        return super().save(tokens)


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


def test_journal_records_intent_then_answer_and_never_the_spent_token(
    fake_ml: FakeMercadoLibre, stale_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    spent = str(read_env_file(stale_env)["ML_REFRESH_TOKEN"])
    original_save = mlauth.EnvFileStore.save

    def save(store: mlauth.EnvFileStore, tokens: TokenSet) -> Hashable:
        seen.append(Path(f"{stale_env}.journal").read_text())  # what a crash here would leave
        return original_save(store, tokens)

    monkeypatch.setattr(mlauth.EnvFileStore, "save", save)
    auth = mlauth.MLAuth.from_env(stale_env)
    assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    records = [json.loads(line) for line in seen[0].splitlines()]
    assert [r["kind"] for r in records] == ["intent", "answer"]
    assert records[0]["spent"] == mlauth.fingerprint(spent)
    assert spent not in seen[0]  # only its fingerprint
    new = auth.tokens.refresh_token
    assert new is not None and records[1]["tokens"]["refresh_token"] == new.reveal()


def test_recovery_replays_an_answer_the_store_never_got(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    # A refresher spent the stored token, journaled the answer and died before the save.
    spent = mlauth.Secret(str(read_env_file(stale_env)["ML_REFRESH_TOKEN"]))
    rotated = requests.post(
        fake_ml.token_url,
        data={
            "grant_type": "refresh_token",
            "client_id": fake_ml.client_id,
            "client_secret": fake_ml.client_secret,
            "refresh_token": spent.reveal(),
        },
    ).json()
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


def test_a_record_glued_to_a_fragment_by_an_older_writer_is_still_read(stale_env: Path) -> None:
    journal = journal_for(stale_env)
    with open(journal.path, "wb") as handle:
        handle.write(b'{"kind":"answer","spent":"sha{"kind":"intent","spent":"sha256:1"}\n')
    assert journal.records() == [{"kind": "intent", "spent": "sha256:1"}]


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


def test_a_failed_save_writes_a_private_rescue_file_that_a_peer_recovers(
    fake_ml: FakeMercadoLibre, stale_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = BrokenStore(stale_env)
    auth = mlauth.MLAuth.from_env(stale_env, store=store)
    with caplog.at_level(logging.ERROR, logger="mlauth"):
        assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    rescue = Path(f"{stale_env}.rescue")
    assert stat.S_IMODE(rescue.stat().st_mode) == 0o600
    assert f"Rescue copy: {os.path.realpath(rescue)}" in caplog.text
    live = auth.tokens.refresh_token
    assert live is not None and live.reveal() not in caplog.text
    assert json.loads(rescue.read_text())["tokens"]["refresh_token"] == live.reveal()
    Path(f"{stale_env}.journal").write_bytes(b"")  # the rescue file alone must be enough

    # Another process, whose store works, finds the rescue and continues the chain.
    peer = mlauth.MLAuth.from_env(stale_env)
    response = requests.get(f"{fake_ml.base_url}/users/me", auth=peer)
    assert response.status_code == 200
    assert fake_ml.stats()["refreshes"] == 1  # recovered, not refreshed again
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == live.reveal()
    assert not rescue.exists()


def test_rescue_goes_to_the_state_dir_when_the_folder_refuses(
    fake_ml: FakeMercadoLibre,
    stale_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    Path(f"{stale_env}.rescue").mkdir()  # writing the file beside the .env fails (EISDIR)
    auth = mlauth.MLAuth.from_env(stale_env, store=BrokenStore(stale_env))
    with caplog.at_level(logging.ERROR, logger="mlauth"):
        assert requests.get(f"{fake_ml.base_url}/users/me", auth=auth).status_code == 200
    (rescue,) = (state / "mlauth").iterdir()
    assert str(rescue) in caplog.text
    # The state dir is this process's: the log says so and where every process would look.
    assert "$XDG_STATE_HOME or $HOME" in caplog.text
    assert f"moving it to {os.path.realpath(stale_env)}.rescue" in caplog.text
    assert stat.S_IMODE(rescue.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "mlauth").stat().st_mode) == 0o700


def rescue_json(base: str, access: str, refresh: str, refreshed_at: float) -> str:
    tokens = {
        "access_token": access,
        "refresh_token": refresh,
        "expires_at": refreshed_at + 3600,
        "refreshed_at": refreshed_at,
        "refreshed_by": "pid 1@rescuer",
    }
    return json.dumps({"store": "x", "base": base, "tokens": tokens})


def test_of_two_rescue_files_the_latest_refresh_wins_whichever_is_read_last(
    stale_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    journal = journal_for(stale_env)
    store = mlauth.EnvFileStore(stale_env)
    tokens, stamp = store.load()
    assert tokens.refresh_token is not None
    base = tokens.refresh_token.fingerprint
    now = time.time()
    # The state-dir file (read last) is the older one: a process wrote it first, then, once
    # the folder let it, wrote its newer tokens beside the .env.
    Path(journal.rescue_path).write_text(rescue_json(base, "APP_USR-new", "TG-fake-new", now))
    Path(journal.fallback_rescue_path).parent.mkdir(parents=True)
    Path(journal.fallback_rescue_path).write_text(
        rescue_json(base, "APP_USR-old", "TG-fake-old", now - 60)
    )
    with store.lock(5):
        after, _, found = recover(journal, store, tokens, stamp)
    assert found.replayed == after
    assert after.refresh_token == mlauth.Secret("TG-fake-new")
    assert read_env_file(stale_env)["ML_REFRESH_TOKEN"] == "TG-fake-new"
    assert not Path(journal.rescue_path).exists()
    assert not Path(journal.fallback_rescue_path).exists()


def test_writing_a_rescue_file_deletes_the_older_one_in_the_other_place(
    stale_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    journal = journal_for(stale_env)
    fallback = Path(journal.fallback_rescue_path)
    fallback.parent.mkdir(parents=True)
    fallback.write_text(rescue_json("sha256:x", "APP_USR-old", "TG-fake-old", time.time()))
    newer = answer_tokens({"access_token": "APP_USR-new", "refresh_token": "TG-fake-new"})
    written = journal.write_rescue(mlauth.Secret("TG-fake-base"), newer)
    assert written == journal.rescue_path
    assert not fallback.exists()
    assert [path for path, _, _ in journal.rescues()] == [journal.rescue_path]
