"""The ``.env`` token store: read with python-dotenv, written atomically and durably.

Writing keeps the file the user wrote: every line that is not a token key stays byte for
byte (comments, blank lines, order, ``export`` prefixes, CRLF endings), and a token line keeps
its own prefix, quoting style and inline comment; only the value changes. python-dotenv's
``set_key`` was not enough on its own: it takes no lock, does not fsync, drops the comment and
``export`` of the line it touches, and replaces a symlinked ``.env`` with a plain file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from mlauth.errors import ConfigError, MLAuthError, StoreError, masked, sealed
from mlauth.secret import Secret, fingerprint, mask
from mlauth.tokens import LATEST_TIME, TokenSet, token_problem

from .base import RefreshTransaction, TokenStore, savable
from .incidents import FileIncidents, Incidents
from .journal import Journal, JournaledRefresh, pending
from .lock import fork_bound
from .moved import follow
from .ofd import read_fenced
from .parts import WRITE_KEY, Parts, parts_for, wants_in_place, writer_for
from .private import check_folder
from .select import STORE_KEY
from .watch import StampWatch
from .writer import Writer

__all__ = [
    "STORE_KEY",
    "WRITE_KEY",
    "EnvFile",
    "EnvFileStore",
    "read_env_file",
    "secrets_of",
    "update_env_file",
]

log = logging.getLogger("mlauth")

ACCESS_KEY = "ML_ACCESS_TOKEN"
REFRESH_KEY = "ML_REFRESH_TOKEN"
EXPIRES_KEY = "ML_TOKEN_EXPIRES_AT"
REFRESHED_AT_KEY = "ML_TOKEN_REFRESHED_AT"
REFRESHED_BY_KEY = "ML_TOKEN_REFRESHED_BY"
TOKEN_KEYS = (ACCESS_KEY, REFRESH_KEY, EXPIRES_KEY, REFRESHED_AT_KEY, REFRESHED_BY_KEY)
SECRET_KEYS = ("ML_CLIENT_SECRET", ACCESS_KEY, REFRESH_KEY)

# One assignment line: leading blank lines/space, optional export, key, '=', the value (single
# or double quoted, or bare), then an optional inline comment and the line end. A line that
# does not match (multi-line values, odd spacing) is rewritten whole.
_LINE = re.compile(
    r"""(?P<head>\s*(?:export[ \t]+)?(?P<key>[A-Za-z_][A-Za-z0-9_.]*)[ \t]*=[ \t]*)
        (?P<value>'[^'\\]*'|"(?:[^"\\]|\\.)*"|[^\s'"\#][^\s]*|)
        (?P<tail>(?:[ \t]+\#[^\r\n]*)?[ \t]*)
        (?P<end>\r\n|\n|\r|)\Z""",
    re.VERBOSE,
)
_ENDING = re.compile(r"(?:\r\n|\n|\r)\Z")
_BARE_SAFE = re.compile(r"[A-Za-z0-9_.:/@+\-]*\Z")
BOM = "\ufeff"


def _quote(value: str, style: str) -> str:
    """The value as it should be written; keeps the line's quoting style when it is safe."""
    if style == "'" and "'" not in value and "\\" not in value:
        return f"'{value}'"
    if style == "" and _BARE_SAFE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _newline_of(text: str) -> str:
    """The file's own line ending: CRLF when most of its lines end so."""
    return "\r\n" if text.count("\r\n") * 2 > text.count("\n") else "\n"


def _values(text: str) -> dict[str, str | None]:
    """What python-dotenv reads from ``text`` (as dotenv_values, without its warnings)."""
    lines = parse_stream(io.StringIO(text.removeprefix(BOM)))
    return {binding.key: binding.value for binding in lines if binding.key is not None}


def render_update(text: str, updates: Mapping[str, str | None]) -> str:
    """``text`` with the keys of ``updates`` set (or removed, for None); all else unchanged."""
    if text.startswith(BOM):
        # Parsed with it, the BOM would glue itself to the first key's name (so a token key
        # on line 1 would be added again at the end); the file keeps it as it was.
        return BOM + render_update(text[len(BOM) :], updates)
    out: list[str] = []
    done: set[str] = set()
    unread: int | None = None  # where in ``out`` the first line python-dotenv could not read is
    for binding in parse_stream(io.StringIO(text)):
        original = binding.original.string
        key = binding.key
        if binding.error and unread is None:
            unread = len(out)
        if binding.error or key is None or key not in updates:
            out.append(original)
            continue
        value = updates[key]
        done.add(key)
        match = _LINE.match(original)
        if value is None:
            # Keep the blank lines the parser attached to the front of this binding.
            lead = original[: len(original) - len(original.lstrip("\r\n"))]
            out.append(lead)
        elif match is not None:
            old = match.group("value")
            style = old[0] if old[:1] in ("'", '"') else ""
            out.append(
                match.group("head")
                + _quote(value, style)
                + match.group("tail")
                + (match.group("end") or "")
            )
        else:
            lead = original[: len(original) - len(original.lstrip())]
            # The line's own ending, whichever it is: without a lone CR (a file saved with
            # old Mac endings) the next line would be glued to this one, and its key lost.
            ending = _ENDING.search(original)
            out.append(f"{lead}{key}={_quote(value, '')}{ending.group() if ending else ''}")
    missing = {k: v for k, v in updates.items() if k not in done and v is not None}
    if not missing:
        return "".join(out)
    newline = _newline_of(text)
    at_end = _added(out, len(out), missing, newline)
    if unread is None or all(_values(at_end).get(k) == v for k, v in missing.items()):
        return at_end
    # A line python-dotenv cannot read may hold an unclosed quote (NOTE="...) that takes
    # the added keys into its value, unread (and added again at every save): before it, then.
    return _added(out, unread, missing, newline)


def _added(out: list[str], at: int, keys: Mapping[str, str], newline: str) -> str:
    """The pieces of ``out`` with lines for ``keys`` put before piece number ``at``."""
    head, tail = "".join(out[:at]), "".join(out[at:])
    if head and not head.endswith(("\n", "\r")):
        head += newline
    return head + "".join(f"{k}={_quote(v, '')}{newline}" for k, v in keys.items()) + tail


def read_back_problem(text: str, new: str, updates: Mapping[str, str | None]) -> str | None:
    """Why ``new`` (``text`` with ``updates``, :func:`render_update`) would not read back as
    meant, or None.

    A line python-dotenv cannot read may hold an unclosed quote (NOTE="...), which takes
    everything up to the next quote into its value: a value the save quotes (a token with a
    '~' or '=', refreshed_by, which has a space) can then swallow the lines in between,
    token lines among them. Checked before anything is written, and before a refresh token
    is spent (:meth:`EnvFileStore.check_writable`).
    """
    old, now = _values(text), _values(new)
    changed = [key for key, value in updates.items() if now.get(key) != value]
    changed += [key for key in old.keys() - updates.keys() if now.get(key) != old[key]]
    if not changed:
        return None
    lines = parse_stream(io.StringIO(text.removeprefix(BOM)))
    bad = next((binding.original.line for binding in lines if binding.error), None)
    return (
        f"{', '.join(sorted(map(str, changed)))} would not read back as written: "
        f"{'a line' if bad is None else f'line {bad}'} cannot be read (an unclosed quote?) "
        "and would take in what follows it. Fix or delete that line"
    )


# What a save writes, in the forms that take every quote a real one may need: a file that
# reads these back reads back any save.
_SAVE_PROBE = {
    ACCESS_KEY: "probe~=",
    REFRESH_KEY: "probe~=",
    EXPIRES_KEY: "1.5",
    REFRESHED_AT_KEY: "1.5",
    REFRESHED_BY_KEY: "pid 1@probe",
}


@dataclasses.dataclass(frozen=True, repr=False)  # no repr: it holds the file's secrets
class Reading:
    """One read of the ``.env``: what a load, a save's render and the save probe all use."""

    text: str  # as written (a BOM kept: a save keeps it)
    values: dict[str, str | None]
    info: os.stat_result  # fstat of what was read, before the read
    stamp: Hashable


def _same_content(info: os.stat_result, path: str) -> bool:
    """Whether ``path`` still holds the content a read found with ``info``: same inode, size
    and mtime (not ctime: the journal's extended attributes and the save probe's hard link
    change it, and neither changes a byte)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino, now.st_mtime_ns, now.st_size) == (
        info.st_dev,
        info.st_ino,
        info.st_mtime_ns,
        info.st_size,
    )


def _unreadable(path: str, exc: OSError) -> MLAuthError:
    """The error for a ``.env`` that could not be read: ConfigError if it is not there to
    read (or is a folder), else StoreError."""
    if os.path.isfile(path):
        return StoreError(f"cannot read {path}: {exc.strerror or exc}")
    if os.path.isdir(path):
        return ConfigError(
            f"{path} is a directory, not a .env file; pass the file's path "
            f"(e.g. --env {os.path.join(path, '.env')})"
        )
    if os.path.islink(path):
        return ConfigError(
            f"{path} is a symlink to {os.path.realpath(path)}, which does not exist; "
            "restore that file (a moved or unmounted folder?) or point the link at the "
            ".env that holds ML_CLIENT_ID, ML_CLIENT_SECRET and ML_REFRESH_TOKEN."
        )
    return ConfigError(
        f"{path}: no such .env file. Create it with ML_CLIENT_ID and ML_CLIENT_SECRET, and "
        "ML_REFRESH_TOKEN unless `mlauth login` is to write one; or pass the right path "
        "(mlauth never creates it silently)."
    )


# Not sealed itself: its callers are (read_env_file, EnvFile._read), and a seal inside a seal
# trims nothing more.
def _parse(raw: bytes, path: str) -> tuple[str, dict[str, str | None]]:
    """The text and the values python-dotenv reads from it; ConfigError if not UTF-8 or if an
    ``ML_`` key is set twice (see _refuse_duplicates)."""
    try:
        text = raw.decode("utf-8")  # \r\n stays as it is, so untouched lines stay byte for byte
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from exc
    # Without the BOM some Windows editors write: python-dotenv 1.0.0 would read it as part
    # of the first key's name, and that key would look missing.
    body = text.removeprefix(BOM)
    _refuse_duplicates(body, path)
    return text, dict(dotenv_values(stream=io.StringIO(body), interpolate=False))


# Sealed (mlauth.errors.sealed), here and on the methods below that read or write the file:
# their locals hold its text or its values, the client secret and the tokens among them, and
# an error raised through them (a bad value, an unreadable or unwritable file) must not carry
# those frames to a crash reporter.
@sealed
def read_env_file(path: str | os.PathLike[str]) -> dict[str, str | None]:
    """The file's keys and values as python-dotenv reads them; ConfigError if it is missing.

    A UTF-8 BOM is dropped, and an ``ML_`` key set twice is refused (see _refuse_duplicates).
    Read under a shared lock on the content (:func:`~mlauth.stores.ofd.read_fenced`): the
    way the file is written is not known here, and a write in place (a mounted .env) must
    never be seen half done. A store reads as its writer needs.
    """
    path = os.fspath(path)
    try:
        raw, _ = read_fenced(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return _parse(raw, path)[1]


def _refuse_duplicates(text: str, path: str) -> None:
    """ConfigError for an ``ML_`` key set on two lines.

    python-dotenv lets the last one win, silently: a stale refresh token below a live one
    would be spent (invalid_grant) and the seller asked to authorize again for nothing.
    """
    first_line: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        key = binding.key
        if binding.error or key is None or not key.startswith("ML_"):
            continue
        original = binding.original.string
        # Some python-dotenv versions attach the blank lines before a binding to it.
        line = binding.original.line + original[: len(original) - len(original.lstrip())].count(
            "\n"
        )
        if key in first_line:
            raise ConfigError(
                f"{path}: {key} is set twice, on lines {first_line[key]} and {line}; delete "
                "the stale one (mlauth reads one value and will not guess which)."
            )
        first_line[key] = line


def secrets_of(values: Mapping[str, str | None]) -> list[Secret]:
    """The secrets among a ``.env``'s values (the client secret, the tokens), as written and
    stripped: masked in the messages about the file's other values (:func:`masked`), which
    quote what they refuse, and a token pasted under another key would be quoted whole."""
    return list(_secrets_in(values))


def _secrets_in(values: Mapping[str, str | None]) -> Iterator[Secret]:
    """:func:`secrets_of`, built only when iterated: what :func:`masked` is handed on every
    read of the file, and needs only if the read is refused."""
    for key in SECRET_KEYS:
        value = values.get(key)
        for text in {value, value.strip()} if value else ():
            if text:
                yield Secret(text)


@sealed
def in_place_mode(path: str, values: Mapping[str, str | None] | None = None) -> bool:
    """Whether ``path`` is written in place and locked on itself (:mod:`mlauth.stores.parts`)."""
    real = os.path.realpath(path)
    if values is None:
        values = read_env_file(real)
    with masked(secrets_of(values)):
        return wants_in_place(real, values)


def _render(real: str, text: str, updates: Mapping[str, str | None]) -> bytes:
    """``text`` with ``updates`` (:func:`render_update`); StoreError if it would not read back."""
    new = render_update(text, updates)
    problem = read_back_problem(text, new, updates)
    if problem is not None:
        raise StoreError(f"cannot save to {real}: {problem}. Nothing was written.")
    return new.encode("utf-8")


@sealed
def update_env_file(
    path: str | os.PathLike[str],
    updates: Mapping[str, str | None],
    *,
    writer: Writer | None = None,
) -> None:
    """Set (or, for None, remove) keys in an existing ``.env``, atomically and durably.

    ``writer`` None: the way the file is written is found out (:func:`in_place_mode`). A
    file in a folder is replaced (:class:`~mlauth.stores.replace.ReplaceWriter`): readers
    see the old or the new file, never half of one, and a symlinked ``.env`` is followed (its
    target is replaced and the link stays). A file mounted alone (or with
    ``ML_ENV_WRITE=in-place``) cannot be replaced: it is written in place, fenced from
    readers by its content lock (:class:`~mlauth.stores.inplace.InPlaceWriter`).
    """
    real = os.path.realpath(os.fspath(path))
    if writer is None:
        writer = writer_for(os.path.isfile(real) and in_place_mode(real))
    try:
        raw, info = writer.read(real)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such .env file; mlauth never creates it silently.") from None
    except OSError as exc:
        raise StoreError(f"cannot read {real}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")  # \r\n stays as it is, so untouched lines stay byte for byte
    except UnicodeDecodeError as exc:
        raise StoreError(f"{real} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from None
    writer.write(real, _render(real, text, updates), info)


def _number(values: Mapping[str, str | None], key: str, path: str) -> float | None:
    raw = (values.get(key) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    # float() accepts "inf", "nan" and "1e400": an infinite expiry would switch proactive
    # refresh off without a word, and a time past LATEST_TIME breaks `mlauth status`.
    if not 0 <= value <= LATEST_TIME:  # also false for nan
        raise ConfigError(
            f"{path}: {key}={raw!r} is not a number of unix seconds; delete the line and "
            "mlauth will write it again at the next refresh."
        )
    return value


_warned_access: set[tuple[str, str]] = set()


def _usable_access(access: str, path: str) -> str:
    """``access``, or "" if it cannot be a token: then it is refreshed, never sent.

    It is worth nothing the next refresh cannot replace (that needs only the refresh token),
    and sent it would break the request's header (CR, LF) or the HTTP client.
    """
    problem = token_problem(access) if access else None
    if problem is None:
        return access
    if (path, fingerprint(access)) not in _warned_access:
        _warned_access.add((path, fingerprint(access)))
        log.warning(
            "%s: %s %s; it is not sent, and the next request refreshes it with %s",
            path,
            ACCESS_KEY,
            problem,
            REFRESH_KEY,
        )
    return ""


def tokens_from_values(values: Mapping[str, str | None], path: str) -> TokenSet:
    """The tokens of a ``.env``'s values; ConfigError for a value that cannot be one."""
    access = _usable_access((values.get(ACCESS_KEY) or "").strip(), path)
    refresh = (values.get(REFRESH_KEY) or "").strip()
    problem = token_problem(refresh) if refresh else None
    if problem is not None:
        raise ConfigError(
            f"{path}: {REFRESH_KEY} {problem}, so it cannot be a refresh token (its value is "
            "not shown). Put the refresh token back exactly as MercadoLibre gave it, on one "
            "line, or run `mlauth login` to authorize again."
        )
    # Shown by status, and by the repr of these tokens in any frame that holds them: a secret
    # of the file there (pasted under the wrong key) shows as its fingerprint.
    by = values.get(REFRESHED_BY_KEY)
    return TokenSet(
        access_token=Secret(access) if access else None,
        refresh_token=Secret(refresh) if refresh else None,
        expires_at=_number(values, EXPIRES_KEY, path),
        refreshed_at=_number(values, REFRESHED_AT_KEY, path),
        refreshed_by=mask(by, secrets_of(values)) if by else None,
    )


_warned_modes: set[str] = set()


def warn_if_readable_by_others(path: str) -> None:
    """Warn, once per process and file, that a token file is group- or world-readable."""
    real = os.path.realpath(path)
    if real in _warned_modes:
        return
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
    except OSError:
        return  # a missing file gets its own clear error when it is read
    if mode & 0o077:
        _warned_modes.add(real)
        log.warning(
            "%s holds tokens but is readable by other users (mode %04o); fix with: chmod 600 %s",
            real,
            mode,
            real,
        )


def _fmt_time(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


class _FileRefresh(JournaledRefresh):
    """The ``.env``'s refresh transaction: journaled, on the read taken under the lock."""

    def __init__(self, file: EnvFile, *, login: bool = False) -> None:
        # Through the store the program holds (whose methods a subclass or a test may wrap),
        # which answers from this file while the transaction runs.
        super().__init__(file.front, file.journal, login=login)
        self._file = file

    def reload(self) -> TokenSet:
        self._file.reread()  # a writer that takes no lock may have rotated it: a new read
        return super().reload()


class EnvFile(TokenStore):
    """The tokens in the ``.env`` itself, as its parts (:mod:`.parts`) write, lock and journal it.

    Under its lock (:meth:`lock`, :meth:`refresh`) the file is read once; the transaction's
    load, the save probe and the save's render all use that read, unless the file changed
    since (a writer that takes no lock), which a ``stat`` tells. Values that name another
    store (a migration) are handed to ``moved``, once, and whatever it returns answers from
    then on. ``front`` is the store the program holds, which its transactions call back.
    """

    def __init__(
        self,
        path: str,
        parts: Parts,
        moved: Callable[[Mapping[str, str | None]], TokenStore],
        front: TokenStore,
    ) -> None:
        self.path = path
        self.location = path
        self.real = os.path.realpath(path)
        self.writer = parts.writer
        self.file_lock = parts.lock
        self.journal = parts.journal
        # Peers' saves show through a counter in shared memory, not a stat per request.
        self._watch = StampWatch(self._stat_stamp, parts.counter_path)
        self._moved = moved
        self.front = front
        self._held = threading.local()  # .reading: the read taken under this thread's lock

    def __repr__(self) -> str:
        return f"EnvFile({self.path!r})"

    # -- reading ---------------------------------------------------------------------------

    @sealed
    def _read(self) -> Reading:
        try:
            raw, info = self.writer.read(self.path)
        except OSError as exc:
            raise _unreadable(self.path, exc) from None
        text, values = _parse(raw, self.path)
        return Reading(text, values, info, self.writer.stamp_of(info))

    def _reading(self) -> Reading:
        """The read taken under this thread's lock while the file has not changed since;
        else a new one."""
        held: Reading | None = getattr(self._held, "reading", None)
        if held is not None and _same_content(held.info, self.path):
            return held
        reading = self._read()
        if held is not None:
            self._held.reading = reading
        return reading

    def reread(self) -> None:
        """Forget the read taken under the lock: the next one reads the file."""
        if getattr(self._held, "reading", None) is not None:
            self._held.reading = self._read()

    def _target(self, reading: Reading) -> TokenStore | None:
        """The store the tokens moved to, if this read says they did."""
        moved = (reading.values.get(STORE_KEY) or "").strip()
        return self._moved(reading.values) if moved else None

    def _stat_stamp(self) -> Hashable:
        try:
            return self.writer.stamp_of(os.stat(self.path))
        except OSError:
            return None

    def stamp(self) -> Hashable:
        return self._watch.precise()  # a stat

    def local_stamp(self) -> Hashable:
        # From memory while no save was counted and the stat interval runs (mlauth.stores.watch)
        return self._watch.quick()

    def load(self) -> tuple[TokenSet, Hashable]:
        reading = self._reading()
        target = self._target(reading)
        if target is not None:
            return target.load()
        with masked(_secrets_in(reading.values)):  # a token pasted under another key
            return tokens_from_values(reading.values, self.path), reading.stamp

    # -- writing ---------------------------------------------------------------------------

    def check_writable(self) -> None:
        real = self.real
        # mlauth's own files beside it, and who else may write there (mlauth.stores.private);
        # a single-file mount keeps none (its lock and journal are on the inode).
        check_folder(os.path.dirname(real))
        self.journal.check_files()
        reading = self._reading()
        try:
            self.writer.probe(real, reading.info)
        except OSError as exc:
            raise StoreError(
                f"cannot save tokens to {real}: {self.writer.reason(exc)} "
                f"({exc.strerror or exc}). Refusing to spend the refresh token: "
                f"{self.writer.fix(exc)}"
            ) from exc
        problem = read_back_problem(
            reading.text, render_update(reading.text, _SAVE_PROBE), _SAVE_PROBE
        )
        if problem is not None:
            raise StoreError(
                f"cannot save tokens to {real}: {problem}. Refusing to spend the refresh token."
            )

    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        """Write the token keys; ``replaces`` is not checked: the file lock is the fence."""
        # Read again, not the read the lock began with: a writer that takes no lock (an
        # editor, a legacy script) may have changed the file since, in a way a stat cannot
        # tell on coarse timestamps, and rendering over an old read would undo its edit (and
        # restore a mode a `chmod 600` just took away).
        reading = self._read()
        # Under the lock the move is known by now; outside it this read tells: tokens
        # written into a file that no longer holds the chain would fork it.
        target = self._target(reading)
        if target is not None:
            return target.save(tokens, replaces=replaces)
        tokens = savable(tokens, self.path)
        updates: dict[str, str | None] = {
            # savable() left no empty token: None is the only value without one.
            ACCESS_KEY: None if tokens.access_token is None else tokens.access_token.reveal(),
            REFRESH_KEY: None if tokens.refresh_token is None else tokens.refresh_token.reveal(),
            EXPIRES_KEY: _fmt_time(tokens.expires_at),
            REFRESHED_AT_KEY: _fmt_time(tokens.refreshed_at),
            REFRESHED_BY_KEY: tokens.refreshed_by,
        }
        data = _render(self.real, reading.text, updates)
        self.writer.write(self.real, data, reading.info)
        self._watch.bump()  # after the file: a peer that sees the count sees the new file
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        stamp = self.writer.stamp_of(info)
        if getattr(self._held, "reading", None) is not None:
            # What the file holds now, without reading it back: _render proved every value
            # reads back as written and every other key as it was.
            values = dict(reading.values)
            for key, value in updates.items():
                if value is None:
                    values.pop(key, None)
                else:
                    values[key] = value
            self._held.reading = Reading(data.decode("utf-8"), values, info, stamp)
        return stamp

    # -- the lock --------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, timeout: float) -> Iterator[None]:
        """This file's lock, and the one read under it that everything until it is let go
        uses; or, if that read says the tokens moved, the lock of the store they moved to."""
        with self.file_lock.hold(timeout):
            self.writer.check_peers(self.real)
            self._check_link()
            before = getattr(self._held, "reading", None)
            self._held.reading = self._read()
            try:
                # A migration holds this lock while it moves the tokens: whoever gets it next
                # must look before deciding anything from the file.
                target = self._target(self._held.reading)
                if target is None:
                    yield
                    return
            finally:
                # Leaving a hold inside another of this thread's: the outer one goes on with
                # the newer read (the inner may have saved), never the one it began with.
                if before is None:
                    self._held.reading = None
        with target.lock(timeout):
            yield

    def _check_link(self) -> None:
        """StoreError if a symlinked ``.env`` now points elsewhere than when this process
        began: its lock, journal and writes are beside the old target, and a refresh would
        spend the new target's token and save its successor into the old one."""
        now = os.path.realpath(self.path)
        if now != self.real and os.path.lexists(self.path):
            raise StoreError(
                f"{self.path} now points to {now}, but this process locks, journals and saves "
                f"beside {self.real}, where it pointed when the process started: refusing to "
                "refresh so the token chain cannot split. Restart the process."
            )

    def transaction(self, *, login: bool = False) -> RefreshTransaction:
        return _FileRefresh(self, login=login)

    def wait_unlocked(self, timeout: float) -> bool:
        return self.file_lock.wait_released(timeout)

    def refresh_in_progress(self) -> bool | None:
        return self.file_lock.busy()

    # -- the journal -----------------------------------------------------------------------

    def reauthorization_required(self) -> str | None:
        # The marker before the tokens: a login saves the new chain, then removes the marker,
        # so a marker gone by now means the tokens read next are the new ones.
        marker = self.journal.marker()
        reading = self._reading()
        target = self._target(reading)
        if target is not None:
            return target.reauthorization_required()
        with masked(_secrets_in(reading.values)):
            stored = tokens_from_values(reading.values, self.path).refresh_token
        return self.journal.reauthorization_from(marker, stored)

    def clear_reauthorization(self) -> None:
        self.journal.clear_reauthorization()

    def status_details(self) -> list[tuple[str, str]]:
        reading = self._reading()
        target = self._target(reading)
        if target is not None:
            return target.status_details()
        with masked(_secrets_in(reading.values)):
            stored = tokens_from_values(reading.values, self.path).refresh_token
        return self.writer.status_rows() + [
            ("journal", row) for row in pending(self.journal, stored)
        ]


class EnvFileStore(TokenStore):
    """Tokens in a ``.env`` file, refreshes serialized by a sibling ``<file>.lock``.

    The lock sits next to the *target* of a symlinked ``.env``, so every process that reaches
    the same file through any link takes the same lock. A file bind-mounted alone is written
    in place and locked on its inode instead (:mod:`.parts` chooses, once).

    Every call goes to the store that holds the tokens: the file (:class:`EnvFile`) until a
    read of it finds that they moved out (a migration writes ``ML_TOKEN_STORE`` and removes
    the token keys, under this file's lock); from then on the store named there, and tokens
    are never written into the file again. If that store cannot be reached from here (the
    extra is not installed), every use raises :class:`~mlauth.StoreMovedError`.
    """

    def __init__(self, path: str | os.PathLike[str] = ".env") -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.location = self.path
        real = os.path.realpath(self.path)
        # A missing file gets its error at the first read.
        parts = parts_for(real, os.path.isfile(real) and in_place_mode(real))
        self._file = EnvFile(self.path, parts, self._moved_to, self)
        #: The store that answers: the file, or where a migration moved the tokens.
        self._current: TokenStore = self._file
        self.lock_path = parts.lock_path
        self.in_place = parts.writer.in_place  # for messages and tests; nothing branches on it
        # Threads that notice the move together must all follow one store object: its lock
        # and the version a thread read are kept on it.
        self._follow_lock = threading.Lock()
        fork_bound.add(self)
        warn_if_readable_by_others(self.path)

    def _after_fork_in_child(self) -> None:
        # A thread of the parent may have been following a migration at the fork. The lock
        # objects rebuild themselves (they are in fork_bound too).
        self._follow_lock = threading.Lock()

    @sealed
    def _moved_to(self, values: Mapping[str, str | None]) -> TokenStore:
        """A read of the file found the tokens moved: answer from their new store, from now on."""
        with self._follow_lock:
            if self._current is self._file:
                self._current = follow(values, self.path, secrets_of(values))
            return self._current

    def __repr__(self) -> str:
        return f"EnvFileStore({self.path!r})"

    def journal(self) -> Journal:
        """The write-ahead refresh journal of the file (see :mod:`mlauth.stores.journal`)."""
        return self._file.journal

    def file_lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """This file's own refresh lock, even after the tokens moved (for ``migrate``)."""
        return self._file.file_lock.hold(timeout)

    def update_file(self, updates: Mapping[str, str | None]) -> None:
        """Set (None: remove) keys of the file itself, as a migration does, under
        :meth:`file_lock`, which the caller holds; every process watching the file sees the
        change at its next request, as it sees a save (:mod:`mlauth.stores.watch`)."""
        update_env_file(self.path, updates, writer=self._file.writer)
        self._file._watch.bump()  # after the file, as save() does

    # -- the contract, answered by the current store ---------------------------------------
    # Sealed (mlauth.errors.sealed) where the file's methods below hold its text, its values
    # or the journal's raw answers in their locals.
    # refresh() is the contract's own: this store's lock() (the file's, which reads the file
    # once and finds a migration there), then transaction() on the store that answers then.

    def stamp(self) -> Hashable:
        return self._current.stamp()

    def local_stamp(self) -> Hashable:
        return self._current.local_stamp()

    @sealed
    def load(self) -> tuple[TokenSet, Hashable]:
        return self._current.load()

    @sealed
    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        return self._current.save(tokens, replaces=replaces)

    @sealed
    def check_writable(self) -> None:
        self._current.check_writable()

    def lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        return self._current.lock(timeout)

    @sealed  # recovery reads the journal's raw answers
    def transaction(self, *, login: bool = False) -> RefreshTransaction:
        return self._current.transaction(login=login)

    def wait_unlocked(self, timeout: float) -> bool:
        """Wait until no process holds the refresh lock, without taking it (optional method).

        True once the lock was seen free (at once if it is free), False after ``timeout``
        seconds. Every waiter of every process wakes together when the holder lets go, and
        none of them polls or queues (:meth:`~mlauth.stores.lock.ReleaseWatch.wait_released`).
        It decides nothing: the store is then re-read, and a refresh still needs the lock.
        """
        return self._current.wait_unlocked(timeout)

    @sealed
    def reauthorization_required(self) -> str | None:
        """Why the seller must authorize again, from the journal's marker; takes no lock."""
        return self._current.reauthorization_required()

    def clear_reauthorization(self) -> None:
        """A new chain is saved (``mlauth login``, under the lock): remove the dead one's marker."""
        self._current.clear_reauthorization()

    def refresh_in_progress(self) -> bool | None:
        """Whether some process holds the refresh lock now."""
        return self._current.refresh_in_progress()

    def incidents(self) -> Incidents:
        """Files beside the real ``.env`` (``<.env>.incident.<name>``), made with ``O_EXCL``."""
        return FileIncidents(os.path.realpath(self.path))

    @sealed  # the journal's raw answers
    def status_details(self) -> list[tuple[str, str]]:
        """``mlauth status`` rows: how the file is written when it is not the usual way,
        refresh answers the journal holds that the file does not have yet, and an answer with
        no usable refresh token that it keeps for a human."""
        return self._current.status_details()
