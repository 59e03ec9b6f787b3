"""Whole trees on the host: remove, copy, measure."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ociworker.errors import HostError


def rmtree(path: Path) -> None:
    """Delete a snapshot tree, also when its content removed its own write bits."""

    def retry(func: Callable[..., Any], p: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return  # a concurrent sweep or remove got there first
        if not isinstance(exc, PermissionError):
            raise exc
        # Layers may hold 0555 dirs; as non-root we must unlock the parent first.
        parent = os.path.dirname(p)
        os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
        func(p)

    if path.is_symlink() or not path.exists():
        path.unlink(missing_ok=True)
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: retry(f, p, info[1]))


def empty_dir(d: Path) -> None:
    """Remove everything in ``d`` (nothing below may be mounted); a missing ``d`` is fine."""
    if not d.is_dir():
        return
    for entry in d.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new path ``dst`` with owners, modes, xattrs, hardlinks,
    devices and mtimes.

    cp(1) does all of that in one well-tested pass, and ``--reflink=auto`` makes
    it a metadata-only clone on btrfs/xfs; doing it in Python would mean
    reimplementing hardlink tracking, xattr and device handling file by file.
    """
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", os.fspath(src), os.fspath(dst)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise HostError(f"copying {src} to {dst} failed: {proc.stderr.strip()}")


def disk_usage(path: Path) -> int:
    """Bytes of disk used below ``path`` (its root dir excluded), each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            total += st.st_blocks * 512
    return total
