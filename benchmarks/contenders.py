"""Each library set up as its own documentation recommends for keeping a refreshed token.

- requests-oauthlib: ``OAuth2Session(client_id, token=..., auto_refresh_url=...,
  auto_refresh_kwargs={client_id, client_secret}, token_updater=saver)`` ("Refreshing tokens",
  third recipe: define automatic token refresh and update).
- Authlib: ``OAuth2Session(client_id, client_secret, token=..., token_endpoint=...,
  update_token=saver)`` ("Auto Update Token"); ``client_secret_post`` because MercadoLibre
  takes the credentials in the form body.
- google-auth: ``AuthorizedSession(credentials)`` with a minimal ``Credentials`` subclass whose
  ``refresh()`` does the refresh grant; the token is saved with the quickstart's
  ``token.json`` pattern (write the JSON after getting a new token).
- mlauth: ``session.auth = MLAuth.from_env(".env")``.
- mlauth (redis): the same call; the ``.env`` holds only the credentials and
  ``ML_TOKEN_STORE=redis://...`` (what ``mlauth migrate --to`` leaves), so the tokens live in
  a real redis-server and every process is its own "machine" with its own ``.env``.

Each peer loads its token from its JSON file once, at start, and writes it back on every
refresh; none of them re-reads the file or takes a lock, because none of their docs says to.
"""

from __future__ import annotations

import datetime
import json
import urllib.parse
from pathlib import Path
from typing import Any

import google.auth.credentials
import google.auth.exceptions
import google.auth.transport
import requests

from mlauth import MLAuth

LIBRARIES = ("mlauth", "requests-oauthlib", "authlib", "google-auth")
# mlauth on the Redis store: only the storm runs it (it needs a redis-server).
MLAUTH_REDIS = "mlauth (redis)"
MLAUTH_KINDS = ("mlauth", MLAUTH_REDIS)
# Not a library: a constant header and a token that outlives the run, the floor of a run.
STATIC = "static"


class StaticBearer(requests.auth.AuthBase):
    """The cheapest possible auth: sets a header that never changes."""

    def __init__(self, token: str) -> None:
        self.header = f"Bearer {token}"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self.header
        return r


def load_json_token(path: Path) -> dict[str, Any]:
    token: dict[str, Any] = json.loads(path.read_text())
    return token


def save_json_token(path: Path, token: dict[str, Any]) -> None:
    # What the peers' docs show: write the file. No temp file, no fsync, no lock.
    with open(path, "w") as handle:
        json.dump(dict(token), handle)


def json_token(answer: dict[str, object], expires_at: float) -> dict[str, Any]:
    """A token dict as the OAuth libraries keep it, from a token endpoint answer."""
    return {
        "access_token": answer["access_token"],
        "refresh_token": answer["refresh_token"],
        "token_type": "Bearer",
        "expires_in": answer["expires_in"],
        "expires_at": expires_at,
    }


def _utcnow() -> datetime.datetime:
    # google-auth compares naive UTC datetimes.
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class RefreshGrantCredentials(google.auth.credentials.Credentials):
    """The smallest google-auth ``Credentials`` that speaks the refresh-token grant."""

    def __init__(
        self,
        token: dict[str, Any],
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        path: Path,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.token = token["access_token"]
        self.expiry = datetime.datetime.fromtimestamp(
            float(token["expires_at"]), datetime.timezone.utc
        ).replace(tzinfo=None)
        self._refresh_token = str(token["refresh_token"])
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._path = path

    def refresh(self, request: google.auth.transport.Request) -> None:
        body = urllib.parse.urlencode(
            {
                "grant_type": "refresh_token",
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "refresh_token": self._refresh_token,
            }
        )
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        response = request(url=self._token_url, method="POST", body=body, headers=headers)
        data = json.loads(response.data)
        if response.status != 200:
            raise google.auth.exceptions.RefreshError(  # type: ignore[no-untyped-call]
                f"token endpoint answered {response.status}: {data.get('error')}"
            )
        self.token = data["access_token"]
        self._refresh_token = data.get("refresh_token") or self._refresh_token
        self.expiry = _utcnow() + datetime.timedelta(seconds=float(data["expires_in"]))
        expires_at = self.expiry.replace(tzinfo=datetime.timezone.utc).timestamp()
        save_json_token(
            self._path, json_token({**data, "refresh_token": self._refresh_token}, expires_at)
        )


def make_session(
    library: str,
    store: Path,
    *,
    token_url: str,
    client_id: str,
    client_secret: str,
    margin: float,
) -> requests.Session:
    """A session for ``library`` whose token lives in ``store`` (.env for mlauth, else JSON).

    For ``mlauth (redis)`` the ``.env`` names the Redis store; ``MLAuth.from_env`` follows it.

    ``margin`` is how long before expiry a library that refreshes ahead does so: mlauth scales
    its own (a quarter of a short token's life); Authlib's ``leeway`` and google-auth's
    ``REFRESH_THRESHOLD`` are set to the same. requests-oauthlib has no such setting: it
    refreshes once the token has expired.
    """
    if library in MLAUTH_KINDS:
        session = requests.Session()
        session.auth = MLAuth.from_env(store)
        return session
    token = load_json_token(store)
    # Peers are imported only when used: 64 scale workers importing all of them would spend
    # seconds of the 2 cores on imports.
    if library == STATIC:
        session = requests.Session()
        session.auth = StaticBearer(token["access_token"])
        return session
    if library == "requests-oauthlib":
        from requests_oauthlib import OAuth2Session as OAuthlibSession

        return OAuthlibSession(  # type: ignore[no-any-return]
            client_id,
            token=token,
            auto_refresh_url=token_url,
            auto_refresh_kwargs={"client_id": client_id, "client_secret": client_secret},
            token_updater=lambda new: save_json_token(store, new),
        )
    if library == "authlib":
        from authlib.integrations.requests_client import OAuth2Session as AuthlibSession

        def update_token(new: dict[str, Any], refresh_token: str | None = None, **_: Any) -> None:
            save_json_token(store, new)

        return AuthlibSession(  # type: ignore[no-any-return]
            client_id,
            client_secret,
            token=token,
            token_endpoint=token_url,
            token_endpoint_auth_method="client_secret_post",
            update_token=update_token,
            leeway=margin,
        )
    if library == "google-auth":
        # The threshold is a module constant (3 min 45 s), longer than a benchmark token's
        # whole life: scaled like the others' margins, or every call would refresh.
        import google.auth._helpers
        from google.auth.transport.requests import AuthorizedSession

        if margin < google.auth._helpers.REFRESH_THRESHOLD.total_seconds():
            google.auth._helpers.REFRESH_THRESHOLD = datetime.timedelta(seconds=margin)
        credentials = RefreshGrantCredentials(
            token, token_url=token_url, client_id=client_id, client_secret=client_secret, path=store
        )
        return AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
    raise ValueError(
        f"unknown library {library!r}; pick one of {', '.join((*LIBRARIES, MLAUTH_REDIS))}"
    )
