"""mlauth.install() in this process: what gets the token, what is left alone, and undoing it."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from requests_mock import ANY, Mocker

import mlauth
from mlauth.testing import FakeMercadoLibre
from tests.support.legacy_apps import RecordingServer
from tests.support.threads import run_threads

ORIGINAL = requests.Session.request


@pytest.fixture(autouse=True)
def _always_uninstall() -> Iterator[None]:
    yield
    mlauth.uninstall()
    assert requests.Session.request is ORIGINAL


@pytest.fixture
def expired_env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    return env


@pytest.fixture
def other() -> Iterator[RecordingServer]:
    with RecordingServer(host="127.0.0.2") as server:
        yield server


def test_plain_requests_calls_get_the_token_over_a_stale_header(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    session_before = requests.Session()  # made before install(): covered too
    mlauth.install(expired_env)
    stale = {"Authorization": "Bearer APP_USR-stale-legacy-token"}
    url = f"{fake_ml.base_url}/items"
    assert requests.get(url, headers=stale).status_code == 200
    assert requests.post(url, headers=stale, json={"a": 1}).status_code == 200
    assert requests.put(url, headers=stale, data=b"x").status_code == 200
    assert session_before.get(url, headers=stale).status_code == 200
    with requests.Session() as session_after:
        assert session_after.get(url).status_code == 200
    session_before.close()
    assert fake_ml.stats()["api_401"] == 0


def test_a_401_is_absorbed_by_a_refresh_and_a_re_send(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.token_lifetime = 0.001  # dead on the server at once; the .env says 1 h left
    fake_ml.write_env(env, expires_at=time.time() + 3600)
    fake_ml.token_lifetime = 3600.0
    mlauth.install(env)
    response = requests.get(f"{fake_ml.base_url}/users/me", headers={"Authorization": "x"})
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert fake_ml.stats()["refreshes"] == 1


def test_other_hosts_keep_their_headers_and_never_get_the_token(
    fake_ml: FakeMercadoLibre, expired_env: Path, other: RecordingServer
) -> None:
    auth = mlauth.install(expired_env)
    requests.get(f"{other.url}/a", headers={"Authorization": "Bearer stale-legacy"})
    requests.post(f"{other.url}/b", json={})
    with requests.Session() as session:
        session.get(f"{other.url}/c")
    # A redirect from the API to the other host must not carry the token either.
    requests.get(f"{fake_ml.base_url}/redirect", params={"to": f"{other.url}/d"})
    assert other.headers() == ["Bearer stale-legacy", None, None, None]
    assert auth.tokens.access_token is not None


def test_explicit_auth_and_session_auth_win(fake_ml: FakeMercadoLibre, expired_env: Path) -> None:
    mlauth.install(expired_env)
    url = f"{fake_ml.base_url}/users/me"
    # An explicit auth (here one that sends nothing usable) is left alone: the 401 comes back
    # and mlauth does not refresh behind the caller's choice.
    assert requests.get(url, auth=("user", "pass")).status_code == 401
    with requests.Session() as session:
        session.auth = ("user", "pass")
        assert session.get(url).status_code == 401
    assert fake_ml.stats()["token_requests"] == 0


def test_auth_passed_positionally_is_seen_as_the_callers(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    mlauth.install(expired_env)
    url = f"{fake_ml.base_url}/users/me"
    stale = {"Authorization": "Bearer stale"}
    with requests.Session() as session:
        # request(method, url, params, data, headers, cookies, files, auth): auth is 8th.
        explicit = session.request("GET", url, None, None, stale, None, None, ("user", "pass"))
        assert explicit.status_code == 401  # the caller's choice, not replaced
        assert fake_ml.stats()["token_requests"] == 0
        none_given = session.request("GET", url, None, None, stale, None, None, None)
        assert none_given.status_code == 200  # an explicit None: mlauth's auth goes there
        assert none_given.request.body is None  # and nothing landed in files= or data=


def test_a_session_subclass_overriding_request_is_covered(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    seen: list[str] = []

    class Logged(requests.Session):
        def request(  # type: ignore[override]
            self, method: str, url: str, *args: object, **kwargs: object
        ) -> requests.Response:
            seen.append(url)
            return super().request(method, url, *args, **kwargs)  # type: ignore[arg-type]

    mlauth.install(expired_env)
    url = f"{fake_ml.base_url}/users/me"
    with Logged() as session:
        assert session.get(url, headers={"Authorization": "Bearer stale"}).status_code == 200
    assert seen == [url]
    mlauth.uninstall()
    with Logged() as session:
        assert session.get(url, headers={"Authorization": "Bearer stale"}).status_code == 401


def test_the_token_endpoint_gets_no_bearer_token(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    auth = mlauth.install(expired_env)
    seen: list[str | None] = []

    def record(r: requests.Response, **kwargs: object) -> None:
        seen.append(r.request.headers.get("Authorization"))

    data = {"grant_type": "refresh_token", "refresh_token": "TG-not-a-token"}
    requests.post(fake_ml.token_url, data=data, hooks={"response": record})
    assert seen == [None]
    assert auth.tokens.access_token is not None


def test_the_refresh_post_does_not_go_through_patched_session_request(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    # Whatever sits on Session.request (our listeners, other libraries' patches) must not
    # run inside the locked refresh.
    env = tmp_path / ".env"
    fake_ml.write_env(env, expires_at=time.time() - 60)
    mlauth.install(env)
    ours = requests.Session.request
    seen: list[str] = []

    def theirs(
        self: requests.Session, method: str, url: str, *args: object, **kw: object
    ) -> object:
        seen.append(url)
        return ours(self, method, url, *args, **kw)  # type: ignore[arg-type]

    requests.Session.request = theirs  # type: ignore[method-assign,assignment]
    try:
        url = f"{fake_ml.base_url}/users/me"
        assert requests.get(url).status_code == 200
    finally:
        requests.Session.request = ours  # type: ignore[method-assign]
    assert fake_ml.stats()["refreshes"] == 1
    assert seen == [url]


@pytest.mark.parametrize(
    ("url", "gets_token"),
    [
        ("https://api.mercadolibre.com/oauth/token", False),
        ("https://api.mercadolibre.com:443/oauth/token", False),
        ("HTTPS://API.MercadoLibre.com/oauth/token/", False),
        ("https://api.mercadolibre.com/oauth/token?x=1#f", False),
        ("https://api.mercadolibre.com:443/items", True),
        ("https://api.mercadolibre.com/oauth/token/extra", True),
    ],
)
def test_the_token_endpoint_is_recognised_however_its_url_is_spelled(
    env_file: Path, requests_mock: Mocker, url: str, gets_token: bool
) -> None:
    mlauth.install(env_file)  # token URL https://api.mercadolibre.com/oauth/token
    requests_mock.post(ANY, text="{}")
    requests.post(url, data={"grant_type": "refresh_token"})
    sent = requests_mock.last_request.headers.get("Authorization")
    assert (sent is not None) is gets_token, sent


def test_install_is_idempotent_and_refuses_a_second_env(
    fake_ml: FakeMercadoLibre, expired_env: Path, tmp_path: Path
) -> None:
    first = mlauth.install(expired_env)
    assert mlauth.install(str(expired_env)) is first
    assert mlauth.installed() is first
    patched = requests.Session.request
    other_env = tmp_path / "other.env"
    fake_ml.write_env(other_env)
    with pytest.raises(mlauth.ConfigError, match="already installed"):
        mlauth.install(other_env)
    assert requests.Session.request is patched
    mlauth.uninstall()
    assert requests.Session.request is ORIGINAL
    assert mlauth.installed() is None
    mlauth.uninstall()  # twice is fine
    assert mlauth.install(other_env) is not first


def test_concurrent_installs_patch_once(fake_ml: FakeMercadoLibre, expired_env: Path) -> None:
    got: list[mlauth.MLAuth] = []
    lock = threading.Lock()

    def install() -> None:
        auth = mlauth.install(expired_env)
        with lock:
            got.append(auth)

    run_threads(install, 8)
    assert len(got) == 8 and all(a is got[0] for a in got)
    mlauth.uninstall()
    assert requests.Session.request is ORIGINAL  # not one of our wrappers around another


def test_uninstall_stops_injecting(fake_ml: FakeMercadoLibre, expired_env: Path) -> None:
    mlauth.install(expired_env)
    mlauth.uninstall()
    stale = {"Authorization": "Bearer stale"}
    assert requests.get(f"{fake_ml.base_url}/users/me", headers=stale).status_code == 401


def test_a_bound_request_saved_while_installed_still_works_after_uninstall(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    mlauth.install(expired_env)
    session = requests.Session()
    bound = session.request  # our wrapper, bound: legacy code keeps such things in globals
    url = f"{fake_ml.base_url}/users/me"
    assert bound("GET", url).status_code == 200
    mlauth.uninstall()
    seen: list[str | None] = []

    def record(r: requests.Response, **kwargs: object) -> None:
        seen.append(r.request.headers.get("Authorization"))

    stale = {"Authorization": "Bearer APP_USR-stale"}
    response = bound("GET", url, headers=stale, hooks={"response": record})
    assert response.status_code == 401  # passed through, with the caller's header only
    assert seen == ["Bearer APP_USR-stale"]
    session.close()


def test_a_patch_on_top_of_ours_survives_uninstall(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    mlauth.install(expired_env)
    ours = requests.Session.request

    def theirs(self: requests.Session, *args: object, **kwargs: object) -> requests.Response:
        return ours(self, *args, **kwargs)  # type: ignore[arg-type]

    requests.Session.request = theirs  # type: ignore[method-assign,assignment]
    try:
        mlauth.uninstall()
        assert requests.Session.request is theirs
        stale = {"Authorization": "Bearer stale"}
        assert requests.get(f"{fake_ml.base_url}/users/me", headers=stale).status_code == 401
    finally:
        requests.Session.request = ours  # type: ignore[method-assign]
        mlauth.uninstall()


def legacy_namespace(token: str) -> types.ModuleType:
    module = types.ModuleType("legacy")
    module.ML_ACCESS_TOKEN = token  # type: ignore[attr-defined]
    module.HEADERS = {"Authorization": f"Bearer {token}", "Accept": "json"}  # type: ignore[attr-defined]
    calls: list[str] = []
    module.calls = calls  # type: ignore[attr-defined]

    def refresh_ml_token() -> bool:
        calls.append("legacy refresh ran")
        return True

    module.refresh_ml_token = refresh_ml_token  # type: ignore[attr-defined]
    return module


def test_globals_follow_this_process_refreshes_and_a_peers(
    fake_ml: FakeMercadoLibre, expired_env: Path
) -> None:
    auth = mlauth.install(expired_env)
    legacy = legacy_namespace("stale")
    headers = legacy.HEADERS
    mlauth.keep_globals_current(legacy)
    assert auth.tokens.access_token.reveal() == legacy.ML_ACCESS_TOKEN  # type: ignore[union-attr]
    new = auth.refresh()
    assert new.access_token is not None
    assert new.access_token.reveal() == legacy.ML_ACCESS_TOKEN
    assert headers is legacy.HEADERS  # updated in place
    assert headers == {"Authorization": f"Bearer {new.access_token.reveal()}", "Accept": "json"}
    # A peer process refreshes: the globals follow after this process's next request.
    peer = mlauth.MLAuth.from_env(expired_env).refresh()
    assert peer.access_token is not None
    requests.get(f"{fake_ml.base_url}/users/me")
    assert peer.access_token.reveal() == legacy.ML_ACCESS_TOKEN


def test_redirected_legacy_refresh_runs_mlauths_and_reports_failure(
    fake_ml: FakeMercadoLibre, tmp_path: Path
) -> None:
    env = tmp_path / ".env"
    fake_ml.write_env(env, extra={"ML_TOKEN_REFRESHED_AT": str(time.time() - 60)})
    auth = mlauth.install(env)
    legacy = legacy_namespace("stale")
    mlauth.keep_globals_current(legacy)
    original = mlauth.redirect_refresh(legacy)
    assert legacy.refresh_ml_token is not original
    assert legacy.refresh_ml_token() is True
    assert fake_ml.stats()["refreshes"] == 1 and legacy.calls == []
    assert auth.tokens.access_token.reveal() == legacy.ML_ACCESS_TOKEN  # type: ignore[union-attr]
    # A dead chain: the legacy caller gets False, as its own function would have said.
    fake_ml.revoke_refresh_tokens()
    env.write_text(env.read_text() + f"ML_TOKEN_REFRESHED_AT={time.time() - 60}\n")
    assert legacy.refresh_ml_token() is False
    with pytest.raises(mlauth.ConfigError, match="no function"):
        mlauth.redirect_refresh(legacy, "no_such_function")


def test_helpers_need_an_auth_or_an_install() -> None:
    with pytest.raises(mlauth.ConfigError, match=r"mlauth\.install"):
        mlauth.keep_globals_current(legacy_namespace("x"))
