"""The ``mlauth`` command: status, token, refresh, login, migrate, run, demo.

Each command is a ``_cmd_*`` function registered in :func:`build_parser`; adding one is a
function plus one ``_command(...)`` line. Commands reach the tokens only through the
:class:`~mlauth.TokenStore` that :func:`~mlauth.stores.store_from_env` picks and through
:class:`~mlauth.MLAuth`'s public methods, so any store works with every command.

Exit codes: 0 success; 1 an expected failure (missing or bad configuration, the token
endpoint refused or kept failing, an unwritable or unreachable store, a lock held too long, a
bad or mismatched authorization code, ``migrate`` finding another chain without ``--force``
or the ``redis`` extra missing); 2 a usage error; 3 re-authorization required (the refresh
token is missing or dead, or an earlier ``invalid_grant`` marked it dead: run ``mlauth
login``; ``mlauth token`` still prints an access token of a dead chain that has not expired,
saying on stderr for how long it works); 4 ``mlauth check`` found the chain degraded
(:mod:`.health` says what that means); 130 interrupted. ``mlauth run`` exits like the
others until the command starts, then with the command's own code (127 if it was not found,
126 if it could not be executed, 1 if it is a Python that cannot import mlauth). Expected
failures print one line naming the problem and the fix on stderr, never a traceback; no
command prints a token except ``mlauth token``, whose output is the access token alone.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mlauth import __version__
from mlauth.config import env_settings, token_hosts_row
from mlauth.errors import ConfigError, InvalidGrantError, MLAuthError, StoreError, masked
from mlauth.integrations.requests_auth import MLAuth
from mlauth.logs import LEVEL_VARIABLE, OFF, level_from_environment, show_on_stderr
from mlauth.preflight import refresh_problem
from mlauth.secret import Secret, mask, redact_url, url_scheme
from mlauth.sellers import Sellers
from mlauth.stores import store_from_env
from mlauth.stores.base import TokenStore
from mlauth.stores.envfile import read_env_file, secrets_of
from mlauth.stores.select import STORE_KEY, sellers_store
from mlauth.stores.sellers import SELLER_SCHEMES, SellerStores, check_user_id
from mlauth.terminal import printable
from mlauth.tokens import TokenSet

from . import sellers as sellers_cli
from .health import DEGRADED, OK, REAUTHORIZE, examine
from .login import AUTH_HOSTS, LoginRequest, authorization_base, complete_login, parse_pasted
from .times import duration as _duration
from .times import when as _when

__all__ = [
    "EXIT_DEGRADED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REAUTHORIZE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REAUTHORIZE = 3
# Only `mlauth check`: 1-3 already mean error, usage and re-authorization for every command,
# and a probe or cron job tells "look soon" from "log in now" by the code alone.
EXIT_DEGRADED = 4


class ReauthorizationRequired(MLAuthError):
    """The store has no live refresh token: only a new authorization helps (exit 3).

    ``note``, when set, is printed on a line of its own: what still works meanwhile.
    """

    first = False  # the chain died: the seller authorizes *again*
    note: str | None = None


class AuthorizationRequired(ReauthorizationRequired):
    """No refresh token at all (a .env with only the credentials): the first authorization."""

    first = True


def _login_hint(env: str, *, again: bool = True, seller: str | None = None) -> str:
    command = f"run `mlauth login --env {shlex.quote(env)}"
    command += f" --seller {seller}`" if seller else "`"
    if again:
        return f"{command} to authorize the app again"
    return f"{command} to authorize the app and save its first tokens"


def _expiry(tokens: TokenSet) -> str:
    if tokens.access_token is None:
        return "no access token (fetched at the next request)"
    left = tokens.expires_in()
    if left is None:
        return "unknown (refreshed on the first 401)"
    assert tokens.expires_at is not None
    if left <= 0:
        return f"expired {_duration(left)} ago ({_when(tokens.expires_at)})"
    return f"in {_duration(left)} ({_when(tokens.expires_at)})"


def _summary(tokens: TokenSet) -> str:
    access = tokens.access_token.fingerprint if tokens.access_token else "<none>"
    refresh = tokens.refresh_token.fingerprint if tokens.refresh_token else "<none>"
    return f"access {access}, refresh {refresh}, expires {_expiry(tokens)}"


def _load(store: TokenStore) -> TokenSet:
    tokens, _ = store.load()
    if tokens.refresh_token is None:
        raise AuthorizationRequired(f"{store.location} holds no refresh token")
    return tokens


def _check_reauthorization(store: TokenStore) -> None:
    """Exit 3 if an ``invalid_grant`` already marked the stored refresh token dead."""
    message = store.reauthorization_required()
    if message is not None:
        raise ReauthorizationRequired(message)


def _one_chain(args: argparse.Namespace) -> TokenStore:
    """The store of the chain a command acts on: the ``.env``'s, or with a store of many
    sellers the one ``--seller`` names (without it, the store's only seller; several are a
    ConfigError naming them and ``--seller``)."""
    # `mlauth run` takes no --seller: its command's Pythons build their store from the .env
    # alone (its ML_TOKEN_SELLER, or the only seller), and so does its check here.
    return store_from_env(args.env, seller=getattr(args, "seller", None))


def _chain_store(args: argparse.Namespace) -> TokenStore:
    """The store, once the credentials are there and it holds a refresh token (else exit 3)."""
    # Credentials first: a .env without them has no refresh token either, and logging in
    # (the fix for a missing token) would fail on the credentials anyway.
    env_settings(args.env)
    store = _one_chain(args)
    _load(store)  # exit 3 rather than a ConfigError when there is no refresh token
    return store


def _auth(args: argparse.Namespace, store: TokenStore | None = None) -> MLAuth:
    if store is None:
        store = _chain_store(args)
        _check_reauthorization(store)  # a token known dead: no request just to learn it again
    # Not from_env: its start-up check would log an ERROR that `run` reports itself, and that
    # `token` and `refresh` get from the operation itself, in one line.
    return MLAuth(store=store, **env_settings(args.env))  # type: ignore[arg-type]


# -- the commands ------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    if args.json:
        return _status_json(args)
    store = _one_chain(args)
    tokens, _ = store.load()
    busy = store.refresh_in_progress()
    rows = [
        ("store", store.location),  # a Redis URL's password is masked there
        *([("seller", store.seller)] if store.seller is not None else []),
        ("access token", tokens.access_token.fingerprint if tokens.access_token else "<none>"),
        ("refresh token", tokens.refresh_token.fingerprint if tokens.refresh_token else "<none>"),
        ("expires", _expiry(tokens)),
    ]
    if tokens.refreshed_at is not None:
        ago = _duration(time.time() - tokens.refreshed_at)
        by = f" by {tokens.refreshed_by}" if tokens.refreshed_by else ""
        rows.append(("last refresh", f"{_when(tokens.refreshed_at)} ({ago} ago){by}"))
    else:
        rows.append(("last refresh", "unknown"))
    rows.append(("refresh running", {True: "yes (lock held)", False: "no", None: "unknown"}[busy]))
    rows.append(("token sent to", token_hosts_row(args.env)))
    rows += store.status_details()
    # A token or the secret where another value belongs (pasted under the wrong key, say) is
    # shown as its fingerprint, like the tokens' own rows.
    known = [tokens.access_token, tokens.refresh_token, *secrets_of(read_env_file(args.env))]
    for label, value in rows:
        # Values come from the store (a Redis hash, the .env, the journal): whoever can write
        # there must not be able to drive the terminal of whoever runs status.
        print(printable(mask(f"{label + ':':<18}{value}", known)))
    sys.stdout.flush()  # the rows first, then the problem on stderr, in a terminal too
    env_settings(args.env)  # a missing secret or bad ML_API_HOSTS fails every refresh: exit 1
    if tokens.refresh_token is None:
        raise AuthorizationRequired(f"{store.location} holds no refresh token")
    _check_reauthorization(store)
    return EXIT_OK


def _status_json(args: argparse.Namespace) -> int:
    """The status as one JSON document (mlauth/schemas/status.schema.json) on stdout; exit 3
    with the usual lines on stderr when re-authorization is required, else 0 (degraded too:
    ``mlauth check`` is the command that judges)."""
    health = examine(args.env, seller=args.seller)
    print(health.render(), flush=True)
    reason = health.reason(REAUTHORIZE)
    if reason is not None:
        error_class = AuthorizationRequired if reason.first else ReauthorizationRequired
        raise error_class(reason.message)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    """One line and an exit code for a cron job or a probe: 0 ok, 4 degraded, 3 log in."""
    health = examine(args.env, seller=args.seller)
    if health.state == OK:
        assert health.tokens is not None
        print(printable(f"mlauth: ok: {_summary(health.tokens)}"))
        return EXIT_OK
    if health.state == DEGRADED:
        why = "; ".join(reason.message for reason in health.reasons)
        print(printable(f"mlauth: degraded: {why}"), file=sys.stderr)
        return EXIT_DEGRADED
    reason = health.reason(REAUTHORIZE)
    assert reason is not None
    what = "authorization required" if reason.first else "re-authorization required"
    fix = _login_hint(args.env, again=not reason.first, seller=health.seller)
    print(printable(f"mlauth: {what}: {reason.message}; fix: {fix}"), file=sys.stderr)
    return EXIT_REAUTHORIZE


def _cmd_token(args: argparse.Namespace) -> int:
    store = _chain_store(args)
    dead = store.reauthorization_required()
    if dead is None:
        tokens = _auth(args, store).valid_tokens()
        # A refresh ahead of expiry that met invalid_grant leaves the still-valid token to
        # use, as it does in every process, and the marker that says the chain is dead.
        dead = store.reauthorization_required()
    else:
        tokens = _load(store)  # no request just to learn again that the chain is dead
    if dead is not None:
        error = ReauthorizationRequired(dead)
        error.note = _print_if_still_valid(tokens)
        raise error
    assert tokens.access_token is not None
    print(tokens.access_token.reveal())
    return EXIT_OK


def _print_if_still_valid(tokens: TokenSet) -> str | None:
    """Print the access token of a dead chain if it has not expired; what to say about it.

    `curl -H "Authorization: Bearer $(mlauth token)"` then keeps working for as long as the
    token does, as the library keeps using it in a running process, while the exit code (3)
    and stderr say at once that the seller must authorize again.
    """
    left = tokens.expires_in()
    if tokens.access_token is None or (left is not None and left <= 0):
        return None
    print(tokens.access_token.reveal(), flush=True)
    if left is None:
        return (
            "the access token printed has an unknown expiry: it works until MercadoLibre "
            "answers 401, and nothing will after that until the app is authorized again"
        )
    assert tokens.expires_at is not None
    return (
        f"the access token printed still works for {_duration(left)} (until "
        f"{_when(tokens.expires_at)}); nothing will after that until the app is authorized again"
    )


def _cmd_refresh(args: argparse.Namespace) -> int:
    tokens = _auth(args).refresh()
    print(f"refreshed: {_summary(tokens)}")
    return EXIT_OK


def _sellers_or_none(args: argparse.Namespace) -> SellerStores | None:
    """The store of many sellers the ``.env`` names (a Redis is one when ``--seller`` asks
    for one, or when it holds sellers), else None."""
    values = read_env_file(args.env)
    with masked(secrets_of(values)):  # a token pasted under another key is not quoted
        return sellers_store(values, args.env, wanted=getattr(args, "seller", None) is not None)


def _cmd_login(args: argparse.Namespace) -> int:
    stores = _sellers_or_none(args)
    # With many sellers, whoever authorizes is added: no one seller's store to pick.
    store = None if stores is not None else store_from_env(args.env, seller=args.seller)
    values = read_env_file(args.env)
    redirect_uri = args.redirect_uri or (values.get("ML_REDIRECT_URI") or "").strip()
    auth_url = args.auth_url or values.get("ML_AUTH_URL")
    del values  # the whole .env (secret, tokens): not a local of the errors raised below
    # Everything the exchange will need is checked before the seller is sent to authorize:
    # a code pasted into a login that then fails on configuration is wasted effort.
    settings = env_settings(args.env)  # credentials, ML_TOKEN_URL, ML_API_HOSTS
    client_id = str(settings["client_id"])
    if not redirect_uri:
        raise ConfigError(
            "no redirect URI: pass --redirect-uri with the one registered for your app, or "
            f"set ML_REDIRECT_URI in {args.env}"
        )
    base = authorization_base(args.site, auth_url)
    if store is not None:
        store.check_writable()  # the .env's folder is writable; a Redis store is reachable
    else:
        assert stores is not None
        stores.sellers()  # the store of many sellers is there and answers
    if args.code is not None:
        code, state = parse_pasted(args.code)
        if args.state is not None and state is not None and state != args.state:
            raise ConfigError(_state_mismatch())
        if args.state is None and state is not None:
            print(
                "(the URL's state was not checked: pass --state with the login's state to "
                "check it)",
                file=sys.stderr,
            )
        verifier = Secret(args.code_verifier) if args.code_verifier else None
    else:
        request = LoginRequest.new(base, client_id, redirect_uri, pkce=args.pkce)
        print(
            "Open this address in a browser where the seller is logged in, authorize the app, "
            "and paste the address the browser is sent to (or the code in it):",
            file=sys.stderr,
        )
        print(request.url, flush=True)
        try:  # the prompt inside: Ctrl-C may land while it is still being written
            print("redirected URL or code: ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)  # the message below the prompt, not glued to it
            raise
        if not line:
            print(file=sys.stderr)
            raise ConfigError("no answer on standard input; paste the redirected URL or code")
        code, state = parse_pasted(line)
        if state is None:
            print("(a bare code: there is no state to check)", file=sys.stderr)
        elif state != request.state:
            raise ConfigError(_state_mismatch())
        verifier = request.code_verifier
    if stores is not None:
        return _login_seller(args, Sellers(stores, **settings), code, redirect_uri, verifier)
    assert store is not None
    tokens = complete_login(
        args.env, store, code=code, redirect_uri=redirect_uri, code_verifier=verifier
    )
    print(printable(f"authorized: tokens saved in {store.location} ({_summary(tokens)})"))
    return EXIT_OK


def _login_seller(
    args: argparse.Namespace,
    sellers: Sellers,
    code: Secret,
    redirect_uri: str,
    verifier: Secret | None,
) -> int:
    """The end of ``mlauth login`` with a store of many sellers: the seller who authorized
    (the answer's ``user_id``) is added, or their chain replaced."""
    try:
        user_id = sellers.add_code(code, redirect_uri, code_verifier=verifier)
    except InvalidGrantError as exc:
        # Not the store's chain that failed: this login's code was refused.
        raise ConfigError(
            f"the authorization code was refused ({exc.error}: {exc.description or 'no detail'})"
            ". A code works once, for a few minutes, with the same redirect URI (and, with "
            "--pkce, from the same login). Run `mlauth login` again."
        ) from None
    tokens = sellers.stores.store(user_id).load()[0]
    where = sellers.stores.location
    print(printable(f"authorized: seller {user_id}'s tokens saved in {where} ({_summary(tokens)})"))
    if args.seller is not None and user_id != args.seller:
        raise ConfigError(
            f"seller {user_id} authorized the app, not seller {args.seller}: seller {user_id}'s "
            f"chain was saved (the code is spent; it is theirs). Seller {args.seller} must log "
            "in to MercadoLibre themselves and authorize: run `mlauth login --seller "
            f"{args.seller}` again in a browser where they are logged in"
        )
    return EXIT_OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    values = read_env_file(args.env)
    current = (values.get(STORE_KEY) or "").strip()
    client_id = (values.get("ML_CLIENT_ID") or "").strip()
    del values  # the whole .env (secret, tokens): not a local of the errors raised below
    target = args.to.strip()
    if current:
        with masked(secrets_of(read_env_file(args.env))):
            stores = sellers_store(read_env_file(args.env), args.env, wanted=False)
        if stores is not None:
            stores.close()
            if args.seller is not None:
                raise _Usage("migrate: --seller is for a .env's chain; every seller is moved")
            return _migrate_sellers(args, current, target)
    elif (
        url_scheme(target) in SELLER_SCHEMES
        or args.seller
        or _redis_holds_sellers(target, client_id)
    ):
        from .migrate_sellers import migrate_env_to_sellers

        done = migrate_env_to_sellers(args.env, target, seller=args.seller, force=args.force)
        print(printable(str(done)))
        return EXIT_OK
    return _migrate_redis(args, current)


def _redis_holds_sellers(url: str, client_id: str) -> bool:
    """Whether the Redis at ``url`` is a store of many sellers of this app already: then a
    ``.env``'s chain joins them (and is never written as a one-seller hash beside them)."""
    if url_scheme(url) not in ("redis", "rediss", "unix") or not client_id:
        return False
    try:
        from mlauth.stores.redis_sellers import redis_sellers_held
    except ImportError as exc:  # the message names the extra: pip install 'mlauth[redis]'
        raise ConfigError(f"migrate: {exc}") from None
    return redis_sellers_held(url, client_id)


def _migrate_sellers(args: argparse.Namespace, current: str, target: str) -> int:
    from .migrate_sellers import migrate_between_sellers

    if current == target:
        print(printable(f"already migrated: {args.env} names {redact_url(target)}; nothing to do"))
        return EXIT_OK
    print(printable(str(migrate_between_sellers(args.env, target, force=args.force))))
    return EXIT_OK


def _migrate_redis(args: argparse.Namespace, current: str) -> int:
    try:
        from mlauth.stores.redis import RedisStore

        from .migrate import migrate_to_redis
    except ImportError as exc:  # the message names the extra: pip install 'mlauth[redis]'
        raise ConfigError(f"migrate: {exc}") from None

    if current and current == args.to.strip():
        # Run again (by hand, or by a deploy script): done already if Redis holds the chain.
        store = store_from_env(args.env)
        assert isinstance(store, RedisStore)
        tokens = store.peek()
        if tokens is None or tokens.refresh_token is None:
            raise ReauthorizationRequired(
                f"{args.env} says the tokens are in {redact_url(current)}, but it holds none "
                f"under {store.key!r} (Redis lost them?)"
            )
        print(
            printable(
                f"already migrated: {store.location} key {store.key} holds the tokens "
                f"(refresh {tokens.refresh_token.fingerprint}); nothing to do"
            )
        )
        return EXIT_OK
    print(printable(str(migrate_to_redis(args.env, args.to, force=args.force))))
    return EXIT_OK


def _state_mismatch() -> str:
    return (
        "the pasted address's state does not match this login (an old or someone else's "
        "authorization?); the code was not used. Run `mlauth login` again and paste the "
        "address from that authorization"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from mlauth.integrations import runner

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise _Usage("run: give the command after --, e.g. mlauth run -- python main.py")
    if args.alert is not None:
        if not args.alert.strip():
            raise _Usage("run: --alert needs a command, e.g. --alert 'curl ...'")
        os.environ["ML_ALERT_COMMAND"] = args.alert  # for this check and the command's Pythons
    auth = _auth(args)  # fail here, once, rather than in every Python the command starts
    problem = refresh_problem(auth.store)
    if problem is not None:
        # A command started now would work until its token's first refresh, hours later,
        # and fail then; nothing of it has run yet.
        raise StoreError(f"run: the command was not started: {problem}")
    if args.no_redirect and args.redirect:
        raise _Usage("run: --no-redirect and --redirect contradict each other; give one")
    warning = runner.isolation_warning(command)
    if warning:
        print(f"mlauth run: warning: {warning}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    named = [f"{module}:{function}" for module, function in args.redirect or ()]
    redirect: bool | list[str] = False if args.no_redirect else named or True
    try:
        runner.exec_command(command, args.env, log_level=_child_log_level(args), redirect=redirect)
    except FileNotFoundError:
        print(f"mlauth run: {command[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as exc:
        print(f"mlauth run: {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 126


def _child_log_level(args: argparse.Namespace) -> str | None:
    """``MLAUTH_LOG_LEVEL`` for the command's Pythons when -v or -q was given, else None."""
    if args.quiet:
        return OFF
    if args.verbose:
        return "debug" if args.verbose > 1 else "info"
    return None


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.serve:
        lifetime = 600.0 if args.token_lifetime is None else args.token_lifetime
        return demo.serve(args.env, args.port, lifetime)
    lifetime = 3.0 if args.token_lifetime is None else args.token_lifetime
    return demo.run_demo(args.processes, args.threads, args.seconds, lifetime)


class _Usage(Exception):
    """A usage error found after parsing (exit 2)."""


# -- the parser --------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], int]


MIGRATE_SCHEMES = ("redis", "rediss", "unix", *SELLER_SCHEMES)


def _store_url(text: str) -> str:
    """``--to``: a store's URL, refused before anything is imported or connected to."""
    scheme = url_scheme(text.strip())
    if scheme not in MIGRATE_SCHEMES:
        shown = redact_url(text.strip())
        raise argparse.ArgumentTypeError(
            f"{shown!r}: the scheme {scheme + '://' if scheme else '(none)'} is not a store "
            f"mlauth knows; use {', '.join(s + '://' for s in MIGRATE_SCHEMES)} "
            "(e.g. redis://HOST:PORT/DB or sqlite:///sellers.db)"
        )
    return text


def _user_id(text: str) -> str:
    """``--seller`` and ``sellers remove``: a user id, else a usage error (exit 2)."""
    try:
        return check_user_id(text.strip(), "--seller")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seller: ")) from None


def _add_seller(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument(
        "--seller",
        type=_user_id,
        metavar="ID",
        help=f"with a store of many sellers (ML_TOKEN_STORE=sqlite://, postgresql://...): {what} "
        "(the user id `mlauth sellers` lists); without it, the store's only seller",
    )


def _redirect_spec(text: str) -> tuple[str, str]:
    """``run --redirect``: MODULE:FUNCTION, else a usage error naming the form (exit 2)."""
    from mlauth.integrations.redirect.plan import parse_spec

    try:
        return parse_spec(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(
    kind: type[int] | type[float], low: float, high: float | None = None
) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` in [low, high], else a usage error (exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (low <= value and (high is None or value <= high)) or not math.isfinite(value):
            bounds = f"from {low:g} to {high:g}" if high is not None else f"{low:g} or more"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; give {bounds}")
        return value

    return parse


def _add_common(sub: argparse.ArgumentParser, env_default: str, *, nested: bool = False) -> None:
    # Added to each sub-command, never through a shared parent parser: parents share their
    # option objects, and one command's default (demo's .env.demo) became every command's.
    # A nested command (`sellers add`) has no defaults of its own: argparse copies a nested
    # parser's values over its parent's, and `mlauth sellers --env X add` would lose X.
    sub.add_argument(
        "--env",
        default=argparse.SUPPRESS if nested else env_default,
        metavar="PATH",
        help=f"the .env file (default: ./{env_default})",
    )
    sub.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if nested else 0,
        help=f"show mlauth's INFO log lines (-vv: DEBUG) on stderr; default WARNING and up, "
        f"or ${LEVEL_VARIABLE}",
    )
    sub.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS if nested else False,
        help="show none of mlauth's log lines",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlauth",
        description="MercadoLibre OAuth tokens for pipelines.",
        epilog="exit codes: 0 ok, 1 error (the message says how to fix it), 2 usage, "
        "3 (re-)authorization required (run `mlauth login`), 4 degraded (`check` only); `run` "
        "exits with the command's code",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Handler, help: str, env_default: str = ".env"
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _add_common(sub, env_default)
        sub.set_defaults(handler=handler)
        return sub

    status = command(
        "status",
        _cmd_status,
        "show the store, token fingerprints, expiry, last refresh, and whether one is running",
    )
    _add_seller(status, "the seller whose chain to show")
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (schema mlauth-status/1, shipped as "
        "mlauth/schemas/status.schema.json) with an overall state: ok, degraded or "
        "reauthorization_required",
    )
    check = command(
        "check",
        _cmd_check,
        "one line on the chain's state and an exit code for cron jobs and probes: 0 ok, "
        "4 degraded (look soon), 3 re-authorization required (run `mlauth login`), 1 a "
        "configuration error",
    )
    _add_seller(check, "the seller whose chain to check")
    token = command(
        "token",
        _cmd_token,
        "print a valid access token (refreshed first if expired or near expiry), for "
        'shell use: curl -H "Authorization: Bearer $(mlauth token)" ...; if the refresh token '
        "is dead but the access token has not expired, it is printed all the same, stderr "
        "says how long it still works, and the exit code is 3",
    )
    _add_seller(token, "the seller whose access token to print")
    refresh = command(
        "refresh", _cmd_refresh, "refresh the tokens now, under the same lock as every process"
    )
    _add_seller(refresh, "the seller whose chain to refresh")

    login = command(
        "login",
        _cmd_login,
        "authorize the app (first time, or after invalid_grant) and save the tokens",
    )
    login.add_argument(
        "--site",
        default="MLA",
        type=str.upper,
        help=f"the seller's site, for the authorization page: {', '.join(AUTH_HOSTS)} "
        "(default MLA)",
    )
    login.add_argument(
        "--auth-url",
        metavar="URL",
        help="the authorization page's origin instead of the site's (or ML_AUTH_URL in .env)",
    )
    login.add_argument(
        "--redirect-uri",
        metavar="URI",
        help="the redirect URI registered for the app (or ML_REDIRECT_URI in .env)",
    )
    login.add_argument("--pkce", action="store_true", help="use PKCE (S256), if the app has it")
    login.add_argument(
        "--code",
        metavar="CODE_OR_URL",
        help="the code, or the whole redirected URL, instead of pasting it at the prompt",
    )
    login.add_argument(
        "--state", help="with --code: the state the URL must carry (checked when present)"
    )
    login.add_argument("--code-verifier", metavar="VERIFIER", help="with --code: the PKCE verifier")
    login.add_argument(
        "--seller",
        type=_user_id,
        metavar="ID",
        help="with a store of many sellers, where the seller who authorizes is added (or "
        "replaces their chain): the seller expected to authorize; another's authorization is "
        "saved all the same, and the exit code is 1",
    )

    migrate = command(
        "migrate",
        _cmd_migrate,
        "move the tokens from the .env into Redis (several machines share them) or into a "
        "store of many sellers, or every seller from one store of many sellers to another, "
        "under the locks of both sides; the .env keeps every other line and names the new "
        "store in ML_TOKEN_STORE",
    )
    migrate.add_argument(
        "--to",
        required=True,
        type=_store_url,
        metavar="URL",
        help="where to: redis://HOST:PORT/DB (rediss://, unix://) for the .env's one chain; "
        "sqlite:///sellers.db (relative to the .env's folder; sqlite://// absolute), "
        "postgresql://... or a Redis of many sellers for a store of many sellers",
    )
    migrate.add_argument(
        "--force",
        action="store_true",
        help="replace a different token chain already stored there (a dead or stale one)",
    )
    _add_seller(
        migrate,
        "from the .env into a store of many sellers, the seller whose chain the .env holds "
        "(checked against the tokens, which name it)",
    )

    sellers = command(
        "sellers",
        sellers_cli.cmd_list,
        "the sellers of a store of many sellers (ML_TOKEN_STORE=sqlite://, postgresql://...): "
        "user id, expiry, last refresh and by whom, and state (ok, refresh failing, "
        "re-authorization required); `sellers add` and `sellers remove ID` change them",
    )
    sellers.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (schema mlauth-sellers/1, shipped as "
        "mlauth/schemas/sellers.schema.json)",
    )
    actions = sellers.add_subparsers(dest="action", metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="add a seller from a refresh token read on stdin (never the command line)",
        description="add a seller from their refresh token, read on stdin (a pipe or a file, "
        "never a terminal nor the command line): refreshed once, which names the seller, then "
        "saved; prints the seller's user id. A seller held already gets the new chain",
    )
    _add_common(add, ".env", nested=True)
    add.add_argument(
        "--seller",
        type=_user_id,
        metavar="ID",
        help="the seller the token must be of: the answer's user id is checked against it",
    )
    add.add_argument(
        "--replace",
        action="store_true",
        help="replace the chain of a seller held already (a dead one); without it a seller "
        "held already is refused before the token is spent",
    )
    add.set_defaults(handler=sellers_cli.cmd_add)
    remove = actions.add_parser(
        "remove",
        help="forget a seller's chain (under its lock)",
        description="forget a seller's chain, under its lock; the app's grant at "
        "MercadoLibre stays until the seller revokes it",
    )
    _add_common(remove, ".env", nested=True)
    remove.add_argument("user_id", type=_user_id, metavar="ID", help="the seller's user id")
    remove.set_defaults(handler=sellers_cli.cmd_remove)

    run = command(
        "run",
        _cmd_run,
        "run a command with mlauth installed in its Python processes: mlauth run -- python main.py",
    )
    run.add_argument(
        "--redirect",
        action="append",
        type=_redirect_spec,
        metavar="MODULE:FUNCTION",
        help="redirect this legacy refresh function to mlauth's locked refresh too (repeatable); "
        "refresh_ml_token() in the program's own modules is redirected by default",
    )
    run.add_argument(
        "--no-redirect",
        action="store_true",
        help="leave the program's refresh functions alone (they then race other processes)",
    )
    run.add_argument(
        "--alert",
        metavar="CMD",
        help="a shell command run once per incident (re-authorization required, refreshes "
        "failing, store unavailable) for all processes; sets ML_ALERT_COMMAND for the command",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")

    demo = command(
        "demo",
        _cmd_demo,
        "the `make demo` storm (processes x threads against a fake MercadoLibre on loopback, "
        "with its own temporary .env); with --serve, just the fake server and a .env for it "
        "at --env, to try the other commands by hand",
        env_default=".env.demo",  # never the project's own .env
    )
    demo.add_argument(
        "--processes",
        type=_number(int, 1),
        default=6,
        help="worker processes sharing one .env (default: %(default)s)",
    )
    demo.add_argument(
        "--threads",
        type=_number(int, 1),
        default=4,
        help="threads per process, sharing one MLAuth (default: %(default)s)",
    )
    demo.add_argument(
        "--seconds",
        type=_number(float, 0.1),
        default=15.0,
        help="how long the storm runs, in seconds (default: %(default)g)",
    )
    demo.add_argument(
        "--token-lifetime",
        type=_number(float, 0.5),
        default=None,
        help="how long each token lives, in seconds (default 3, 600 with --serve)",
    )
    demo.add_argument(
        "--serve",
        action="store_true",
        help="serve until Ctrl-C or SIGTERM; then print what it served (calls, 401s, "
        "refreshes, invalid_grant, logins) and delete the .env it wrote and the files beside it",
    )
    demo.add_argument(
        "--port",
        type=_number(int, 0, 65535),
        default=0,
        help="with --serve (default: any free port)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    env = getattr(args, "env", ".env")
    level = (
        None
        if args.quiet
        else (logging.DEBUG if args.verbose > 1 else logging.INFO)
        if args.verbose
        else level_from_environment()
    )
    if level is not None and args.command == "run":
        # The command's own install() says every warning of this check again; here only
        # errors, which end in a refusal anyway.
        level = max(level, logging.ERROR)
    show_on_stderr(level)
    try:
        return handler(args)
    except _Usage as exc:
        parser.error(str(exc))  # exits 2
    except (ReauthorizationRequired, InvalidGrantError) as exc:
        # Messages quote the store, the journal and its marker: printable, like status rows.
        first = isinstance(exc, ReauthorizationRequired) and exc.first
        what = "authorization required" if first else "re-authorization required"
        print(printable(f"mlauth: {what}: {exc}"), file=sys.stderr)
        if isinstance(exc, ReauthorizationRequired) and exc.note:
            print(printable(f"mlauth: {exc.note}"), file=sys.stderr)
        hint = _login_hint(env, again=not first, seller=getattr(args, "seller", None))
        print(printable(f"fix: {hint}"), file=sys.stderr)
        return EXIT_REAUTHORIZE
    except MLAuthError as exc:
        print(printable(f"mlauth: {exc}"), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("mlauth: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `mlauth token | head -c0` and the like: the reader left, nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
