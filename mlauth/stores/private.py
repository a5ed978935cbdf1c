"""mlauth's own files beside the ``.env``: never reached through a link, never a planted name.

The lock (``.env.lock``), the journal (``.env.journal``), the re-authorization marker
(``.env.reauth``) and the temporary files of a save live in the ``.env``'s folder, under
names anyone can predict. Whoever else can write that folder could plant one in advance: a
symbolic or hard link would turn mlauth's write (and truncate, and chmod) into a write to the
link's target, tokens included; a file of their own would hand them every record mlauth keeps
there, or feed it forged ones (an "answer" record is replayed into the ``.env``). The kernel's
``fs.protected_symlinks`` guards only sticky world-writable folders, and not every machine
turns it on.

So every such file is opened here and nowhere else: with ``O_NOFOLLOW`` (a link is refused by
the kernel, not by a check that could race it), ``O_NONBLOCK`` (a planted FIFO cannot hang the
open), and then checked on the open descriptor (``fstat``: no window between the check and the
use) to be a regular file with one name, owned by this user or root. A file mlauth creates
under a name of its own choosing gets a random one with ``O_EXCL``. Anything else is a
:class:`~mlauth.StoreError` that names the file and the fix, asked for before a refresh token
is spent (:meth:`EnvFileStore.check_writable <mlauth.stores.envfile.EnvFileStore.check_writable>`).

The ``.env`` itself is the user's and may be a symbolic link (Kubernetes, dotfile managers):
it is followed to its real path, and these files live beside that.

:func:`check_folder` is the rule for the folder itself (see its docstring and
``docs/deployments.md``). Cost: a few system calls per refresh, none per request.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
import tempfile
from collections.abc import Iterator

from mlauth.errors import StoreError

from .durable import fsync_dir

__all__ = [
    "check_folder",
    "check_own_fd",
    "check_own_file",
    "open_own",
    "temp_beside",
    "why_refused",
    "write_replacing",
]

log = logging.getLogger("mlauth")

# O_NONBLOCK: opening a FIFO planted under our name would otherwise wait for a writer (or a
# reader) for ever. It changes nothing for a regular file.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _planted(what: str, path: str, problem: str, fix: str) -> StoreError:
    folder = os.path.dirname(path)
    return StoreError(
        f"refusing the {what} {path}: {problem}. {fix}; and keep {folder} writable only by "
        "this user: whoever else can write it can plant files under mlauth's names."
    )


def _remove(path: str, mode: int = stat.S_IFREG) -> str:
    command = "rmdir" if stat.S_ISDIR(mode) else "rm"
    return f"Remove it (`{command} {path}`): mlauth creates the file itself"


def check_own_fd(fd: int, path: str, what: str) -> os.stat_result:
    """The open file's status; StoreError unless it is fit to hold what mlauth keeps there.

    Fit: a regular file, with one name (a second one is a hard link someone else may read or
    have planted), owned by this user or root (an owner who is neither could read and forge
    it).
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _planted(what, path, f"it is {_kind(info.st_mode)}", _remove(path, info.st_mode))
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        raise _planted(
            what,
            path,
            f"it belongs to {_user(info.st_uid)}, not to this user ({_user(me)}) or root",
            f"If an earlier run as that user left it, give it to this one (`chown {me} "
            f"{path}`); otherwise {_remove(path).lower()}",
        )
    if info.st_nlink != 1:
        raise _planted(
            what,
            path,
            f"it has {info.st_nlink} names (hard links), so what mlauth writes there would "
            "show under another name too",
            f"Remove the other names (`find / -xdev -samefile {path}` lists them) or, if you "
            f"did not make them, this one (`rm {path}`: mlauth creates the file itself)",
        )
    return info


def why_refused(path: str, what: str) -> StoreError | None:
    """The StoreError an open refused by O_NOFOLLOW (or by a planted odd file) deserves.

    None when the name holds no link and no odd file: the open failed for another reason.
    Looked up only to word the error; the open itself already refused.
    """
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return _planted(what, path, f"it is a symbolic link (to {target})", _remove(path))
    if not stat.S_ISREG(info.st_mode):  # e.g. ENXIO: a FIFO opened for writing
        return _planted(what, path, f"it is {_kind(info.st_mode)}", _remove(path, info.st_mode))
    return None


def open_own(path: str, flags: int, what: str, *, create: bool = False) -> int:
    """Open mlauth's own file ``path`` (``what`` names it in errors) and check it.

    Never through a link; ``create`` makes it (0600) if it is missing. Raises
    FileNotFoundError if it is missing and not to be created, StoreError if it is not fit
    (:func:`check_own_fd`), OSError otherwise.
    """
    if create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, 0o600)
    except FileNotFoundError:
        raise
    except OSError:
        refused = why_refused(path, what)
        if refused is not None:
            raise refused from None
        raise
    try:
        check_own_fd(fd, path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_own_file(path: str, what: str) -> None:
    """StoreError if mlauth's file ``path`` exists and is not fit; a missing one is fine."""
    try:
        fd = open_own(path, os.O_RDONLY, what)
    except FileNotFoundError:
        return
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot open the {what} {path}: {exc.strerror or exc}") from exc
    os.close(fd)


@contextlib.contextmanager
def temp_beside(path: str) -> Iterator[tuple[int, str]]:
    """A new empty file (0600) beside ``path`` under a random name, removed on the way out.

    ``mkstemp`` creates it with ``O_EXCL`` (and ``O_NOFOLLOW``): no name planted in advance,
    link or file, is ever opened. Named ``.<name>.*.mlauth-tmp`` so that one left by a writer
    killed mid-save is found and removed.
    """
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".mlauth-tmp", dir=folder)
    try:
        yield fd, tmp
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_replacing(path: str, data: bytes) -> None:
    """Write ``path`` whole and durably (0600) through a new temp file renamed over it.

    The rename replaces whatever has the name, a planted link included, never its target.
    Raises OSError.
    """
    with temp_beside(path) as (fd, tmp):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


# -- the folder ------------------------------------------------------------------------------

# Folder -> (mode, owner, group) when it was last judged: the group lookup (which may
# enumerate every user) and the warning happen once per process, and again only on a change.
_judged_folders: dict[str, tuple[int, int, int]] = {}


def _group_is_private(gid: int, owner: int) -> bool:
    """Whether the group has no member but ``owner`` (a user-private group, umask 002).

    Debian's OpenSSH accepts such group-writable files ("user-group-modes"): the group is its
    owner alone. Asked only of a group-writable folder, once per process.
    """
    try:
        group = grp.getgrgid(gid)
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        return False
    if any(member != name for member in group.gr_mem):
        return False
    return all(user.pw_uid == owner for user in pwd.getpwall() if user.pw_gid == gid)


def _other_writers(info: os.stat_result) -> str | None:
    """Who besides this user and root can replace files in the folder; None if nobody."""
    if info.st_uid not in (os.geteuid(), 0):
        return f"its owner, {_user(info.st_uid)}"
    if info.st_mode & stat.S_IWGRP and not _group_is_private(info.st_gid, info.st_uid):
        try:
            group = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group = str(info.st_gid)
        return f"the members of group {group}"
    return None


def check_folder(folder: str) -> None:
    """The rule for the folder that holds the ``.env`` and mlauth's files beside it.

    - Writable by every user, without the sticky bit: StoreError. Anyone on the machine
      could replace the ``.env`` (pointing ``ML_TOKEN_URL`` at a server of theirs) or the
      lock (two lock files, two refreshers, a spent chain); nothing mlauth checks can help.
    - With the sticky bit (``/tmp``-like): fine. Nobody else can rename or remove this
      user's files there, and a name planted in advance is refused by :func:`open_own`.
    - Writable by a group (a setgid project folder, umask 002) or owned by another user:
      one WARNING per process. They can replace the ``.env`` as they can the code that runs
      with it, so refusing would protect nothing the folder's owner has not shared already.
      A group whose only member is the folder's owner (a user-private group) is no one else.
    """
    try:
        info = os.stat(folder)
    except OSError as exc:
        raise StoreError(f"cannot inspect {folder}: {exc.strerror or exc}") from exc
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_ISVTX:
        return
    if mode & stat.S_IWOTH:
        raise StoreError(
            f"refusing to spend the refresh token in {folder}: every user of this machine may "
            f"write that folder (mode {mode:04o}), so anyone could replace the .env, its lock "
            "or its journal and take or break the token chain. Make it writable only by its "
            f"owner (`chmod o-w {folder}`), or add the sticky bit (`chmod +t {folder}`) if "
            "other users must create files there."
        )
    seen = (mode, info.st_uid, info.st_gid)
    if _judged_folders.get(folder) == seen:
        return
    _judged_folders[folder] = seen
    others = _other_writers(info)
    if others is not None:
        log.warning(
            "%s (mode %04o) can be written by %s: they can replace the .env and its refresh "
            "lock, so they hold its tokens as much as this user does. If they should not, "
            "make it writable only by this user (`chmod g-w %s`, or `chown` it), or add the "
            "sticky bit (`chmod +t %s`).",
            folder,
            mode,
            others,
            folder,
            folder,
        )
