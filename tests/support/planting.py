"""Another local user who can write the ``.env``'s folder, for the planted-file tests.

The victim is this process (root on CI); the attacker is ``nobody``, run as real
subprocesses that drop to its uid and gid, in a folder both may write: a setgid project
folder of group ``nogroup`` (``nobody``'s group), mode 2770. Outside pytest's own temporary
folder, which ``nobody`` could not enter.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

NOBODY = pwd.getpwnam("nobody")


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY.pw_gid)
    os.setuid(NOBODY.pw_uid)


def run_as_nobody(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` as ``nobody``, whatever it answers."""
    return subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        preexec_fn=_become_nobody,  # runs before exec: the child alone becomes nobody
        timeout=30,
        check=False,
    )


def as_nobody(*argv: str, stdin: bytes = b"") -> None:
    """Run ``argv`` as ``nobody``; AssertionError (with its stderr) unless it succeeds."""
    done = run_as_nobody(*argv, stdin=stdin)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def in_child_as_nobody(action: Callable[[], None]) -> int:
    """Run ``action`` in a forked child that became ``nobody``: its exit status (0 if it
    returned, 1 if it raised, the raw status if it died of a signal)."""
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            _become_nobody()
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def plant_link(link: Path, target: Path) -> None:
    """``nobody`` makes ``link`` a symbolic link to ``target``."""
    as_nobody("ln", "-s", str(target), str(link))


def plant_file(path: Path, data: bytes) -> None:
    """``nobody`` creates ``path`` (its own file, mode 0644) holding ``data``."""
    as_nobody("sh", "-c", 'umask 022 && cat > "$1"', "sh", str(path), stdin=data)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a refresh must not change in a file it was lured to."""

    data: bytes
    mode: int
    owner: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Snapshot:
        info = path.stat()
        return cls(path.read_bytes(), stat.S_IMODE(info.st_mode), info.st_uid, info.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class SharedFolders:
    project: Path  # the victim's .env lives here; nobody may write it too
    elsewhere: Path  # a file of the victim's in another folder, nobody may not read it
    attacker: Path  # nobody's own folder


@contextmanager
def shared_folders() -> Iterator[SharedFolders]:
    """The folders of one attack; removed afterwards. The caller must be root."""
    root = Path(tempfile.mkdtemp(prefix="mlauth-planted-"))
    try:
        root.chmod(0o755)  # nobody may go through it
        project = root / "project"
        project.mkdir()
        os.chown(project, 0, NOBODY.pw_gid)
        project.chmod(0o2770)  # a setgid team folder (umask 002) that nobody belongs to
        private = root / "victim"
        private.mkdir(mode=0o700)
        elsewhere = private / "notes.txt"
        elsewhere.write_text("the victim's own file\n")
        elsewhere.chmod(0o644)  # not 0600: a chmod to 0600 would show
        attacker = root / "attacker"
        attacker.mkdir()
        os.chown(attacker, NOBODY.pw_uid, NOBODY.pw_gid)
        yield SharedFolders(project, elsewhere, attacker)
    finally:
        shutil.rmtree(root)
