"""File actions (COPY, ADD, mkdir, mkfile, rm) done in-process on a mounted snapshot.

Every path on both sides goes through ``secure_join``: a context symlink that
points at /etc, or a COPY destination that passes through a symlink in the
image, is resolved inside its own root and can never reach the host. Sync
code: callers run it in a thread.

COPY follows BuildKit's file op: wildcards are matched one path component at a
time with Go's ``filepath.Match`` rules; ``--exclude`` patterns (.dockerignore
syntax) are matched against paths relative to each copied source; ``--parents``
copies the tree below the source root (or below a ``/./`` pivot) filtered by the
source pattern, keeping the directories between; ADD extracts local tar archives
(see ``untar``). Selecting the sources is ``fs.walk``'s.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ociworker.core.filemode import apply_symbolic_mode
from ociworker.core.graph import Copy, Mkdir, Mkfile, Rm
from ociworker.errors import NotFoundError, UnsafePathError, UserError
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.fs.paths import clean, secure_join
from ociworker.fs.walk import (
    Ignore,
    Source,
    has_wildcards,
    match_component,
    match_sources,
    not_found,
    walk_selected,
)


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


def resolve_chown(dest_root: Path, spec: str) -> Owner | None:
    """``--chown`` as Docker documents it: names are looked up in the destination's
    /etc/passwd and /etc/group; a user without a group takes gid = uid."""
    if not spec:
        return None
    from ociworker.fs.users import resolve_user

    user_part, _, group_part = spec.partition(":")
    resolved = resolve_user(dest_root, spec if group_part else user_part)
    if group_part:
        return Owner(resolved.uid, resolved.gid)
    # BuildKit (file op readUser): a user by name takes its primary group from
    # /etc/passwd, a numeric one gid = uid
    numeric = user_part.isascii() and user_part.isdigit()
    return Owner(resolved.uid, resolved.uid if numeric else resolved.gid)


def abs_path(path: str, cwd: str) -> str:
    """A Dockerfile path relative to WORKDIR made absolute, keeping a trailing slash."""
    trailing = path.endswith("/") or path.endswith("/.") or path in (".", "")
    joined = posixpath.normpath(posixpath.join(cwd or "/", path))
    if not joined.startswith("/"):
        joined = "/" + joined
    if joined.startswith("//"):
        joined = "/" + joined.lstrip("/")
    return joined.rstrip("/") + "/" if trailing and joined != "/" else joined


# --- patterns -------------------------------------------------------------------------


def source_roots(src: Source, action: Copy) -> list[str]:
    """Source paths whose whole subtrees decide what ``action`` copies: what a cache
    key must hash. With ``--parents`` that is the literal part of the pattern below
    the pivot, since a ``**`` can reach any depth there; otherwise the matches."""
    if not action.parents:
        return match_sources(src, action.src, action.allow_wildcard)
    parent, pivot, pattern = action.src.partition("/./")
    if not pivot:
        parent, pattern = "", action.src
    literal: list[str] = []
    for part in clean(pattern).lstrip("/").split("/"):
        if has_wildcards(part):
            break
        literal.append(part)
    prefix = "/".join(p for p in literal if p)
    bases = match_sources(src, clean(parent).lstrip("/"), action.allow_wildcard)
    return [posixpath.join(b, prefix).strip("/") if prefix else b for b in bases]


def _include_matcher(pattern: str) -> IgnoreMatcher:
    # An include pattern is matched like a .dockerignore line, where a leading "!"
    # would turn it into an exception; escaped, it stays a literal "!".
    return IgnoreMatcher(["\\" + pattern if pattern.startswith("!") else pattern])


def _may_match_below(pattern_parts: list[str], sub: str) -> bool:
    """Whether something below the directory ``sub`` can match the include pattern."""
    for i, name in enumerate(sub.split("/")):
        if i >= len(pattern_parts):
            return False
        part = pattern_parts[i]
        if "**" in part:
            return True
        if not match_component(part, name):
            return False
    return True


# --- walking --------------------------------------------------------------------------


# --- COPY / ADD -----------------------------------------------------------------------


def _multi_source_error(action: Copy) -> UserError:
    cmd = "ADD" if action.unpack_archive else "COPY"
    return UserError(
        f"When using {cmd} with more than one source file, "
        "the destination must be a directory and end with a /"
    )


def do_copy(dest_root: Path, src: Source, action: Copy, cwd: str) -> None:
    chown = resolve_chown(dest_root, action.chown)
    # Context files carry the client's owners, which mean nothing in the image.
    owner = chown if chown is not None or not src.is_context else Owner(0, 0)
    exclude = IgnoreMatcher(action.exclude) if action.exclude else None
    dest = abs_path(action.dest, cwd)
    copier = _Copier(dest_root, src, action, owner, chown, exclude)
    if action.parents:
        copier.copy_parents(dest)
        return
    wildcard = action.allow_wildcard and has_wildcards(action.src)
    matches = match_sources(src, action.src, action.allow_wildcard)
    if wildcard and exclude is not None:
        # A wildcard match is itself subject to --exclude, by its name: that is how
        # ``COPY --exclude=*.txt hom* /dir/`` leaves out homefile.txt.
        matches = [m for m in matches if not exclude.excluded(posixpath.basename(m))]
    if not matches:
        if wildcard and action.allow_empty_wildcard:
            return
        raise not_found(src, clean(action.src).lstrip("/"))
    dest_is_dir = action.dest_is_dir or dest.endswith("/")
    if action.multi_source and not dest_is_dir:
        # one of several literal sources: only an existing directory takes them
        if not secure_join(dest_root, dest).is_dir():
            raise _multi_source_error(action)
        dest_is_dir = True
    if len(matches) > 1 and not dest_is_dir:
        if not secure_join(dest_root, dest).is_dir():
            raise _multi_source_error(action)
        dest_is_dir = True
    for rel in matches:
        copier.copy_one(rel, dest, dest_is_dir)


class _Copier:
    """One Copy action: the source, the destination root and the metadata rules."""

    def __init__(
        self,
        dest_root: Path,
        src: Source,
        action: Copy,
        owner: Owner | None,
        chown: Owner | None,
        exclude: Ignore | None,
    ) -> None:
        self.root = dest_root
        self.src = src
        self.action = action
        self.owner = owner
        self.chown = chown
        self.exclude = exclude
        self.links: dict[tuple[int, int], Path] = {}

    def out_path(self, container_path: str, follow_last: bool = False) -> Path:
        return secure_join(self.root, container_path, follow_last=follow_last)

    def copy_one(self, rel: str, dest: str, dest_is_dir: bool) -> None:
        follow = self.action.follow_symlinks
        top = secure_join(self.src.root, rel, follow_last=follow)
        try:
            st = os.stat(top) if follow else os.lstat(top)
        except FileNotFoundError:
            raise not_found(self.src, rel) from None
        if self.src.excluded(rel) and not stat.S_ISDIR(st.st_mode):
            raise not_found(self.src, rel)
        if self.action.unpack_archive and stat.S_ISREG(st.st_mode):
            # ADD's archive code (tar, bz2, lzma) loads only when an ADD copies a file
            from ociworker.ops.untar import ArchiveOwner, extract_archive, is_tar_archive

            if is_tar_archive(top):
                # BuildKit extracts into dest as a directory, slash or not.
                target = self.out_path(dest, follow_last=True)
                _ensure_dir(self.root, target, self.chown)
                owner = ArchiveOwner(self.chown.uid, self.chown.gid) if self.chown else None
                extract_archive(top, self.root, "/" + str(target.relative_to(self.root)), owner)
                return
        if stat.S_ISDIR(st.st_mode):
            self.copy_dir(rel, st, dest, dest_is_dir)
            return
        dest_path = self.out_path(dest, follow_last=True)
        if dest_is_dir or dest_path.is_dir():
            _ensure_dir(self.root, dest_path, self.owner)
            out = self.out_path(posixpath.join(dest, posixpath.basename(rel)))
        else:
            _ensure_dir(self.root, dest_path.parent, self.owner)
            out = self.out_path(dest)
        self.copy_entry(top, out, st)

    def copy_dir(self, rel: str, st: os.stat_result, dest: str, dest_is_dir: bool) -> None:
        if self.action.dir_contents_only:
            target_path = dest
        else:
            target_path = posixpath.join(dest, posixpath.basename(rel))
            dest_is_dir = False
        target = self.out_path(target_path, follow_last=True)
        made: list[tuple[Path, os.stat_result]] = []
        if dest_is_dir:
            # "dest/" is made like ``mkdir -p``; an existing dir keeps its metadata.
            _ensure_dir(self.root, target, self.owner)
        elif not target.exists():
            _ensure_dir(self.root, target.parent, self.owner)
            os.mkdir(target, 0o700)
            # The context root's own mode on the client says nothing about the image.
            context_root = self.src.is_context and rel == ""
            self.apply_meta(target, st, mode=0o755 if context_root else None)
            made.append((target, st))
        elif not target.is_dir():
            raise UserError(f"cannot copy directory /{rel} onto the file {target_path}")
        self.copy_tree(rel, "/" + str(target.relative_to(self.root)), None, made)

    def copy_parents(self, dest: str) -> None:
        raw = self.action.src
        parent, pivot, pattern = raw.partition("/./")
        if not pivot:
            parent, pattern = "", raw
        base_pattern = clean(parent).lstrip("/")
        include_pattern = clean(pattern).lstrip("/")
        bases = match_sources(self.src, base_pattern, self.action.allow_wildcard)
        literal = not has_wildcards(parent) and not has_wildcards(pattern)
        if literal:
            want = posixpath.join(base_pattern, include_pattern).strip("/")
            path = secure_join(self.src.root, want, follow_last=self.action.follow_symlinks)
            if not os.path.lexists(path) or self.src.excluded(want):
                raise not_found(self.src, want)
        include = _include_matcher(include_pattern) if include_pattern else None
        target = self.out_path(dest, follow_last=True)
        _ensure_dir(self.root, target, self.owner)
        target_path = "/" + str(target.relative_to(self.root))
        copied = 0
        for base in bases:
            top = secure_join(self.src.root, base)
            if not top.is_dir():
                continue
            copied += self.copy_tree(base, target_path, include, [])
        if copied == 0 and not literal and not self.action.allow_empty_wildcard:
            raise not_found(self.src, clean(raw).lstrip("/"))

    def copy_tree(
        self,
        top_rel: str,
        target: str,
        include: IgnoreMatcher | None,
        made: list[tuple[Path, os.stat_result]],
    ) -> int:
        """Copy what is below ``top_rel`` to below ``target`` (an existing directory,
        as a container path); with ``include``, only paths (relative to ``top_rel``)
        it matches, plus the directories that lead to them. Returns the entry count."""
        prune: Callable[[str], bool] | None = None
        if include is not None:
            parts = include.patterns[0].split("/")

            def prune(sub: str) -> bool:
                return not include.excluded(sub) and not _may_match_below(parts, sub)

        present: set[str] = {""}
        count = 0
        walk = walk_selected(self.src, top_rel, self.action.follow_symlinks, self.exclude, prune)
        for child_rel, st in walk:
            if child_rel == top_rel:
                continue
            sub = child_rel[len(top_rel) :].lstrip("/") if top_rel else child_rel
            if include is not None and not include.excluded(sub):
                continue
            self.make_ancestors(top_rel, target, sub, present, made)
            out = self.out_path(posixpath.join(target, sub))
            self.copy_entry(secure_join(self.src.root, child_rel, follow_last=False), out, st)
            if stat.S_ISDIR(st.st_mode):
                present.add(sub)
                made.append((out, st))
            count += 1
        # Directory times are settled after their contents were written.
        for path, st in reversed(made):
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return count

    def make_ancestors(
        self,
        top_rel: str,
        target: str,
        sub: str,
        present: set[str],
        made: list[tuple[Path, os.stat_result]],
    ) -> None:
        """Create the directories between ``target`` and ``sub`` that were not copied
        themselves (left out by a pattern), with their source's metadata."""
        parts = sub.split("/")[:-1]
        for i in range(len(parts)):
            a = "/".join(parts[: i + 1])
            if a in present:
                continue
            out = self.out_path(posixpath.join(target, a), follow_last=True)
            if not os.path.lexists(out):
                src_rel = posixpath.join(top_rel, a) if top_rel else a
                st = os.lstat(secure_join(self.src.root, src_rel, follow_last=False))
                os.mkdir(out, 0o700)
                self.apply_meta(out, st)
                made.append((out, st))
            elif not out.is_dir():
                raise UserError(f"cannot copy into {posixpath.join(target, a)}: not a directory")
            present.add(a)

    def copy_entry(self, src_path: Path, out: Path, st: os.stat_result) -> None:
        mode = st.st_mode
        _remove_existing(out, stat.S_ISDIR(mode))
        if stat.S_ISDIR(mode):
            if not out.exists():
                os.mkdir(out, 0o700)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src_path), out)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                os.link(self.links[key], out)
                return
            _copy_file(src_path, out)
            if st.st_nlink > 1:
                self.links[key] = out
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(out, mode, st.st_rdev)
        else:
            return  # sockets are not copied, as in BuildKit
        self.apply_meta(out, st)

    def apply_meta(self, path: Path, st: os.stat_result, mode: int | None = None) -> None:
        uid, gid = (self.owner.uid, self.owner.gid) if self.owner else (st.st_uid, st.st_gid)
        os.lchown(path, uid, gid)
        if stat.S_ISLNK(st.st_mode):
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            return
        if self.action.chmod is not None:
            mode = self.action.chmod
        elif self.action.chmod_symbolic:
            base = mode if mode is not None else stat.S_IMODE(st.st_mode)
            mode = apply_symbolic_mode(self.action.chmod_symbolic, base, stat.S_ISDIR(st.st_mode))
        os.chmod(path, mode if mode is not None else stat.S_IMODE(st.st_mode))
        if not stat.S_ISDIR(st.st_mode):
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _ensure_dir(root: Path, path: Path, owner: Owner | None) -> None:
    """``mkdir -p`` inside ``root``; new directories are 0755 and owned by ``owner``."""
    if not _inside(root, path):
        raise UnsafePathError(f"destination {path} escapes the root")
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != root:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        shown = "/" + str(p.relative_to(root))
        raise UserError(f"cannot copy to {shown}: it is not a directory")
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)  # whatever the umask
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


# --- mkdir / mkfile / rm --------------------------------------------------------------


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
    if path.is_dir() and not path.is_symlink():
        # Never rmtree a directory to put a file there (COPY <<EOF /existing-dir).
        raise UserError(f"cannot write file {target}: a directory is in the way")
    _remove_existing(path, False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(action.data.encode())
    if owner is not None:
        os.lchown(path, owner.uid, owner.gid)
    os.chmod(path, action.mode)  # after chown, which clears set-id bits


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
