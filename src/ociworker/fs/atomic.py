"""Files that appear whole or not at all: temp file in the same dir, fsync,
rename, fsync the dir (so the rename itself survives a crash)."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_beside(tmp: Path) -> BinaryIO:
    """Create the new file ``tmp`` (a temp name beside a destination) for
    writing. A missing directory is reported by its own name, not the temp's,
    which the user never chose."""
    try:
        return open(tmp, "xb")  # the caller closes it
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "No such file or directory", os.fspath(tmp.parent)
        ) from None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one,
    never a part. The temp file sits next to ``path`` (a rename does not cross
    filesystems), has a name no other writer uses, and is removed on failure.
    The parent must exist: these are the user's files (``--iidfile``,
    ``--metadata-file``), and buildx does not create their directories."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with create_beside(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
