"""Re-sending after a 401, against a real loopback server: bodies, cookies, options, redirects."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

import mlauth
from mlauth.stores.envfile import read_env_file, update_env_file
from mlauth.testing import FakeMercadoLibre
from tests.support.threads import refresh_turn_is_free


@pytest.fixture
def stale_env(fake_ml: FakeMercadoLibre, fake_ml_env: Path) -> Path:
    """A .env whose access token the server no longer accepts; its refresh token is live."""
    update_env_file(fake_ml_env, {"ML_ACCESS_TOKEN": "APP_USR-1234-010101-deadbeef-8035443"})
    return fake_ml_env


@pytest.fixture
def session(stale_env: Path) -> requests.Session:
    session = requests.Session()
    session.auth = mlauth.MLAuth.from_env(stale_env)
    return session


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_resent_once(response: requests.Response, fake: FakeMercadoLibre) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert [r.status_code for r in response.history] == [401]
    assert fake.stats()["refreshes"] == 1
    echo: dict[str, Any] = response.json()
    return echo


PAYLOAD = b"line one\nline two \xe2\x9c\x93\n" * 50


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"data": PAYLOAD}, PAYLOAD),
        ({"data": PAYLOAD.decode()}, PAYLOAD),
        ({"json": {"title": "Mate ✓", "price": 10}}, None),
        ({"data": {"a": "1", "b": "two words"}}, b"a=1&b=two+words"),
        ({"files": {"picture": ("p.jpg", PAYLOAD, "image/jpeg")}, "data": {"x": "1"}}, None),
    ],
    ids=["bytes", "str", "json", "form", "multipart"],
)
def test_in_memory_bodies_are_resent_identical(
    session: requests.Session,
    fake_ml: FakeMercadoLibre,
    kwargs: dict[str, Any],
    expected: bytes | None,
) -> None:
    response = session.post(f"{fake_ml.base_url}/items", **kwargs)
    echo = assert_resent_once(response, fake_ml)
    body = response.request.body
    sent = body if isinstance(body, bytes) else str(body).encode()
    assert echo["body_sha256"] == sha(expected if expected is not None else sent)
    assert echo["body_length"] == len(sent)
    # The first attempt went out with the same body object.
    assert response.history[0].request.body == response.request.body


def test_file_body_is_rewound_to_where_it_started(
    session: requests.Session, fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(b"HEADER" + PAYLOAD)
    with path.open("rb") as handle:
        handle.seek(6)  # the caller starts past a header: the re-send must too
        response = session.put(f"{fake_ml.base_url}/items/1", data=handle)
    echo = assert_resent_once(response, fake_ml)
    assert echo["body_sha256"] == sha(PAYLOAD)
    assert echo["body_length"] == len(PAYLOAD)


def test_bytesio_body_is_rewound(session: requests.Session, fake_ml: FakeMercadoLibre) -> None:
    response = session.post(f"{fake_ml.base_url}/items", data=io.BytesIO(PAYLOAD))
    assert assert_resent_once(response, fake_ml)["body_sha256"] == sha(PAYLOAD)


def test_generator_body_is_never_resent_empty(
    session: requests.Session, fake_ml: FakeMercadoLibre
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    response = session.post(f"{fake_ml.base_url}/items", data=chunks())
    # The 401 comes back as it is, but the token was refreshed: the next call just works.
    assert response.status_code == 401
    assert response.history == []
    assert fake_ml.stats()["refreshes"] == 1
    again = session.post(f"{fake_ml.base_url}/items", data=chunks())
    assert again.status_code == 200
    assert again.json()["body_sha256"] == sha(b"part one, part two")
    assert fake_ml.stats()["refreshes"] == 1


def test_cookies_are_carried_on_the_resend(
    session: requests.Session, fake_ml: FakeMercadoLibre
) -> None:
    response = session.get(f"{fake_ml.base_url}/users/me", cookies={"sid": "fake-session"})
    echo = assert_resent_once(response, fake_ml)
    assert echo["cookie"] == "sid=fake-session"


class RecordingAdapter(HTTPAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.sends: list[dict[str, Any]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.sends.append(dict(kwargs))
        return super().send(request, **kwargs)


def test_timeout_and_send_options_are_kept_on_the_resend(
    session: requests.Session, fake_ml: FakeMercadoLibre
) -> None:
    adapter = RecordingAdapter()
    session.mount("http://", adapter)
    response = session.get(f"{fake_ml.base_url}/users/me", timeout=(3.5, 7.25), stream=True)
    assert_resent_once(response, fake_ml)
    first, second = adapter.sends
    assert first == second
    assert second["timeout"] == (3.5, 7.25) and second["stream"] is True


def test_resend_persists_the_rotated_tokens(stale_env: Path, fake_ml: FakeMercadoLibre) -> None:
    before = read_env_file(stale_env)
    requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(stale_env))
    after = read_env_file(stale_env)
    assert after["ML_REFRESH_TOKEN"] != before["ML_REFRESH_TOKEN"]
    # The old refresh token is dead now; the stored one is the live one.
    assert fake_ml.stats()["refreshes"] == 1
    fresh = requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(stale_env))
    assert fresh.status_code == 200 and fresh.history == []


# -- redirects --------------------------------------------------------------------------------


def test_redirect_to_another_host_that_answers_401_gets_no_token_and_no_refresh(
    fake_ml: FakeMercadoLibre,
    fake_ml_env: Path,
    other_host: tuple[str, list[str | None]],
) -> None:
    other_url, seen = other_host
    session = requests.Session()
    session.auth = mlauth.MLAuth.from_env(fake_ml_env)
    response = session.get(f"{fake_ml.base_url}/redirect?to={other_url}/steal")
    assert response.status_code == 401
    assert [r.status_code for r in response.history] == [302]
    assert seen == [None]
    assert fake_ml.stats()["refreshes"] == 0
    assert fake_ml.stats()["token_requests"] == 0


def test_redirect_within_the_api_host_refreshes_once(
    session: requests.Session, fake_ml: FakeMercadoLibre
) -> None:
    response = session.get(f"{fake_ml.base_url}/redirect?to={fake_ml.base_url}/users/me")
    assert response.status_code == 200
    assert fake_ml.stats()["refreshes"] == 1
    assert fake_ml.stats()["invalid_grant"] == 0


# -- what a refresh does to the .env, and how peers see it ----------------------------------


def test_refresh_keeps_the_env_byte_for_byte_outside_the_token_keys(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    real = tmp_path / "secrets" / "ml.env"
    real.parent.mkdir()
    fake_ml.write_env(real)
    update_env_file(real, {"ML_ACCESS_TOKEN": "APP_USR-1234-010101-deadbeef-8035443"})
    original = real.read_bytes()
    head = b"# seller pipeline\r\nexport AMAZON_TAG='my-tag' # affiliate\n\n"
    tail = b"SLEEP_BETWEEN=0.5   # seconds\n# end\n"
    real.write_bytes(head + original + tail)
    real.chmod(0o640)
    link = tmp_path / ".env"
    link.symlink_to(real)

    response = requests.get(f"{fake_ml.base_url}/users/me", auth=mlauth.MLAuth.from_env(link))
    assert response.status_code == 200 and fake_ml.stats()["refreshes"] == 1

    def untouched(data: bytes) -> list[bytes]:
        return [
            line
            for line in data.splitlines(keepends=True)
            if not line.startswith((b"ML_ACCESS_TOKEN=", b"ML_REFRESH_TOKEN=", b"ML_TOKEN_"))
        ]

    after = real.read_bytes()
    assert after.startswith(head)
    assert untouched(after) == untouched(head + original + tail)
    assert after != head + original + tail  # the token lines did change
    assert link.is_symlink()
    assert oct(real.stat().st_mode & 0o777) == oct(0o640)


class CountingStore(mlauth.EnvFileStore):
    loads = 0

    def load(self) -> tuple[mlauth.TokenSet, Any]:
        self.loads += 1
        return super().load()


def test_peer_token_is_picked_up_before_a_401_and_the_file_is_not_reread_needlessly(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    store = CountingStore(stale_env)
    peer = mlauth.MLAuth.from_env(stale_env, store=store)  # holds the stale token now
    loads_at_start = store.loads
    # Another "process" refreshes: the server kills the stale token and issues a new one.
    assert requests.get(f"{fake_ml.base_url}/x", auth=mlauth.MLAuth.from_env(stale_env)).ok
    assert fake_ml.stats()["refreshes"] == 1
    served_401 = fake_ml.stats()["api_401"]

    session = requests.Session()
    session.auth = peer
    for _ in range(50):
        response = session.get(f"{fake_ml.base_url}/users/me")
        assert response.status_code == 200 and response.history == []
    assert fake_ml.stats()["api_401"] == served_401  # the peer never sent the dead token
    assert fake_ml.stats()["refreshes"] == 1
    assert store.loads - loads_at_start == 1  # one read for the change, none for the 49 after


class LockProbingAdapter(HTTPAdapter):
    """Records, at each send, whether the refresh lock and the auth's refresh turn are free."""

    def __init__(self, lock_path: str, auth: mlauth.MLAuth) -> None:
        super().__init__()
        self.lock_path, self.auth = lock_path, auth
        self.free: list[tuple[bool, bool | None]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        from mlauth.stores.lock import ProcessLock

        try:
            with ProcessLock(self.lock_path).hold(timeout=0):
                file_lock_free = True
        except mlauth.LockTimeoutError:
            file_lock_free = False
        # The first send carries the dead token, before any refresh: a probe there would spend
        # one. The re-send follows the refresh, whose token is young: probing spends nothing.
        turn_free = refresh_turn_is_free(self.auth) if self.free else None
        self.free.append((file_lock_free, turn_free))
        return super().send(request, **kwargs)


def test_no_lock_is_held_while_the_request_is_resent(
    fake_ml: FakeMercadoLibre, stale_env: Path
) -> None:
    auth = mlauth.MLAuth.from_env(stale_env, lock_timeout=2.0)
    adapter = LockProbingAdapter(f"{stale_env}.lock", auth)
    session = requests.Session()
    session.mount("http://", adapter)
    session.auth = auth
    response = session.get(f"{fake_ml.base_url}/users/me")
    assert_resent_once(response, fake_ml)
    assert adapter.free == [(True, None), (True, True)]
