"""A store URL is shown with its password masked, whatever characters the password holds.

``urllib.parse`` ends the host at the first ``/``, ``?`` or ``#``, so a password holding one
unencoded is read as host, path, query or fragment: masking what the parser calls the password
shows the rest of it. Checked on :func:`mlauth.secret.redact_url` for any password (hypothesis),
and on every message that shows a store URL: the Redis store's, the ``.env``'s
``ML_TOKEN_STORE`` check, ``mlauth migrate --to``, ``mlauth status``.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mlauth
import mlauth.cli.commands
from mlauth.cli.migrate import migrate_to_redis
from mlauth.stores.envfile import update_env_file
from mlauth.stores.redis import RedisStore, redact_url
from tests.support.fake_tokens import env_text

# Pieces of it that a parser may split off: each would be a leak on its own.
PASSWORD = "hunter2/xyzzy#plugh?frob@nitz:quux"
PIECES = [piece for piece in re.split(r"[/?#@:]", PASSWORD)]

# Any text but the mask's own '*': the output shows "***" by design, and a password such as
# "*@12" would be found in "redis://:***@127.0.0.1".
passwords = st.text(min_size=4, max_size=40).filter(lambda p: p.strip() == p and "*" not in p)
users = st.sampled_from(["", "default", "app-user"])
hosts = st.sampled_from(["127.0.0.1", "redis.internal", "[::1]", "[fe80::1%25eth0]", ""])
ports = st.sampled_from(["", ":6379", ":1"])
tails = st.sampled_from(["", "/0", "/3?socket_timeout=5", "/0#frag"])


def shows(output: str, secret: str, skeleton: str) -> list[str]:
    """What of ``secret`` (whole, or a piece a parser may cut off) ``output`` shows, leaving
    out what the URL shows anyway without it (a piece that equals 'redis', say)."""
    pieces = {secret, *(p for p in re.split(r"[/?#@:&;=]", secret) if len(p) >= 4)}
    return [p for p in pieces if p in output and p not in skeleton]


@settings(deadline=None)  # a loaded machine is no failure
@given(password=passwords, user=users, host=hosts, port=ports, tail=tails)
@example(password="pa/ss@word", user="", host="127.0.0.1", port=":1", tail="/0")
@example(password="pa#ss", user="app-user", host="[::1]", port=":6379", tail="/0")
@example(password="pa?ss=1&x", user="", host="redis.internal", port="", tail="")
@example(password="p@ss:w0rd", user="default", host="", port="", tail="")
def test_a_password_in_the_userinfo_never_shows(
    password: str, user: str, host: str, port: str, tail: str
) -> None:
    for scheme in ("redis", "rediss"):
        skeleton = f"{scheme}://{user}:@{host}{port}{tail}"
        for written in (password, quote(password, safe="")):
            url = f"{scheme}://{user}:{written}@{host}{port}{tail}"
            output = redact_url(url)
            assert not shows(output, password, skeleton), (url, output)
            assert not shows(output, written, skeleton), (url, output)
            assert "***" in output


@settings(deadline=None)
@given(password=passwords, host=hosts, port=ports)
@example(password="se&cr#et", host="127.0.0.1", port=":1")
@example(password="se;cret=1", host="[::1]", port="")
def test_a_password_in_the_query_never_shows(password: str, host: str, port: str) -> None:
    for before in ("?", "?db=0&", "?username=me&"):
        skeleton = f"redis://{host}{port}/0{before}password=&socket_timeout=5"
        for written in (password, quote(password, safe="")):
            for key in ("password", "PASSWORD"):
                url = f"redis://{host}{port}/0{before}{key}={written}&socket_timeout=5"
                output = redact_url(url)
                assert not shows(output, password, skeleton), (url, output)
                assert not shows(output, written, skeleton), (url, output)


@settings(deadline=None)
@given(password=passwords)
@example(password="pa/ss@sock")
def test_a_password_of_a_unix_socket_url_never_shows(password: str) -> None:
    for url, skeleton in (
        (f"unix://:{password}@/run/redis/redis.sock?db=0", "unix://:@/run/redis/redis.sock?db=0"),
        (f"unix:///run/redis.sock?db=0&password={password}", "unix:///run/redis.sock?db=0"),
    ):
        output = redact_url(url)
        assert not shows(output, password, skeleton), (url, output)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://app:pa/ss@[::1]:6379/0", "redis://app:***@[::1]:6379/0"),
        ("rediss://app:p%40ss@redis.internal:6380/2", "rediss://app:***@redis.internal:6380/2"),
        ("redis://lonely@h/0", "redis://***@h/0"),  # a lone value may be a password
        ("redis://h:6379/0?db=0&password=x&y", "redis://h:6379/0?db=0&password=***"),
        ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://h:6379/0", "redis://h:6379/0"),  # nothing to mask: shown as it is
    ],
)
def test_what_a_masked_url_still_shows(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def assert_hidden(text: str) -> None:
    leaked = [piece for piece in PIECES if piece in text]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize("host", ["127.0.0.1:1", "[::1]:1"])
def test_the_redis_store_masks_an_unencoded_password_in_every_message(host: str) -> None:
    url = f"redis://app:{PASSWORD}@{host}/0"
    with pytest.raises(mlauth.ConfigError) as caught:  # the parser cut the host short
        RedisStore(url, client_id="1").load()
    assert_hidden(str(caught.value))
    assert "percent-encode" in str(caught.value)
    encoded = f"redis://app:{quote(PASSWORD, safe='')}@{host}/0"
    store = RedisStore(encoded, client_id="1")
    assert_hidden(repr(store) + store.location)
    with pytest.raises(mlauth.StoreError) as unreachable:
        store.load()
    assert_hidden(str(unreachable.value))
    assert host in str(unreachable.value)


@pytest.mark.parametrize(
    "url",
    [
        f"memcached://app:{PASSWORD}@127.0.0.1:1/0",  # not a store mlauth knows
        f"redis://:{PASSWORD}@[::1",  # a malformed IPv6 host: urlsplit raises
    ],
)
def test_the_env_store_line_is_masked_in_its_error(url: str, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(env_text(ML_TOKEN_STORE=url))
    with pytest.raises(mlauth.ConfigError) as caught:
        mlauth.MLAuth.from_env(env)
    assert_hidden(str(caught.value))


@pytest.mark.parametrize(
    "url",
    [
        f"http://app:{PASSWORD}@127.0.0.1:1/0",  # not Redis: refused by the option's check
        f"redis://:{PASSWORD}@[::1",  # urlsplit raised, and argparse quoted the whole URL
    ],
)
def test_migrate_to_masks_the_url_it_refuses(
    url: str, env_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = mlauth.cli.commands.main(["migrate", "--env", str(env_file), "--to", url])
    except SystemExit as exit:  # a usage error
        code = int(exit.code or 0)
    out, err = capsys.readouterr()
    assert code != 0
    assert_hidden(out + err)


def test_status_and_migrate_show_a_migrated_url_masked(
    env_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://app:{PASSWORD}@127.0.0.1:1/0"  # written by hand, nobody listens there
    update_env_file(env_file, {"ML_TOKEN_STORE": url})
    assert mlauth.cli.commands.main(["status", "--env", str(env_file)]) != 0
    with pytest.raises(mlauth.ConfigError) as again:  # already migrated: says where to
        migrate_to_redis(env_file, "redis://127.0.0.1:1/1")
    out, err = capsys.readouterr()
    assert "mlauth:" in err
    assert_hidden(out + err + str(again.value))
