"""The ``.env`` token store: read with python-dotenv, written atomically and durably.

Writing keeps the file the user wrote: every line that is not a token key stays byte for
byte (comments, blank lines, order, ``export`` prefixes, CRLF endings), and a token line keeps
its own prefix, quoting style and inline comment; only the value changes. python-dotenv's
``set_key`` was not enough on its own: it takes no lock, does not fsync, drops the comment and
``export`` of the line it touches, and replaces a symlinked ``.env`` with a plain file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import io
import logging
import math
import os
import re
import stat
import threading
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from mlauth.errors import ConfigError, StoreError, StoreMovedError, masked, sealed
from mlauth.secret import Secret, fingerprint, mask
from mlauth.tokens import LATEST_TIME, TokenSet, token_problem

from .base import RefreshTransaction, TokenStore, savable
from .durable import fsync_dir
from .journal import Journal, JournaledRefresh, pending
from .lock import ProcessLock, fork_bound
from .mounted import (
    SAVE_FIX,
    InodeJournal,
    InodeLock,
    fix_for,
    is_mount_point,
    mark_in_place,
    marked_in_place,
    ofd_supported,
    probe_in_place,
    read_locked,
    why_unsaved,
    write_in_place,
)
from .private import check_folder, temp_beside
from .select import STORE_KEY, shared_store
from .watch import COUNTER_SUFFIX, StampWatch, file_stamp

__all__ = ["EnvFileStore", "read_env_file", "secrets_of", "update_env_file"]

log = logging.getLogger("mlauth")

ACCESS_KEY = "ML_ACCESS_TOKEN"
REFRESH_KEY = "ML_REFRESH_TOKEN"
EXPIRES_KEY = "ML_TOKEN_EXPIRES_AT"
REFRESHED_AT_KEY = "ML_TOKEN_REFRESHED_AT"
REFRESHED_BY_KEY = "ML_TOKEN_REFRESHED_BY"
TOKEN_KEYS = (ACCESS_KEY, REFRESH_KEY, EXPIRES_KEY, REFRESHED_AT_KEY, REFRESHED_BY_KEY)
SECRET_KEYS = ("ML_CLIENT_SECRET", ACCESS_KEY, REFRESH_KEY)
# How the file is written: "auto" (in place when it is a mount point, else replaced) or
# "in-place" (for a host process sharing a file that containers mount alone).
WRITE_KEY = "ML_ENV_WRITE"

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


@sealed
def save_problem(real: str, *, in_place: bool) -> str | None:
    """Why a save to ``real`` would not read back (:func:`read_back_problem`), or None."""
    raw = read_locked(real) if in_place else Path(real).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "it is not UTF-8 text; save it as UTF-8"
    return read_back_problem(text, render_update(text, _SAVE_PROBE), _SAVE_PROBE)


# Sealed (mlauth.errors.sealed), here and on the methods below that read or write the file:
# their locals hold its text or its values, the client secret and the tokens among them, and
# an error raised through them (a bad value, an unreadable or unwritable file) must not carry
# those frames to a crash reporter.
@sealed
def read_env_file(path: str | os.PathLike[str]) -> dict[str, str | None]:
    """The file's keys and values as python-dotenv reads them; ConfigError if it is missing.

    A UTF-8 BOM is dropped, and an ``ML_`` key set twice is refused (see _refuse_duplicates).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError(
            f"{path} is a directory, not a .env file; pass the file's path "
            f"(e.g. --env {os.path.join(path, '.env')})"
        )
    if not os.path.isfile(path):
        if os.path.islink(path):
            raise ConfigError(
                f"{path} is a symlink to {os.path.realpath(path)}, which does not exist; "
                "restore that file (a moved or unmounted folder?) or point the link at the "
                ".env that holds ML_CLIENT_ID, ML_CLIENT_SECRET and ML_REFRESH_TOKEN."
            )
        raise ConfigError(
            f"{path}: no such .env file. Create it with ML_CLIENT_ID and ML_CLIENT_SECRET, and "
            "ML_REFRESH_TOKEN unless `mlauth login` is to write one; or pass the right path "
            "(mlauth never creates it silently)."
        )
    try:
        # Under a shared lock on the content: a write in place (a mounted .env) is never seen
        # half done. A replaced file needs none, and its lock costs one fcntl.
        raw = read_locked(path)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig drops the BOM some Windows editors write: python-dotenv 1.0.0 would read
        # it as part of the first key's name, and that key would look missing.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from exc
    _refuse_duplicates(text, path)
    return dict(dotenv_values(stream=io.StringIO(text), interpolate=False))


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
    found = [value for key in SECRET_KEYS if (value := values.get(key))]
    return [Secret(text) for value in found for text in {value, value.strip()} if text]


@sealed
def in_place_mode(path: str, values: Mapping[str, str | None] | None = None) -> bool:
    """Whether ``path`` is written in place and locked on itself (see :mod:`mlauth.stores.mounted`).

    Yes when it is a mount point (a file bind-mounted alone) or its ``ML_ENV_WRITE`` says
    ``in-place``; ConfigError for another value, or where the platform cannot do it.
    """
    real = os.path.realpath(path)
    if values is None:
        values = read_env_file(real)
    written = values.get(WRITE_KEY) or "auto"
    if written.strip().lower() not in ("auto", "in-place"):
        with masked(secrets_of(values)):
            raise ConfigError(
                f"{path}: {WRITE_KEY}={written.strip()!r} is not a write mode; write in-place (a "
                "file that containers mount alone and host processes share) or delete the line"
            )
    mode = written.strip().lower()
    # The mark: a process that found the file mounted alone wrote it in place, so this one
    # (a host process, say) must do the same or leave the containers on a dead inode.
    wanted = mode == "in-place" or is_mount_point(real) or marked_in_place(real)
    if wanted and not ofd_supported():
        raise ConfigError(
            f"{path} is mounted as a single file (or {WRITE_KEY}=in-place), which needs Linux "
            "open-file-description locks; mount the folder instead"
        )
    return wanted


@sealed
def update_env_file(
    path: str | os.PathLike[str],
    updates: Mapping[str, str | None],
    *,
    in_place: bool | None = None,
) -> None:
    """Set (or, for None, remove) keys in an existing ``.env``, atomically and durably.

    The new content goes to a temporary file in the same folder, is fsynced, takes the old
    file's mode and owner, replaces the file with ``os.replace`` (readers see the old or the
    new file, never half of one) and the folder is fsynced so the rename survives a crash. A
    symlinked ``.env`` is followed: its target is replaced and the link stays.

    A file mounted alone (or with ``ML_ENV_WRITE=in-place``; ``in_place`` None decides by
    :func:`in_place_mode`) cannot be replaced: it is written in place, fenced from readers by
    its content lock (:func:`mlauth.stores.mounted.write_in_place`).
    """
    real = os.path.realpath(os.fspath(path))
    if in_place is None:
        in_place = os.path.isfile(real) and in_place_mode(real)
    try:
        with open(real, "rb") as handle:
            before = os.fstat(handle.fileno())
            raw = read_locked(real) if in_place else handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such .env file; mlauth never creates it silently.") from None
    except OSError as exc:
        raise StoreError(f"cannot read {real}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")  # \r\n stays as it is, so untouched lines stay byte for byte
    except UnicodeDecodeError as exc:
        raise StoreError(f"{real} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from None
    new = render_update(text, updates)
    problem = read_back_problem(text, new, updates)
    if problem is not None:
        raise StoreError(f"cannot save to {real}: {problem}. Nothing was written.")
    data = new.encode("utf-8")
    if in_place:
        try:
            write_in_place(real, data)
        except OSError as exc:
            raise StoreError(
                f"cannot write {real} in place: {exc.strerror or exc}. {SAVE_FIX}"
            ) from exc
        return
    _replace(real, data, before)


def _replace(real: str, data: bytes, before: os.stat_result) -> None:
    """Replace ``real`` with ``data`` atomically and durably, keeping its mode and owner."""
    try:
        with temp_beside(real) as (fd, tmp):
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(fd, before.st_uid, before.st_gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.replace(tmp, real)
    except OSError as exc:
        raise StoreError(
            f"cannot write {real}: {exc.strerror or exc}. The folder must be writable by this "
            "user and the disk must have space; the file was left as it was."
        ) from exc
    try:
        fsync_dir(os.path.dirname(real))
    except OSError as exc:
        # The new file is in place and readable by every process: reporting the save as
        # failed now would make the caller treat saved tokens as unsaved.
        log.warning("saved %s, but could not fsync its folder: %s", real, exc)


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


def _may_link(real: str) -> bool:
    """Whether ``fs.protected_hardlinks`` lets this user link ``real``."""
    info = os.stat(real)
    if os.geteuid() in (0, info.st_uid):
        return True
    # The kernel decides by the effective ids (fsuid), as a setuid or seteuid process has them.
    effective = os.access in os.supports_effective_ids
    return os.access(real, os.R_OK | os.W_OK, effective_ids=effective) and not info.st_mode & (
        stat.S_ISUID | stat.S_ISGID
    )


def _drop_stale_aliases(real: str) -> None:
    """Remove hard links a probe killed between its link and unlink left beside the file.

    Each is a second name of an earlier ``.env`` (tokens and secret). One still naming the
    current file may belong to a probe running now, so it waits for the next save.
    """
    folder, name = os.path.split(real)
    pattern = os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.link.mlauth-tmp")
    for alias in glob.glob(pattern):
        with contextlib.suppress(OSError):
            # lstat: a link planted under such a name is removed, never followed.
            if not os.path.samestat(os.lstat(alias), os.stat(real)):
                os.unlink(alias)


def _probe_replace(real: str) -> None:
    """Do what a save does (temp file, fsync, rename over the file) without touching the file.

    A temp file alone proves only that the folder takes new files; an immutable or
    append-only ``.env`` (``chattr``) or a sticky folder refuse the rename itself, and would be
    found out only after the refresh token was spent. So the temp file is renamed over a
    second name of the same inode (a hard link): the kernel checks exactly what it checks for
    the real rename (the target inode's flags and owner, the folder's), while the ``.env``
    itself is never rewritten, so no peer's save can be undone by this check. Linking an
    immutable or append-only file is refused too (EPERM), which says the same thing.
    """
    with open(real, "rb") as handle:
        before = os.fstat(handle.fileno())
    with temp_beside(real) as (fd, tmp):
        os.fchmod(fd, stat.S_IMODE(before.st_mode))
        # As many bytes as the new file will need, plus room for longer values, so a nearly
        # full disk is found out now rather than after the token is spent.
        os.write(fd, b"\0" * (before.st_size + 1024))
        os.fsync(fd)
        # Named like a temp file, so recovery removes one left by a process killed here.
        alias = tmp.removesuffix(".mlauth-tmp") + ".link.mlauth-tmp"
        try:
            os.link(real, alias)
        except OSError as exc:
            if exc.errno == errno.EPERM and _may_link(real):
                raise  # immutable or append-only
            # No hard links on this filesystem, or fs.protected_hardlinks refuses a link to
            # a file this user neither owns nor may write, though a rename over it in a
            # writable folder works: the temp file is all that can be proved.
            return
        try:
            os.replace(tmp, alias)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(alias)


class EnvFileStore(TokenStore):
    """Tokens in a ``.env`` file, refreshes serialized by a sibling ``<file>.lock``.

    The lock sits next to the *target* of a symlinked ``.env``, so every process that reaches
    the same file through any link takes the same lock.

    When the tokens move out of the file while a process runs (a migration writes
    ``ML_TOKEN_STORE`` and removes the token keys, under this file's lock), the store notices
    at its next read or lock and from then on forwards everything to the store named there;
    it never writes tokens into the file again. If that store cannot be reached from here
    (the extra is not installed), every use raises :class:`~mlauth.StoreMovedError`.
    """

    def __init__(self, path: str | os.PathLike[str] = ".env") -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.location = self.path
        real = os.path.realpath(self.path)
        # A file mounted alone shares only its inode with the other containers: lock that,
        # and write in place (mlauth.stores.mounted). A missing file gets its error at the
        # first read.
        self.in_place = os.path.isfile(real) and in_place_mode(real)
        self._lock: ProcessLock | InodeLock
        if self.in_place:
            self.lock_path = real
            self._lock = InodeLock(real)
            with contextlib.suppress(OSError):  # the save probe reports why, before spending
                mark_in_place(real)
        else:
            self.lock_path = real + ".lock"
            self._lock = ProcessLock(self.lock_path)
        # Peers' saves show through a counter in shared memory, not a stat per request
        # (mlauth.stores.watch); a file mounted alone shares no folder to keep one in.
        counter = None if self.in_place else real + COUNTER_SUFFIX
        self._watch = StampWatch(functools.partial(file_stamp, self.path, self.in_place), counter)
        self._moved: TokenStore | StoreMovedError | None = None
        # Threads that notice the move together must all follow one store object: its lock
        # and the version a thread read are kept on it.
        self._follow_lock = threading.Lock()
        fork_bound.add(self)
        warn_if_readable_by_others(self.path)

    def _after_fork_in_child(self) -> None:
        # A thread of the parent may have been following a migration at the fork. The lock
        # objects rebuild themselves (they are in fork_bound too).
        self._follow_lock = threading.Lock()

    def journal(self) -> Journal:
        """The write-ahead refresh journal beside the file (see :mod:`mlauth.stores.journal`)."""
        real = os.path.realpath(self.path)
        return InodeJournal(real) if self.in_place else Journal(real)

    @sealed  # recovery reads the journal's raw answers
    def transaction(self, *, login: bool = False) -> RefreshTransaction:
        """A journaled transaction (or the one of the store the tokens moved to)."""
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            return moved.transaction(login=login)
        return JournaledRefresh(self, self.journal(), login=login)

    def reauthorization_required(self) -> str | None:
        """Why the seller must authorize again, from the journal's marker; takes no lock."""
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            return moved.reauthorization_required()
        journal = self.journal()
        # The marker before the tokens: a login saves the new chain, then removes the marker,
        # so a marker gone by now means the tokens read next are the new ones.
        marker = journal.marker()
        tokens, _ = self.load()
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            return moved.reauthorization_required()
        return journal.reauthorization_from(marker, tokens.refresh_token)

    def clear_reauthorization(self) -> None:
        """A new chain is saved (``mlauth login``, under the lock): remove the dead one's marker."""
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            moved.clear_reauthorization()
            return
        self.journal().clear_reauthorization()

    def __repr__(self) -> str:
        return f"EnvFileStore({self.path!r})"

    @sealed
    def _follow(self, values: Mapping[str, str | None] | None = None) -> TokenStore | None:
        """The store the tokens moved to, if the file says they moved; raise if unusable."""
        if self._moved is None:
            if values is None:
                values = read_env_file(self.path)
            if not (values.get(STORE_KEY) or "").strip():
                return None
            with self._follow_lock:
                if self._moved is None:
                    try:
                        with masked(secrets_of(values)):  # logged and kept: quoted nowhere
                            self._moved = shared_store(values, self.path)
                    except ConfigError as exc:
                        self._moved = StoreMovedError(
                            f"{self.path}: the tokens moved out of this file ({STORE_KEY} is "
                            f"set) and this process cannot follow them: {exc}. Fix that and "
                            "restart it; it will not refresh into the file."
                        )
                    if isinstance(self._moved, StoreMovedError):
                        log.error("%s", self._moved)
                    else:
                        log.warning(
                            "%s: tokens moved to %s; following them", self.path, self._moved
                        )
        if isinstance(self._moved, StoreMovedError):
            # A new object each time: one exception raised in several threads would mix
            # their tracebacks.
            raise StoreMovedError(str(self._moved))
        return self._moved

    def local_stamp(self) -> Hashable:
        # From memory while no save was counted and the stat interval runs (a stat for a
        # file mounted alone), unless the tokens moved to a store whose stamp is its own.
        moved = self._follow() if self._moved is not None else None
        return self._watch.quick() if moved is None else moved.local_stamp()

    def stamp(self) -> Hashable:
        moved = self._follow() if self._moved is not None else None
        return self._watch.precise() if moved is None else moved.stamp()

    @sealed
    def load(self) -> tuple[TokenSet, Hashable]:
        stamp = self.stamp()  # before the read: a write in between then shows as a change
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            return moved.load()
        values = read_env_file(self.path)
        with masked(secrets_of(values)):  # a token pasted under another key is not quoted
            moved = self._follow(values)
            if moved is not None:
                return moved.load()
            return tokens_from_values(values, self.path), stamp

    def check_writable(self) -> None:
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            moved.check_writable()
            return
        real = os.path.realpath(self.path)
        # mlauth's own files beside it, and who else may write there (mlauth.stores.private);
        # a single-file mount keeps none (its lock and journal are on the inode).
        check_folder(os.path.dirname(real))
        if not self.in_place:
            self.journal().check_files()
        try:
            if self.in_place:
                probe_in_place(real)
            else:
                _drop_stale_aliases(real)
                _probe_replace(real)
            problem = save_problem(real, in_place=self.in_place)
        except OSError as exc:
            why = why_unsaved(exc, in_place=self.in_place)
            raise StoreError(
                f"cannot save tokens to {real}: {why}. Refusing to spend the refresh token: "
                f"{fix_for(exc)}"
            ) from exc
        if problem is not None:
            raise StoreError(
                f"cannot save tokens to {real}: {problem}. Refusing to spend the refresh token."
            )

    @sealed
    def save(self, tokens: TokenSet, *, replaces: Hashable | None = None) -> Hashable:
        """Write the token keys; ``replaces`` is not checked: the file lock is the fence."""
        # Under the lock the file was re-read, so a move is known by now; look once more
        # anyway: tokens written into a file that no longer holds the chain would fork it.
        moved = self._follow()
        if moved is not None:
            return moved.save(tokens, replaces=replaces)
        tokens = savable(tokens, self.path)
        updates: dict[str, str | None] = {
            ACCESS_KEY: tokens.access_token.reveal() if tokens.access_token else None,
            REFRESH_KEY: tokens.refresh_token.reveal() if tokens.refresh_token else None,
            EXPIRES_KEY: _fmt_time(tokens.expires_at),
            REFRESHED_AT_KEY: _fmt_time(tokens.refreshed_at),
            REFRESHED_BY_KEY: tokens.refreshed_by,
        }
        update_env_file(self.path, updates, in_place=self.in_place)
        self._watch.bump()  # after the file: a peer that sees the count sees the new file
        return self.stamp()

    def lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        return self._hold(timeout)

    def _check_mode(self) -> None:
        """StoreError if this process and its peers no longer agree on how the file is saved.

        Called under the lock, before anything is decided or spent. Two ways they part:
        a container started after this (host) process and now writes the file in place,
        locking its inode, which this process's sibling lock file does not exclude; or, seen
        from inside a container, the host replaced the file (an editor, a process without
        the in-place mode), and the mount still shows the old inode, now unlinked, whose
        refresh token the host has spent.
        """
        real = os.path.realpath(self.path)
        if not self.in_place and marked_in_place(real):
            raise StoreError(
                f"{real} is now also written in place by a process that mounts it as a single "
                "file (a container), and this process, started before that, saves it another "
                "way: refusing to refresh so the two cannot split the token chain. Restart "
                "this process (it will follow), or mount the folder in the containers."
            )
        if self.in_place:
            try:
                replaced = os.stat(real).st_nlink == 0
            except OSError:
                replaced = False  # a missing file gets its own error at the read
            if replaced:
                raise StoreError(
                    f"{real} was replaced on the host (by an editor, or a process that does "
                    "not write it in place), and this mount still shows the old file: "
                    "refusing to refresh from it. Restart the container; on the host, edit "
                    f"the file in place and put {WRITE_KEY}=in-place in it."
                )

    def file_lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """This file's own refresh lock, even after the tokens moved (for ``migrate``)."""
        return self._lock.hold(timeout)

    @contextlib.contextmanager
    def _hold(self, timeout: float) -> Iterator[None]:
        moved = self._follow() if self._moved is not None else None
        if moved is None:
            with self._lock.hold(timeout):
                self._check_mode()
                # A migration holds this lock while it moves the tokens: whoever gets it next
                # must look before deciding anything from the file.
                moved = self._follow()
                if moved is None:
                    yield
                    return
        with moved.lock(timeout):
            yield

    def wait_unlocked(self, timeout: float) -> bool:
        """Wait until no process holds the refresh lock, without taking it (optional method).

        True once the lock was seen free (at once if it is free), False after ``timeout``
        seconds. Every waiter of every process wakes together when the holder lets go, and
        none of them polls or queues (:meth:`~mlauth.stores.lock.ReleaseWatch.wait_released`).
        It decides nothing: the store is then re-read, and a refresh still needs the lock.

        After the tokens moved to another store, that store's ``wait_unlocked`` answers.
        """
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            return moved.wait_unlocked(timeout)
        return self._lock.wait_released(timeout)

    @sealed  # the journal's raw answers
    def status_details(self) -> list[tuple[str, str]]:
        """``mlauth status`` rows: how the file is written when it is not the usual way,
        refresh answers the journal holds that the file does not have yet, and an answer with
        no usable refresh token that it keeps for a human."""
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            return moved.status_details()
        rows = []
        if self.in_place:
            rows.append(
                ("written", "in place, for single-file mounts; lock and journal on its inode")
            )
        stored = self.load()[0].refresh_token
        rows += [("journal", row) for row in pending(self.journal(), stored)]
        return rows

    def refresh_in_progress(self) -> bool | None:
        """Whether some process holds the refresh lock now (the new store's answer after a move)."""
        moved = self._follow() if self._moved is not None else None
        if moved is not None:
            return moved.refresh_in_progress()
        return self._lock.busy()
