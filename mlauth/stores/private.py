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
use) to be a regular file with one name, owned by this user or root (or, for root, by the
``.env``'s owner, to whom root gives what it creates: :func:`check_own_fd`). A file mlauth
creates under a name of its own choosing gets a random one with ``O_EXCL``. Anything else is a
:class:`~mlauth.StoreError` that names the file and the fix, asked for before a refresh token
is spent (:meth:`EnvFileStore.check_writable <mlauth.stores.envfile.EnvFileStore.check_writable>`).

The ``.env`` itself is the user's and may be a symbolic link (Kubernetes, dotfile managers):
it is followed to its real path, and these files live beside that.

:func:`check_folder` is the rule for the folder itself and every folder above it (see its
docstring and ``docs/deployments.md``). Cost: a few system calls per refresh, and one ``stat``
per folder above; none per request.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import pwd
import stat
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

from mlauth.errors import StoreError

from .durable import fsync_dir

__all__ = [
    "check_folder",
    "check_own_fd",
    "check_own_file",
    "check_own_name",
    "denied",
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


def check_own_fd(fd: int, path: str, what: str, *, created: bool = False) -> os.stat_result:
    """The open file's status; StoreError unless it is fit to hold what mlauth keeps there.

    Fit: a regular file, with one name (a second one is a hard link someone else may read or
    have planted), owned by this user or root (an owner who is neither could read and forge
    it); run as root, also one owned by the ``.env``'s owner in that user's own folder
    (:func:`_given_to`).

    ``created``: this very open made the file (``O_EXCL``). Run as root, it is then given to
    the ``.env``'s owner under the same rule. A pipeline's ``.env`` is its user's, but root
    runs mlauth on it too: ``sudo``, a root cron job, a container running as root on the
    bind-mounted folder. Left root's (0600), the lock and the journal would refuse the user's
    next run. Only a file this open made is given: a file of root's found under the name (one
    an older run left, or one renamed there) keeps its owner, and the user gets
    :func:`denied`'s ``chown`` fix.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _planted(what, path, f"it is {_kind(info.st_mode)}", _remove(path, info.st_mode))
    if info.st_nlink != 1:  # before anything is given: a link would give its target away
        raise _planted(
            what,
            path,
            f"it has {info.st_nlink} names (hard links), so what mlauth writes there would "
            "show under another name too",
            f"Remove the other names (`find / -xdev -samefile {path}` lists them) or, if you "
            f"did not make them, this one (`rm {path}`: mlauth creates the file itself)",
        )
    me = os.geteuid()
    if me == 0 and (info.st_uid != 0 or created):
        owner = _given_to(path)
        if owner is not None and created:
            try:
                os.fchown(fd, *owner)
                info = os.fstat(fd)
            except OSError as exc:  # a user namespace where that owner is not mapped
                log.debug("could not give %s to uid %d: %s", path, owner[0], exc)
        if owner is not None and info.st_uid == owner[0]:
            me = owner[0]  # the .env's owner, given the file by root now or earlier
    if info.st_uid not in (me, 0):
        raise _planted(
            what,
            path,
            f"it belongs to {_user(info.st_uid)}, not to this user ({_user(me)}) or root",
            f"If an earlier run as that user left it, give it to this one (`chown {me} "
            f"{path}`); otherwise {_remove(path).lower()}",
        )
    return info


def _given_to(path: str) -> tuple[int, int] | None:
    """Whom root gives mlauth's file ``path`` beside a store (``<store>.lock``,
    ``<store>.journal``, ...): the store's owner and group, if the store is a regular file of
    a user other than root, in a folder of that user's that no group or other may write.

    No third user can then plant or swap anything there; the owner could already replace
    every file in it. A ``.env`` of root's, or in a shared or sticky folder, gets nothing.
    """
    store = os.path.splitext(path)[0]
    try:
        info = os.lstat(store)
        folder = os.stat(os.path.dirname(store))
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid in (0, _unmapped_owner()):
        return None
    if folder.st_uid != info.st_uid or folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return info.st_uid, info.st_gid


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


def open_own(path: str, flags: int, what: str, *, create: bool = False, mode: int = 0o600) -> int:
    """Open mlauth's own file ``path`` (``what`` names it in errors) and check it.

    Never through a link; ``create`` makes it (``mode``, 0600 unless told) if it is missing.
    Raises FileNotFoundError if it is missing and not to be created, StoreError if it is not
    fit (:func:`check_own_fd`, which gives a file root made to the ``.env``'s owner), OSError
    otherwise.
    """
    created = False
    try:
        if create:
            try:  # made by this open, or found: only a file it made may be given away
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode)
                created = True
            except FileExistsError:
                fd = os.open(path, flags | os.O_CREAT | _OPEN_FLAGS, mode)
        else:
            fd = os.open(path, flags | _OPEN_FLAGS, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        refused = why_refused(path, what) or denied(path, what, exc)
        if refused is not None:
            raise refused from None
        raise
    try:
        check_own_fd(fd, path, what, created=created)
    except BaseException:
        os.close(fd)
        raise
    return fd


def denied(path: str, what: str, exc: OSError) -> StoreError | None:
    """The StoreError an open refused for lack of permission deserves when another user
    (root, as a rule) owns the file; None for any other failure."""
    if not isinstance(exc, PermissionError):
        return None
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        return None
    me = os.geteuid()
    if owner == me:
        return None
    return StoreError(
        f"cannot open the {what} {path}: it belongs to {_user(owner)}, and this user "
        f"({_user(me)}) may not open it; a run as that user left it. Give it to this user "
        f"(`chown {me} {path}`) or, while no mlauth process runs, remove it (`rm {path}`: "
        "mlauth creates the file itself)."
    )


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


def check_own_name(path: str, what: str) -> os.stat_result | None:
    """:func:`check_own_fd`'s rules, looked at by name (``lstat``) without opening the file;
    None if it is missing.

    For files another library opens by name (SQLite's database, ``-wal`` and ``-shm``), on
    which this process may hold POSIX locks through that library: closing any descriptor of
    such a file drops every lock the process holds on it, so it must never be opened here.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot look at the {what} {path}: {exc.strerror or exc}") from exc
    refused = why_refused(path, what)  # a link, or not a regular file
    if refused is not None:
        raise refused
    if info.st_nlink != 1:
        raise _planted(
            what,
            path,
            f"it has {info.st_nlink} names (hard links), so what mlauth writes there would "
            "show under another name too",
            f"Remove the other names (`find / -xdev -samefile {path}` lists them) or, if you "
            f"did not make them, this one (`rm {path}`)",
        )
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        raise _planted(
            what,
            path,
            f"it belongs to {_user(info.st_uid)}, not to this user ({_user(me)}) or root",
            f"If an earlier run as that user left it, give it to this one (`chown {me} "
            f"{path}`); otherwise {_remove(path).lower()}",
        )
    return info


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
        check_own_fd(fd, path, "temporary file", created=True)  # run as root: given to whom
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


# -- the folder, and the folders above it ---------------------------------------------------


class _Verdict(NamedTuple):
    seen: tuple[int, int, int]  # (mode, owner, group) when judged
    others: str | None  # who besides this user and root may replace what is in it
    warned: bool


# Folder -> its verdict: the group lookup (which may enumerate every user) and the warning
# happen once per process for each folder, and again only on a change of mode or owner.
_judged_folders: dict[str, _Verdict] = {}


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


@functools.cache
def _unmapped_owner() -> int | None:
    """The uid a file shows when its owner is outside this user namespace, or None outside
    one. In a rootless container (``unshare -r``, podman, bubblewrap) everything the host's
    root owns shows as that uid (65534): nobody can act as it, inside or out, and no chown
    from inside could change it, so it is the host's, like root's."""
    try:
        with open("/proc/self/uid_map") as handle:
            mapping = handle.read().split()
        if mapping == ["0", "0", "4294967295"]:
            return None  # the initial namespace: 65534 is a real user there (nobody)
        with open("/proc/sys/kernel/overflowuid") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _other_writers(info: os.stat_result) -> str | None:
    """Who besides this user and root can rename what the folder holds; None if nobody.

    The sticky bit keeps the group (and everyone) from renaming this user's entries, never
    the folder's owner.
    """
    if info.st_uid not in (os.geteuid(), 0) and info.st_uid != _unmapped_owner():
        return f"its owner, {_user(info.st_uid)}"
    sticky = info.st_mode & stat.S_ISVTX
    if (
        info.st_mode & stat.S_IWGRP
        and not sticky
        and not _group_is_private(info.st_gid, info.st_uid)
    ):
        try:
            group = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group = str(info.st_gid)
        return f"the members of group {group}"
    return None


def _everyone_writes(folder: str, path: str, below: str, mode: int) -> StoreError:
    if path == folder:
        where = f"every user of this machine may write that folder (mode {mode:04o})"
        what = "replace the .env, its lock or its journal"
    else:
        where = f"every user of this machine may write {path} (mode {mode:04o}), a folder above it"
        what = f"rename {below} away and put a folder of theirs, with their own .env, in its place"
    return StoreError(
        f"refusing to spend the refresh token in {folder}: {where}, so anyone could {what} "
        f"and take or break the token chain. Make it writable only by its owner (`chmod o-w "
        f"{path}`), or add the sticky bit (`chmod +t {path}`) if other users must create files "
        "there."
    )


def _warn(folder: str, path: str, below: str, info: os.stat_result, others: str) -> None:
    """The WARNING that ``others`` may write ``path``: the .env's folder or one above it."""
    mode = stat.S_IMODE(info.st_mode)
    if path == folder:
        where = f"{path} (mode {mode:04o})"
        what = "replace the .env and its refresh lock, so they hold its tokens"
        elsewhere = "a folder of this user's"
    else:
        where = f"{path} (mode {mode:04o}), a folder above {folder},"
        what = (
            f"rename {below} away and put a folder of theirs in its place, so they hold the "
            "tokens of the .env there"
        )
        elsewhere = "a folder whose parents are this user's or root's"
    if info.st_uid not in (os.geteuid(), 0):  # the sticky bit does not stop a folder's owner
        fix = (
            f"give it to this user (`chown {os.geteuid()} {path}`) or keep the .env in {elsewhere}"
        )
    else:
        fix = (
            f"make it writable only by this user (`chmod g-w {path}`, or `chown` it), or add "
            f"the sticky bit (`chmod +t {path}`)"
        )
    log.warning(
        "%s can be written by %s: they can %s as much as this user does. If they should not, %s.",
        where,
        others,
        what,
        fix,
    )


def _judge(folder: str, path: str, below: str, info: os.stat_result, named: set[str]) -> str | None:
    """Who else may write ``path`` (cached); warns once, unless a folder below named them."""
    seen = (info.st_mode, info.st_uid, info.st_gid)
    verdict = _judged_folders.get(path)
    if verdict is None or verdict.seen != seen:
        verdict = _Verdict(seen, _other_writers(info), warned=False)
        _judged_folders[path] = verdict
    if verdict.others is not None and not verdict.warned and verdict.others not in named:
        _warn(folder, path, below, info, verdict.others)
        _judged_folders[path] = verdict._replace(warned=True)
    return verdict.others


def check_folder(folder: str) -> None:
    """The rule for the folder that holds the ``.env`` and mlauth's files beside it.

    ``folder`` is a real path (no symbolic link in it): the caller resolved the ``.env``'s.

    - Writable by every user, without the sticky bit: StoreError. Anyone on the machine
      could replace the ``.env`` (pointing ``ML_TOKEN_URL`` at a server of theirs) or the
      lock (two lock files, two refreshers, a spent chain); nothing mlauth checks can help.
    - With the sticky bit (``/tmp``-like): fine. Nobody else but the folder's owner can
      rename or remove this user's files there, and a name planted in advance is refused by
      :func:`open_own`.
    - Writable by a group (a setgid project folder, umask 002) or owned by another user:
      one WARNING per process. They can replace the ``.env`` as they can the code that runs
      with it, so refusing would protect nothing the folder's owner has not shared already.
      A group whose only member is the folder's owner (a user-private group) is no one else.

    The same rule holds for every folder above it, up to ``/`` (OpenSSH's ``StrictModes``):
    whoever may write one can rename the folder below it away and put one of theirs in its
    place. A folder above adds no warning for writers a folder below it already named (a
    volume owned by one user down to the ``.env``'s folder is named once). Each folder is
    ``stat``-ed on every call, so a refusal is never cached; a warning is.
    """
    named: set[str] = set()  # who else may write, as warned about (or not) below
    path, below = folder, folder
    while True:
        try:
            info = os.stat(path)
        except OSError as exc:
            raise StoreError(f"cannot inspect {path}: {exc.strerror or exc}") from exc
        mode = stat.S_IMODE(info.st_mode)
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise _everyone_writes(folder, path, below, mode)
        others = _judge(folder, path, below, info, named)
        if others is not None:
            named.add(others)
        parent = os.path.dirname(path)
        if parent == path:
            return
        path, below = parent, path
