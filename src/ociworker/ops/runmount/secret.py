"""The host side of ``RUN --mount=type=secret``: the step's secret files are
written to a fresh tmpfs that we mount (under the state dir's tmp, in a 0700
dir) for the step alone, and are bind-mounted read-only from there; the tmpfs
is unmounted when the step ends, so a secret's bytes never touch a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ociworker.core.mounts import Mount
from ociworker.fs.mount import mount_all, unmount
from ociworker.log import get_logger

_log = get_logger("ociworker.ops.runmount.secret")
_CHUNK = 65536


@dataclass(frozen=True)
class SecretFile:
    data: bytes = field(repr=False)
    mode: int = 0o400
    uid: int = 0
    gid: int = 0


def private_dir(tmp: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp, prefix=prefix))  # mkdtemp makes it 0700


def _tmpfs_size(files: Sequence[SecretFile]) -> int:
    # page-rounded per file plus slack for inodes; secrets are at most 500 KiB each
    return sum((len(f.data) // 4096 + 2) * 4096 for f in files) + 65536


def _mount_secrets(d: Path, files: Sequence[SecretFile]) -> list[Path]:
    opts = ("nosuid", "nodev", "noexec", "mode=0700", f"size={_tmpfs_size(files)}")
    mount_all([Mount("tmpfs", "tmpfs", opts)], d)
    paths = []
    for i, f in enumerate(files):
        path = d / f"secret-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(f.data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, f.uid, f.gid)
            os.fchmod(fd, f.mode)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def _release(d: Path) -> None:
    unmount(d)
    d.rmdir()


@contextlib.asynccontextmanager
async def secret_files(tmp: Path, files: Sequence[SecretFile]) -> AsyncIterator[list[Path]]:
    """Host paths of ``files``, on a tmpfs that exists only inside the ``with``."""
    if not files:
        yield []
        return
    d = await asyncio.to_thread(private_dir, tmp, "secrets-")
    mounting = asyncio.ensure_future(asyncio.to_thread(_mount_secrets, d, files))
    try:
        # shielded: a cancel must not leave the tmpfs mounted behind our back
        paths = await asyncio.shield(mounting)
        yield paths
    finally:
        await asyncio.wait([mounting])
        if not mounting.cancelled():
            mounting.exception()
        await asyncio.shield(asyncio.to_thread(_release, d))
