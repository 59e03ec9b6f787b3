"""Path resolution scoped to a root directory.

Every path that comes from a build input (a tar entry, a COPY source or
destination, a mount target) is resolved with ``secure_join``: ``..`` is clamped
at the root and symlinks are followed *as if the root were /*, so no input can
name a host path outside the root. This is the same rule as
cyphar/filepath-securejoin, which runc and BuildKit use; written here because
there is no maintained Python equivalent.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path

from ociworker.errors import UnsafePathError

_MAX_LINKS = 255


def clean(path: str) -> str:
    """Lexically clean an absolute container path, clamping ``..`` at /."""
    out = posixpath.normpath("/" + path)
    if out.startswith("//"):
        out = "/" + out.lstrip("/")
    return out


def secure_join(root: str | os.PathLike[str], unsafe: str, *, follow_last: bool = True) -> Path:
    """Resolve ``unsafe`` inside ``root``; the result is always ``root`` or below it.

    Missing components are allowed (the rest is joined lexically). With
    ``follow_last=False`` a symlink in the last component is returned itself,
    which is what you want before creating, replacing or removing that entry.
    """
    root_s = os.fspath(root)
    parts = [p for p in unsafe.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root_s, *resolved, part)
        is_last = not parts
        if is_last and not follow_last:
            resolved.append(part)
            break
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        except NotADirectoryError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise UnsafePathError(f"too many levels of symbolic links in {unsafe!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return Path(root_s, *resolved)


def within(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is ``root`` or lexically below it."""
    r = os.path.abspath(os.fspath(root))
    p = os.path.abspath(os.fspath(path))
    return p == r or p.startswith(r.rstrip("/") + "/")


def check_relative_name(name: str) -> str:
    """Reject names that are absolute, unclean or contain ``..`` (for context sync)."""
    if not name or name.startswith("/") or "\x00" in name:
        raise UnsafePathError(f"invalid path {name!r}: must be relative")
    norm = posixpath.normpath(name)
    if norm != name.rstrip("/") or norm == ".." or norm.startswith("../"):
        raise UnsafePathError(f"invalid path {name!r}: must be clean and stay inside the root")
    return norm


#: a directory opened only to be walked from or bound, never through a symlink
DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir_beneath(root_fd: int, parts: Sequence[str]) -> int | None:
    """A descriptor of the directory ``parts`` below ``root_fd``, or None when a
    component is missing or is not a plain directory (a symlink included).

    Why one component at a time: a directory a build can write to may be swapped
    for a symlink at any moment; ``O_NOFOLLOW`` on each step means what we hold
    is always beneath ``root_fd``, whatever the tree looked like when checked."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, DIR_PATH, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                os.close(fd)
                return None
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise
