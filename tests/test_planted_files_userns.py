"""The folders above the ``.env``'s (mlauth/stores/private.py check_folder) on a
layout where nobody else can write them (real subprocesses in a user namespace).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

# An unprivileged user of the host (no passwd entry needed), who becomes "root" inside an
# unprivileged user namespace (`unshare --map-root-user`): rootless containers, bubblewrap,
# Flatpak, `unshare -r`. Everything the host's root owns shows there as owned by the
# kernel's overflow uid (65534, "nobody"), which no process can be, inside or out.
HOST_UID = 4242

# Run as root: imports first (the interpreter lives where HOST_UID cannot read), then
# becomes HOST_UID and enters a new user namespace as its root, as `unshare -r` does.
CHECK = """\
import ctypes, logging, os, sys
logging.basicConfig(format="%(levelname)s %(message)s")
from mlauth.stores.private import check_folder
uid = int(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid cleared it, and /proc/self with it
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.exit("unshare: " + os.strerror(ctypes.get_errno()))
for name, line in (("uid_map", f"0 {uid} 1"), ("setgroups", "deny"), ("gid_map", f"0 {uid} 1")):
    with open(f"/proc/self/{name}", "w") as file:
        file.write(line)
print("uid", os.geteuid(), "owner of /", os.stat("/").st_uid, flush=True)
check_folder(sys.argv[1])
print("checked", flush=True)
"""


def check_in_user_namespace(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHECK, str(folder), str(HOST_UID)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def own_folder() -> Iterator[Path]:
    """A folder of HOST_UID's under /tmp (which it can reach), its .env's folder."""
    if os.geteuid() != 0:
        pytest.skip("environment limit: acting as another user needs root")
    folder = Path(tempfile.mkdtemp(prefix="review3-userns-", dir="/tmp"))
    try:
        os.chown(folder, HOST_UID, HOST_UID)
        folder.chmod(0o700)
        probe = check_in_user_namespace(Path("/"))
        if not probe.stdout.startswith("uid 0 owner of / 65534\n"):
            pytest.skip(f"environment limit: no user namespace ({probe.stderr.strip()})")
        yield folder
    finally:
        shutil.rmtree(folder)


def test_folders_of_the_overflow_uid_in_a_user_namespace_are_nobody_elses(
    own_folder: Path,
) -> None:
    # Inside the namespace the .env's folder is root's (this process's own), /tmp is 1777 and
    # / is 0755, both shown as owned by uid 65534 because their host owner is not mapped.
    # Nobody can act as that uid, so a WARNING that it "can be written by its owner, nobody"
    # is a false alarm on every run, and its fix (`chown 0 /tmp`) cannot work: the kernel
    # refuses a chown from inside the namespace. Before the merge a sticky /tmp said nothing.
    proc = check_in_user_namespace(own_folder)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "uid 0 owner of / 65534\nchecked\n", proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
