"""Why a save failed, in the words every writer shares; each writer adds its own cases.

The ordinary replace (:mod:`.replace`) and the write in place (:mod:`.inplace`) fail for the
same reasons most of the time (a read-only mount, an immutable file, a full disk); what only
one of them meets (a mount point that cannot be replaced, a file too large to write in place)
is worded by that writer.
"""

from __future__ import annotations

import errno

__all__ = ["SAVE_FIX", "common_fix", "common_reason"]

# The fix for a .env that cannot take a save, in every error that says so.
SAVE_FIX = (
    "Give this user a writable .env: a read-write mount of its folder or of the file (not "
    ":ro, not a Kubernetes Secret volume), no `chattr +i`; or keep the tokens in Redis "
    "(`mlauth migrate --to redis://...`)."
)


def common_reason(exc: OSError) -> str:
    """Why a save (or its probe) failed, for the causes every writer meets."""
    code = exc.errno
    if code == errno.EROFS:
        return "it is on a read-only filesystem or mount"
    if code == errno.EPERM:
        return "the file or its folder refuses changes (immutable or append-only, `chattr`)"
    if code == errno.EACCES:
        return "this user may not write the file or its folder"
    if code == errno.ENOSPC:
        return "the disk is full"
    return "the save failed"


def common_fix(exc: OSError) -> str:
    """The fix to name after :func:`common_reason`."""
    if exc.errno == errno.ENOSPC:
        return "free disk space, then try again."
    return SAVE_FIX
