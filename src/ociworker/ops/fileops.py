"""File actions (COPY, mkdir, mkfile, rm) done in-process on a mounted snapshot.

Every path on both sides goes through ``secure_join``: a context symlink that
points at /etc, or a COPY destination that passes through a symlink in the
image, is resolved inside its own root and can never reach the host. Sync
code: callers run it in a thread.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ociworker.core.graph import Copy, Mkdir, Mkfile, Rm
from ociworker.errors import NotFoundError, UnsafePathError, UserError
from ociworker.fsutil import secure_join

_MAGIC = set("*?[")


class Ignore(Protocol):
    """.dockerignore rules (frontend.dockerfile.dockerignore.IgnoreMatcher)."""

    def excluded(self, path: str) -> bool: ...

    def can_skip_dir(self, path: str) -> bool: ...


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


@dataclass(frozen=True)
class Source:
    """A tree to copy from: a local context dir or a mounted snapshot."""

    root: Path
    ignore: Ignore | None = None  # only local contexts have one
    is_context: bool = False

    def excluded(self, rel: str) -> bool:
        return self.ignore is not None and bool(rel) and self.ignore.excluded(rel)


def resolve_chown(dest_root: Path, spec: str) -> Owner | None:
    """``--chown`` as Docker reads it: a user without group takes gid = uid."""
    if not spec:
        return None
    from ociworker.executor.user import resolve_user

    user_part, _, group_part = spec.partition(":")
    resolved = resolve_user(dest_root, spec if group_part else user_part)
    return Owner(resolved.uid, resolved.gid if group_part else resolved.uid)


def abs_path(path: str, cwd: str) -> str:
    """A Dockerfile path relative to WORKDIR made absolute, keeping a trailing slash."""
    trailing = path.endswith("/") or path.endswith("/.") or path in (".", "")
    joined = posixpath.normpath(posixpath.join(cwd or "/", path))
    if not joined.startswith("/"):
        joined = "/" + joined
    return joined.rstrip("/") + "/" if trailing and joined != "/" else joined


# --- source matching ----------------------------------------------------------------


def match_sources(src: Source, pattern: str, allow_wildcard: bool) -> list[str]:
    """Paths (relative to the source root, '/'-separated, no leading '/') that
    ``pattern`` names. Wildcards are matched one component at a time, each
    directory resolved inside the root, so a symlinked dir cannot widen the search."""
    clean = posixpath.normpath("/" + pattern).lstrip("/")
    if clean in ("", "."):
        return [""]
    parts = clean.split("/")
    if not allow_wildcard or not any(c in _MAGIC for c in clean):
        return [clean]
    found = [""]
    for part in parts:
        nxt: list[str] = []
        for base in found:
            if not any(c in _MAGIC for c in part):
                nxt.append(posixpath.join(base, part) if base else part)
                continue
            d = secure_join(src.root, base)
            try:
                names = sorted(os.listdir(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if fnmatch.fnmatchcase(name, part):
                    rel = posixpath.join(base, name) if base else name
                    if not src.excluded(rel):
                        nxt.append(rel)
        found = nxt
    return [f for f in found if os.path.lexists(secure_join(src.root, f, follow_last=False))]


def _not_found(src: Source, rel: str) -> NotFoundError:
    hint = ""
    if src.excluded(rel):
        hint = " (it is excluded by .dockerignore)"
    where = "build context" if src.is_context else "source"
    return NotFoundError(f'failed to compute cache key: "/{rel}": not found in {where}{hint}')


def walk_selected(src: Source, rel: str, follow: bool) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of ``rel`` and everything below it that is not excluded,
    in sorted order, directories before their contents. Never follows symlinks
    below ``rel``; follows ``rel`` itself when ``follow`` (as COPY does)."""
    top = secure_join(src.root, rel, follow_last=follow)
    try:
        st = os.stat(top) if follow else os.lstat(top)
    except FileNotFoundError:
        raise _not_found(src, rel) from None
    if src.excluded(rel) and not stat.S_ISDIR(st.st_mode):
        raise _not_found(src, rel)
    yield rel, st
    if stat.S_ISDIR(st.st_mode):
        yield from _walk_dir(src, top, rel)


def _walk_dir(src: Source, dirpath: Path, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for e in entries:
        child = posixpath.join(rel, e.name) if rel else e.name
        if src.excluded(child):
            assert src.ignore is not None
            if e.is_dir(follow_symlinks=False) and not src.ignore.can_skip_dir(child):
                # An exception pattern may still re-include something below.
                yield from _walk_dir(src, Path(e.path), child)
            continue
        st = e.stat(follow_symlinks=False)
        yield child, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(src, Path(e.path), child)


# --- actions --------------------------------------------------------------------------


def do_copy(dest_root: Path, src: Source, action: Copy, cwd: str) -> None:
    owner = resolve_chown(dest_root, action.chown)
    if owner is None and src.is_context:
        owner = Owner(0, 0)
    matches = match_sources(src, action.src, action.allow_wildcard)
    wildcard = action.allow_wildcard and any(c in _MAGIC for c in action.src)
    if not matches:
        if wildcard and action.allow_empty_wildcard:
            return
        if wildcard:
            raise NotFoundError(f"no source files were specified: {action.src!r} matched nothing")
        raise _not_found(src, posixpath.normpath("/" + action.src).lstrip("/"))
    dest = abs_path(action.dest, cwd)
    dest_is_dir = action.dest_is_dir or dest.endswith("/") or len(matches) > 1 or wildcard
    for rel in matches:
        _copy_one(dest_root, src, rel, dest, dest_is_dir, action, owner)


def _copy_one(
    dest_root: Path,
    src: Source,
    rel: str,
    dest: str,
    dest_is_dir: bool,
    action: Copy,
    owner: Owner | None,
) -> None:
    top = secure_join(src.root, rel, follow_last=action.follow_symlinks)
    try:
        st = os.stat(top) if action.follow_symlinks else os.lstat(top)
    except FileNotFoundError:
        raise _not_found(src, rel) from None
    dest_path = secure_join(dest_root, dest)
    if stat.S_ISDIR(st.st_mode):
        if action.dir_contents_only:
            target = dest_path
        else:
            target = secure_join(dest_root, posixpath.join(dest, posixpath.basename(rel)))
        _ensure_dir(dest_root, target, owner)
        links: dict[tuple[int, int], Path] = {}
        for child_rel, child_st in walk_selected(src, rel, action.follow_symlinks):
            if child_rel == rel:
                _apply_meta(target, child_st, owner, action.chmod, is_root=True)
                continue
            sub = child_rel[len(rel) :].lstrip("/") if rel else child_rel
            out = secure_join(
                dest_root, str(target.relative_to(dest_root)) + "/" + sub, follow_last=False
            )
            if not out.parent.exists():  # below a directory .dockerignore left out
                _ensure_dir(dest_root, out.parent, owner)
            _copy_entry(
                secure_join(src.root, child_rel, follow_last=False),
                out,
                child_st,
                owner,
                action.chmod,
                links,
            )
        # directory mtimes are settled after their contents were written
        for child_rel, child_st in walk_selected(src, rel, action.follow_symlinks):
            if stat.S_ISDIR(child_st.st_mode):
                sub = child_rel[len(rel) :].lstrip("/") if rel else child_rel
                p = target / sub if sub else target
                os.utime(p, ns=(child_st.st_atime_ns, child_st.st_mtime_ns), follow_symlinks=False)
        return
    if src.excluded(rel):
        raise _not_found(src, rel)
    if dest_is_dir or (dest_path.is_dir() and not dest_path.is_symlink()):
        _ensure_dir(dest_root, dest_path, owner)
        out = secure_join(
            dest_root, posixpath.join(dest, posixpath.basename(rel)), follow_last=False
        )
    else:
        _ensure_dir(dest_root, dest_path.parent, owner)
        out = secure_join(dest_root, dest, follow_last=False)
    _copy_entry(top, out, st, owner, action.chmod, {})


def _ensure_dir(root: Path, path: Path, owner: Owner | None) -> None:
    if not _inside(root, path):
        raise UnsafePathError(f"destination {path} escapes the root")
    missing: list[Path] = []
    p = path
    while not p.exists() and p != root:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UserError(f"cannot copy to {path.relative_to(root)}: a parent is not a directory")
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        if owner is not None:
            os.lchown(d, owner.uid, owner.gid)


def _inside(root: Path, path: Path) -> bool:
    r = str(root).rstrip("/")
    return str(path) == r or str(path).startswith(r + "/")


def _remove_existing(out: Path, new_is_dir: bool) -> None:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if new_is_dir:
            return
        shutil.rmtree(out)
    else:
        os.unlink(out)


def _copy_entry(
    src_path: Path,
    out: Path,
    st: os.stat_result,
    owner: Owner | None,
    chmod: int | None,
    links: dict[tuple[int, int], Path],
) -> None:
    mode = st.st_mode
    _remove_existing(out, stat.S_ISDIR(mode))
    if stat.S_ISDIR(mode):
        if not out.exists():
            os.mkdir(out, 0o700)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src_path), out)
    elif stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            os.link(links[key], out)
            return
        _copy_file(src_path, out)
        if st.st_nlink > 1:
            links[key] = out
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        os.mknod(out, mode, st.st_rdev)
    else:
        return  # sockets are not copied, as in BuildKit
    _apply_meta(out, st, owner, chmod, is_root=False)


def _copy_file(src: Path, dst: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with open(src, "rb") as fin:
        fd = os.open(dst, flags, 0o600)
        with os.fdopen(fd, "wb") as fout:
            try:  # in-kernel copy (reflinks on filesystems that have them)
                size = os.fstat(fin.fileno()).st_size
                copied = 0
                while copied < size:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), size - copied)
                    if n == 0:
                        break
                    copied += n
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                fin.seek(0)
                fout.seek(0)
                fout.truncate()
                shutil.copyfileobj(fin, fout, 1 << 20)


def _apply_meta(
    path: Path, st: os.stat_result, owner: Owner | None, chmod: int | None, is_root: bool
) -> None:
    uid, gid = (owner.uid, owner.gid) if owner else (st.st_uid, st.st_gid)
    os.lchown(path, uid, gid)
    if stat.S_ISLNK(st.st_mode):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    mode = chmod if chmod is not None else stat.S_IMODE(st.st_mode)
    os.chmod(path, mode)
    if not stat.S_ISDIR(st.st_mode):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def do_mkdir(root: Path, action: Mkdir, cwd: str) -> None:
    owner = resolve_chown(root, action.chown)
    path = secure_join(root, abs_path(action.path, cwd))
    if path.exists():
        if not path.is_dir():
            raise UserError(f"cannot create directory {action.path}: a file is in the way")
        return
    if not action.make_parents and not path.parent.exists():
        raise NotFoundError(f"cannot create directory {action.path}: parent does not exist")
    _ensure_dir(root, path.parent, owner)
    os.mkdir(path, action.mode)
    os.chmod(path, action.mode)
    if owner is not None:
        os.lchown(path, owner.uid, owner.gid)


def do_mkfile(root: Path, action: Mkfile, cwd: str) -> None:
    owner = resolve_chown(root, action.chown)
    target = abs_path(action.path, cwd)
    path = secure_join(root, target, follow_last=False)
    _ensure_dir(root, path.parent, owner)
    _remove_existing(path, False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(action.data.encode())
    os.chmod(path, action.mode)
    if owner is not None:
        os.lchown(path, owner.uid, owner.gid)


def do_rm(root: Path, action: Rm, cwd: str) -> None:
    path = secure_join(root, abs_path(action.path, cwd), follow_last=False)
    if path == root:
        raise UserError("refusing to remove the root directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if action.allow_not_found:
            return
        raise NotFoundError(f"cannot remove {action.path}: not found") from None
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
