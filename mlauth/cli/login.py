"""The authorization-code flow behind ``mlauth login``: the URL, PKCE, the pasted answer.

MercadoLibre requires an https ``redirect_uri`` registered for the app, so a local callback
server usually cannot receive the code: the seller opens the URL, authorizes, and pastes the
address the browser was sent to (or just the ``code`` in it).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
import time
from urllib.parse import parse_qs, urlencode, urlsplit

from mlauth.config import DEFAULT_TOKEN_URL, check_token_url, env_settings
from mlauth.endpoint import TokenEndpoint
from mlauth.errors import ConfigError, InvalidGrantError, RefreshError
from mlauth.secret import Secret
from mlauth.stores.base import TokenStore
from mlauth.tokens import TokenSet, this_process

__all__ = [
    "AUTH_HOSTS",
    "LoginRequest",
    "authorization_base",
    "complete_login",
    "parse_pasted",
]

# The authorization page of each site (ML-FACTS.md); others: --auth-url / ML_AUTH_URL.
AUTH_HOSTS = {
    "MLA": "https://auth.mercadolibre.com.ar",  # Argentina
    "MLB": "https://auth.mercadolivre.com.br",  # Brazil
    "MLM": "https://auth.mercadolibre.com.mx",  # Mexico
    "MCO": "https://auth.mercadolibre.com.co",  # Colombia
    "MLC": "https://auth.mercadolibre.cl",  # Chile
    "MLU": "https://auth.mercadolibre.com.uy",  # Uruguay
    "MPE": "https://auth.mercadolibre.com.pe",  # Peru
}


def authorization_base(site: str, override: str | None) -> str:
    """The authorization page's origin: ``override`` if given, else the site's."""
    if override:
        # The token URL's check: https (plain http on loopback, a test server), and nothing a
        # browser and urllib.parse could read as two hosts: the seller types a password there.
        where = "the authorization page's URL (--auth-url, ML_AUTH_URL)"
        return check_token_url(override, where, AUTH_HOSTS["MLA"]).rstrip("/")
    try:
        return AUTH_HOSTS[site.upper()]
    except KeyError:
        known = ", ".join(AUTH_HOSTS)
        raise ConfigError(
            f"unknown site {site!r}; use one of {known}, or give the authorization page's "
            "origin with --auth-url (e.g. https://auth.mercadolibre.com.ar)"
        ) from None


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclasses.dataclass(frozen=True)
class LoginRequest:
    """One authorization attempt: what goes in the URL, and what the exchange must send."""

    auth_base: str
    client_id: str
    redirect_uri: str
    state: str
    code_verifier: Secret | None

    @classmethod
    def new(cls, auth_base: str, client_id: str, redirect_uri: str, *, pkce: bool) -> LoginRequest:
        verifier = Secret(secrets.token_urlsafe(64)) if pkce else None  # 86 chars, RFC 7636
        return cls(auth_base, client_id, redirect_uri, secrets.token_urlsafe(16), verifier)

    @property
    def url(self) -> str:
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "state": self.state,
        }
        if self.code_verifier is not None:
            query["code_challenge"] = _s256(self.code_verifier.reveal())
            query["code_challenge_method"] = "S256"
        return f"{self.auth_base}/authorization?{urlencode(query)}"


def parse_pasted(text: str) -> tuple[Secret, str | None]:
    """(code, state) from a pasted redirect URL, or (code, None) from a bare code."""
    text = text.strip()
    if not text:
        raise ConfigError("nothing was pasted; paste the URL you were redirected to, or its code")
    if "?" in text or "://" in text:
        query = parse_qs(urlsplit(text).query)
        if "error" in query:
            detail = query.get("error_description", query["error"])[0]
            raise ConfigError(
                f"the authorization page answered an error: {detail}. Authorize again and "
                "paste the new address"
            )
        codes, states = query.get("code"), query.get("state")
        if not codes or not codes[0]:
            raise ConfigError(
                "the pasted URL has no code= parameter; paste the whole address the browser "
                "shows after you authorize (it starts with your redirect URI)"
            )
        return Secret(codes[0]), (states[0] if states else None)
    if any(ch.isspace() for ch in text):
        raise ConfigError("the pasted code contains white space; paste the code or the URL")
    return Secret(text), None


def _endpoint(env_path: str) -> TokenEndpoint:
    """The token endpoint the ``.env`` configures."""
    settings = env_settings(env_path)
    secret = settings["client_secret"]
    assert isinstance(secret, Secret)  # env_settings wraps it
    return TokenEndpoint(
        str(settings.get("token_url") or DEFAULT_TOKEN_URL), str(settings["client_id"]), secret
    )


def complete_login(
    env_path: str,
    store: TokenStore,
    *,
    code: Secret,
    redirect_uri: str,
    code_verifier: Secret | None = None,
    lock_timeout: float = 120.0,
) -> TokenSet:
    """Exchange ``code`` with the ``.env``'s credentials and save the tokens in ``store``.

    The store is checked writable before each attempt to spend the single-use code, and the
    tokens are saved under the refresh lock so no running process refreshes the old chain
    meanwhile. They go wherever the store keeps tokens: the ``.env``, or the Redis that its
    ``ML_TOKEN_STORE`` names (the file is then left as it is).
    """
    endpoint = _endpoint(env_path)
    with store.lock(lock_timeout):
        # Read under the lock: a fenced store (Redis) commits the new tokens over the version
        # read here, so running processes see them as the chain's next link. No usable tokens
        # there (an empty Redis key, a mangled line) is fine: they are being replaced. The
        # transaction keeps the raw answer (the journal, or Redis) before it is read: the
        # code is spent by then, and the answer holds the only copy of the new chain.
        txn = store.transaction(login=True)
        started = time.time()
        checked = False

        def before_attempt() -> None:
            nonlocal started, checked
            if not checked:  # expiry counts from the first POST, after the check's fsync
                txn.begin_login()
                checked = True
                started = time.time()
            else:
                store.check_writable()  # and a Redis store renews its lock

        try:
            answer = endpoint.exchange_code(
                code,
                redirect_uri,
                code_verifier=code_verifier,
                before_attempt=before_attempt,
                on_answer=lambda raw, at: txn.answered(raw, started=started, at=at),
            )
        except InvalidGrantError as exc:
            # Not an InvalidGrantError: the chain is not what failed, this login did.
            detail = exc.description or "no detail"
            raise RefreshError(
                f"the authorization code was refused ({exc.error}: {detail}). A code works "
                "once, for a few minutes, with the same redirect URI "
                "(and, with --pkce, from the same login). Run `mlauth login` again.",
                status_code=exc.status_code,
                error=exc.error,
                description=exc.description,
            ) from None
        except RefreshError as exc:
            error = txn.abort(code, exc)  # says where an unusable answer is kept
            if error is exc:
                raise
            raise error from None
        if answer.refresh_token is None:
            raise ConfigError(
                "the token answer had no refresh_token: give the app the offline_access scope "
                "in the developer panel, then run `mlauth login` again"
            )
        tokens = TokenSet(
            access_token=answer.access_token,
            refresh_token=answer.refresh_token,
            expires_at=None if answer.expires_in is None else started + answer.expires_in,
            refreshed_at=started,
            refreshed_by=f"mlauth login, {this_process()}",
        )
        txn.commit(tokens)
        # After the save and still under the lock: the dead chain's marker goes, never while
        # the store could still hold the dead token, nor while a refresher looks.
        store.clear_reauthorization()
    return tokens
