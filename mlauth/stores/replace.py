"""The usual way a ``.env`` is written: a new file renamed over the old one.

The new content goes to a temporary file in the same folder
(:func:`~mlauth.stores.private.temp_beside`), is fsynced, takes the old file's mode and
owner, replaces the file with ``os.replace`` (readers see the old or the new file, never
half of one) and the folder is fsynced so the rename survives a crash. The temporary files
are this writer's: it removes the ones a writer killed mid-save left
(:meth:`ReplaceWriter.tidy`), and the second names its probe makes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import stat
import time
from collections.abc import Hashable

from mlauth.errors import StoreError

from .durable import fsync_dir
from .inplace import marked_in_place
from .private import temp_beside
from .unsaved import common_fix, common_reason
from .writer import Writer

__all__ = ["STALE_TEMP_AGE", "ReplaceWriter"]

log = logging.getLogger("mlauth")

# A temporary .env older than this, found under the lock, was left by a writer that died.
STALE_TEMP_AGE = 60.0
TEMP_SUFFIX = ".mlauth-tmp"
LINK_SUFFIX = ".link" + TEMP_SUFFIX


class ReplaceWriter(Writer):
    """Writes a temporary file and renames it over the ``.env``; reads it plainly."""

    in_place = False

    def read(self, path: str) -> tuple[bytes, os.stat_result]:
        # A renamed file is whole from its first byte: no lock to read it.
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            return handle.read(), info

    def stamp_of(self, info: os.stat_result) -> Hashable:
        # Rotated tokens have the same length, so the size alone would not tell; os.replace
        # gives a new inode on every save, and mtime_ns catches an in-place edit. Not ctime:
        # the save probe's hard link changes it before every refresh, and every process would
        # re-read the file then for nothing.
        return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)

    def write(self, real: str, data: bytes, before: os.stat_result) -> None:
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
                f"cannot write {real}: {exc.strerror or exc}. The folder must be writable by "
                "this user and the disk must have space; the file was left as it was."
            ) from exc
        try:
            fsync_dir(os.path.dirname(real))
        except OSError as exc:
            # The new file is in place and readable by every process: reporting the save as
            # failed now would make the caller treat saved tokens as unsaved.
            log.warning("saved %s, but could not fsync its folder: %s", real, exc)

    def probe(self, real: str, before: os.stat_result) -> None:
        """Do what a save does (temp file, fsync, rename over the file) without touching it.

        A temp file alone proves only that the folder takes new files; an immutable or
        append-only ``.env`` (``chattr``) or a sticky folder refuse the rename itself, and
        would be found out only after the refresh token was spent. So the temp file is
        renamed over a second name of the same inode (a hard link): the kernel checks exactly
        what it checks for the real rename (the target inode's flags and owner, the
        folder's), while the ``.env`` itself is never rewritten, so no peer's save can be
        undone by this check. Linking an immutable or append-only file is refused too
        (EPERM), which says the same thing.
        """
        _drop_stale_aliases(real)
        with temp_beside(real) as (fd, tmp):
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            # As many bytes as the new file will need, plus room for longer values, so a
            # nearly full disk is found out now rather than after the token is spent.
            os.write(fd, b"\0" * (before.st_size + 1024))
            os.fsync(fd)
            # Named like a temp file, so recovery removes one left by a process killed here.
            alias = tmp.removesuffix(TEMP_SUFFIX) + LINK_SUFFIX
            try:
                os.link(real, alias)
            except OSError as exc:
                if exc.errno == errno.EPERM and _may_link(real):
                    raise  # immutable or append-only
                # No hard links on this filesystem, or fs.protected_hardlinks refuses a link
                # to a file this user neither owns nor may write, though a rename over it in
                # a writable folder works: the temp file is all that can be proved.
                return
            try:
                os.replace(tmp, alias)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(alias)

    def reason(self, exc: OSError) -> str:
        if exc.errno == errno.EBUSY:
            return (
                "it is a mount point (a file bind-mounted alone?) that cannot be replaced; set "
                "ML_ENV_WRITE=in-place in it, or mount its folder"
            )
        return common_reason(exc)

    def fix(self, exc: OSError) -> str:
        return common_fix(exc)

    def check_peers(self, real: str) -> None:
        # A container started after this (host) process and now writes the file in place,
        # locking its inode, which this process's sibling lock file does not exclude.
        if marked_in_place(real):
            raise StoreError(
                f"{real} is now also written in place by a process that mounts it as a single "
                "file (a container), and this process, started before that, saves it another "
                "way: refusing to refresh so the two cannot split the token chain. Restart "
                "this process (it will follow), or mount the folder in the containers."
            )

    def tidy(self, real: str) -> None:
        """Delete temporary copies of the .env that a writer killed mid-save left behind.

        They hold live tokens (mode 0600, but still a copy nobody needs). Only old ones go: a
        program calling ``update_env_file`` without our lock may be writing one right now.
        """
        folder, name = os.path.split(real)
        now = time.time()
        for path in glob.glob(
            os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{TEMP_SUFFIX}")
        ):
            with contextlib.suppress(OSError):
                # lstat: a link planted under such a name is removed, its target never looked at.
                if now - os.lstat(path).st_mtime > STALE_TEMP_AGE:
                    os.unlink(path)
                    log.info("removed %s, left by a writer that died mid-save", path)


def _drop_stale_aliases(real: str) -> None:
    """Remove hard links a probe killed between its link and unlink left beside the file.

    Each is a second name of an earlier ``.env`` (tokens and secret). One still naming the
    current file may belong to a probe running now, so it waits for the next save.
    """
    folder, name = os.path.split(real)
    for alias in glob.glob(
        os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{LINK_SUFFIX}")
    ):
        with contextlib.suppress(OSError):
            # lstat: a link planted under such a name is removed, never followed.
            if not os.path.samestat(os.lstat(alias), os.stat(real)):
                os.unlink(alias)


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
