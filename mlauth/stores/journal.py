"""The refresh journal: a write-ahead log that keeps a spent refresh token's successor.

A refresh spends the stored refresh token; its successor exists only in the token
endpoint's answer until the store has it. A process killed in between (or a store that
fails to write) would lose the chain for good. So, under the store lock, every refresh
appends to ``<real .env path>.journal``, each record fsynced before the next step:

1. ``intent``: the fingerprint of the refresh token about to be spent (never the token);
2. ``raw``: the raw bytes of a 2xx answer and their arrival time, as soon as they arrive,
   *before* anything reads them (:func:`mlauth.answers.raw_record`): a check that finds
   fault with the answer can no longer throw away the only live refresh token;
3. commit: once the store holds the answer, the journal is emptied (truncated), so it
   never grows beyond the refreshes of one outage.

Recovery (:func:`recover`, run under the lock before anyone decides to refresh) reads it
back: an answer the store does not have yet is read as the endpoint reads it
(:mod:`mlauth.answers`) and its usable tokens are written to the store (replayed); an intent
with no answer means the token was *possibly spent* by a process that died while its POST
was in flight, and it is tried exactly once, with no retry series. An answer with no usable
refresh token is *kept* for a human (``mlauth status`` shows it) until the store holds
another refresh token. The raw record holds live tokens, so the journal is as secret as the
``.env``: created 0600, never logged. (Journals of older versions hold ``answer`` records,
the parsed tokens, in place of ``raw``; they are replayed alike.)

Beside it lives ``<real .env path>.reauth`` (0600), written after ``invalid_grant``. While
the store still holds the refresh token it names, every process refuses at once with the fix
instead of each spending a request to learn the same thing; a new token in the store makes it
stale, and ``mlauth login`` removes it once the new chain is saved.

The answer record is also the one fallback for tokens whose save failed: the process keeps
them in memory and retries, and any process that takes the lock replays them from here. The
journal lives in the folder that was found writable just before the token was spent.

:class:`JournaledRefresh` is the refresh transaction of a store with a journal (the ``.env``
store); a store with its own crash safety (Redis, with a fenced commit) has none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from mlauth.answers import RAW_LIMIT, tokens_of, writer_of
from mlauth.errors import REAUTHORIZE, InvalidGrantError, RefreshError, StoreError
from mlauth.secret import Secret, fingerprint
from mlauth.stores.base import KeptAnswerRefresh, TokenStore, with_note
from mlauth.tokens import TokenSet, this_process

from .durable import fsync_dir
from .private import check_own_file, open_own, write_replacing

__all__ = ["Journal", "JournaledRefresh", "Recovery", "pending", "recover", "with_note"]

log = logging.getLogger("mlauth")


def _nothing() -> None:
    pass


def _read_own(path: str, what: str) -> bytes | None:
    """The bytes of mlauth's own file ``path``, None if there is none. Raises OSError.

    Never through a link, never another user's file: records read here are acted upon (an
    answer is replayed into the store), so a forged one must not get in.
    """
    try:
        fd = open_own(path, os.O_RDONLY, what)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _tokens_to_json(tokens: TokenSet) -> dict[str, Any]:
    return {
        "access_token": tokens.access_token.reveal() if tokens.access_token else None,
        "refresh_token": tokens.refresh_token.reveal() if tokens.refresh_token else None,
        "expires_at": tokens.expires_at,
        "refreshed_at": tokens.refreshed_at,
        "refreshed_by": tokens.refreshed_by,
    }


def _tokens_from_json(data: dict[str, Any]) -> TokenSet:
    def secret(key: str) -> Secret | None:
        value = data.get(key)
        return Secret(value) if isinstance(value, str) and value else None

    def number(key: str) -> float | None:
        value = data.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    by = data.get("refreshed_by")
    return TokenSet(
        access_token=secret("access_token"),
        refresh_token=secret("refresh_token"),
        expires_at=number("expires_at"),
        refreshed_at=number("refreshed_at"),
        refreshed_by=by if isinstance(by, str) else None,
    )


@dataclass(frozen=True)
class Recovery:
    """What recovery found: tokens it wrote to the store, or a token possibly spent."""

    replayed: TokenSet | None = None
    possibly_spent: str | None = None  # fingerprint of the stored token sent without an answer
    died: str | None = None  # who sent it and what became of the request, for the message
    kept: str | None = None  # an answer with no usable refresh token, kept for a human
    #: The records the journal still holds, when recovery wrote nothing to it (None: read
    #: it again): the intent written next under the same lock needs no second read.
    left: list[dict[str, Any]] | None = None


class Journal:
    """The write-ahead journal of one token store, and its re-authorization marker.

    Every method that writes is called with the store lock held; the journal is never read or
    written without it, so records from two refreshes never interleave.
    """

    #: The most of a raw answer a record keeps as it came (larger ones keep their essentials).
    raw_limit = RAW_LIMIT

    def __init__(self, real_path: str) -> None:
        self.store_path = real_path
        self.path = real_path + ".journal"
        self.reauth_path = real_path + ".reauth"
        # Where they are, for messages (the attributes of a file, for a .env mounted alone).
        self.where, self.reauth_where = self.path, self.reauth_path
        #: Removes what a writer killed mid-save left beside the store (its writer's
        #: temporary files); asked by :func:`recover` when the journal is not empty.
        self.tidy: Callable[[], None] = _nothing
        # What to do when the journal cannot be written, for the error that refuses a refresh.
        self.write_fix = "fix the folder's permissions or free disk space, then try again."

    def __repr__(self) -> str:
        return f"Journal({self.path!r})"

    # -- records ---------------------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        """Append one record durably, or leave the file exactly as it was and raise OSError.

        A write cut short (a full disk mid-record) is cut back off; a fragment left by a
        writer killed mid-record is ended with a newline first, so our record starts a line
        of its own instead of being glued to the fragment and dropped with it.
        """
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        created = not os.path.lexists(self.path)
        fd = open_own(self.path, os.O_RDWR | os.O_APPEND, "refresh journal", create=True)
        try:
            info = os.fstat(fd)
            if info.st_mode & 0o777 != 0o600:
                # The answer records hold live tokens: a journal created loose (by hand, an
                # older version, a restored backup) is made private before one is written.
                os.fchmod(fd, 0o600)
            size = info.st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                # Undo the partial record: the next append would otherwise follow a fragment.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_dir(os.path.dirname(self.path))

    def _read_log(self) -> bytes:
        """The journal's bytes (empty if there is none); raises OSError (StoreError if unfit)."""
        return _read_own(self.path, "refresh journal") or b""

    def check_files(self) -> None:
        """StoreError if the journal or the marker exists and is not fit to be used.

        Asked before a refresh token is spent: one planted in advance (a link, another user's
        file) is refused then, with the fix, not found out once the answer must be written.
        """
        check_own_file(self.path, "refresh journal")
        check_own_file(self.reauth_path, "re-authorization marker")

    def records(self) -> list[dict[str, Any]]:
        """The records in order; a torn last line (a crash mid-append) is ignored."""
        try:
            raw = self._read_log()
        except StoreError:
            raise  # it names the file and the fix
        except OSError as exc:
            raise StoreError(f"cannot read the refresh journal {self.where}: {exc}") from exc
        out: list[dict[str, Any]] = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a writer killed mid-append; _append ends it with a newline
                log.warning("ignoring a torn record in the refresh journal %s", self.where)
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def intent(self, spent: Secret, records: list[dict[str, Any]] | None = None) -> str | None:
        """Record that ``spent`` is about to be sent. Raises StoreError if it cannot be.

        Returns how it was sent before without a usable answer (the token is then *possibly
        spent*): "pid N@host sent it and died ..." or "... got no usable answer (why)"; or
        None. ``records``: what the journal holds, if read under this lock since its last
        write (:attr:`Recovery.left`); else it is read.
        """
        if records is None:
            records = self.records()
        orphan = _open_intents(records).get(spent.fingerprint) if records else None
        try:
            self._append(
                {
                    "kind": "intent",
                    "spent": spent.fingerprint,
                    "at": time.time(),
                    "by": this_process(),
                }
            )
        except OSError as exc:
            raise StoreError(
                f"cannot write the refresh journal {self.where} ({exc.strerror or exc}). "
                f"Refusing to spend the refresh token: {self.write_fix}"
            ) from exc
        return orphan

    def abort(self, spent: Secret, *, unanswered: str | None = None) -> None:
        """The refresh with ``spent`` failed: record whether the token may have been spent.

        ``unanswered`` None: the server's answer proves it was not (a definite refusal), so
        the intent is closed and the next refresh gets a full retry series. Otherwise it
        says why no usable answer came (a timeout, a reset, a 5xx, a broken 200): the
        request may have reached the server and rotated the token, so the intent stays open
        and the next refresh tries the token exactly once.
        """
        record: dict[str, Any] = {"kind": "abort", "spent": spent.fingerprint}
        if unanswered is not None:
            record.update(kind="unanswered", by=this_process(), why=unanswered)
        try:
            self._append(record)
        except OSError as exc:
            log.warning("could not write to the refresh journal %s: %s", self.where, exc)

    def answer(self, spent: Secret, tokens: TokenSet) -> bool:
        """Record the answer that replaced ``spent``; False (and an error log) if it failed."""
        record = {"kind": "answer", "spent": spent.fingerprint, "tokens": _tokens_to_json(tokens)}
        try:
            self._append(record)
        except OSError as exc:
            log.error("could not write the token answer to the journal %s: %s", self.where, exc)
            return False
        return True

    def raw(self, record: dict[str, Any]) -> bool:
        """Append a raw answer (:func:`mlauth.answers.raw_record`); False (and an error
        log) if it failed: the answer is read and saved all the same."""
        try:
            self._append(record)
        except OSError as exc:
            log.error(
                "could not write the raw token answer to the journal %s (%s); reading it all "
                "the same, but a crash before the save would lose it",
                self.where,
                exc,
            )
            return False
        return True

    def commit(self) -> None:
        """The store holds the answer: empty the journal (the commit, and its compaction)."""
        try:
            fd = open_own(self.path, os.O_WRONLY, "refresh journal")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not empty the refresh journal %s: %s", self.where, exc)
            return
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        except OSError as exc:
            # Harmless: recovery finds the store already holds the answer and empties it then.
            log.warning("could not empty the refresh journal %s: %s", self.where, exc)
        finally:
            os.close(fd)

    def refused(
        self, spent: Secret, error: InvalidGrantError, orphan: str | None
    ) -> InvalidGrantError:
        """Record an ``invalid_grant`` for ``spent``; the error to raise (with the history).

        The marker stops every process from sending the dead token again until the store
        holds another one.
        """
        self.abort(spent)
        reason = "invalid_grant" + (f"; possibly spent before: {orphan}" if orphan else "")
        self.mark_reauthorization_required(spent, reason)
        if orphan is None:
            return error
        refused = InvalidGrantError(
            f"the refresh token {spent.fingerprint} was refused (invalid_grant). It was "
            f"possibly spent already: {orphan}, so its successor never reached the store (the "
            f"one window no client can close). {REAUTHORIZE}",
            status_code=error.status_code,
            error=error.error,
            description=error.description,
        )
        return refused

    # -- re-authorization marker -----------------------------------------------------------

    def _write_marker(self, data: bytes) -> None:
        write_replacing(self.reauth_path, data)

    def _read_marker(self) -> bytes | None:
        return _read_own(self.reauth_path, "re-authorization marker")

    def mark_reauthorization_required(self, spent: Secret, reason: str) -> None:
        record = {
            "refresh_token": spent.fingerprint,
            "at": time.time(),
            "by": this_process(),
            "reason": reason,
        }
        try:
            self._write_marker(json.dumps(record).encode("utf-8"))
        except OSError as exc:
            log.warning(
                "could not write the re-authorization marker %s: %s", self.reauth_where, exc
            )

    def marker(self) -> dict[str, Any] | None:
        """The marker's record; None if there is none (or it is unreadable, logged)."""
        try:
            raw = self._read_marker()
            if raw is None:
                return None
            data = json.loads(raw)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable marker %s: %s", self.reauth_where, exc)
            return None
        return data if isinstance(data, dict) else None

    def _remove_marker(self) -> None:
        """Raises OSError; a missing marker is no error."""
        try:
            os.unlink(self.reauth_path)
        except FileNotFoundError:
            return
        fsync_dir(os.path.dirname(self.reauth_path))

    def clear_reauthorization(self) -> None:
        """A new chain is saved (``mlauth login``): remove the marker of the dead one.

        Called under the store lock, after the save: the store never holds the dead token
        without its marker, and no refresher is between its read of the store and its look
        at the marker. The marker is moot by then (it names the dead token's fingerprint,
        which the store no longer holds); a failure to remove it is only logged.
        """
        try:
            self._remove_marker()
        except OSError as exc:
            log.warning("could not remove the stale marker %s: %s", self.reauth_where, exc)

    def reauthorization_from(
        self, data: dict[str, Any] | None, stored: Secret | None
    ) -> str | None:
        """The message if ``data`` (what :meth:`marker` returned) names ``stored``."""
        if data is None or stored is None:
            return None
        if data.get("refresh_token") != stored.fingerprint:
            return None  # the store holds another token now (a new authorization)
        at = data.get("at")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
            if isinstance(at, (int, float))
            else "earlier"
        )
        return (
            f"the refresh token {stored.fingerprint} in {self.store_path} was refused by "
            f"MercadoLibre ({data.get('reason') or 'invalid_grant'}; seen by {data.get('by')} at "
            f"{when}). {REAUTHORIZE}"
        )


def _chain(start: str, answers: dict[str, TokenSet]) -> list[TokenSet]:
    """The answers that follow each other from the stored token's fingerprint, oldest first."""
    found: list[TokenSet] = []
    seen = {start}
    current = start
    while current in answers:
        tokens = answers[current]
        found.append(tokens)
        current = fingerprint(tokens.refresh_token.reveal() if tokens.refresh_token else None)
        if current in seen:
            break  # an answer that kept the same refresh token (no offline_access)
        seen.add(current)
    return found


def _when(at: object) -> str:
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return "an unknown time"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    except (OverflowError, OSError, ValueError):
        return "an unknown time"


def kept_note(record: dict[str, Any], why: str, where: str) -> str:
    """How an answer with no usable refresh token is described, wherever it is kept."""
    return (
        f"an answer from {writer_of(record.get('by')) or 'an unknown process'} at "
        f"{_when(record.get('at'))} "
        f"with no usable refresh token ({why}), kept in {where}"
    )


def _answers(
    records: list[dict[str, Any]], stored: Secret | None, where: str
) -> tuple[dict[str, TokenSet], str | None]:
    """Fingerprint of the token each answer followed -> its tokens; and the description of
    the newest answer to the stored token with nothing usable (kept for a human), if any."""
    start = fingerprint(stored.reveal() if stored else None)
    answers: dict[str, TokenSet] = {}
    kept: str | None = None
    for record in records:
        spent = str(record.get("spent"))
        if record.get("kind") == "answer" and isinstance(record.get("tokens"), dict):
            answers[spent] = _tokens_from_json(record["tokens"])
        elif record.get("kind") == "raw":
            found = tokens_of(record, stored if spent == start else None)
            if isinstance(found, TokenSet):
                answers[spent] = found
            elif spent == start:
                kept = kept_note(record, found, where)
    return answers, kept


def pending(journal: Journal, stored: Secret | None) -> list[str]:
    """What the journal holds for the stored refresh token, in words (``mlauth status``)."""
    start = fingerprint(stored.reveal() if stored else None)
    answers, kept = _answers(journal.records(), stored, journal.where)
    rows = [
        f"an unsaved answer for token {spent}, replayed at the next refresh"
        for spent in answers
        if spent == start
    ]
    if kept is not None and not rows:
        rows.append(
            f"{kept}: if refreshes fail with invalid_grant, run `mlauth login`; the answer "
            "stays there until the store holds another refresh token"
        )
    return rows


def _open_intents(records: list[dict[str, Any]]) -> dict[str, str]:
    """Fingerprint -> how it was sent, for intents no answer or definite refusal closed."""
    intents: dict[str, str] = {}
    for record in records:
        spent = str(record.get("spent"))
        kind = record.get("kind")
        if kind == "intent":
            who = writer_of(record.get("by")) or "a process"
            intents[spent] = f"{who} sent it and died before the answer was saved"
        elif kind == "unanswered":  # the request may have reached the server: still open
            who = writer_of(record.get("by")) or "a process"
            intents[spent] = f"{who} sent it and got no usable answer " + (f"({record.get('why')})")
        else:
            intents.pop(spent, None)
    return intents


def recover(
    journal: Journal, store: TokenStore, tokens: TokenSet, stamp: Hashable
) -> tuple[TokenSet, Hashable, Recovery]:
    """Finish what a dead or failed refresher left behind. Called under the store lock.

    ``tokens``/``stamp`` are what the store holds now. Returns what it holds afterwards and
    what was found. A store that still cannot be written keeps the journal as it was.
    """
    records = journal.records()
    if not records:
        return tokens, stamp, Recovery(left=records)
    journal.tidy()
    stored = fingerprint(tokens.refresh_token.reveal() if tokens.refresh_token else None)
    answers, kept = _answers(records, tokens.refresh_token, journal.where)
    chain = _chain(stored, answers)
    if chain:
        return _replay(journal, store, tokens, stamp, chain[-1])
    intents = _open_intents(records)
    if stored in intents:
        # The last refresher sent (or was about to send) the stored token and died before its
        # answer reached the journal, or got no usable one. Keep the intent: the next
        # refresh tries the token once.
        found = Recovery(possibly_spent=stored, died=intents[stored], kept=kept, left=records)
        return tokens, stamp, found
    if kept is not None:
        # Nothing to do with it but show it, until the store holds another refresh token.
        return tokens, stamp, Recovery(kept=kept, left=records)
    # Everything in the journal is older than the stored tokens: they were saved.
    journal.commit()
    return tokens, stamp, Recovery()


def _replay(
    journal: Journal, store: TokenStore, tokens: TokenSet, stamp: Hashable, newest: TokenSet
) -> tuple[TokenSet, Hashable, Recovery]:
    """Write the newest answer of the chain to the store, and empty the journal."""
    try:
        stamp = store.save(newest, replaces=stamp)
    except Exception as exc:  # noqa: BLE001 (the journal keeps them; nothing is lost)
        log.error(
            "could not replay the journaled tokens into %s yet (%s); kept in %s",
            journal.store_path,
            exc,
            journal.where,
        )
        return tokens, stamp, Recovery()
    log.warning(
        "recovered a refresh that was not saved (a crashed or failed refresher): wrote %s to %s",
        newest.describe(),
        journal.store_path,
    )
    journal.commit()
    return newest, stamp, Recovery(replayed=newest)


_RAW_PLACE = "the refresh journal {}"


class JournaledRefresh(KeptAnswerRefresh):
    """The refresh transaction of a store with a journal: each step is on disk before the next.

    Opening it recovers what a dead refresher left (:func:`recover`); :meth:`begin` writes the
    intent, :meth:`answered` the raw answer before anything reads it, :meth:`commit` the
    commit after the save, :meth:`abort` whether the token may have been spent, or, for
    ``invalid_grant``, the marker that stops every process from sending it again.
    """

    def __init__(self, store: TokenStore, journal: Journal, *, login: bool = False) -> None:
        super().__init__(store, login=login)
        self.journal = journal
        self.raw_limit = journal.raw_limit
        self.tokens, self.version, found = recover(journal, store, self.tokens, self.version)
        self.possibly_spent = found.died
        self._spent: Secret | None = None
        self._records = found.left  # None once anything was written to the journal

    @property
    def raw_place(self) -> str:
        return _RAW_PLACE.format(self.journal.where)

    def keep_raw(self, record: dict[str, Any]) -> str | None:
        self._records = None
        return _RAW_PLACE.format(self.journal.where) if self.journal.raw(record) else None

    def begin(self, spent: Secret) -> None:
        message = self.journal.reauthorization_from(self.journal.marker(), spent)
        if message is not None:  # known dead: not sent again
            raise InvalidGrantError(f"not sent: {message}", status_code=400, error="invalid_grant")
        super().begin(spent)
        records, self._records = self._records, None
        self.possibly_spent = self.journal.intent(spent, records)
        self._spent = spent

    def commit(self, tokens: TokenSet) -> Hashable:
        # A token client that hands over no raw answer (a custom one): the parsed answer is
        # journaled instead, first, so a crash from here loses nothing.
        offered = self._raw_kept is not None
        if not offered and self._spent is not None and self.journal.answer(self._spent, tokens):
            self.answer_kept = self.raw_place
        version = super().commit(tokens)
        self._records = None
        self.journal.commit()
        return version

    def abort(self, spent: Secret, error: RefreshError) -> RefreshError:
        self._records = None
        if self._grant == "refresh_token":
            if isinstance(error, InvalidGrantError):
                return self.journal.refused(spent, error, self.possibly_spent)
            self.journal.abort(spent, unanswered=error.possibly_spent)
        return self.raw_note(
            error, where=self.journal.where, until="until the store holds another refresh token"
        )

    def settle(self, tokens: TokenSet) -> Hashable:
        version = super().commit(tokens)
        self._records = None
        self.journal.commit()  # nothing is left to replay
        return version
