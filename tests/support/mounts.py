"""Bind mounts, as Docker and Kubernetes give a container its ``.env`` or its volume, and a
small tmpfs to fill or remount read-only (the tests that use them run as root, as CI does)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

MOUNT, UMOUNT = shutil.which("mount"), shutil.which("umount")


@contextlib.contextmanager
def bind_file(source: Path, target: Path, *, read_only: bool = False) -> Iterator[Path]:
    """``target`` (created empty) becomes a bind mount of ``source``, a file or a folder."""
    if MOUNT is None or UMOUNT is None:
        pytest.skip("environment limit: no mount/umount command on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        target.mkdir(exist_ok=True)
    else:
        target.touch()
    done = subprocess.run(
        [MOUNT, "--bind", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"environment limit: cannot bind-mount here (needs root): {done.stderr}")
    try:
        if read_only:
            subprocess.run([MOUNT, "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run([UMOUNT, str(target)], check=True)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    if MOUNT is None or UMOUNT is None:
        pytest.skip("environment limit: no mount/umount command on PATH")
    done = subprocess.run(
        [MOUNT, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            "environment limit: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
            + done.stderr.strip()
        )
    try:
        yield where
    finally:
        subprocess.run([UMOUNT, "-l", str(where)], check=False)


def remount_read_only(where: Path) -> None:
    subprocess.run([MOUNT, "-o", "remount,ro", str(where)], check=True)
